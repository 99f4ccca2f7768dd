//! `idle`: how many idle device sessions one gateway holds, in how much
//! memory, and what their keepalives cost. The gateway is its own process
//! (`trellis gateway`), so its RSS (VmRSS, minus a baseline taken before any
//! session) and its CPU time (utime + stime over an idle window, with every
//! device pinging at the keepalive interval) are read from /proc, not
//! estimated. Device sockets are spread over 127.0.0.2.. so 100k of them fit
//! in the ephemeral port ranges.
use crate::cluster::{Cluster, ClusterOptions};
use crate::util;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use trellis_device::DemoApp;
use trellis_device::identity::DeviceIdentity;
use trellis_device::session::{Session, SessionConfig};

/// Physical figures the issue sets as targets.
const TARGET_BYTES: f64 = 4096.0;
const TARGET_CPU_PCT: f64 = 5.0;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Session counts to reach in turn (sessions accumulate).
    #[arg(long, value_delimiter = ',', default_value = "10000,50000,100000")]
    pub sessions: Vec<usize>,
    /// Idle window over which keepalive CPU is measured, seconds.
    #[arg(long, default_value_t = 30.0)]
    pub window: f64,
    /// Device ping interval and the gateway's keepalive_secs.
    #[arg(long, default_value_t = 15)]
    pub keepalive: u64,
    /// Handshakes in flight while sessions are opened.
    #[arg(long, default_value_t = 48)]
    pub concurrency: usize,
    /// Seconds to wait after the baseline before the first session, to
    /// attach a profiler or snapshot /proc/PID/smaps.
    #[arg(long, default_value_t = 0.0)]
    pub hold: f64,
}

impl Args {
    pub fn smoke() -> Self {
        Self {
            sessions: vec![200],
            window: 2.0,
            keepalive: 1,
            concurrency: 16,
            hold: 0.0,
        }
    }
}

struct Fleet {
    connected: AtomicUsize,
    failed: AtomicUsize,
    dropped: AtomicUsize,
}

pub async fn run(args: &Args, trellis_bin: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    println!("== idle sessions ({})", util::machine());
    let asked = args.sessions.iter().copied().max().unwrap_or(0);
    // Each session is one fd in the gateway and one here, plus headroom.
    let nofile = util::raise_nofile(asked as u64 + 10_000)?;
    // Where the hard limit cannot be raised (a sandbox without
    // CAP_SYS_RESOURCE, even as root), go as far as it allows and say so.
    let cap = (nofile as usize).saturating_sub(1_500);
    let mut levels: Vec<usize> = Vec::new();
    for &n in &args.sessions {
        let n = if n > cap {
            println!(
                "{n} sessions do not fit: RLIMIT_NOFILE is {nofile} and cannot be raised here; measuring {cap} instead"
            );
            cap
        } else {
            n
        };
        if !levels.contains(&n) {
            levels.push(n);
        }
    }
    let max = levels.iter().copied().max().unwrap_or(0);
    let mut cluster = Cluster::start(&ClusterOptions {
        gateways: 1,
        keyvaults: 1,
        keepalive_secs: args.keepalive,
        log: "warn".into(),
        trellis_bin,
        signer: false,
        gateway_env: Vec::new(),
        admission: false,
        auth: false,
    })
    .await?;
    let gw_pid = cluster.gateways[0].proc.pid();
    let redis_pid = cluster.redis.pid();
    let gw = cluster.gateways[0].devices;
    // Baseline before any session: the gateway up, connected to Redis and keyvault.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base_rss = util::status_kib(gw_pid, "VmRSS")?;
    let base_anon = util::status_kib(gw_pid, "RssAnon").unwrap_or(0);
    println!(
        "gateway pid {gw_pid}: baseline VmRSS {:.1} MiB; RLIMIT_NOFILE {nofile}; keepalive {} s; window {} s",
        base_rss as f64 / 1024.0,
        args.keepalive,
        args.window
    );
    if args.hold > 0.0 {
        println!("holding {} s before the first session", args.hold);
        tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    }

    let key = crate::handshake::device_key()?;
    let t = Instant::now();
    let ids = cluster.register_many(&key, max, 64).await?;
    println!(
        "registered {max} ids (one shared RSA-1024 key) in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let sources = util::source_addrs(util::addrs_for(max));
    let config = SessionConfig {
        product_id: 6,
        platform_id: 6,
        firmware_version: 1,
        keepalive: Duration::from_secs(args.keepalive),
        event_interval: None,
        ..SessionConfig::default()
    };
    let app = Arc::new(DemoApp::default());
    let fleet = Arc::new(Fleet {
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        dropped: AtomicUsize::new(0),
    });
    let stop = CancellationToken::new();
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut started = 0usize;
    let mut rows = Vec::new();
    let mut ok = true;
    for &target in &levels {
        let t = Instant::now();
        while started < target {
            let identity = DeviceIdentity {
                device_id: ids[started],
                private_key: key.clone(),
                cloud_public_key: cluster.cloud_public_key.clone(),
            };
            let source = sources[started % sources.len()];
            started += 1;
            let (fleet, gate, app, stop, config) = (
                fleet.clone(),
                gate.clone(),
                app.clone(),
                stop.clone(),
                config.clone(),
            );
            tasks.spawn(async move {
                let mut session = None;
                for _attempt in 0..5 {
                    let Ok(_permit) = gate.acquire().await else {
                        return;
                    };
                    let r = async {
                        let s = util::connect_from(source, gw).await?;
                        Session::connect(s, &identity, config.clone())
                            .await
                            .map_err(anyhow::Error::from)
                    };
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        r = r => if let Ok(s) = r { session = Some(s); break; },
                    }
                }
                let Some(session) = session else {
                    fleet.failed.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                fleet.connected.fetch_add(1, Ordering::Relaxed);
                let result = session.run(&*app, stop.clone(), |_| {}).await;
                if result.is_err() {
                    fleet.dropped.fetch_add(1, Ordering::Relaxed);
                }
                fleet.connected.fetch_sub(1, Ordering::Relaxed);
            });
        }
        // Wait for every session of this level (or give up on the failures).
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let done = fleet.connected.load(Ordering::Relaxed)
                + fleet.failed.load(Ordering::Relaxed)
                + fleet.dropped.load(Ordering::Relaxed);
            if done >= target || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            cluster.check_alive()?;
        }
        let ramp = t.elapsed().as_secs_f64();
        // Let the last Hellos, Describes and Redis writes finish.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let live = fleet.connected.load(Ordering::Relaxed);
        let rss = util::status_kib(gw_pid, "VmRSS")?;
        let pids = [gw_pid, redis_pid, std::process::id()];
        let c0 = util::sample_cpu(&pids)?;
        let w0 = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(args.window)).await;
        let secs = w0.elapsed().as_secs_f64();
        let cpu = util::sample_cpu(&pids)?.delta(&c0);
        let live_after = fleet.connected.load(Ordering::Relaxed);
        let rss_after = util::status_kib(gw_pid, "VmRSS")?;
        let anon_after = util::status_kib(gw_pid, "RssAnon").unwrap_or(0);
        let per_session =
            |kib: u64, base: u64| (kib.saturating_sub(base) as f64 * 1024.0) / live.max(1) as f64;
        // The figure held to the target: the heap (RssAnon) the sessions
        // hold once every one has pinged and been refreshed (after the
        // window), not VmRSS, which also counts the binary's code pages
        // faulted in by the first handshakes (about 1 MB, once per process,
        // shared, and the same at 10 sessions as at 100k).
        let bytes = per_session(anon_after, base_anon);
        let vm_bytes = per_session(rss, base_rss);
        let cpu_pct = cpu[0] / secs * 100.0;
        println!(
            "{target:>7} sessions: {live} live ({} failed, {} dropped) after a {ramp:.1} s ramp ({:.0} handshakes/s); gateway VmRSS {:.1} MiB = {vm_bytes:.0} B/session over baseline; after the window RssAnon {:.1} MiB (baseline {:.1}) = {:.0} B/session [target <= {TARGET_BYTES:.0}: {:.2}x], VmRSS {:.1} MiB; keepalive CPU {:.2} % of a core over {secs:.0} s [target < {TARGET_CPU_PCT}]; redis {:.2} %, devices {:.1} %; {} live after",
            fleet.failed.load(Ordering::Relaxed),
            fleet.dropped.load(Ordering::Relaxed),
            live as f64 / ramp.max(1e-9),
            rss as f64 / 1024.0,
            anon_after as f64 / 1024.0,
            base_anon as f64 / 1024.0,
            bytes,
            bytes / TARGET_BYTES,
            rss_after as f64 / 1024.0,
            cpu_pct,
            cpu[1] / secs * 100.0,
            cpu[2] / secs * 100.0,
            live_after,
        );
        println!(
            "RESULT idle sessions={live} bytes_per_session={bytes:.0} target_bytes={TARGET_BYTES:.0} keepalive_cpu_pct={cpu_pct:.2} target_cpu_pct={TARGET_CPU_PCT}"
        );
        rows.push((target, live, bytes, cpu_pct));
        if live < target * 99 / 100 {
            ok = false;
            println!("  only {live} of {target} sessions are live: stopping here");
            break;
        }
    }
    stop.cancel();
    let t = Instant::now();
    while tasks.join_next().await.is_some() {
        if t.elapsed() > Duration::from_secs(30) {
            tasks.abort_all();
        }
    }
    cluster.check_alive()?;
    if !ok {
        anyhow::bail!("not every session came up");
    }
    Ok(())
}

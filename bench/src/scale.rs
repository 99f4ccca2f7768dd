//! `scale`: the shape of scaling out. 1, 2 and 3 gateways behind HAProxy
//! (TCP mode, round robin, as a cloud load balancer would spread devices),
//! with 1 and 2 keyvaults, each setup measured the same way:
//!
//! - handshakes through HAProxy (handshake, Hello, server Hello, close;
//!   OpenSSL devices in this process), and
//! - function calls made on every gateway in turn for devices spread over
//!   all of them by HAProxy (so with n gateways, (n-1)/n of the calls cross
//!   Redis to another gateway),
//!
//! both reported as CPU per operation of every server process (gateways,
//! keyvaults, Redis, HAProxy), read from /proc. CPU per operation does not
//! depend on how many cores the machine has, which the rate does: what the
//! table shows is whether adding a gateway or a keyvault adds work per
//! operation (shared state, fan-out) or only capacity.
use crate::cluster::{Cluster, ClusterOptions, Proc};
use crate::util::{self, Latencies, micros};
use anyhow::{Context, bail};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use trellis_proto::v1::{CallFunctionRequest, GetDeviceStateRequest};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Gateway counts to measure, each behind HAProxy.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub gateways: Vec<usize>,
    /// Keyvault counts to measure with each gateway count.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub keyvaults: Vec<usize>,
    /// Measured seconds of handshakes per setup.
    #[arg(long, default_value_t = 8.0)]
    pub seconds: f64,
    /// Devices handshaking at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Offered function calls per second (open loop) per setup.
    #[arg(long, default_value_t = 500.0)]
    pub call_rate: f64,
    /// Seconds of calls per setup.
    #[arg(long, default_value_t = 6.0)]
    pub call_seconds: f64,
    /// Connected devices the calls rotate over.
    #[arg(long, default_value_t = 12)]
    pub devices: usize,
    /// Seconds per backend for the RSA floor.
    #[arg(long, default_value_t = 2.0)]
    pub limit_seconds: f64,
    /// The HAProxy binary.
    #[arg(long, default_value = "haproxy")]
    pub haproxy: String,
}

impl Args {
    /// The defaults above (for `trellis-bench all`).
    pub fn full() -> Self {
        Self {
            gateways: vec![1, 2, 3],
            keyvaults: vec![1, 2],
            seconds: 8.0,
            concurrency: 32,
            call_rate: 500.0,
            call_seconds: 6.0,
            devices: 12,
            limit_seconds: 2.0,
            haproxy: "haproxy".into(),
        }
    }

    pub fn smoke() -> Self {
        Self {
            gateways: vec![1, 2],
            keyvaults: vec![1],
            seconds: 1.5,
            concurrency: 8,
            call_rate: 100.0,
            call_seconds: 1.5,
            devices: 4,
            limit_seconds: 0.4,
            haproxy: "haproxy".into(),
        }
    }
}

/// HAProxy in TCP mode in front of the gateways' device ports, a child of
/// this process (killed on drop).
struct Balancer {
    proc: Proc,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Balancer {
    async fn start(bin: &str, backends: &[SocketAddr]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("trellis-bench-haproxy-")
            .tempdir()?;
        let port = trellis_core::local_redis::free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut cfg = format!(
            "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\nfrontend devices\n  bind {addr}\n  default_backend gateways\nbackend gateways\n  balance roundrobin\n"
        );
        for (n, b) in backends.iter().enumerate() {
            cfg.push_str(&format!("  server gw{} {b}\n", n + 1));
        }
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg)?;
        let log = dir.path().join("haproxy.log");
        let f = std::fs::File::create(&log)?;
        // Debian puts it in /usr/sbin, which a user's PATH may not have.
        let bin = if bin == "haproxy" && std::path::Path::new("/usr/sbin/haproxy").exists() {
            "/usr/sbin/haproxy"
        } else {
            bin
        };
        let child = std::process::Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| {
                format!("cannot start {bin} (Debian: apt-get install haproxy; or --haproxy PATH)")
            })?;
        let mut proc = Proc::from_child("haproxy", child, log);
        let start = Instant::now();
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if let Some(e) = proc.exited() {
                bail!(e);
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("haproxy did not listen on {addr} within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            proc,
            addr,
            _dir: dir,
        })
    }
}

/// One setup's figures.
struct Row {
    gateways: usize,
    keyvaults: usize,
    handshakes_per_sec: f64,
    handshake_failed: u64,
    /// ms of CPU per handshake: gateways, keyvaults, redis, haproxy.
    handshake_cpu: [f64; 4],
    calls: Latencies,
    calls_failed: u64,
    /// ms of CPU per call: gateways, redis.
    call_cpu: [f64; 2],
    /// Devices per gateway after HAProxy spread them.
    spread: Vec<usize>,
}

pub async fn run(args: &Args, trellis_bin: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let cores = util::cores();
    println!("== scale-out ({})", util::machine());
    let window = Duration::from_secs_f64(args.limit_seconds);
    let limit = tokio::task::spawn_blocking(move || crate::handshake::rsa_limit(window)).await??;
    // CPU of the two private operations one handshake needs, on one core.
    let floor_ms = 1000.0 * cores as f64 / limit.per_sec;
    let mut rows = Vec::new();
    for &keyvaults in &args.keyvaults {
        for &gateways in &args.gateways {
            let row = measure(args, trellis_bin.clone(), gateways, keyvaults).await?;
            print_row(&row, floor_ms);
            rows.push(row);
        }
    }
    println!();
    println!(
        "| gateways | keyvaults | handshakes/s | servers' CPU per handshake (gw + kv + redis + haproxy) | / RSA floor {floor_ms:.3} ms | call p50 / p99 | CPU per call (gw + redis) | devices per gateway |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let hs: f64 = r.handshake_cpu.iter().sum();
        println!(
            "| {} | {} | {:.0} ({} failed) | {:.3} ms ({:.3} + {:.3} + {:.3} + {:.3}) | {:.2}x | {:.2} / {:.2} ms{} | {:.3} ms ({:.3} + {:.3}) | {:?} |",
            r.gateways,
            r.keyvaults,
            r.handshakes_per_sec,
            r.handshake_failed,
            hs,
            r.handshake_cpu[0],
            r.handshake_cpu[1],
            r.handshake_cpu[2],
            r.handshake_cpu[3],
            hs / floor_ms,
            r.calls.pct_ms(50.0),
            r.calls.pct_ms(99.0),
            if r.calls_failed > 0 {
                format!(" ({} failed)", r.calls_failed)
            } else {
                String::new()
            },
            r.call_cpu.iter().sum::<f64>(),
            r.call_cpu[0],
            r.call_cpu[1],
            r.spread
        );
    }
    let failed: u64 = rows
        .iter()
        .map(|r| r.handshake_failed + r.calls_failed)
        .sum();
    if failed > 0 {
        bail!("{failed} handshakes or calls failed");
    }
    Ok(())
}

fn print_row(r: &Row, floor_ms: f64) {
    let hs: f64 = r.handshake_cpu.iter().sum();
    println!(
        "RESULT scale gateways={} keyvaults={} handshakes_per_s={:.0} handshake_cpu_ms={hs:.3} gw={:.3} kv={:.3} redis={:.3} haproxy={:.3} floor_ratio={:.2} call_p50_ms={:.3} call_p99_ms={:.3} call_cpu_ms={:.3} failed={}",
        r.gateways,
        r.keyvaults,
        r.handshakes_per_sec,
        r.handshake_cpu[0],
        r.handshake_cpu[1],
        r.handshake_cpu[2],
        r.handshake_cpu[3],
        hs / floor_ms,
        r.calls.pct_ms(50.0),
        r.calls.pct_ms(99.0),
        r.call_cpu.iter().sum::<f64>(),
        r.handshake_failed + r.calls_failed
    );
}

async fn measure(
    args: &Args,
    trellis_bin: Option<std::path::PathBuf>,
    gateways: usize,
    keyvaults: usize,
) -> anyhow::Result<Row> {
    let mut cluster = Cluster::start(&ClusterOptions {
        gateways,
        keyvaults,
        keepalive_secs: 15,
        log: "warn".into(),
        trellis_bin,
        signer: false,
        gateway_env: Vec::new(),
        admission: false,
        auth: false,
    })
    .await?;
    let balancer = Balancer::start(
        &args.haproxy,
        &cluster
            .gateways
            .iter()
            .map(|g| g.devices)
            .collect::<Vec<_>>(),
    )
    .await?;
    let (key_der, key) = crate::handshake::device_key_der()?;
    let concurrency = args.concurrency.max(1);
    let per_worker = 16;
    let ids = cluster
        .register_many(&key, concurrency * per_worker, 32)
        .await?;
    let fast = {
        use rsa::pkcs8::EncodePublicKey;
        Arc::new(crate::fastdevice::FastKeys::new(
            &key_der,
            cluster.cloud_public_key.to_public_key_der()?.as_bytes(),
        )?)
    };
    let hello = trellis_wire::hello::Hello {
        product_id: 6,
        firmware_version: 1,
        platform_id: 6,
        firmware_sha256: Some([0; 32]),
        ..Default::default()
    };
    // CPU is summed per group: gateways, keyvaults, Redis, HAProxy.
    let groups = [
        cluster
            .gateways
            .iter()
            .map(|g| g.proc.pid())
            .collect::<Vec<_>>(),
        std::iter::once(cluster.keyvault.pid())
            .chain(cluster.more_keyvaults.iter().map(|(p, _)| p.pid()))
            .collect(),
        vec![cluster.redis.pid()],
        vec![balancer.proc.pid()],
    ];
    let all: Vec<u32> = groups.iter().flatten().copied().collect();

    // Handshakes through HAProxy: a warm-up of a quarter, then the window.
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let warmup = Duration::from_secs_f64(args.seconds / 4.0);
    let end = Instant::now() + warmup + Duration::from_secs_f64(args.seconds);
    let sources = util::source_addrs(8);
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let own: Vec<trellis_wire::DeviceId> = ids[w * per_worker..(w + 1) * per_worker].to_vec();
        let (fast, hello, ok, failed, measuring) = (
            fast.clone(),
            hello.clone(),
            ok.clone(),
            failed.clone(),
            measuring.clone(),
        );
        let (source, target) = (sources[w % sources.len()], balancer.addr);
        tasks.push(tokio::spawn(async move {
            let mut first_error = None;
            let mut i = 0usize;
            while Instant::now() < end {
                let id = own[i % own.len()];
                i += 1;
                let result = async {
                    let stream = util::connect_from(source, target).await?;
                    let (mut stream, mut cipher) =
                        crate::fastdevice::handshake(stream, &fast, id, &hello).await?;
                    crate::fastdevice::wait_server_hello(
                        &mut stream,
                        &mut cipher,
                        Duration::from_secs(10),
                    )
                    .await
                }
                .await;
                let counted = measuring.load(Ordering::Relaxed) && Instant::now() <= end;
                match result {
                    Ok(()) if counted => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(()) => {}
                    Err(e) => {
                        if counted {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            first_error
        }));
    }
    tokio::time::sleep(warmup).await;
    let cpu0 = util::sample_cpu(&all)?;
    let ok0 = ok.load(Ordering::Relaxed);
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep_until(end.into()).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = util::sample_cpu(&all)?.delta(&cpu0);
    let done = ok.load(Ordering::Relaxed) - ok0;
    let handshake_failed = failed.load(Ordering::Relaxed);
    for t in tasks {
        if let Some(e) = t.await? {
            println!("handshake error (first of its worker): {e}");
        }
    }
    let per_op = |cpu: &[f64], groups: &[Vec<u32>], n: u64| -> Vec<f64> {
        let mut at = 0;
        groups
            .iter()
            .map(|g| {
                let s: f64 = cpu[at..at + g.len()].iter().sum();
                at += g.len();
                1000.0 * s / n.max(1) as f64
            })
            .collect()
    };
    let hs = per_op(&cpu, &groups, done);
    cluster.check_alive()?;

    // Devices that stay connected, spread by HAProxy; calls made on every
    // gateway in turn.
    let stop = CancellationToken::new();
    let call_ids = &ids[..args.devices.max(1).min(ids.len())];
    let device_tasks = crate::routed::demo_devices(
        balancer.addr,
        call_ids,
        &key,
        &cluster.cloud_public_key,
        &stop,
    )
    .await?;
    let mut clients = Vec::new();
    for n in 0..gateways {
        clients.push(cluster.gateway_client(n).await?);
    }
    let mut spread = vec![0usize; gateways];
    let ready = Instant::now();
    for id in call_ids {
        loop {
            let s = clients[0]
                .get_device_state(GetDeviceStateRequest {
                    device_id: id.to_string(),
                })
                .await;
            if let Ok(s) = s {
                let s = s.into_inner();
                if s.online && !s.functions.is_empty() {
                    if let Some(n) = cluster.gateways.iter().position(|g| g.id == s.gateway_id) {
                        spread[n] += 1;
                    }
                    break;
                }
            }
            if ready.elapsed() > Duration::from_secs(20) {
                bail!("device {id} did not come online within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let call_ids: Arc<Vec<String>> = Arc::new(call_ids.iter().map(|i| i.to_string()).collect());
    let n = (args.call_rate * args.call_seconds).round().max(1.0) as u64;
    let period = Duration::from_secs_f64(1.0 / args.call_rate);
    let call_groups = [groups[0].clone(), groups[2].clone()];
    let call_pids: Vec<u32> = call_groups.iter().flatten().copied().collect();
    let cpu0 = util::sample_cpu(&call_pids)?;
    let start = tokio::time::Instant::now() + Duration::from_millis(10);
    let calls_failed = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::with_capacity(n as usize);
    for i in 0..n {
        tokio::time::sleep_until(start + period.mul_f64(i as f64)).await;
        let issued = tokio::time::Instant::now();
        let mut client = clients[(i as usize) % clients.len()].clone();
        let device_id = call_ids[(i as usize / clients.len()) % call_ids.len()].clone();
        let calls_failed = calls_failed.clone();
        handles.push(tokio::spawn(async move {
            let r = client
                .call_function(CallFunctionRequest {
                    device_id,
                    function: "add".into(),
                    argument: format!("{i},1"),
                    timeout_ms: 5_000,
                    signed_command: Vec::new(),
                })
                .await;
            match r {
                Ok(r) if i64::from(r.get_ref().return_value) == i as i64 + 1 => {
                    Some(micros(issued.elapsed()))
                }
                _ => {
                    calls_failed.fetch_add(1, Ordering::Relaxed);
                    None
                }
            }
        }));
    }
    let mut lat = Vec::with_capacity(n as usize);
    for h in handles {
        if let Some(v) = h.await? {
            lat.push(v);
        }
    }
    let ccpu = util::sample_cpu(&call_pids)?.delta(&cpu0);
    let calls_failed = calls_failed.load(Ordering::Relaxed);
    let cc = per_op(&ccpu, &call_groups, lat.len() as u64);
    stop.cancel();
    for t in device_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    cluster.check_alive()?;
    Ok(Row {
        gateways,
        keyvaults,
        handshakes_per_sec: done as f64 / elapsed,
        handshake_failed,
        handshake_cpu: [hs[0], hs[1], hs[2], hs[3]],
        calls: Latencies::new(lat),
        calls_failed,
        call_cpu: [cc[0], cc[1]],
        spread,
    })
}

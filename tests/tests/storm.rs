//! Reconnect storm: 5,000 simulated devices (the `trellis-device` fleet,
//! one task each on this test's runtime, no thread per device) connect at
//! the same instant to one cluster (keyvault with 2 RSA workers, two
//! gateways, real redis-server) on a 2-core machine, as a fleet does when
//! its region comes back. What must hold:
//!
//! - keyvault's private-key queue never grows past its bound (the
//!   `trellis_keyvault_queue_depth` gauge, sampled every few milliseconds);
//! - devices turned away (gateway token bucket, or keyvault's full queue or
//!   queue deadline) are refused before any RSA work on the cloud side and
//!   come back with the simulator's jittered backoff;
//! - no admitted handshake times out (`trellis_handshakes_total` by reason);
//! - every device is back in session within a bound derived from the RSA
//!   rate measured on this machine before the storm.
//!
//! Device keys (RSA-1024, made with OpenSSL) are cached in the temp dir, so
//! only the first run on a machine pays for making 5,000 of them.
use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use trellis_core::local_redis::{LocalRedis, RedisData};
use trellis_device::identity::DeviceIdentity;
use trellis_device::{DeviceReport, SimConfig, run_fleet};
use trellis_keyvault::backend::{OpensslBackend, PrivateOps, generate_pkcs8_der};
use trellis_proto::v1::RegisterDeviceRequest;
use trellis_tests::{Cluster, test_config};
use trellis_wire::DeviceId;

const DEVICES: usize = 5_000;
const RSA_WORKERS: usize = 2;
const QUEUE_DEPTH: usize = 64;

/// Raises the soft open-files limit to the hard one: 5,000 devices hold
/// 10,000 sockets (both ends are in this process).
fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// `n` RSA-1024 device keys as PKCS#8 DER, from the cache or made now
/// (OpenSSL, on every core) and cached.
fn device_keys(n: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let path: PathBuf = std::env::temp_dir().join("trellis-storm-device-keys-v1.bin");
    if let Ok(bytes) = std::fs::read(&path) {
        let mut keys = Vec::new();
        let mut rest = bytes.as_slice();
        while rest.len() >= 2 && keys.len() < n {
            let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
            if rest.len() < 2 + len {
                break;
            }
            keys.push(rest[2..2 + len].to_vec());
            rest = &rest[2 + len..];
        }
        if keys.len() == n {
            return Ok(keys);
        }
    }
    let started = Instant::now();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let keys: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t..n)
                        .step_by(threads)
                        .map(|_| generate_pkcs8_der(1024).map(|k| k.to_vec()))
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("keygen thread panicked"))?
                    .map_err(anyhow::Error::from)
            })
            .collect::<anyhow::Result<Vec<Vec<Vec<u8>>>>>()
    })?
    .into_iter()
    .flatten()
    .collect();
    eprintln!("made {n} device keys in {:?}", started.elapsed());
    let mut out = Vec::new();
    for k in &keys {
        out.extend_from_slice(&u16::try_from(k.len())?.to_be_bytes());
        out.extend_from_slice(k);
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, out)?;
    std::fs::rename(&tmp, &path)?;
    Ok(keys)
}

/// RSA-2048 handshakes (one decrypt + one sign) per second on one thread
/// here, with the backend keyvault uses.
fn measured_handshakes_per_sec() -> anyhow::Result<f64> {
    let der = generate_pkcs8_der(2048)?;
    let backend = OpensslBackend::from_pkcs8_der(&der)?;
    let public = rsa::PrivateKey::from_pkcs8_der(&der)?.to_public_key();
    let ct = public.encrypt(&mut rand::rng(), rsa::Pkcs1v15Encrypt, &[7u8; 214])?;
    let rounds = 200;
    let started = Instant::now();
    for _ in 0..rounds {
        backend.decrypt(&ct)?;
        backend.sign_raw(&[1u8; 20])?;
    }
    Ok(f64::from(rounds) / started.elapsed().as_secs_f64())
}

/// Every Prometheus sample named `name`, as (labels text, value).
fn samples(name: &str) -> Vec<(String, f64)> {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let families = trellis_core::telemetry::registry().gather();
    if prometheus::TextEncoder::new()
        .encode(&families, &mut buf)
        .is_err()
    {
        return Vec::new();
    }
    String::from_utf8_lossy(&buf)
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn label<'a>(series: &'a str, key: &str) -> &'a str {
    let pat = format!("{key}=\"");
    series
        .find(&pat)
        .map(|i| &series[i + pat.len()..])
        .and_then(|r| r.split('"').next())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_devices_reconnect_at_once() -> anyhow::Result<()> {
    let fds = raise_fd_limit();
    anyhow::ensure!(
        fds >= 2 * DEVICES as u64 + 1_000,
        "open-files limit {fds} is too low for {DEVICES} devices"
    );
    let test_started = Instant::now();
    let keys = tokio::task::spawn_blocking(|| device_keys(DEVICES)).await??;
    let rate = tokio::task::spawn_blocking(measured_handshakes_per_sec).await??;
    eprintln!(
        "device keys ready after {:?}; RSA here: {rate:.0} handshakes/s on one thread",
        test_started.elapsed()
    );

    let redis = LocalRedis::start(RedisData::Ephemeral)?;
    let mut config = test_config(&redis.url());
    config.region = "storm".into();
    config.keyvault.workers = RSA_WORKERS;
    config.keyvault.queue_depth = QUEUE_DEPTH;
    config.keyvault.max_queue_wait_ms = 2_000;
    // Production step timeouts are 30 s; these are tighter than that and
    // still must never fire for an admitted handshake.
    config.gateway.handshake_step_timeout_ms = 10_000;
    config.gateway.handshake_timeout_ms = 30_000;
    config.gateway.handshake_rate = 1_000;
    config.gateway.handshake_burst = 200;
    let cluster = Cluster::start_with(redis, config, 2).await?;

    // Register every device (concurrently; the keys are reused across runs,
    // the ids are fresh).
    let started = Instant::now();
    let identities: Vec<DeviceIdentity> = keys
        .iter()
        .map(|der| {
            Ok(DeviceIdentity {
                device_id: DeviceId(rand::random()),
                private_key: rsa::PrivateKey::from_pkcs8_der(der)?,
                cloud_public_key: cluster.cloud_public_key.clone(),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let kv = cluster.keyvault_client().await?;
    let mut set = tokio::task::JoinSet::new();
    for chunk in identities.chunks(DEVICES.div_ceil(32)) {
        let mut kv = kv.clone();
        let requests: Vec<RegisterDeviceRequest> = chunk
            .iter()
            .map(|i| {
                Ok(RegisterDeviceRequest {
                    device_id: i.device_id.to_string(),
                    product_id: 6,
                    public_key: i.private_key.to_public_key().to_public_key_der()?.to_vec(),
                    organization: String::new(),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        set.spawn(async move {
            for r in requests {
                kv.register_device(r).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    eprintln!("registered {DEVICES} devices in {:?}", started.elapsed());

    // Sample keyvault's queue while the storm runs.
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let queue_max = Arc::new(AtomicI64::new(0));
    let sampler = {
        let stop = stop_sampling.clone();
        let max = queue_max.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (_, v) in samples("trellis_keyvault_queue_depth") {
                    max.fetch_max(v as i64, Ordering::Relaxed);
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n
        })
    };

    // The storm: every device at once, both gateways listed (the fleet
    // fails over between them), the simulator's jittered exponential
    // backoff with a test-sized base and cap.
    let backoff_max = Duration::from_secs(4);
    let sim = SimConfig {
        product_id: 6,
        event_interval: None,
        keepalive: Duration::from_secs(15),
        backoff_base: Duration::from_millis(250),
        backoff_max,
        connect_timeout: Duration::from_secs(10),
        start_spread: Duration::ZERO,
        ..SimConfig::default()
    };
    let endpoints: Vec<String> = cluster
        .gateways
        .iter()
        .map(|g| g.devices.to_string())
        .collect();
    let ids: HashSet<DeviceId> = identities.iter().map(|i| i.device_id).collect();
    // Work the cloud must do: one RSA decrypt + sign per device, at the
    // measured single-thread rate, on at most the 2 cores this machine has
    // (shared with the devices' own RSA and everything else). Allow 10x
    // that, plus two full backoff periods for the last devices turned
    // away, plus 10 s of slack for TCP accept backlogs.
    let ideal = Duration::from_secs_f64(DEVICES as f64 / rate);
    let bound = ideal * 10 + backoff_max * 2 + Duration::from_secs(10);
    eprintln!("storm bound: {bound:?} (ideal {ideal:?} at {rate:.0} handshakes/s)");

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let storm_started = Instant::now();
    // Half the fleet prefers each gateway (as a load balancer or DNS would
    // spread them); each half fails over to the other.
    let mut second_half = identities;
    let first_half: Vec<DeviceIdentity> = second_half.drain(..DEVICES / 2).collect();
    let reversed: Vec<String> = endpoints.iter().rev().cloned().collect();
    let fleets = [
        run_fleet(
            first_half,
            sim.clone(),
            endpoints,
            shutdown.clone(),
            tx.clone(),
        ),
        run_fleet(second_half, sim, reversed, shutdown.clone(), tx),
    ];
    let mut connected: HashSet<DeviceId> = HashSet::new();
    let mut failures: HashMap<String, usize> = HashMap::new();
    let mut disconnects = 0usize;
    let deadline = tokio::time::Instant::now() + bound;
    while connected.len() < DEVICES {
        let report = tokio::select! {
            r = rx.recv() => r,
            _ = tokio::time::sleep_until(deadline) => None,
        };
        match report {
            Some(DeviceReport::Connected { device_id, .. }) => {
                assert!(ids.contains(&device_id));
                connected.insert(device_id);
            }
            Some(DeviceReport::HandshakeFailed { error, .. }) => {
                // Group by the error's kind, not its details.
                let kind: String = error.split(':').next().unwrap_or("").to_string();
                *failures.entry(kind).or_default() += 1;
            }
            Some(DeviceReport::Disconnected { reason, .. }) => {
                disconnects += 1;
                eprintln!("disconnect during the storm: {reason}");
            }
            Some(_) => {}
            None => break,
        }
    }
    let recovered = storm_started.elapsed();
    stop_sampling.store(true, Ordering::Relaxed);
    let samples_taken = sampler.await?;
    let queue_max = queue_max.load(Ordering::Relaxed);

    let handshakes = samples("trellis_handshakes_total");
    let mut by_reason: HashMap<String, f64> = HashMap::new();
    for (series, v) in &handshakes {
        let key = format!("{}/{}", label(series, "outcome"), label(series, "reason"));
        *by_reason.entry(key).or_default() += v;
    }
    // The device reports Connected once it has sent Hello; the gateway
    // counts the session a moment later (after its ownership claim).
    let sessions_open = || -> f64 {
        samples("trellis_gateway_sessions_open")
            .iter()
            .map(|(_, v)| v)
            .sum()
    };
    let settle = Instant::now() + Duration::from_secs(5);
    while sessions_open() < DEVICES as f64 && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sessions = sessions_open();
    eprintln!(
        "storm: {} of {DEVICES} devices in session after {recovered:?} (bound {bound:?}); \
         keyvault queue max {queue_max} over {samples_taken} samples (bound {QUEUE_DEPTH} \
         admissions + {} continuations); device-side failures {failures:?}; gateway \
         handshakes {by_reason:?}; sessions open {sessions}; disconnects {disconnects}; \
         test total {:?}",
        connected.len(),
        2 * QUEUE_DEPTH + RSA_WORKERS,
        test_started.elapsed()
    );

    assert_eq!(
        connected.len(),
        DEVICES,
        "every device back in session within {bound:?}"
    );
    assert!(recovered < bound);
    // The pool's hard bound: queue_depth waiting admissions plus at most
    // 2 * queue_depth + workers waiting signatures (one per handshake slot).
    assert!(
        queue_max <= (3 * QUEUE_DEPTH + RSA_WORKERS) as i64,
        "keyvault queue reached {queue_max}"
    );
    assert!(
        samples_taken > 10,
        "the queue was sampled while the storm ran"
    );
    let count = |k: &str| by_reason.get(k).copied().unwrap_or(0.0);
    assert_eq!(
        count("refused/timeout"),
        0.0,
        "an admitted handshake timed out"
    );
    assert_eq!(
        count("refused/keyvault_unavailable"),
        0.0,
        "keyvault failed to answer an admitted handshake"
    );
    assert!(count("ok/") >= DEVICES as f64);
    assert_eq!(disconnects, 0, "sessions stay up once established");
    assert_eq!(sessions, DEVICES as f64);

    shutdown.cancel();
    for fleet in fleets {
        let _ = tokio::time::timeout(Duration::from_secs(20), fleet).await;
    }
    cluster.stop().await;
    Ok(())
}

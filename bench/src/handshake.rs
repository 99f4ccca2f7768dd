//! `handshake`: complete device handshakes per second through gateway +
//! keyvault over loopback TCP at saturation, against the physical limit:
//! the fastest RSA-2048 backend doing the handshake's two private
//! operations (decrypt + sign) in a tight loop on every core.
//!
//! The devices run in this process and their own RSA work (an RSA-2048
//! public encryption, an RSA-1024 private decryption and an RSA-2048
//! verification per handshake, pure-Rust `rsa`) competes for the same
//! cores, so the run also measures that cost, and the CPU time of every
//! process, so the reader can see what limits the figure.
use crate::cluster::{Cluster, ClusterOptions};
use crate::util::{self, Latencies, micros};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use trellis_device::identity::DeviceIdentity;
use trellis_device::session::{Session, SessionConfig};
use trellis_keyvault::backend::{
    OpensslBackend, PrivateOps, RustCryptoBackend, generate_pkcs8_der,
};
use trellis_wire::{DeviceHandshake, DeviceId, SessionMaterial};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Measured window in seconds (after a warm-up of a quarter of it).
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Devices handshaking at once (keyvault queues 64 by default; more
    /// would be turned away).
    #[arg(long, default_value_t = 48)]
    pub concurrency: usize,
    /// Seconds per backend for the RSA limit.
    #[arg(long, default_value_t = 3.0)]
    pub limit_seconds: f64,
    /// Who does the simulated devices' RSA work: OpenSSL (cheap, so the
    /// servers get the cores) or the device SDK's pure-Rust `rsa`.
    #[arg(long, value_enum, default_value_t = DeviceCrypto::Openssl)]
    pub device_crypto: DeviceCrypto,
    /// Share this many identities among all devices, taken in turn, so an
    /// identity reconnects while its last session may still be closing
    /// (0: each device cycles its own 16, which come back only long after).
    #[arg(long, default_value_t = 0)]
    pub identities: usize,
    /// Count a handshake only once the server's Hello arrives (the session
    /// is established), then close, as a device that reconnects would.
    #[arg(long)]
    pub until_hello: bool,
    /// Keep the gateway's shipped admission limits instead of lifting them.
    #[arg(long)]
    pub admission: bool,
    /// Extra gateway settings, `KEY=VALUE` (`TRELLIS_GATEWAY__HANDSHAKE_RATE=1000`),
    /// e.g. to compare admission policies.
    #[arg(long = "gateway-env", value_parser = parse_env)]
    pub gateway_env: Vec<(String, String)>,
    /// Access control on, as shipped: mutual TLS between every process
    /// (the gateway's OpenSession goes to keyvault over TLS with the
    /// gateway certificate) and tokens checked on every operator RPC.
    #[arg(long)]
    pub auth: bool,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceCrypto {
    Openssl,
    Sdk,
}

impl Args {
    pub fn smoke() -> Self {
        Self {
            seconds: 1.5,
            concurrency: 8,
            limit_seconds: 0.4,
            device_crypto: DeviceCrypto::Openssl,
            identities: 0,
            until_hello: false,
            admission: false,
            gateway_env: Vec::new(),
            auth: false,
        }
    }

    /// The reconnect pattern: 16 devices cycling 40 identities through
    /// handshake, Hello and close against a gateway as shipped.
    pub fn reconnect_smoke() -> Self {
        Self {
            seconds: 2.0,
            concurrency: 16,
            limit_seconds: 0.4,
            device_crypto: DeviceCrypto::Openssl,
            identities: 40,
            until_hello: true,
            admission: true,
            gateway_env: Vec::new(),
            auth: false,
        }
    }
}

/// A failure's kind, from where in the exchange it happened.
fn failure_reason(error: &str) -> &'static str {
    if error.contains("reading the nonce") {
        "turned away at accept (no nonce)"
    } else if error.contains("reading the reply") {
        "refused after the device's handshake (no reply)"
    } else if error.contains("closed before the server's Hello") {
        "closed before the server's Hello"
    } else if error.contains("no server Hello in time") {
        "no server Hello in time"
    } else if error.contains("onnect") {
        "connect failed"
    } else {
        "other"
    }
}

/// An RSA-1024 device key (made with OpenSSL: much faster than `rsa`'s keygen).
pub fn device_key() -> anyhow::Result<rsa::PrivateKey> {
    Ok(device_key_der()?.1)
}

/// The same key as PKCS#8 DER (for OpenSSL) and as an `rsa` key (for the SDK).
pub fn device_key_der() -> anyhow::Result<(Vec<u8>, rsa::PrivateKey)> {
    use rsa::pkcs8::DecodePrivateKey;
    let der = generate_pkcs8_der(1024)?;
    let key = rsa::PrivateKey::from_pkcs8_der(&der)?;
    Ok((der.to_vec(), key))
}

/// This thread's CPU time in seconds.
pub(crate) fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// decrypt + sign pairs per second with `threads` threads sharing one key.
/// Returns (pairs/s by the wall clock, pairs/s if every thread had its own
/// core to itself = threads / CPU seconds per pair). The second is what the
/// cores can do; the first is lower when other work shares the machine.
fn rsa_pairs_per_sec(
    backend: Arc<dyn PrivateOps>,
    threads: usize,
    ciphertext: &[u8],
    window: Duration,
) -> (f64, f64) {
    let hmac = [0xa5u8; 20];
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let b = Arc::clone(&backend);
            let ct = ciphertext.to_vec();
            std::thread::spawn(move || {
                let c0 = thread_cpu();
                let mut n = 0u64;
                while start.elapsed() < window {
                    std::hint::black_box(b.decrypt(&ct).ok());
                    std::hint::black_box(b.sign_raw(&hmac).ok());
                    n += 1;
                }
                (n, thread_cpu() - c0)
            })
        })
        .collect();
    let (mut total, mut cpu) = (0u64, 0.0);
    for h in handles {
        let (n, c) = h.join().unwrap_or((0, 0.0));
        total += n;
        cpu += c;
    }
    let wall = total as f64 / start.elapsed().as_secs_f64();
    let per_core = if cpu > 0.0 {
        threads as f64 * total as f64 / cpu
    } else {
        wall
    };
    (wall, per_core)
}

pub struct Limit {
    pub backend: &'static str,
    /// The limit: pairs/s with every core to itself (from CPU time).
    pub per_sec: f64,
    /// What the wall clock saw in the same run (lower on a busy machine).
    pub wall: f64,
    pub others: Vec<(&'static str, f64)>,
}

/// The limit: every backend on every core, the fastest wins.
pub fn rsa_limit(window: Duration) -> anyhow::Result<Limit> {
    let der = generate_pkcs8_der(2048)?;
    let public = {
        use rsa::pkcs8::DecodePrivateKey;
        rsa::PrivateKey::from_pkcs8_der(&der)?.to_public_key()
    };
    let mut rng = rand::rand_core::UnwrapErr(rand::rngs::SysRng);
    // nonce || id || RSA-1024 DER: the handshake's 214 bytes.
    let ciphertext = public.encrypt(&mut rng, rsa::Pkcs1v15Encrypt, &[0x5au8; 214])?;
    let cores = util::cores();
    let mut results = Vec::new();
    for b in [
        Arc::new(OpensslBackend::from_pkcs8_der(&der)?) as Arc<dyn PrivateOps>,
        Arc::new(RustCryptoBackend::from_pkcs8_der(&der)?),
    ] {
        let name = b.name();
        results.push((name, rsa_pairs_per_sec(b, cores, &ciphertext, window)));
    }
    results.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
    let (backend, (wall, per_sec)) = results[0];
    Ok(Limit {
        backend,
        per_sec: per_sec.max(wall),
        wall,
        others: results[1..].iter().map(|(n, (_, r))| (*n, *r)).collect(),
    })
}

/// The device side of one handshake (encrypt to the cloud key, decrypt the
/// session material, verify the cloud signature), one thread: handshakes/s.
pub fn device_side_rate(
    key: &rsa::PrivateKey,
    key_der: &[u8],
    mode: DeviceCrypto,
    window: Duration,
) -> anyhow::Result<f64> {
    use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
    let cloud = rsa::PrivateKey::from_pkcs8_der(&generate_pkcs8_der(2048)?)?;
    let fast = crate::fastdevice::FastKeys::new(
        key_der,
        cloud.to_public_key().to_public_key_der()?.as_bytes(),
    )?;
    let cloud_public = cloud.to_public_key();
    let mut rng = rand::rand_core::UnwrapErr(rand::rngs::SysRng);
    let material = SessionMaterial::generate(&mut rng);
    let encrypted =
        trellis_wire::encrypt_session_material(&material, &key.to_public_key(), &mut rng)?;
    let hmac = trellis_wire::session_hmac(&material, &encrypted);
    let signature = trellis_wire::sign_session_hmac(&cloud, &hmac)?;
    let reply = trellis_wire::assemble_server_reply(&encrypted, &signature)?;
    let nonce = [7u8; trellis_wire::NONCE_LEN];
    let id = DeviceId(rand::random());
    let mut one = || -> anyhow::Result<()> {
        match mode {
            DeviceCrypto::Sdk => {
                let mut hs = DeviceHandshake::new(id, key.clone(), cloud_public.clone(), true);
                std::hint::black_box(hs.on_nonce(&nonce, &mut rng)?);
                std::hint::black_box(hs.on_reply(&reply)?);
            }
            DeviceCrypto::Openssl => {
                std::hint::black_box(fast.on_nonce(id, &nonce)?);
                std::hint::black_box(fast.on_reply(&reply)?);
            }
        }
        Ok(())
    };
    one()?;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < window {
        one()?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

struct Counters {
    ok: AtomicU64,
    failed: AtomicU64,
}

pub async fn run(args: &Args, trellis_bin: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let cores = util::cores();
    println!("== handshake ({})", util::machine());
    let window = Duration::from_secs_f64(args.limit_seconds);
    let limit = tokio::task::spawn_blocking(move || rsa_limit(window)).await??;
    let (key_der, key) = device_key_der()?;
    let mode = args.device_crypto;
    let device_rate = {
        let (key, key_der) = (key.clone(), key_der.clone());
        tokio::task::spawn_blocking(move || device_side_rate(&key, &key_der, mode, window))
            .await??
    };

    let mut cluster = Cluster::start(&ClusterOptions {
        gateways: 1,
        keyvaults: 1,
        keepalive_secs: 15,
        log: "warn".into(),
        trellis_bin,
        signer: false,
        gateway_env: args.gateway_env.clone(),
        admission: args.admission,
        auth: args.auth,
    })
    .await?;
    let concurrency = args.concurrency.max(1);
    // Each worker cycles through its own ids, so an id comes back only after
    // the gateway has long released its previous session.
    let per_worker = 16;
    let pool = if args.identities > 0 {
        args.identities
    } else {
        concurrency * per_worker
    };
    let ids = cluster.register_many(&key, pool, 32).await?;
    let shared: Arc<Vec<DeviceIdentity>> = Arc::new(
        ids.iter()
            .map(|id| DeviceIdentity {
                device_id: *id,
                private_key: key.clone(),
                cloud_public_key: cluster.cloud_public_key.clone(),
            })
            .collect(),
    );
    let next_shared = Arc::new(AtomicU64::new(0));
    let failures: Arc<std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>> =
        Arc::default();
    let (identities_shared, until_hello) = (args.identities > 0, args.until_hello);
    let gw = cluster.gateways[0].devices;
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
        command_policy: None,
        cloud_key_version: None,
        ..Default::default()
    };
    let sources = util::source_addrs(8);
    let session_config = SessionConfig {
        product_id: 6,
        platform_id: 6,
        firmware_version: 1,
        ..SessionConfig::default()
    };

    let counters = Arc::new(Counters {
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let warmup = Duration::from_secs_f64(args.seconds / 4.0);
    let measured = Duration::from_secs_f64(args.seconds);
    let run_start = Instant::now();
    let end = run_start + warmup + measured;
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let own: Vec<DeviceIdentity> = if identities_shared {
            Vec::new()
        } else {
            shared[w * per_worker..(w + 1) * per_worker].to_vec()
        };
        let (shared, next_shared, failures) =
            (shared.clone(), next_shared.clone(), failures.clone());
        let counters = counters.clone();
        let measuring = measuring.clone();
        let config = session_config.clone();
        let source = sources[w % sources.len()];
        let (fast, hello) = (fast.clone(), hello.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors: Vec<String> = Vec::new();
            let mut i = 0usize;
            while Instant::now() < end {
                let identity = if identities_shared {
                    let n = next_shared.fetch_add(1, Ordering::Relaxed) as usize;
                    &shared[n % shared.len()]
                } else {
                    &own[i % own.len()]
                };
                i += 1;
                let t0 = Instant::now();
                let result = async {
                    let stream = util::connect_from(source, gw).await?;
                    match mode {
                        DeviceCrypto::Sdk => Session::connect(stream, identity, config.clone())
                            .await
                            .map(drop)
                            .map_err(anyhow::Error::from),
                        DeviceCrypto::Openssl => {
                            let (mut stream, mut cipher) = crate::fastdevice::handshake(
                                stream,
                                &fast,
                                identity.device_id,
                                &hello,
                            )
                            .await?;
                            if until_hello {
                                crate::fastdevice::wait_server_hello(
                                    &mut stream,
                                    &mut cipher,
                                    Duration::from_secs(10),
                                )
                                .await?;
                            }
                            Ok(())
                        }
                    }
                }
                .await;
                let took = t0.elapsed();
                let counted = measuring.load(Ordering::Relaxed) && Instant::now() <= end;
                match result {
                    Ok(()) => {
                        if counted {
                            counters.ok.fetch_add(1, Ordering::Relaxed);
                            lat.push(micros(took));
                        }
                    }
                    Err(e) => {
                        if counted {
                            counters.failed.fetch_add(1, Ordering::Relaxed);
                            let reason = failure_reason(&format!("{e:#}"));
                            *failures
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .entry(reason)
                                .or_default() += 1;
                        }
                        if errors.len() < 3 {
                            errors.push(e.to_string());
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            (lat, errors)
        }));
    }
    tokio::time::sleep(warmup).await;
    let pids = [
        cluster.gateways[0].proc.pid(),
        cluster.keyvault.pid(),
        cluster.redis.pid(),
        std::process::id(),
    ];
    let redis_url = cluster.redis.url();
    let redis0 = util::redis_calls(&redis_url).await?;
    let cpu0 = util::sample_cpu(&pids)?;
    let ok0 = counters.ok.load(Ordering::Relaxed);
    measuring.store(true, Ordering::Relaxed);
    let t_measure = Instant::now();
    tokio::time::sleep_until(end.into()).await;
    let elapsed = t_measure.elapsed().as_secs_f64();
    let cpu1 = util::sample_cpu(&pids)?;
    let ok = counters.ok.load(Ordering::Relaxed) - ok0;
    let redis_during = util::redis_calls_delta(&redis0, &util::redis_calls(&redis_url).await?);
    let failed = counters.failed.load(Ordering::Relaxed);
    let mut lat = Vec::new();
    let mut errors = Vec::new();
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        for e in e {
            if errors.len() < 3 && !errors.contains(&e) {
                errors.push(e);
            }
        }
    }
    cluster.check_alive()?;
    let lat = Latencies::new(lat);
    let rate = ok as f64 / elapsed;
    let cpu = cpu1.delta(&cpu0);
    let per_hs = |s: f64| {
        if ok > 0 {
            s / ok as f64 * 1e3
        } else {
            f64::NAN
        }
    };
    let server_cpu = cpu[0] + cpu[1] + cpu[2];
    let rsa_floor_ms = cores as f64 / limit.per_sec * 1e3;

    println!(
        "limit   : {} handshakes/s = {} RSA-2048 decrypt+sign pairs/s, {cores} threads, from CPU time per pair (wall clock saw {}/s) ({}{})",
        util::fmt_rate(limit.per_sec),
        limit.backend,
        util::fmt_rate(limit.wall),
        openssl::version::version(),
        limit
            .others
            .iter()
            .map(|(n, r)| format!("; {n}: {}/s", util::fmt_rate(*r)))
            .collect::<String>()
    );
    println!(
        "pattern : {concurrency} devices, {} identities{}, {}, gateway admission {}, access control {}",
        shared.len(),
        if identities_shared {
            " shared in turn (an identity returns while its last session may be closing)"
        } else {
            " (16 per device)"
        },
        if until_hello {
            "handshake -> Hello -> server Hello -> close"
        } else {
            "handshake -> Hello -> close"
        },
        if args.admission {
            "as shipped"
        } else {
            "lifted"
        },
        if args.auth {
            "on (mutual TLS, tokens)"
        } else {
            "off"
        }
    );
    println!(
        "system  : {} handshakes/s over {elapsed:.1} s at {concurrency} in flight ({ok} ok, {failed} failed); latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        util::fmt_rate(rate),
        lat.pct_ms(50.0),
        lat.pct_ms(99.0),
        lat.max_ms()
    );
    println!(
        "ratio   : {:.1} % of the RSA limit (target >= 85 %)",
        rate / limit.per_sec * 100.0
    );
    println!(
        "cpu/hs  : gateway {:.3} ms, keyvault {:.3} ms, redis {:.3} ms, devices (this process) {:.3} ms; RSA floor {:.3} ms (cores / limit)",
        per_hs(cpu[0]),
        per_hs(cpu[1]),
        per_hs(cpu[2]),
        per_hs(cpu[3]),
        rsa_floor_ms
    );
    println!(
        "device  : {mode:?} device-side handshake alone {} /s on one core = {:.3} ms CPU each; the devices took {:.0} % of the machine's CPU in the window",
        util::fmt_rate(device_rate),
        1e3 / device_rate,
        cpu[3] / (elapsed * cores as f64) * 100.0
    );
    if server_cpu > 0.0 && ok > 0 {
        let server_only = cores as f64 / (server_cpu / ok as f64);
        println!(
            "servers : {:.3} ms CPU per handshake (gateway+keyvault+redis), so with the devices on other machines these {cores} cores would serve ~{} handshakes/s = {:.1} % of the limit",
            per_hs(server_cpu),
            util::fmt_rate(server_only),
            server_only / limit.per_sec * 100.0
        );
    }
    if ok > 0 {
        // The best these cores could do with these devices on them: the
        // servers doing nothing but the two RSA operations.
        let devices_ms = per_hs(cpu[3]);
        let ceiling = rsa_floor_ms / (rsa_floor_ms + devices_ms);
        println!(
            "ceiling : {:.1} % of the limit is the most this run could show: RSA floor {:.3} ms + the devices' own {:.3} ms per handshake on the same {cores} cores, with gateway, keyvault and Redis costing nothing beyond the RSA; the system reached {:.0} % of that ceiling",
            ceiling * 100.0,
            rsa_floor_ms,
            devices_ms,
            rate / limit.per_sec / ceiling * 100.0
        );
        // Every session also ends here (the devices hang up after Hello),
        // so this is the Redis work of one whole short session.
        let total: u64 = redis_during.iter().map(|(_, k)| k).sum();
        let shown: Vec<String> = redis_during
            .iter()
            .take(12)
            .map(|(c, k)| format!("{c} {:.2}", *k as f64 / ok as f64))
            .collect();
        println!(
            "redis   : {:.1} commands per handshake in the window (those run inside scripts count too): {}",
            total as f64 / ok as f64,
            shown.join(", ")
        );
    }
    let failures = failures.lock().unwrap_or_else(|p| p.into_inner()).clone();
    println!(
        "failures: {}",
        if failures.is_empty() {
            "none".to_string()
        } else {
            failures
                .iter()
                .map(|(reason, n)| format!("{n} {reason}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    if !errors.is_empty() {
        println!("errors  : {}", errors.join(" | "));
    }
    println!(
        "RESULT handshake devices={mode:?} identities={} rate={rate:.0}/s failed={failed} limit={:.0}/s ratio={:.3} p50_ms={:.2} p99_ms={:.2}",
        shared.len(),
        limit.per_sec,
        rate / limit.per_sec,
        lat.pct_ms(50.0),
        lat.pct_ms(99.0)
    );
    if ok == 0 {
        anyhow::bail!("no handshake completed");
    }
    Ok(())
}

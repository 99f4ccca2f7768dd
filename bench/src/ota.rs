//! `ota`: a signed firmware image delivered to many devices at once over
//! their real encrypted sessions, against the physical limit: raw
//! AES-128-CBC encryption on one core, measured in the same run.
//!
//! The path is the production one end to end: the image is uploaded to
//! `trellis signer`, which creates the release and has keyvault sign it
//! with the cloud release key; every device is provisioned with a trust
//! policy naming that key (threshold 1); the bench calls the gateway's
//! `DeliverUpdate` for every device at once; the gateway loads the release
//! from the signer's Redis records and sends it over each device's session
//! (`OtaSender`: UpdateBegin + signed manifest, 512-byte chunks, window of
//! 8, UpdateDone); each device (`OtaReceiver` in the SDK session) verifies
//! the manifest signature before the first chunk, then the image's size and
//! SHA-256, and ends its session with `UpdateApplied`. The clock runs from
//! the first `DeliverUpdate` to the last device reporting the update applied.
//!
//! The devices run in this process and decrypt every byte the gateway
//! encrypts, on the same cores: the run reports each process's CPU time so
//! the reader can see who spent the cores, the gateway's bytes per second
//! of its own CPU (`per core`, independent of the devices' share), the
//! Redis commands per chunk, and the `framing` rate: one core doing only
//! the gateway's per-chunk computation (copy, CRC, CoAP, AES frame) with no
//! I/O, which bounds what any I/O design could reach with these chunks.
use crate::cluster::{Cluster, ClusterOptions};
use crate::util::{self, Latencies, micros};
use anyhow::{Context, bail};
use sha2::Digest;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use trellis_device::DemoApp;
use trellis_device::identity::DeviceIdentity;
use trellis_device::session::{Session, SessionConfig, SessionEnd};
use trellis_firmware::{TrustPolicy, TrustedKey, public_key_from_pem};
use trellis_proto::v1::key_vault_client::KeyVaultClient;
use trellis_proto::v1::signer_client::SignerClient;
use trellis_proto::v1::upload_image_request::Part;
use trellis_proto::v1::*;

const TARGET_RATIO: f64 = 0.5;
const PRODUCT: u32 = 6;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Devices updated at once.
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// Image size in KiB.
    #[arg(long, default_value_t = 1024)]
    pub image_kib: usize,
    /// Handshakes in flight while the devices connect.
    #[arg(long, default_value_t = 48)]
    pub concurrency: usize,
    /// Give up on the deliveries after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
    /// Seconds per AES implementation for the limit.
    #[arg(long, default_value_t = 2.0)]
    pub aes_seconds: f64,
    /// The gateway's `gateway.ota_chunk_size` (bytes per chunk).
    #[arg(long, default_value_t = 512)]
    pub chunk_size: u16,
}

impl Args {
    pub fn smoke() -> Self {
        Self {
            devices: 20,
            image_kib: 64,
            concurrency: 16,
            timeout: 60.0,
            aes_seconds: 0.3,
            chunk_size: 512,
        }
    }
}

/// Bytes per second of AES-128-CBC on one core (from this thread's CPU
/// time, so a busy machine does not lower it): the `aes`+`cbc` crates the
/// wire uses (encrypt, decrypt) and OpenSSL (encrypt).
pub struct AesLimit {
    pub rustcrypto_enc: f64,
    pub rustcrypto_dec: f64,
    pub openssl_enc: f64,
}

impl AesLimit {
    /// The fastest encryption on one core: the gateway encrypts every byte.
    pub fn limit(&self) -> (&'static str, f64) {
        if self.openssl_enc > self.rustcrypto_enc {
            ("OpenSSL", self.openssl_enc)
        } else {
            ("aes+cbc crates", self.rustcrypto_enc)
        }
    }
}

fn per_core_rate(window: Duration, mut op: impl FnMut() -> usize) -> f64 {
    let c0 = crate::handshake::thread_cpu();
    let start = Instant::now();
    let mut bytes = 0usize;
    while start.elapsed() < window {
        bytes += op();
    }
    let cpu = crate::handshake::thread_cpu() - c0;
    if cpu > 0.0 {
        bytes as f64 / cpu
    } else {
        bytes as f64 / start.elapsed().as_secs_f64()
    }
}

pub fn aes_limit(window: Duration) -> anyhow::Result<AesLimit> {
    use cbc::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit, block_padding::Pkcs7};
    type Enc = cbc::Encryptor<aes::Aes128>;
    type Dec = cbc::Decryptor<aes::Aes128>;
    const LEN: usize = 16 * 1024;
    let key: [u8; 16] = rand::random();
    let iv: [u8; 16] = rand::random();
    let msg = vec![0x5au8; LEN - 16];
    let mut out = vec![0u8; LEN];
    let rustcrypto_enc = per_core_rate(window, || {
        let n = Enc::new(&key.into(), &iv.into())
            .encrypt_padded_b2b::<Pkcs7>(&msg, &mut out)
            .map(<[u8]>::len)
            .unwrap_or(0);
        std::hint::black_box(&out);
        n
    });
    let ct = Enc::new(&key.into(), &iv.into()).encrypt_padded_vec::<Pkcs7>(&msg);
    let rustcrypto_dec = per_core_rate(window, || {
        let n = Dec::new(&key.into(), &iv.into())
            .decrypt_padded_b2b::<Pkcs7>(&ct, &mut out)
            .map(<[u8]>::len)
            .unwrap_or(0);
        std::hint::black_box(&out);
        n
    });
    let mut crypter = openssl::symm::Crypter::new(
        openssl::symm::Cipher::aes_128_cbc(),
        openssl::symm::Mode::Encrypt,
        &key,
        Some(&iv),
    )?;
    crypter.pad(false);
    let plain = vec![0x5au8; LEN];
    let mut sink = vec![0u8; LEN + 16];
    let openssl_enc = per_core_rate(window, || {
        let n = crypter.update(&plain, &mut sink).unwrap_or(0);
        std::hint::black_box(&sink);
        n
    });
    Ok(AesLimit {
        rustcrypto_enc,
        rustcrypto_dec,
        openssl_enc,
    })
}

/// Image bytes per second of CPU that one core spends turning the image
/// into encrypted chunk frames the way the gateway does (CRC-32 and CoAP
/// head written straight into the frame buffer, the chunk copied there
/// from the image, AES-128-CBC in place), with no socket, no Redis, no
/// runtime: what the framing alone allows, beside the AES limit, so the
/// rest of the gap is I/O and bookkeeping.
pub fn framing_rate(window: Duration, image: &[u8], chunk_size: usize) -> f64 {
    let key: [u8; 16] = rand::random();
    let iv: [u8; 16] = rand::random();
    let mut encoder = trellis_wire::frame::FrameEncoder::new(key, iv);
    let mut frames = Vec::with_capacity(chunk_size + 64);
    let mut index = 0usize;
    let chunks = image.len().div_ceil(chunk_size).max(1);
    per_core_rate(window, || {
        let start = index * chunk_size;
        let end = (start + chunk_size).min(image.len());
        frames.clear();
        let framed = encoder.encode_with(&mut frames, |buf| {
            trellis_wire::message::encode_chunk_into(
                buf,
                index as u16,
                1,
                Some(index as u16),
                &image[start..end],
                chunk_size,
            );
            true
        });
        std::hint::black_box((&framed, &frames));
        index = (index + 1) % chunks;
        chunk_size
    })
}

/// A deterministic, incompressible-looking image of `len` bytes.
fn image(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut block = sha2::Sha256::digest(b"trellis-bench ota image").to_vec();
    while out.len() < len {
        out.extend_from_slice(&block);
        block = sha2::Sha256::digest(&block).to_vec();
    }
    out.truncate(len);
    out
}

/// The release: policy (cloud release key, threshold 1) on the signer,
/// image uploaded, release created and signed in keyvault, policy met.
/// Returns (release id, the devices' trust policy).
async fn signed_release(
    kv: &mut KeyVaultClient<trellis_core::telemetry::TracedChannel>,
    signer: &mut SignerClient<tonic::transport::Channel>,
    image: &[u8],
) -> anyhow::Result<(String, TrustPolicy)> {
    let cloud = kv
        .get_signing_key(GetSigningKeyRequest {
            purpose: "release".into(),
            version: 0,
        })
        .await
        .context("keyvault's release key")?
        .into_inner();
    let policy = TrustPolicy::new(
        vec![TrustedKey::new(
            "cloud-release",
            public_key_from_pem(&cloud.public_key_pem)?,
        )?],
        1,
    )?;
    signer
        .set_policy(SetPolicyRequest {
            policy: Some(SigningPolicy {
                product_id: PRODUCT,
                keys: vec![PolicyKey {
                    name: "cloud-release".into(),
                    public_key_pem: cloud.public_key_pem.clone(),
                    ..Default::default()
                }],
                threshold: 1,
                cloud_only: false,
                version: 0,
                policy_json: String::new(),
            }),
            // The benchmark signs with the cloud release key only.
            allow_cloud_only: true,
        })
        .await
        .context("signer SetPolicy")?;
    let mut parts = vec![UploadImageRequest {
        part: Some(Part::Header(UploadImageHeader {
            product_id: PRODUCT,
            size: image.len() as u64,
            organization: String::new(),
        })),
    }];
    parts.extend(image.chunks(64 * 1024).map(|c| UploadImageRequest {
        part: Some(Part::Data(c.to_vec())),
    }));
    let uploaded = signer
        .upload_image(tokio_stream::iter(parts))
        .await
        .context("signer UploadImage")?
        .into_inner();
    let release = signer
        .create_release(CreateReleaseRequest {
            product_id: PRODUCT,
            version: 2,
            image_sha256: uploaded.sha256.clone(),
        })
        .await
        .context("signer CreateRelease")?
        .into_inner();
    signer
        .sign_release(SignReleaseRequest {
            release_id: release.release_id.clone(),
        })
        .await
        .context("signer SignRelease")?;
    let verdict = signer
        .verify_release(VerifyReleaseRequest {
            release_id: release.release_id.clone(),
        })
        .await
        .context("signer VerifyRelease")?
        .into_inner();
    if !verdict.satisfied {
        bail!("the release does not meet its policy: {}", verdict.message);
    }
    Ok((release.release_id, policy))
}

/// What each device's session ended with.
enum DeviceResult {
    Applied {
        at: Instant,
        bytes: usize,
        sha_ok: bool,
    },
    Other(String),
}

pub async fn run(args: &Args, trellis_bin: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    println!("== ota ({})", util::machine());
    let n = args.devices.max(1);
    let image_len = args.image_kib.max(1) * 1024;
    let window = Duration::from_secs_f64(args.aes_seconds);
    let aes = tokio::task::spawn_blocking(move || aes_limit(window)).await??;
    let (limit_name, limit) = aes.limit();
    util::raise_nofile(n as u64 * 2 + 1_000)?;

    let mut cluster = Cluster::start(&ClusterOptions {
        gateways: 1,
        keyvaults: 1,
        keepalive_secs: 15,
        log: "warn".into(),
        trellis_bin,
        signer: true,
        gateway_env: vec![(
            "TRELLIS_GATEWAY__OTA_CHUNK_SIZE".into(),
            args.chunk_size.to_string(),
        )],
        admission: false,
        auth: false,
    })
    .await?;
    let signer_addr = cluster
        .signer
        .as_ref()
        .map(|(_, a)| *a)
        .context("no signer")?;
    let mut signer = SignerClient::connect(format!("http://{signer_addr}")).await?;
    let mut kv = cluster.keyvault_client().await?;
    let image = image(image_len);
    let expected_sha: [u8; 32] = sha2::Sha256::digest(&image).into();
    let chunk_size = usize::from(args.chunk_size.max(1));
    // The gateway's chunk size, and 2,048 bytes (or 4x, if that is what
    // the gateway uses) to show what the per-chunk work costs.
    let big_chunk = if chunk_size >= 2048 {
        chunk_size * 4
    } else {
        2048
    };
    let (framing, framing_big) = {
        let image = image.clone();
        tokio::task::spawn_blocking(move || {
            (
                framing_rate(window, &image, chunk_size),
                framing_rate(window, &image, big_chunk),
            )
        })
        .await?
    };
    let (release_id, policy) = signed_release(&mut kv, &mut signer, &image).await?;
    println!(
        "release {release_id}: {image_len} bytes, signed by keyvault's cloud release key; devices trust that key (threshold 1)"
    );

    let key = crate::handshake::device_key()?;
    let ids = cluster.register_many(&key, n, 32).await?;
    let sources = util::source_addrs(util::addrs_for(n));
    let config = SessionConfig {
        product_id: PRODUCT as u16,
        platform_id: 6,
        firmware_version: 1,
        trust_policy: Some(policy),
        max_image_size: (image_len as u64).max(16 * 1024 * 1024),
        ..SessionConfig::default()
    };
    let gw = cluster.gateways[0].devices;
    let app = Arc::new(DemoApp::default());
    let stop = CancellationToken::new();
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let connected = Arc::new(AtomicUsize::new(0));
    let not_connected = Arc::new(AtomicUsize::new(0));
    let mut devices = tokio::task::JoinSet::new();
    let t_connect = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        let identity = DeviceIdentity {
            device_id: *id,
            private_key: key.clone(),
            cloud_public_key: cluster.cloud_public_key.clone(),
        };
        let source = sources[i % sources.len()];
        let (gate, app, stop, config, connected, not_connected) = (
            gate.clone(),
            app.clone(),
            stop.clone(),
            config.clone(),
            connected.clone(),
            not_connected.clone(),
        );
        devices.spawn(async move {
            let session = {
                let Ok(_permit) = gate.acquire().await else {
                    return DeviceResult::Other("stopped".into());
                };
                let r = async {
                    let s = util::connect_from(source, gw).await?;
                    Ok::<_, anyhow::Error>(Session::connect(s, &identity, config).await?)
                };
                match r.await {
                    Ok(s) => s,
                    Err(e) => {
                        not_connected.fetch_add(1, Ordering::Relaxed);
                        return DeviceResult::Other(format!("connect: {e:#}"));
                    }
                }
            };
            connected.fetch_add(1, Ordering::Relaxed);
            match session.run(&*app, stop, |_| {}).await {
                Ok(SessionEnd::UpdateApplied(u)) => DeviceResult::Applied {
                    at: Instant::now(),
                    bytes: u.image.len(),
                    sha_ok: u.sha256() == expected_sha,
                },
                Ok(SessionEnd::Shutdown) => DeviceResult::Other("no update before the end".into()),
                Err(e) => DeviceResult::Other(format!("session: {e}")),
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let up = connected.load(Ordering::Relaxed);
        if up >= n {
            break;
        }
        // A device task that ended before the transfer failed to connect.
        if not_connected.load(Ordering::Relaxed) > 0 || Instant::now() > deadline {
            stop.cancel();
            let why = match devices.join_next().await {
                Some(Ok(DeviceResult::Other(e))) => e,
                _ => "timed out".into(),
            };
            bail!("only {up} of {n} devices connected ({why})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        cluster.check_alive()?;
    }
    println!(
        "{n} devices in session after {:.1} s",
        t_connect.elapsed().as_secs_f64()
    );
    // Let every Hello, Describe and ownership claim land before routing.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Several HTTP/2 connections so that no stream limit holds calls back.
    let mut clients = Vec::new();
    for _ in 0..n.div_ceil(100) {
        clients.push(cluster.gateway_client(0).await?);
    }
    let gw_pid = cluster.gateways[0].proc.pid();
    let signer_pid = cluster.signer.as_ref().map(|(p, _)| p.pid()).unwrap_or(0);
    let pids = [
        gw_pid,
        cluster.redis.pid(),
        cluster.keyvault.pid(),
        signer_pid,
        std::process::id(),
    ];
    let redis_url = cluster.redis.url();
    let redis0 = util::redis_calls(&redis_url).await?;
    let cpu0 = util::sample_cpu(&pids)?;
    let start = Instant::now();
    let timeout_ms = (args.timeout * 1000.0) as u32;
    let mut calls = tokio::task::JoinSet::new();
    for (i, id) in ids.iter().enumerate() {
        let mut client = clients[i % clients.len()].clone();
        let req = DeliverUpdateRequest {
            device_id: id.to_string(),
            release_id: release_id.clone(),
            rollout_id: String::new(),
            timeout_ms,
        };
        calls.spawn(async move { client.deliver_update(req).await });
    }
    let mut applied = Vec::new();
    let mut bytes_delivered = 0u64;
    let mut bad_sha = 0usize;
    let mut other: Vec<String> = Vec::new();
    let mut others = 0usize;
    let give_up = start + Duration::from_secs_f64(args.timeout);
    while !devices.is_empty() {
        let r = tokio::time::timeout_at(give_up.into(), devices.join_next()).await;
        match r {
            Err(_) => {
                stop.cancel();
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                others += 1;
                other.push(format!("device task: {e}"));
            }
            Ok(Some(Ok(DeviceResult::Applied { at, bytes, sha_ok }))) => {
                applied.push(micros(at - start));
                bytes_delivered += bytes as u64;
                if !sha_ok {
                    bad_sha += 1;
                }
            }
            Ok(Some(Ok(DeviceResult::Other(e)))) => {
                others += 1;
                if other.len() < 3 {
                    other.push(e);
                }
            }
        }
    }
    let last = applied.iter().copied().max().unwrap_or(0);
    let cpu = util::sample_cpu(&pids)?.delta(&cpu0);
    let redis_during = util::redis_calls_delta(&redis0, &util::redis_calls(&redis_url).await?);
    let gw_hwm = util::status_kib(gw_pid, "VmHWM").unwrap_or(0);
    // Each process's CPU since it started (signing, handshakes, transfer).
    let total_cpu = util::sample_cpu(&pids)?.0;
    stop.cancel();
    // The gateway's answers to DeliverUpdate (each returns once UpdateDone
    // was acknowledged).
    let (mut sent, mut refused, mut failed) = (0usize, 0usize, 0usize);
    let mut call_errors: Vec<String> = Vec::new();
    while let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(10), calls.join_next()).await {
        match r {
            Ok(Ok(resp)) => match resp.into_inner().outcome() {
                DeliveryOutcome::Sent => sent += 1,
                DeliveryOutcome::Rejected => refused += 1,
                _ => failed += 1,
            },
            Ok(Err(status)) => {
                failed += 1;
                if call_errors.len() < 3 {
                    call_errors.push(status.message().to_string());
                }
            }
            Err(e) => {
                failed += 1;
                call_errors.push(e.to_string());
            }
        }
    }
    calls.abort_all();
    cluster.check_alive()?;

    let elapsed = last as f64 / 1e6;
    let rate = if elapsed > 0.0 {
        bytes_delivered as f64 / elapsed
    } else {
        0.0
    };
    let lat = Latencies::new(applied.clone());
    let mib = |b: f64| b / (1024.0 * 1024.0);
    let per_mib = |s: f64| {
        if bytes_delivered > 0 {
            s / mib(bytes_delivered as f64) * 1e3
        } else {
            f64::NAN
        }
    };
    println!(
        "limit   : {} MiB/s = AES-128-CBC encryption on one core, {limit_name} (aes+cbc crates: encrypt {} MiB/s, decrypt {} MiB/s; OpenSSL encrypt {} MiB/s), from CPU time",
        util::fmt_rate(mib(limit)),
        util::fmt_rate(mib(aes.rustcrypto_enc)),
        util::fmt_rate(mib(aes.rustcrypto_dec)),
        util::fmt_rate(mib(aes.openssl_enc)),
    );
    println!(
        "framing : {} MiB/s = {:.1} % of the limit: one core turning the image into {chunk_size}-byte chunk frames as the gateway does (copy, CRC-32, CoAP, AES-CBC frame), no I/O; {} MiB/s = {:.1} % with {big_chunk}-byte chunks",
        util::fmt_rate(mib(framing)),
        framing / limit * 100.0,
        util::fmt_rate(mib(framing_big)),
        framing_big / limit * 100.0,
    );
    println!(
        "system  : {} MiB/s delivered = {} devices x {} KiB in {elapsed:.2} s (first DeliverUpdate to last device applied); per device applied after p50 {:.2} s, p99 {:.2} s; {others} not applied, {bad_sha} with a wrong SHA-256; DeliverUpdate answers: {sent} sent, {refused} refused, {failed} failed",
        util::fmt_rate(mib(rate)),
        applied.len(),
        image_len / 1024,
        lat.pct_ms(50.0) / 1e3,
        lat.pct_ms(99.0) / 1e3,
    );
    println!(
        "ratio   : {:.1} % of one core's AES-128-CBC (target >= {:.0} %)",
        rate / limit * 100.0,
        TARGET_RATIO * 100.0
    );
    println!(
        "cpu/MiB : gateway {:.2} ms, redis {:.2} ms, keyvault {:.2} ms, signer {:.2} ms, devices (this process) {:.2} ms; AES floor {:.2} ms (one core encrypting); gateway VmHWM {:.0} MiB",
        per_mib(cpu[0]),
        per_mib(cpu[1]),
        per_mib(cpu[2]),
        per_mib(cpu[3]),
        per_mib(cpu[4]),
        1e3 / mib(limit),
        gw_hwm as f64 / 1024.0,
    );
    if !applied.is_empty() {
        // The best these cores could do with these devices on them: the
        // gateway costing only its AES, Redis nothing.
        let floor_ms = 1e3 / mib(limit);
        let devices_ms = per_mib(cpu[4]);
        let ceiling_mib_s = util::cores() as f64 * 1e3 / (floor_ms + devices_ms);
        let ceiling = ceiling_mib_s / mib(limit);
        println!(
            "ceiling : {:.1} % of the limit is the most this run could show: the devices' own {devices_ms:.2} ms CPU per MiB (decrypt, CRC, store, SHA-256, acks) plus the AES floor {floor_ms:.2} ms on the same {} cores; the system reached {:.0} % of that ceiling",
            ceiling * 100.0,
            util::cores(),
            rate / limit / ceiling * 100.0
        );
    }
    println!(
        "cpu     : gateway {:.2} s, redis {:.2} s, keyvault {:.2} s, signer {:.2} s, this process (devices + gRPC callers) {:.2} s over the {elapsed:.2} s transfer; whole run: gateway {:.2} s, keyvault {:.2} s, signer {:.2} s, redis {:.2} s",
        cpu[0],
        cpu[1],
        cpu[2],
        cpu[3],
        cpu[4],
        total_cpu[0],
        total_cpu[2],
        total_cpu[3],
        total_cpu[1],
    );
    if elapsed > 0.0 {
        println!(
            "cores   : gateway {:.2}, devices {:.2}, redis {:.2} of {} cores busy on average over the transfer",
            cpu[0] / elapsed,
            cpu[4] / elapsed,
            cpu[1] / elapsed,
            util::cores()
        );
    }
    if cpu[0] > 0.0 {
        // The gateway's own efficiency, whatever share of the cores it got:
        // bytes per second of its CPU time, against the same one-core limit.
        let per_core = bytes_delivered as f64 / cpu[0];
        println!(
            "per core: the gateway sent {} MiB per CPU-second = {:.1} % of the AES limit; gateway+redis {} MiB per CPU-second",
            util::fmt_rate(mib(per_core)),
            per_core / limit * 100.0,
            util::fmt_rate(mib(bytes_delivered as f64 / (cpu[0] + cpu[1]))),
        );
    }
    let chunks = applied.len() as u64 * image_len.div_ceil(chunk_size) as u64;
    if chunks > 0 {
        let shown: Vec<String> = redis_during
            .iter()
            .take(4)
            .map(|(c, k)| format!("{c} {k} ({:.2}/chunk)", *k as f64 / chunks as f64))
            .collect();
        let total: u64 = redis_during.iter().map(|(_, k)| k).sum();
        println!(
            "redis   : {total} commands during the transfer (those run inside scripts count too) for {chunks} chunks of {chunk_size} B = {:.2} per chunk: {}",
            total as f64 / chunks as f64,
            shown.join(", ")
        );
    }
    if !other.is_empty() || !call_errors.is_empty() {
        println!("errors  : {}", [other, call_errors].concat().join(" | "));
    }
    println!(
        "RESULT ota devices={} failed={} image_bytes={image_len} rate_bytes_per_s={rate:.0} limit_bytes_per_s={limit:.0} ratio={:.3} target={TARGET_RATIO} gateway_per_core_ratio={:.3} framing_ratio={:.3}",
        applied.len(),
        n - applied.len(),
        rate / limit,
        if cpu[0] > 0.0 {
            bytes_delivered as f64 / cpu[0] / limit
        } else {
            0.0
        },
        framing / limit
    );
    if applied.len() < n || bad_sha > 0 {
        bail!(
            "{} of {n} devices applied the update ({bad_sha} with a wrong SHA-256)",
            applied.len()
        );
    }
    Ok(())
}

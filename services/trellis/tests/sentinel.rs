//! The durable Redis behind Redis Sentinel, as real processes: a primary
//! (P), a replica (R, `replicaof P`) and three sentinels (quorum 2), a
//! separate region-local Redis for sessions, one `trellis keyvault` that
//! finds the durable primary through the sentinels (`redis.sentinels`, with
//! R as its local copy in `redis.durable_url`) and one `trellis gateway`.
//!
//! A device is registered and completes a real handshake; then P is
//! SIGKILLed, as when its whole region is lost. Without any operator action
//! (nothing is restarted or reconfigured) Sentinel must promote R, keyvault
//! must follow it by itself, handshakes must succeed again within
//! `RECOVERY_BOUND`, their audit records must land on R, and a new device
//! (a durable write) must register and handshake after the failover.
mod common;

use anyhow::{Context, bail};
use common::{Proc, addr, wait_ok};
use rsa::pkcs8::{DecodePublicKey, EncodePublicKey};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use trellis_core::local_redis::{LocalRedis, RedisData, free_port};
use trellis_core::redis_conn::{self, keys};
use trellis_device::identity::DeviceIdentity;
use trellis_proto::v1::key_vault_client::KeyVaultClient;
use trellis_proto::v1::*;
use trellis_tests::{RawDevice, connect_keyvault};
use trellis_wire::DeviceId;

/// The Sentinel master name (also `redis.sentinel_master`'s default).
const MASTER: &str = "mymaster";
/// From SIGKILL of the primary to the first successful handshake, and to a
/// successful registration of a new device. Sentinel needs about
/// `down-after-milliseconds` (1 s) plus an election and the promotion
/// (1-3 s on loopback); the rest is margin for a loaded 2-core machine.
const RECOVERY_BOUND: Duration = Duration::from_secs(30);
/// One handshake attempt: above `redis.failover_wait_ms` (below), so an
/// attempt that started while no primary was known can still finish.
const ATTEMPT: Duration = Duration::from_secs(12);

/// A `redis-server --sentinel` child, killed (by its own pid) on drop.
struct Sentinel {
    port: u16,
    log: PathBuf,
    child: Child,
}

impl Sentinel {
    /// Monitors the primary at `primary_port` with quorum 2: it is declared
    /// down after 1 s without an answer, and a failover that stalls is
    /// retried soon (failover-timeout 3 s).
    fn start(dir: &Path, n: usize, primary_port: u16) -> anyhow::Result<Self> {
        let port = free_port()?;
        let conf = dir.join(format!("sentinel-{n}.conf"));
        let log = dir.join(format!("sentinel-{n}.log"));
        // Sentinel rewrites its own config file (it records the other
        // sentinels and the replicas there), so each has its own.
        std::fs::write(
            &conf,
            format!(
                "port {port}\n\
                 bind 127.0.0.1\n\
                 daemonize no\n\
                 dir {dir}\n\
                 logfile {log}\n\
                 sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2\n\
                 sentinel down-after-milliseconds {MASTER} 1000\n\
                 sentinel failover-timeout {MASTER} 3000\n\
                 sentinel parallel-syncs {MASTER} 1\n",
                dir = dir.display(),
                log = log.display(),
            ),
        )?;
        // `redis-server --sentinel` is the same program as `redis-sentinel`
        // (the Debian redis-server package has no separate binary).
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server --sentinel (run scripts/setup.sh)")?;
        Ok(Self { port, log, child })
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    async fn conn(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)));
        Ok(redis::Client::open(format!("redis://{}/", self.addr()))?
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    /// The primary this sentinel names now (`host:port`).
    async fn primary(&self) -> anyhow::Result<String> {
        let (host, port): (String, String) = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(MASTER)
            .query_async(&mut self.conn().await?)
            .await?;
        Ok(format!("{host}:{port}"))
    }

    /// `SENTINEL master <name>` as (field, value) pairs.
    async fn master_state(&self) -> anyhow::Result<Vec<(String, String)>> {
        let flat: Vec<String> = redis::cmd("SENTINEL")
            .arg("master")
            .arg(MASTER)
            .query_async(&mut self.conn().await?)
            .await?;
        Ok(flat
            .chunks(2)
            .filter_map(|kv| Some((kv.first()?.clone(), kv.get(1)?.clone())))
            .collect())
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn info_replication(url: &str) -> anyhow::Result<String> {
    let mut c = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    Ok(redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut c)
        .await?)
}

/// Polls `check` every 100 ms until it returns Some, or fails after `within`.
async fn until<T, F, Fut>(within: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last = String::new();
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = e.to_string(),
        }
        if start.elapsed() > within {
            bail!("{what}: not within {within:?} ({last})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn register(
    kv: &mut KeyVaultClient<tonic::transport::Channel>,
    identity: &DeviceIdentity,
) -> anyhow::Result<()> {
    let der = identity.private_key.to_public_key().to_public_key_der()?;
    kv.register_device(RegisterDeviceRequest {
        device_id: identity.device_id.to_string(),
        product_id: 1,
        public_key: der.as_bytes().to_vec(),
        organization: String::new(),
    })
    .await?;
    Ok(())
}

/// One handshake through the gateway, bounded by `ATTEMPT`.
async fn handshake(gateway: SocketAddr, identity: &DeviceIdentity) -> anyhow::Result<()> {
    let dev = tokio::time::timeout(ATTEMPT, RawDevice::connect(gateway, identity))
        .await
        .context("handshake timed out")??;
    drop(dev);
    Ok(())
}

/// Successful `open_session` audit records for `device` in the Redis at
/// `url`. Retried for a few seconds: right after a promotion Sentinel
/// kills the new primary's client connections (`CLIENT KILL TYPE normal`),
/// and a fresh connection can be caught by that.
async fn granted_sessions(url: &str, device: &DeviceId) -> anyhow::Result<usize> {
    until(Duration::from_secs(5), "reading the audit log", || async {
        let mut r = redis_conn::connect(url).await?;
        let records = trellis_core::audit::recent(&mut r, 1000, Some(&device.to_string())).await?;
        Ok(Some(
            records
                .iter()
                .filter(|a| a.action == "open_session" && a.outcome == "ok")
                .count(),
        ))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_promotes_the_replica_and_keyvault_follows_without_a_restart() -> anyhow::Result<()>
{
    let test_start = Instant::now();
    let dir = tempfile::tempdir()?;
    let regional = LocalRedis::start(RedisData::Ephemeral)?;
    let mut primary = LocalRedis::start(RedisData::Ephemeral)?;
    let replica = LocalRedis::start(RedisData::Ephemeral)?;
    let primary_addr = format!("127.0.0.1:{}", primary.port());
    let replica_addr = format!("127.0.0.1:{}", replica.port());
    {
        let mut c = redis::Client::open(replica.url())?
            .get_multiplexed_async_connection()
            .await?;
        let _: () = redis::cmd("REPLICAOF")
            .arg("127.0.0.1")
            .arg(primary.port())
            .query_async(&mut c)
            .await?;
    }
    until(Duration::from_secs(10), "replica in sync", || async {
        let info = info_replication(&replica.url()).await?;
        Ok(info
            .lines()
            .any(|l| l.trim() == "master_link_status:up")
            .then_some(()))
    })
    .await?;

    let sentinels = (1..=3)
        .map(|n| Sentinel::start(dir.path(), n, primary.port()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Each sentinel must know the replica and the two other sentinels
    // (they find each other through hello messages on the primary, every
    // 2 s) before a failover can reach quorum and elect a leader.
    for s in &sentinels {
        until(
            Duration::from_secs(20),
            "sentinel sees the replica and the other sentinels",
            || async {
                let state = s.master_state().await?;
                let get = |k: &str| {
                    state
                        .iter()
                        .find(|(f, _)| f == k)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                Ok((get("num-slaves") == "1" && get("num-other-sentinels") == "2").then_some(()))
            },
        )
        .await
        .with_context(|| s.log_tail())?;
    }
    let sentinel_list = sentinels
        .iter()
        .map(Sentinel::addr)
        .collect::<Vec<_>>()
        .join(",");

    let master_key_file = dir.path().join("master.key");
    std::fs::write(&master_key_file, hex::encode(rand::random::<[u8; 32]>()))?;
    {
        // keyvault refuses a master key file others can read.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&master_key_file, std::fs::Permissions::from_mode(0o600))?;
    }
    // Both services get the same Redis settings: region-local Redis for
    // sessions, Sentinel for the durable records, R as this region's copy.
    let redis_env = |admin: &str| {
        vec![
            ("TRELLIS_REDIS__URL", regional.url()),
            ("TRELLIS_REDIS__DURABLE_URL", replica.url()),
            ("TRELLIS_REDIS__SENTINELS", sentinel_list.clone()),
            ("TRELLIS_REDIS__SENTINEL_MASTER", MASTER.to_string()),
            ("TRELLIS_REDIS__FAILOVER_WAIT_MS", "8000".to_string()),
            ("TRELLIS_REGION", "a".to_string()),
            ("TRELLIS_TELEMETRY__ADMIN_LISTEN", admin.to_string()),
            ("TRELLIS_TELEMETRY__LOG", "info".to_string()),
        ]
    };
    let (keyvault, keyvault_admin) = (addr(), addr());
    let mut env = redis_env(&keyvault_admin);
    env.extend([
        ("TRELLIS_KEYVAULT__LISTEN", keyvault.clone()),
        (
            "TRELLIS_KEYVAULT__MASTER_KEY_FILE",
            master_key_file.display().to_string(),
        ),
        ("TRELLIS_KEYVAULT__WORKERS", "1".to_string()),
    ]);
    let kv_proc = Proc::spawn("keyvault", dir.path(), &["keyvault"], &env);
    wait_ok(
        &keyvault_admin,
        "/readyz",
        Duration::from_secs(60),
        &kv_proc,
    )
    .await?;

    let (devices, grpc, gw_admin) = (addr(), addr(), addr());
    let mut env = redis_env(&gw_admin);
    env.extend([
        ("TRELLIS_GATEWAY__ID", "gw-a1".to_string()),
        ("TRELLIS_GATEWAY__DEVICE_LISTEN", devices.clone()),
        ("TRELLIS_GATEWAY__GRPC_LISTEN", grpc),
        (
            "TRELLIS_GATEWAY__KEYVAULT_URL",
            format!("http://{keyvault}"),
        ),
        // Above failover_wait_ms: keyvault may hold a handshake that long
        // while it waits for the new primary to write the audit record.
        ("TRELLIS_GATEWAY__HANDSHAKE_STEP_TIMEOUT_MS", "10000".into()),
        ("TRELLIS_GATEWAY__HANDSHAKE_TIMEOUT_MS", "20000".into()),
        ("TRELLIS_GATEWAY__HANDSHAKE_RATE", "0".into()),
    ]);
    let gw_proc = Proc::spawn("gateway", dir.path(), &["gateway"], &env);
    wait_ok(&gw_admin, "/readyz", Duration::from_secs(60), &gw_proc).await?;
    let gateway: SocketAddr = devices.parse()?;
    let logs = || {
        format!(
            "--- keyvault:\n{}\n--- gateway:\n{}\n--- sentinel-1:\n{}",
            kv_proc.output(),
            gw_proc.output(),
            sentinels[0].log_tail()
        )
    };

    let mut kv = connect_keyvault(keyvault.parse()?).await?;
    let cloud = kv
        .get_cloud_public_key(GetCloudPublicKeyRequest {})
        .await?
        .into_inner();
    let cloud_public_key = rsa::PublicKey::from_public_key_der(&cloud.public_key_der)?;
    let identity = |cloud: &rsa::PublicKey| -> anyhow::Result<DeviceIdentity> {
        Ok(DeviceIdentity {
            device_id: DeviceId(rand::random()),
            private_key: trellis_device::identity::generate_device_key(&mut rand::rng())?,
            cloud_public_key: cloud.clone(),
        })
    };
    let before = identity(&cloud_public_key)?;
    register(&mut kv, &before).await?;
    handshake(gateway, &before).await.with_context(logs)?;
    // The device record was written to P and replicated to R.
    let r = redis_conn::connect(&replica.url()).await?;
    until(Duration::from_secs(5), "device record replicated", || {
        let mut r = r.clone();
        let key = keys::device(&before.device_id.to_string());
        async move {
            let n: i64 = redis::cmd("EXISTS").arg(&key).query_async(&mut r).await?;
            Ok((n == 1).then_some(()))
        }
    })
    .await?;
    for s in &sentinels {
        assert_eq!(s.primary().await?, primary_addr, "sentinels name P first");
    }
    println!(
        "setup (P, R, 3 sentinels, keyvault, gateway, first handshake): {:?}",
        test_start.elapsed()
    );

    // The primary's region is lost.
    let killed = Instant::now();
    primary.kill();

    // Handshakes of the already registered device, until one succeeds.
    let mut attempts = 0;
    let first_handshake = loop {
        attempts += 1;
        match handshake(gateway, &before).await {
            Ok(()) => break killed.elapsed(),
            Err(e) => {
                if killed.elapsed() > RECOVERY_BOUND {
                    bail!(
                        "no successful handshake within {RECOVERY_BOUND:?} of the primary's loss ({attempts} attempts, last: {e:#})\n{}",
                        logs()
                    );
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    println!(
        "SIGKILL of the durable primary -> first successful handshake: {first_handshake:?} ({attempts} attempts)"
    );

    // Sentinel promoted R: every sentinel names it, and R says it is primary.
    for s in &sentinels {
        until(
            RECOVERY_BOUND.saturating_sub(killed.elapsed()) + Duration::from_secs(1),
            "sentinel names R as the primary",
            || async { Ok((s.primary().await? == replica_addr).then_some(())) },
        )
        .await
        .with_context(|| s.log_tail())?;
    }
    let info = info_replication(&replica.url()).await?;
    assert!(
        info.lines().any(|l| l.trim() == "role:master"),
        "R was promoted: {info}"
    );
    println!(
        "SIGKILL -> all three sentinels name R: {:?}",
        killed.elapsed()
    );

    // Keyvault follows R by itself: a handshake now leaves its audit record
    // on R (a durable write through keyvault's Sentinel connection).
    // (One retry: a handshake whose audit write was on a connection that
    // Sentinel's CLIENT KILL cut is still granted, but that record is lost,
    // as a write that may have run is never sent twice.)
    let granted_before = granted_sessions(&replica.url(), &before.device_id).await?;
    let mut audited = false;
    for _ in 0..2 {
        handshake(gateway, &before).await.with_context(logs)?;
        if granted_sessions(&replica.url(), &before.device_id).await? > granted_before {
            audited = true;
            break;
        }
    }
    assert!(
        audited,
        "a handshake's audit record was written to the new primary\n{}",
        logs()
    );

    // A new device registers (a durable write) and handshakes.
    let after = identity(&cloud_public_key)?;
    let register_start = Instant::now();
    // One call, as an operator would make it: no retry.
    register(&mut connect_keyvault(keyvault.parse()?).await?, &after)
        .await
        .context("registering a new device after the failover")
        .with_context(logs)?;
    // (A fresh connection: Sentinel's CLIENT KILL at the promotion cut the
    // one made before.)
    let mut r = redis_conn::connect(&replica.url()).await?;
    let n: i64 = redis::cmd("EXISTS")
        .arg(keys::device(&after.device_id.to_string()))
        .query_async(&mut r)
        .await?;
    assert_eq!(n, 1, "the new device's record is on R, the new primary");
    handshake(gateway, &after).await.with_context(logs)?;
    println!(
        "new device registered ({:?}) and handshaked; SIGKILL -> done: {:?}",
        register_start.elapsed(),
        killed.elapsed()
    );
    assert!(
        killed.elapsed() < RECOVERY_BOUND,
        "recovery took {:?}, bound {RECOVERY_BOUND:?}",
        killed.elapsed()
    );

    // Nothing was restarted: the same keyvault and gateway processes still
    // serve, and are ready.
    wait_ok(&keyvault_admin, "/readyz", Duration::from_secs(5), &kv_proc).await?;
    wait_ok(&gw_admin, "/readyz", Duration::from_secs(5), &gw_proc).await?;
    assert_eq!(
        kv_proc.output().matches("keyvault serving").count(),
        1,
        "keyvault started once"
    );
    let log = kv_proc.output();
    assert!(
        log.lines()
            .any(|l| l.contains("primary found through Sentinel") && l.contains(&replica_addr)),
        "keyvault logged that it found the new primary\n{log}"
    );
    println!("total test time: {:?}", test_start.elapsed());
    Ok(())
}

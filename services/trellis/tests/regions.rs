//! Two regions, real processes (issue 4). Each region has its own Redis
//! (sessions, ownership, routing), keyvault, two gateways, signer and ota;
//! the durable records live in one Redis primary in region A with a
//! replica in B, watched by three sentinels (A, B and a witness; quorum 2).
//! 200 simulated devices are homed in A (endpoint list A first, then B,
//! with `home_return`).
//!
//! 1. All online in A; a throttled OTA rollout is started and is under way.
//! 2. Every process of region A is SIGKILLed, its Redis servers and its
//!    sentinel included. Measured: time until ≥ 99 % of the devices are in
//!    session in B (≤ 60 s). A function call through B's gateway reaches a
//!    device; the rollout completes, driven by B's scheduler once A's lease
//!    has expired, reading it from the promoted durable copy in B.
//! 3. Region A comes back. Its old durable primary must come back as a
//!    replica (Sentinel reconfigures it). Devices move home gradually: the
//!    peak handshake rate in A stays well below the failover storm's.
//!
//! Throughout, both regions' ownership records are sampled every 200 ms;
//! no device may be owned in both regions in two consecutive samples.
//!
//! A second test (issue 10 item 9): a busy home region is not a lost one.
//! 300 devices homed in A start at once while A's admission control turns
//! most first handshakes away; at most 5 % may end up in B.
mod common;

use anyhow::{Context, bail};
use common::{Proc, addr, free_port, wait_ok};
use rsa::pkcs8::{DecodePublicKey, EncodePublicKey};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use trellis_core::local_redis::{LocalRedis, RedisData};
use trellis_device::identity::DeviceIdentity;
use trellis_device::sim::{DeviceReport, SimConfig, run_fleet};
use trellis_firmware::{TrustPolicy, TrustedKey, sign_manifest};
use trellis_proto::v1::device_service_client::DeviceServiceClient;
use trellis_proto::v1::ota_client::OtaClient;
use trellis_proto::v1::signer_client::SignerClient;
use trellis_proto::v1::upload_image_request::Part;
use trellis_proto::v1::*;
use trellis_tests::connect_keyvault;
use trellis_tests::ota::test_image;
use trellis_wire::DeviceId;

const DEVICES: usize = 200;
const PRODUCT: u32 = 6;
const MASTER: &str = "mymaster";
/// Gateway and device keepalive: short, so sessions notice loss quickly.
const KEEPALIVE_SECS: u64 = 2;
/// The devices' home-return probe interval (`SimConfig::home_return`).
const HOME_RETURN: Duration = Duration::from_secs(8);
/// How often both regions' ownership records are sampled.
const SAMPLE: Duration = Duration::from_millis(200);
/// Devices in the rollout, updated one at a time (so it is surely still
/// running when region A dies).
const ROLLOUT_DEVICES: usize = 10;
/// The failover budget: kill of region A to ≥ 99 % of devices in B.
const FAILOVER_BOUND: Duration = Duration::from_secs(60);

/// A `redis-server --sentinel` child, killed on drop.
struct Sentinel {
    port: u16,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Sentinel {
    /// Monitors the primary at `primary_port` with quorum 2, down after 1 s.
    fn start(dir: &Path, name: &str, primary_port: u16) -> anyhow::Result<Self> {
        let port = free_port();
        let conf = dir.join(format!("sentinel-{name}.conf"));
        let log = dir.join(format!("sentinel-{name}.log"));
        // Sentinel rewrites its own config file, so each has its own.
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {dir}\nlogfile {log}\n\
                 sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2\n\
                 sentinel down-after-milliseconds {MASTER} 1000\n\
                 sentinel failover-timeout {MASTER} 3000\n\
                 sentinel parallel-syncs {MASTER} 1\n",
                dir = dir.display(),
                log = log.display(),
            ),
        )?;
        let mut s = Self {
            port,
            conf,
            log,
            child: None,
        };
        s.restart()?;
        Ok(s)
    }

    /// Starts (again) from its own, possibly rewritten, config file.
    fn restart(&mut self) -> anyhow::Result<()> {
        let child = Command::new("redis-server")
            .arg(&self.conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server --sentinel")?;
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    async fn master_state(&self) -> anyhow::Result<HashMap<String, String>> {
        let flat: Vec<String> = redis::cmd("SENTINEL")
            .arg("master")
            .arg(MASTER)
            .query_async(&mut conn(&format!("redis://{}/", self.addr())).await?)
            .await?;
        Ok(flat
            .chunks(2)
            .filter_map(|kv| Some((kv.first()?.clone(), kv.get(1)?.clone())))
            .collect())
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn conn(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_secs(1)));
    Ok(redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

async fn info_replication(url: &str) -> anyhow::Result<String> {
    Ok(redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut conn(url).await?)
        .await?)
}

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
            Err(e) => last = format!("{e:#}"),
        }
        if start.elapsed() > within {
            bail!("{what}: not within {within:?} (last error: {last})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A process not started yet: name, environment, admin address.
type PendingProc = (String, Vec<(&'static str, String)>, String);

/// One region's processes and addresses.
struct Region {
    name: &'static str,
    /// Device ports stay the same across a restart (the devices know them).
    device_addrs: Vec<String>,
    durable_port: u16,
    regional: Option<LocalRedis>,
    durable: Option<LocalRedis>,
    procs: Vec<Proc>,
    keyvault: String,
    gateway_grpc: Vec<String>,
    signer: String,
    ota: String,
    /// The OTA scheduler's name, environment and admin address, until it
    /// is started.
    pending_ota: Option<PendingProc>,
    /// Extra settings for this region's gateways.
    gateway_env: Vec<(&'static str, String)>,
}

impl Region {
    /// A region with its own regional Redis and two device ports, its
    /// durable records at `durable_port` (`durable`: that server, when this
    /// region owns it). Nothing runs until `start_services`.
    fn new(
        name: &'static str,
        durable_port: u16,
        durable: Option<LocalRedis>,
    ) -> anyhow::Result<Self> {
        Ok(Region {
            name,
            device_addrs: vec![addr(), addr()],
            durable_port,
            regional: Some(LocalRedis::start(RedisData::Ephemeral)?),
            durable,
            procs: Vec::new(),
            keyvault: String::new(),
            gateway_grpc: Vec::new(),
            signer: String::new(),
            ota: String::new(),
            pending_ota: None,
            gateway_env: Vec::new(),
        })
    }

    fn regional_url(&self) -> Option<String> {
        self.regional.as_ref().map(LocalRedis::url)
    }

    /// Starts keyvault, then two gateways, signer and (with `with_ota`) ota,
    /// all pointing at this region's Redis and at the durable store through
    /// Sentinel (`sentinels` empty: directly). Without `with_ota`,
    /// [`Region::start_ota`] starts it later.
    async fn start_services(
        &mut self,
        dir: &Path,
        sentinels: &str,
        master_key: &Path,
        run: usize,
        with_ota: bool,
    ) -> anyhow::Result<()> {
        let regional = self.regional_url().context("regional redis")?;
        let durable = format!("redis://127.0.0.1:{}/", self.durable_port);
        let region = self.name;
        let env = |admin: &str| -> Vec<(&'static str, String)> {
            let mut e = vec![
                ("TRELLIS_REDIS__URL", regional.clone()),
                ("TRELLIS_REDIS__DURABLE_URL", durable.clone()),
                ("TRELLIS_REGION", region.to_string()),
                ("TRELLIS_TELEMETRY__ADMIN_LISTEN", admin.to_string()),
                ("TRELLIS_TELEMETRY__LOG", "info".to_string()),
            ];
            if !sentinels.is_empty() {
                e.extend([
                    ("TRELLIS_REDIS__SENTINELS", sentinels.to_string()),
                    ("TRELLIS_REDIS__SENTINEL_MASTER", MASTER.to_string()),
                    ("TRELLIS_REDIS__FAILOVER_WAIT_MS", "5000".to_string()),
                ]);
            }
            e
        };
        let name = |what: &str| format!("{region}-{what}-{run}");
        let (keyvault, kv_admin) = (addr(), addr());
        let mut e = env(&kv_admin);
        e.extend([
            ("TRELLIS_KEYVAULT__LISTEN", keyvault.clone()),
            (
                "TRELLIS_KEYVAULT__MASTER_KEY_FILE",
                master_key.display().to_string(),
            ),
            ("TRELLIS_KEYVAULT__WORKERS", "2".to_string()),
        ]);
        let kv = Proc::spawn(&name("keyvault"), dir, &["keyvault"], &e);
        wait_ok(&kv_admin, "/readyz", Duration::from_secs(60), &kv).await?;
        self.procs.push(kv);

        let (signer, signer_admin) = (addr(), addr());
        let (ota, ota_admin) = (addr(), addr());
        let mut admins = Vec::new();
        self.gateway_grpc.clear();
        for (n, devices) in self.device_addrs.clone().iter().enumerate() {
            let (grpc, admin) = (addr(), addr());
            let id = format!("gw-{region}{}", n + 1);
            let mut e = env(&admin);
            e.extend([
                ("TRELLIS_GATEWAY__ID", id.clone()),
                ("TRELLIS_GATEWAY__DEVICE_LISTEN", devices.clone()),
                ("TRELLIS_GATEWAY__GRPC_LISTEN", grpc.clone()),
                (
                    "TRELLIS_GATEWAY__KEYVAULT_URL",
                    format!("http://{keyvault}"),
                ),
                ("TRELLIS_GATEWAY__OTA_URL", format!("http://{ota}")),
                (
                    "TRELLIS_GATEWAY__KEEPALIVE_SECS",
                    KEEPALIVE_SECS.to_string(),
                ),
                // Above failover_wait_ms: keyvault may hold a handshake that
                // long while it waits for a new durable primary (audit).
                ("TRELLIS_GATEWAY__HANDSHAKE_STEP_TIMEOUT_MS", "10000".into()),
                ("TRELLIS_GATEWAY__HANDSHAKE_TIMEOUT_MS", "30000".into()),
                ("TRELLIS_GATEWAY__COMMAND_TIMEOUT_MS", "5000".into()),
            ]);
            e.extend(self.gateway_env.iter().cloned());
            self.procs
                .push(Proc::spawn(&name(&id), dir, &["gateway"], &e));
            admins.push(admin);
            self.gateway_grpc.push(grpc);
        }
        let mut e = env(&signer_admin);
        e.extend([
            ("TRELLIS_SIGNER__LISTEN", signer.clone()),
            ("TRELLIS_SIGNER__KEYVAULT_URL", format!("http://{keyvault}")),
        ]);
        self.procs
            .push(Proc::spawn(&name("signer"), dir, &["signer"], &e));
        admins.push(signer_admin);
        let mut e = env(&ota_admin);
        e.extend([
            ("TRELLIS_OTA__LISTEN", ota.clone()),
            (
                "TRELLIS_OTA__GATEWAY_URL",
                format!("http://{}", self.gateway_grpc[0]),
            ),
            ("TRELLIS_OTA__SIGNER_URL", format!("http://{signer}")),
            ("TRELLIS_OTA__TICK_MS", "200".into()),
            // A dead region's rollouts are taken over this long after.
            ("TRELLIS_OTA__LEASE_MS", "3000".into()),
        ]);
        self.pending_ota = Some((name("ota"), e, ota_admin));
        if with_ota {
            self.start_ota(dir).await?;
        }
        let started = self.procs.len() - admins.len();
        for (admin, p) in admins.iter().zip(&self.procs[started..]) {
            wait_ok(admin, "/readyz", Duration::from_secs(60), p).await?;
        }
        self.keyvault = keyvault;
        self.signer = signer;
        self.ota = ota;
        Ok(())
    }

    /// Starts the OTA scheduler configured by `start_services`.
    async fn start_ota(&mut self, dir: &Path) -> anyhow::Result<()> {
        let (name, env, admin) = self.pending_ota.take().context("no ota configured")?;
        let p = Proc::spawn(&name, dir, &["ota"], &env);
        wait_ok(&admin, "/readyz", Duration::from_secs(60), &p).await?;
        self.procs.push(p);
        Ok(())
    }

    /// SIGKILL for every process of the region, Redis servers included.
    fn kill_all(&mut self) {
        for p in &mut self.procs {
            p.stop();
        }
        self.procs.clear();
        self.regional = None;
        self.durable = None;
    }

    fn outputs_tail(&self) -> String {
        self.procs
            .iter()
            .map(|p| {
                let out = p.output();
                let lines: Vec<&str> = out.lines().collect();
                format!(
                    "--- {}:\n{}",
                    p.name,
                    lines[lines.len().saturating_sub(15)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// What the ownership sampler saw.
#[derive(Default)]
struct Owners {
    /// Devices owned in each region at the last successful sample.
    in_a: HashSet<String>,
    in_b: HashMap<String, String>,
    samples: u64,
    /// Samples in which some device was owned in both regions.
    both_samples: u64,
    /// Longest run of consecutive samples one device was owned in both.
    max_both_run: u32,
    worst: String,
}

/// Device ids owned in a region's Redis (None: that Redis is down).
async fn owned(url: Option<&str>, ids: &[String]) -> Option<HashMap<String, String>> {
    let mut c = conn(url?).await.ok()?;
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.cmd("HGET")
            .arg(format!("trellis:session:{id}"))
            .arg("gateway");
    }
    let gws: Vec<Option<String>> = pipe.query_async(&mut c).await.ok()?;
    Some(
        ids.iter()
            .zip(gws)
            .filter_map(|(id, g)| Some((id.clone(), g?)))
            .collect(),
    )
}

/// Connected reports: (when, endpoint).
type Connects = Arc<Mutex<Vec<(Instant, String)>>>;

/// Peak handshakes per second to `endpoints` within [from, to), in 1 s
/// buckets from `from`.
fn peak_rate(connects: &Connects, endpoints: &[String], from: Instant, to: Instant) -> usize {
    let mut buckets: BTreeMap<u64, usize> = BTreeMap::new();
    for (t, e) in connects.lock().expect("lock").iter() {
        if *t >= from && *t < to && endpoints.contains(e) {
            *buckets.entry(t.duration_since(from).as_secs()).or_default() += 1;
        }
    }
    buckets.values().copied().max().unwrap_or(0)
}

fn count_in(connects: &Connects, endpoints: &[String], from: Instant) -> usize {
    connects
        .lock()
        .expect("lock")
        .iter()
        .filter(|(t, e)| *t >= from && endpoints.contains(e))
        .count()
}

async fn signer_client(addr: &str) -> anyhow::Result<SignerClient<tonic::transport::Channel>> {
    Ok(SignerClient::connect(format!("http://{addr}")).await?)
}

async fn ota_client(addr: &str) -> anyhow::Result<OtaClient<tonic::transport::Channel>> {
    Ok(OtaClient::connect(format!("http://{addr}")).await?)
}

/// A customer key and the cloud release key must both sign (product
/// policy in the signer, trust policy on the devices).
async fn release_policy(
    signer_addr: &str,
    keyvault: &str,
) -> anyhow::Result<(rsa::PrivateKey, TrustPolicy)> {
    let customer =
        tokio::task::spawn_blocking(|| rsa::PrivateKey::new(&mut rand::rng(), 2048)).await??;
    let cloud_pem = connect_keyvault(keyvault.parse()?)
        .await?
        .get_signing_key(GetSigningKeyRequest {
            purpose: "release".into(),
            version: 0,
        })
        .await?
        .into_inner()
        .public_key_pem;
    let customer_pub = customer.to_public_key();
    let policy = TrustPolicy::new(
        vec![
            TrustedKey::new("customer", customer_pub.clone())?,
            TrustedKey::new(
                "cloud-release",
                trellis_firmware::public_key_from_pem(&cloud_pem)?,
            )?,
        ],
        2,
    )?;
    signer_client(signer_addr)
        .await?
        .set_policy(SetPolicyRequest {
            policy: Some(SigningPolicy {
                product_id: PRODUCT,
                keys: vec![
                    PolicyKey {
                        name: "customer".into(),
                        public_key_pem: trellis_firmware::public_key_to_pem(&customer_pub)?,
                        key_id: String::new(),
                    },
                    PolicyKey {
                        name: "cloud-release".into(),
                        public_key_pem: cloud_pem,
                        key_id: String::new(),
                    },
                ],
                threshold: 2,
                cloud_only: false,
                version: 0,
                policy_json: String::new(),
            }),
            allow_cloud_only: false,
        })
        .await?;
    Ok((customer, policy))
}

/// Uploads `image` and makes a release signed by the customer and the cloud.
async fn make_release(
    signer_addr: &str,
    customer: &rsa::PrivateKey,
    version: u32,
    image: &[u8],
) -> anyhow::Result<(String, String)> {
    let mut signer = signer_client(signer_addr).await?;
    let mut parts = vec![UploadImageRequest {
        part: Some(Part::Header(UploadImageHeader {
            product_id: PRODUCT,
            size: image.len() as u64,
            organization: String::new(),
        })),
    }];
    parts.extend(image.chunks(32 * 1024).map(|c| UploadImageRequest {
        part: Some(Part::Data(c.to_vec())),
    }));
    let uploaded = signer
        .upload_image(tokio_stream::iter(parts))
        .await?
        .into_inner();
    let release = signer
        .create_release(CreateReleaseRequest {
            product_id: PRODUCT,
            version,
            image_sha256: uploaded.sha256.clone(),
        })
        .await?
        .into_inner();
    let manifest = release
        .signed
        .as_ref()
        .map(|s| s.manifest.clone())
        .context("release without manifest")?;
    signer
        .add_signature(AddSignatureRequest {
            release_id: release.release_id.clone(),
            signature: Some(sign_manifest(customer, &manifest)?),
        })
        .await?;
    signer
        .sign_release(SignReleaseRequest {
            release_id: release.release_id.clone(),
        })
        .await?;
    Ok((release.release_id, uploaded.sha256))
}

async fn rollout_status(ota: &str, id: &str) -> anyhow::Result<RolloutStatus> {
    Ok(ota_client(ota)
        .await?
        .get_rollout(GetRolloutRequest {
            rollout_id: id.to_string(),
        })
        .await?
        .into_inner())
}

fn applied(s: &RolloutStatus) -> u32 {
    s.stages.iter().map(|st| st.applied).sum()
}

/// `n` device keys made now and registered through `keyvault`.
async fn register_fleet(keyvault: &str, n: usize) -> anyhow::Result<Vec<DeviceIdentity>> {
    let mut kv = connect_keyvault(keyvault.parse()?).await?;
    let cloud = kv
        .get_cloud_public_key(GetCloudPublicKeyRequest {})
        .await?
        .into_inner();
    let cloud_public_key = rsa::PublicKey::from_public_key_der(&cloud.public_key_der)?;
    let keys = tokio::task::spawn_blocking(move || {
        (0..n)
            .map(|_| trellis_device::identity::generate_device_key(&mut rand::rng()))
            .collect::<Result<Vec<_>, _>>()
    })
    .await??;
    let mut identities = Vec::with_capacity(n);
    for private_key in keys {
        let identity = DeviceIdentity {
            device_id: DeviceId(rand::random()),
            private_key,
            cloud_public_key: cloud_public_key.clone(),
        };
        let der = identity.private_key.to_public_key().to_public_key_der()?;
        kv.register_device(RegisterDeviceRequest {
            device_id: identity.device_id.to_string(),
            product_id: PRODUCT,
            public_key: der.as_bytes().to_vec(),
            organization: String::new(),
        })
        .await?;
        identities.push(identity);
    }
    Ok(identities)
}

/// A fresh keyvault master key in `dir`, private to this user (keyvault
/// refuses one others can read).
fn write_master_key(dir: &Path) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("master.key");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?
        .write_all(hex::encode(rand::random::<[u8; 32]>()).as_bytes())?;
    Ok(path)
}

/// The tests of this file run one at a time: each is two regions of
/// processes, too much for two cores at once.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A temporary directory for the processes' logs and data;
/// `KEEP_REGIONS_TEST_DIR=1` keeps it for a post-mortem. The directory is
/// removed when the `TempDir` (if any) is dropped.
fn test_dir() -> anyhow::Result<(Option<tempfile::TempDir>, PathBuf)> {
    let tmp = tempfile::Builder::new()
        .prefix("trellis-regions-")
        .tempdir()?;
    if std::env::var_os("KEEP_REGIONS_TEST_DIR").is_some() {
        let kept = tmp.keep();
        println!("logs kept in {}", kept.display());
        return Ok((None, kept));
    }
    let dir = tmp.path().to_path_buf();
    Ok((Some(tmp), dir))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_a_dies_devices_fail_over_to_b_and_return_home_gradually() -> anyhow::Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let test_start = Instant::now();
    let (_tmp, dir) = test_dir()?;
    let dir = dir.as_path();

    // Durable store: primary in A, replica in B, sentinels in A, B and a
    // witness.
    let durable_a = LocalRedis::start(RedisData::Ephemeral)?;
    let durable_b = LocalRedis::start(RedisData::Ephemeral)?;
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(durable_a.port())
        .query_async(&mut conn(&durable_b.url()).await?)
        .await?;
    until(Duration::from_secs(10), "B's replica in sync", || async {
        let info = info_replication(&durable_b.url()).await?;
        Ok(info.contains("master_link_status:up").then_some(()))
    })
    .await?;
    let mut sentinel_a = Sentinel::start(dir, "a", durable_a.port())?;
    let sentinel_b = Sentinel::start(dir, "b", durable_a.port())?;
    let sentinel_w = Sentinel::start(dir, "witness", durable_a.port())?;
    for s in [&sentinel_a, &sentinel_b, &sentinel_w] {
        // A failover needs each sentinel to know the replica and the
        // others (hello messages every 2 s).
        until(
            Duration::from_secs(20),
            "sentinels see each other",
            || async {
                let m = s.master_state().await?;
                let get = |k: &str| m.get(k).cloned().unwrap_or_default();
                Ok((get("num-slaves") == "1" && get("num-other-sentinels") == "2").then_some(()))
            },
        )
        .await
        .with_context(|| s.log_tail())?;
    }
    let sentinels = [&sentinel_a, &sentinel_b, &sentinel_w]
        .iter()
        .map(|s| s.addr())
        .collect::<Vec<_>>()
        .join(",");
    let master_key = write_master_key(dir)?;

    let mut a = Region::new("a", durable_a.port(), Some(durable_a))?;
    let mut b = Region::new("b", durable_b.port(), Some(durable_b))?;
    // A first: its keyvault creates the cloud keys that B's then unseals.
    a.start_services(dir, &sentinels, &master_key, 1, true)
        .await
        .with_context(|| a.outputs_tail())?;
    // Both regions' schedulers run from the start: whichever takes a
    // rollout's lease where its devices are not in session gives it up to
    // the other.
    b.start_services(dir, &sentinels, &master_key, 1, true)
        .await
        .with_context(|| b.outputs_tail())?;
    println!(
        "setup (durable + sentinels + both regions): {:?}",
        test_start.elapsed()
    );

    // Devices: keys made now, registered through A's keyvault.
    let identities = register_fleet(&a.keyvault, DEVICES).await?;
    let ids: Vec<String> = identities.iter().map(|i| i.device_id.to_string()).collect();
    let (customer, policy) = release_policy(&a.signer, &a.keyvault).await?;

    // Two half fleets, each homed on one of A's gateways; B is the fallback.
    let config = SimConfig {
        product_id: PRODUCT as u16,
        firmware_version: 1,
        firmware_image: test_image(PRODUCT, 1, 4096),
        event_interval: None,
        keepalive: Duration::from_secs(KEEPALIVE_SECS),
        backoff_base: Duration::from_millis(200),
        backoff_max: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(3),
        start_spread: Duration::from_secs(3),
        trust_policy: Some(policy),
        home_return: Some(HOME_RETURN),
        ..SimConfig::default()
    };
    let stop = CancellationToken::new();
    let connects: Connects = Arc::default();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    {
        let connects = connects.clone();
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                if let DeviceReport::Connected { endpoint, .. } = r {
                    connects
                        .lock()
                        .expect("lock")
                        .push((Instant::now(), endpoint));
                }
            }
        });
    }
    // Plays a second copy of device 0 in region B at the end.
    let copy_of_first = identities[0].clone();
    let mut second = identities;
    let first: Vec<DeviceIdentity> = second.drain(..DEVICES / 2).collect();
    let order = |x: usize| {
        vec![
            a.device_addrs[x].clone(),
            a.device_addrs[1 - x].clone(),
            b.device_addrs[x].clone(),
            b.device_addrs[1 - x].clone(),
        ]
    };
    let fleets = [
        run_fleet(first, config.clone(), order(0), stop.clone(), tx.clone()),
        run_fleet(second, config, order(1), stop.clone(), tx),
    ];

    // The sampler: both regions' ownership every SAMPLE. Two reads are not
    // one atomic snapshot: a device that moves between the two reads can
    // show in both once, so "both" must last two consecutive samples
    // (longer than one interval) to count as two live sessions.
    let owners = Arc::new(Mutex::new(Owners::default()));
    let urls = Arc::new(Mutex::new((a.regional_url(), b.regional_url())));
    let sampling = CancellationToken::new();
    let sampler = {
        let (owners, urls, ids, stop) =
            (owners.clone(), urls.clone(), ids.clone(), sampling.clone());
        tokio::spawn(async move {
            let mut runs: HashMap<String, u32> = HashMap::new();
            while !stop.is_cancelled() {
                let (ua, ub) = urls.lock().expect("lock").clone();
                let (in_b, in_a) =
                    tokio::join!(owned(ub.as_deref(), &ids), owned(ua.as_deref(), &ids));
                {
                    let mut o = owners.lock().expect("lock");
                    o.samples += 1;
                    let both: HashSet<&String> = match (&in_a, &in_b) {
                        (Some(x), Some(y)) => x.keys().filter(|k| y.contains_key(*k)).collect(),
                        _ => HashSet::new(),
                    };
                    if !both.is_empty() {
                        o.both_samples += 1;
                    }
                    runs.retain(|d, _| both.contains(d));
                    for d in both {
                        let run = runs.entry(d.clone()).or_default();
                        *run += 1;
                        if *run > o.max_both_run {
                            o.max_both_run = *run;
                            o.worst = format!(
                                "{d}: A {:?}, B {:?}",
                                in_a.as_ref().and_then(|m| m.get(d)),
                                in_b.as_ref().and_then(|m| m.get(d))
                            );
                        }
                    }
                    if let Some(x) = in_a {
                        o.in_a = x.into_keys().collect();
                    } else {
                        o.in_a.clear();
                    }
                    if let Some(y) = in_b {
                        o.in_b = y;
                    }
                }
                tokio::time::sleep(SAMPLE).await;
            }
        })
    };
    let need = DEVICES * 99 / 100;

    // 1. All online in A.
    until(
        Duration::from_secs(60),
        "all devices in session in A",
        || async { Ok((owners.lock().expect("lock").in_a.len() == DEVICES).then_some(())) },
    )
    .await
    .with_context(|| a.outputs_tail())?;
    println!(
        "all {DEVICES} devices in session in A at {:?}",
        test_start.elapsed()
    );

    // A rollout that is surely not finished when A dies: one device at a
    // time.
    let image = test_image(PRODUCT, 2, 64 * 1024);
    let (release, sha) = make_release(&a.signer, &customer, 2, &image).await?;
    let rollout_ids: Vec<String> = ids[..ROLLOUT_DEVICES].to_vec();
    let created = ota_client(&a.ota)
        .await?
        .create_rollout(CreateRolloutRequest {
            release_id: release,
            target: Some(RolloutTarget {
                product_id: PRODUCT,
                device_ids: rollout_ids.clone(),
                percent: 0,
                tag: String::new(),
            }),
            stages: vec![Stage {
                name: "all".into(),
                percent: 100,
                min_success_ratio: 0.5,
                ..Default::default()
            }],
            max_failure_ratio: 0.5,
            max_concurrent: 1,
            max_attempts: 3,
            apply_timeout_secs: 20,
            ..Default::default()
        })
        .await?
        .into_inner();
    let rollout = created.rollout_id.clone();
    let before = until(
        Duration::from_secs(60),
        "rollout under way in A",
        || async {
            let s = rollout_status(&a.ota, &rollout).await?;
            Ok((applied(&s) >= 2).then_some(applied(&s)))
        },
    )
    .await
    .with_context(|| a.outputs_tail())?;
    // A scheduler only sees the sessions of its own region (ownership is
    // regional): the rollout is held by A's while its devices are there
    // (B's gave the lease up if it took it first), and B's takes it over
    // once that lease expires with region A.

    // 2. Region A dies: every process, its Redis servers and its sentinel.
    let killed = Instant::now();
    a.kill_all();
    sentinel_a.kill();
    urls.lock().expect("lock").0 = None;
    println!("region A SIGKILLed with {before}/{ROLLOUT_DEVICES} of the rollout applied");
    let failover = until(
        FAILOVER_BOUND,
        "≥ 99 % of devices in session in B",
        || async {
            Ok((owners.lock().expect("lock").in_b.len() >= need).then(|| killed.elapsed()))
        },
    )
    .await
    .with_context(|| b.outputs_tail())?;
    let storm_peak = peak_rate(&connects, &b.device_addrs, killed, Instant::now());
    println!(
        "failover: {need}/{DEVICES} devices in session in B {:.1} s after the kill (peak {storm_peak} handshakes/s in B)",
        failover.as_secs_f64()
    );
    assert!(failover <= FAILOVER_BOUND);

    // A function call through B's gateway reaches a device.
    let device = owners
        .lock()
        .expect("lock")
        .in_b
        .keys()
        .next()
        .cloned()
        .context("a device in B")?;
    let gw_b = DeviceServiceClient::connect(format!("http://{}", b.gateway_grpc[0])).await?;
    let call = until(Duration::from_secs(20), "add(2,3) through B", || async {
        let r = gw_b
            .clone()
            .call_function(CallFunctionRequest {
                device_id: device.clone(),
                function: "add".into(),
                argument: "2,3".into(),
                timeout_ms: 5000,
                signed_command: Vec::new(),
            })
            .await?
            .into_inner();
        Ok(Some(r))
    })
    .await?;
    assert_eq!(call.return_value, 5);
    println!(
        "add(2,3) = 5 on device {device} via B (answered by {})",
        call.gateway_id
    );

    // The rollout completes, driven by B's scheduler.
    let done = until(
        Duration::from_secs(90),
        "rollout completed in B",
        || async {
            let s = rollout_status(&b.ota, &rollout).await?;
            Ok(matches!(s.state(), RolloutState::Completed | RolloutState::Aborted).then_some(s))
        },
    )
    .await
    .with_context(|| b.outputs_tail())?;
    assert_eq!(done.state(), RolloutState::Completed, "{}", done.message);
    // A's scheduler held the lease (fencing token 1, or 2 when B's took it
    // first and gave it up); B's took it over once it expired, with a
    // later token.
    let fence: u64 = redis::cmd("GET")
        .arg(trellis_core::redis_conn::keys::rollout_fence(&rollout))
        .query_async(&mut conn(&format!("redis://127.0.0.1:{}/", b.durable_port)).await?)
        .await?;
    assert!(
        fence >= 2,
        "the rollout's lease never changed hands (fence {fence})"
    );
    println!(
        "rollout {rollout} seen completed in B {:.1} s after the kill (lease taken over, fence {fence}): {}/{ROLLOUT_DEVICES} applied (release sha {})",
        killed.elapsed().as_secs_f64(),
        applied(&done),
        sha.get(..12).unwrap_or_default()
    );
    drop(gw_b);

    // 3. Region A comes back. Its durable Redis first, on its old port:
    // Sentinel must make it a replica of the promoted primary in B.
    let back = Instant::now();
    let durable_a = LocalRedis::start_on(a.durable_port, RedisData::Ephemeral)?;
    let durable_a_url = durable_a.url();
    a.durable = Some(durable_a);
    until(
        Duration::from_secs(40),
        "A's old durable primary is a replica of B's",
        || async {
            let info = info_replication(&durable_a_url).await?;
            Ok((info.contains("role:slave")
                && info.contains(&format!("master_port:{}", b.durable_port))
                && info.contains("master_link_status:up"))
            .then_some(()))
        },
    )
    .await
    .with_context(|| sentinel_b.log_tail())?;
    println!(
        "A's old durable primary is a replica again after {:.1} s",
        back.elapsed().as_secs_f64()
    );
    sentinel_a.restart()?;
    a.regional = Some(LocalRedis::start(RedisData::Ephemeral)?);
    urls.lock().expect("lock").0 = a.regional_url();
    a.start_services(dir, &sentinels, &master_key, 2, true)
        .await
        .with_context(|| a.outputs_tail())?;
    let a_up = Instant::now();
    let home = until(
        HOME_RETURN * 2 + Duration::from_secs(20),
        "≥ 99 % of devices back home in A",
        || async { Ok((owners.lock().expect("lock").in_a.len() >= need).then(|| a_up.elapsed())) },
    )
    .await
    .with_context(|| a.outputs_tail())?;
    let return_peak = peak_rate(&connects, &a.device_addrs, a_up, Instant::now());
    let returned = count_in(&connects, &a.device_addrs, a_up);
    println!(
        "return: {need}/{DEVICES} devices home in A {:.1} s after A was up ({returned} handshakes in A, peak {return_peak}/s; storm into B peaked at {storm_peak}/s)",
        home.as_secs_f64()
    );
    // Spread over HOME_RETURN the average rate is DEVICES / HOME_RETURN;
    // twice that is the bound, and it must stay under the storm's peak.
    let bound = 2 * DEVICES / HOME_RETURN.as_secs() as usize;
    assert!(
        return_peak <= bound,
        "return peak {return_peak}/s above {bound}/s"
    );
    assert!(
        return_peak < storm_peak,
        "return peak {return_peak}/s not below the storm's {storm_peak}/s"
    );

    // A few more samples, then the verdict on double sessions.
    tokio::time::sleep(SAMPLE * 5).await;
    sampling.cancel();
    let _ = sampler.await;
    let (samples, both_samples, max_both_run, worst) = {
        let o = owners.lock().expect("lock");
        (o.samples, o.both_samples, o.max_both_run, o.worst.clone())
    };
    println!(
        "ownership samples: {} (every {SAMPLE:?}); samples with a device owned in both regions: {}; longest such run: {} sample(s) {}",
        samples, both_samples, max_both_run, worst
    );
    assert!(
        max_both_run <= 1,
        "a device was owned in both regions for {max_both_run} consecutive samples ({worst})"
    );

    // 4. The durable home record, directly: a second session of device 0
    // opened in B (its simulated self is at home in A). B's claim is the
    // newest, so A's session closes at its next refresh ("superseded by
    // region b"); the device reconnects home, and that newer claim closes
    // the session in B the same way. B's session must close well before
    // its silence limit (3 keepalives), so it was the home record.
    let device0 = copy_of_first.device_id.to_string();
    let opened = Instant::now();
    let mut copy = trellis_tests::RawDevice::connect(b.device_addrs[0].parse()?, &copy_of_first)
        .await
        .context("second session of device 0 in B")?;
    copy.hello(copy_of_first.device_id, [0; 32]).await?;
    let closed = copy
        .closed_within(Duration::from_secs(KEEPALIVE_SECS * 3 - 1))
        .await;
    assert!(
        closed,
        "B's session of device 0 was not closed by the newer claim in A"
    );
    println!(
        "a second session of device 0 in B: A's session superseded, the device reconnected home, and B's session closed {:.1} s after it opened",
        opened.elapsed().as_secs_f64()
    );
    let durable =
        trellis_core::redis_conn::connect(&format!("redis://127.0.0.1:{}/", b.durable_port))
            .await?;
    let superseded = until(
        Duration::from_secs(5),
        "both supersessions audited",
        || async {
            let records =
                trellis_core::audit::recent(&mut durable.clone(), 20, Some(&device0)).await?;
            let from = |region: &str| {
                records.iter().any(|r| {
                    r.action == "session_superseded"
                        && r.detail
                            .iter()
                            .any(|(k, v)| k.ends_with("old_region") && v == region)
                })
            };
            Ok((from("a") && from("b")).then_some(records.len()))
        },
    )
    .await?;
    println!(
        "audit: session_superseded for device 0 from region a and from region b ({superseded} records for it)"
    );

    stop.cancel();
    for f in fleets {
        let _ = tokio::time::timeout(Duration::from_secs(10), f).await;
    }
    println!("test time: {:.1} s", test_start.elapsed().as_secs_f64());
    Ok(())
}

/// Devices in the storm test (issue 10 item 9).
const STORM_DEVICES: usize = 300;
/// Region A's admission in the storm test, per gateway: handshakes per
/// second and burst. The storm (every device at once) is several times
/// that, so most first handshakes are turned away as busy.
const STORM_RATE: u32 = 20;
/// At most this share of the storm may end up in B while A is up.
const STORM_SPILL_PERCENT: usize = 5;

/// A busy home region is not a lost region: 300 devices homed in A (A's
/// two gateways listed first, then B's) start at the same moment while A's
/// admission control admits 20 handshakes/s per gateway. Turned away after
/// accept, a device retries the same gateway with backoff instead of
/// moving on to B; at most 5 % may end up in B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_home_region_keeps_its_devices() -> anyhow::Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let test_start = Instant::now();
    let (_tmp, dir) = test_dir()?;
    let dir = dir.as_path();
    // One durable store for both regions, no Sentinel: nothing fails over.
    let durable = LocalRedis::start(RedisData::Ephemeral)?;
    let master_key = write_master_key(dir)?;
    let mut a = Region::new("a", durable.port(), None)?;
    a.gateway_env = vec![
        ("TRELLIS_GATEWAY__HANDSHAKE_RATE", STORM_RATE.to_string()),
        ("TRELLIS_GATEWAY__HANDSHAKE_BURST", STORM_RATE.to_string()),
    ];
    let mut b = Region::new("b", durable.port(), None)?;
    a.start_services(dir, "", &master_key, 1, false)
        .await
        .with_context(|| a.outputs_tail())?;
    b.start_services(dir, "", &master_key, 1, false)
        .await
        .with_context(|| b.outputs_tail())?;
    let identities = register_fleet(&a.keyvault, STORM_DEVICES).await?;
    println!(
        "setup (both regions, {STORM_DEVICES} devices registered): {:.1} s",
        test_start.elapsed().as_secs_f64()
    );

    // `trellis sim --gateway A1,A2,B1,B2 --home-return-secs 600` with the
    // default backoff, every device at once.
    let config = SimConfig {
        product_id: PRODUCT as u16,
        event_interval: None,
        keepalive: Duration::from_secs(KEEPALIVE_SECS),
        home_return: Some(Duration::from_secs(600)),
        start_spread: Duration::ZERO,
        ..SimConfig::default()
    };
    let endpoints: Vec<String> = a
        .device_addrs
        .iter()
        .chain(&b.device_addrs)
        .cloned()
        .collect();
    let stop = CancellationToken::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    let fleet = run_fleet(identities, config, endpoints, stop.clone(), tx);

    // Where each device got a session (each device's first, and whether
    // any was in B), and the handshakes A turned away.
    let mut first: HashMap<DeviceId, (String, Duration)> = HashMap::new();
    let mut in_b: HashSet<DeviceId> = HashSet::new();
    let mut turned_away_in_a = 0usize;
    let mut failures_elsewhere = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    while first.len() < STORM_DEVICES {
        let report = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(r)) => r,
            Ok(None) => bail!("the fleet stopped"),
            Err(_) => bail!(
                "only {}/{STORM_DEVICES} devices in session after 45 s\n{}",
                first.len(),
                a.outputs_tail()
            ),
        };
        match report {
            DeviceReport::Connected {
                device_id,
                endpoint,
                ..
            } => {
                if b.device_addrs.contains(&endpoint) {
                    in_b.insert(device_id);
                }
                first
                    .entry(device_id)
                    .or_insert((endpoint, started.elapsed()));
            }
            DeviceReport::HandshakeFailed { endpoint, .. } => {
                if a.device_addrs.contains(&endpoint) {
                    turned_away_in_a += 1;
                } else {
                    failures_elsewhere += 1;
                }
            }
            _ => {}
        }
    }
    let all_in = started.elapsed();
    // A little longer: a session that fails right after the storm and
    // lands in B counts too.
    let settle = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Some(report)) = tokio::time::timeout_at(settle, rx.recv()).await {
        if let DeviceReport::Connected {
            device_id,
            endpoint,
            ..
        } = report
            && b.device_addrs.contains(&endpoint)
        {
            in_b.insert(device_id);
        }
    }
    let spilled = in_b.len();
    let last_in_a = first
        .values()
        .filter(|(e, _)| a.device_addrs.contains(e))
        .map(|(_, t)| *t)
        .max()
        .unwrap_or_default();
    println!(
        "storm: all {STORM_DEVICES} devices in session {:.1} s after the start (last in A at {:.1} s); \
         {turned_away_in_a} handshakes turned away by A ({STORM_RATE}/s per gateway); \
         {spilled} devices ({:.1} %) in B; {failures_elsewhere} failures in B",
        all_in.as_secs_f64(),
        last_in_a.as_secs_f64(),
        spilled as f64 * 100.0 / STORM_DEVICES as f64
    );
    assert!(
        turned_away_in_a > 0,
        "A's admission control turned no handshake away: the storm did not test anything"
    );
    assert!(
        spilled * 100 <= STORM_DEVICES * STORM_SPILL_PERCENT,
        "{spilled}/{STORM_DEVICES} devices ended up in B while A was up"
    );

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), fleet).await;
    println!("test time: {:.1} s", test_start.elapsed().as_secs_f64());
    Ok(())
}

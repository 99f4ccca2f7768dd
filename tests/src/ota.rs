//! Fixtures for the firmware tests: signer and OTA scheduler serving real
//! gRPC next to a [`Cluster`], signed releases made the way a customer and
//! the cloud make them, simulated fleets provisioned with a trust policy,
//! and a TCP proxy that can slow a link down or alter a frame in flight.
use crate::{Cluster, as_user, test_config};
use anyhow::{Context, bail};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use trellis_core::Shutdown;
use trellis_core::config::Config;
use trellis_core::local_redis::{Admin, LocalRedis, RedisData};
use trellis_core::redis_conn::acl::RedisUser;
use trellis_core::shutdown::ShutdownTrigger;
use trellis_device::identity::DeviceIdentity;
use trellis_device::sim::{DeviceReport, SimConfig};
use trellis_firmware::{TrustPolicy, TrustedKey, sign_manifest};
use trellis_ota::{Clock, GatewayDeliverer, HttpApprover, Parts, SignerReleases, SystemClock};
use trellis_proto::v1::ota_client::OtaClient;
use trellis_proto::v1::signer_client::SignerClient;
use trellis_proto::v1::upload_image_request::Part;
use trellis_proto::v1::*;

/// Signer and scheduler for a cluster. The scheduler can be stopped and
/// started again on the same address (the gateways keep calling it there).
pub struct OtaStack {
    pub signer: SocketAddr,
    pub ota: SocketAddr,
    config: Config,
    signer_trigger: Option<ShutdownTrigger>,
    signer_task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    ota_trigger: Option<ShutdownTrigger>,
    ota_task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// The scheduler's time (maintenance windows, soak, timeouts).
    clock: Arc<dyn Clock>,
}

impl Cluster {
    /// A cluster whose gateways tell the scheduler of every Hello, with
    /// signer and scheduler running. `tweak` adjusts the configuration
    /// before anything starts.
    pub async fn start_with_ota(
        gateways: usize,
        tweak: impl FnOnce(&mut Config),
    ) -> anyhow::Result<(Cluster, OtaStack)> {
        Self::start_with_ota_clock(gateways, Arc::new(SystemClock), tweak).await
    }

    /// As [`Cluster::start_with_ota`], with the scheduler reading time from
    /// `clock` (a `ManualClock` drives maintenance windows without sleeps).
    pub async fn start_with_ota_clock(
        gateways: usize,
        clock: Arc<dyn Clock>,
        tweak: impl FnOnce(&mut Config),
    ) -> anyhow::Result<(Cluster, OtaStack)> {
        let redis = LocalRedis::start_with_users(RedisData::Ephemeral, Admin::Open)?;
        let mut config = test_config(&redis.url());
        config.ota.tick_ms = 100;
        tweak(&mut config);
        let ota_listener = TcpListener::bind("127.0.0.1:0").await?;
        let ota = ota_listener.local_addr()?;
        config.gateway.ota_url = format!("http://{ota}");
        let cluster = Cluster::start_with(redis, config, gateways).await?;
        let mut config = cluster.config.clone();
        config.signer.keyvault_url = format!("http://{}", cluster.keyvault);
        config.ota.gateway_url = format!("http://{}", cluster.gateways[0].grpc);
        let signer_listener = TcpListener::bind("127.0.0.1:0").await?;
        let signer = signer_listener.local_addr()?;
        config.ota.signer_url = format!("http://{signer}");
        let (signer_trigger, signer_shutdown) = Shutdown::new();
        let signer_task = tokio::spawn(trellis_signer::serve_with_listener(
            as_user(&cluster.redis, &config, RedisUser::Signer),
            signer_listener,
            signer_shutdown,
        ));
        let mut stack = OtaStack {
            signer,
            ota,
            config: as_user(&cluster.redis, &config, RedisUser::Ota),
            signer_trigger: Some(signer_trigger),
            signer_task: Some(signer_task),
            ota_trigger: None,
            ota_task: None,
            clock,
        };
        stack.start_ota_on(ota_listener);
        Ok((cluster, stack))
    }
}

impl OtaStack {
    fn start_ota_on(&mut self, listener: TcpListener) {
        let (trigger, shutdown) = Shutdown::new();
        self.ota_trigger = Some(trigger);
        let parts = match self.parts() {
            Ok(parts) => parts,
            Err(e) => {
                self.ota_task = Some(tokio::spawn(async move { Err(e) }));
                return;
            }
        };
        self.ota_task = Some(tokio::spawn(trellis_ota::serve_with_parts(
            self.config.clone(),
            listener,
            parts,
            shutdown,
        )));
    }

    /// What `trellis ota` runs with (real gateway, signer and approval
    /// clients), except for the clock.
    fn parts(&self) -> anyhow::Result<Parts> {
        Ok(Parts {
            clock: Arc::clone(&self.clock),
            deliverer: Arc::new(GatewayDeliverer::new(&self.config.ota.gateway_url, None)?),
            approver: Arc::new(HttpApprover::from_config(&self.config)?),
            releases: Arc::new(SignerReleases::new(&self.config.ota.signer_url, None)?),
        })
    }

    /// Stops the scheduler and waits until it has.
    pub async fn stop_ota(&mut self) {
        if let Some(t) = self.ota_trigger.take() {
            t.trigger();
        }
        if let Some(task) = self.ota_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }

    /// Starts a new scheduler on the same address.
    pub async fn start_ota(&mut self) -> anyhow::Result<()> {
        let listener = TcpListener::bind(self.ota).await?;
        self.start_ota_on(listener);
        Ok(())
    }

    pub async fn signer_client(&self) -> anyhow::Result<SignerClient<Channel>> {
        let url = format!("http://{}", self.signer);
        for _ in 0..100 {
            if let Ok(c) = SignerClient::connect(url.clone()).await {
                return Ok(c);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(SignerClient::connect(url).await?)
    }

    pub async fn ota_client(&self) -> anyhow::Result<OtaClient<Channel>> {
        let url = format!("http://{}", self.ota);
        for _ in 0..100 {
            if let Ok(c) = OtaClient::connect(url.clone()).await {
                return Ok(c);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(OtaClient::connect(url).await?)
    }

    pub async fn stop(mut self) {
        self.stop_ota().await;
        if let Some(t) = self.signer_trigger.take() {
            t.trigger();
        }
        if let Some(task) = self.signer_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

/// The two release keys of the threat model: the customer's, which never
/// touches the cloud, and the cloud's, which never leaves keyvault.
pub struct ReleaseKeys {
    pub customer: rsa::PrivateKey,
    pub cloud_pem: String,
    pub policy: TrustPolicy,
}

impl ReleaseKeys {
    /// Makes a customer key, reads the cloud release key from keyvault,
    /// and sets "both must sign" as `product`'s signing policy.
    pub async fn provision(
        cluster: &Cluster,
        stack: &OtaStack,
        products: &[u32],
    ) -> anyhow::Result<Self> {
        let customer =
            tokio::task::spawn_blocking(|| rsa::PrivateKey::new(&mut rand::rng(), 2048)).await??;
        let cloud_pem = cluster
            .keyvault_client()
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
        let mut signer = stack.signer_client().await?;
        for &product in products {
            signer
                .set_policy(SetPolicyRequest {
                    policy: Some(SigningPolicy {
                        product_id: product,
                        keys: vec![
                            PolicyKey {
                                name: "customer".into(),
                                public_key_pem: trellis_firmware::public_key_to_pem(&customer_pub)?,
                                key_id: String::new(),
                            },
                            PolicyKey {
                                name: "cloud-release".into(),
                                public_key_pem: cloud_pem.clone(),
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
        }
        Ok(Self {
            customer,
            cloud_pem,
            policy,
        })
    }
}

/// Who signs a test release.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Signers {
    Both,
    CloudOnly,
}

/// Uploads `image` and creates release `product`-`version` from it,
/// unsigned: the signer's answer (manifest bytes included).
pub async fn upload_release(
    stack: &OtaStack,
    product: u32,
    version: u32,
    image: &[u8],
) -> anyhow::Result<Release> {
    let mut signer = stack.signer_client().await?;
    let mut parts = vec![UploadImageRequest {
        part: Some(Part::Header(UploadImageHeader {
            product_id: product,
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
    Ok(signer
        .create_release(CreateReleaseRequest {
            product_id: product,
            version,
            image_sha256: uploaded.sha256.clone(),
        })
        .await?
        .into_inner())
}

/// A recognisable image of `size` bytes for product/version.
pub fn test_image(product: u32, version: u32, size: usize) -> Vec<u8> {
    let mut image =
        format!("test firmware for product {product}, version {version}\n").into_bytes();
    let mut x = product.wrapping_mul(2654435761) ^ version;
    while image.len() < size {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        image.push(x as u8);
    }
    image.truncate(size);
    image
}

/// Uploads `image`, creates release product-version and signs it as told.
/// Returns (release id, image SHA-256 hex).
pub async fn make_release(
    stack: &OtaStack,
    keys: &ReleaseKeys,
    product: u32,
    version: u32,
    image: &[u8],
    signers: Signers,
) -> anyhow::Result<(String, String)> {
    let release = upload_release(stack, product, version, image).await?;
    let mut signer = stack.signer_client().await?;
    if signers == Signers::Both {
        let manifest = release
            .signed
            .as_ref()
            .map(|s| s.manifest.clone())
            .context("release without manifest")?;
        let signature = sign_manifest(&keys.customer, &manifest)?;
        signer
            .add_signature(AddSignatureRequest {
                release_id: release.release_id.clone(),
                signature: Some(signature),
            })
            .await?;
    }
    signer
        .sign_release(SignReleaseRequest {
            release_id: release.release_id.clone(),
        })
        .await?;
    Ok((release.release_id, release.image_sha256))
}

/// A simulated fleet and what its devices report.
pub struct Fleet {
    pub devices: Vec<DeviceIdentity>,
    pub reports: Arc<std::sync::Mutex<Vec<DeviceReport>>>,
    stop: CancellationToken,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// Provisions `n` devices of `product` (keys made now) and runs them
    /// against `endpoints` (tried in order) with `config`.
    pub async fn start(
        cluster: &Cluster,
        n: usize,
        product: u32,
        config: SimConfig,
        endpoints: Vec<String>,
    ) -> anyhow::Result<Self> {
        let mut devices = Vec::with_capacity(n);
        for _ in 0..n {
            devices.push(cluster.provision(product).await?);
        }
        Ok(Self::run(devices, config, endpoints))
    }

    pub fn run(devices: Vec<DeviceIdentity>, config: SimConfig, endpoints: Vec<String>) -> Self {
        let stop = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let fleet =
            trellis_device::sim::run_fleet(devices.clone(), config, endpoints, stop.clone(), tx);
        let reports = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&reports);
        let handle = tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                if let Ok(mut v) = sink.lock() {
                    v.push(r);
                }
            }
            let _ = fleet.await;
        });
        Self {
            devices,
            reports,
            stop,
            handle: Some(handle),
        }
    }

    pub fn ids(&self) -> Vec<String> {
        self.devices
            .iter()
            .map(|d| d.device_id.to_string())
            .collect()
    }

    /// How many times each device reported applying an update.
    pub fn applied_count(&self, device: &str) -> usize {
        self.reports
            .lock()
            .map(|v| {
                v.iter()
                    .filter(|r| {
                        matches!(r, DeviceReport::Disconnected { device_id, reason }
                        if device_id.to_string() == device && reason.starts_with("update applied"))
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(h) = self.handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
        }
    }
}

/// A device configuration for product `product` running `version` of
/// [`test_image`], trusting `policy`.
pub fn device_config(product: u32, version: u32, policy: &TrustPolicy) -> SimConfig {
    SimConfig {
        product_id: u16::try_from(product).unwrap_or(u16::MAX),
        firmware_version: u16::try_from(version).unwrap_or(u16::MAX),
        firmware_image: test_image(product, version, 4096),
        event_interval: None,
        keepalive: Duration::from_secs(5),
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_secs(2),
        trust_policy: Some(policy.clone()),
        ..SimConfig::default()
    }
}

/// Every online device's state, as a gateway lists it.
pub async fn device_states(cluster: &Cluster) -> anyhow::Result<Vec<DeviceState>> {
    Ok(cluster
        .gateway_client(0)
        .await?
        .list_devices(ListDeviceStatesRequest {
            product_id: 0,
            online_only: true,
        })
        .await?
        .into_inner()
        .devices)
}

/// Waits until all `ids` are online (on any gateway).
pub async fn all_online(cluster: &Cluster, ids: &[String], within: Duration) -> anyhow::Result<()> {
    crate::eventually(within, "every device online", || async {
        let states = device_states(cluster).await.ok()?;
        let online = ids
            .iter()
            .filter(|id| states.iter().any(|s| &s.device_id == *id))
            .count();
        (online == ids.len()).then_some(())
    })
    .await
}

/// Polls a rollout until it reaches one of `states`.
pub async fn rollout_until(
    stack: &OtaStack,
    rollout_id: &str,
    states: &[RolloutState],
    within: Duration,
) -> anyhow::Result<RolloutStatus> {
    let mut ota = stack.ota_client().await?;
    let started = std::time::Instant::now();
    loop {
        let s = ota
            .get_rollout(GetRolloutRequest {
                rollout_id: rollout_id.to_string(),
            })
            .await?
            .into_inner();
        if states.contains(&s.state()) {
            return Ok(s);
        }
        if started.elapsed() > within {
            bail!(
                "rollout {rollout_id} is {:?} after {within:?} (wanted {states:?}): {} {:?}",
                s.state(),
                s.message,
                s.stages
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a [`Proxy`] does to the gateway-to-device direction.
#[derive(Debug, Clone, Copy)]
pub enum ProxyMode {
    /// Pass bytes through unchanged.
    Clean,
    /// Flip one byte inside the ciphertext of the first `n` firmware
    /// chunks (frames over 300 bytes after the first, UpdateBegin), away from the first and last
    /// AES blocks so the CoAP header and padding survive.
    TamperChunks(u64),
    /// At most this many bytes per second towards the device.
    Throttle(u64),
}

/// A TCP proxy between devices and one gateway, on loopback.
pub struct Proxy {
    pub addr: SocketAddr,
    pub tampered: Arc<AtomicU64>,
    pub bytes_to_device: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr, mode: ProxyMode) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let tampered = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, b, s) = (tampered.clone(), bytes.clone(), stop.clone());
        let task = tokio::spawn(async move {
            while let Ok((device, _)) = listener.accept().await {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(gateway) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (t, b) = (t.clone(), b.clone());
                tokio::spawn(async move {
                    let (mut dr, mut dw) = device.into_split();
                    let (mut gr, mut gw) = gateway.into_split();
                    let up = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut dr, &mut gw).await;
                        let _ = gw.shutdown().await;
                    });
                    let _ = down(&mut gr, &mut dw, mode, &t, &b).await;
                    let _ = dw.shutdown().await;
                    up.abort();
                });
            }
        });
        Ok(Self {
            addr,
            tampered,
            bytes_to_device: bytes,
            stop,
            task,
        })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.abort();
    }
}

/// Gateway → device: frame by frame (u16 length prefix), so a tamper
/// lands inside one frame.
async fn down(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    mode: ProxyMode,
    tampered: &AtomicU64,
    bytes: &AtomicU64,
) -> std::io::Result<()> {
    // The handshake's nonce (40 bytes) and reply (384 bytes) are not
    // length-prefixed; the device must see the nonce before it says
    // anything, so each goes through on its own.
    for size in [40, 384] {
        let mut raw = vec![0u8; size];
        from.read_exact(&mut raw).await?;
        to.write_all(&raw).await?;
        bytes.fetch_add(size as u64, Ordering::Relaxed);
    }
    let mut big_frames = 0u64;
    loop {
        let mut buf = vec![0u8; 2];
        from.read_exact(&mut buf).await?;
        let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
        let mut frame = vec![0u8; len];
        from.read_exact(&mut frame).await?;
        if len > 300 {
            big_frames += 1;
        }
        // The first big frame of a transfer is UpdateBegin (the signed
        // manifest); chunks follow.
        if let ProxyMode::TamperChunks(n) = mode
            && len > 300
            && big_frames > 1
            && tampered.load(Ordering::Relaxed) < n
        {
            frame[len - 48] ^= 0x5a;
            tampered.fetch_add(1, Ordering::Relaxed);
        }
        buf.extend_from_slice(&frame);
        if let ProxyMode::Throttle(per_sec) = mode {
            let wait = buf.len() as f64 / per_sec.max(1) as f64;
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
        to.write_all(&buf).await?;
        bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
    }
}

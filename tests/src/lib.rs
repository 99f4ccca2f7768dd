//! Shared fixtures for the end-to-end tests: a real redis-server on a free
//! port, keyvault and gateways serving real gRPC and device TCP on loopback,
//! device keys generated at test time, and a raw device client for sending
//! bad input on purpose.
pub mod ota;

use anyhow::{Context, bail};
use rsa::pkcs8::{DecodePublicKey, EncodePublicKey};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;
use trellis_core::Shutdown;
use trellis_core::config::Config;
use trellis_core::local_redis::{Admin, LocalRedis, RedisData};
use trellis_core::redis_conn::acl::RedisUser;
use trellis_core::redis_conn::{self, Redis};
use trellis_core::shutdown::ShutdownTrigger;
use trellis_device::identity::DeviceIdentity;
use trellis_proto::v1::device_service_client::DeviceServiceClient;
use trellis_proto::v1::key_vault_client::KeyVaultClient;
use trellis_proto::v1::*;
use trellis_wire::DeviceId;
use trellis_wire::coap::CoapMessage;
use trellis_wire::frame::SessionCipher;
use trellis_wire::handshake::DeviceHandshake;

pub struct GatewayAddrs {
    pub id: String,
    pub devices: SocketAddr,
    pub grpc: SocketAddr,
}

/// Keyvault plus N gateways, in this process, on loopback, sharing one
/// real redis-server.
pub struct Cluster {
    pub redis: LocalRedis,
    pub config: Config,
    pub keyvault: SocketAddr,
    pub gateways: Vec<GatewayAddrs>,
    pub cloud_public_key: rsa::PublicKey,
    trigger: Option<ShutdownTrigger>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// `config` with `user`'s Redis URL when `redis` has per-service users
/// (each service in a test then works with its own keys only, as in
/// production), else unchanged.
pub fn as_user(redis: &LocalRedis, config: &Config, user: RedisUser) -> Config {
    let mut c = config.clone();
    if c.redis.url.as_deref() == Some(redis.url().as_str()) {
        c.redis.url = Some(redis.url_for(user));
    }
    c
}

/// A configuration suited to tests: short timeouts so refusals show fast.
pub fn test_config(redis_url: &str) -> Config {
    let mut c = Config::default();
    // These tests are about devices and sessions; auth has its own.
    c.auth.mode = trellis_core::config::AuthMode::Off;
    c.tls.mode = trellis_core::config::TlsMode::Off;
    c.redis.url = Some(redis_url.to_string());
    c.keyvault.master_key = Some(hex::encode(rand::random::<[u8; 32]>()));
    c.keyvault.workers = 2;
    c.gateway.handshake_step_timeout_ms = 2_000;
    c.gateway.handshake_timeout_ms = 5_000;
    c.gateway.keepalive_secs = 15;
    c.gateway.command_timeout_ms = 5_000;
    c
}

impl Cluster {
    pub async fn start(gateways: usize) -> anyhow::Result<Self> {
        let redis = LocalRedis::start_with_users(RedisData::Ephemeral, Admin::Open)?;
        let config = test_config(&redis.url());
        Self::start_with(redis, config, gateways).await
    }

    /// A cluster on a fresh redis-server with [`test_config`] adjusted by
    /// `tweak` before anything starts.
    pub async fn start_configured(
        gateways: usize,
        tweak: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Self> {
        let redis = LocalRedis::start_with_users(RedisData::Ephemeral, Admin::Open)?;
        let mut config = test_config(&redis.url());
        tweak(&mut config);
        Self::start_with(redis, config, gateways).await
    }

    pub async fn start_with(
        redis: LocalRedis,
        mut config: Config,
        gateways: usize,
    ) -> anyhow::Result<Self> {
        std::mem::forget(trellis_core::telemetry::init("tests", &config));
        let (trigger, shutdown) = Shutdown::new();
        let mut tasks = Vec::new();
        let kv_listener = TcpListener::bind("127.0.0.1:0").await?;
        let keyvault = kv_listener.local_addr()?;
        tasks.push(tokio::spawn(trellis_keyvault::serve_with_listener(
            as_user(&redis, &config, RedisUser::Keyvault),
            kv_listener,
            shutdown.clone(),
        )));
        config.gateway.keyvault_url = format!("http://{keyvault}");
        let mut addrs = Vec::new();
        for n in 0..gateways {
            let mut c = as_user(&redis, &config, RedisUser::Gateway);
            c.gateway.id = format!("gw-{}", n + 1);
            let devices = trellis_gateway::bind_device_listener("127.0.0.1:0").await?;
            let grpc = TcpListener::bind("127.0.0.1:0").await?;
            addrs.push(GatewayAddrs {
                id: c.gateway.id.clone(),
                devices: devices.local_addr()?,
                grpc: grpc.local_addr()?,
            });
            tasks.push(tokio::spawn(trellis_gateway::serve_with_listeners(
                c,
                devices,
                grpc,
                shutdown.clone(),
            )));
        }
        let mut kv = connect_keyvault(keyvault).await?;
        let cloud = kv
            .get_cloud_public_key(GetCloudPublicKeyRequest {})
            .await?
            .into_inner();
        let cloud_public_key = rsa::PublicKey::from_public_key_der(&cloud.public_key_der)?;
        Ok(Self {
            redis,
            config,
            keyvault,
            gateways: addrs,
            cloud_public_key,
            trigger: Some(trigger),
            tasks,
        })
    }

    /// A gateway of another region: its own Redis for sessions and routing,
    /// this cluster's Redis as the durable store both regions share (as the
    /// gateway's Redis user), the same keyvault. Returns its device address,
    /// its regional Redis and what stops it.
    pub async fn gateway_in_region(
        &self,
        region: &str,
    ) -> anyhow::Result<(SocketAddr, LocalRedis, ShutdownTrigger)> {
        let regional = LocalRedis::start_with_users(RedisData::Ephemeral, Admin::Open)?;
        let mut config = self.config.clone();
        config.region = region.into();
        config.redis.durable_url = Some(self.redis.url_for(RedisUser::Gateway));
        config.redis.url = Some(regional.url_for(RedisUser::Gateway));
        config.gateway.id = format!("gw-{region}");
        config.gateway.keyvault_url = format!("http://{}", self.keyvault);
        let devices = trellis_gateway::bind_device_listener("127.0.0.1:0").await?;
        let grpc = TcpListener::bind("127.0.0.1:0").await?;
        let addr = devices.local_addr()?;
        let (trigger, shutdown) = Shutdown::new();
        tokio::spawn(trellis_gateway::serve_with_listeners(
            config, devices, grpc, shutdown,
        ));
        Ok((addr, regional, trigger))
    }

    pub async fn keyvault_client(&self) -> anyhow::Result<KeyVaultClient<Channel>> {
        connect_keyvault(self.keyvault).await
    }

    pub async fn gateway_client(&self, n: usize) -> anyhow::Result<DeviceServiceClient<Channel>> {
        let url = format!("http://{}", self.gateways[n].grpc);
        for _ in 0..100 {
            if let Ok(c) = DeviceServiceClient::connect(url.clone()).await {
                return Ok(c);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(DeviceServiceClient::connect(url).await?)
    }

    pub async fn redis(&self) -> anyhow::Result<Redis> {
        Ok(redis_conn::connect(&self.redis.url()).await?)
    }

    /// Makes a device key at test time and registers it.
    pub async fn provision(&self, product: u32) -> anyhow::Result<DeviceIdentity> {
        let identity = self.unregistered_identity()?;
        self.register(&identity, product).await?;
        Ok(identity)
    }

    /// A freshly registered device (product 1) in session on the first
    /// gateway: handshake, Hello sent, the server's Hello read. Returns the
    /// device and its id.
    pub async fn device_in_session(&self) -> anyhow::Result<(RawDevice, String)> {
        let identity = self.provision(1).await?;
        let mut dev = RawDevice::connect(self.gateways[0].devices, &identity).await?;
        dev.hello(identity.device_id, [1; 32]).await?;
        dev.recv(Duration::from_secs(5))
            .await?
            .expect("server hello");
        Ok((dev, identity.device_id.to_string()))
    }

    pub fn unregistered_identity(&self) -> anyhow::Result<DeviceIdentity> {
        Ok(DeviceIdentity {
            device_id: DeviceId(rand::random()),
            private_key: trellis_device::identity::generate_device_key(&mut rand::rng())?,
            cloud_public_key: self.cloud_public_key.clone(),
        })
    }

    pub async fn register(&self, identity: &DeviceIdentity, product: u32) -> anyhow::Result<()> {
        let der = identity.private_key.to_public_key().to_public_key_der()?;
        self.keyvault_client()
            .await?
            .register_device(RegisterDeviceRequest {
                device_id: identity.device_id.to_string(),
                product_id: product,
                public_key: der.as_bytes().to_vec(),
                organization: String::new(),
            })
            .await?;
        Ok(())
    }

    /// Audit records (oldest first) for a device, or all when `None`.
    pub async fn audit(
        &self,
        device: Option<&str>,
    ) -> anyhow::Result<Vec<trellis_core::audit::AuditRecord>> {
        let mut r = self.redis().await?;
        Ok(trellis_core::audit::recent(&mut r, 1000, device).await?)
    }

    /// Refused-handshake aggregates (most recent first), optionally those
    /// whose last attempt claimed `device`.
    pub async fn refusals(
        &self,
        device: Option<&str>,
    ) -> anyhow::Result<Vec<trellis_core::audit::Refusal>> {
        let mut r = self.redis().await?;
        Ok(trellis_core::audit::refusals(&mut r, 1000, device).await?)
    }

    pub async fn stop(mut self) {
        if let Some(t) = self.trigger.take() {
            t.trigger();
        }
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

pub async fn connect_keyvault(addr: SocketAddr) -> anyhow::Result<KeyVaultClient<Channel>> {
    let url = format!("http://{addr}");
    for _ in 0..100 {
        if let Ok(mut c) = KeyVaultClient::connect(url.clone()).await
            && c.get_cloud_public_key(GetCloudPublicKeyRequest {})
                .await
                .is_ok()
        {
            return Ok(c);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("keyvault at {addr} did not come up")
}

/// Polls `check` until it returns Some or `within` passes.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if start.elapsed() > within {
            bail!("timed out after {:?} waiting for {what}", within);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A device that speaks the protocol by hand, so tests can send exactly the
/// bytes they want: replays, skipped ids, oversized frames.
pub struct RawDevice {
    pub stream: TcpStream,
    /// The session key and IV as hex, so tests can check they never leak
    /// into logs or spans.
    pub session_secrets_hex: Vec<String>,
    pub cipher: SessionCipher,
    pub next_id: u16,
    buf: Vec<u8>,
}

impl RawDevice {
    /// Connects and completes the handshake.
    pub async fn connect(addr: SocketAddr, identity: &DeviceIdentity) -> anyhow::Result<Self> {
        Self::handshake(TcpStream::connect(addr).await?, identity).await
    }

    /// Connects from a chosen source address (any 127.0.0.0/8 address works
    /// on Linux loopback), so one test can play devices on several hosts.
    pub async fn connect_from(
        addr: SocketAddr,
        source: std::net::IpAddr,
        identity: &DeviceIdentity,
    ) -> anyhow::Result<Self> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        Self::handshake(socket.connect(addr).await?, identity).await
    }

    /// Completes the handshake on a connected stream.
    pub async fn handshake(
        mut stream: TcpStream,
        identity: &DeviceIdentity,
    ) -> anyhow::Result<Self> {
        let mut nonce = [0u8; 40];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut nonce))
            .await
            .context("no nonce")??;
        let mut hs = DeviceHandshake::new(
            identity.device_id,
            identity.private_key.clone(),
            identity.cloud_public_key.clone(),
            true,
        );
        let out = hs.on_nonce(&nonce, &mut rand::rng())?;
        stream.write_all(&out).await?;
        let mut reply = [0u8; 384];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut reply))
            .await
            .context("no handshake reply")??;
        let material = hs.on_reply(&reply)?;
        let next_id = u16::from_be_bytes([material.salt[0], material.salt[1]]).wrapping_add(1);
        let cipher = SessionCipher::new(&material, trellis_wire::DEFAULT_MAX_FRAME_LEN);
        let session_secrets_hex = vec![hex::encode(material.key), hex::encode(material.iv)];
        Ok(Self {
            stream,
            session_secrets_hex,
            cipher,
            next_id,
            buf: vec![0u8; 4096],
        })
    }

    pub fn take_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// Encrypts and sends one message; returns the frame bytes sent.
    pub async fn send(&mut self, msg: &CoapMessage) -> anyhow::Result<Vec<u8>> {
        let frame = self.cipher.encoder.encode(&msg.encode());
        self.stream.write_all(&frame).await?;
        Ok(frame)
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Sends the Trellis Hello with a firmware SHA-256.
    pub async fn hello(&mut self, device_id: DeviceId, sha: [u8; 32]) -> anyhow::Result<()> {
        let hello = trellis_wire::hello::Hello {
            product_id: 1,
            firmware_version: 3,
            reserved: 0,
            flags: 0,
            platform_id: 6,
            device_id: Some(device_id),
            firmware_sha256: Some(sha),
            command_policy: None,
            trust_policy: None,
            cloud_key_version: None,
        };
        let id = self.take_id();
        self.send(&trellis_wire::message::hello_device(id, &hello))
            .await?;
        Ok(())
    }

    /// Next message from the cloud, or None when the connection closed.
    pub async fn recv(&mut self, within: Duration) -> anyhow::Result<Option<CoapMessage>> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(plain) = self.cipher.decoder.next_message()? {
                return Ok(Some(CoapMessage::decode(&plain)?));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let n = match tokio::time::timeout(left, self.stream.read(&mut self.buf)).await {
                Err(_) => bail!("no message within {within:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(n)) => n,
            };
            let data = self.buf[..n].to_vec();
            self.cipher.decoder.push(&data);
        }
    }

    /// True when the gateway closes the connection within `within`.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.read(&mut self.buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
            }
        }
    }
}

/// True when the peer closes `stream` within `within`, reading and
/// discarding whatever it sends first.
pub async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

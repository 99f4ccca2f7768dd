//! The system under test as real processes: a `redis-server` (LocalRedis),
//! `trellis keyvault` and one or more `trellis gateway`, each configured
//! only through `TRELLIS_*` variables, on loopback ports chosen here. Being
//! separate processes is what lets every benchmark read each one's RSS and
//! CPU time from /proc instead of estimating them.
use anyhow::{Context, bail};
use rsa::pkcs8::{DecodePublicKey, EncodePublicKey};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use trellis_core::local_redis::{LocalRedis, RedisData, free_port};
use trellis_core::telemetry::{TraceInterceptor, TracedChannel};
use trellis_core::tls::{Role, ServiceTls};
use trellis_proto::v1::device_service_client::DeviceServiceClient;
use trellis_proto::v1::key_vault_client::KeyVaultClient;
use trellis_proto::v1::{GetCloudPublicKeyRequest, RegisterDeviceRequest};
use trellis_wire::DeviceId;

/// Where `trellis` is: `--trellis-bin`, `$TRELLIS_BIN`, or beside this binary
/// (cargo puts both in target/release).
pub fn trellis_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("TRELLIS_BIN") {
            Some(p) => PathBuf::from(p),
            None => std::env::current_exe()?
                .parent()
                .context("this binary has no directory")?
                .join("trellis"),
        },
    };
    if !path.exists() {
        bail!(
            "{} does not exist: build it with `cargo build --release -p trellis` (or pass --trellis-bin)",
            path.display()
        );
    }
    Ok(path)
}

/// Settings a `TRELLIS_*` variable may name: the keys of the default
/// configuration. The bench and the `trellis` binary come from one tree, so
/// a setting that this tree does not have yet is left out rather than
/// refused by the service as an unknown key.
fn known_setting(section: &str, key: &str) -> bool {
    serde_json::to_value(trellis_core::Config::default())
        .ok()
        .and_then(|v| v.get(section).and_then(|s| s.get(key)).map(|_| ()))
        .is_some()
}

/// One child process with its log file.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// A child started elsewhere (e.g. HAProxy), killed on drop like ours.
    pub fn from_child(name: &str, child: Child, log: PathBuf) -> Self {
        Self {
            name: name.into(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "{} exited ({status}); its log {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log)
            )),
            _ => None,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

pub struct GatewayProc {
    pub id: String,
    pub devices: SocketAddr,
    pub grpc: SocketAddr,
    pub proc: Proc,
}

pub struct ClusterOptions {
    pub gateways: usize,
    /// Keyvault processes (at least 1); gateway n uses keyvault n mod this.
    pub keyvaults: usize,
    pub keepalive_secs: u64,
    pub log: String,
    pub trellis_bin: Option<PathBuf>,
    /// Also run `trellis signer` (firmware images and signed releases).
    pub signer: bool,
    /// Extra settings for every gateway (`TRELLIS_GATEWAY__*` variables).
    pub gateway_env: Vec<(String, String)>,
    /// Keep the gateway's shipped handshake admission limits (otherwise
    /// lifted, to measure what the gateway can do).
    pub admission: bool,
    /// Access control on, as shipped: mutual TLS between every process
    /// (certificates from a CA made for the run) and `auth.mode =
    /// "tokens"`: the services check every caller, a service is its
    /// certificate's role, this process calls with the operator
    /// certificate and an owner's token. Off: `auth.mode = "off"` and
    /// `tls.mode = "off"`.
    pub auth: bool,
}

/// Redis + keyvault + gateways, all children of this process, killed on drop.
pub struct Cluster {
    // Field order is drop order: gateways first, Redis last.
    pub gateways: Vec<GatewayProc>,
    /// `trellis signer` and its gRPC address, when asked for.
    pub signer: Option<(Proc, SocketAddr)>,
    pub keyvault: Proc,
    pub keyvault_addr: SocketAddr,
    /// Keyvaults beyond the first (`ClusterOptions::keyvaults`).
    pub more_keyvaults: Vec<(Proc, SocketAddr)>,
    pub redis: LocalRedis,
    pub cloud_public_key: rsa::PublicKey,
    /// Holds the processes' logs while they run.
    _dir: tempfile::TempDir,
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

impl Cluster {
    pub async fn start(opts: &ClusterOptions) -> anyhow::Result<Self> {
        let bin = trellis_binary(opts.trellis_bin.as_deref())?;
        let dir = tempfile::Builder::new()
            .prefix("trellis-bench-")
            .tempdir()?;
        let redis = LocalRedis::start(RedisData::Ephemeral)?;
        let master_key = hex::encode(rand::random::<[u8; 32]>());
        let tls_dir = dir.path().join("tls");
        if opts.auth {
            mint_owner_token(&redis.url()).await?;
            trellis_auth::pki::ensure_dev_pki(&tls_dir)?;
            let files = trellis_core::tls::files_in(&tls_dir, Role::Operator);
            trellis_core::tls::set_operator(Ok(Some(ServiceTls::from_files(
                &files,
                Role::Operator,
            )?)));
        } else {
            trellis_core::telemetry::set_operator_credential(None).map_err(anyhow::Error::msg)?;
            trellis_core::tls::set_operator(Ok(None));
        }
        let common = |name: &str| -> anyhow::Result<Command> {
            let mut cmd = Command::new(&bin);
            // Only what this run sets: no stray trellis.toml, no TRELLIS_* of ours.
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("TRELLIS_") {
                    cmd.env_remove(k);
                }
            }
            cmd.current_dir(dir.path())
                .env("TRELLIS_REDIS__URL", redis.url())
                .env("TRELLIS_TELEMETRY__LOG", &opts.log)
                .stdin(Stdio::null());
            if opts.auth {
                // Every check on, but not the per-token rate limit: the
                // load generator is one token by design.
                cmd.env("TRELLIS_TLS__DIR", &tls_dir)
                    .env("TRELLIS_AUTH__TOKEN_RATE", "0");
            } else {
                cmd.env("TRELLIS_AUTH__MODE", "off")
                    .env("TRELLIS_TLS__MODE", "off");
            }
            if known_setting("telemetry", "admin_listen") {
                // Off: several gateways would fight over the default port.
                cmd.env("TRELLIS_TELEMETRY__ADMIN_LISTEN", "");
            }
            let log = dir.path().join(format!("{name}.log"));
            let f = std::fs::File::create(&log)?;
            cmd.stdout(f.try_clone()?).stderr(f);
            Ok(cmd)
        };

        let start_keyvault = |name: &str| -> anyhow::Result<(Proc, SocketAddr)> {
            let addr = loopback(free_port()?);
            let mut cmd = common(name)?;
            cmd.arg("keyvault")
                .env("TRELLIS_KEYVAULT__LISTEN", addr.to_string())
                .env("TRELLIS_KEYVAULT__MASTER_KEY", &master_key);
            let proc = Proc {
                name: name.into(),
                child: cmd.spawn().context("cannot start trellis keyvault")?,
                log: dir.path().join(format!("{name}.log")),
            };
            Ok((proc, addr))
        };
        let (mut keyvault, keyvault_addr) = start_keyvault("keyvault")?;
        let mut kv = wait_keyvault(keyvault_addr, &mut keyvault).await?;
        // The first keyvault made the cloud key; the others open it.
        let mut more_keyvaults = Vec::new();
        for n in 2..=opts.keyvaults.max(1) {
            let (mut proc, addr) = start_keyvault(&format!("keyvault-{n}"))?;
            wait_keyvault(addr, &mut proc).await?;
            more_keyvaults.push((proc, addr));
        }
        let keyvault_addrs: Vec<SocketAddr> = std::iter::once(keyvault_addr)
            .chain(more_keyvaults.iter().map(|(_, a)| *a))
            .collect();
        let cloud = kv
            .get_cloud_public_key(GetCloudPublicKeyRequest {})
            .await?
            .into_inner();
        let cloud_public_key = rsa::PublicKey::from_public_key_der(&cloud.public_key_der)?;

        let signer = if opts.signer {
            let addr = loopback(free_port()?);
            let mut cmd = common("signer")?;
            cmd.arg("signer")
                .env("TRELLIS_SIGNER__LISTEN", addr.to_string())
                .env(
                    "TRELLIS_SIGNER__KEYVAULT_URL",
                    format!("http://{keyvault_addr}"),
                );
            let mut proc = Proc {
                name: "signer".into(),
                child: cmd.spawn().context("cannot start trellis signer")?,
                log: dir.path().join("signer.log"),
            };
            wait_grpc(addr, &mut proc).await?;
            Some((proc, addr))
        } else {
            None
        };

        let mut gateways = Vec::new();
        for n in 0..opts.gateways {
            let id = format!("bench-gw-{}", n + 1);
            let devices = loopback(free_port()?);
            let grpc = loopback(free_port()?);
            let mut cmd = common(&id)?;
            cmd.arg("gateway")
                .env("TRELLIS_GATEWAY__ID", &id)
                .env("TRELLIS_GATEWAY__DEVICE_LISTEN", devices.to_string())
                .env("TRELLIS_GATEWAY__GRPC_LISTEN", grpc.to_string())
                .env(
                    "TRELLIS_GATEWAY__KEYVAULT_URL",
                    format!("http://{}", keyvault_addrs[n % keyvault_addrs.len()]),
                )
                .env(
                    "TRELLIS_GATEWAY__KEEPALIVE_SECS",
                    opts.keepalive_secs.to_string(),
                );
            for (k, v) in &opts.gateway_env {
                cmd.env(k, v);
            }
            if !opts.admission && known_setting("gateway", "handshake_rate") {
                // No admission limit: the benchmarks measure what the
                // gateway can do, not the rate it is configured to allow.
                cmd.env("TRELLIS_GATEWAY__HANDSHAKE_RATE", "0");
            }
            let mut proc = Proc {
                name: id.clone(),
                child: cmd.spawn().context("cannot start trellis gateway")?,
                log: dir.path().join(format!("{id}.log")),
            };
            wait_gateway(grpc, &mut proc).await?;
            gateways.push(GatewayProc {
                id,
                devices,
                grpc,
                proc,
            });
        }
        Ok(Self {
            gateways,
            signer,
            keyvault,
            keyvault_addr,
            more_keyvaults,
            redis,
            cloud_public_key,
            _dir: dir,
        })
    }

    pub async fn keyvault_client(&self) -> anyhow::Result<KeyVaultClient<TracedChannel>> {
        Ok(KeyVaultClient::new(
            operator_channel(self.keyvault_addr).await?,
        ))
    }

    pub async fn gateway_client(
        &self,
        n: usize,
    ) -> anyhow::Result<DeviceServiceClient<TracedChannel>> {
        Ok(DeviceServiceClient::new(
            operator_channel(self.gateways[n].grpc).await?,
        ))
    }

    /// Fails with the child's log when any process has died.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(e) = self.keyvault.exited() {
            bail!(e);
        }
        for (p, _) in &mut self.more_keyvaults {
            if let Some(e) = p.exited() {
                bail!(e);
            }
        }
        for g in &mut self.gateways {
            if let Some(e) = g.proc.exited() {
                bail!(e);
            }
        }
        if let Some((p, _)) = &mut self.signer
            && let Some(e) = p.exited()
        {
            bail!(e);
        }
        Ok(())
    }

    /// Registers `count` fresh random ids, all with the same public key
    /// (keyvault allows one key under many ids: only an id's key is unique),
    /// `concurrency` requests at a time.
    pub async fn register_many(
        &self,
        key: &rsa::PrivateKey,
        count: usize,
        concurrency: usize,
    ) -> anyhow::Result<Vec<DeviceId>> {
        let der = key.to_public_key().to_public_key_der()?.as_bytes().to_vec();
        let ids: Vec<DeviceId> = (0..count).map(|_| DeviceId(rand::random())).collect();
        let client = self.keyvault_client().await?;
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ids_shared = std::sync::Arc::new(ids);
        let mut tasks = Vec::new();
        for _ in 0..concurrency.max(1) {
            let mut client = client.clone();
            let der = der.clone();
            let next = next.clone();
            let ids = ids_shared.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(id) = ids.get(i) else {
                        return anyhow::Ok(());
                    };
                    client
                        .register_device(RegisterDeviceRequest {
                            device_id: id.to_string(),
                            product_id: 6,
                            public_key: der.clone(),
                            organization: String::new(),
                        })
                        .await
                        .with_context(|| format!("registering device {id}"))?;
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok(std::sync::Arc::try_unwrap(ids_shared).unwrap_or_else(|a| (*a).clone()))
    }
}

fn operator_endpoint(addr: SocketAddr) -> anyhow::Result<tonic::transport::Endpoint> {
    let tls = trellis_core::tls::operator().map_err(anyhow::Error::msg)?;
    trellis_core::tls::endpoint(&format!("http://{addr}"), tls.as_ref()).map_err(anyhow::Error::msg)
}

/// A channel whose calls carry this process's operator token (if any),
/// over mutual TLS when the cluster runs it.
pub async fn operator_channel(addr: SocketAddr) -> anyhow::Result<TracedChannel> {
    let channel = operator_endpoint(addr)?.connect().await?;
    Ok(tonic::service::interceptor::InterceptedService::new(
        channel,
        TraceInterceptor::OPERATOR,
    ))
}

/// Straight into Redis before any service starts, as `trellis up` does:
/// an owner's token for this process's calls (the services are their
/// certificates).
async fn mint_owner_token(redis_url: &str) -> anyhow::Result<()> {
    use trellis_auth::Role;
    use trellis_auth::store::{self, TokenRequest};
    let mut redis = trellis_core::redis_conn::connect(redis_url).await?;
    store::ensure_org(&mut redis, trellis_auth::DEFAULT_ORG).await?;
    let (owner, _) = store::create_token(
        &mut redis,
        TokenRequest {
            org: trellis_auth::DEFAULT_ORG,
            user: "bench",
            name: "bench operator",
            scopes: &Role::Owner.scopes(),
            expires_ms: 0,
        },
    )
    .await?;
    trellis_core::telemetry::set_operator_credential(Some(&owner.bearer))
        .map_err(anyhow::Error::msg)
}

async fn wait_keyvault(
    addr: SocketAddr,
    proc: &mut Proc,
) -> anyhow::Result<KeyVaultClient<TracedChannel>> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if let Some(e) = proc.exited() {
            bail!(e);
        }
        if let Ok(channel) = operator_channel(addr).await
            && let mut c = KeyVaultClient::new(channel)
            && c.get_cloud_public_key(GetCloudPublicKeyRequest {})
                .await
                .is_ok()
        {
            return Ok(c);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "keyvault did not come up within 30 s; log:\n{}",
        tail(&proc.log)
    )
}

/// Waits until something accepts TCP connections on `addr` (a gRPC server).
async fn wait_grpc(addr: SocketAddr, proc: &mut Proc) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if let Some(e) = proc.exited() {
            bail!(e);
        }
        if operator_endpoint(addr)?.connect().await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "{} did not come up within 30 s; log:\n{}",
        proc.name,
        tail(&proc.log)
    )
}

async fn wait_gateway(grpc: SocketAddr, proc: &mut Proc) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if let Some(e) = proc.exited() {
            bail!(e);
        }
        if DeviceServiceClient::connect(format!("http://{grpc}"))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "{} did not come up within 30 s; log:\n{}",
        proc.name,
        tail(&proc.log)
    )
}

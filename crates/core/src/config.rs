//! Configuration: built-in defaults, then `trellis.toml`, then `TRELLIS_*`
//! environment variables (`__` separates sections:
//! `TRELLIS_GATEWAY__DEVICE_LISTEN=0.0.0.0:5683`). Every key is documented in
//! the README; keep the two in step.
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where `trellis up` keeps its local Redis data and development master key.
    pub data_dir: PathBuf,
    /// The region this process serves (`cloud.region` in telemetry).
    pub region: String,
    pub redis: RedisConfig,
    pub keyvault: KeyvaultConfig,
    pub gateway: GatewayConfig,
    pub ota: OtaConfig,
    pub signer: SignerConfig,
    pub api: ApiConfig,
    pub webhooks: WebhooksConfig,
    pub telemetry: TelemetryConfig,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub keys: KeysConfig,
}

/// Key lifecycle (cloud key rotation, docs/protocol.md §6.7).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KeysConfig {
    /// `trellis keys retire cloud N` refuses (unless `--force`) while a
    /// device whose last Hello is within this many days holds version N or
    /// older, i.e. has not acknowledged a newer cloud key. A device that has
    /// been away longer is expected to need the documented recovery.
    pub retire_grace_days: u32,
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self {
            retire_grace_days: 30,
        }
    }
}

/// Whether services talk to each other over mutual TLS.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// Every gRPC hop is TLS and both ends show a certificate of the
    /// installation's CA; a service's role comes from its certificate.
    Mutual,
    /// Plaintext gRPC. Development only: every start logs a warning.
    Off,
}

/// Where a service finds the CA it trusts and its own certificate. Files
/// not named explicitly are looked up in `dir` (default `data_dir/tls`,
/// where `trellis up` and `trellis certs init` write them) by role:
/// `ca.crt`, `<role>.crt`, `<role>.key`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub mode: TlsMode,
    pub dir: Option<PathBuf>,
    /// The CA certificate (PEM) peers must chain to.
    pub ca_file: Option<PathBuf>,
    /// This service's certificate (PEM); only for a process running one
    /// service (`trellis serve`), as cert-manager's `tls.crt`.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM, mode 0600), as cert-manager's `tls.key`.
    pub key_file: Option<PathBuf>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            mode: TlsMode::Mutual,
            dir: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

/// How services check their callers (`trellis-auth`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Every RPC needs a token with the scope its access rule names.
    Tokens,
    /// Nobody is checked. Development only: every start logs a warning.
    Off,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// Requests per second one operator token may make (0: no limit);
    /// service credentials are not limited.
    pub token_rate: u32,
    /// Requests one operator token may make at once above the rate.
    pub token_burst: u32,
    /// The file holding this service's credential for the services it
    /// calls (`trellis token create --service gateway|signer|ota`).
    pub service_token_file: Option<PathBuf>,
    /// The credential itself (prefer the file).
    pub service_token: Option<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::Tokens,
            token_rate: 50,
            token_burst: 100,
            service_token_file: None,
            service_token: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`. Unset: `trellis up` starts a local redis-server.
    /// With regions: the region's own Redis (sessions, routing, events).
    pub url: Option<String>,
    /// Redis for durable records (device registry, sealed keys, images,
    /// releases, policies, rollouts, audit). Unset: `url`. With
    /// `sentinels` set it is only this region's copy (the local replica),
    /// read from while Sentinel knows no reachable primary.
    pub durable_url: Option<String>,
    /// Redis Sentinel addresses (`host:port`) that know the durable
    /// primary. Empty: no Sentinel, `durable_url` is the primary. A list,
    /// or one string with commas (`TRELLIS_REDIS__SENTINELS=a:26379,b:26379`).
    #[serde(deserialize_with = "list_or_commas")]
    pub sentinels: Vec<String>,
    /// The master name the sentinels monitor (`sentinel monitor NAME ...`).
    pub sentinel_master: String,
    /// How long a durable write waits for Sentinel to name a reachable
    /// primary (during a failover) before it fails with an error.
    pub failover_wait_ms: u64,
    /// The Redis ACL user this service connects as (`trellis redis acl`
    /// prints each service's rules). Unset: the user named in the URL, if
    /// any, else Redis's `default`.
    pub username: Option<String>,
    /// A file holding that user's password (a mounted Secret); read at
    /// start. Takes precedence over `password`.
    pub password_file: Option<PathBuf>,
    /// The password itself (development; prefer `password_file`).
    pub password: Option<String>,
    /// TLS to Redis (`rediss://` URLs): the CA that signed the Redis
    /// server's certificate (PEM). Unset: the system's trusted roots.
    pub tls_ca_file: Option<PathBuf>,
    /// A client certificate and key (PEM) for a Redis that asks for one
    /// (`tls-auth-clients yes`, redis-server's default with TLS on).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            durable_url: None,
            sentinels: Vec::new(),
            sentinel_master: "mymaster".into(),
            failover_wait_ms: 10_000,
            username: None,
            password_file: None,
            password: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl RedisConfig {
    /// Puts `username` and the password into `url` and `durable_url` where
    /// those name no user of their own, so that every connection (direct,
    /// Sentinel-named primary, blocking reads, health checks) carries them.
    pub fn apply_credentials(&mut self) -> Result<(), ConfigError> {
        let password = match &self.password_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::PasswordFile {
                        path: path.clone(),
                        source,
                    })?
                    .trim()
                    .to_string(),
            ),
            None => self.password.clone(),
        };
        if self.username.is_none() && password.is_none() {
            return Ok(());
        }
        for url in [&mut self.url, &mut self.durable_url].into_iter().flatten() {
            *url = with_credentials(url, self.username.as_deref(), password.as_deref());
        }
        Ok(())
    }

    /// Where durable records live when Sentinel is not used (and this
    /// region's copy of them when it is): `durable_url`, else `url`.
    pub fn effective_durable_url(&self) -> Option<&str> {
        self.durable_url.as_deref().or(self.url.as_deref())
    }
}

/// A list of strings, or one string split at commas (environment variables).
fn list_or_commas<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrCommas {
        List(Vec<String>),
        Commas(String),
    }
    let items = match ListOrCommas::deserialize(d)? {
        ListOrCommas::List(items) => items,
        ListOrCommas::Commas(text) => text.split(',').map(str::to_string).collect(),
    };
    Ok(items
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KeyvaultConfig {
    /// gRPC listen address.
    pub listen: String,
    /// 32-byte master key as 64 hex characters. Prefer `master_key_file`.
    pub master_key: Option<String>,
    /// File holding the master key (64 hex characters).
    pub master_key_file: Option<PathBuf>,
    /// Threads doing RSA private-key operations; 0 = one per core.
    pub workers: usize,
    /// Private-key requests allowed to wait; beyond it callers get
    /// RESOURCE_EXHAUSTED at once.
    pub queue_depth: usize,
    /// Longest an OpenSession decryption may wait in the queue. One that
    /// waited longer (or past the caller's gRPC deadline, whichever comes
    /// first) is dropped without any RSA work and answered
    /// RESOURCE_EXHAUSTED, so the gateway turns the device away. 0: only the
    /// caller's deadline.
    pub max_queue_wait_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// This gateway's identity in session ownership records. Empty: hostname-pid.
    pub id: String,
    /// Device TCP listener.
    pub device_listen: String,
    /// gRPC listener for the operator `DeviceService`.
    pub grpc_listen: String,
    /// Where keyvault's gRPC endpoint is.
    pub keyvault_url: String,
    /// Each handshake step must arrive within this.
    pub handshake_step_timeout_ms: u64,
    /// The whole handshake must finish within this.
    pub handshake_timeout_ms: u64,
    /// Expected device keepalive interval; a session silent for three of them is dropped.
    pub keepalive_secs: u64,
    /// Largest frame a device may send (bytes after the 2-byte length).
    pub max_frame_len: usize,
    /// A frame whose first bytes have arrived must be complete within this;
    /// otherwise the session is closed as a protocol violation (a device
    /// that stalls mid-frame would otherwise hold its session until the
    /// keepalive limit).
    pub frame_read_timeout_secs: u64,
    /// How long an operator's function call or variable read waits for the device.
    pub command_timeout_ms: u64,
    /// Device events kept in the capped Redis stream.
    pub events_max_len: usize,
    /// Firmware chunks sent ahead of the device's ChunkReceived (1..=128):
    /// deeper windows put many chunks in one write and one ownership check.
    pub ota_window: usize,
    /// Firmware bytes per chunk, announced in UpdateBegin (the device takes
    /// the size from there). 512 suits Particle-class firmware; devices
    /// with the RAM for it take larger chunks, which cost fewer frames,
    /// acks and syscalls per image.
    pub ota_chunk_size: u16,
    /// Handshakes this gateway works on at once (from accept until the
    /// session is established or refused); a connection beyond it is
    /// closed at accept, before the nonce and any RSA work, and the device
    /// retries the same gateway after a jittered backoff. Bounds the work a
    /// reconnect storm can queue without refusing any steady load the
    /// servers can carry. 0: no limit.
    pub handshake_concurrency: u32,
    /// New handshakes admitted per second by this gateway (token bucket),
    /// on top of `handshake_concurrency`: a fixed cap for an operator who
    /// wants one (e.g. this gateway's share of keyvault). 0: no rate limit.
    pub handshake_rate: u32,
    /// Handshakes that may start at once above the steady rate.
    pub handshake_burst: u32,
    /// The OTA scheduler, told of every Hello (so it can count a device as
    /// updated and deliver to devices that were offline). Empty: no OTA.
    pub ota_url: String,
    /// What happens when a device identity is in session from two
    /// addresses at once (a suspected clone; always audited and counted):
    /// `newest_wins` closes the older session, `quarantine` closes both and
    /// refuses the identity for `clone_quarantine_secs`.
    pub clone_policy: ClonePolicy,
    /// How long `quarantine` refuses a suspected clone's identity.
    pub clone_quarantine_secs: u64,
    /// Session addresses (time, gateway, peer) kept per device for
    /// `trellis device show`, newest first; clone flags are kept as many.
    pub session_history_len: usize,
    /// The per-device session history and clone flags expire this long
    /// after the device's last connect.
    pub session_history_ttl_secs: u64,
    /// Drain on SIGTERM: the gateway stops accepting devices at once, lets
    /// each session finish the commands already written to its device,
    /// releases the session's ownership and closes it (devices reconnect
    /// through the load balancer), answers what is left in its Redis inbox
    /// with "not delivered" (the asking gateway retries on the device's new
    /// session), and exits when all of that is done or after this many
    /// milliseconds, whichever comes first. Keep it below the orchestrator's
    /// grace period (Kubernetes: 30 s).
    pub drain_deadline_ms: u64,
}

/// The gateway's answer to a suspected clone (`gateway.clone_policy`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClonePolicy {
    /// The new session takes over; the older one is closed.
    #[default]
    NewestWins,
    /// Both sessions are closed and the identity refused for
    /// `gateway.clone_quarantine_secs`.
    Quarantine,
}

impl ClonePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NewestWins => "newest_wins",
            Self::Quarantine => "quarantine",
        }
    }
}

/// The OTA scheduler (`services/ota`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OtaConfig {
    /// gRPC listen address of the `Ota` service.
    pub listen: String,
    /// Any gateway's gRPC endpoint: `DeliverUpdate` is routed from there to
    /// the gateway that owns the device's session.
    pub gateway_url: String,
    /// The signer's gRPC endpoint, where releases (product, version, image
    /// SHA-256) are read when a rollout is created.
    pub signer_url: String,
    /// How often the scheduler advances the rollouts it holds the lease for.
    pub tick_ms: u64,
    /// Lifetime of a replica's per-rollout lease in Redis (renewed every
    /// tick); another replica takes a rollout over this long after its
    /// holder died.
    pub lease_ms: u64,
    /// Addresses (CIDRs, `127.0.0.0/8`, `::1/128`) a rollout's
    /// `approval_url` may resolve to although they are loopback,
    /// link-local, unspecified or a cloud metadata address, which are
    /// refused otherwise (SSRF guard, `trellis_core::outbound`). Empty by
    /// default.
    pub approval_allowed_targets: Vec<String>,
}

impl Default for OtaConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7400".into(),
            gateway_url: "http://127.0.0.1:7200".into(),
            signer_url: "http://127.0.0.1:7300".into(),
            tick_ms: 500,
            lease_ms: 10_000,
            approval_allowed_targets: Vec::new(),
        }
    }
}

/// The firmware signer (`services/signer`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SignerConfig {
    /// gRPC listen address of the `Signer` service.
    pub listen: String,
    /// Where keyvault's gRPC endpoint is (it signs with the cloud release key).
    pub keyvault_url: String,
    /// Largest firmware image UploadImage accepts, in bytes.
    pub max_image_bytes: u64,
}

impl Default for SignerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7300".into(),
            keyvault_url: "http://127.0.0.1:7100".into(),
            max_image_bytes: 16 * 1024 * 1024,
        }
    }
}

/// The application API (`services/api`): Particle-compatible REST and
/// server-sent events over HTTP, calling the other services with each
/// request's own token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// HTTP listen address.
    pub listen: String,
    /// Any gateway's gRPC endpoint (devices, function calls, variables, events).
    pub gateway_url: String,
    /// Keyvault's gRPC endpoint (tokens, users).
    pub keyvault_url: String,
    /// The signer's gRPC endpoint (releases, for OTA by upload).
    pub signer_url: String,
    /// The OTA scheduler's gRPC endpoint (one-device rollouts).
    pub ota_url: String,
    /// HTTPS: the certificate chain (PEM) the API serves. With
    /// `tls_key_file`; both unset: plain HTTP (a proxy terminates TLS).
    pub tls_cert_file: Option<PathBuf>,
    /// HTTPS: the certificate's private key (PEM).
    pub tls_key_file: Option<PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            gateway_url: "http://127.0.0.1:7200".into(),
            keyvault_url: "http://127.0.0.1:7100".into(),
            signer_url: "http://127.0.0.1:7300".into(),
            ota_url: "http://127.0.0.1:7400".into(),
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// Webhooks (Particle "integrations"), delivered by the api service:
/// events matching an integration are queued in Redis and sent, at least
/// once and in order, to the integration's URL.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Whether this api process dispatches events and delivers webhooks
    /// (the `/v1/integrations` REST calls work either way). Needs
    /// `redis.url` (the api's own Redis user, `trellis-api`).
    pub enabled: bool,
    /// Integrations this process delivers at the same time (each one by
    /// one replica at a time, under a lease).
    pub workers: usize,
    /// Attempts per delivery before it becomes a dead letter.
    pub max_attempts: u32,
    /// Age (ms since the event) after which an undelivered delivery is
    /// dead-lettered even with attempts left.
    pub max_age_ms: u64,
    /// Timeout of one delivery request (ms).
    pub timeout_ms: u64,
    /// First retry delay (ms); doubles per attempt with jitter, up to
    /// `max_backoff_ms`.
    pub min_backoff_ms: u64,
    /// Longest retry delay (ms).
    pub max_backoff_ms: u64,
    /// Lifetime of a replica's per-integration lease (ms), renewed while it
    /// delivers; another replica takes the integration over this long after
    /// its holder died.
    pub lease_ms: u64,
    /// Dead letters kept per integration (oldest dropped first).
    pub max_dead_letters: usize,
    /// Addresses (CIDRs, `127.0.0.0/8`, `::1/128`, `169.254.0.0/16`) a
    /// webhook target may resolve to although they are loopback,
    /// link-local, unspecified or a cloud metadata address, which are
    /// refused otherwise (SSRF guard, `trellis_core::outbound`). Empty by
    /// default.
    pub allowed_targets: Vec<String>,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            workers: 16,
            max_attempts: 10,
            max_age_ms: 24 * 3600 * 1000,
            timeout_ms: 10_000,
            min_backoff_ms: 500,
            max_backoff_ms: 60_000,
            lease_ms: 10_000,
            max_dead_letters: 10_000,
            allowed_targets: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP gRPC endpoint (`http://collector:4317`). Unset: no span export.
    pub otlp_endpoint: Option<String>,
    /// Log filter (`info`, `trellis_gateway=debug`, ...). `RUST_LOG` wins when set.
    pub log: String,
    /// `deployment.environment` resource attribute.
    pub environment: String,
    /// Admin HTTP address: `/metrics`, `/healthz`, `/readyz`. Empty: off.
    pub admin_listen: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("trellis-data"),
            region: "local".into(),
            redis: RedisConfig::default(),
            keyvault: KeyvaultConfig::default(),
            gateway: GatewayConfig::default(),
            ota: OtaConfig::default(),
            signer: SignerConfig::default(),
            api: ApiConfig::default(),
            webhooks: WebhooksConfig::default(),
            telemetry: TelemetryConfig::default(),
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
            keys: KeysConfig::default(),
        }
    }
}

impl Default for KeyvaultConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7100".into(),
            master_key: None,
            master_key_file: None,
            workers: 0,
            queue_depth: 64,
            max_queue_wait_ms: 5_000,
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            device_listen: "0.0.0.0:5683".into(),
            grpc_listen: "127.0.0.1:7200".into(),
            keyvault_url: "http://127.0.0.1:7100".into(),
            handshake_step_timeout_ms: 30_000,
            handshake_timeout_ms: 120_000,
            keepalive_secs: 15,
            max_frame_len: 4096,
            frame_read_timeout_secs: 10,
            command_timeout_ms: 10_000,
            events_max_len: 10_000,
            ota_window: 32,
            ota_chunk_size: 512,
            ota_url: String::new(),
            handshake_concurrency: 64,
            handshake_rate: 0,
            handshake_burst: 200,
            clone_policy: ClonePolicy::NewestWins,
            clone_quarantine_secs: 300,
            session_history_len: 10,
            session_history_ttl_secs: 7 * 24 * 3600,
            drain_deadline_ms: 25_000,
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            log: "info".into(),
            environment: "development".into(),
            admin_listen: "127.0.0.1:9100".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    #[error("configuration: redis.password_file {path}: {source}")]
    PasswordFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration: data_dir {dir}: {source}")]
    DataDir {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// `url` with `user:password@` in front of its host, unless it names a user
/// or password already (an explicit URL wins). Both are percent-encoded.
fn with_credentials(url: &str, user: Option<&str>, password: Option<&str>) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    if rest[..authority_end].contains('@') {
        return url.to_string();
    }
    let encode = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    let user_info = match (user, password) {
        (Some(u), Some(p)) => format!("{}:{}@", encode(u), encode(p)),
        (Some(u), None) => format!("{}@", encode(u)),
        (None, Some(p)) => format!(":{}@", encode(p)),
        (None, None) => String::new(),
    };
    format!("{}{user_info}{rest}", &url[..scheme_end])
}

impl Config {
    /// Defaults, then the TOML file (if it exists), then `TRELLIS_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let file = file
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("trellis.toml"));
        let mut config: Config = Self::figment(&file)
            .extract()
            .map_err(|e| ConfigError::Invalid(Box::new(e)))?;
        // Child processes (redis-server) change directory before they open
        // the paths they are given, so a relative data directory would mean
        // something else to them: pin it to the directory we started in.
        config.redis.apply_credentials()?;
        config.data_dir =
            std::path::absolute(&config.data_dir).map_err(|e| ConfigError::DataDir {
                dir: config.data_dir.clone(),
                source: e,
            })?;
        Ok(config)
    }

    pub fn figment(file: &Path) -> Figment {
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file(file))
            // The CLI's own variables share the prefix but are not config.
            .merge(
                Env::prefixed("TRELLIS_")
                    .ignore(&[
                        // Scripts and benches name the binary to run with it.
                        "bin",
                        "config",
                        // The CLI's api URL (`trellis webhook`).
                        "api_url",
                        "gateway_url",
                        "keyvault_url",
                        "ota_url",
                        "signer_url",
                        // The CLI's token (TRELLIS_TOKEN).
                        "token",
                    ])
                    .split("__"),
            )
    }
}

impl GatewayConfig {
    /// The configured id, or one made from host name and pid.
    pub fn effective_id(&self) -> String {
        if !self.id.is_empty() {
            return self.id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "gateway".into());
        format!("{host}-{}", std::process::id())
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closure signature, not ours
mod tests {
    use super::*;

    #[test]
    fn env_overrides_file_and_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("t.toml", "region = \"eu\"\n[gateway]\nkeepalive_secs = 5\n")?;
            jail.set_env("TRELLIS_GATEWAY__DEVICE_LISTEN", "127.0.0.1:1");
            jail.set_env("TRELLIS_GATEWAY_URL", "http://127.0.0.1:2");
            let c = Config::load(Some(Path::new("t.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.region, "eu");
            assert_eq!(c.gateway.keepalive_secs, 5);
            assert_eq!(c.gateway.device_listen, "127.0.0.1:1");
            assert_eq!(c.keyvault.queue_depth, 64);
            Ok(())
        });
    }

    #[test]
    fn a_services_redis_user_and_password_file_go_into_both_urls() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("gateway.password", "p@ss/word\n")?;
            jail.set_env("TRELLIS_REDIS__URL", "redis://local:6379/");
            jail.set_env("TRELLIS_REDIS__DURABLE_URL", "rediss://durable:6380/0");
            jail.set_env("TRELLIS_REDIS__USERNAME", "trellis-gateway");
            jail.set_env("TRELLIS_REDIS__PASSWORD_FILE", "gateway.password");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(
                c.redis.url.as_deref(),
                Some("redis://trellis-gateway:p%40ss%2Fword@local:6379/")
            );
            assert_eq!(
                c.redis.durable_url.as_deref(),
                Some("rediss://trellis-gateway:p%40ss%2Fword@durable:6380/0")
            );
            // A URL that names its own user keeps it.
            jail.set_env("TRELLIS_REDIS__URL", "redis://other:x@local:6379/");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.redis.url.as_deref(), Some("redis://other:x@local:6379/"));
            // A password file that is not there is an error that names it.
            jail.set_env("TRELLIS_REDIS__PASSWORD_FILE", "missing.password");
            let e = Config::load(None).expect_err("missing file").to_string();
            assert!(e.contains("redis.password_file missing.password"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn sentinels_from_commas_or_list() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("t.toml", "[redis]\nsentinels = [\"a:1\", \"b:2\"]\n")?;
            let c = Config::load(Some(Path::new("t.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.redis.sentinels, vec!["a:1", "b:2"]);
            assert_eq!(c.redis.effective_durable_url(), None);
            jail.set_env("TRELLIS_REDIS__SENTINELS", "x:1, y:2,");
            jail.set_env("TRELLIS_REDIS__URL", "redis://r:1/");
            let c = Config::load(Some(Path::new("t.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.redis.sentinels, vec!["x:1", "y:2"]);
            assert_eq!(c.redis.effective_durable_url(), Some("redis://r:1/"));
            Ok(())
        });
    }

    #[test]
    fn relative_data_dir_is_made_absolute_against_the_working_directory() {
        figment::Jail::expect_with(|jail| {
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert!(c.data_dir.is_absolute(), "{}", c.data_dir.display());
            assert_eq!(c.data_dir, jail.directory().join("trellis-data"));
            jail.set_env("TRELLIS_DATA_DIR", "sub/dir");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.data_dir, jail.directory().join("sub/dir"));
            Ok(())
        });
    }

    #[test]
    fn unknown_key_is_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("t.toml", "[gateway]\nkeepalive = 5\n")?;
            let err = Config::load(Some(Path::new("t.toml")))
                .unwrap_err()
                .to_string();
            assert!(err.contains("keepalive"), "{err}");
            Ok(())
        });
    }
}

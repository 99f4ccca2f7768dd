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
    pub telemetry: TelemetryConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`. Unset: `trellis up` starts a local redis-server.
    pub url: Option<String>,
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
    /// How long an operator's function call or variable read waits for the device.
    pub command_timeout_ms: u64,
    /// Device events kept in the capped Redis stream.
    pub events_max_len: usize,
    /// New handshakes admitted per second by this gateway (token bucket);
    /// the rest are turned away before any RSA work, and the devices'
    /// backoff spreads them out. Size it to what keyvault serves (README).
    /// 0: no limit.
    pub handshake_rate: u32,
    /// Handshakes that may start at once above the steady rate.
    pub handshake_burst: u32,
    /// The OTA scheduler, told of every Hello (so it can count a device as
    /// updated and deliver to devices that were offline). Empty: no OTA.
    pub ota_url: String,
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
}

impl Default for OtaConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7400".into(),
            gateway_url: "http://127.0.0.1:7200".into(),
            signer_url: "http://127.0.0.1:7300".into(),
            tick_ms: 500,
            lease_ms: 10_000,
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
            telemetry: TelemetryConfig::default(),
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
            command_timeout_ms: 10_000,
            events_max_len: 10_000,
            ota_url: String::new(),
            handshake_rate: 1_000,
            handshake_burst: 200,
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
}

impl Config {
    /// Defaults, then the TOML file (if it exists), then `TRELLIS_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let file = file
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("trellis.toml"));
        Self::figment(&file)
            .extract()
            .map_err(|e| ConfigError::Invalid(Box::new(e)))
    }

    pub fn figment(file: &Path) -> Figment {
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file(file))
            // The CLI's own variables share the prefix but are not config.
            .merge(
                Env::prefixed("TRELLIS_")
                    .ignore(&[
                        "config",
                        "gateway_url",
                        "keyvault_url",
                        "ota_url",
                        "signer_url",
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

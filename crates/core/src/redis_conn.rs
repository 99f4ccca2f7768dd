//! Redis access: one auto-reconnecting connection manager per service, and
//! the key names every service agrees on (one place, so two services never
//! spell a key differently).
use redis::aio::{ConnectionLike, ConnectionManager};
use std::sync::Arc;

pub mod acl;
mod sentinel;

/// A shared, auto-reconnecting Redis connection; clone it freely. Either
/// one server (a connection manager) or, for durable records with
/// `redis.sentinels` set, whichever server Sentinel names as the primary,
/// followed across failovers ([`connect_durable`]).
#[derive(Clone)]
pub struct Redis(Conn);

#[derive(Clone)]
enum Conn {
    Direct(ConnectionManager),
    Sentinel(Arc<sentinel::SentinelConn>),
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Conn::Direct(_) => f.write_str("Redis(direct)"),
            Conn::Sentinel(s) => write!(f, "Redis({s:?})"),
        }
    }
}

impl ConnectionLike for Redis {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match &mut self.0 {
            Conn::Direct(c) => c.req_packed_command(cmd),
            Conn::Sentinel(s) => sentinel::command(Arc::clone(s), cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match &mut self.0 {
            Conn::Direct(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(s) => sentinel::pipeline(Arc::clone(s), pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Conn::Direct(c) => c.get_db(),
            Conn::Sentinel(s) => s.db(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis url {url:?} is not valid: {source}")]
    BadUrl {
        url: String,
        source: redis::RedisError,
    },
    #[error("cannot reach redis at {url}: {source}")]
    Unreachable {
        url: String,
        source: redis::RedisError,
    },
    #[error("redis TLS: cannot read {path}: {source}")]
    TlsFile {
        path: String,
        source: std::io::Error,
    },
    #[error("redis TLS: set both redis.tls_cert_file and redis.tls_key_file, or neither")]
    TlsPair,
    #[error(
        "no Redis for durable records: set redis.durable_url or redis.url (TRELLIS_REDIS__DURABLE_URL / TRELLIS_REDIS__URL), or redis.sentinels"
    )]
    NoDurable,
    #[error(
        "Sentinel ({sentinels}) names no reachable primary for master {master:?} and no local replica (redis.durable_url) is configured: {source}"
    )]
    NoPrimary {
        master: String,
        sentinels: String,
        source: redis::RedisError,
    },
}

/// A Redis URL fit to print: its password, if any, replaced by `***`
/// (`redis://user:secret@host/` -> `redis://user:***@host/`). Every message,
/// log line and health report that names a Redis URL goes through this.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    // The last '@' of the authority ends the user info (a password may hold '@').
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    let user_info = &rest[..at];
    let user = match user_info.find(':') {
        Some(colon) => &user_info[..colon],
        // `redis://secret@host` is read as a password by some clients.
        None => "",
    };
    format!("{}{user}:***{}", &url[..scheme_end], &rest[at..])
}

/// TLS material for `rediss://` URLs, loaded once per process by
/// [`init_tls`] (every service of one process talks to the same Redis
/// installation).
static TLS: std::sync::RwLock<Option<Arc<redis::TlsCertificates>>> = std::sync::RwLock::new(None);

/// Loads `redis.tls_ca_file` and the client certificate, if set, for every
/// later `rediss://` connection of this process. A file that cannot be
/// read is an error naming it.
pub fn init_tls(config: &crate::config::RedisConfig) -> Result<(), RedisError> {
    let read = |path: &std::path::PathBuf| {
        std::fs::read(path).map_err(|source| RedisError::TlsFile {
            path: path.display().to_string(),
            source,
        })
    };
    let root_cert = config.tls_ca_file.as_ref().map(read).transpose()?;
    let client_tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert)?,
            client_key: read(key)?,
        }),
        (None, None) => None,
        _ => return Err(RedisError::TlsPair),
    };
    let tls = (root_cert.is_some() || client_tls.is_some()).then(|| {
        Arc::new(redis::TlsCertificates {
            client_tls,
            root_cert,
        })
    });
    *TLS.write().unwrap_or_else(|e| e.into_inner()) = tls;
    Ok(())
}

/// A client for `url` (or a parsed address): over TLS with the process's
/// CA and client certificate when the URL is `rediss://` and
/// [`init_tls`] loaded any.
pub fn client(url: impl redis::IntoConnectionInfo) -> redis::RedisResult<redis::Client> {
    let info = url.into_connection_info()?;
    let tls = TLS.read().unwrap_or_else(|e| e.into_inner()).clone();
    match (info.addr(), tls) {
        (redis::ConnectionAddr::TcpTls { .. }, Some(tls)) => {
            redis::Client::build_with_tls(info, (*tls).clone())
        }
        _ => redis::Client::open(info),
    }
}

/// Connects with a connection manager that reconnects by itself when Redis
/// goes away and comes back.
pub async fn connect(url: &str) -> Result<Redis, RedisError> {
    connect_manager(url).await.map(|c| Redis(Conn::Direct(c)))
}

async fn connect_manager(url: &str) -> Result<ConnectionManager, RedisError> {
    let client = client(url).map_err(|source| RedisError::BadUrl {
        url: redact_url(url),
        source,
    })?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_secs(5)))
        .set_response_timeout(Some(std::time::Duration::from_secs(5)))
        .set_number_of_retries(3);
    ConnectionManager::new_with_config(client, config)
        .await
        .map_err(|source| RedisError::Unreachable {
            url: redact_url(url),
            source,
        })
}

/// The connection for durable records (device registry, sealed keys,
/// images, releases, policies, rollouts, audit). Without `redis.sentinels`:
/// `redis.durable_url`, else `redis.url`. With them: the primary Sentinel
/// names, found again by itself after a failover; reads fall back to
/// `redis.durable_url` (this region's replica) while no primary is
/// reachable. Starts without a reachable primary only when that replica
/// answers.
#[tracing::instrument(name = "redis.connect_durable", skip_all, fields(sentinels = config.sentinels.len(), master = %config.sentinel_master))]
pub async fn connect_durable(config: &crate::config::RedisConfig) -> Result<Redis, RedisError> {
    if config.sentinels.is_empty() {
        let url = config
            .effective_durable_url()
            .ok_or(RedisError::NoDurable)?;
        return connect(url).await;
    }
    let conn = sentinel::SentinelConn::new(
        config.sentinels.clone(),
        config.sentinel_master.clone(),
        config.effective_durable_url(),
        config.durable_url.as_deref(),
        std::time::Duration::from_millis(config.failover_wait_ms),
    )
    .await
    .map_err(|source| RedisError::BadUrl {
        url: redact_url(config.effective_durable_url().unwrap_or_default()),
        source,
    })?;
    match conn.primary_addr().await {
        Ok(primary) => {
            tracing::info!(%primary, master = %config.sentinel_master, "durable records at the Sentinel primary")
        }
        Err(source) if !conn.has_replica() => {
            return Err(RedisError::NoPrimary {
                master: config.sentinel_master.clone(),
                sentinels: config.sentinels.join(","),
                source,
            });
        }
        Err(error) => {
            tracing::warn!(%error, "no durable primary reachable yet; reading from the local replica until Sentinel names one")
        }
    }
    Ok(Redis(Conn::Sentinel(Arc::new(conn))))
}

/// A connection of its own for blocking reads (XREAD BLOCK): on a shared
/// multiplexed connection a blocking call would stall every command queued
/// behind it. The response timeout stays above the longest block we issue
/// (`BLOCKING_READ_MS`), so a Redis that vanishes is still noticed.
pub async fn connect_blocking(url: &str) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_secs(5)))
        .set_response_timeout(Some(std::time::Duration::from_millis(
            BLOCKING_READ_MS + 5_000,
        )));
    client(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// How long one blocking stream read waits before it returns empty.
pub const BLOCKING_READ_MS: u64 = 1_000;

/// Key names. Every record carries the organisation from the start, so
/// multi-organisation support does not need a data migration.
pub mod keys {
    pub const DEFAULT_ORG: &str = "default";

    /// Hash: the device registry record (keyvault).
    pub fn device(device_id: &str) -> String {
        format!("trellis:device:{device_id}")
    }
    /// Set of all registered device ids.
    pub const DEVICE_INDEX: &str = "trellis:devices";
    /// Hash: an organisation's device names (lowercased) -> device id
    /// (keyvault; names are unique within an organisation).
    pub fn device_names(org: &str) -> String {
        format!("trellis:device-names:{org}")
    }
    /// Hash: an unknown device's offered key, kept, never trusted.
    pub fn pending_device(device_id: &str) -> String {
        format!("trellis:pending:{device_id}")
    }
    /// Sorted set: pending device ids by their last attempt (ms); members
    /// whose record expired are dropped when listed.
    pub const PENDING_INDEX: &str = "trellis:pendings";
    /// String: the sealed cloud key record (version 1).
    pub const CLOUD_KEY: &str = "trellis:cloudkey:v1";
    /// String: the sealed record of cloud key `version` (version 1 is
    /// [`CLOUD_KEY`], where it always was).
    pub fn cloud_key_record(version: u32) -> String {
        format!("trellis:cloudkey:v{version}")
    }
    /// Hash: cloud key version -> JSON (version, key_id, created_ms,
    /// retired_ms) (keyvault). Version 1 has an entry once anything about
    /// it changed; without one it is live.
    pub const CLOUD_KEY_VERSIONS: &str = "trellis:cloudkey:versions";
    /// Hash: device id -> `held|seen_ms|rotation` : the cloud key version
    /// the device holds, when it last said so (Hello or acknowledgement),
    /// and 1 if it supports rotation (Hello extension 0x03), else 0
    /// (gateway; keyvault reads it for `keys status` and `keys retire`).
    pub const CLOUD_KEY_DEVICES: &str = "trellis:cloudkey-devices";
    /// String: the sealed release-signing key record, version 1 (keyvault,
    /// purpose "release").
    pub const RELEASE_KEY: &str = "trellis:releasekey:v1";
    /// String: the sealed record of release key `version` (version 1 is
    /// [`RELEASE_KEY`], where it always was).
    pub fn release_key_record(version: u32) -> String {
        format!("trellis:releasekey:v{version}")
    }
    /// Hash: release key version -> JSON, as [`CLOUD_KEY_VERSIONS`] is for
    /// the cloud key (keyvault).
    pub const RELEASE_KEY_VERSIONS: &str = "trellis:releasekey:versions";
    /// String: a firmware image's bytes, content-addressed by its lowercase
    /// hex SHA-256 (signer; written once, SET NX).
    pub fn image(sha256_hex: &str) -> String {
        format!("trellis:image:{sha256_hex}")
    }
    /// Hash: a firmware image's metadata (sha256, size, product_id,
    /// organization, uploaded_at_ms).
    pub fn image_meta(sha256_hex: &str) -> String {
        format!("trellis:image:{sha256_hex}:meta")
    }
    /// Set of all stored image SHA-256s.
    pub const IMAGE_INDEX: &str = "trellis:images";
    /// Hash: a release (product_id, version, organization, image_sha256,
    /// image_size, manifest = the exact signed bytes, signatures = JSON,
    /// created_at_ms). `release_id` is "<product_id>-<version>".
    pub fn release(release_id: &str) -> String {
        format!("trellis:release:{release_id}")
    }
    /// Set of all release ids.
    pub const RELEASE_INDEX: &str = "trellis:releases";
    /// Set of all policy release ids (`tp-<product_id>-<version>`; each is
    /// a hash at [`release`], see trellis-records' `policy_release`). Inside
    /// `trellis:release:*` so the release readers' access covers it.
    pub const POLICY_RELEASE_INDEX: &str = "trellis:release:tp-index";
    /// String: the id of the policy release whose canonical policy bytes
    /// hash to `sha256_hex` (keyvault looks it up before signing a policy).
    pub fn policy_release_by_sha(sha256_hex: &str) -> String {
        format!("trellis:release:tp-sha:{sha256_hex}")
    }
    /// String: a product's signing policy, in the firmware crate's
    /// `TrustPolicy` JSON form.
    pub fn policy(product_id: u32) -> String {
        format!("trellis:policy:{product_id}")
    }
    /// Every product's [`policy`] (SCAN MATCH).
    pub const POLICY_PATTERN: &str = "trellis:policy:*";
    /// Stream: the security audit log (private-key uses, registry, policy
    /// and rollout changes, session events). Refusals never go here.
    pub const AUDIT: &str = "trellis:audit";
    /// Sorted set: refusal aggregates (member `source|action|reason`) by
    /// the time of their last refusal; capped, oldest dropped first.
    pub const AUDIT_REFUSALS: &str = "trellis:audit:refusals";
    /// Hash: each refusal aggregate's `count|first_ms|last_ms|device|gateway`.
    pub const AUDIT_REFUSAL_COUNTS: &str = "trellis:audit:refusal-counts";
    /// Hash: who owns a device's session (gateway, epoch, peer, since).
    pub fn session(device_id: &str) -> String {
        format!("trellis:session:{device_id}")
    }
    /// Counter: the device's session epoch; only grows.
    pub fn session_epoch(device_id: &str) -> String {
        format!("trellis:epoch:{device_id}")
    }
    /// Hash: the device's last reported state (Hello, Describe).
    pub fn device_state(device_id: &str) -> String {
        format!("trellis:state:{device_id}")
    }
    /// List: the device's recent sessions, newest first (JSON: time_ms,
    /// gateway, peer, epoch); capped and expiring.
    pub fn session_history(device_id: &str) -> String {
        format!("trellis:sessions:{device_id}")
    }
    /// List: the device's clone flags, newest first (JSON); capped and expiring.
    pub fn clone_flags(device_id: &str) -> String {
        format!("trellis:clones:{device_id}")
    }
    /// Hash: the device's home across regions (region, gateway, epoch),
    /// durable: the newest session claim in any region. A session elsewhere
    /// with an older epoch closes itself when it sees a newer one here.
    pub fn home(device_id: &str) -> String {
        format!("trellis:home:{device_id}")
    }
    /// Stream (capped ~10 000): revoked and deleted devices, appended by
    /// keyvault in the script that changes the record; every gateway reads
    /// it and closes their live sessions.
    pub const REVOCATIONS: &str = "trellis:revocations";
    /// String with a TTL: the device is quarantined as a suspected clone
    /// while it exists (keyvault refuses its handshakes).
    pub fn quarantine(device_id: &str) -> String {
        format!("trellis:quarantine:{device_id}")
    }
    /// Stream: device events (capped).
    pub const EVENTS: &str = "trellis:events";
    /// Stream: commands for the devices a gateway owns.
    pub fn gateway_commands(gateway_id: &str) -> String {
        format!("trellis:gw:{gateway_id}:commands")
    }
    /// List: the answer to one routed command.
    pub fn command_reply(request_id: &str) -> String {
        format!("trellis:reply:{request_id}")
    }
    /// String with a TTL: what became of one command attempt
    /// (`delivered:<gateway>:<epoch>` once a frame for it was written,
    /// `withdrawn` once the asker gave it up), so a command is retried only
    /// when it provably never reached the device.
    pub fn command_delivery(request_id: &str) -> String {
        format!("trellis:cmd:{request_id}")
    }
    /// Pub/sub channel: tells a gateway to close a superseded session now.
    pub fn gateway_control(gateway_id: &str) -> String {
        format!("trellis:gw:{gateway_id}:control")
    }

    /// Set of all organisations; hash per organisation (created time).
    pub const ORGS: &str = "trellis:orgs";
    pub fn org(org: &str) -> String {
        format!("trellis:org:{org}")
    }
    /// Set of all product ids; hash per product (org, name).
    pub const PRODUCTS: &str = "trellis:products";
    pub fn product(id: u32) -> String {
        format!("trellis:product:{id}")
    }
    /// Set of an organisation's user names; hash per user (role).
    pub fn users(org: &str) -> String {
        format!("trellis:users:{org}")
    }
    pub fn user(org: &str, user: &str) -> String {
        format!("trellis:user:{org}:{user}")
    }
    /// Set of an organisation's token ids; hash per token (the secret's
    /// SHA-256, org, user, name, scopes, created/expires/revoked times).
    pub fn tokens(org: &str) -> String {
        format!("trellis:tokens:{org}")
    }
    pub fn token(id: &str) -> String {
        format!("trellis:token:{id}")
    }
    /// Hash: token id -> when it was last used (ms). Apart from the token
    /// records because every service writes it and only keyvault may write
    /// those.
    pub const TOKEN_USE: &str = "trellis:token-use";

    /// Hash: one OTA rollout (spec, state, stage progress, counters).
    pub fn rollout(rollout_id: &str) -> String {
        format!("trellis:rollout:{rollout_id}")
    }
    /// Hash: a rollout's per-device update records (device id -> JSON).
    pub fn rollout_devices(rollout_id: &str) -> String {
        format!("trellis:rollout:{rollout_id}:devices")
    }
    /// String: the scheduler replica holding a rollout (`<replica>:<token>`, PX).
    pub fn rollout_lease(rollout_id: &str) -> String {
        format!("trellis:rollout:{rollout_id}:lease")
    }
    /// Counter: fencing tokens handed out with a rollout's lease; only grows.
    pub fn rollout_fence(rollout_id: &str) -> String {
        format!("trellis:rollout:{rollout_id}:fence")
    }
    /// Sorted set: every rollout id, scored by creation time (ms).
    pub const ROLLOUT_INDEX: &str = "trellis:rollouts";
    /// Set: rollouts that are running or paused (the scheduler's work list).
    pub const ROLLOUT_ACTIVE: &str = "trellis:rollouts:active";
    /// String: the newest rollout that includes a device (DeviceHello's lookup).
    pub fn ota_device(device_id: &str) -> String {
        format!("trellis:ota:device:{device_id}")
    }
    /// Key prefix of [`ota_device`], for Lua scripts that build the keys.
    pub const OTA_DEVICE_PREFIX: &str = "trellis:ota:device:";
    /// Key prefix of [`rollout`], for Lua scripts that build the keys.
    pub const ROLLOUT_PREFIX: &str = "trellis:rollout:";

    /// Hash: one webhook integration (organisation, filter, target, template,
    /// secret, rate limit, error counter and last error; the api writes it).
    pub fn webhook(id: &str) -> String {
        format!("trellis:webhook:{id}")
    }
    /// Stream: an integration's deliveries still to make, oldest first; an
    /// entry is deleted only once delivered or dead-lettered.
    pub fn webhook_queue(id: &str) -> String {
        format!("trellis:webhook:{id}:queue")
    }
    /// Hash: attempts and next attempt time of the queue's head entry.
    pub fn webhook_head(id: &str) -> String {
        format!("trellis:webhook:{id}:head")
    }
    /// List: an integration's dead letters (JSON), newest last.
    pub fn webhook_dead(id: &str) -> String {
        format!("trellis:webhook:{id}:dead")
    }
    /// String: the api replica delivering an integration (`<replica>`, PX).
    pub fn webhook_lease(id: &str) -> String {
        format!("trellis:webhook:{id}:lease")
    }
    /// Set: every integration id.
    pub const WEBHOOK_INDEX: &str = "trellis:webhooks";
    /// Set: one organisation's integration ids.
    pub fn webhooks_of(org: &str) -> String {
        format!("trellis:webhooks:org:{org}")
    }
    /// String: the id of the last event of `trellis:events` the dispatcher
    /// turned into deliveries.
    pub const WEBHOOK_CURSOR: &str = "trellis:webhooks:cursor";
    /// String: the api replica running the dispatcher (`<replica>`, PX).
    pub const WEBHOOK_DISPATCH_LEASE: &str = "trellis:webhooks:dispatch-lease";
}

#[cfg(test)]
mod redact_tests {
    use super::redact_url;

    #[test]
    fn passwords_are_replaced_and_everything_else_kept() {
        assert_eq!(
            redact_url("redis://user:s3cret@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact_url("redis://:s3cret@host/"), "redis://:***@host/");
        assert_eq!(redact_url("rediss://s3cret@host"), "rediss://:***@host");
        assert_eq!(redact_url("redis://u:p@ss@host/1"), "redis://u:***@host/1");
        assert_eq!(redact_url("redis://host:6379/"), "redis://host:6379/");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}

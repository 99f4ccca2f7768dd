//! Cloud key versions (docs/protocol.md §6.7). Version 1 is the cloud key
//! made at first start, sealed at `keys::CLOUD_KEY` as it always was;
//! `trellis keys rotate cloud` makes version N+1, sealed the same way at
//! `keys::cloud_key_record(N+1)`. `keys::CLOUD_KEY_VERSIONS` records when
//! each was made and whether it is retired. Every live version opens
//! handshakes; the newest live one is *current*: the one gateways announce
//! to devices. A retired version is never used again.
//!
//! Each keyvault holds every version's private key in memory (OpenSSL) and
//! the master key (it seals new versions); it reloads the versions from
//! Redis after its own changes and every few seconds, so several keyvaults
//! agree within one reload.
use crate::backend::{BackendError, OpensslBackend, PrivateOps};
use crate::cloud_key::{self, CLOUD_KEY_VERSION, CloudKey, CloudKeyError, cloud_slot};
use crate::error::{KeyvaultError, Result};
use crate::master_key::MasterKey;
use crate::registry;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use trellis_core::audit::AuditRecord;
use trellis_core::redis_conn::{Redis, keys};
use trellis_core::time::now_ms;

/// How often a keyvault reloads the versions other keyvaults may have
/// changed.
pub const RELOAD_EVERY: std::time::Duration = std::time::Duration::from_secs(3);

/// What `keys::CLOUD_KEY_VERSIONS` holds for one version (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionMeta {
    pub version: u32,
    pub key_id: String,
    /// 0: unknown (version 1 from before versions were recorded).
    pub created_ms: i64,
    /// 0: live.
    pub retired_ms: i64,
}

/// One version, opened.
pub struct RingKey {
    pub meta: VersionMeta,
    pub public_der: Vec<u8>,
    pub ops: Arc<dyn PrivateOps>,
}

impl std::fmt::Debug for RingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingKey")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

impl RingKey {
    pub fn live(&self) -> bool {
        self.meta.retired_ms == 0
    }
}

/// Every cloud key version this keyvault holds.
#[derive(Debug, Default)]
pub struct Keyring {
    keys: BTreeMap<u32, Arc<RingKey>>,
}

impl Keyring {
    /// The newest live version (what devices are told of).
    pub fn current(&self) -> Option<&Arc<RingKey>> {
        self.keys.values().rev().find(|k| k.live())
    }

    pub fn get(&self, version: u32) -> Option<&Arc<RingKey>> {
        self.keys.get(&version)
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<RingKey>> {
        self.keys.values()
    }

    /// The live versions in the order a handshake tries them: `hint`
    /// first (when live), then the others newest first.
    pub fn candidates(&self, hint: u32) -> Vec<Arc<RingKey>> {
        let mut out: Vec<Arc<RingKey>> = Vec::with_capacity(self.keys.len());
        if let Some(k) = self.keys.get(&hint).filter(|k| k.live()) {
            out.push(k.clone());
        }
        for k in self.keys.values().rev() {
            if k.live() && k.meta.version != hint {
                out.push(k.clone());
            }
        }
        out
    }
}

/// The keyring, shared by the service and its reloader.
#[derive(Clone)]
pub struct SharedKeyring {
    ring: Arc<RwLock<Arc<Keyring>>>,
    master: Arc<MasterKey>,
}

impl std::fmt::Debug for SharedKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedKeyring")
            .field("ring", &self.snapshot())
            .finish_non_exhaustive()
    }
}

impl SharedKeyring {
    pub fn new(ring: Keyring, master: MasterKey) -> Self {
        Self {
            ring: Arc::new(RwLock::new(Arc::new(ring))),
            master: Arc::new(master),
        }
    }

    /// The versions as of now (cheap: one Arc).
    pub fn snapshot(&self) -> Arc<Keyring> {
        self.ring.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads every version from Redis again.
    pub async fn reload(&self, redis: &mut Redis) -> Result<()> {
        let old = self.snapshot();
        let ring = load(redis, &self.master, Some(&old)).await?;
        *self.ring.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ring);
        Ok(())
    }

    pub fn master(&self) -> &MasterKey {
        &self.master
    }
}

fn key_error(e: CloudKeyError) -> KeyvaultError {
    KeyvaultError::Internal(e.to_string())
}

fn backend_error(e: BackendError) -> KeyvaultError {
    KeyvaultError::Internal(e.to_string())
}

/// Every version's record, as stored.
async fn read_metas(redis: &mut Redis) -> Result<BTreeMap<u32, VersionMeta>> {
    let raw: HashMap<String, String> = redis.hgetall(keys::CLOUD_KEY_VERSIONS).await?;
    let mut out = BTreeMap::new();
    for (field, json) in raw {
        let meta: VersionMeta = serde_json::from_str(&json).map_err(|e| {
            KeyvaultError::Internal(format!(
                "{} field {field} is damaged ({e}); restore it from a backup",
                keys::CLOUD_KEY_VERSIONS
            ))
        })?;
        out.insert(meta.version, meta);
    }
    Ok(out)
}

/// Opens version 1 (making it on a first start) and every recorded later
/// version. Versions already open in `previous` with the same key id are
/// kept as they are (no unsealing again).
pub async fn load(
    redis: &mut Redis,
    master: &MasterKey,
    previous: Option<&Keyring>,
) -> Result<Keyring> {
    let mut metas = read_metas(redis).await?;
    let mut ring = Keyring::default();
    let mut versions: Vec<u32> = metas.keys().copied().collect();
    if !versions.contains(&CLOUD_KEY_VERSION) {
        versions.insert(0, CLOUD_KEY_VERSION);
    }
    for version in versions {
        let recorded = metas.remove(&version);
        if let Some(prev) = previous.and_then(|p| p.get(version))
            && recorded
                .as_ref()
                .is_none_or(|m| m.key_id == prev.meta.key_id)
        {
            let meta = recorded.unwrap_or_else(|| prev.meta.clone());
            ring.keys.insert(
                version,
                Arc::new(RingKey {
                    meta,
                    public_der: prev.public_der.clone(),
                    ops: prev.ops.clone(),
                }),
            );
            continue;
        }
        let key = if version == CLOUD_KEY_VERSION {
            cloud_key::load_or_create(redis, master)
                .await
                .map_err(key_error)?
        } else {
            match cloud_key::read_record_in(redis, cloud_slot(version))
                .await
                .map_err(key_error)?
            {
                Some(sealed) => sealed
                    .open_in(cloud_slot(version), master)
                    .map_err(key_error)?,
                None => {
                    return Err(KeyvaultError::Internal(format!(
                        "cloud key version {version} is recorded in {} but its sealed record {} is missing; restore it from a backup",
                        keys::CLOUD_KEY_VERSIONS,
                        keys::cloud_key_record(version)
                    )));
                }
            }
        };
        let meta = recorded.unwrap_or_else(|| VersionMeta {
            version,
            key_id: key.key_id.clone(),
            created_ms: 0,
            retired_ms: 0,
        });
        if meta.key_id != key.key_id {
            return Err(KeyvaultError::Internal(format!(
                "cloud key version {version}: the record says key {} but the sealed key is {}",
                meta.key_id, key.key_id
            )));
        }
        ring.keys.insert(version, Arc::new(opened(meta, &key)?));
    }
    Ok(ring)
}

fn opened(meta: VersionMeta, key: &CloudKey) -> Result<RingKey> {
    let ops = OpensslBackend::from_pkcs8_der(key.private_pkcs8_der()).map_err(backend_error)?;
    Ok(RingKey {
        meta,
        public_der: key.public_der.clone(),
        ops: Arc::new(ops),
    })
}

/// `trellis keys rotate cloud`: makes version N+1 (N the newest version,
/// live or retired), seals and stores it, records it. Audited.
pub async fn rotate(redis: &mut Redis, shared: &SharedKeyring, actor: &str) -> Result<VersionMeta> {
    shared.reload(redis).await?;
    let ring = shared.snapshot();
    let newest = ring.keys.keys().next_back().copied().unwrap_or(0);
    let version = newest + 1;
    let key = tokio::task::spawn_blocking(move || CloudKey::generate_version(version))
        .await
        .map_err(|e| KeyvaultError::Internal(format!("key generation task failed: {e}")))?
        .map_err(key_error)?;
    let slot = cloud_slot(version);
    let sealed = key.seal_in(slot, shared.master()).map_err(key_error)?;
    let json =
        serde_json::to_string(&sealed).map_err(|e| KeyvaultError::Internal(e.to_string()))?;
    let created: Option<String> = redis::cmd("SET")
        .arg(slot.location)
        .arg(json)
        .arg("NX")
        .query_async(redis)
        .await?;
    if created.is_none() {
        return Err(KeyvaultError::FailedPrecondition(format!(
            "cloud key version {version} was made by another rotation at the same time; look at `trellis keys status`"
        )));
    }
    let meta = VersionMeta {
        version,
        key_id: key.key_id.clone(),
        created_ms: now_ms(),
        retired_ms: 0,
    };
    write_meta(redis, &meta).await?;
    // Version 1's entry, so status shows it next to the others.
    if let Some(first) = ring.get(CLOUD_KEY_VERSION) {
        let json = serde_json::to_string(&first.meta)
            .map_err(|e| KeyvaultError::Internal(e.to_string()))?;
        let _: bool = redis
            .hset_nx(
                keys::CLOUD_KEY_VERSIONS,
                CLOUD_KEY_VERSION.to_string(),
                json,
            )
            .await?;
    }
    shared.reload(redis).await?;
    registry::audit_write(
        redis,
        AuditRecord::new(actor, "cloud_key_rotate", "", "ok")
            .with("version", version.to_string())
            .with("key_id", meta.key_id.clone()),
    )
    .await;
    tracing::info!(version, key_id = %meta.key_id, "cloud key rotated");
    Ok(meta)
}

async fn write_meta(redis: &mut Redis, meta: &VersionMeta) -> Result<()> {
    let json = serde_json::to_string(meta).map_err(|e| KeyvaultError::Internal(e.to_string()))?;
    let _: () = redis
        .hset(keys::CLOUD_KEY_VERSIONS, meta.version.to_string(), json)
        .await?;
    Ok(())
}

/// One device as the gateways recorded it (`keys::CLOUD_KEY_DEVICES`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceHolding {
    pub device_id: String,
    pub held: u32,
    pub seen_ms: i64,
    pub rotation: bool,
}

/// `held|seen_ms|rotation`, as the gateway writes it.
pub fn parse_holding(device_id: &str, value: &str) -> Option<DeviceHolding> {
    let mut parts = value.split('|');
    let held = parts.next()?.parse().ok()?;
    let seen_ms = parts.next()?.parse().ok()?;
    let rotation = parts.next()? == "1";
    Some(DeviceHolding {
        device_id: device_id.to_string(),
        held,
        seen_ms,
        rotation,
    })
}

/// Every registered device's holding (unregistered ids are skipped).
pub async fn holdings(redis: &mut Redis) -> Result<Vec<DeviceHolding>> {
    let raw: HashMap<String, String> = redis.hgetall(keys::CLOUD_KEY_DEVICES).await?;
    let registered: HashSet<String> = redis.smembers(keys::DEVICE_INDEX).await?;
    let mut out: Vec<DeviceHolding> = raw
        .iter()
        .filter(|(id, _)| registered.contains(*id))
        .filter_map(|(id, v)| parse_holding(id, v))
        .collect();
    out.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    Ok(out)
}

/// Counts per version for `keys status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub devices: u64,
    pub legacy: u64,
    pub recent: u64,
}

pub fn count(holdings: &[DeviceHolding], grace_days: u32, now_ms: i64) -> BTreeMap<u32, Counts> {
    let since = now_ms - i64::from(grace_days) * 86_400_000;
    let mut out: BTreeMap<u32, Counts> = BTreeMap::new();
    for h in holdings {
        let c = out.entry(h.held).or_default();
        c.devices += 1;
        if !h.rotation {
            c.legacy += 1;
        }
        if h.seen_ms >= since {
            c.recent += 1;
        }
    }
    out
}

/// `trellis keys retire cloud N [--force]`. Audited.
pub async fn retire(
    redis: &mut Redis,
    shared: &SharedKeyring,
    version: u32,
    force: bool,
    grace_days: u32,
    actor: &str,
) -> Result<VersionMeta> {
    shared.reload(redis).await?;
    let ring = shared.snapshot();
    let key = ring.get(version).ok_or_else(|| {
        KeyvaultError::NotFound(format!(
            "there is no cloud key version {version} (`trellis keys status`)"
        ))
    })?;
    if !key.live() {
        return Ok(key.meta.clone());
    }
    if ring.current().map(|c| c.meta.version) == Some(version) {
        return Err(KeyvaultError::FailedPrecondition(format!(
            "cloud key version {version} is the current one; rotate first (`trellis keys rotate cloud`) so devices have a newer one to move to"
        )));
    }
    let since = now_ms() - i64::from(grace_days) * 86_400_000;
    let blockers: Vec<DeviceHolding> = holdings(redis)
        .await?
        .into_iter()
        .filter(|h| h.held <= version && h.seen_ms >= since)
        .collect();
    if !blockers.is_empty() && !force {
        let some: Vec<&str> = blockers
            .iter()
            .take(5)
            .map(|h| h.device_id.as_str())
            .collect();
        return Err(KeyvaultError::FailedPrecondition(format!(
            "{} device(s) seen in the last {grace_days} days (keys.retire_grace_days) still hold cloud key version {version} or older and have not acknowledged a newer one (e.g. {}); their handshakes would be refused. Wait until they connect and acknowledge (`trellis keys status`), or retire with --force",
            blockers.len(),
            some.join(", ")
        )));
    }
    let mut meta = key.meta.clone();
    meta.retired_ms = now_ms();
    write_meta(redis, &meta).await?;
    shared.reload(redis).await?;
    registry::audit_write(
        redis,
        AuditRecord::new(actor, "cloud_key_retire", "", "ok")
            .with("version", version.to_string())
            .with("forced", force.to_string())
            .with("unacknowledged_recent", blockers.len().to_string()),
    )
    .await;
    tracing::info!(version, force, "cloud key retired");
    Ok(meta)
}

/// `trellis keys unretire cloud N`: the documented recovery for devices
/// that missed a rotation and came back after the retirement. Audited.
pub async fn unretire(
    redis: &mut Redis,
    shared: &SharedKeyring,
    version: u32,
    actor: &str,
) -> Result<VersionMeta> {
    shared.reload(redis).await?;
    let ring = shared.snapshot();
    let key = ring.get(version).ok_or_else(|| {
        KeyvaultError::NotFound(format!(
            "there is no cloud key version {version} (`trellis keys status`)"
        ))
    })?;
    let mut meta = key.meta.clone();
    if meta.retired_ms == 0 {
        return Ok(meta);
    }
    meta.retired_ms = 0;
    write_meta(redis, &meta).await?;
    shared.reload(redis).await?;
    registry::audit_write(
        redis,
        AuditRecord::new(actor, "cloud_key_unretire", "", "ok")
            .with("version", version.to_string()),
    )
    .await;
    tracing::info!(version, "cloud key unretired");
    Ok(meta)
}

/// DigestInfo of SHA-256 (RFC 8017 §9.2 note 1): with the raw PKCS#1 v1.5
/// type-1 operation over `prefix || SHA-256(m)`, the result is exactly the
/// standard PKCS#1 v1.5 SHA-256 signature of `m`.
const SHA256_DIGEST_INFO: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

/// What the raw private operation signs for a PKCS#1 v1.5 SHA-256
/// signature of `message`.
pub fn pkcs1_sha256_input(message: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut out = SHA256_DIGEST_INFO.to_vec();
    out.extend_from_slice(&sha2::Sha256::digest(message));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holdings_parse_and_count() {
        let now = 100 * 86_400_000;
        let h = [
            parse_holding("a", &format!("1|{now}|0")).unwrap(),
            parse_holding("b", &format!("1|{}|1", now - 40 * 86_400_000)).unwrap(),
            parse_holding("c", &format!("2|{now}|1")).unwrap(),
        ];
        assert!(parse_holding("d", "x|1|1").is_none());
        let c = count(&h, 30, now);
        assert_eq!(
            c[&1],
            Counts {
                devices: 2,
                legacy: 1,
                recent: 1
            }
        );
        assert_eq!(c[&2].devices, 1);
    }

    #[test]
    fn the_digest_info_prefix_makes_the_standard_signature() {
        use rsa::pkcs8::DecodePrivateKey;
        let der = crate::backend::generate_pkcs8_der(2048).unwrap();
        let ossl = OpensslBackend::from_pkcs8_der(&der).unwrap();
        let private = rsa::PrivateKey::from_pkcs8_der(&der).unwrap();
        let msg = b"announce";
        let ours = ossl.sign_raw(&pkcs1_sha256_input(msg)).unwrap();
        let reference = private.pkcs1v15_sign::<sha2::Sha256>(msg).unwrap();
        assert_eq!(ours, reference);
    }
}

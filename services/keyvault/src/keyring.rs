//! Versioned sealed keys: what the cloud key (docs/protocol.md §6.7) and
//! the release key (§7.5) share. Version 1 is the key made at first start,
//! sealed where it always was; a rotation makes version N+1, sealed the same
//! way at its own record. A hash per family records when each version was
//! made and whether it is retired. The newest live version is *current*;
//! a retired version is never used again until it is unretired.
//!
//! Each keyvault holds every version's private key in memory (OpenSSL) and
//! the master key (it seals new versions); it reloads the versions from
//! Redis after its own changes and every few seconds, so several keyvaults
//! agree within one reload.
use crate::backend::BackendError;
use crate::cloud_key::{self, CloudKey, CloudKeyError, KeySlot};
use crate::error::{KeyvaultError, Result};
use crate::master_key::MasterKey;
use crate::registry;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use trellis_core::audit::AuditRecord;
use trellis_core::redis_conn::Redis;
use trellis_core::time::now_ms;

/// The first version of every family.
pub const FIRST_VERSION: u32 = 1;

/// How often a keyvault reloads the versions other keyvaults may have
/// changed.
pub const RELOAD_EVERY: std::time::Duration = std::time::Duration::from_secs(3);

/// One kind of versioned key: where its versions live and how an opened
/// version becomes the key material the service uses.
pub struct Family<K: ?Sized> {
    /// The word operators type (`trellis keys rotate cloud|release`).
    pub name: &'static str,
    /// What operators call it, in messages ("cloud key").
    pub what: &'static str,
    /// Hash: version -> [`VersionMeta`] JSON.
    pub versions_key: &'static str,
    /// Where version N is sealed, with its associated-data label.
    pub slot: fn(u32) -> KeySlot,
    /// The opened private key, ready for use.
    pub open: fn(&CloudKey) -> std::result::Result<Arc<K>, BackendError>,
}

/// The slot of version `version` in a family whose version 1 is `first`
/// and whose later versions are at `record(version)`. One small string per
/// version, ever, is kept for the process's life: rotations are rare
/// operator actions.
pub fn versioned_slot(first: KeySlot, version: u32, record: fn(u32) -> String) -> KeySlot {
    if version == FIRST_VERSION {
        return first;
    }
    static LOCATIONS: std::sync::Mutex<Vec<(String, &'static str)>> =
        std::sync::Mutex::new(Vec::new());
    let wanted = record(version);
    let mut known = LOCATIONS.lock().unwrap_or_else(|p| p.into_inner());
    let location = match known.iter().find(|(l, _)| *l == wanted) {
        Some((_, l)) => *l,
        None => {
            let l: &'static str = Box::leak(wanted.clone().into_boxed_str());
            known.push((wanted, l));
            l
        }
    };
    KeySlot {
        location,
        label: first.label,
        what: first.what,
    }
}

/// What a family's versions hash holds for one version (JSON).
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
pub struct RingKey<K: ?Sized> {
    pub meta: VersionMeta,
    pub public_der: Vec<u8>,
    pub key: Arc<K>,
}

impl<K: ?Sized> std::fmt::Debug for RingKey<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingKey")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

impl<K: ?Sized> RingKey<K> {
    pub fn live(&self) -> bool {
        self.meta.retired_ms == 0
    }
}

/// Every version of one family this keyvault holds.
pub struct Keyring<K: ?Sized> {
    keys: BTreeMap<u32, Arc<RingKey<K>>>,
}

impl<K: ?Sized> Default for Keyring<K> {
    fn default() -> Self {
        Self {
            keys: BTreeMap::new(),
        }
    }
}

impl<K: ?Sized> std::fmt::Debug for Keyring<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.keys.values()).finish()
    }
}

impl<K: ?Sized> Keyring<K> {
    /// The newest live version (what devices are told of, what signs).
    pub fn current(&self) -> Option<&Arc<RingKey<K>>> {
        self.keys.values().rev().find(|k| k.live())
    }

    pub fn get(&self, version: u32) -> Option<&Arc<RingKey<K>>> {
        self.keys.get(&version)
    }

    /// The version whose key id is `key_id` (lowercase hex).
    pub fn by_key_id(&self, key_id: &str) -> Option<&Arc<RingKey<K>>> {
        self.keys
            .values()
            .find(|k| k.meta.key_id.eq_ignore_ascii_case(key_id))
    }

    /// Oldest first.
    pub fn all(&self) -> impl Iterator<Item = &Arc<RingKey<K>>> {
        self.keys.values()
    }

    fn newest_version(&self) -> u32 {
        self.keys.keys().next_back().copied().unwrap_or(0)
    }

    /// The live versions in the order a handshake tries them: `hint`
    /// first (when live), then the others newest first.
    pub fn candidates(&self, hint: u32) -> Vec<Arc<RingKey<K>>> {
        let mut out: Vec<Arc<RingKey<K>>> = Vec::with_capacity(self.keys.len());
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

/// A family's keyring, shared by the service and its reloader.
pub struct SharedKeyring<K: ?Sized + 'static> {
    family: &'static Family<K>,
    ring: Arc<RwLock<Arc<Keyring<K>>>>,
    master: Arc<MasterKey>,
}

impl<K: ?Sized> Clone for SharedKeyring<K> {
    fn clone(&self) -> Self {
        Self {
            family: self.family,
            ring: self.ring.clone(),
            master: self.master.clone(),
        }
    }
}

impl<K: ?Sized> std::fmt::Debug for SharedKeyring<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedKeyring")
            .field("family", &self.family.name)
            .field("ring", &self.snapshot())
            .finish_non_exhaustive()
    }
}

impl<K: ?Sized> SharedKeyring<K> {
    pub fn new(family: &'static Family<K>, ring: Keyring<K>, master: Arc<MasterKey>) -> Self {
        Self {
            family,
            ring: Arc::new(RwLock::new(Arc::new(ring))),
            master,
        }
    }

    pub fn family(&self) -> &'static Family<K> {
        self.family
    }

    /// The versions as of now (cheap: one Arc).
    pub fn snapshot(&self) -> Arc<Keyring<K>> {
        self.ring.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads every version from Redis again.
    pub async fn reload(&self, redis: &mut Redis) -> Result<()> {
        let old = self.snapshot();
        let ring = load(self.family, redis, &self.master, Some(&old)).await?;
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
async fn read_metas<K: ?Sized>(
    family: &Family<K>,
    redis: &mut Redis,
) -> Result<BTreeMap<u32, VersionMeta>> {
    let raw: HashMap<String, String> = redis.hgetall(family.versions_key).await?;
    let mut out = BTreeMap::new();
    for (field, json) in raw {
        let meta: VersionMeta = serde_json::from_str(&json).map_err(|e| {
            KeyvaultError::Internal(format!(
                "{} field {field} is damaged ({e}); restore it from a backup",
                family.versions_key
            ))
        })?;
        out.insert(meta.version, meta);
    }
    Ok(out)
}

/// Opens version 1 (making it on a first start) and every recorded later
/// version. Versions already open in `previous` with the same key id are
/// kept as they are (no unsealing again).
pub async fn load<K: ?Sized>(
    family: &Family<K>,
    redis: &mut Redis,
    master: &MasterKey,
    previous: Option<&Keyring<K>>,
) -> Result<Keyring<K>> {
    let mut metas = read_metas(family, redis).await?;
    let mut ring = Keyring::default();
    let mut versions: Vec<u32> = metas.keys().copied().collect();
    if !versions.contains(&FIRST_VERSION) {
        versions.insert(0, FIRST_VERSION);
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
                    key: prev.key.clone(),
                }),
            );
            continue;
        }
        let slot = (family.slot)(version);
        let key = if version == FIRST_VERSION {
            cloud_key::load_or_create_in(redis, slot, master)
                .await
                .map_err(key_error)?
        } else {
            match cloud_key::read_record_in(redis, slot)
                .await
                .map_err(key_error)?
            {
                Some(sealed) => sealed.open_in(slot, master).map_err(key_error)?,
                None => {
                    return Err(KeyvaultError::Internal(format!(
                        "{} version {version} is recorded in {} but its sealed record {} is missing; restore it from a backup",
                        family.what, family.versions_key, slot.location
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
                "{} version {version}: the record says key {} but the sealed key is {}",
                family.what, meta.key_id, key.key_id
            )));
        }
        ring.keys.insert(
            version,
            Arc::new(RingKey {
                meta,
                public_der: key.public_der.clone(),
                key: (family.open)(&key).map_err(backend_error)?,
            }),
        );
    }
    Ok(ring)
}

/// `trellis keys rotate <family>`: makes version N+1 (N the newest version,
/// live or retired), seals and stores it, records it. Audited as
/// `<family>_key_rotate`.
pub async fn rotate<K: ?Sized>(
    redis: &mut Redis,
    shared: &SharedKeyring<K>,
    actor: &str,
) -> Result<VersionMeta> {
    let family = shared.family;
    shared.reload(redis).await?;
    let ring = shared.snapshot();
    let version = ring.newest_version() + 1;
    let key = tokio::task::spawn_blocking(move || CloudKey::generate_version(version))
        .await
        .map_err(|e| KeyvaultError::Internal(format!("key generation task failed: {e}")))?
        .map_err(key_error)?;
    let slot = (family.slot)(version);
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
            "{} version {version} was made by another rotation at the same time; look at `trellis keys status`",
            family.what
        )));
    }
    let meta = VersionMeta {
        version,
        key_id: key.key_id.clone(),
        created_ms: now_ms(),
        retired_ms: 0,
    };
    write_meta(family, redis, &meta).await?;
    // Version 1's entry, so status shows it next to the others.
    if let Some(first) = ring.get(FIRST_VERSION) {
        let json = serde_json::to_string(&first.meta)
            .map_err(|e| KeyvaultError::Internal(e.to_string()))?;
        let _: bool = redis
            .hset_nx(family.versions_key, FIRST_VERSION.to_string(), json)
            .await?;
    }
    shared.reload(redis).await?;
    registry::audit_write(
        redis,
        AuditRecord::new(actor, &format!("{}_key_rotate", family.name), "", "ok")
            .with("version", version.to_string())
            .with("key_id", meta.key_id.clone()),
    )
    .await;
    tracing::info!(family = family.name, version, key_id = %meta.key_id, "key rotated");
    Ok(meta)
}

async fn write_meta<K: ?Sized>(
    family: &Family<K>,
    redis: &mut Redis,
    meta: &VersionMeta,
) -> Result<()> {
    let json = serde_json::to_string(meta).map_err(|e| KeyvaultError::Internal(e.to_string()))?;
    let _: () = redis
        .hset(family.versions_key, meta.version.to_string(), json)
        .await?;
    Ok(())
}

/// The version `version` as of a fresh reload, or NotFound.
pub async fn fresh_version<K: ?Sized>(
    redis: &mut Redis,
    shared: &SharedKeyring<K>,
    version: u32,
) -> Result<Arc<RingKey<K>>> {
    shared.reload(redis).await?;
    let ring = shared.snapshot();
    ring.get(version).cloned().ok_or_else(|| {
        KeyvaultError::NotFound(format!(
            "there is no {} version {version} (`trellis keys status`)",
            shared.family.what
        ))
    })
}

/// Marks `version` retired (`retired`) or live again, reloads, audits as
/// `<family>_key_retire` / `<family>_key_unretire` with `details`. The
/// callers check first whether the change is safe.
pub async fn set_retired<K: ?Sized>(
    redis: &mut Redis,
    shared: &SharedKeyring<K>,
    key: &RingKey<K>,
    retired: bool,
    actor: &str,
    details: &[(&str, String)],
) -> Result<VersionMeta> {
    let family = shared.family;
    let mut meta = key.meta.clone();
    meta.retired_ms = if retired { now_ms() } else { 0 };
    write_meta(family, redis, &meta).await?;
    shared.reload(redis).await?;
    let action = if retired { "retire" } else { "unretire" };
    let mut record = AuditRecord::new(actor, &format!("{}_key_{action}", family.name), "", "ok")
        .with("version", meta.version.to_string());
    for (k, v) in details {
        record = record.with(k, v.clone());
    }
    registry::audit_write(redis, record).await;
    tracing::info!(
        family = family.name,
        version = meta.version,
        action,
        "key version changed"
    );
    Ok(meta)
}

/// The first steps of every retirement: version `version` as of a fresh
/// reload (NotFound if there is none), `Ok(Err(meta))` when it is retired
/// already (nothing to do), refused when it is the current one
/// (nothing newer to move to). The family's own checks come after.
pub async fn retirable<K: ?Sized>(
    redis: &mut Redis,
    shared: &SharedKeyring<K>,
    version: u32,
) -> Result<std::result::Result<Arc<RingKey<K>>, VersionMeta>> {
    let key = fresh_version(redis, shared, version).await?;
    if !key.live() {
        return Ok(Err(key.meta.clone()));
    }
    if shared.snapshot().current().map(|c| c.meta.version) == Some(version) {
        return Err(KeyvaultError::FailedPrecondition(format!(
            "{} version {version} is the current one; rotate first (`trellis keys rotate {}`) so there is a newer one to move to",
            shared.family.what, shared.family.name
        )));
    }
    Ok(Ok(key))
}

/// `trellis keys unretire <family> N`. Audited.
pub async fn unretire<K: ?Sized>(
    redis: &mut Redis,
    shared: &SharedKeyring<K>,
    version: u32,
    actor: &str,
) -> Result<VersionMeta> {
    let key = fresh_version(redis, shared, version).await?;
    if key.live() {
        return Ok(key.meta.clone());
    }
    set_retired(redis, shared, &key, false, actor, &[]).await
}

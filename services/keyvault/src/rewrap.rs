//! `trellis keyvault rewrap --new-master-key FILE`: re-seals every sealed
//! key (every cloud key version, every release key version) under a new
//! master key.
//!
//! Atomic per key: each record is replaced by one compare-and-set script
//! that writes only if the record is still the one read, so a record is
//! always sealed under exactly one of the two keys and never lost.
//! Resumable: a record the new key already opens is left as it is, so a
//! rewrap that stopped half way (a crash, a lost connection) finishes when
//! run again with the same two keys. Nothing is written before both keys
//! are known to open what they must: a wrong old key changes nothing.
//!
//! Running keyvaults keep their keys in memory and keep serving; restart
//! them with the new master key once the rewrap has finished (a keyvault
//! started with the old key after the rewrap refuses to start, as with any
//! wrong master key).
use crate::cloud_key::{
    CLOUD_SLOT, CloudKeyError, KeySlot, SealedCloudKey, cloud_slot, read_record_in,
};
use crate::keyring::FIRST_VERSION;
use crate::master_key::MasterKey;
use crate::release_key::{RELEASE_SLOT, release_slot};
use std::sync::LazyLock;
use trellis_core::audit::{self, AuditRecord};
use trellis_core::redis_conn::Redis;

/// The sealed keys every installation has, in the order they are
/// rewrapped; later versions of each follow ([`slots`]).
pub const SLOTS: [KeySlot; 2] = [CLOUD_SLOT, RELEASE_SLOT];

/// Later versions recorded in a versions hash, oldest first.
async fn later_versions(redis: &mut Redis, versions_key: &str) -> Result<Vec<u32>, RewrapError> {
    let fields: Vec<String> = redis::AsyncCommands::hkeys(redis, versions_key).await?;
    let mut versions: Vec<u32> = fields
        .iter()
        .filter_map(|f| f.parse().ok())
        .filter(|v| *v != FIRST_VERSION)
        .collect();
    versions.sort_unstable();
    Ok(versions)
}

/// Every sealed key: [`SLOTS`], then each later cloud key version recorded
/// in `keys::CLOUD_KEY_VERSIONS`, then each later release key version
/// recorded in `keys::RELEASE_KEY_VERSIONS`, oldest first.
pub async fn slots(redis: &mut Redis) -> Result<Vec<KeySlot>, RewrapError> {
    use trellis_core::redis_conn::keys;
    let mut out = SLOTS.to_vec();
    out.extend(
        later_versions(redis, keys::CLOUD_KEY_VERSIONS)
            .await?
            .into_iter()
            .map(cloud_slot),
    );
    out.extend(
        later_versions(redis, keys::RELEASE_KEY_VERSIONS)
            .await?
            .into_iter()
            .map(release_slot),
    );
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Re-sealed under the new key now.
    Rewrapped,
    /// The new key opens it already (an earlier run got this far).
    AlreadyNew,
    /// No record (keyvault has not made this key yet).
    Absent,
}

// KEYS: the record. ARGV: the JSON read, the new JSON.
static COMPARE_AND_SET: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"#,
    )
});

#[derive(Debug, thiserror::Error)]
pub enum RewrapError {
    #[error(transparent)]
    Key(#[from] CloudKeyError),
    #[error(
        "the {what} at {location} changed while it was being rewrapped (another rewrap or keyvault wrote it); run the rewrap again"
    )]
    Changed {
        what: &'static str,
        location: &'static str,
    },
    #[error("the new master key is the current one: nothing to rewrap")]
    SameKey,
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

/// Rewraps one key; see the module comment.
pub async fn rewrap_slot(
    redis: &mut Redis,
    slot: KeySlot,
    old: &MasterKey,
    new: &MasterKey,
) -> Result<Outcome, RewrapError> {
    let raw: Option<String> = redis::AsyncCommands::get(redis, slot.location).await?;
    let Some(raw) = raw else {
        return Ok(Outcome::Absent);
    };
    let record: SealedCloudKey =
        serde_json::from_str(&raw).map_err(|e| CloudKeyError::Corrupt {
            location: slot.location.to_string(),
            problem: e.to_string(),
        })?;
    if record.open_in(slot, new).is_ok() {
        return Ok(Outcome::AlreadyNew);
    }
    let sealed = record.open_in(slot, old)?.seal_in(slot, new)?;
    let new_json =
        serde_json::to_string(&sealed).map_err(|e| CloudKeyError::Seal(e.to_string()))?;
    let swapped: i64 = COMPARE_AND_SET
        .key(slot.location)
        .arg(&raw)
        .arg(&new_json)
        .invoke_async(redis)
        .await?;
    if swapped == 0 {
        return Err(RewrapError::Changed {
            what: slot.what,
            location: slot.location,
        });
    }
    // The new record must open before anyone relies on it.
    match read_record_in(redis, slot).await? {
        Some(stored) => {
            stored.open_in(slot, new)?;
        }
        None => {
            return Err(RewrapError::Changed {
                what: slot.what,
                location: slot.location,
            });
        }
    }
    Ok(Outcome::Rewrapped)
}

/// Rewraps every sealed key, reporting each as it goes; audited.
pub async fn rewrap_all(
    redis: &mut Redis,
    old: &MasterKey,
    new: &MasterKey,
    actor: &str,
    mut progress: impl FnMut(KeySlot, &Outcome),
) -> Result<Vec<(KeySlot, Outcome)>, RewrapError> {
    if old.as_bytes() == new.as_bytes() {
        return Err(RewrapError::SameKey);
    }
    let slots = slots(redis).await?;
    // Before anything is written: the old key (or the new one, on a
    // resumed run) must open every record.
    for slot in slots.iter().copied() {
        if let Some(record) = read_record_in(redis, slot).await?
            && record.open_in(slot, new).is_err()
        {
            record.open_in(slot, old)?;
        }
    }
    let mut done = Vec::new();
    for slot in slots {
        let outcome = rewrap_slot(redis, slot, old, new).await?;
        progress(slot, &outcome);
        if outcome == Outcome::Rewrapped {
            audit::append_logged(
                redis,
                &AuditRecord::new(actor, "master_key_rewrap", "", "ok")
                    .with("key", slot.what)
                    .with("location", slot.location),
            )
            .await;
        }
        done.push((slot, outcome));
    }
    Ok(done)
}

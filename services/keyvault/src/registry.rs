//! The device registry: which public key belongs to which device id, for
//! which product, and whether it is revoked. One Redis hash per device
//! (`keys::device(id)`) plus the index set `keys::DEVICE_INDEX`.
//!
//! Registration rules, kept simple on purpose:
//! - a new id is stored;
//! - the same id with the same key (and product) again is a no-op that
//!   returns the stored record (factories retry);
//! - the same id with a different key is refused (FAILED_PRECONDITION):
//!   silently replacing a key would let anyone who can call the API take
//!   over a device. Revoke it first;
//! - a revoked device may be registered again with a *new* key (re-keyed at
//!   the factory), which clears the revocation; its old key is never
//!   trusted again, so re-registering the revoked key itself is refused.
//!
//! Every change is audited with the authenticated caller as its actor.
use crate::error::{KeyvaultError, Result};
use redis::AsyncCommands;
use std::collections::HashMap;
use std::sync::LazyLock;
use trellis_core::audit::{self, AuditRecord};
use trellis_core::redis_conn::{Redis, keys};
use trellis_core::time::now_ms;
use trellis_proto::v1 as pb;
use trellis_wire::DeviceId;

/// Device keys are RSA-1024 (PROTOCOL.md, "Keys").
pub const DEVICE_KEY_BITS: usize = 1024;

/// A device as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRecord {
    pub device_id: String,
    pub organization: String,
    pub product_id: u32,
    pub public_key_der: Vec<u8>,
    pub revoked: bool,
    pub registered_at_ms: i64,
    pub revoked_at_ms: i64,
    pub revoke_reason: String,
    /// Sorted, distinct, each valid per [`parse_tags`].
    pub tags: Vec<String>,
    /// Empty: none ([`parse_name`]).
    pub name: String,
    /// Device key rotation: the key the device offered, signed by its
    /// registered key, not yet used in a handshake (empty: none).
    pub next_public_key_der: Vec<u8>,
}

impl DeviceRecord {
    pub fn to_proto(&self) -> pb::Device {
        pb::Device {
            device_id: self.device_id.clone(),
            organization: self.organization.clone(),
            product_id: self.product_id,
            public_key_der: self.public_key_der.clone(),
            revoked: self.revoked,
            registered_at_ms: self.registered_at_ms,
            revoked_at_ms: self.revoked_at_ms,
            tags: self.tags.clone(),
            name: self.name.clone(),
            key_id: trellis_core::keys::key_id(&self.public_key_der),
            next_public_key_der: self.next_public_key_der.clone(),
            next_key_id: if self.next_public_key_der.is_empty() {
                String::new()
            } else {
                trellis_core::keys::key_id(&self.next_public_key_der)
            },
        }
    }

    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("device_id", self.device_id.clone()),
            ("organization", self.organization.clone()),
            ("product_id", self.product_id.to_string()),
            ("public_key_der", hex::encode(&self.public_key_der)),
            ("revoked", if self.revoked { "1" } else { "0" }.to_string()),
            ("registered_at_ms", self.registered_at_ms.to_string()),
            ("revoked_at_ms", self.revoked_at_ms.to_string()),
            ("revoke_reason", self.revoke_reason.clone()),
            ("tags", self.tags.join(",")),
            ("name", self.name.clone()),
            (
                "next_public_key_der",
                hex::encode(&self.next_public_key_der),
            ),
        ]
    }

    /// The record an HGETALL answer holds (`None`: an empty answer, no record).
    fn from_hash(id: &str, map: &HashMap<String, String>) -> Result<Option<Self>> {
        if map.is_empty() {
            return Ok(None);
        }
        Self::from_fields(id, map).map(Some)
    }

    fn from_fields(id: &str, map: &HashMap<String, String>) -> Result<Self> {
        let damaged = |what: &str| {
            KeyvaultError::Internal(format!(
                "the registry record {} is damaged ({what}); re-register the device",
                keys::device(id)
            ))
        };
        let get = |k: &str| map.get(k).map(String::as_str).unwrap_or_default();
        Ok(Self {
            device_id: id.to_string(),
            organization: match get("organization") {
                "" => keys::DEFAULT_ORG.to_string(),
                org => org.to_string(),
            },
            product_id: get("product_id")
                .parse()
                .map_err(|_| damaged("product_id"))?,
            public_key_der: hex::decode(get("public_key_der"))
                .map_err(|_| damaged("public_key_der"))?,
            revoked: get("revoked") == "1",
            registered_at_ms: get("registered_at_ms").parse().unwrap_or(0),
            revoked_at_ms: get("revoked_at_ms").parse().unwrap_or(0),
            revoke_reason: get("revoke_reason").to_string(),
            tags: get("tags")
                .split(',')
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect(),
            name: get("name").to_string(),
            next_public_key_der: hex::decode(get("next_public_key_der"))
                .map_err(|_| damaged("next_public_key_der"))?,
        })
    }
}

/// Checks and normalises a device id (24 hex characters, stored lowercase).
pub fn parse_device_id(input: &str) -> Result<String> {
    input
        .trim()
        .parse::<DeviceId>()
        .map(|id| id.to_string())
        .map_err(|e| KeyvaultError::InvalidArgument(format!("device_id {input:?}: {e}")))
}

/// The record for an id, if registered.
/// The record for an id (if registered) and the seconds of quarantine left
/// on it (if quarantined; -1: no expiry), in one round trip: the handshake
/// needs both, and each round trip costs keyvault and Redis CPU.
pub async fn get_with_quarantine(
    redis: &mut Redis,
    device_id: &str,
) -> Result<(Option<DeviceRecord>, Option<i64>)> {
    let (map, ttl): (HashMap<String, String>, i64) = redis::pipe()
        .hgetall(keys::device(device_id))
        .ttl(keys::quarantine(device_id))
        .query_async(redis)
        .await?;
    let record = DeviceRecord::from_hash(device_id, &map)?;
    // TTL -2: no key; -1: a key without expiry (set by hand): quarantined.
    Ok((record, (ttl != -2).then_some(ttl)))
}

pub async fn get(redis: &mut Redis, device_id: &str) -> Result<Option<DeviceRecord>> {
    let map: HashMap<String, String> = redis.hgetall(keys::device(device_id)).await?;
    DeviceRecord::from_hash(device_id, &map)
}

// Writes a record only if the stored state is still the one the caller saw:
// ARGV[1] = "" (no record) or the public key hex of a revoked record.
static PUT_IF_UNCHANGED: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(PUT_IF_UNCHANGED_LUA));
const PUT_IF_UNCHANGED_LUA: &str = r#"
local current = redis.call('HGET', KEYS[1], 'public_key_der')
if ARGV[1] == '' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
else
  if current ~= ARGV[1] or redis.call('HGET', KEYS[1], 'revoked') ~= '1' then return 0 end
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SADD', KEYS[2], ARGV[2])
return 1
"#;

pub async fn register(
    redis: &mut Redis,
    req: pb::RegisterDeviceRequest,
    actor: &str,
) -> Result<DeviceRecord> {
    let device_id = parse_device_id(&req.device_id)?;
    if req.public_key.is_empty() {
        return Err(KeyvaultError::InvalidArgument(
            "public_key is empty: give the device's RSA public key as SubjectPublicKeyInfo DER or PEM \
             (\"-----BEGIN PUBLIC KEY-----\")"
                .into(),
        ));
    }
    let key = trellis_core::keys::parse_public_key(&req.public_key)
        .map_err(|e| KeyvaultError::InvalidArgument(format!("public_key: {e}")))?;
    // The reply carries the session material encrypted to the device key in
    // exactly 128 bytes (PROTOCOL.md): only RSA-1024 device keys can work.
    let bits = rsa::traits::PublicKeyParts::size(&key) * 8;
    if bits != DEVICE_KEY_BITS {
        return Err(KeyvaultError::InvalidArgument(format!(
            "public_key is RSA-{bits}; device keys are RSA-{DEVICE_KEY_BITS} (protocol version 1)"
        )));
    }
    let der = trellis_core::keys::public_key_der(&req.public_key)
        .map_err(|e| KeyvaultError::InvalidArgument(format!("public_key: {e}")))?;
    let organization = match req.organization.trim() {
        "" => keys::DEFAULT_ORG.to_string(),
        org => org.to_string(),
    };
    let existing = get(redis, &device_id).await?;
    let expected = match &existing {
        None => String::new(),
        Some(rec) if rec.public_key_der == der && rec.revoked => {
            return Err(KeyvaultError::FailedPrecondition(format!(
                "device {device_id} was revoked with this key, and a revoked key is never trusted again; \
                 register the device with a new key"
            )));
        }
        Some(rec) if rec.public_key_der == der => {
            if rec.product_id != req.product_id || rec.organization != organization {
                return Err(KeyvaultError::FailedPrecondition(format!(
                    "device {device_id} is already registered with this key for product {} in organization \
                     {:?}; it cannot move to product {} / {:?} by registering again",
                    rec.product_id, rec.organization, req.product_id, organization
                )));
            }
            return Ok(rec.clone());
        }
        Some(rec) if !rec.revoked => {
            return Err(KeyvaultError::FailedPrecondition(format!(
                "device {device_id} is already registered with a different public key (key id {}); \
                 revoke it first if the device was re-keyed",
                trellis_core::keys::key_id(&rec.public_key_der)
            )));
        }
        Some(rec) => hex::encode(&rec.public_key_der),
    };
    let kept_name = existing
        .as_ref()
        .filter(|r| r.organization == organization)
        .map(|r| r.name.clone())
        .unwrap_or_default();
    let record = DeviceRecord {
        device_id: device_id.clone(),
        organization,
        product_id: req.product_id,
        public_key_der: der,
        revoked: false,
        registered_at_ms: now_ms(),
        revoked_at_ms: 0,
        revoke_reason: String::new(),
        tags: Vec::new(),
        // A revoked device registered again in its organisation keeps its
        // name (the organisation's name index still points at this id).
        name: kept_name,
        next_public_key_der: Vec::new(),
    };
    let mut script = PUT_IF_UNCHANGED.prepare_invoke();
    script
        .key(keys::device(&device_id))
        .key(keys::DEVICE_INDEX)
        .arg(&expected)
        .arg(&device_id);
    for (k, v) in record.fields() {
        script.arg(k).arg(v);
    }
    let written: i64 = script.invoke_async(redis).await?;
    if written != 1 {
        return Err(KeyvaultError::FailedPrecondition(format!(
            "device {device_id} was changed by another request at the same time; look at it \
             (GetDevice) and retry"
        )));
    }
    let outcome = if existing.is_some() {
        "replaced_revoked"
    } else {
        "ok"
    };
    audit_write(
        redis,
        AuditRecord::new(actor, "register", &device_id, outcome)
            .with("product_id", record.product_id.to_string())
            .with("key_id", trellis_core::keys::key_id(&record.public_key_der)),
    )
    .await;
    tracing::info!(device_id = %device_id, product_id = record.product_id, "device registered");
    Ok(record)
}

pub async fn get_device(redis: &mut Redis, device_id: &str) -> Result<DeviceRecord> {
    let device_id = parse_device_id(device_id)?;
    get(redis, &device_id)
        .await?
        .ok_or_else(|| not_registered(&device_id))
}

/// All devices (or those of one product, `product_id` != 0), sorted by id.
pub async fn list(redis: &mut Redis, product_id: u32) -> Result<Vec<DeviceRecord>> {
    let mut ids: Vec<String> = redis.smembers(keys::DEVICE_INDEX).await?;
    ids.sort();
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.hgetall(keys::device(id));
        }
        let maps: Vec<HashMap<String, String>> = pipe.query_async(redis).await?;
        for (id, map) in chunk.iter().zip(maps) {
            if map.is_empty() {
                continue;
            }
            let rec = DeviceRecord::from_fields(id, &map)?;
            if product_id == 0 || rec.product_id == product_id {
                out.push(rec);
            }
        }
    }
    Ok(out)
}

// Marks a record revoked if it exists; returns 0 if there is none.
static REVOKE: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(REVOKE_LUA));
// KEYS: record, revocation stream. ARGV: time, reason, device id.
// Every revoke (a repeated one too) tells the gateways to close the
// device's session.
const REVOKE_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', '10000', '*', 'device', ARGV[3], 'reason', ARGV[2], 'time_ms', ARGV[1])
if redis.call('HGET', KEYS[1], 'revoked') == '1' then return 2 end
redis.call('HSET', KEYS[1], 'revoked', '1', 'revoked_at_ms', ARGV[1], 'revoke_reason', ARGV[2])
return 1
"#;

/// Revokes a device: it can no longer open a session; the record is kept.
/// Revoking a revoked device is a no-op.
pub async fn revoke(
    redis: &mut Redis,
    device_id: &str,
    reason: &str,
    actor: &str,
) -> Result<DeviceRecord> {
    let device_id = parse_device_id(device_id)?;
    let result: i64 = REVOKE
        .key(keys::device(&device_id))
        .key(keys::REVOCATIONS)
        .arg(now_ms())
        .arg(reason)
        .arg(&device_id)
        .invoke_async(redis)
        .await?;
    if result == 0 {
        return Err(not_registered(&device_id));
    }
    if result == 1 {
        audit_write(
            redis,
            AuditRecord::new(actor, "revoke", &device_id, "ok").with("reason", reason),
        )
        .await;
        tracing::info!(device_id = %device_id, reason, "device revoked");
    }
    get_device(redis, &device_id).await
}

static DELETE: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(DELETE_LUA));
// KEYS: record, index, revocation stream. ARGV: time, reason, device id.
const DELETE_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local name = redis.call('HGET', KEYS[1], 'name')
if name and name ~= '' then
  local org = redis.call('HGET', KEYS[1], 'organization') or ''
  if org == '' then org = ARGV[4] end
  local names = ARGV[5] .. org
  if redis.call('HGET', names, string.lower(name)) == ARGV[3] then
    redis.call('HDEL', names, string.lower(name))
  end
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[3])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', '10000', '*', 'device', ARGV[3], 'reason', ARGV[2], 'time_ms', ARGV[1])
return 1
"#;

/// Deletes a device's record (its key is no longer trusted, its id can be
/// registered again) and closes its live session. Its audit history stays.
pub async fn delete(redis: &mut Redis, device_id: &str, reason: &str, actor: &str) -> Result<()> {
    let device_id = parse_device_id(device_id)?;
    let deleted: i64 = DELETE
        .key(keys::device(&device_id))
        .key(keys::DEVICE_INDEX)
        .key(keys::REVOCATIONS)
        .arg(now_ms())
        .arg(reason)
        .arg(&device_id)
        .arg(keys::DEFAULT_ORG)
        .arg(keys::device_names(""))
        .invoke_async(redis)
        .await?;
    if deleted == 0 {
        return Err(not_registered(&device_id));
    }
    audit_write(
        redis,
        AuditRecord::new(actor, "delete", &device_id, "ok").with("reason", reason),
    )
    .await;
    tracing::info!(device_id = %device_id, reason, "device deleted");
    Ok(())
}

/// Lifts a clone quarantine; true when there was one.
pub async fn lift_quarantine(redis: &mut Redis, device_id: &str, actor: &str) -> Result<bool> {
    let device_id = parse_device_id(device_id)?;
    let removed: i64 = redis::AsyncCommands::del(redis, keys::quarantine(&device_id)).await?;
    audit_write(
        redis,
        AuditRecord::new(
            actor,
            "quarantine_lift",
            &device_id,
            if removed > 0 { "ok" } else { "not_quarantined" },
        ),
    )
    .await;
    Ok(removed > 0)
}

fn not_registered(device_id: &str) -> KeyvaultError {
    KeyvaultError::NotFound(format!("device {device_id} is not registered"))
}

/// Most tags one device may carry.
pub const MAX_TAGS: usize = 16;

/// Checks and normalises a tag set: each tag 1..=64 characters of
/// `[a-z0-9._-]` (stored as given, lowercased), at most [`MAX_TAGS`],
/// duplicates folded; returned sorted. Commas would break the stored form
/// and the `--tag` flags, so the alphabet is narrow on purpose.
pub fn parse_tags(tags: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::with_capacity(tags.len());
    for tag in tags {
        let tag = tag.trim().to_lowercase();
        if tag.is_empty() || tag.len() > 64 {
            return Err(KeyvaultError::InvalidArgument(format!(
                "tag {tag:?} must be 1 to 64 characters"
            )));
        }
        if let Some(bad) = tag
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(*c)))
        {
            return Err(KeyvaultError::InvalidArgument(format!(
                "tag {tag:?} has {bad:?}; tags use a-z, 0-9, '.', '_' and '-'"
            )));
        }
        out.push(tag);
    }
    out.sort();
    out.dedup();
    if out.len() > MAX_TAGS {
        return Err(KeyvaultError::InvalidArgument(format!(
            "{} tags given; a device carries at most {MAX_TAGS}",
            out.len()
        )));
    }
    Ok(out)
}

// Sets the tags field of an existing record; returns 0 if there is none.
static SET_TAGS: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(SET_TAGS_LUA));
const SET_TAGS_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'tags', ARGV[1])
return 1
"#;

/// Replaces a device's tags (revoked devices too: tags describe the
/// hardware, not the key).
pub async fn set_tags(
    redis: &mut Redis,
    device_id: &str,
    tags: &[String],
    actor: &str,
) -> Result<DeviceRecord> {
    let device_id = parse_device_id(device_id)?;
    let tags = parse_tags(tags)?;
    let joined = tags.join(",");
    let result: i64 = SET_TAGS
        .key(keys::device(&device_id))
        .arg(&joined)
        .invoke_async(redis)
        .await?;
    if result == 0 {
        return Err(not_registered(&device_id));
    }
    audit_write(
        redis,
        AuditRecord::new(actor, "set_tags", &device_id, "ok").with("tags", joined),
    )
    .await;
    get_device(redis, &device_id).await
}

/// Checks a device name: 1..=64 of `[A-Za-z0-9_-]`, and not something that
/// reads as a device id (24 hex characters), so that a path segment is
/// never ambiguous. Empty means "no name".
pub fn parse_name(name: &str) -> Result<String> {
    let name = name.trim();
    if name.is_empty() {
        return Ok(String::new());
    }
    if name.len() > 64 {
        return Err(KeyvaultError::InvalidArgument(format!(
            "device name {name:?} is longer than 64 characters"
        )));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(KeyvaultError::InvalidArgument(format!(
            "device name {name:?} has {bad:?}; names use letters, digits, '_' and '-'"
        )));
    }
    if name.parse::<DeviceId>().is_ok() {
        return Err(KeyvaultError::InvalidArgument(format!(
            "device name {name:?} reads as a device id; choose another"
        )));
    }
    Ok(name.to_string())
}

// Renames: KEYS[1] the record, ARGV[1] the id, ARGV[2] the new name ('' to
// clear), ARGV[3] the names-hash prefix, ARGV[4] the default organisation.
// Returns 0 if there is no record, -1 if another device has the name, 1.
static SET_NAME: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(SET_NAME_LUA));
const SET_NAME_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local org = redis.call('HGET', KEYS[1], 'organization') or ''
if org == '' then org = ARGV[4] end
local names = ARGV[3] .. org
local new = string.lower(ARGV[2])
if new ~= '' then
  local holder = redis.call('HGET', names, new)
  if holder and holder ~= ARGV[1] then return -1 end
end
local old = redis.call('HGET', KEYS[1], 'name')
if old and old ~= '' and redis.call('HGET', names, string.lower(old)) == ARGV[1] then
  redis.call('HDEL', names, string.lower(old))
end
redis.call('HSET', KEYS[1], 'name', ARGV[2])
if new ~= '' then redis.call('HSET', names, new, ARGV[1]) end
return 1
"#;

/// Names a device (Particle's rename), unique within its organisation
/// regardless of case; an empty name removes it. Audited.
pub async fn set_name(
    redis: &mut Redis,
    device_id: &str,
    name: &str,
    actor: &str,
) -> Result<DeviceRecord> {
    let device_id = parse_device_id(device_id)?;
    let name = parse_name(name)?;
    let result: i64 = SET_NAME
        .key(keys::device(&device_id))
        .arg(&device_id)
        .arg(&name)
        .arg(keys::device_names(""))
        .arg(keys::DEFAULT_ORG)
        .invoke_async(redis)
        .await?;
    match result {
        0 => return Err(not_registered(&device_id)),
        -1 => {
            return Err(KeyvaultError::FailedPrecondition(format!(
                "another device of the organisation is named {name:?}"
            )));
        }
        _ => {}
    }
    audit_write(
        redis,
        AuditRecord::new(actor, "set_name", &device_id, "ok").with("name", name),
    )
    .await;
    get_device(redis, &device_id).await
}

/// The id of the device named `name` in `org`, if any.
pub async fn id_for_name(redis: &mut Redis, org: &str, name: &str) -> Result<Option<String>> {
    let id: Option<String> =
        redis::AsyncCommands::hget(redis, keys::device_names(org), name.trim().to_lowercase())
            .await?;
    Ok(id)
}

/// Keeps an unknown device's offered key, never trusted: an operator can
/// look at it and register the device. Expires after 30 days so unknown ids
/// cannot fill Redis for ever.
pub async fn keep_pending(
    redis: &mut Redis,
    device_id: &str,
    public_key_der: &[u8],
    gateway_id: &str,
    peer_addr: &str,
) -> Result<()> {
    const TTL_SECS: i64 = 30 * 24 * 3600;
    let key = keys::pending_device(device_id);
    let now = now_ms().to_string();
    let _: () = redis::pipe()
        .atomic()
        .hset_multiple(
            &key,
            &[
                ("device_id", device_id),
                ("public_key_der", &hex::encode(public_key_der)),
                ("last_seen_ms", &now),
                ("gateway_id", gateway_id),
                ("peer_addr", peer_addr),
            ],
        )
        .ignore()
        .hset_nx(&key, "first_seen_ms", &now)
        .ignore()
        .hincr(&key, "attempts", 1)
        .ignore()
        .expire(&key, TTL_SECS)
        .ignore()
        .zadd(keys::PENDING_INDEX, device_id, &now)
        .ignore()
        .query_async(redis)
        .await?;
    Ok(())
}

/// How long a pending record lives after the device's last attempt.
const PENDING_TTL_MS: i64 = 30 * 24 * 3600 * 1000;

fn pending_from_hash(h: &HashMap<String, String>) -> Option<pb::PendingDevice> {
    let num = |k: &str| h.get(k).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
    let der = hex::decode(h.get("public_key_der")?).ok()?;
    Some(pb::PendingDevice {
        device_id: h.get("device_id")?.clone(),
        key_id: trellis_core::keys::key_id(&der),
        public_key_der: der,
        first_seen_ms: num("first_seen_ms"),
        last_seen_ms: num("last_seen_ms"),
        attempts: u64::try_from(num("attempts")).unwrap_or(0),
        gateway_id: h.get("gateway_id").cloned().unwrap_or_default(),
        peer_addr: h.get("peer_addr").cloned().unwrap_or_default(),
    })
}

pub async fn get_pending(redis: &mut Redis, device_id: &str) -> Result<Option<pb::PendingDevice>> {
    let device_id = parse_device_id(device_id)?;
    let h: HashMap<String, String> = redis.hgetall(keys::pending_device(&device_id)).await?;
    Ok(pending_from_hash(&h))
}

/// The most recently seen pending devices, newest first.
pub async fn list_pending(redis: &mut Redis, limit: usize) -> Result<Vec<pb::PendingDevice>> {
    // Records expire on their own; their index entries go here.
    let _: () = redis
        .zrembyscore(keys::PENDING_INDEX, "-inf", now_ms() - PENDING_TTL_MS)
        .await?;
    let ids: Vec<String> = redis
        .zrevrange(keys::PENDING_INDEX, 0, limit.max(1) as isize - 1)
        .await?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for id in &ids {
        pipe.hgetall(keys::pending_device(id));
    }
    let maps: Vec<HashMap<String, String>> = pipe.query_async(redis).await?;
    Ok(maps.iter().filter_map(pending_from_hash).collect())
}

/// Drops a pending record; false when there was none.
pub async fn drop_pending(redis: &mut Redis, device_id: &str) -> Result<bool> {
    let device_id = parse_device_id(device_id)?;
    let (removed, _): (i64, i64) = redis::pipe()
        .atomic()
        .del(keys::pending_device(&device_id))
        .zrem(keys::PENDING_INDEX, &device_id)
        .query_async(redis)
        .await?;
    Ok(removed > 0)
}

// Device key rotation. KEYS: the record. ARGV: the current key hex the
// caller checked the offer against, the new key hex. 0: the record changed
// (or is revoked, or gone).
static SET_NEXT_KEY: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('HGET', KEYS[1], 'public_key_der') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'revoked') == '1' then return 0 end
redis.call('HSET', KEYS[1], 'next_public_key_der', ARGV[2])
return 1
"#,
    )
});

// KEYS: the record. ARGV: the next key hex seen. Promotes it: 0 when the
// record no longer has that next key (another handshake promoted it).
static PROMOTE_NEXT_KEY: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('HGET', KEYS[1], 'next_public_key_der') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'revoked') == '1' then return 0 end
redis.call('HSET', KEYS[1], 'public_key_der', ARGV[1], 'next_public_key_der', '')
return 1
"#,
    )
});

/// Device key rotation (docs/protocol.md §6.8): checks the device's offer
/// (its new RSA-1024 key, signed by its registered key over the domain-
/// separated message) and records the new key as the device's next key.
/// Audited, refusals too.
pub async fn register_next_key(
    redis: &mut Redis,
    device_id: &str,
    offer: &[u8],
    actor: &str,
) -> Result<DeviceRecord> {
    let device_id = parse_device_id(device_id)?;
    let record = get_device(redis, &device_id).await?;
    if record.revoked {
        return Err(KeyvaultError::FailedPrecondition(format!(
            "device {device_id} is revoked"
        )));
    }
    let parsed = match trellis_wire::rotation::DeviceKeyOffer::parse(offer) {
        Ok(p) => p,
        Err(e) => return Err(refuse_offer(redis, actor, &device_id, e.to_string()).await),
    };
    let registered = trellis_core::keys::parse_public_key(&record.public_key_der).map_err(|e| {
        KeyvaultError::Internal(format!(
            "the registered key of device {device_id} does not parse ({e})"
        ))
    })?;
    let id: DeviceId = device_id
        .parse()
        .map_err(|e| KeyvaultError::InvalidArgument(format!("device_id: {e}")))?;
    if let Err(e) = parsed.verify(&registered, id) {
        return Err(refuse_offer(redis, actor, &device_id, e.to_string()).await);
    }
    let der = match trellis_core::keys::public_key_der(&parsed.public_key_der) {
        Ok(d) => d,
        Err(e) => return Err(refuse_offer(redis, actor, &device_id, e.to_string()).await),
    };
    if der == record.public_key_der {
        return Err(refuse_offer(
            redis,
            actor,
            &device_id,
            "the new key is the registered key".into(),
        )
        .await);
    }
    let written: i64 = SET_NEXT_KEY
        .key(keys::device(&device_id))
        .arg(hex::encode(&record.public_key_der))
        .arg(hex::encode(&der))
        .invoke_async(redis)
        .await?;
    if written != 1 {
        return Err(KeyvaultError::FailedPrecondition(format!(
            "device {device_id} was changed by another request at the same time; retry"
        )));
    }
    audit_write(
        redis,
        AuditRecord::new(actor, "device_key_offer", &device_id, "ok")
            .with("key_id", trellis_core::keys::key_id(&record.public_key_der))
            .with("next_key_id", trellis_core::keys::key_id(&der)),
    )
    .await;
    get_device(redis, &device_id).await
}

async fn refuse_offer(
    redis: &mut Redis,
    actor: &str,
    device_id: &str,
    reason: String,
) -> KeyvaultError {
    audit_write(
        redis,
        AuditRecord::new(actor, "device_key_offer", device_id, "refused")
            .with("reason", reason.clone()),
    )
    .await;
    KeyvaultError::FailedPrecondition(format!("device {device_id}'s new key is refused: {reason}"))
}

/// Makes the device's next key its key (its first handshake under it);
/// the old key is refused from then on. Audited. `None`: someone else
/// promoted it first (the caller reads the record again).
pub async fn promote_next_key(
    redis: &mut Redis,
    record: &DeviceRecord,
) -> Result<Option<DeviceRecord>> {
    let promoted: i64 = PROMOTE_NEXT_KEY
        .key(keys::device(&record.device_id))
        .arg(hex::encode(&record.next_public_key_der))
        .invoke_async(redis)
        .await?;
    if promoted != 1 {
        return get(redis, &record.device_id).await;
    }
    audit_write(
        redis,
        AuditRecord::new("keyvault", "device_key_promote", &record.device_id, "ok")
            .with(
                "retired_key_id",
                trellis_core::keys::key_id(&record.public_key_der),
            )
            .with(
                "key_id",
                trellis_core::keys::key_id(&record.next_public_key_der),
            ),
    )
    .await;
    tracing::info!(device_id = %record.device_id, "device key rotated: next key promoted, old key retired");
    get(redis, &record.device_id).await
}

/// Appends an audit record; a failure is logged loudly but does not fail the
/// request (the change itself is already stored).
pub async fn audit_write(redis: &mut Redis, record: AuditRecord) {
    audit::append_logged(redis, &record).await;
}

//! The signer's durable records in Redis, one function per read or write.
//! Every write is a single Lua script or command, so a request that fails
//! leaves either the whole record or nothing:
//!
//! - images and releases: their layout and reads are in
//!   `trellis_records::release` (gateways and keyvault read them too); the
//!   writes are here;
//! - policy releases (trust policy rotations): layout and reads in
//!   `trellis_records::policy_release`, the write here;
//! - `keys::policy(product)`: the product's signing policy in the firmware
//!   crate's `TrustPolicy` JSON form (the same file a device is provisioned
//!   with), plus `"allow_cloud_only": true` when the operator accepted a
//!   policy cloud keys alone can meet (see [`StoredPolicy`]; devices ignore
//!   the field).
use crate::error::{Result, SignerError};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use std::sync::LazyLock;
use trellis_core::redis_conn::{Redis, keys};
use trellis_firmware::{ManifestSignature, TrustPolicy};

// The record layouts gateways and keyvault read as well.
pub use trellis_records::release::{
    ImageMeta, ReleaseRecord, SignatureJson, get_image_bytes, get_image_meta, get_release,
    list_releases,
};

// KEYS: image, meta, index. ARGV: bytes, sha, then meta field/value pairs.
// Returns 1 when stored, 0 when an image with this SHA-256 already exists.
static PUT_IMAGE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'NX')
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
redis.call('SADD', KEYS[3], ARGV[2])
return 1
"#,
    )
});

/// Stores an image and its metadata in one step. An image with the same
/// SHA-256 already stored is kept as it is; the stored metadata is returned.
pub async fn put_image(redis: &mut Redis, meta: &ImageMeta, bytes: &[u8]) -> Result<ImageMeta> {
    let mut invocation = PUT_IMAGE.prepare_invoke();
    invocation
        .key(keys::image(&meta.sha256))
        .key(keys::image_meta(&meta.sha256))
        .key(keys::IMAGE_INDEX)
        .arg(bytes)
        .arg(&meta.sha256);
    for (k, v) in meta.fields() {
        invocation.arg(k).arg(v);
    }
    let stored: i64 = invocation.invoke_async(redis).await?;
    if stored == 1 {
        return Ok(meta.clone());
    }
    get_image_meta(redis, &meta.sha256).await?.ok_or_else(|| {
        SignerError::Internal(format!(
            "image {} vanished while being stored; upload it again",
            meta.sha256
        ))
    })
}

// KEYS: release, image meta, release index. ARGV: release id, then field/value
// pairs. Returns -1 when the image is gone, 0 when the release exists, 1 when
// stored.
static CREATE_RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"#,
    )
});

/// Outcome of [`create_release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    Stored,
    ReleaseExists,
    ImageGone,
}

/// Stores a new release, only if its image still exists and no release with
/// the same id does, in one step.
pub async fn create_release(redis: &mut Redis, record: &ReleaseRecord) -> Result<Created> {
    let mut invocation = CREATE_RELEASE.prepare_invoke();
    invocation
        .key(keys::release(&record.release_id))
        .key(keys::image_meta(&record.image_sha256))
        .key(keys::RELEASE_INDEX)
        .arg(&record.release_id);
    for (k, v) in record.fields()? {
        invocation.arg(k).arg(v);
    }
    let r: i64 = invocation.invoke_async(redis).await?;
    Ok(match r {
        1 => Created::Stored,
        0 => Created::ReleaseExists,
        _ => Created::ImageGone,
    })
}

// KEYS: policy release, policy index, by-sha pointer. ARGV: id, then field/
// value pairs. Returns 1 when stored, 0 when the id exists.
static CREATE_POLICY_RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[1])
return 1
"#,
    )
});

/// Stores a new policy release (record, index, by-SHA pointer) in one
/// step; `false` when one with the same id exists.
pub async fn create_policy_release(
    redis: &mut Redis,
    record: &trellis_records::policy_release::PolicyReleaseRecord,
) -> Result<bool> {
    let mut invocation = CREATE_POLICY_RELEASE.prepare_invoke();
    invocation
        .key(keys::release(&record.release_id))
        .key(keys::POLICY_RELEASE_INDEX)
        .key(keys::policy_release_by_sha(&record.sha256()))
        .arg(&record.release_id);
    for (k, v) in record.fields()? {
        invocation.arg(k).arg(v);
    }
    let r: i64 = invocation.invoke_async(redis).await?;
    Ok(r == 1)
}

// KEYS: release. ARGV: key id, base64 signature. Returns -1 when the release
// is gone, 0 when this key already signed (kept as it was), 1 when added.
static ADD_SIGNATURE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local raw = redis.call('HGET', KEYS[1], 'signatures')
local sigs = {}
if raw and raw ~= '' then sigs = cjson.decode(raw) end
for _, s in ipairs(sigs) do
  if s['key_id'] == ARGV[1] then return 0 end
end
sigs[#sigs + 1] = { key_id = ARGV[1], signature = ARGV[2] }
redis.call('HSET', KEYS[1], 'signatures', cjson.encode(sigs))
return 1
"#,
    )
});

/// Outcome of [`add_signature`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    Added,
    AlreadySigned,
    ReleaseGone,
}

/// Appends a (verified) signature, unless the same key already signed.
pub async fn add_signature(
    redis: &mut Redis,
    release_id: &str,
    signature: &ManifestSignature,
) -> Result<Added> {
    let r: i64 = ADD_SIGNATURE
        .key(keys::release(release_id))
        .arg(&signature.key_id)
        .arg(B64.encode(&signature.signature))
        .invoke_async(redis)
        .await?;
    Ok(match r {
        1 => Added::Added,
        0 => Added::AlreadySigned,
        _ => Added::ReleaseGone,
    })
}

/// A product's signing policy as stored: the policy (validated when read,
/// by `TrustPolicy`'s deserializer) and whether the operator accepted that
/// cloud keys alone meet it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredPolicy {
    #[serde(flatten)]
    pub policy: TrustPolicy,
    /// Set with `SetPolicyRequest.allow_cloud_only` when the cloud's keys
    /// alone meet the threshold. Absent (false) in older records.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_cloud_only: bool,
}

pub async fn put_policy(redis: &mut Redis, product_id: u32, policy: &StoredPolicy) -> Result<()> {
    let json =
        serde_json::to_string_pretty(policy).map_err(|e| SignerError::Internal(e.to_string()))?;
    let _: () = redis.set(keys::policy(product_id), json).await?;
    Ok(())
}

pub async fn get_policy(redis: &mut Redis, product_id: u32) -> Result<Option<StoredPolicy>> {
    let raw: Option<String> = redis.get(keys::policy(product_id)).await?;
    raw.map(|json| {
        serde_json::from_str::<StoredPolicy>(&json).map_err(|e| {
            SignerError::Corrupt(format!(
                "the signing policy {} is damaged ({e}); set it again with `trellis policy set`",
                keys::policy(product_id)
            ))
        })
    })
    .transpose()
}

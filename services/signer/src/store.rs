//! The signer's durable records in Redis, one function per read or write.
//! Every write is a single Lua script or command, so a request that fails
//! leaves either the whole record or nothing:
//!
//! - `keys::image(sha)`: the image bytes (written once, `SET NX`), with
//!   `keys::image_meta(sha)` (hash: sha256, size, product_id, organization,
//!   uploaded_at_ms) and the index `keys::IMAGE_INDEX`;
//! - `keys::release(id)`: hash with release_id, product_id, version,
//!   organization, image_sha256, image_size, manifest (the exact signed
//!   bytes, binary), signatures (JSON, see [`SignatureJson`]), created_at_ms;
//!   index `keys::RELEASE_INDEX`;
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
use std::collections::HashMap;
use std::sync::LazyLock;
use trellis_core::redis_conn::{Redis, keys};
use trellis_firmware::{ManifestSignature, SignedManifest, TrustPolicy};
use trellis_proto::v1 as pb;

/// A stored image's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageMeta {
    pub sha256: String,
    pub size: u64,
    pub product_id: u32,
    pub organization: String,
    pub uploaded_at_ms: i64,
}

impl ImageMeta {
    pub fn to_proto(&self) -> pb::Image {
        pb::Image {
            sha256: self.sha256.clone(),
            size: self.size,
            product_id: self.product_id,
            uploaded_at_ms: self.uploaded_at_ms,
        }
    }

    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("sha256", self.sha256.clone()),
            ("size", self.size.to_string()),
            ("product_id", self.product_id.to_string()),
            ("organization", self.organization.clone()),
            ("uploaded_at_ms", self.uploaded_at_ms.to_string()),
        ]
    }

    fn from_fields(sha256: &str, map: &HashMap<String, String>) -> Result<Self> {
        let damaged = |what: &str| {
            SignerError::Corrupt(format!(
                "the image record {} is damaged ({what}); upload the image again",
                keys::image_meta(sha256)
            ))
        };
        let get = |k: &str| map.get(k).map(String::as_str).unwrap_or_default();
        Ok(Self {
            sha256: sha256.to_string(),
            size: get("size").parse().map_err(|_| damaged("size"))?,
            product_id: get("product_id")
                .parse()
                .map_err(|_| damaged("product_id"))?,
            organization: get("organization").to_string(),
            uploaded_at_ms: get("uploaded_at_ms").parse().unwrap_or(0),
        })
    }
}

/// One signature as stored in a release's `signatures` JSON array.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureJson {
    /// Lowercase hex SHA-256 of the signer's SPKI DER.
    pub key_id: String,
    /// The RSA-PSS signature, standard base64.
    pub signature: String,
}

/// A stored release.
#[derive(Debug, Clone, PartialEq)]
pub struct ReleaseRecord {
    pub release_id: String,
    pub product_id: u32,
    pub version: u32,
    pub organization: String,
    pub image_sha256: String,
    pub image_size: u64,
    /// The exact signed manifest bytes.
    pub manifest: Vec<u8>,
    pub signatures: Vec<ManifestSignature>,
    pub created_at_ms: i64,
}

impl ReleaseRecord {
    pub fn signed_manifest(&self) -> SignedManifest {
        SignedManifest {
            manifest: self.manifest.clone(),
            signatures: self.signatures.clone(),
        }
    }

    pub fn to_proto(&self) -> pb::Release {
        pb::Release {
            release_id: self.release_id.clone(),
            product_id: self.product_id,
            version: self.version,
            image_sha256: self.image_sha256.clone(),
            image_size: self.image_size,
            signed: Some(self.signed_manifest()),
            created_at_ms: self.created_at_ms,
            // Filled by the service on the replies that carry it.
            policy_warning: String::new(),
        }
    }

    fn fields(&self) -> Result<Vec<(&'static str, Vec<u8>)>> {
        Ok(vec![
            ("release_id", self.release_id.clone().into_bytes()),
            ("product_id", self.product_id.to_string().into_bytes()),
            ("version", self.version.to_string().into_bytes()),
            ("organization", self.organization.clone().into_bytes()),
            ("image_sha256", self.image_sha256.clone().into_bytes()),
            ("image_size", self.image_size.to_string().into_bytes()),
            ("manifest", self.manifest.clone()),
            (
                "signatures",
                signatures_json(&self.signatures)?.into_bytes(),
            ),
            ("created_at_ms", self.created_at_ms.to_string().into_bytes()),
        ])
    }

    fn from_fields(release_id: &str, map: &HashMap<String, Vec<u8>>) -> Result<Self> {
        let damaged = |what: &str| {
            SignerError::Corrupt(format!(
                "the release record {} is damaged ({what}); create the release again under a new \
                 version",
                keys::release(release_id)
            ))
        };
        let text = |k: &str| -> Result<String> {
            String::from_utf8(map.get(k).cloned().unwrap_or_default()).map_err(|_| damaged(k))
        };
        let manifest = map.get("manifest").cloned().unwrap_or_default();
        if manifest.is_empty() {
            return Err(damaged("no manifest"));
        }
        let signatures_text = text("signatures")?;
        let signatures = if signatures_text.is_empty() {
            Vec::new()
        } else {
            parse_signatures_json(&signatures_text).map_err(|e| damaged(&e))?
        };
        Ok(Self {
            release_id: release_id.to_string(),
            product_id: text("product_id")?
                .parse()
                .map_err(|_| damaged("product_id"))?,
            version: text("version")?.parse().map_err(|_| damaged("version"))?,
            organization: text("organization")?,
            image_sha256: text("image_sha256")?,
            image_size: text("image_size")?
                .parse()
                .map_err(|_| damaged("image_size"))?,
            manifest,
            signatures,
            created_at_ms: text("created_at_ms")?.parse().unwrap_or(0),
        })
    }
}

fn signatures_json(signatures: &[ManifestSignature]) -> Result<String> {
    let list: Vec<SignatureJson> = signatures
        .iter()
        .map(|s| SignatureJson {
            key_id: s.key_id.clone(),
            signature: B64.encode(&s.signature),
        })
        .collect();
    serde_json::to_string(&list).map_err(|e| SignerError::Internal(e.to_string()))
}

fn parse_signatures_json(text: &str) -> Result<Vec<ManifestSignature>, String> {
    // Lua's cjson writes an empty table as `{}`.
    if text.trim() == "{}" {
        return Ok(Vec::new());
    }
    let list: Vec<SignatureJson> =
        serde_json::from_str(text).map_err(|e| format!("signatures: {e}"))?;
    list.into_iter()
        .map(|s| {
            Ok(ManifestSignature {
                signature: B64
                    .decode(&s.signature)
                    .map_err(|e| format!("signature by {}: {e}", s.key_id))?,
                key_id: s.key_id,
            })
        })
        .collect()
}

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

pub async fn get_image_meta(redis: &mut Redis, sha256: &str) -> Result<Option<ImageMeta>> {
    let map: HashMap<String, String> = redis.hgetall(keys::image_meta(sha256)).await?;
    if map.is_empty() {
        return Ok(None);
    }
    ImageMeta::from_fields(sha256, &map).map(Some)
}

pub async fn get_image_bytes(redis: &mut Redis, sha256: &str) -> Result<Option<Vec<u8>>> {
    Ok(redis.get(keys::image(sha256)).await?)
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

pub async fn get_release(redis: &mut Redis, release_id: &str) -> Result<Option<ReleaseRecord>> {
    let map: HashMap<String, Vec<u8>> = redis.hgetall(keys::release(release_id)).await?;
    if map.is_empty() {
        return Ok(None);
    }
    ReleaseRecord::from_fields(release_id, &map).map(Some)
}

/// Every release (of one product, unless `product_id` is 0), by product and
/// version.
pub async fn list_releases(redis: &mut Redis, product_id: u32) -> Result<Vec<ReleaseRecord>> {
    let mut ids: Vec<String> = redis.smembers(keys::RELEASE_INDEX).await?;
    if product_id != 0 {
        let prefix = format!("{product_id}-");
        ids.retain(|id| id.starts_with(&prefix));
    }
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(200) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.hgetall(keys::release(id));
        }
        let maps: Vec<HashMap<String, Vec<u8>>> = pipe.query_async(redis).await?;
        for (id, map) in chunk.iter().zip(maps) {
            if map.is_empty() {
                continue;
            }
            let record = ReleaseRecord::from_fields(id, &map)?;
            if product_id == 0 || record.product_id == product_id {
                out.push(record);
            }
        }
    }
    out.sort_by_key(|r| (r.product_id, r.version));
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_json_round_trip_and_cjson_forms() {
        let sigs = vec![ManifestSignature {
            key_id: "ab".repeat(32),
            signature: vec![0xfb, 0xff, 0x00, 0x3f],
        }];
        let json = signatures_json(&sigs).unwrap();
        assert_eq!(parse_signatures_json(&json).unwrap(), sigs);
        assert!(parse_signatures_json("{}").unwrap().is_empty());
        assert!(parse_signatures_json("[]").unwrap().is_empty());
        // cjson escapes '/' as "\/": still valid JSON.
        let escaped = r#"[{"signature":"+\/8APw==","key_id":"k"}]"#;
        assert_eq!(
            parse_signatures_json(escaped).unwrap()[0].signature,
            vec![0xfb, 0xff, 0x00, 0x3f]
        );
    }
}

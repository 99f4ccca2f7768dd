//! The signer's release and image records, as every service reads them:
//! the signer writes them (its store adds the writes), gateways read them
//! to deliver firmware, keyvault to check what it signs. One layout, in a
//! crate of its own, so no service crate depends on another.
//!
//! - `keys::image(sha)`: the image bytes (written once, `SET NX`), with
//!   `keys::image_meta(sha)` (hash: sha256, size, product_id, organization,
//!   uploaded_at_ms) and the index `keys::IMAGE_INDEX`;
//! - `keys::release(id)`: hash with release_id, product_id, version,
//!   organization, image_sha256, image_size, manifest (the exact signed
//!   bytes, binary), signatures (JSON, see [`SignatureJson`]), created_at_ms;
//!   index `keys::RELEASE_INDEX`.
use crate::RecordError;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use trellis_core::redis_conn::{Redis, keys};
use trellis_firmware::{ManifestSignature, SignedManifest};
use trellis_proto::v1 as pb;

type Result<T, E = RecordError> = std::result::Result<T, E>;

/// Parses `"<product_id>-<version>"` (both positive) into the canonical
/// id, product and version.
pub fn parse_release_id(input: &str) -> Result<(String, u32, u32)> {
    let s = input.trim();
    let bad = || {
        RecordError::Invalid(format!(
            "release id {input:?} is not \"<product_id>-<version>\" (for example \"7-3\"); \
             `trellis release list` shows them"
        ))
    };
    let (p, v) = s.split_once('-').ok_or_else(bad)?;
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
    if !digits(p) || !digits(v) {
        return Err(bad());
    }
    let product: u32 = p.parse().map_err(|_| bad())?;
    let version: u32 = v.parse().map_err(|_| bad())?;
    if product == 0 || version == 0 {
        return Err(bad());
    }
    Ok((make_release_id(product, version), product, version))
}

pub fn make_release_id(product_id: u32, version: u32) -> String {
    format!("{product_id}-{version}")
}

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

    pub fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("sha256", self.sha256.clone()),
            ("size", self.size.to_string()),
            ("product_id", self.product_id.to_string()),
            ("organization", self.organization.clone()),
            ("uploaded_at_ms", self.uploaded_at_ms.to_string()),
        ]
    }

    pub fn from_fields(sha256: &str, map: &HashMap<String, String>) -> Result<Self> {
        let damaged = |what: &str| {
            RecordError::Corrupt(format!(
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

    pub fn fields(&self) -> Result<Vec<(&'static str, Vec<u8>)>> {
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

    pub fn from_fields(release_id: &str, map: &HashMap<String, Vec<u8>>) -> Result<Self> {
        let damaged = |what: &str| {
            RecordError::Corrupt(format!(
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
        let signatures = parse_signatures_json(&text("signatures")?).map_err(|e| damaged(&e))?;
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

pub fn signatures_json(signatures: &[ManifestSignature]) -> Result<String> {
    let list: Vec<SignatureJson> = signatures
        .iter()
        .map(|s| SignatureJson {
            key_id: s.key_id.clone(),
            signature: B64.encode(&s.signature),
        })
        .collect();
    serde_json::to_string(&list).map_err(|e| RecordError::Internal(e.to_string()))
}

pub fn parse_signatures_json(text: &str) -> Result<Vec<ManifestSignature>, String> {
    // Lua's cjson writes an empty table as `{}`; a record not signed yet
    // has no field at all.
    if text.trim().is_empty() || text.trim() == "{}" {
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

/// Only a release's exact signed manifest bytes (keyvault's check that it
/// signs nothing else).
pub async fn get_manifest(redis: &mut Redis, release_id: &str) -> Result<Option<Vec<u8>>> {
    Ok(redis.hget(keys::release(release_id), "manifest").await?)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_ids_are_product_dash_version() {
        assert_eq!(parse_release_id(" 7-3 ").unwrap(), ("7-3".into(), 7, 3));
        for bad in ["7", "7-", "-3", "0-1", "7-0", "a-1", "7-3-1", "+7-3"] {
            assert!(parse_release_id(bad).is_err(), "{bad}");
        }
    }

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

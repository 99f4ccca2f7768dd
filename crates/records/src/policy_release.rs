//! Policy releases: a signed trust policy rotation for a product's devices
//! (docs/protocol.md §7.5), stored by the signer next to firmware releases
//! and read by gateways to deliver it and by keyvault to check what it
//! signs.
//!
//! - `keys::release(id)` with `id` = `"tp-<product_id>-<version>"`: hash with
//!   kind = `policy`, release_id, product_id, version, organization,
//!   manifest (the exact canonical `TrustPolicyDoc` bytes, binary),
//!   signatures (JSON as firmware releases), previous_version,
//!   previous_sha256 and previous_policy (the product's policy it rotates
//!   from: version, hex SHA-256, canonical bytes), created_at_ms;
//! - `keys::POLICY_RELEASE_INDEX`: set of policy release ids;
//! - `keys::policy_release_by_sha(sha)`: string, the id of the policy release
//!   whose bytes hash to `sha` (keyvault's lookup before it signs).
//!
//! The same key space as releases, so the readers' access rules
//! (`trellis:release:*`) cover them; release ids are digits only, so the
//! two never collide.
use crate::RecordError;
use crate::release::{parse_signatures_json, signatures_json};
use redis::AsyncCommands;
use std::collections::HashMap;
use trellis_core::redis_conn::{Redis, keys};
use trellis_firmware::{ManifestSignature, SignedPolicy};

type Result<T, E = RecordError> = std::result::Result<T, E>;

/// Prefix of every policy release id.
pub const POLICY_RELEASE_PREFIX: &str = "tp-";

/// `"tp-<product_id>-<version>"`.
pub fn make_policy_release_id(product_id: u32, version: u64) -> String {
    format!("{POLICY_RELEASE_PREFIX}{product_id}-{version}")
}

/// Whether `id` names a policy release rather than a firmware release.
pub fn is_policy_release_id(id: &str) -> bool {
    id.trim().starts_with(POLICY_RELEASE_PREFIX)
}

/// Parses `"tp-<product_id>-<version>"` (both positive).
pub fn parse_policy_release_id(input: &str) -> Result<(String, u32, u64)> {
    let bad = || {
        RecordError::Invalid(format!(
            "policy release id {input:?} is not \"tp-<product_id>-<version>\" (for example \
             \"tp-7-2\"); `trellis policy list` shows them"
        ))
    };
    let rest = input
        .trim()
        .strip_prefix(POLICY_RELEASE_PREFIX)
        .ok_or_else(bad)?;
    let (p, v) = rest.split_once('-').ok_or_else(bad)?;
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
    if !digits(p) || !digits(v) {
        return Err(bad());
    }
    let product: u32 = p.parse().map_err(|_| bad())?;
    let version: u64 = v.parse().map_err(|_| bad())?;
    if product == 0 || version == 0 {
        return Err(bad());
    }
    Ok((make_policy_release_id(product, version), product, version))
}

/// A stored policy release.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyReleaseRecord {
    pub release_id: String,
    pub product_id: u32,
    pub version: u64,
    pub organization: String,
    /// The exact canonical `TrustPolicyDoc` bytes that are signed.
    pub policy: Vec<u8>,
    pub signatures: Vec<ManifestSignature>,
    /// The product's policy this one rotates from: its version, SHA-256
    /// (hex) and canonical bytes (whose keys must sign this one).
    pub previous_version: u64,
    pub previous_sha256: String,
    pub previous_policy: Vec<u8>,
    pub created_at_ms: i64,
}

impl PolicyReleaseRecord {
    pub fn signed_policy(&self) -> SignedPolicy {
        SignedPolicy {
            policy: self.policy.clone(),
            signatures: self.signatures.clone(),
        }
    }

    /// Lowercase hex SHA-256 of the policy bytes (what devices report in
    /// their Hello, extension 0x04).
    pub fn sha256(&self) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&self.policy))
    }

    pub fn fields(&self) -> Result<Vec<(&'static str, Vec<u8>)>> {
        Ok(vec![
            ("kind", b"policy".to_vec()),
            ("release_id", self.release_id.clone().into_bytes()),
            ("product_id", self.product_id.to_string().into_bytes()),
            ("version", self.version.to_string().into_bytes()),
            ("organization", self.organization.clone().into_bytes()),
            ("manifest", self.policy.clone()),
            (
                "signatures",
                signatures_json(&self.signatures)?.into_bytes(),
            ),
            (
                "previous_version",
                self.previous_version.to_string().into_bytes(),
            ),
            ("previous_sha256", self.previous_sha256.clone().into_bytes()),
            ("previous_policy", self.previous_policy.clone()),
            ("created_at_ms", self.created_at_ms.to_string().into_bytes()),
        ])
    }

    pub fn from_fields(release_id: &str, map: &HashMap<String, Vec<u8>>) -> Result<Self> {
        let damaged = |what: &str| {
            RecordError::Corrupt(format!(
                "the policy release record {} is damaged ({what}); create the rotation again \
                 with a higher version",
                keys::release(release_id)
            ))
        };
        let text = |k: &str| -> Result<String> {
            String::from_utf8(map.get(k).cloned().unwrap_or_default()).map_err(|_| damaged(k))
        };
        if text("kind")? != "policy" {
            return Err(damaged("not a policy release"));
        }
        let policy = map.get("manifest").cloned().unwrap_or_default();
        if policy.is_empty() {
            return Err(damaged("no policy bytes"));
        }
        let signatures = parse_signatures_json(&text("signatures")?).map_err(|e| damaged(&e))?;
        Ok(Self {
            release_id: release_id.to_string(),
            product_id: text("product_id")?
                .parse()
                .map_err(|_| damaged("product_id"))?,
            version: text("version")?.parse().map_err(|_| damaged("version"))?,
            organization: text("organization")?,
            policy,
            signatures,
            previous_version: text("previous_version")?.parse().unwrap_or(0),
            previous_sha256: text("previous_sha256")?,
            previous_policy: map.get("previous_policy").cloned().unwrap_or_default(),
            created_at_ms: text("created_at_ms")?.parse().unwrap_or(0),
        })
    }
}

pub async fn get_policy_release(
    redis: &mut Redis,
    release_id: &str,
) -> Result<Option<PolicyReleaseRecord>> {
    let map: HashMap<String, Vec<u8>> = redis.hgetall(keys::release(release_id)).await?;
    if map.is_empty() {
        return Ok(None);
    }
    PolicyReleaseRecord::from_fields(release_id, &map).map(Some)
}

/// The id of the policy release whose bytes hash to `sha256_hex`, if any.
pub async fn policy_release_by_sha(redis: &mut Redis, sha256_hex: &str) -> Result<Option<String>> {
    Ok(redis.get(keys::policy_release_by_sha(sha256_hex)).await?)
}

/// Every policy release (of one product unless `product_id` is 0), by
/// product and version.
pub async fn list_policy_releases(
    redis: &mut Redis,
    product_id: u32,
) -> Result<Vec<PolicyReleaseRecord>> {
    let mut ids: Vec<String> = redis.smembers(keys::POLICY_RELEASE_INDEX).await?;
    if product_id != 0 {
        let prefix = format!("{POLICY_RELEASE_PREFIX}{product_id}-");
        ids.retain(|id| id.starts_with(&prefix));
    }
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(r) = get_policy_release(redis, &id).await? {
            out.push(r);
        }
    }
    out.sort_by_key(|r| (r.product_id, r.version));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_release_ids_are_tp_product_dash_version() {
        assert_eq!(
            parse_policy_release_id(" tp-7-3 ").unwrap(),
            ("tp-7-3".into(), 7, 3)
        );
        for bad in [
            "7-3", "tp-7", "tp--3", "tp-0-1", "tp-7-0", "tp-a-1", "tp-7-3-1",
        ] {
            assert!(parse_policy_release_id(bad).is_err(), "{bad}");
        }
        assert!(is_policy_release_id("tp-7-3"));
        assert!(!is_policy_release_id("7-3"));
        // Never a firmware release id.
        assert!(crate::release::parse_release_id("tp-7-3").is_err());
    }
}

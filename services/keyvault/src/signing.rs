//! Sign, GetSigningKey and ListSigningKeys: signatures with cloud-held keys
//! that are not the handshake key. Today one purpose exists, "release"
//! (firmware release manifests and trust policies, RSA-PSS-SHA256), with
//! versions ([`crate::release_key::RELEASE`]): Sign uses the version the
//! caller names by key id, or the current one. The private key never
//! leaves keyvault.
//!
//! Every Sign request is audited, refusals included: actor, purpose, key id,
//! the SHA-256 and length of the signed bytes, and the outcome. A signature
//! whose audit record cannot be written is not handed out: an unaudited use
//! of the release key is worse than a failed request.
use crate::error::{KeyvaultError, Result};
use crate::keyring::RingKey;
use crate::pool::Pool;
use crate::release_key::{PURPOSE_RELEASE, PURPOSES, ReleaseKey, ReleaseKeyring};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use trellis_core::audit::{self, AuditRecord};
use trellis_core::redis_conn::Redis;
use trellis_proto::v1 as pb;

/// The audit action of a Sign request.
pub const AUDIT_ACTION: &str = "sign";
/// Largest input Sign accepts (a manifest is about a hundred bytes).
pub const MAX_SIGN_BYTES: usize = 64 * 1024;

fn unknown_purpose(purpose: &str) -> KeyvaultError {
    KeyvaultError::InvalidArgument(format!(
        "unknown signing purpose {purpose:?}: keyvault signs for {}",
        PURPOSES
            .iter()
            .map(|p| format!("{p:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

pub fn known_purpose(purpose: &str) -> Result<()> {
    if purpose == PURPOSE_RELEASE {
        Ok(())
    } else {
        Err(unknown_purpose(purpose))
    }
}

/// The version `key_id` names (empty: the current one), live.
fn signing_version<'a>(
    ring: &'a ReleaseKeyring,
    purpose: &str,
    key_id: &str,
) -> Result<&'a Arc<RingKey<ReleaseKey>>> {
    known_purpose(purpose)?;
    if key_id.is_empty() {
        return ring.current().ok_or_else(|| {
            KeyvaultError::FailedPrecondition(
                "every release key version is retired; unretire one (`trellis keys unretire release N`) or rotate (`trellis keys rotate release`)".into(),
            )
        });
    }
    let key = ring.by_key_id(key_id).ok_or_else(|| {
        KeyvaultError::NotFound(format!(
            "keyvault has no release key {key_id} (`trellis keys status` lists the versions)"
        ))
    })?;
    if !key.live() {
        return Err(KeyvaultError::FailedPrecondition(format!(
            "release key version {} ({key_id}) is retired; sign with a live version, or unretire it (`trellis keys unretire release {}`)",
            key.meta.version, key.meta.version
        )));
    }
    Ok(key)
}

/// One version's public facts.
pub fn key_proto(ring: &ReleaseKeyring, key: &RingKey<ReleaseKey>) -> pb::SigningKey {
    let public = key.key.public();
    pb::SigningKey {
        purpose: PURPOSE_RELEASE.to_string(),
        key_id: key.meta.key_id.clone(),
        public_key_der: public.public_der.clone(),
        public_key_pem: public.public_pem.clone(),
        version: key.meta.version,
        current: ring.current().map(|c| c.meta.version) == Some(key.meta.version),
        created_ms: key.meta.created_ms,
        retired_ms: key.meta.retired_ms,
    }
}

/// GetSigningKey: the public half of version `version` (0: the current
/// one) of the key for `purpose`.
pub fn signing_key(ring: &ReleaseKeyring, purpose: &str, version: u32) -> Result<pb::SigningKey> {
    let key = if version == 0 {
        signing_version(ring, purpose, "")?
    } else {
        known_purpose(purpose)?;
        ring.get(version).ok_or_else(|| {
            KeyvaultError::NotFound(format!(
                "there is no release key version {version} (`trellis keys status`)"
            ))
        })?
    };
    Ok(key_proto(ring, key))
}

/// ListSigningKeys: every version, oldest first.
pub fn signing_keys(ring: &ReleaseKeyring, purpose: &str) -> Result<pb::ListSigningKeysResponse> {
    known_purpose(purpose)?;
    Ok(pb::ListSigningKeysResponse {
        keys: ring.all().map(|k| key_proto(ring, k)).collect(),
    })
}

fn checked(req: &pb::SignRequest) -> Result<()> {
    if req.actor.trim().is_empty() {
        return Err(KeyvaultError::InvalidArgument(
            "actor is empty: say who asks for the signature (for example \"signer\"); it is \
             audited"
                .into(),
        ));
    }
    if req.data.is_empty() {
        return Err(KeyvaultError::InvalidArgument(
            "data is empty: give the exact bytes to sign (an encoded manifest)".into(),
        ));
    }
    if req.data.len() > MAX_SIGN_BYTES {
        return Err(KeyvaultError::InvalidArgument(format!(
            "data is {} bytes; keyvault signs at most {MAX_SIGN_BYTES} (a manifest, not an image)",
            req.data.len()
        )));
    }
    Ok(())
}

/// The release key signs firmware manifests the signer has stored, byte for
/// byte, and the trust policies of policy releases the signer has stored
/// (rotations, docs/protocol.md §7.5), and nothing else: whoever holds a
/// signer credential cannot have arbitrary bytes signed, and every cloud
/// signature belongs to a release or policy release that `trellis release
/// list` / `trellis policy list` shows.
async fn stored_manifest(redis: &mut Redis, data: &[u8]) -> Result<()> {
    let manifest = match trellis_firmware::decode_manifest(data) {
        Ok(m) => m,
        Err(manifest_error) => return stored_policy(redis, data, &manifest_error).await,
    };
    let release_id =
        trellis_records::release::make_release_id(manifest.product_id, manifest.version);
    let stored = trellis_records::release::get_manifest(redis, &release_id).await?;
    if stored.as_deref() == Some(data) {
        Ok(())
    } else {
        Err(KeyvaultError::FailedPrecondition(format!(
            "no stored release {release_id} has exactly these manifest bytes; keyvault signs only manifests the signer has stored"
        )))
    }
}

/// `data` is the exact policy of a stored policy release.
async fn stored_policy(
    redis: &mut Redis,
    data: &[u8],
    manifest_error: &trellis_firmware::Rejection,
) -> Result<()> {
    if trellis_firmware::decode_policy(data).is_err() {
        return Err(KeyvaultError::InvalidArgument(format!(
            "keyvault signs only firmware manifests and trust policies ({manifest_error})"
        )));
    }
    let sha = hex::encode(Sha256::digest(data));
    let id = trellis_records::policy_release::policy_release_by_sha(redis, &sha).await?;
    let stored = match &id {
        Some(id) => trellis_records::release::get_manifest(redis, id).await?,
        None => None,
    };
    if stored.as_deref() == Some(data) {
        Ok(())
    } else {
        Err(KeyvaultError::FailedPrecondition(
            "no stored policy release has exactly these policy bytes; keyvault signs only policies the signer has stored".into(),
        ))
    }
}

/// Sign: checks the request, signs on the private-key pool, audits.
pub async fn sign(
    pool: &Pool,
    redis: &mut Redis,
    ring: Arc<ReleaseKeyring>,
    req: pb::SignRequest,
    actor: &str,
) -> Result<pb::SignResponse> {
    let digest = hex::encode(Sha256::digest(&req.data));
    let record = |outcome: &str, key_id: &str| {
        // The authenticated caller; what it says it acts for is a detail.
        AuditRecord::new(actor, AUDIT_ACTION, "", outcome)
            .with("requested_by", req.actor.clone())
            .with("purpose", req.purpose.clone())
            .with("key_id", key_id)
            .with("sha256", digest.clone())
            .with("data_len", req.data.len().to_string())
    };
    let allowed = match checked(&req)
        .and_then(|()| signing_version(&ring, &req.purpose, req.key_id.trim()))
    {
        Ok(key) => stored_manifest(redis, &req.data)
            .await
            .map(|()| key.clone()),
        Err(e) => Err(e),
    };
    let version = match allowed {
        Ok(key) => key,
        Err(e) => {
            // Refusals are audited too; their failure to be written is only logged.
            crate::registry::audit_write(
                redis,
                record("refused", "").with("reason", e.to_string()),
            )
            .await;
            return Err(e);
        }
    };
    let key_id = version.meta.key_id.clone();
    let key = version.key.clone();
    let data = req.data.clone();
    let signed = pool
        .run_admission("sign_release", move || key.sign_pss(&data))
        .await;
    let signature = match signed {
        Ok(signature) => signature,
        Err(e) => {
            crate::registry::audit_write(
                redis,
                record("error", &key_id).with("reason", e.to_string()),
            )
            .await;
            return Err(e.into());
        }
    };
    // No audit record, no signature.
    audit::append(
        redis,
        &record("ok", &key_id).with("version", version.meta.version.to_string()),
    )
    .await?;
    tracing::info!(key_id = %key_id, version = version.meta.version, sha256 = %digest, actor = %req.actor, "signed for release");
    Ok(pb::SignResponse { key_id, signature })
}

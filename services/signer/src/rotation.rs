//! Trust policy rotation in the signer (docs/protocol.md §7.5): policy
//! releases, their signatures, and the product's current device policy.
//!
//! The signer's signing policy for a product (`keys::policy(product)`, set
//! with `trellis policy set`) IS the product's current device trust policy,
//! with its version. `CreatePolicyRelease` stores the next one as a policy
//! release `tp-<product>-<version>` that remembers the policy it rotates
//! from; signatures are added as for releases. Once the signatures meet both
//! the previous policy's threshold (counting only its keys) and the new
//! policy's own threshold, the release is complete: devices still on the
//! previous policy will accept it, and the signer's policy for the product
//! advances to it, so releases signed from then on are checked against the
//! new keys. Roll the policy release out before releasing firmware signed
//! only by the new keys.
use sha2::{Digest, Sha256};
use trellis_core::audit::{self, AuditRecord};
use trellis_core::time::now_ms;
use trellis_firmware::rotation::decode_policy;
use trellis_firmware::{
    ManifestSignature, PolicyReport, TrustPolicy, TrustedKey, verify_signature,
};
use trellis_proto::v1 as pb;
use trellis_records::policy_release::{
    PolicyReleaseRecord, get_policy_release, list_policy_releases, make_policy_release_id,
    parse_policy_release_id,
};

use crate::error::{Result, SignerError};
use crate::service::{ACTOR, RELEASE_PURPOSE, SignerService};
use crate::store::{self, Added, StoredPolicy};
use crate::validate;

fn no_policy_release(id: &str) -> SignerError {
    SignerError::NotFound(format!(
        "no policy release {id}; `trellis policy list` shows them"
    ))
}

fn status_of(report: &PolicyReport) -> pb::PolicySignatureStatus {
    let name = |k: &trellis_firmware::KeyRef| {
        if k.name.is_empty() {
            k.key_id.clone()
        } else {
            k.name.clone()
        }
    };
    pb::PolicySignatureStatus {
        threshold: u32::try_from(report.threshold).unwrap_or(u32::MAX),
        signed_by: report.valid.iter().map(name).collect(),
        missing: report.missing.iter().map(name).collect(),
        satisfied: report.satisfied(),
    }
}

/// The previous and the new policy of a record.
fn policies(record: &PolicyReleaseRecord) -> Result<(TrustPolicy, TrustPolicy)> {
    let damaged = |what: &str, e: String| {
        SignerError::Corrupt(format!(
            "policy release {}: the {what} policy does not decode ({e}); create the rotation again",
            record.release_id
        ))
    };
    let previous =
        decode_policy(&record.previous_policy).map_err(|e| damaged("previous", e.to_string()))?;
    let new = decode_policy(&record.policy).map_err(|e| damaged("new", e.to_string()))?;
    Ok((previous, new))
}

/// `(under the previous policy, under the new one)`.
fn reports(record: &PolicyReleaseRecord) -> Result<(PolicyReport, PolicyReport)> {
    let (previous, new) = policies(record)?;
    Ok((
        previous.evaluate(&record.policy, &record.signatures),
        new.evaluate(&record.policy, &record.signatures),
    ))
}

impl SignerService {
    /// CreatePolicyRelease: the product's next trust policy, to be signed.
    pub async fn create_policy_release(
        &self,
        req: pb::CreatePolicyReleaseRequest,
    ) -> Result<PolicyReleaseRecord> {
        let product_id = validate::product_id(req.product_id)?;
        let bad = |what: String| {
            SignerError::InvalidArgument(format!(
                "new trust policy for product {product_id}: {what}"
            ))
        };
        let mut redis = self.redis();
        let current = store::get_policy(&mut redis, product_id)
            .await?
            .ok_or_else(|| {
                SignerError::FailedPrecondition(format!(
                    "product {product_id} has no policy yet, so there is nothing to rotate from: \
                     set the first one with `trellis policy set` (it is what devices are \
                     provisioned with)"
                ))
            })?;
        let raw: serde_json::Value =
            serde_json::from_str(&req.policy_json).map_err(|e| bad(format!("not JSON: {e}")))?;
        let explicit_version = raw.get("version").is_some();
        let parsed = TrustPolicy::from_json(&req.policy_json).map_err(|e| bad(e.to_string()))?;
        let new = if explicit_version {
            parsed
        } else {
            parsed.with_version(current.policy.version().saturating_add(1))
        };
        if new.version() <= current.policy.version() {
            return Err(bad(format!(
                "version {} is not above the current version {}; devices refuse it (rollback). \
                 Give \"version\": {} or leave it out",
                new.version(),
                current.policy.version(),
                current.policy.version() + 1
            )));
        }
        if let Ok(cloud) = self.cloud_release_keys().await {
            let held = cloud.held_in(&new).len();
            if held >= new.threshold() && !req.allow_cloud_only {
                return Err(bad(format!(
                    "the cloud alone could release firmware with it (threshold {}, the cloud \
                     holds {held} of its keys); require the customer's key too, or pass \
                     --allow-cloud-only",
                    new.threshold()
                )));
            }
        }
        let policy = new.canonical_bytes().map_err(|e| bad(e.to_string()))?;
        let previous_policy = current
            .policy
            .canonical_bytes()
            .map_err(|e| SignerError::Corrupt(format!("product {product_id}'s policy: {e}")))?;
        let organization = trellis_auth::store::product_org(&mut redis, product_id)
            .await
            .map_err(|e| {
                SignerError::Internal(format!("reading product {product_id}'s organisation: {e}"))
            })?;
        let record = PolicyReleaseRecord {
            release_id: make_policy_release_id(product_id, new.version()),
            product_id,
            version: new.version(),
            organization,
            previous_version: current.policy.version(),
            previous_sha256: hex::encode(Sha256::digest(&previous_policy)),
            previous_policy,
            policy,
            signatures: Vec::new(),
            created_at_ms: now_ms(),
        };
        if !store::create_policy_release(&mut redis, &record).await? {
            return Err(SignerError::AlreadyExists(format!(
                "policy release {} already exists; a version is released once, give a higher one",
                record.release_id
            )));
        }
        tracing::info!(
            release_id = %record.release_id,
            previous_version = record.previous_version,
            sha256 = %record.sha256(),
            "policy release created"
        );
        Ok(record)
    }

    pub async fn get_policy_release(&self, release_id: &str) -> Result<PolicyReleaseRecord> {
        let (id, _, _) = parse_policy_release_id(release_id)?;
        get_policy_release(&mut self.redis(), &id)
            .await?
            .ok_or_else(|| no_policy_release(&id))
    }

    pub async fn list_policy_releases(&self, product_id: u32) -> Result<Vec<PolicyReleaseRecord>> {
        Ok(list_policy_releases(&mut self.redis(), product_id).await?)
    }

    /// AddPolicySignature: a signature by a key of the previous or the new
    /// policy, checked before it is stored.
    pub async fn add_policy_signature(
        &self,
        release_id: &str,
        signature: Option<pb::ManifestSignature>,
        actor: &str,
    ) -> Result<PolicyReleaseRecord> {
        let record = self.get_policy_release(release_id).await?;
        let signature = signature.ok_or_else(|| {
            SignerError::InvalidArgument(
                "no signature given: send {key_id, signature} (`trellis policy sign --key`)".into(),
            )
        })?;
        let key_id = validate::key_id(&signature.key_id)?;
        let signature = ManifestSignature {
            key_id,
            signature: signature.signature,
        };
        let (previous, new) = policies(&record)?;
        let key = previous
            .key(&signature.key_id)
            .or_else(|| new.key(&signature.key_id))
            .ok_or_else(|| {
                SignerError::FailedPrecondition(format!(
                    "key {} is in neither the current policy (version {}) nor the new one \
                     (version {}) of product {}; only their keys can sign the rotation",
                    signature.key_id, record.previous_version, record.version, record.product_id
                ))
            })?;
        verify_signature(&key.public_key, &record.policy, &signature).map_err(|e| {
            SignerError::InvalidArgument(format!(
                "bad signature for policy release {}: {e}. Sign the exact policy bytes (`trellis \
                 policy sign {} --key KEY.pem` does)",
                record.release_id, record.release_id
            ))
        })?;
        self.store_policy_signature(record, &signature, actor).await
    }

    /// SignPolicyRelease: the cloud release key signs through keyvault,
    /// with every live version the previous or the new policy trusts (a
    /// release key rotation is signed by the version devices trust now and
    /// by the version they are moving to).
    pub async fn sign_policy_release(
        &self,
        release_id: &str,
        on_behalf_of: &str,
    ) -> Result<PolicyReleaseRecord> {
        let mut record = self.get_policy_release(release_id).await?;
        let cloud = self.cloud_release_keys().await?;
        let (previous, new) = policies(&record)?;
        let signers: Vec<TrustedKey> = cloud
            .for_rotation(&previous, &new)
            .into_iter()
            .map(|v| v.key.clone())
            .collect();
        if signers.is_empty() {
            let named = cloud.held_in(&previous).len() + cloud.held_in(&new).len();
            return Err(SignerError::FailedPrecondition(if named > 0 {
                format!(
                    "the release key versions the policies of {} trust are all retired; unretire one (`trellis keys unretire release N`) or sign with the customer's keys (`trellis policy sign {} --key KEY.pem`)",
                    record.release_id, record.release_id
                )
            } else {
                format!(
                    "neither policy of {} trusts the cloud release key; sign with the \
                     customer's keys (`trellis policy sign {} --key KEY.pem`)",
                    record.release_id, record.release_id
                )
            }));
        }
        for cloud in signers {
            if record.signatures.iter().any(|s| s.key_id == cloud.key_id) {
                continue;
            }
            let signed = self
                .keyvault()
                .sign(pb::SignRequest {
                    purpose: RELEASE_PURPOSE.into(),
                    data: record.policy.clone(),
                    actor: format!("{ACTOR} for {on_behalf_of}"),
                    key_id: cloud.key_id.clone(),
                })
                .await
                .map_err(|e| SignerError::keyvault(self.keyvault_url(), &e))?
                .into_inner();
            let signature = ManifestSignature {
                key_id: signed.key_id,
                signature: signed.signature,
            };
            verify_signature(&cloud.public_key, &record.policy, &signature).map_err(|e| {
                SignerError::Internal(format!("keyvault's policy signature does not check: {e}"))
            })?;
            record = self
                .store_policy_signature(record, &signature, on_behalf_of)
                .await?;
        }
        Ok(record)
    }

    /// Stores a checked signature; when the rotation is complete, advances
    /// the product's policy to the new one (once, and only from the policy
    /// the rotation started from).
    async fn store_policy_signature(
        &self,
        record: PolicyReleaseRecord,
        signature: &ManifestSignature,
        actor: &str,
    ) -> Result<PolicyReleaseRecord> {
        let mut redis = self.redis();
        match store::add_signature(&mut redis, &record.release_id, signature).await? {
            Added::Added => {
                tracing::info!(release_id = %record.release_id, key_id = %signature.key_id, "policy signature added")
            }
            Added::AlreadySigned => {}
            Added::ReleaseGone => return Err(no_policy_release(&record.release_id)),
        }
        let record = self.get_policy_release(&record.release_id).await?;
        let (under_current, under_new) = reports(&record)?;
        if under_current.satisfied() && under_new.satisfied() {
            let current = store::get_policy(&mut redis, record.product_id).await?;
            let (_, new) = policies(&record)?;
            match current {
                Some(c) if c.policy.version() == record.previous_version => {
                    let cloud_only = match self.cloud_release_keys().await {
                        Ok(cloud) => cloud.meet_alone(&new),
                        Err(_) => c.allow_cloud_only,
                    };
                    store::put_policy(
                        &mut redis,
                        record.product_id,
                        &StoredPolicy {
                            policy: new.clone(),
                            allow_cloud_only: cloud_only,
                        },
                    )
                    .await?;
                    let audit_record = AuditRecord::new(actor, "rotate_policy", "", "ok")
                        .with("product_id", record.product_id.to_string())
                        .with("release_id", record.release_id.clone())
                        .with("from_version", record.previous_version.to_string())
                        .with("to_version", record.version.to_string())
                        .with("sha256", record.sha256());
                    if let Err(e) = audit::append(&mut redis, &audit_record).await {
                        tracing::error!(error = %e, "audit record for rotate_policy not written");
                    }
                    tracing::info!(
                        product_id = record.product_id,
                        version = record.version,
                        "policy rotation fully signed: the product's policy advanced"
                    );
                }
                Some(c) if c.policy.version() >= record.version => {}
                _ => tracing::warn!(
                    product_id = record.product_id,
                    release_id = %record.release_id,
                    "policy rotation fully signed, but the product's policy is no longer the one it rotates from; not advanced"
                ),
            }
        }
        Ok(record)
    }

    /// The reply: the signed policy, its JSON, what each policy still needs.
    pub async fn policy_release_reply(
        &self,
        record: &PolicyReleaseRecord,
    ) -> Result<pb::PolicyRelease> {
        let (under_current, under_new) = reports(record)?;
        let (_, new) = policies(record)?;
        let complete = under_current.satisfied() && under_new.satisfied();
        let warning = match self.cloud_release_keys().await {
            Ok(cloud) if cloud.meet_alone(&new) => {
                format!(
                    "policy version {} can be met by the cloud's keys alone: releases under it \
                     do not need the customer's offline key",
                    record.version
                )
            }
            _ => String::new(),
        };
        Ok(pb::PolicyRelease {
            release_id: record.release_id.clone(),
            product_id: record.product_id,
            version: record.version,
            policy_sha256: record.sha256(),
            signed: Some(record.signed_policy()),
            previous_version: record.previous_version,
            previous_sha256: record.previous_sha256.clone(),
            under_current: Some(status_of(&under_current)),
            under_new: Some(status_of(&under_new)),
            complete,
            policy_json: new
                .to_json()
                .map_err(|e| SignerError::Internal(e.to_string()))?,
            created_at_ms: record.created_at_ms,
            policy_warning: warning,
        })
    }
}

//! Trust policy rotation on devices (TUF-style root rotation,
//! docs/protocol.md §7.5).
//!
//! A policy travels in its canonical form, the `trellis.v1.TrustPolicyDoc`
//! protobuf ([`TrustPolicy::canonical_bytes`]), signed as those exact bytes
//! inside a [`SignedPolicy`]. A device replaces its policy with the one in a
//! `SignedPolicy` only when ([`verify_policy_update`], in this order):
//!
//! 1. its CURRENT policy is valid (`invalid_trust_policy` otherwise);
//! 2. the signatures meet the current policy's threshold, counting only
//!    current trusted keys (`insufficient_signatures`, `unknown_key`,
//!    `bad_signature`), checked over the exact bytes before they are decoded;
//! 3. the bytes decode to a valid policy in canonical form
//!    (`malformed_policy`);
//! 4. its version is strictly higher than the current one (`rollback`);
//! 5. the same signatures also meet the NEW policy's threshold under the
//!    new policy's keys (`new_policy_unsigned`): a policy whose own keys
//!    have not signed it could name keys nobody holds and lock the fleet out
//!    of every later update and rotation.
//!
//! Anything else is refused with the reason, and the device keeps its
//! policy.

use prost::Message;
use rsa::PublicKey;
use rsa::pkcs8::{DecodePublicKey, EncodePublicKey};
use sha2::{Digest, Sha256};

pub use trellis_proto::v1::{CommandPolicyDoc, PolicyKeyDoc, SignedPolicy, TrustPolicyDoc};

use crate::command::{CommandPolicy, Protected};
use crate::keys::KeyError;
use crate::manifest::ManifestSignature;
use crate::policy::{MAX_COMMAND_VALIDITY_SECS, PolicyError, TrustPolicy, TrustedKey};
use crate::rejection::Rejection;
use crate::signing::{SignError, sign_manifest};

/// Name of the private event a device publishes when it refuses a policy.
pub const POLICY_REJECTED_EVENT: &str = "trellis/policy/rejected";

fn key_docs(keys: &[TrustedKey]) -> Result<Vec<PolicyKeyDoc>, PolicyError> {
    keys.iter()
        .map(|k| {
            let der = k
                .public_key
                .to_public_key_der()
                .map_err(|e| PolicyError::Key(KeyError::Encode(e.to_string())))?;
            Ok(PolicyKeyDoc {
                name: k.name.clone(),
                public_key_der: der.as_bytes().to_vec(),
            })
        })
        .collect()
}

fn keys_from_docs(docs: &[PolicyKeyDoc]) -> Result<Vec<TrustedKey>, PolicyError> {
    docs.iter()
        .map(|d| {
            let key = PublicKey::from_public_key_der(&d.public_key_der).map_err(|e| {
                PolicyError::BadKey {
                    name: d.name.clone(),
                    source: KeyError::PublicKey(e.to_string()),
                }
            })?;
            TrustedKey::new(d.name.clone(), key)
        })
        .collect()
}

impl TrustPolicy {
    /// The canonical document of this policy (an invalid policy has none).
    pub fn to_doc(&self) -> Result<TrustPolicyDoc, PolicyError> {
        self.validate()?;
        let commands = match self.commands() {
            Some(c) => {
                let (protect_all, protected_functions) = match &c.protected {
                    Protected::All => (true, Vec::new()),
                    Protected::Only(names) => (false, names.clone()),
                };
                Some(CommandPolicyDoc {
                    threshold: u32::try_from(c.signers.threshold()).unwrap_or(u32::MAX),
                    keys: key_docs(c.signers.keys())?,
                    protect_all,
                    protected_functions,
                    max_validity_secs: u64::try_from(c.max_validity_ms / 1000).unwrap_or(0),
                })
            }
            None => None,
        };
        Ok(TrustPolicyDoc {
            version: self.version(),
            threshold: u32::try_from(self.threshold()).unwrap_or(u32::MAX),
            keys: key_docs(self.keys())?,
            commands,
        })
    }

    /// A policy from its document, validated like every other way in.
    pub fn from_doc(doc: &TrustPolicyDoc) -> Result<TrustPolicy, PolicyError> {
        let commands = match &doc.commands {
            Some(c) => {
                let signers = TrustPolicy::new(keys_from_docs(&c.keys)?, c.threshold as usize)?;
                if !(1..=MAX_COMMAND_VALIDITY_SECS).contains(&c.max_validity_secs) {
                    return Err(PolicyError::Encoding(format!(
                        "commands.max_validity_secs is {}; it must be 1 to {MAX_COMMAND_VALIDITY_SECS}",
                        c.max_validity_secs
                    )));
                }
                let protected = if c.protect_all {
                    if !c.protected_functions.is_empty() {
                        return Err(PolicyError::Encoding(
                            "commands protect all functions and also list some".into(),
                        ));
                    }
                    Protected::All
                } else {
                    Protected::Only(c.protected_functions.clone())
                };
                let max_validity_ms = i64::try_from(c.max_validity_secs * 1000).unwrap_or(i64::MAX);
                Some(CommandPolicy::new(signers, protected, max_validity_ms)?)
            }
            None => None,
        };
        let policy = TrustPolicy::new(keys_from_docs(&doc.keys)?, doc.threshold as usize)?
            .with_commands(commands)
            .with_version(doc.version);
        policy.validate()?;
        Ok(policy)
    }

    /// The exact bytes that are signed and shipped for this policy.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, PolicyError> {
        Ok(self.to_doc()?.encode_to_vec())
    }

    /// SHA-256 of [`canonical_bytes`](Self::canonical_bytes): what a device
    /// reports in its Hello (extension 0x04). All zeros for an invalid
    /// policy, which has no canonical form.
    pub fn sha256(&self) -> [u8; 32] {
        self.canonical_bytes()
            .map(|b| Sha256::digest(&b).into())
            .unwrap_or([0; 32])
    }
}

fn malformed(detail: impl Into<String>) -> Rejection {
    Rejection::MalformedPolicy {
        detail: detail.into(),
    }
}

/// Decodes canonical policy bytes into a valid policy. Bytes that decode but
/// are not the canonical encoding of what they decode to (unknown fields,
/// another field order, non-minimal varints) are refused, so the SHA-256 of
/// accepted bytes names exactly one policy.
pub fn decode_policy(bytes: &[u8]) -> Result<TrustPolicy, Rejection> {
    if bytes.is_empty() {
        return Err(malformed("the policy is empty"));
    }
    let doc = TrustPolicyDoc::decode(bytes)
        .map_err(|e| malformed(format!("not a trellis.v1.TrustPolicyDoc: {e}")))?;
    let policy = TrustPolicy::from_doc(&doc).map_err(|e| malformed(e.to_string()))?;
    if doc.encode_to_vec() != bytes {
        return Err(malformed(
            "the bytes are not the canonical encoding of the policy they hold",
        ));
    }
    Ok(policy)
}

/// The signed envelope's wire form (the payload of CoAP POST `tp`).
pub fn encode_signed_policy(signed: &SignedPolicy) -> Vec<u8> {
    signed.encode_to_vec()
}

/// Decodes the signed envelope; the policy inside is NOT decoded here.
pub fn decode_signed_policy(bytes: &[u8]) -> Result<SignedPolicy, Rejection> {
    let signed = SignedPolicy::decode(bytes)
        .map_err(|e| malformed(format!("not a trellis.v1.SignedPolicy: {e}")))?;
    if signed.policy.is_empty() {
        return Err(malformed("the signed envelope holds no policy"));
    }
    Ok(signed)
}

/// Signs canonical policy bytes (RSA-PSS-SHA256, as manifests).
pub fn sign_policy(
    private_key: &rsa::PrivateKey,
    policy_bytes: &[u8],
) -> Result<ManifestSignature, SignError> {
    sign_manifest(private_key, policy_bytes)
}

/// The device rule (module documentation): the new policy if `signed` may
/// replace `current`, else why not.
pub fn verify_policy_update(
    current: &TrustPolicy,
    signed: &SignedPolicy,
) -> Result<TrustPolicy, Rejection> {
    current
        .validate()
        .map_err(|e| Rejection::InvalidTrustPolicy {
            detail: e.to_string(),
        })?;
    if signed.policy.is_empty() {
        return Err(malformed("the signed envelope holds no policy"));
    }
    current
        .evaluate(&signed.policy, &signed.signatures)
        .into_result()?;
    let new = decode_policy(&signed.policy)?;
    if new.version() <= current.version() {
        return Err(Rejection::PolicyRollback {
            version: new.version(),
            current: current.version(),
        });
    }
    new.evaluate(&signed.policy, &signed.signatures)
        .into_result()
        .map_err(|inner| Rejection::NewPolicyUnsigned {
            detail: inner.to_string(),
        })?;
    Ok(new)
}

/// [`verify_policy_update`] on the wire bytes of a `SignedPolicy`.
pub fn verify_policy_update_bytes(
    current: &TrustPolicy,
    signed_policy: &[u8],
) -> Result<TrustPolicy, Rejection> {
    verify_policy_update(current, &decode_signed_policy(signed_policy)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::LazyLock;

    use crate::manifest::{SignedManifest, build_manifest, encode_manifest};
    use crate::policy::verify_update;

    /// Test keys, generated once per test run (RSA-2048 takes a while).
    static KEYS: LazyLock<Vec<rsa::PrivateKey>> = LazyLock::new(|| {
        (0..4)
            .map(|_| rsa::PrivateKey::new(&mut rand::rng(), 2048).expect("key"))
            .collect()
    });

    fn trusted(i: usize, name: &str) -> TrustedKey {
        TrustedKey::new(name, KEYS[i].to_public_key()).expect("trusted")
    }

    /// customer-old (0) + cloud (1), threshold 2.
    fn current() -> TrustPolicy {
        TrustPolicy::new(vec![trusted(0, "customer"), trusted(1, "cloud-release")], 2)
            .expect("policy")
    }

    /// customer-new (2) + cloud (1), threshold 2, version 2.
    fn rotated() -> TrustPolicy {
        TrustPolicy::new(
            vec![trusted(2, "customer-2027"), trusted(1, "cloud-release")],
            2,
        )
        .expect("policy")
        .with_version(2)
    }

    fn signed(policy: &TrustPolicy, by: &[usize]) -> SignedPolicy {
        let bytes = policy.canonical_bytes().expect("bytes");
        SignedPolicy {
            signatures: by
                .iter()
                .map(|i| sign_policy(&KEYS[*i], &bytes).expect("sign"))
                .collect(),
            policy: bytes,
        }
    }

    #[test]
    fn a_rotation_signed_by_both_thresholds_is_accepted_and_then_governs_releases() {
        let new =
            verify_policy_update(&current(), &signed(&rotated(), &[0, 1, 2])).expect("accepted");
        assert_eq!(new, rotated());
        assert_eq!(new.version(), 2);
        // Releases now need the new customer key; the old one is unknown.
        let manifest = encode_manifest(&build_manifest(3, 2, b"image", 1, "acme"));
        let release = |by: &[usize]| SignedManifest {
            signatures: by
                .iter()
                .map(|i| sign_manifest(&KEYS[*i], &manifest).expect("sign"))
                .collect(),
            manifest: manifest.clone(),
        };
        verify_update(&release(&[2, 1]), &new, 3, 1).expect("new customer key installs");
        let err = verify_update(&release(&[0, 1]), &new, 3, 1).unwrap_err();
        assert_eq!(err.code(), "unknown_key", "{err}");
    }

    #[test]
    fn every_way_a_rotation_can_be_wrong_is_refused_with_its_reason() {
        let cur = current();
        let cases: Vec<(&str, SignedPolicy, &str)> = vec![
            // Only the new keys: the device does not know the new customer key.
            ("new keys only", signed(&rotated(), &[2]), "unknown_key"),
            // The cloud key alone cannot meet threshold 2.
            (
                "cloud alone",
                signed(&rotated(), &[1]),
                "insufficient_signatures",
            ),
            ("same version", signed(&cur, &[0, 1]), "rollback"),
            (
                "lower version",
                signed(&cur.clone().with_version(1), &[0, 1]),
                "rollback",
            ),
            // Signed by the current keys but not by the new customer key:
            // it could lock the fleet out.
            (
                "new keys did not sign",
                signed(&rotated(), &[0, 1]),
                "new_policy_unsigned",
            ),
            (
                "garbage policy",
                {
                    let bytes = b"\xff\xff not a policy".to_vec();
                    SignedPolicy {
                        signatures: vec![
                            sign_policy(&KEYS[0], &bytes).expect("sign"),
                            sign_policy(&KEYS[1], &bytes).expect("sign"),
                        ],
                        policy: bytes,
                    }
                },
                "malformed_policy",
            ),
            (
                "forged signature",
                {
                    let mut s = signed(&rotated(), &[0, 1, 2]);
                    s.signatures[0].signature[10] ^= 1;
                    s
                },
                "bad_signature",
            ),
        ];
        for (what, s, code) in cases {
            let err = verify_policy_update(&cur, &s).unwrap_err();
            assert_eq!(err.code(), code, "{what}: {err}");
            assert!(err.event_data().starts_with(&format!("{code}: ")), "{what}");
            let bytes = encode_signed_policy(&s);
            assert_eq!(verify_policy_update_bytes(&cur, &bytes).unwrap_err(), err);
        }
        let err = verify_policy_update_bytes(&cur, b"\x0a").unwrap_err();
        assert_eq!(err.code(), "malformed_policy");
    }

    #[test]
    fn non_canonical_or_invalid_documents_are_malformed() {
        let mut doc = rotated().to_doc().expect("doc");
        // Threshold above the key count: an invalid policy.
        doc.threshold = 3;
        let bytes = doc.encode_to_vec();
        assert_eq!(
            decode_policy(&bytes).unwrap_err().code(),
            "malformed_policy"
        );
        // An unknown field appended: decodes, but is not canonical.
        let mut bytes = rotated().canonical_bytes().expect("bytes");
        bytes.extend_from_slice(&[0x78, 0x01]); // field 15, varint 1
        let err = decode_policy(&bytes).unwrap_err();
        assert!(err.to_string().contains("canonical"), "{err}");
        // Version 0 is not a version.
        let mut doc = rotated().to_doc().expect("doc");
        doc.version = 0;
        assert!(decode_policy(&doc.encode_to_vec()).is_err());
    }

    #[test]
    fn the_canonical_form_round_trips_with_commands_and_its_hash_is_stable() {
        let commands = CommandPolicy::new(
            TrustPolicy::new(vec![trusted(3, "operator")], 1).expect("signers"),
            Protected::Only(vec!["open".into()]),
            300_000,
        )
        .expect("commands");
        let p = rotated().with_commands(Some(commands));
        let bytes = p.canonical_bytes().expect("bytes");
        let back = decode_policy(&bytes).expect("decode");
        assert_eq!(back, p);
        assert_eq!(back.sha256(), p.sha256());
        assert_eq!(p.sha256(), <[u8; 32]>::from(Sha256::digest(&bytes)));
        assert_ne!(p.sha256(), rotated().sha256());
    }

    /// The JSON form without `version` is version 1; with it, it keeps it.
    #[test]
    fn json_without_a_version_is_version_1() {
        let text = current().to_json().expect("json");
        let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["version"], 1);
        v.as_object_mut().expect("object").remove("version");
        let old = TrustPolicy::from_json(&v.to_string()).expect("old file");
        assert_eq!(old.version(), 1);
        v["version"] = serde_json::json!(7);
        assert_eq!(
            TrustPolicy::from_json(&v.to_string())
                .expect("v7")
                .version(),
            7
        );
        v["version"] = serde_json::json!(0);
        assert!(TrustPolicy::from_json(&v.to_string()).is_err());
    }
}

//! The trust policy a device is provisioned with (which release keys it
//! trusts, and how many of them must have signed) and the checks that decide
//! whether it accepts an update. For example a policy of the customer's
//! offline key AND the cloud release key, threshold 2: whoever breaks into
//! the cloud holds at most one of the two.
//!
//! JSON form (`policy.json`, for provisioning):
//! ```json
//! {
//!   "version": 1,
//!   "threshold": 2,
//!   "keys": [
//!     { "name": "customer", "key_id": "<hex sha-256 of the SPKI DER>",
//!       "public_key": "-----BEGIN PUBLIC KEY-----\n...\n-----END PUBLIC KEY-----\n" },
//!     { "name": "cloud-release", "public_key": "-----BEGIN PUBLIC KEY-----\n..." }
//!   ],
//!   "commands": {
//!     "threshold": 1,
//!     "keys": [ { "name": "operator", "public_key": "-----BEGIN PUBLIC KEY-----\n..." } ],
//!     "protected": { "only": ["open", "wipe"] },
//!     "max_validity_secs": 300
//!   }
//! }
//! ```
//! `version` is optional and defaults to 1 (policy files written before
//! policies had versions keep working); a device replaces its policy only
//! with a higher version ([`crate::rotation`]). The canonical signed form
//! of a policy is the `trellis.v1.TrustPolicyDoc` protobuf
//! ([`TrustPolicy::canonical_bytes`]).
//!
//! `commands` is optional: without it function calls need no signature
//! (signed commands, [`crate::command`]; `"protected": "all"` protects
//! every function). `key_id` is optional on input (computed from the key) and checked when
//! present, so a policy file whose ids and keys disagree is refused.
//!
//! An invalid policy cannot be made: the fields are private, and
//! [`TrustPolicy::new`], [`TrustPolicy::from_json`] and serde's
//! `Deserialize` all go through [`TrustPolicy::validate`] (at least one key,
//! no key twice, `1 <= threshold <= keys`, every key long enough and its id
//! matching). [`verify_update`] validates the policy again before it looks
//! at a signature, so a policy that is wrong by any other means refuses
//! every update (`invalid_trust_policy`) instead of accepting unsigned
//! firmware.

use std::fmt;

use rsa::PublicKey;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::command::{CommandPolicy, Protected};
use crate::keys::{KeyError, check_release_key, key_id, public_key_from_pem, public_key_to_pem};
use crate::manifest::{
    FirmwareManifest, ManifestSignature, SignedManifest, decode_manifest, decode_signed_manifest,
    image_sha256,
};
use crate::rejection::Rejection;
use crate::signing::verify_signature;

/// A key named in a report or a rejection: its id and, when the policy
/// knows it, its name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyRef {
    pub key_id: String,
    pub name: String,
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let short = self.key_id.get(..16).unwrap_or(&self.key_id);
        if self.name.is_empty() {
            write!(f, "key {short}")
        } else {
            write!(f, "{} (key {short})", self.name)
        }
    }
}

/// One trusted release key.
#[derive(Debug, Clone, PartialEq)]
pub struct TrustedKey {
    /// Hex SHA-256 of `public_key`'s SPKI DER; `TrustedKey::new` computes it.
    pub key_id: String,
    pub public_key: PublicKey,
    pub name: String,
}

impl TrustedKey {
    pub fn new(name: impl Into<String>, public_key: PublicKey) -> Result<Self, PolicyError> {
        check_release_key(&public_key)?;
        Ok(TrustedKey {
            key_id: key_id(&public_key),
            public_key,
            name: name.into(),
        })
    }

    pub fn key_ref(&self) -> KeyRef {
        KeyRef {
            key_id: self.key_id.clone(),
            name: self.name.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("the policy trusts no keys")]
    NoKeys,
    #[error(
        "threshold {threshold} is impossible with {keys} trusted keys (it must be 1 to {keys})"
    )]
    Threshold { threshold: usize, keys: usize },
    #[error("key {key_id} is listed twice")]
    DuplicateKey { key_id: String },
    #[error("key {name:?}: key_id {given} does not match its public key ({computed})")]
    KeyIdMismatch {
        name: String,
        given: String,
        computed: String,
    },
    #[error("key {name:?}: {source}")]
    BadKey { name: String, source: KeyError },
    #[error("policy JSON: {0}")]
    Json(String),
    #[error("policy version 0 is not a version (versions start at 1)")]
    VersionZero,
    #[error("policy encoding: {0}")]
    Encoding(String),
}

/// Which trusted keys must have signed, and how many of them. Always valid
/// (see [`TrustPolicy::validate`]): build it with [`TrustPolicy::new`],
/// [`TrustPolicy::from_json`] or serde, read it with the accessors.
///
/// The fields are private, so an empty policy cannot be written down:
///
/// ```compile_fail,E0451
/// let unsigned_ok = trellis_firmware::TrustPolicy { keys: vec![], threshold: 0 };
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct TrustPolicy {
    keys: Vec<TrustedKey>,
    threshold: usize,
    /// Strictly increasing across rotations (1 when a file gives none).
    version: u64,
    /// Who must sign function calls, if anyone (signed commands,
    /// [`crate::command`]); rotated with the rest of the policy.
    commands: Option<Box<CommandPolicy>>,
}

/// The version of a policy file that names none.
pub const DEFAULT_POLICY_VERSION: u64 = 1;

fn default_version() -> u64 {
    DEFAULT_POLICY_VERSION
}

#[derive(Serialize, Deserialize)]
struct PolicyFile {
    #[serde(default = "default_version")]
    version: u64,
    threshold: usize,
    keys: Vec<KeyFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    commands: Option<CommandPolicyFile>,
}

/// The longest validity a command policy may allow (one year): a signed
/// call valid for longer is a standing order, not a command.
pub const MAX_COMMAND_VALIDITY_SECS: u64 = 365 * 24 * 3600;

/// `"commands"` in the JSON form: its own keys and threshold, the
/// protected functions (`"all"` or a list of names), and the longest
/// validity window of a signed call.
#[derive(Serialize, Deserialize)]
struct CommandPolicyFile {
    threshold: usize,
    keys: Vec<KeyFile>,
    protected: Protected,
    max_validity_secs: u64,
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
    public_key: String,
}

/// What a set of signatures amounts to under a policy: the answer to "which
/// signatures are missing?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyReport {
    pub threshold: usize,
    /// Trusted keys with a valid signature (each counted once).
    pub valid: Vec<KeyRef>,
    /// Trusted keys without a valid signature.
    pub missing: Vec<KeyRef>,
    /// Trusted keys named by a signature that does not verify.
    pub invalid: Vec<KeyRef>,
    /// Key ids of signatures by keys the policy does not know.
    pub unknown: Vec<String>,
}

impl PolicyReport {
    /// Enough valid trusted signatures and no forged one. A threshold of 0
    /// is never satisfied (no policy asks for no signature).
    pub fn satisfied(&self) -> bool {
        self.threshold > 0 && self.invalid.is_empty() && self.valid.len() >= self.threshold
    }

    /// The rejection a device reports, if any: a signature that claims a
    /// trusted key but does not verify is `bad_signature` even when the
    /// threshold is met otherwise; too few signatures is `unknown_key` when
    /// untrusted keys signed, `insufficient_signatures` when not.
    /// A threshold of 0 is `invalid_trust_policy`.
    pub fn into_result(self) -> Result<(), Rejection> {
        if self.threshold == 0 {
            return Err(Rejection::InvalidTrustPolicy {
                detail: "threshold 0 would accept firmware nobody signed".into(),
            });
        }
        if let Some(key) = self.invalid.into_iter().next() {
            return Err(Rejection::BadSignature { key });
        }
        if self.valid.len() >= self.threshold {
            return Ok(());
        }
        if !self.unknown.is_empty() {
            return Err(Rejection::UnknownKey {
                key_ids: self.unknown,
                threshold: self.threshold,
                missing: self.missing,
            });
        }
        Err(Rejection::InsufficientSignatures {
            threshold: self.threshold,
            valid: self.valid,
            missing: self.missing,
        })
    }
}

impl TrustPolicy {
    /// Checks the keys (distinct, long enough, ids matching) and that
    /// `1 <= threshold <= keys`.
    pub fn new(keys: Vec<TrustedKey>, threshold: usize) -> Result<Self, PolicyError> {
        let policy = TrustPolicy {
            keys,
            threshold,
            version: DEFAULT_POLICY_VERSION,
            commands: None,
        };
        policy.validate()?;
        Ok(policy)
    }

    /// The rules every policy meets: at least one key, `1 <= threshold <=
    /// keys`, each key long enough, its id matching its public key, and no
    /// key listed twice. Checked on every construction and again by
    /// [`verify_update`].
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.version == 0 {
            return Err(PolicyError::VersionZero);
        }
        if self.keys.is_empty() {
            return Err(PolicyError::NoKeys);
        }
        if self.threshold == 0 || self.threshold > self.keys.len() {
            return Err(PolicyError::Threshold {
                threshold: self.threshold,
                keys: self.keys.len(),
            });
        }
        for (i, k) in self.keys.iter().enumerate() {
            check_release_key(&k.public_key).map_err(|source| PolicyError::BadKey {
                name: k.name.clone(),
                source,
            })?;
            let computed = key_id(&k.public_key);
            if computed != k.key_id {
                return Err(PolicyError::KeyIdMismatch {
                    name: k.name.clone(),
                    given: k.key_id.clone(),
                    computed,
                });
            }
            if self.keys[..i].iter().any(|o| o.key_id == k.key_id) {
                return Err(PolicyError::DuplicateKey {
                    key_id: k.key_id.clone(),
                });
            }
        }
        Ok(())
    }

    /// The trusted keys, in the policy's order.
    pub fn keys(&self) -> &[TrustedKey] {
        &self.keys
    }

    /// How many of [`keys`](Self::keys) must have signed (1 to all of them).
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    pub fn key(&self, key_id: &str) -> Option<&TrustedKey> {
        self.keys.iter().find(|k| k.key_id == key_id)
    }

    /// The policy's version (1 unless set): a device replaces its policy
    /// only with a strictly higher one.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// This policy as `version`.
    pub fn with_version(mut self, version: u64) -> Self {
        self.version = version;
        self
    }

    /// The command policy a device enforces, if the policy has one.
    pub fn commands(&self) -> Option<&CommandPolicy> {
        self.commands.as_deref()
    }

    /// This policy with `commands` as its command policy (`None`: calls
    /// need no signature).
    pub fn with_commands(mut self, commands: Option<CommandPolicy>) -> Self {
        self.commands = commands.map(Box::new);
        self
    }

    /// Parses the JSON form (see the module documentation) and validates it.
    pub fn from_json(text: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile =
            serde_json::from_str(text).map_err(|e| PolicyError::Json(e.to_string()))?;
        Self::from_file(file)
    }

    /// The parsed JSON form, validated.
    fn from_file(file: PolicyFile) -> Result<Self, PolicyError> {
        let commands = match file.commands {
            Some(c) => {
                let signers = TrustPolicy::new(parse_keys(c.keys)?, c.threshold)?;
                if !(1..=MAX_COMMAND_VALIDITY_SECS).contains(&c.max_validity_secs) {
                    return Err(PolicyError::Json(format!(
                        "commands.max_validity_secs is {}; give 1 to {MAX_COMMAND_VALIDITY_SECS}",
                        c.max_validity_secs
                    )));
                }
                let max_validity_ms = (c.max_validity_secs * 1000) as i64;
                Some(CommandPolicy::new(signers, c.protected, max_validity_ms)?)
            }
            None => None,
        };
        let policy = TrustPolicy::new(parse_keys(file.keys)?, file.threshold)?
            .with_commands(commands)
            .with_version(file.version);
        policy.validate()?;
        Ok(policy)
    }

    /// The JSON form, pretty-printed, key ids included.
    pub fn to_json(&self) -> Result<String, PolicyError> {
        serde_json::to_string_pretty(&self.to_file()?).map_err(|e| PolicyError::Json(e.to_string()))
    }

    /// The JSON form's fields; an invalid policy is never written out.
    fn to_file(&self) -> Result<PolicyFile, PolicyError> {
        self.validate()?;
        let commands = match self.commands() {
            Some(c) => Some(CommandPolicyFile {
                threshold: c.signers.threshold,
                keys: key_files(&c.signers.keys)?,
                protected: c.protected.clone(),
                max_validity_secs: u64::try_from(c.max_validity_ms / 1000).unwrap_or(0),
            }),
            None => None,
        };
        Ok(PolicyFile {
            version: self.version,
            threshold: self.threshold,
            keys: key_files(&self.keys)?,
            commands,
        })
    }

    /// Checks every signature over `manifest_bytes` against the trusted
    /// keys. Nothing in the manifest is read.
    pub fn evaluate(
        &self,
        manifest_bytes: &[u8],
        signatures: &[ManifestSignature],
    ) -> PolicyReport {
        let mut valid: Vec<KeyRef> = Vec::new();
        let mut invalid: Vec<KeyRef> = Vec::new();
        let mut unknown: Vec<String> = Vec::new();
        for sig in signatures {
            let Some(key) = self.key(&sig.key_id) else {
                if !unknown.contains(&sig.key_id) {
                    unknown.push(sig.key_id.clone());
                }
                continue;
            };
            let r = key.key_ref();
            if verify_signature(&key.public_key, manifest_bytes, sig).is_ok() {
                if !valid.contains(&r) {
                    valid.push(r);
                }
            } else if !invalid.contains(&r) {
                invalid.push(r);
            }
        }
        let missing = self
            .keys
            .iter()
            .map(TrustedKey::key_ref)
            .filter(|r| !valid.contains(r))
            .collect();
        PolicyReport {
            threshold: self.threshold,
            valid,
            missing,
            invalid,
            unknown,
        }
    }
}

/// Trusted keys from the JSON form: each PEM parsed, a given key id checked.
fn parse_keys(files: Vec<KeyFile>) -> Result<Vec<TrustedKey>, PolicyError> {
    let mut keys = Vec::with_capacity(files.len());
    for k in files {
        let public_key =
            public_key_from_pem(&k.public_key).map_err(|source| PolicyError::BadKey {
                name: k.name.clone(),
                source,
            })?;
        let computed = key_id(&public_key);
        if let Some(given) = k.key_id
            && !given.eq_ignore_ascii_case(&computed)
        {
            return Err(PolicyError::KeyIdMismatch {
                name: k.name,
                given,
                computed,
            });
        }
        keys.push(TrustedKey {
            key_id: computed,
            public_key,
            name: k.name,
        });
    }
    Ok(keys)
}

fn key_files(keys: &[TrustedKey]) -> Result<Vec<KeyFile>, PolicyError> {
    keys.iter()
        .map(|k| {
            Ok(KeyFile {
                name: k.name.clone(),
                key_id: Some(k.key_id.clone()),
                public_key: public_key_to_pem(&k.public_key)?,
            })
        })
        .collect::<Result<Vec<_>, KeyError>>()
        .map_err(PolicyError::from)
}

/// The JSON form (see the module documentation).
impl Serialize for TrustPolicy {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_file()
            .map_err(serde::ser::Error::custom)?
            .serialize(serializer)
    }
}

/// The JSON form, validated exactly as [`TrustPolicy::from_json`] does: an
/// invalid policy is a deserialization error.
impl<'de> Deserialize<'de> for TrustPolicy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        TrustPolicy::from_file(PolicyFile::deserialize(deserializer)?)
            .map_err(serde::de::Error::custom)
    }
}

/// Everything a device checks about an offered update before it accepts a
/// single chunk, in this order: the signatures over the exact manifest bytes
/// against `policy` (before anything in the manifest is believed), then the
/// manifest's form, its product, and that its version is above
/// `version_floor`. The policy itself is validated first: an invalid one
/// (however it was made) refuses everything with `invalid_trust_policy`.
pub fn verify_update(
    signed: &SignedManifest,
    policy: &TrustPolicy,
    device_product_id: u32,
    version_floor: u32,
) -> Result<FirmwareManifest, Rejection> {
    policy
        .validate()
        .map_err(|e| Rejection::InvalidTrustPolicy {
            detail: e.to_string(),
        })?;
    if signed.manifest.is_empty() {
        return Err(Rejection::MalformedManifest {
            detail: "the signed envelope holds no manifest".into(),
        });
    }
    policy
        .evaluate(&signed.manifest, &signed.signatures)
        .into_result()?;
    let manifest = decode_manifest(&signed.manifest)?;
    if manifest.product_id != device_product_id {
        return Err(Rejection::WrongProduct {
            device: device_product_id,
            manifest: manifest.product_id,
        });
    }
    if manifest.version <= version_floor {
        return Err(Rejection::Rollback {
            version: manifest.version,
            floor: version_floor,
        });
    }
    Ok(manifest)
}

/// `verify_update` on the signed envelope's wire bytes (as UpdateBegin
/// carries them).
pub fn verify_update_bytes(
    signed_manifest: &[u8],
    policy: &TrustPolicy,
    device_product_id: u32,
    version_floor: u32,
) -> Result<FirmwareManifest, Rejection> {
    let signed = decode_signed_manifest(signed_manifest)?;
    verify_update(&signed, policy, device_product_id, version_floor)
}

/// The received image against its (verified) manifest: size, then SHA-256.
pub fn verify_image(manifest: &FirmwareManifest, image: &[u8]) -> Result<(), Rejection> {
    let actual = image.len() as u64;
    if actual != manifest.image_size {
        return Err(Rejection::SizeMismatch {
            expected: manifest.image_size,
            actual,
        });
    }
    let sha = image_sha256(image);
    if sha.as_slice() != manifest.image_sha256.as_slice() {
        return Err(Rejection::HashMismatch {
            expected: hex::encode(&manifest.image_sha256),
            actual: hex::encode(sha),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{build_manifest, encode_manifest};

    fn unsigned_release() -> SignedManifest {
        SignedManifest {
            manifest: encode_manifest(&build_manifest(3, 2, b"firmware", 1, "acme")),
            signatures: vec![],
        }
    }

    /// A command policy rides in the trust policy's JSON (and so is rotated
    /// with it); a policy without one writes no `commands`.
    #[test]
    fn a_command_policy_round_trips_in_the_json_form() {
        let release = TrustedKey::new(
            "customer",
            rsa::PrivateKey::new(&mut rand::rng(), 2048)
                .expect("key")
                .to_public_key(),
        )
        .expect("trusted");
        let operator = TrustedKey::new(
            "operator",
            rsa::PrivateKey::new(&mut rand::rng(), 2048)
                .expect("key")
                .to_public_key(),
        )
        .expect("trusted");
        let plain = TrustPolicy::new(vec![release.clone()], 1).expect("policy");
        let text = plain.to_json().expect("json");
        assert!(!text.contains("commands"), "{text}");
        assert_eq!(TrustPolicy::from_json(&text).expect("parse"), plain);

        let commands = CommandPolicy::new(
            TrustPolicy::new(vec![operator.clone()], 1).expect("signers"),
            Protected::Only(vec!["open".into(), "wipe".into()]),
            300_000,
        )
        .expect("command policy");
        let with = plain.clone().with_commands(Some(commands.clone()));
        let text = with.to_json().expect("json");
        let back = TrustPolicy::from_json(&text).expect("parse");
        assert_eq!(back, with);
        assert_eq!(back.commands(), Some(&commands));
        assert!(back.commands().expect("commands").protects("wipe"));
        assert!(!back.commands().expect("commands").protects("led"));

        // An impossible command threshold, or no validity at all, is
        // refused like any other invalid policy.
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        for (field, value) in [
            ("threshold", 3),
            ("max_validity_secs", 0),
            ("max_validity_secs", MAX_COMMAND_VALIDITY_SECS + 1),
        ] {
            let mut bad = v.clone();
            bad["commands"][field] = serde_json::json!(value);
            assert!(
                TrustPolicy::from_json(&bad.to_string()).is_err(),
                "{field} {value}"
            );
        }
        let mut all = v;
        all["commands"]["protected"] = serde_json::json!("all");
        let all = TrustPolicy::from_json(&all.to_string()).expect("all");
        assert!(all.commands().expect("commands").protects("anything"));
    }

    /// A policy put together without the constructor (only this module
    /// can) is still refused at verify time: no keys and threshold 0 would
    /// otherwise accept firmware nobody signed.
    #[test]
    fn hand_built_invalid_policies_refuse_to_verify() {
        let key = TrustedKey::new(
            "customer",
            rsa::PrivateKey::new(&mut rand::rng(), 2048)
                .expect("key")
                .to_public_key(),
        )
        .expect("trusted");
        let signed = unsigned_release();
        for (policy, needle) in [
            (
                TrustPolicy {
                    keys: vec![],
                    threshold: 0,
                    version: 1,
                    commands: None,
                },
                "trusts no keys",
            ),
            (
                TrustPolicy {
                    keys: vec![key.clone()],
                    threshold: 0,
                    version: 1,
                    commands: None,
                },
                "threshold 0",
            ),
            (
                TrustPolicy {
                    keys: vec![key.clone(), key.clone()],
                    threshold: 1,
                    version: 1,
                    commands: None,
                },
                "listed twice",
            ),
        ] {
            // Without the verify-time check this would be "1 of 0 signed".
            assert!(policy.evaluate(&signed.manifest, &[]).valid.is_empty());
            let err = verify_update(&signed, &policy, 3, 1).unwrap_err();
            assert_eq!(err.code(), "invalid_trust_policy", "{err}");
            assert!(err.to_string().contains(needle), "{err}");
            let bytes = crate::manifest::encode_signed_manifest(&signed);
            assert_eq!(verify_update_bytes(&bytes, &policy, 3, 1).unwrap_err(), err);
            // Nor is it ever written out for a device.
            assert!(policy.to_json().is_err());
            assert!(serde_json::to_string(&policy).is_err());
        }
    }
}

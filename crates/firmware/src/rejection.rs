//! Why a device refused an update: a stable reason code (what dashboards,
//! the OTA scheduler and tests match on) and a message for people. Devices
//! report it as the private event `trellis/ota/rejected` with data
//! `<reason_code>: <message>`, and in the payload of the 4.xx reply to the
//! step that failed.

use std::fmt;

use trellis_wire::coap::code;

use crate::policy::KeyRef;

/// Name of the private event a device publishes when it refuses an update.
pub const REJECTED_EVENT: &str = "trellis/ota/rejected";

/// 4.06 Not Acceptable: the transfer or the image is wrong.
const NOT_ACCEPTABLE: u8 = code::make(4, 6);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The device was provisioned without a trust policy: it accepts nothing.
    NoTrustPolicy,
    /// The device's trust policy breaks the policy rules (no keys, threshold
    /// 0 or above the key count, a key twice): it accepts nothing rather
    /// than firmware nobody signed.
    InvalidTrustPolicy { detail: String },
    /// UpdateBegin carried no manifest (a spark-style server).
    NoManifest,
    /// The signed manifest or the manifest inside it does not decode, or
    /// holds impossible values (no SHA-256, an empty image).
    MalformedManifest { detail: String },
    /// Fewer trusted keys signed than the policy's threshold.
    InsufficientSignatures {
        threshold: usize,
        valid: Vec<KeyRef>,
        missing: Vec<KeyRef>,
    },
    /// Too few trusted signatures, and some signatures are by keys the
    /// device does not trust at all.
    UnknownKey {
        key_ids: Vec<String>,
        threshold: usize,
        missing: Vec<KeyRef>,
    },
    /// A signature naming a trusted key does not verify over these bytes.
    BadSignature { key: KeyRef },
    /// The manifest is for another product.
    WrongProduct { device: u32, manifest: u32 },
    /// The version is not above the device's version floor.
    Rollback { version: u32, floor: u32 },
    /// The image (or UpdateBegin's file size) is not the manifest's size.
    SizeMismatch { expected: u64, actual: u64 },
    /// The image's SHA-256 is not the manifest's.
    HashMismatch { expected: String, actual: String },
    /// The image is larger than the device can hold.
    TooLarge { size: u64, limit: u64 },
    /// One chunk kept arriving with a bad CRC.
    ChunkCrc { index: u16, attempts: u32 },
    /// Chunks still missing after repeated requests for them.
    MissingChunks { missing: usize, rounds: u32 },
    /// The transfer itself is impossible: chunk size 0, an index past the
    /// end, a chunk of the wrong length.
    BadTransfer { detail: String },
    /// A signed trust policy (rotation, [`crate::rotation`]) that does not
    /// decode, is not canonical, or is not a valid policy.
    MalformedPolicy { detail: String },
    /// A new trust policy whose version is not above the device's.
    PolicyRollback { version: u64, current: u64 },
    /// A new trust policy not signed by a threshold of its own keys.
    NewPolicyUnsigned { detail: String },
}

fn names(keys: &[KeyRef]) -> String {
    if keys.is_empty() {
        return "none".into();
    }
    keys.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Rejection {
    /// The stable reason code.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::NoTrustPolicy => "no_trust_policy",
            Rejection::InvalidTrustPolicy { .. } => "invalid_trust_policy",
            Rejection::NoManifest => "no_manifest",
            Rejection::MalformedManifest { .. } => "malformed_manifest",
            Rejection::InsufficientSignatures { .. } => "insufficient_signatures",
            Rejection::UnknownKey { .. } => "unknown_key",
            Rejection::BadSignature { .. } => "bad_signature",
            Rejection::WrongProduct { .. } => "wrong_product",
            Rejection::Rollback { .. } => "rollback",
            Rejection::SizeMismatch { .. } => "size_mismatch",
            Rejection::HashMismatch { .. } => "hash_mismatch",
            Rejection::TooLarge { .. } => "too_large",
            Rejection::ChunkCrc { .. } => "chunk_crc",
            Rejection::MissingChunks { .. } => "missing_chunks",
            Rejection::BadTransfer { .. } => "bad_transfer",
            Rejection::MalformedPolicy { .. } => "malformed_policy",
            Rejection::PolicyRollback { .. } => "rollback",
            Rejection::NewPolicyUnsigned { .. } => "new_policy_unsigned",
        }
    }

    /// `<reason_code>: <message>`, the data of the `trellis/ota/rejected`
    /// event and the payload of the refusing reply.
    pub fn event_data(&self) -> String {
        format!("{}: {}", self.code(), self)
    }

    /// The CoAP code of the refusing reply: 4.03 for anything the trust
    /// policy decides, 4.13 for an image too large, 4.06 for a bad transfer
    /// or image. Never 4.00, which on a Chunk means "send it again".
    pub fn coap_code(&self) -> u8 {
        match self {
            Rejection::NoTrustPolicy
            | Rejection::InvalidTrustPolicy { .. }
            | Rejection::InsufficientSignatures { .. }
            | Rejection::UnknownKey { .. }
            | Rejection::BadSignature { .. }
            | Rejection::WrongProduct { .. }
            | Rejection::Rollback { .. }
            | Rejection::PolicyRollback { .. }
            | Rejection::NewPolicyUnsigned { .. } => code::FORBIDDEN,
            Rejection::TooLarge { .. } => code::REQUEST_ENTITY_TOO_LARGE,
            _ => NOT_ACCEPTABLE,
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::NoTrustPolicy => {
                f.write_str("this device has no trust policy and accepts no firmware")
            }
            Rejection::InvalidTrustPolicy { detail } => write!(
                f,
                "this device's trust policy is invalid ({detail}) and accepts no firmware"
            ),
            Rejection::NoManifest => f.write_str("UpdateBegin carried no signed manifest"),
            Rejection::MalformedManifest { detail } => write!(f, "malformed manifest: {detail}"),
            Rejection::InsufficientSignatures {
                threshold,
                valid,
                missing,
            } => write!(
                f,
                "{} of {threshold} required signatures (signed by: {}; missing: {})",
                valid.len(),
                names(valid),
                names(missing)
            ),
            Rejection::UnknownKey {
                key_ids,
                threshold,
                missing,
            } => write!(
                f,
                "signed by keys this device does not trust ({}); {threshold} trusted signatures required, missing: {}",
                key_ids.join(", "),
                names(missing)
            ),
            Rejection::BadSignature { key } => {
                write!(f, "the signature by {key} does not verify")
            }
            Rejection::WrongProduct { device, manifest } => write!(
                f,
                "the release is for product {manifest}, this device is product {device}"
            ),
            Rejection::Rollback { version, floor } => write!(
                f,
                "version {version} is not above this device's version floor {floor}"
            ),
            Rejection::SizeMismatch { expected, actual } => {
                write!(f, "image is {actual} bytes, the manifest says {expected}")
            }
            Rejection::HashMismatch { expected, actual } => {
                write!(f, "image SHA-256 is {actual}, the manifest says {expected}")
            }
            Rejection::TooLarge { size, limit } => write!(
                f,
                "image of {size} bytes is larger than this device's limit of {limit}"
            ),
            Rejection::ChunkCrc { index, attempts } => {
                write!(f, "chunk {index} failed its CRC check {attempts} times")
            }
            Rejection::MissingChunks { missing, rounds } => write!(
                f,
                "{missing} chunks still missing after asking {rounds} times"
            ),
            Rejection::BadTransfer { detail } => write!(f, "bad transfer: {detail}"),
            Rejection::MalformedPolicy { detail } => write!(f, "malformed trust policy: {detail}"),
            Rejection::PolicyRollback { version, current } => write!(
                f,
                "trust policy version {version} is not above this device's policy version {current}"
            ),
            Rejection::NewPolicyUnsigned { detail } => write!(
                f,
                "the new trust policy is not signed by a threshold of its own keys ({detail}); \
                 it could lock the device out"
            ),
        }
    }
}

impl std::error::Error for Rejection {}

/// Splits `trellis/ota/rejected` event data (or a refusal payload) into
/// `(reason_code, message)`.
pub fn parse_rejection_event(data: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(data).ok()?;
    let (code, message) = text.split_once(": ")?;
    if code.is_empty() || !code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        return None;
    }
    Some((code.to_owned(), message.to_owned()))
}

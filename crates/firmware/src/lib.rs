//! Signed firmware for Trellis devices, without any I/O: release manifests
//! and their RSA-PSS signatures, the trust policy a device is provisioned
//! with, the checks a device runs before it accepts an update, and the
//! sans-IO firmware transfer on both ends (`OtaSender` for the gateway,
//! `OtaReceiver` for the device) over `trellis-wire` messages.
//!
//! The order of checks is the point of this crate: a device verifies the
//! manifest's signatures against its policy over the exact signed bytes
//! BEFORE it decodes or believes anything in them, and before it accepts a
//! single chunk; the image is only ever accepted whole, after its size and
//! SHA-256 match the verified manifest.

pub mod command;
pub mod keys;
pub mod manifest;
pub mod policy;
pub mod receiver;
pub mod rejection;
pub mod rotation;
pub mod sender;
pub mod signing;
mod token_map;

pub use command::{
    CommandEnvelope, CommandGuard, CommandPolicy, CommandRefusal, EnvelopeError, Protected,
    SignedCommand, sign_command,
};
pub use keys::{
    KeyError, MIN_RELEASE_KEY_BITS, key_id, private_key_from_pem, public_key_from_pem,
    public_key_to_pem,
};
pub use manifest::{
    FirmwareManifest, ManifestSignature, SignedManifest, build_manifest, decode_manifest,
    decode_signed_manifest, encode_manifest, encode_signed_manifest, image_sha256,
};
pub use policy::{
    DEFAULT_POLICY_VERSION, KeyRef, PolicyError, PolicyReport, TrustPolicy, TrustedKey,
    verify_image, verify_update, verify_update_bytes,
};
pub use receiver::{
    ChunkOutcome, DoneOutcome, OtaReceiver, ReceivedUpdate, ReceiverConfig, ReceiverOutput, Reply,
};
pub use rejection::{REJECTED_EVENT, Rejection, parse_rejection_event};
pub use rotation::{
    POLICY_REJECTED_EVENT, SignedPolicy, TrustPolicyDoc, decode_policy, decode_signed_policy,
    encode_signed_policy, sign_policy, verify_policy_update, verify_policy_update_bytes,
};
pub use sender::{OtaSender, Outcome, Progress, SendFailure, SenderConfig, SenderError, Step};
pub use signing::{SignError, SignatureError, sign_manifest, verify_signature};
pub use token_map::TokenMap;

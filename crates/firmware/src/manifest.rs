//! `trellis.v1.FirmwareManifest` and the signed envelope around it. The
//! manifest is kept as the exact bytes that were signed: build and encode it
//! once, sign those bytes, ship those bytes; verifiers decode them only after
//! the signatures check out, and never re-encode them.

use prost::Message;
use sha2::{Digest, Sha256};

pub use trellis_proto::v1::{FirmwareManifest, ManifestSignature, SignedManifest};

use crate::rejection::Rejection;

/// SHA-256 of an image.
pub fn image_sha256(image: &[u8]) -> [u8; 32] {
    Sha256::digest(image).into()
}

/// The manifest for `image`: its size and SHA-256 computed here.
pub fn build_manifest(
    product_id: u32,
    version: u32,
    image: &[u8],
    created_at_ms: i64,
    organization: &str,
) -> FirmwareManifest {
    FirmwareManifest {
        product_id,
        version,
        image_size: image.len() as u64,
        image_sha256: image_sha256(image).to_vec(),
        created_at_ms,
        organization: organization.to_owned(),
    }
}

/// The bytes to sign and to ship. Encode once and keep them.
pub fn encode_manifest(manifest: &FirmwareManifest) -> Vec<u8> {
    manifest.encode_to_vec()
}

fn malformed(detail: impl Into<String>) -> Rejection {
    Rejection::MalformedManifest {
        detail: detail.into(),
    }
}

/// Decodes and sanity-checks manifest bytes: a 32-byte SHA-256 and a
/// non-empty image are required (an empty image is exactly the firmware no
/// device should ever accept).
pub fn decode_manifest(bytes: &[u8]) -> Result<FirmwareManifest, Rejection> {
    if bytes.is_empty() {
        return Err(malformed("the manifest is empty"));
    }
    let m = FirmwareManifest::decode(bytes)
        .map_err(|e| malformed(format!("not a trellis.v1.FirmwareManifest: {e}")))?;
    if m.image_sha256.len() != 32 {
        return Err(malformed(format!(
            "image_sha256 is {} bytes, not 32",
            m.image_sha256.len()
        )));
    }
    if m.image_size == 0 {
        return Err(malformed("image_size is 0"));
    }
    Ok(m)
}

/// The signed envelope's wire form (what UpdateBegin carries after spark's
/// 12 bytes, and what a release stores).
pub fn encode_signed_manifest(signed: &SignedManifest) -> Vec<u8> {
    signed.encode_to_vec()
}

/// Decodes the signed envelope. The manifest inside is NOT decoded here:
/// that happens only after the signatures are checked.
pub fn decode_signed_manifest(bytes: &[u8]) -> Result<SignedManifest, Rejection> {
    let signed = SignedManifest::decode(bytes)
        .map_err(|e| malformed(format!("not a trellis.v1.SignedManifest: {e}")))?;
    if signed.manifest.is_empty() {
        return Err(malformed("the signed envelope holds no manifest"));
    }
    Ok(signed)
}

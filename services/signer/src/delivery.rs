//! What a gateway needs to deliver a release to a device: the signed
//! manifest (exact manifest bytes + signatures) and the image bytes, read
//! straight from the signer's Redis records.
//!
//! The loader checks nothing about the signatures or the image on purpose:
//! the device is the judge (it verifies the manifest against its own trust
//! policy, then the image's size and SHA-256), so a release that was altered
//! in storage is refused by the device, with the reason reported, rather
//! than hidden here. [`Delivery::image_matches`] is there for callers that
//! want to log a mismatch before sending.
use crate::error::{Result, SignerError};
use crate::store;
use trellis_core::redis_conn::Redis;
use trellis_firmware::{SignedManifest, encode_signed_manifest, image_sha256};

/// A release ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub release_id: String,
    pub product_id: u32,
    pub version: u32,
    /// Lowercase hex SHA-256 of the image, as the release recorded it.
    pub image_sha256: String,
    /// The exact signed manifest bytes and every stored signature.
    pub signed: SignedManifest,
    /// The image as stored.
    pub image: Vec<u8>,
}

impl Delivery {
    /// The signed envelope's wire form (`trellis.v1.SignedManifest`), as
    /// UpdateBegin carries it.
    pub fn signed_manifest_bytes(&self) -> Vec<u8> {
        encode_signed_manifest(&self.signed)
    }

    /// Whether the stored image still hashes to the release's SHA-256.
    pub fn image_matches(&self) -> bool {
        hex::encode(image_sha256(&self.image)) == self.image_sha256
    }
}

/// Loads release `release_id` ("<product_id>-<version>") and its image.
/// NOT_FOUND-style errors name what is missing.
pub async fn load_release_for_delivery(redis: &mut Redis, release_id: &str) -> Result<Delivery> {
    let (release_id, _, _) = crate::validate::release_id(release_id)?;
    let release = store::get_release(redis, &release_id)
        .await?
        .ok_or_else(|| SignerError::NotFound(format!("no release {release_id}")))?;
    let image = store::get_image_bytes(redis, &release.image_sha256)
        .await?
        .ok_or_else(|| {
            SignerError::NotFound(format!(
                "release {release_id}: its image {} is no longer stored",
                release.image_sha256
            ))
        })?;
    Ok(Delivery {
        signed: release.signed_manifest(),
        release_id,
        product_id: release.product_id,
        version: release.version,
        image_sha256: release.image_sha256,
        image,
    })
}

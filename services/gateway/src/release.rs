//! What a delivery needs from the signer's records: the signed manifest's
//! exact bytes and the image, read from Redis where the signer keeps them.
pub struct Bundle {
    pub signed_manifest: Vec<u8>,
    pub image: Vec<u8>,
}

pub async fn load(
    redis: &mut trellis_core::redis_conn::Redis,
    release_id: &str,
) -> Result<Bundle, String> {
    let delivery = trellis_signer::load_release_for_delivery(redis, release_id)
        .await
        .map_err(|e| format!("release {release_id}: {e}"))?;
    if !delivery.image_matches() {
        // The device will refuse it and say why; the log says where to look.
        tracing::warn!(
            release = release_id,
            "stored image no longer matches its release SHA-256"
        );
    }
    Ok(Bundle {
        signed_manifest: delivery.signed_manifest_bytes(),
        image: delivery.image,
    })
}

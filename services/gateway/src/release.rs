//! What a delivery needs from the signer's records: the signed manifest's
//! exact bytes and the image, read from Redis where the signer keeps them.
//!
//! Images are content-addressed (stored once under their SHA-256, `SET NX`)
//! and immutable, so each gateway keeps the few it has verified in a small
//! cache ([`Cache`]) and shares one copy between all deliveries of them: a
//! rollout to many devices reads and hashes the image once, not once per
//! device. The release record itself is read on every delivery: it is small,
//! and it is not immutable (signatures are added to it after it is created,
//! and a release can go away), so its signatures are always current.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use trellis_core::redis_conn::Redis;
use trellis_firmware::encode_signed_manifest;
use trellis_records::release as store;

pub struct Bundle {
    pub signed_manifest: Vec<u8>,
    /// Shared with every other delivery of the same image.
    pub image: Arc<[u8]>,
}

/// How many verified images a gateway keeps (a rollout usually sends one).
const CACHE_ENTRIES: usize = 4;

/// Verified images by SHA-256 (lowercase hex), most recently used last.
#[derive(Default)]
pub struct Cache {
    entries: Mutex<VecDeque<(String, Arc<[u8]>)>>,
}

impl Cache {
    fn get(&self, sha256: &str) -> Option<Arc<[u8]>> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let at = entries.iter().position(|(k, _)| k == sha256)?;
        let entry = entries.remove(at)?;
        let image = Arc::clone(&entry.1);
        entries.push_back(entry);
        Some(image)
    }

    /// Only for images that hash to `sha256`. Two concurrent first loads
    /// may both insert; the later one replaces the earlier (same bytes).
    fn insert(&self, sha256: &str, image: Arc<[u8]>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|(k, _)| k != sha256);
        while entries.len() >= CACHE_ENTRIES {
            entries.pop_front();
        }
        entries.push_back((sha256.to_string(), image));
    }
}

pub async fn load(redis: &mut Redis, cache: &Cache, release_id: &str) -> Result<Bundle, String> {
    let fail = |e: trellis_records::RecordError| format!("release {release_id}: {e}");
    let (id, _, _) = store::parse_release_id(release_id).map_err(fail)?;
    let release = store::get_release(redis, &id)
        .await
        .map_err(fail)?
        .ok_or_else(|| format!("release {release_id}: no release {id}"))?;
    let signed_manifest = encode_signed_manifest(&release.signed_manifest());
    if let Some(image) = cache.get(&release.image_sha256) {
        return Ok(Bundle {
            signed_manifest,
            image,
        });
    }
    let image = store::get_image_bytes(redis, &release.image_sha256)
        .await
        .map_err(fail)?
        .ok_or_else(|| {
            format!(
                "release {release_id}: release {id}: its image {} is no longer stored",
                release.image_sha256
            )
        })?;
    let image: Arc<[u8]> = Arc::from(image);
    if hex::encode(trellis_firmware::image_sha256(&image)) == release.image_sha256 {
        cache.insert(&release.image_sha256, Arc::clone(&image));
    } else {
        // Not cached: the device will refuse it and say why; the log says
        // where to look, on every delivery of it.
        tracing::warn!(
            release = release_id,
            "stored image no longer matches its release SHA-256"
        );
    }
    Ok(Bundle {
        signed_manifest,
        image,
    })
}

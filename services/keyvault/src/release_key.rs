//! The release key: a separate RSA-2048 key pair that signs firmware release
//! manifests (purpose "release", RSA-PSS-SHA256, MGF1-SHA-256, salt 32, the
//! form `trellis_firmware::signing` verifies). It is made on keyvault's first
//! start and sealed in Redis (`keys::RELEASE_KEY`) exactly like the cloud
//! key, under the same master key but with its own associated-data label.
//! It is never the handshake key: a device's trust policy names it on its
//! own, next to the customer's offline key.
//!
//! Signing runs on the private-key pool's threads (see [`crate::pool`]), as
//! an admission: release signing is rare and must never starve handshakes
//! that are already under way.
use crate::backend::BackendError;
use crate::cloud_key::{CloudKey, CloudKeyError, KeySlot, load_or_create_in};
use crate::master_key::MasterKey;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Padding;
use openssl::sign::{RsaPssSaltlen, Signer};
use trellis_core::redis_conn::{Redis, keys};

/// The only purpose keyvault signs for today.
pub const PURPOSE_RELEASE: &str = "release";
/// Every purpose keyvault knows, for messages.
pub const PURPOSES: &[&str] = &[PURPOSE_RELEASE];
/// RSA-PSS salt length in bytes (PROTOCOL.md, "Trellis firmware manifest").
pub const PSS_SALT_LEN: i32 = 32;

/// Where the release key is sealed.
pub const RELEASE_SLOT: KeySlot = KeySlot {
    location: keys::RELEASE_KEY,
    label: "trellis-release-key",
    what: "release key",
};

/// The public facts about the release key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleasePublic {
    pub key_id: String,
    pub public_der: Vec<u8>,
    pub public_pem: String,
    pub version: u32,
}

/// The opened release key, ready to sign. OpenSSL keeps the private
/// components in BIGNUMs that are cleared when freed; `Debug` shows only the
/// public facts.
pub struct ReleaseKey {
    key: PKey<Private>,
    public: ReleasePublic,
}

impl std::fmt::Debug for ReleaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReleaseKey")
            .field("key_id", &self.public.key_id)
            .field("version", &self.public.version)
            .finish_non_exhaustive()
    }
}

impl ReleaseKey {
    /// From an opened sealed record.
    pub fn from_opened(opened: &CloudKey) -> Result<Self, BackendError> {
        let key = PKey::private_key_from_pkcs8(opened.private_pkcs8_der())
            .map_err(|e| BackendError::Key(e.to_string()))?;
        let pem = key
            .public_key_to_pem()
            .map_err(|e| BackendError::Key(e.to_string()))?;
        let public_pem = String::from_utf8(pem).map_err(|e| BackendError::Key(e.to_string()))?;
        Ok(Self {
            key,
            public: ReleasePublic {
                key_id: opened.key_id.clone(),
                public_der: opened.public_der.clone(),
                public_pem,
                version: opened.version,
            },
        })
    }

    pub fn public(&self) -> &ReleasePublic {
        &self.public
    }

    /// RSA-PSS over `data`: SHA-256, MGF1-SHA-256, a 32-byte salt.
    pub fn sign_pss(&self, data: &[u8]) -> Result<Vec<u8>, BackendError> {
        let op = |e: openssl::error::ErrorStack| BackendError::Operation(e.to_string());
        let mut signer = Signer::new(MessageDigest::sha256(), &self.key).map_err(op)?;
        signer.set_rsa_padding(Padding::PKCS1_PSS).map_err(op)?;
        signer
            .set_rsa_pss_saltlen(RsaPssSaltlen::custom(PSS_SALT_LEN))
            .map_err(op)?;
        signer
            .set_rsa_mgf1_md(MessageDigest::sha256())
            .map_err(op)?;
        signer.update(data).map_err(op)?;
        signer.sign_to_vec().map_err(op)
    }
}

/// Loads the release key from Redis, or makes and seals one on first start
/// (SET NX: two keyvaults starting at once keep one key).
pub async fn load_or_create(
    redis: &mut Redis,
    master: &MasterKey,
) -> Result<ReleaseKey, CloudKeyError> {
    let opened = load_or_create_in(redis, RELEASE_SLOT, master).await?;
    Ok(ReleaseKey::from_opened(&opened)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::pkcs8::DecodePublicKey;
    use sha2::{Digest, Sha256};

    #[test]
    fn pss_signature_verifies_with_rsa_crate_and_slots_are_separate() {
        let master = MasterKey::from_bytes([3; 32]);
        let generated = CloudKey::generate().unwrap();
        let sealed = generated.seal_in(RELEASE_SLOT, &master).unwrap();
        // A release record never opens as the cloud key (and back).
        assert!(sealed.open(&master).is_err());
        let opened = sealed.open_in(RELEASE_SLOT, &master).unwrap();
        let key = ReleaseKey::from_opened(&opened).unwrap();
        assert!(key.public().public_pem.contains("BEGIN PUBLIC KEY"));
        assert_eq!(
            key.public().key_id,
            hex::encode(Sha256::digest(&key.public().public_der))
        );
        let data = b"manifest bytes";
        let sig = key.sign_pss(data).unwrap();
        assert_eq!(sig.len(), 256);
        let public = rsa::PublicKey::from_public_key_der(&key.public().public_der).unwrap();
        public.pss_verify::<Sha256>(data, &sig).unwrap();
        assert!(public.pss_verify::<Sha256>(b"other bytes", &sig).is_err());
        assert!(!format!("{key:?}").contains("BEGIN"));
    }
}

//! The release key: a separate RSA-2048 key pair that signs firmware release
//! manifests (purpose "release", RSA-PSS-SHA256, MGF1-SHA-256, salt 32, the
//! form `trellis_firmware::signing` verifies). It is made on keyvault's first
//! start and sealed in Redis (`keys::RELEASE_KEY`) exactly like the cloud
//! key, under the same master key but with its own associated-data label.
//! It is never the handshake key: a device's trust policy names it on its
//! own, next to the customer's offline key.
//!
//! It rotates like the cloud key (`trellis keys rotate release`, the
//! [`RELEASE`] family of [`crate::keyring`]): version N+1 is sealed at
//! `keys::release_key_record(N+1)`; the signer signs a product's firmware
//! with the version that product's trust policy names, and a policy
//! rotation carries the new version to devices (docs/protocol.md §7.5).
//!
//! Signing runs on the private-key pool's threads (see [`crate::pool`]), as
//! an admission: release signing is rare and must never starve handshakes
//! that are already under way.
use crate::backend::BackendError;
use crate::cloud_key::{CloudKey, CloudKeyError, KeySlot, load_or_create_in};
use crate::error::{KeyvaultError, Result};
use crate::keyring::{self, Family, VersionMeta};
use crate::master_key::MasterKey;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Padding;
use openssl::sign::{RsaPssSaltlen, Signer};
use redis::AsyncCommands;
use std::sync::Arc;
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

/// Where release key `version` is sealed (version 1: [`RELEASE_SLOT`]).
pub fn release_slot(version: u32) -> KeySlot {
    keyring::versioned_slot(RELEASE_SLOT, version, keys::release_key_record)
}

/// The release key's versions.
pub static RELEASE: Family<ReleaseKey> = Family {
    name: "release",
    what: "release key",
    versions_key: keys::RELEASE_KEY_VERSIONS,
    slot: release_slot,
    open: open_release,
};

fn open_release(key: &CloudKey) -> std::result::Result<Arc<ReleaseKey>, BackendError> {
    Ok(Arc::new(ReleaseKey::from_opened(key)?))
}

/// Every release key version this keyvault holds.
pub type ReleaseKeyring = keyring::Keyring<ReleaseKey>;
/// The release keyring, shared by the service and its reloader.
pub type SharedReleaseKeyring = keyring::SharedKeyring<ReleaseKey>;

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
/// (SET NX: two keyvaults starting at once keep one key). Version 1 only:
/// the keyvault service loads every version with [`load`].
pub async fn load_or_create(
    redis: &mut Redis,
    master: &MasterKey,
) -> std::result::Result<ReleaseKey, CloudKeyError> {
    let opened = load_or_create_in(redis, RELEASE_SLOT, master).await?;
    Ok(ReleaseKey::from_opened(&opened)?)
}

/// Opens every release key version (making version 1 on a first start).
pub async fn load(redis: &mut Redis, master: &MasterKey) -> Result<ReleaseKeyring> {
    keyring::load(&RELEASE, redis, master, None).await
}

/// The products whose current trust policy (`keys::policy`, the signer's)
/// trusts `key_id`, by product id.
async fn products_trusting(redis: &mut Redis, key_id: &str) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let names: Vec<String> = {
        let mut iter: redis::AsyncIter<String> = redis.scan_match(keys::POLICY_PATTERN).await?;
        let mut names = Vec::new();
        while let Some(name) = iter.next_item().await {
            names.push(name?);
        }
        names
    };
    for name in names {
        let Some(json): Option<String> = redis.get(&name).await? else {
            continue;
        };
        let product = name.rsplit(':').next().unwrap_or(&name).to_string();
        match trellis_firmware::TrustPolicy::from_json(&json) {
            Ok(policy) if policy.key(key_id).is_some() => found.push(product),
            Ok(_) => {}
            Err(e) => {
                return Err(KeyvaultError::FailedPrecondition(format!(
                    "product {product}'s policy ({name}) cannot be read ({e}), so whether it trusts release key {key_id} is unknown; fix it with `trellis policy set`, or retire with --force"
                )));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// `trellis keys retire release N [--force]`: keyvault stops signing with
/// version N. Refused while a product's current policy trusts it (unless
/// forced): such a product could no longer get the cloud's signature on a
/// release, nor on the policy rotation that would move it to a newer key.
/// Audited.
pub async fn retire(
    redis: &mut Redis,
    shared: &SharedReleaseKeyring,
    version: u32,
    force: bool,
    actor: &str,
) -> Result<VersionMeta> {
    let key = match keyring::retirable(redis, shared, version).await? {
        Ok(key) => key,
        Err(already) => return Ok(already),
    };
    let trusting = products_trusting(redis, &key.meta.key_id).await?;
    if !trusting.is_empty() && !force {
        return Err(KeyvaultError::FailedPrecondition(format!(
            "the policy of product(s) {} still trusts release key version {version} ({}): retired, it could sign neither their releases nor the policy rotation that moves them off it. Rotate their policies to the current release key first (`trellis policy rotate`, then a rollout), or retire with --force",
            trusting.join(", "),
            key.meta.key_id
        )));
    }
    keyring::set_retired(
        redis,
        shared,
        &key,
        true,
        actor,
        &[
            ("forced", force.to_string()),
            ("trusting_products", trusting.join(",")),
        ],
    )
    .await
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

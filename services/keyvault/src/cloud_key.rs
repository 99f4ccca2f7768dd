//! The cloud key: the RSA-2048 key pair whose public half every device holds.
//! It is made on keyvault's first start and kept in Redis (`keys::CLOUD_KEY`)
//! sealed with AES-256-GCM under the master key (envelope encryption). The
//! record is created with SET NX, so two keyvaults starting at once agree on
//! one key; a keyvault whose master key does not open the stored record
//! refuses to start and never touches the record.
use crate::backend::{BackendError, generate_pkcs8_der};
use crate::master_key::MasterKey;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use redis::AsyncCommands;
use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
use serde::{Deserialize, Serialize};
use trellis_core::keys::key_id;
use trellis_core::redis_conn::{Redis, keys};
use zeroize::Zeroizing;

/// The version of the first cloud key (later ones: `cloud_keys::rotate`).
pub const CLOUD_KEY_VERSION: u32 = 1;

/// Where a sealed key lives and what it is called. The cloud key and the
/// release-signing key ([`crate::release_key`]) are sealed the same way,
/// each under its own Redis key and with its own label in the associated
/// data, so one record can never be opened in place of the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySlot {
    /// Redis key of the sealed record.
    pub location: &'static str,
    /// Associated-data label (domain separation).
    pub label: &'static str,
    /// What operators call it, in messages.
    pub what: &'static str,
}

/// The handshake key every device holds.
pub const CLOUD_SLOT: KeySlot = KeySlot {
    location: keys::CLOUD_KEY,
    label: "trellis-cloud-key",
    what: "cloud key",
};
const CLOUD_KEY_BITS: u32 = 2048;

/// The slot of cloud key `version`: version 1 is [`CLOUD_SLOT`], where it
/// always was; version N lives at `trellis:cloudkey:vN`, sealed with the
/// same label (the version is in the associated data too).
pub fn cloud_slot(version: u32) -> KeySlot {
    crate::keyring::versioned_slot(CLOUD_SLOT, version, keys::cloud_key_record)
}
const RECORD_FORMAT: u32 = 1;

/// What is stored at `keys::CLOUD_KEY` (JSON). Only `ciphertext` is secret,
/// and it is sealed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SealedCloudKey {
    /// Record format.
    pub format: u32,
    /// Cloud key version (devices may hold several one day).
    pub version: u32,
    /// Hex SHA-256 of `public_der`.
    pub key_id: String,
    /// AES-256-GCM nonce, hex (12 bytes).
    pub nonce: String,
    /// AES-256-GCM ciphertext and tag of the PKCS#8 private key DER, hex.
    pub ciphertext: String,
    /// SubjectPublicKeyInfo DER, hex.
    pub public_der: String,
}

/// The cloud key, opened: the public half, and the private PKCS#8 DER in a
/// buffer that is wiped when dropped. `Debug` never shows the private part.
pub struct CloudKey {
    pub version: u32,
    pub key_id: String,
    pub public_der: Vec<u8>,
    private_pkcs8: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for CloudKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudKey")
            .field("version", &self.version)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CloudKeyError {
    #[error(
        "the master key does not open the {what} {key_id} (version {version}) stored in Redis at \
         {location}: this keyvault was given a different master key from the one that sealed it. \
         Start it with the original master key. The stored record was left untouched; deleting it \
         would make a new {what} that no deployed device trusts"
    )]
    WrongMasterKey {
        what: &'static str,
        key_id: String,
        version: u32,
        location: String,
    },
    #[error("the key record at {location} is damaged ({problem}); restore it from a backup")]
    Corrupt { location: String, problem: String },
    #[error("redis failed while loading a sealed key: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("cannot seal the key: {0}")]
    Seal(String),
}

impl CloudKey {
    /// The private key as unencrypted PKCS#8 DER (for the backend; never log it).
    pub fn private_pkcs8_der(&self) -> &[u8] {
        &self.private_pkcs8
    }

    /// Makes a new key pair (not stored).
    pub fn generate() -> Result<Self, CloudKeyError> {
        Self::generate_version(CLOUD_KEY_VERSION)
    }

    /// Makes a new key pair for cloud key `version` (not stored).
    pub fn generate_version(version: u32) -> Result<Self, CloudKeyError> {
        let private_pkcs8 = generate_pkcs8_der(CLOUD_KEY_BITS)?;
        let public_der = public_der_of(&private_pkcs8)?;
        Ok(Self {
            version,
            key_id: key_id(&public_der),
            public_der,
            private_pkcs8,
        })
    }

    /// Seals the private key under the master key.
    pub fn seal(&self, master: &MasterKey) -> Result<SealedCloudKey, CloudKeyError> {
        self.seal_in(CLOUD_SLOT, master)
    }

    /// Seals the private key under the master key for `slot`.
    pub fn seal_in(
        &self,
        slot: KeySlot,
        master: &MasterKey,
    ) -> Result<SealedCloudKey, CloudKeyError> {
        let cipher = Aes256Gcm::new_from_slice(master.as_bytes())
            .map_err(|e| CloudKeyError::Seal(e.to_string()))?;
        let mut nonce = [0u8; 12];
        crate::os_random(&mut nonce).map_err(|e| CloudKeyError::Seal(e.to_string()))?;
        let aad = aad(slot, self.version, &self.key_id);
        let ciphertext = cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &self.private_pkcs8,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|e| CloudKeyError::Seal(e.to_string()))?;
        Ok(SealedCloudKey {
            format: RECORD_FORMAT,
            version: self.version,
            key_id: self.key_id.clone(),
            nonce: hex::encode(nonce),
            ciphertext: hex::encode(ciphertext),
            public_der: hex::encode(&self.public_der),
        })
    }
}

impl SealedCloudKey {
    /// Opens the record with the master key and checks that the private key
    /// belongs to the recorded public key.
    pub fn open(&self, master: &MasterKey) -> Result<CloudKey, CloudKeyError> {
        self.open_in(CLOUD_SLOT, master)
    }

    /// Opens a record sealed for `slot`.
    pub fn open_in(&self, slot: KeySlot, master: &MasterKey) -> Result<CloudKey, CloudKeyError> {
        let corrupt = |problem: String| CloudKeyError::Corrupt {
            location: slot.location.to_string(),
            problem,
        };
        if self.format != RECORD_FORMAT {
            return Err(corrupt(format!("unknown record format {}", self.format)));
        }
        let nonce: [u8; 12] = hex::decode(&self.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| corrupt("nonce is not 12 hex bytes".into()))?;
        let ciphertext =
            hex::decode(&self.ciphertext).map_err(|e| corrupt(format!("ciphertext: {e}")))?;
        let public_der =
            hex::decode(&self.public_der).map_err(|e| corrupt(format!("public key: {e}")))?;
        if key_id(&public_der) != self.key_id {
            return Err(corrupt(
                "key id is not the SHA-256 of the public key".into(),
            ));
        }
        let cipher =
            Aes256Gcm::new_from_slice(master.as_bytes()).map_err(|e| corrupt(e.to_string()))?;
        let aad = aad(slot, self.version, &self.key_id);
        let private_pkcs8 = cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &ciphertext,
                    aad: aad.as_bytes(),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| CloudKeyError::WrongMasterKey {
                what: slot.what,
                key_id: self.key_id.clone(),
                version: self.version,
                location: slot.location.to_string(),
            })?;
        if public_der_of(&private_pkcs8)? != public_der {
            return Err(corrupt(
                "the private key does not match the public key".into(),
            ));
        }
        Ok(CloudKey {
            version: self.version,
            key_id: self.key_id.clone(),
            public_der,
            private_pkcs8,
        })
    }
}

/// Loads the cloud key from Redis, or makes and stores one if there is none.
/// Two keyvaults starting at once: SET NX lets exactly one record win, and
/// the loser opens the winner's.
pub async fn load_or_create(
    redis: &mut Redis,
    master: &MasterKey,
) -> Result<CloudKey, CloudKeyError> {
    load_or_create_in(redis, CLOUD_SLOT, master).await
}

/// [`load_or_create`] for any key slot.
pub async fn load_or_create_in(
    redis: &mut Redis,
    slot: KeySlot,
    master: &MasterKey,
) -> Result<CloudKey, CloudKeyError> {
    if let Some(stored) = read_record_in(redis, slot).await? {
        return stored.open_in(slot, master);
    }
    let key = tokio::task::spawn_blocking(CloudKey::generate)
        .await
        .map_err(|e| CloudKeyError::Seal(format!("key generation task failed: {e}")))??;
    let sealed = key.seal_in(slot, master)?;
    let json = serde_json::to_string(&sealed).map_err(|e| CloudKeyError::Seal(e.to_string()))?;
    let created: bool = redis::cmd("SET")
        .arg(slot.location)
        .arg(json)
        .arg("NX")
        .query_async::<Option<String>>(redis)
        .await?
        .is_some();
    if created {
        tracing::info!(key_id = %key.key_id, version = key.version, key = slot.what, "created a sealed key");
        return Ok(key);
    }
    // Someone else stored one first: theirs is the key.
    match read_record_in(redis, slot).await? {
        Some(stored) => stored.open_in(slot, master),
        None => Err(CloudKeyError::Corrupt {
            location: slot.location.to_string(),
            problem: "SET NX refused but the record is gone".into(),
        }),
    }
}

/// The stored record as it is, if any (tests compare it before and after).
pub async fn read_record(redis: &mut Redis) -> Result<Option<SealedCloudKey>, CloudKeyError> {
    read_record_in(redis, CLOUD_SLOT).await
}

/// [`read_record`] for any key slot.
pub async fn read_record_in(
    redis: &mut Redis,
    slot: KeySlot,
) -> Result<Option<SealedCloudKey>, CloudKeyError> {
    let raw: Option<String> = redis.get(slot.location).await?;
    raw.map(|json| {
        serde_json::from_str(&json).map_err(|e| CloudKeyError::Corrupt {
            location: slot.location.to_string(),
            problem: e.to_string(),
        })
    })
    .transpose()
}

fn aad(slot: KeySlot, version: u32, key_id: &str) -> String {
    format!("{}:v{version}:{key_id}", slot.label)
}

fn public_der_of(private_pkcs8: &[u8]) -> Result<Vec<u8>, CloudKeyError> {
    let key = rsa::PrivateKey::from_pkcs8_der(private_pkcs8)
        .map_err(|e| BackendError::Key(e.to_string()))?;
    let der = key
        .to_public_key()
        .to_public_key_der()
        .map_err(|e| BackendError::Key(e.to_string()))?;
    Ok(der.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_wrong_key() {
        let master = MasterKey::from_bytes([1; 32]);
        let key = CloudKey::generate().unwrap();
        let sealed = key.seal(&master).unwrap();
        let opened = sealed.open(&master).unwrap();
        assert_eq!(opened.public_der, key.public_der);
        assert_eq!(opened.private_pkcs8_der(), key.private_pkcs8_der());
        assert!(!format!("{opened:?}").contains("private"));

        let err = sealed
            .open(&MasterKey::from_bytes([2; 32]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&key.key_id), "{err}");
        assert!(err.contains("master key"), "{err}");

        let mut tampered = sealed.clone();
        tampered.version = 2;
        assert!(matches!(
            tampered.open(&master),
            Err(CloudKeyError::WrongMasterKey { .. })
        ));
    }
}

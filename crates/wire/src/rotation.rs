//! Key rotation over an authenticated session (docs/protocol.md §6.7, §6.8):
//! the cloud key announcement (`ck`) a gateway sends a device, and the
//! device key offer a device makes when asked to rotate its own key (`dk`).
//!
//! Both are signed with RSA PKCS#1 v1.5 over SHA-256 (RFC 8017 §8.2, the
//! DigestInfo-prefixed form `openssl dgst -sha256 -sign` makes), over a
//! domain-separated message, so that neither signature can be mistaken for
//! the handshake's raw HMAC signature or for each other.

use rsa::pkcs8::DecodePublicKey;
use rsa::traits::PublicKeyParts;
use rsa::{PrivateKey as RsaPrivateKey, PublicKey as RsaPublicKey};
use sha2::Sha256;

use crate::id::DeviceId;

/// Domain label that starts every signed cloud key announcement.
pub const CLOUD_KEY_DOMAIN: &[u8] = b"trellis-cloud-key-announcement-v1";
/// Domain label that starts every signed device key offer.
pub const DEVICE_KEY_DOMAIN: &[u8] = b"trellis-device-key-rotation-v1";
/// Length of a cloud key signature (RSA-2048).
pub const CLOUD_SIGNATURE_LEN: usize = 256;
/// Length of a device key signature (RSA-1024).
pub const DEVICE_SIGNATURE_LEN: usize = 128;
/// Length of the `nk` payload: the SHA-256 of the new device key's DER.
pub const KEY_COMMIT_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RotationError {
    #[error("payload of {len} bytes is too short for {what}")]
    TooShort { what: &'static str, len: usize },
    #[error("the signature does not verify under the session's key")]
    BadSignature,
    #[error("the announced key is not an RSA-2048 SubjectPublicKeyInfo: {0}")]
    BadCloudKey(String),
    #[error("the offered key is not an RSA-1024 SubjectPublicKeyInfo: {0}")]
    BadDeviceKey(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// The bytes a cloud key announcement's signature covers:
/// `CLOUD_KEY_DOMAIN || version (u32 BE) || public key DER`.
pub fn cloud_key_signed_bytes(version: u32, public_key_der: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CLOUD_KEY_DOMAIN.len() + 4 + public_key_der.len());
    out.extend_from_slice(CLOUD_KEY_DOMAIN);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(public_key_der);
    out
}

/// A cloud key announcement: the `ck` payload is
/// `version (u32 BE) || public key DER || signature (256 bytes)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudKeyAnnouncement {
    pub version: u32,
    pub public_key_der: Vec<u8>,
    pub signature: Vec<u8>,
}

impl CloudKeyAnnouncement {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.public_key_der.len() + self.signature.len());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.public_key_der);
        out.extend_from_slice(&self.signature);
        out
    }

    pub fn parse(payload: &[u8]) -> Result<Self, RotationError> {
        if payload.len() <= 4 + CLOUD_SIGNATURE_LEN {
            return Err(RotationError::TooShort {
                what: "a cloud key announcement",
                len: payload.len(),
            });
        }
        let (head, signature) = payload.split_at(payload.len() - CLOUD_SIGNATURE_LEN);
        let version = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        Ok(Self {
            version,
            public_key_der: head[4..].to_vec(),
            signature: signature.to_vec(),
        })
    }

    /// The bytes the signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        cloud_key_signed_bytes(self.version, &self.public_key_der)
    }

    /// Checks the signature with the cloud key the session was opened under
    /// and returns the announced key (RSA-2048).
    pub fn verify(&self, session_cloud_key: &RsaPublicKey) -> Result<RsaPublicKey, RotationError> {
        session_cloud_key
            .pkcs1v15_verify::<Sha256>(&self.signed_bytes(), &self.signature)
            .map_err(|_| RotationError::BadSignature)?;
        let key = RsaPublicKey::from_public_key_der(&self.public_key_der)
            .map_err(|e| RotationError::BadCloudKey(e.to_string()))?;
        if key.size() != CLOUD_SIGNATURE_LEN {
            return Err(RotationError::BadCloudKey(format!(
                "a {}-bit key",
                key.size() * 8
            )));
        }
        Ok(key)
    }

    /// Signs with a cloud private key (a pure-Rust reference for tests;
    /// keyvault signs with its own backend, byte for byte the same).
    pub fn sign(
        cloud_key: &RsaPrivateKey,
        version: u32,
        public_key_der: &[u8],
    ) -> Result<Self, RotationError> {
        let signature = cloud_key
            .pkcs1v15_sign::<Sha256>(&cloud_key_signed_bytes(version, public_key_der))
            .map_err(|e| RotationError::Sign(e.to_string()))?;
        Ok(Self {
            version,
            public_key_der: public_key_der.to_vec(),
            signature,
        })
    }
}

/// The bytes a device key offer's signature covers:
/// `DEVICE_KEY_DOMAIN || device id (12 bytes) || new public key DER`.
pub fn device_key_signed_bytes(device_id: DeviceId, public_key_der: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(DEVICE_KEY_DOMAIN.len() + 12 + public_key_der.len());
    out.extend_from_slice(DEVICE_KEY_DOMAIN);
    out.extend_from_slice(&device_id.0);
    out.extend_from_slice(public_key_der);
    out
}

/// A device's new key, signed by its old one: the payload of its ACK 2.04
/// to `dk` is `DER length (u16 BE) || new public key DER || signature`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceKeyOffer {
    pub public_key_der: Vec<u8>,
    pub signature: Vec<u8>,
}

impl DeviceKeyOffer {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + self.public_key_der.len() + self.signature.len());
        // DER of an RSA-1024 key is ~162 bytes; a length over u16 cannot
        // be made by `sign`.
        out.extend_from_slice(
            &u16::try_from(self.public_key_der.len())
                .unwrap_or(u16::MAX)
                .to_be_bytes(),
        );
        out.extend_from_slice(&self.public_key_der);
        out.extend_from_slice(&self.signature);
        out
    }

    pub fn parse(payload: &[u8]) -> Result<Self, RotationError> {
        let short = || RotationError::TooShort {
            what: "a device key offer",
            len: payload.len(),
        };
        let len = payload
            .get(..2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
            .ok_or_else(short)?;
        let der = payload.get(2..2 + len).ok_or_else(short)?;
        let signature = &payload[2 + len..];
        if der.is_empty() || signature.is_empty() {
            return Err(short());
        }
        Ok(Self {
            public_key_der: der.to_vec(),
            signature: signature.to_vec(),
        })
    }

    /// Made on the device: signs the new key's DER with the old key.
    pub fn sign(
        old_key: &RsaPrivateKey,
        device_id: DeviceId,
        new_public_key_der: &[u8],
    ) -> Result<Self, RotationError> {
        let signature = old_key
            .pkcs1v15_sign::<Sha256>(&device_key_signed_bytes(device_id, new_public_key_der))
            .map_err(|e| RotationError::Sign(e.to_string()))?;
        Ok(Self {
            public_key_der: new_public_key_der.to_vec(),
            signature,
        })
    }

    /// Checked by keyvault with the device's registered key; returns the new
    /// key (RSA-1024, as every device key).
    pub fn verify(
        &self,
        registered: &RsaPublicKey,
        device_id: DeviceId,
    ) -> Result<RsaPublicKey, RotationError> {
        registered
            .pkcs1v15_verify::<Sha256>(
                &device_key_signed_bytes(device_id, &self.public_key_der),
                &self.signature,
            )
            .map_err(|_| RotationError::BadSignature)?;
        let key = RsaPublicKey::from_public_key_der(&self.public_key_der)
            .map_err(|e| RotationError::BadDeviceKey(e.to_string()))?;
        if key.size() != DEVICE_SIGNATURE_LEN {
            return Err(RotationError::BadDeviceKey(format!(
                "a {}-bit key",
                key.size() * 8
            )));
        }
        Ok(key)
    }
}

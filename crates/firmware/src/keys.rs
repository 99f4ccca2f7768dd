//! Release keys as they travel: PEM for people and files, key ids (the
//! SHA-256 of the DER SubjectPublicKeyInfo, lowercase hex) to name a key in
//! a signature without shipping the key itself.

use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rsa::{PrivateKey, PublicKey};
use sha2::{Digest, Sha256};

/// Release keys shorter than this are refused, for signing and in policies.
pub const MIN_RELEASE_KEY_BITS: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not a PEM public key (expected BEGIN PUBLIC KEY): {0}")]
    PublicKey(String),
    #[error("not a PKCS#8 or PKCS#1 PEM private key: {0}")]
    PrivateKey(String),
    #[error("encoding the public key failed: {0}")]
    Encode(String),
    #[error(
        "an RSA key of {bits} bits is too short for releases (at least {MIN_RELEASE_KEY_BITS})"
    )]
    TooShort { bits: usize },
}

/// Lowercase hex SHA-256 of the key's DER SubjectPublicKeyInfo.
pub fn key_id(key: &PublicKey) -> String {
    // Encoding an in-memory RSA public key cannot fail in practice; an empty
    // DER would give a key id no signature can claim.
    let der = key
        .to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .unwrap_or_default();
    hex::encode(Sha256::digest(&der))
}

/// Modulus length in bits, rounded up to whole bytes.
pub(crate) fn key_bits(key: &PublicKey) -> usize {
    key.size() * 8
}

pub(crate) fn check_release_key(key: &PublicKey) -> Result<(), KeyError> {
    let bits = key_bits(key);
    if bits < MIN_RELEASE_KEY_BITS {
        return Err(KeyError::TooShort { bits });
    }
    Ok(())
}

/// Parses `-----BEGIN PUBLIC KEY-----` (SPKI).
pub fn public_key_from_pem(pem: &str) -> Result<PublicKey, KeyError> {
    PublicKey::from_public_key_pem(pem.trim()).map_err(|e| KeyError::PublicKey(e.to_string()))
}

/// Writes `-----BEGIN PUBLIC KEY-----` (SPKI), LF line endings.
pub fn public_key_to_pem(key: &PublicKey) -> Result<String, KeyError> {
    key.to_public_key_pem(LineEnding::LF)
        .map_err(|e| KeyError::Encode(e.to_string()))
}

/// Parses a private key in PKCS#8 (`BEGIN PRIVATE KEY`) or PKCS#1
/// (`BEGIN RSA PRIVATE KEY`) PEM, as `openssl genpkey` / `genrsa` write them.
pub fn private_key_from_pem(pem: &str) -> Result<PrivateKey, KeyError> {
    let pem = pem.trim();
    PrivateKey::from_pkcs8_pem(pem)
        .or_else(|e| PrivateKey::from_pkcs1_pem(pem).map_err(|_| e))
        .map_err(|e| KeyError::PrivateKey(e.to_string()))
}

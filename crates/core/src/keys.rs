//! Key material helpers shared by services and the CLI: reading an RSA public
//! key given as PEM or DER, and key ids (hex SHA-256 of the DER).
use rsa::PublicKey as RsaPublicKey;
use rsa::pkcs8::{DecodePublicKey, EncodePublicKey};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "not an RSA public key (expected SubjectPublicKeyInfo as PEM \"BEGIN PUBLIC KEY\" or DER): {0}"
    )]
    NotAPublicKey(String),
}

/// Parses an RSA public key from SubjectPublicKeyInfo PEM or DER.
pub fn parse_public_key(input: &[u8]) -> Result<RsaPublicKey, KeyError> {
    match std::str::from_utf8(input) {
        Ok(text) if text.contains("-----BEGIN") => RsaPublicKey::from_public_key_pem(text.trim())
            .map_err(|e| KeyError::NotAPublicKey(e.to_string())),
        _ => RsaPublicKey::from_public_key_der(input)
            .map_err(|e| KeyError::NotAPublicKey(e.to_string())),
    }
}

/// The canonical DER of a public key given as PEM or DER.
pub fn public_key_der(input: &[u8]) -> Result<Vec<u8>, KeyError> {
    let key = parse_public_key(input)?;
    key.to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .map_err(|e| KeyError::NotAPublicKey(e.to_string()))
}

/// Hex SHA-256 of a DER key: the key id used in manifests and audit records.
pub fn key_id(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

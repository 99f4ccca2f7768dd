//! RSA-PSS signatures over the exact manifest bytes: SHA-256, MGF1-SHA-256,
//! a 32-byte salt (RFC 8017 §8.1, the `openssl dgst -sha256 -sigopt
//! rsa_padding_mode:pss -sigopt rsa_pss_saltlen:32` form). Signing needs
//! only the private key and the bytes, so a customer signs offline.

use rsa::{PrivateKey, PublicKey};
use sha2::Sha256;

use crate::keys::{KeyError, check_release_key, key_id};
use crate::manifest::ManifestSignature;

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("RSA-PSS signing failed: {0}")]
    Rsa(String),
    #[error("refusing to sign an empty manifest")]
    Empty,
}

/// Signs `manifest_bytes` (exactly as they will be shipped) with a release
/// key of at least 2048 bits.
pub fn sign_manifest(
    private_key: &PrivateKey,
    manifest_bytes: &[u8],
) -> Result<ManifestSignature, SignError> {
    if manifest_bytes.is_empty() {
        return Err(SignError::Empty);
    }
    let public = private_key.to_public_key();
    check_release_key(&public)?;
    let signature = private_key
        .pss_sign::<Sha256>(manifest_bytes)
        .map_err(|e| SignError::Rsa(e.to_string()))?;
    Ok(ManifestSignature {
        key_id: key_id(&public),
        signature,
    })
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature names key {signature_key_id}, but the key given is {key_id}")]
    KeyIdMismatch {
        signature_key_id: String,
        key_id: String,
    },
    #[error(
        "the RSA-PSS-SHA256 signature by key {key_id} does not verify over these manifest bytes"
    )]
    Invalid { key_id: String },
}

/// Checks one signature over `manifest_bytes` with `public_key`. The
/// signature's key id must name this key.
pub fn verify_signature(
    public_key: &PublicKey,
    manifest_bytes: &[u8],
    signature: &ManifestSignature,
) -> Result<(), SignatureError> {
    let id = key_id(public_key);
    if signature.key_id != id {
        return Err(SignatureError::KeyIdMismatch {
            signature_key_id: signature.key_id.clone(),
            key_id: id,
        });
    }
    public_key
        .pss_verify::<Sha256>(manifest_bytes, &signature.signature)
        .map_err(|_| SignatureError::Invalid { key_id: id })
}

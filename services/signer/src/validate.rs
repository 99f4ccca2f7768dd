//! Checks on what operators send, each with a message that says what to fix.
use crate::error::{Result, SignerError};
use trellis_core::redis_conn::keys::DEFAULT_ORG;

/// A lowercase hex SHA-256 (64 characters); upper case is accepted and
/// lowered.
pub fn sha256_hex(field: &str, input: &str) -> Result<String> {
    let s = input.trim().to_ascii_lowercase();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SignerError::InvalidArgument(format!(
            "{field} {input:?} is not a SHA-256: give 64 hex characters (as `trellis firmware \
             upload` prints them)"
        )));
    }
    Ok(s)
}

/// A key id: the lowercase hex SHA-256 of a public key's SPKI DER.
pub fn key_id(input: &str) -> Result<String> {
    let s = input.trim().to_ascii_lowercase();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SignerError::InvalidArgument(format!(
            "signature key_id {input:?} is not a key id: give the 64-hex-character SHA-256 of the \
             signer's public key (DER SubjectPublicKeyInfo), as `trellis firmware sign` writes it"
        )));
    }
    Ok(s)
}

pub fn product_id(product_id: u32) -> Result<u32> {
    if product_id == 0 {
        return Err(SignerError::InvalidArgument(
            "product_id is 0: give the product id (1 or more) the firmware is for".into(),
        ));
    }
    Ok(product_id)
}

pub fn version(version: u32) -> Result<u32> {
    if version == 0 {
        return Err(SignerError::InvalidArgument(
            "version is 0: release versions start at 1 (a device accepts only versions above its \
             floor, which starts at 0)"
                .into(),
        ));
    }
    Ok(version)
}

/// The organisation, "default" when empty.
pub fn organization(input: &str) -> Result<String> {
    let s = input.trim();
    if s.is_empty() {
        return Ok(DEFAULT_ORG.to_string());
    }
    if s.len() > 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(SignerError::InvalidArgument(format!(
            "organization {input:?}: use at most 64 letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(s.to_string())
}

/// A release id, "<product_id>-<version>".
pub fn release_id(input: &str) -> Result<(String, u32, u32)> {
    Ok(trellis_records::release::parse_release_id(input)?)
}

pub use trellis_records::release::make_release_id;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs() {
        assert!(sha256_hex("x", &"A".repeat(64)).is_ok());
        assert!(sha256_hex("x", "abc").is_err());
        assert!(sha256_hex("x", &"g".repeat(64)).is_err());
        assert_eq!(release_id(" 7-3 ").unwrap(), ("7-3".into(), 7, 3));
        for bad in [
            "",
            "7",
            "7-",
            "-3",
            "a-b",
            "0-1",
            "1-0",
            "7-3-1",
            "+7-3",
            "99999999999-1",
        ] {
            assert!(release_id(bad).is_err(), "{bad}");
        }
        assert_eq!(organization("").unwrap(), "default");
        assert!(organization("a b").is_err());
        assert!(version(0).is_err());
        assert!(product_id(0).is_err());
    }
}

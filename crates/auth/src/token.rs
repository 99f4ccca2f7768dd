//! API tokens: `trellis_<id>_<secret>`. The id (8 random bytes, hex) names
//! the record; the secret (32 random bytes, base64url) is shown once and
//! only its SHA-256 is kept, compared in constant time.
use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const PREFIX: &str = "trellis_";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;

/// A token as handed to its owner, once.
pub struct NewToken {
    pub id: String,
    /// The whole bearer string. Not kept anywhere by Trellis.
    pub bearer: String,
    /// SHA-256 of the secret part, hex: what the store keeps.
    pub secret_sha256: String,
}

impl NewToken {
    pub fn generate() -> Self {
        let id = hex::encode(rand::random::<[u8; ID_BYTES]>());
        let secret = rand::random::<[u8; SECRET_BYTES]>();
        let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
        Self {
            bearer: format!("{PREFIX}{id}_{encoded}"),
            secret_sha256: hex::encode(Sha256::digest(encoded.as_bytes())),
            id,
        }
    }
}

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewToken")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A bearer string taken apart: the record id and the secret's hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    pub id: String,
    secret_sha256: [u8; 32],
}

impl Presented {
    pub fn parse(bearer: &str) -> Option<Self> {
        let rest = bearer.trim().strip_prefix(PREFIX)?;
        let (id, secret) = rest.split_once('_')?;
        if id.len() != ID_BYTES * 2 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        if secret.is_empty() || secret.len() > 64 {
            return None;
        }
        Some(Self {
            id: id.to_ascii_lowercase(),
            secret_sha256: Sha256::digest(secret.as_bytes()).into(),
        })
    }

    /// Whether the secret hashes to `stored_hex`, in constant time.
    pub fn matches(&self, stored_hex: &str) -> bool {
        let mut stored = [0u8; 32];
        if hex::decode_to_slice(stored_hex, &mut stored).is_err() {
            return false;
        }
        self.secret_sha256.ct_eq(&stored).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_matches_its_hash_and_nothing_else() {
        let t = NewToken::generate();
        let p = Presented::parse(&t.bearer).expect("parses");
        assert_eq!(p.id, t.id);
        assert!(p.matches(&t.secret_sha256));
        let other = NewToken::generate();
        assert!(!p.matches(&other.secret_sha256));
        // One character of the secret changed.
        let mut forged = t.bearer.clone();
        let last = forged.pop().expect("non-empty");
        forged.push(if last == 'A' { 'B' } else { 'A' });
        assert!(
            !Presented::parse(&forged)
                .expect("parses")
                .matches(&t.secret_sha256)
        );
        assert!(!format!("{t:?}").contains(&t.bearer));
    }

    #[test]
    fn malformed_bearers_are_refused() {
        for bad in [
            "",
            "trellis_",
            "trellis_zz_abc",
            "token",
            "trellis_0011223344556677_",
            "Bearer x",
        ] {
            assert!(Presented::parse(bad).is_none(), "{bad:?}");
        }
    }
}

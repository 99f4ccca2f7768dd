//! The cloud key's private operations, and the choice of library that does
//! them. The handshake needs one RSA-2048 PKCS#1 v1.5 decryption and one raw
//! type-1 signature per device connect, so this choice sets the whole cloud's
//! handshake capacity. Both candidates are here behind [`PrivateOps`] so the
//! `rsa_backends` example can measure them on the machine at hand; keyvault
//! serves with [`OpensslBackend`] (see the README for the figures).
//!
//! No padding oracle: both backends do PKCS#1 v1.5 decryption with implicit
//! rejection (a ciphertext with bad padding decrypts to a deterministic
//! synthetic plaintext instead of failing), so the caller cannot tell bad
//! padding from a wrong nonce, and neither can anyone timing it. OpenSSL has
//! done this since 3.2; the vendored build is 3.6 (a test checks it).
use rsa::pkcs8::DecodePrivateKey;
use zeroize::Zeroizing;

/// Size in bytes of the cloud key's modulus (RSA-2048).
pub const CLOUD_MODULUS_LEN: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("the cloud private key could not be loaded: {0}")]
    Key(String),
    #[error("RSA private operation failed: {0}")]
    Operation(String),
}

/// The private-key operations keyvault does with the cloud key.
pub trait PrivateOps: Send + Sync + 'static {
    /// A short name for logs and benchmarks.
    fn name(&self) -> &'static str;
    /// PKCS#1 v1.5 (type 2) decryption with implicit rejection: a ciphertext
    /// with bad padding yields a synthetic plaintext, not an error. An error
    /// means the ciphertext is not a number below the modulus or the library
    /// failed, never "bad padding".
    fn decrypt(&self, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, BackendError>;
    /// The raw PKCS#1 v1.5 type-1 private operation over `data`, with no
    /// DigestInfo prefix (`rsa::Pkcs1v15Sign::new_unprefixed()`).
    fn sign_raw(&self, data: &[u8]) -> Result<Vec<u8>, BackendError>;
}

/// OpenSSL (the `openssl` crate, vendored OpenSSL 3.6). Private components
/// live in OpenSSL BIGNUMs, which `RSA_free` clears before freeing.
pub struct OpensslBackend {
    key: openssl::rsa::Rsa<openssl::pkey::Private>,
}

impl OpensslBackend {
    /// From an unencrypted PKCS#8 `PrivateKeyInfo` DER.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, BackendError> {
        let pkey = openssl::pkey::PKey::private_key_from_pkcs8(der)
            .map_err(|e| BackendError::Key(e.to_string()))?;
        let key = pkey.rsa().map_err(|e| BackendError::Key(e.to_string()))?;
        Ok(Self { key })
    }
}

impl PrivateOps for OpensslBackend {
    fn name(&self) -> &'static str {
        "openssl"
    }

    fn decrypt(&self, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        let mut out = Zeroizing::new(vec![0u8; self.key.size() as usize]);
        let n = self
            .key
            .private_decrypt(ciphertext, &mut out, openssl::rsa::Padding::PKCS1)
            .map_err(|e| BackendError::Operation(e.to_string()))?;
        out.truncate(n);
        Ok(out)
    }

    fn sign_raw(&self, data: &[u8]) -> Result<Vec<u8>, BackendError> {
        let mut out = vec![0u8; self.key.size() as usize];
        let n = self
            .key
            .private_encrypt(data, &mut out, openssl::rsa::Padding::PKCS1)
            .map_err(|e| BackendError::Operation(e.to_string()))?;
        out.truncate(n);
        Ok(out)
    }
}

/// The pure-Rust `rsa` crate (0.10, constant-time crypto-bigint, blinded).
pub struct RustCryptoBackend {
    key: rsa::PrivateKey,
}

impl RustCryptoBackend {
    /// From an unencrypted PKCS#8 `PrivateKeyInfo` DER.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, BackendError> {
        let key =
            rsa::PrivateKey::from_pkcs8_der(der).map_err(|e| BackendError::Key(e.to_string()))?;
        Ok(Self { key })
    }
}

impl PrivateOps for RustCryptoBackend {
    fn name(&self) -> &'static str {
        "rsa"
    }

    fn decrypt(&self, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        self.key
            .decrypt(rsa::Pkcs1v15Encrypt, ciphertext)
            .map(Zeroizing::new)
            .map_err(|e| BackendError::Operation(e.to_string()))
    }

    fn sign_raw(&self, data: &[u8]) -> Result<Vec<u8>, BackendError> {
        self.key
            .sign(rsa::Pkcs1v15Sign::new_unprefixed(), data)
            .map_err(|e| BackendError::Operation(e.to_string()))
    }
}

/// Makes a fresh RSA key of `bits` and returns it as unencrypted PKCS#8 DER
/// (with OpenSSL: several times faster than the `rsa` crate's generation).
pub fn generate_pkcs8_der(bits: u32) -> Result<Zeroizing<Vec<u8>>, BackendError> {
    let rsa = openssl::rsa::Rsa::generate(bits).map_err(|e| BackendError::Key(e.to_string()))?;
    let pkey = openssl::pkey::PKey::from_rsa(rsa).map_err(|e| BackendError::Key(e.to_string()))?;
    pkey.private_key_to_pkcs8()
        .map(Zeroizing::new)
        .map_err(|e| BackendError::Key(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};

    fn key() -> Zeroizing<Vec<u8>> {
        generate_pkcs8_der(2048).unwrap()
    }

    #[test]
    fn vendored_openssl_is_at_least_3_2() {
        // Implicit rejection for PKCS#1 v1.5 decryption arrived in 3.2.
        let v = openssl::version::number();
        assert!(v >= 0x3020_0000, "OpenSSL {:x} is older than 3.2", v);
    }

    #[test]
    fn random_ciphertext_decrypts_to_a_synthetic_plaintext_not_an_error() {
        let der = key();
        let pub_key = rsa::PrivateKey::from_pkcs8_der(&der)
            .unwrap()
            .to_public_key();
        let ossl = OpensslBackend::from_pkcs8_der(&der).unwrap();
        let rc = RustCryptoBackend::from_pkcs8_der(&der).unwrap();
        let n = rsa::traits::PublicKeyParts::n(&pub_key).to_be_bytes();
        let mut seen_ok = 0;
        for i in 0..20u8 {
            let mut ct = [0u8; 256];
            crate::os_random(&mut ct).unwrap();
            // Keep it below the modulus: only bad padding is under test here.
            ct[0] = n[0].saturating_sub(1);
            let a = ossl
                .decrypt(&ct)
                .unwrap_or_else(|e| panic!("openssl, try {i}: {e}"));
            let b = rc
                .decrypt(&ct)
                .unwrap_or_else(|e| panic!("rsa, try {i}: {e}"));
            // Deterministic: the same ciphertext gives the same synthetic message.
            assert_eq!(*a, *ossl.decrypt(&ct).unwrap());
            assert_eq!(*b, *rc.decrypt(&ct).unwrap());
            seen_ok += 1;
        }
        assert_eq!(seen_ok, 20);
    }

    #[test]
    fn both_backends_decrypt_and_sign_alike() {
        let der = key();
        let private = rsa::PrivateKey::from_pkcs8_der(&der).unwrap();
        let public = private.to_public_key();
        let ossl = OpensslBackend::from_pkcs8_der(&der).unwrap();
        let rc = RustCryptoBackend::from_pkcs8_der(&der).unwrap();
        let msg = b"nonce and device id and a key, or so";
        let mut rng = rand::rngs::SysRng;
        let mut rng = rand::rand_core::UnwrapErr(&mut rng);
        let ct = public.encrypt(&mut rng, rsa::Pkcs1v15Encrypt, msg).unwrap();
        assert_eq!(&**ossl.decrypt(&ct).unwrap(), msg);
        assert_eq!(&**rc.decrypt(&ct).unwrap(), msg);

        let hmac = [7u8; 20];
        let a = ossl.sign_raw(&hmac).unwrap();
        let b = rc.sign_raw(&hmac).unwrap();
        assert_eq!(a, b, "type-1 signatures are deterministic");
        public
            .verify(rsa::Pkcs1v15Sign::new_unprefixed(), &hmac, &a)
            .unwrap();
        assert!(public.to_public_key_der().is_ok());
    }

    #[test]
    fn openssl_signature_is_byte_for_byte_the_wire_reference() {
        let der = key();
        let private = rsa::PrivateKey::from_pkcs8_der(&der).unwrap();
        let ossl = OpensslBackend::from_pkcs8_der(&der).unwrap();
        for i in 0..8u8 {
            let mut hmac = [0u8; 20];
            crate::os_random(&mut hmac).unwrap();
            hmac[0] = i;
            let reference = trellis_wire::handshake::sign_session_hmac(&private, &hmac).unwrap();
            assert_eq!(ossl.sign_raw(&hmac).unwrap(), reference);
            assert_eq!(reference.len(), CLOUD_MODULUS_LEN);
        }
    }
}

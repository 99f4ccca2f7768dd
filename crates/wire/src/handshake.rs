//! The RSA handshake that establishes a session key, as a pair of sans-IO
//! state machines. The server side never touches a private key: decrypting
//! the device's message and signing the HMAC are the caller's (keyvault's)
//! job, so the gateway can run without ever holding the cloud key.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use rand_core::CryptoRng;
use rsa::pkcs8::EncodePublicKey;
use rsa::traits::PublicKeyParts;
// rsa 0.10 deprecates the `Rsa*` aliases; they name these same types.
use rsa::{Pkcs1v15Encrypt, Pkcs1v15Sign, PrivateKey as RsaPrivateKey, PublicKey as RsaPublicKey};
use sha1::Sha1;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::HandshakeError;
use crate::frame::SessionCipher;
use crate::id::DeviceId;
use crate::{
    DEFAULT_MAX_FRAME_LEN, DEVICE_ID_LEN, ENCRYPTED_MATERIAL_LEN, HANDSHAKE_CIPHERTEXT_LEN,
    NONCE_LEN, SERVER_REPLY_LEN, SESSION_MATERIAL_LEN, SIGNATURE_LEN,
};

/// The 40 secret bytes the server hands the device: key || IV || salt.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SessionMaterial {
    pub key: [u8; 16],
    pub iv: [u8; 16],
    pub salt: [u8; 8],
}

impl fmt::Debug for SessionMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionMaterial { <redacted> }")
    }
}

impl SessionMaterial {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, HandshakeError> {
        if bytes.len() != SESSION_MATERIAL_LEN {
            return Err(HandshakeError::MaterialLength { len: bytes.len() });
        }
        let mut m = SessionMaterial {
            key: [0; 16],
            iv: [0; 16],
            salt: [0; 8],
        };
        m.key.copy_from_slice(&bytes[..16]);
        m.iv.copy_from_slice(&bytes[16..32]);
        m.salt.copy_from_slice(&bytes[32..40]);
        Ok(m)
    }

    pub fn to_bytes(&self) -> Zeroizing<[u8; SESSION_MATERIAL_LEN]> {
        let mut out = Zeroizing::new([0u8; SESSION_MATERIAL_LEN]);
        out[..16].copy_from_slice(&self.key);
        out[16..32].copy_from_slice(&self.iv);
        out[32..].copy_from_slice(&self.salt);
        out
    }

    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut bytes = Zeroizing::new([0u8; SESSION_MATERIAL_LEN]);
        rng.fill_bytes(&mut bytes[..]);
        let mut m = SessionMaterial {
            key: [0; 16],
            iv: [0; 16],
            salt: [0; 8],
        };
        m.key.copy_from_slice(&bytes[..16]);
        m.iv.copy_from_slice(&bytes[16..32]);
        m.salt.copy_from_slice(&bytes[32..40]);
        m
    }

    /// The device's first message id, as real firmware picks it: the first
    /// two salt bytes (big-endian) plus one.
    pub fn device_first_message_id(&self) -> u16 {
        u16::from_be_bytes([self.salt[0], self.salt[1]]).wrapping_add(1)
    }
}

/// What the device encrypts to the cloud key in step 2.
#[derive(Clone, PartialEq, Eq)]
pub struct HandshakePlaintext {
    pub nonce: [u8; NONCE_LEN],
    pub device_id: DeviceId,
    pub public_key_der: Option<Vec<u8>>,
}

impl fmt::Debug for HandshakePlaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandshakePlaintext")
            .field("device_id", &self.device_id)
            .field(
                "public_key_der_len",
                &self.public_key_der.as_ref().map(Vec::len),
            )
            .finish_non_exhaustive()
    }
}

impl HandshakePlaintext {
    /// Accepts the 52-byte form of the first Spark Cores as well as the
    /// later one with the device's public key DER appended.
    pub fn parse(bytes: &[u8]) -> Result<Self, HandshakeError> {
        let head = NONCE_LEN + DEVICE_ID_LEN;
        if bytes.len() < head {
            return Err(HandshakeError::PlaintextTooShort { len: bytes.len() });
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&bytes[..NONCE_LEN]);
        let mut id = [0u8; DEVICE_ID_LEN];
        id.copy_from_slice(&bytes[NONCE_LEN..head]);
        let rest = &bytes[head..];
        Ok(HandshakePlaintext {
            nonce,
            device_id: DeviceId(id),
            public_key_der: (!rest.is_empty()).then(|| rest.to_vec()),
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let der = self.public_key_der.as_deref().unwrap_or_default();
        let mut out = Vec::with_capacity(NONCE_LEN + DEVICE_ID_LEN + der.len());
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.device_id.0);
        out.extend_from_slice(der);
        out
    }
}

/// Compares the nonce the server sent with the one the device echoed,
/// in constant time.
pub fn nonce_matches(expected: &[u8; NONCE_LEN], got: &[u8; NONCE_LEN]) -> bool {
    expected.ct_eq(got).into()
}

/// HMAC-SHA1 keyed with all 40 material bytes over the encrypted material.
pub fn session_hmac(material: &SessionMaterial, encrypted_material: &[u8]) -> [u8; 20] {
    // HMAC zero-pads keys shorter than the 64-byte SHA-1 block; doing it here
    // gives the fixed-size key `new` wants, so there is no fallible path.
    let mut key = Zeroizing::new([0u8; 64]);
    key[..SESSION_MATERIAL_LEN].copy_from_slice(&material.to_bytes()[..]);
    let mut mac = <Hmac<Sha1> as KeyInit>::new(&(*key).into());
    mac.update(encrypted_material);
    mac.finalize().into_bytes().into()
}

/// RSA PKCS#1 v1.5 (type 2) encryption of the material to the device key.
pub fn encrypt_session_material<R: CryptoRng + ?Sized>(
    material: &SessionMaterial,
    device_key: &RsaPublicKey,
    rng: &mut R,
) -> Result<Vec<u8>, HandshakeError> {
    device_key
        .encrypt(rng, Pkcs1v15Encrypt, &material.to_bytes()[..])
        .map_err(HandshakeError::Encrypt)
}

/// Concatenates `C` (128 bytes) and `S` (256 bytes) into the server reply.
pub fn assemble_server_reply(
    encrypted: &[u8],
    signature: &[u8],
) -> Result<[u8; SERVER_REPLY_LEN], HandshakeError> {
    if encrypted.len() != ENCRYPTED_MATERIAL_LEN {
        return Err(HandshakeError::EncryptedMaterialLength {
            len: encrypted.len(),
        });
    }
    if signature.len() != SIGNATURE_LEN {
        return Err(HandshakeError::SignatureLength {
            len: signature.len(),
        });
    }
    let mut reply = [0u8; SERVER_REPLY_LEN];
    reply[..ENCRYPTED_MATERIAL_LEN].copy_from_slice(encrypted);
    reply[ENCRYPTED_MATERIAL_LEN..].copy_from_slice(signature);
    Ok(reply)
}

/// The raw PKCS#1 v1.5 type-1 signature over the HMAC, with no DigestInfo
/// prefix, as spark-protocol makes it. A pure-Rust reference for tests and
/// the simulator; keyvault signs with its own backend.
pub fn sign_session_hmac(
    cloud_key: &RsaPrivateKey,
    hmac: &[u8; 20],
) -> Result<Vec<u8>, HandshakeError> {
    cloud_key
        .sign(Pkcs1v15Sign::new_unprefixed(), hmac)
        .map_err(HandshakeError::Sign)
}

/// The device's check of the 384-byte reply: decrypt `C` with its own key,
/// recompute the HMAC and verify `S` under the cloud key.
pub fn verify_server_reply(
    cloud_pub: &RsaPublicKey,
    device_priv: &RsaPrivateKey,
    reply: &[u8; SERVER_REPLY_LEN],
) -> Result<SessionMaterial, HandshakeError> {
    let (encrypted, signature) = reply.split_at(ENCRYPTED_MATERIAL_LEN);
    // rsa 0.10 uses implicit rejection: a bad ciphertext yields a synthetic
    // plaintext, not an error, so the HMAC/signature check below is what
    // catches tampering (and a wrong length is caught by from_bytes).
    let plaintext = Zeroizing::new(
        device_priv
            .decrypt(Pkcs1v15Encrypt, encrypted)
            .map_err(HandshakeError::Decrypt)?,
    );
    let material = SessionMaterial::from_bytes(&plaintext)?;
    let hmac = session_hmac(&material, encrypted);
    cloud_pub
        .verify(Pkcs1v15Sign::new_unprefixed(), &hmac, signature)
        .map_err(|_| HandshakeError::BadSignature)?;
    Ok(material)
}

/// Server side of the handshake: sends the nonce, collects the device's 256
/// bytes, and once the caller has decrypted them and produced the reply,
/// yields the bytes to send and the session cipher.
pub struct ServerHandshake {
    nonce: [u8; NONCE_LEN],
    received: Vec<u8>,
    max_frame_len: usize,
}

impl ServerHandshake {
    pub fn new(nonce: [u8; NONCE_LEN]) -> Self {
        ServerHandshake {
            nonce,
            received: Vec::with_capacity(HANDSHAKE_CIPHERTEXT_LEN),
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
        }
    }

    /// Sets the frame-length limit of the session cipher `accept` returns.
    pub fn with_max_frame_len(mut self, max_frame_len: usize) -> Self {
        self.max_frame_len = max_frame_len;
        self
    }

    /// The bytes to send first.
    pub fn nonce(&self) -> &[u8; NONCE_LEN] {
        &self.nonce
    }

    /// Feeds bytes from the device; returns the whole ciphertext once all 256
    /// bytes are in. The device may not send anything else before our reply.
    pub fn receive(
        &mut self,
        input: &[u8],
    ) -> Result<Option<[u8; HANDSHAKE_CIPHERTEXT_LEN]>, HandshakeError> {
        let total = self.received.len() + input.len();
        if total > HANDSHAKE_CIPHERTEXT_LEN
            || (self.received.len() == HANDSHAKE_CIPHERTEXT_LEN && !input.is_empty())
        {
            return Err(HandshakeError::TooMuchInput { len: total });
        }
        self.received.extend_from_slice(input);
        if self.received.len() < HANDSHAKE_CIPHERTEXT_LEN {
            return Ok(None);
        }
        let mut out = [0u8; HANDSHAKE_CIPHERTEXT_LEN];
        out.copy_from_slice(&self.received);
        Ok(Some(out))
    }

    /// Completes the handshake with the material the caller chose and the
    /// reply it built (`C || S`).
    pub fn accept(
        self,
        material: SessionMaterial,
        reply: &[u8],
    ) -> Result<(Vec<u8>, SessionCipher), HandshakeError> {
        if self.received.len() != HANDSHAKE_CIPHERTEXT_LEN {
            return Err(HandshakeError::Incomplete {
                have: self.received.len(),
            });
        }
        if reply.len() != SERVER_REPLY_LEN {
            return Err(HandshakeError::ReplyLength { len: reply.len() });
        }
        Ok((
            reply.to_vec(),
            SessionCipher::new(&material, self.max_frame_len),
        ))
    }
}

enum DeviceState {
    AwaitingNonce,
    AwaitingReply,
    Done,
}

/// Device side of the handshake.
pub struct DeviceHandshake {
    device_id: DeviceId,
    device_key: RsaPrivateKey,
    cloud_key: RsaPublicKey,
    send_public_key: bool,
    state: DeviceState,
}

impl DeviceHandshake {
    pub fn new(
        device_id: DeviceId,
        device_key: RsaPrivateKey,
        cloud_key: RsaPublicKey,
        send_public_key: bool,
    ) -> Self {
        DeviceHandshake {
            device_id,
            device_key,
            cloud_key,
            send_public_key,
            state: DeviceState::AwaitingNonce,
        }
    }

    pub fn device_id(&self) -> DeviceId {
        self.device_id
    }

    /// Answers the server's nonce with the 256 bytes to send in ONE write
    /// (spark-protocol decrypts only its first read).
    pub fn on_nonce<R: CryptoRng + ?Sized>(
        &mut self,
        nonce: &[u8],
        rng: &mut R,
    ) -> Result<Vec<u8>, HandshakeError> {
        if !matches!(self.state, DeviceState::AwaitingNonce) {
            return Err(HandshakeError::OutOfOrder("nonce received twice"));
        }
        let nonce: [u8; NONCE_LEN] = nonce
            .try_into()
            .map_err(|_| HandshakeError::NonceLength { len: nonce.len() })?;
        let public_key_der = if self.send_public_key {
            let der = self
                .device_key
                .to_public_key()
                .to_public_key_der()
                .map_err(|e| HandshakeError::PublicKeyEncoding(e.to_string()))?;
            Some(der.as_bytes().to_vec())
        } else {
            None
        };
        let plaintext = HandshakePlaintext {
            nonce,
            device_id: self.device_id,
            public_key_der,
        };
        let ciphertext = self
            .cloud_key
            .encrypt(rng, Pkcs1v15Encrypt, &plaintext.to_bytes())
            .map_err(HandshakeError::Encrypt)?;
        if ciphertext.len() != HANDSHAKE_CIPHERTEXT_LEN
            || self.cloud_key.size() != HANDSHAKE_CIPHERTEXT_LEN
        {
            return Err(HandshakeError::CiphertextLength {
                len: ciphertext.len(),
            });
        }
        self.state = DeviceState::AwaitingReply;
        Ok(ciphertext)
    }

    /// Checks the server's 384-byte reply and returns the session material.
    pub fn on_reply(&mut self, reply: &[u8]) -> Result<SessionMaterial, HandshakeError> {
        match self.state {
            DeviceState::AwaitingNonce => {
                return Err(HandshakeError::OutOfOrder("server reply before the nonce"));
            }
            DeviceState::Done => {
                return Err(HandshakeError::OutOfOrder("server reply received twice"));
            }
            DeviceState::AwaitingReply => {}
        }
        let reply: &[u8; SERVER_REPLY_LEN] = reply
            .try_into()
            .map_err(|_| HandshakeError::ReplyLength { len: reply.len() })?;
        let material = verify_server_reply(&self.cloud_key, &self.device_key, reply)?;
        self.state = DeviceState::Done;
        Ok(material)
    }
}

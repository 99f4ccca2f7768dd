//! Every way the protocol can fail, one enum per layer, so the gateway can log
//! exactly why it dropped a device and tests can assert the precise rejection.

use thiserror::Error;

/// Failures of the RSA handshake, on either side.
#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error(
        "handshake plaintext is {len} bytes; at least 52 (nonce 40 + device id 12) are required"
    )]
    PlaintextTooShort { len: usize },
    #[error("nonce is {len} bytes, expected 40")]
    NonceLength { len: usize },
    #[error("session material is {len} bytes, expected exactly 40")]
    MaterialLength { len: usize },
    #[error("device sent {len} handshake bytes before the server reply; exactly 256 are expected")]
    TooMuchInput { len: usize },
    #[error("only {have} of the 256 handshake ciphertext bytes have arrived")]
    Incomplete { have: usize },
    #[error("handshake ciphertext is {len} bytes, expected 256 (is the cloud key RSA-2048?)")]
    CiphertextLength { len: usize },
    #[error(
        "encrypted session material is {len} bytes, expected 128 (is the device key RSA-1024?)"
    )]
    EncryptedMaterialLength { len: usize },
    #[error("server signature is {len} bytes, expected 256 (is the cloud key RSA-2048?)")]
    SignatureLength { len: usize },
    #[error("server reply is {len} bytes, expected 384")]
    ReplyLength { len: usize },
    #[error("encoding the device public key as DER failed: {0}")]
    PublicKeyEncoding(String),
    #[error("RSA encryption failed: {0}")]
    Encrypt(rsa::Error),
    #[error("RSA decryption failed: {0}")]
    Decrypt(rsa::Error),
    #[error("RSA signing failed: {0}")]
    Sign(rsa::Error),
    #[error(
        "server reply signature does not verify under the cloud public key (wrong cloud key or tampered reply)"
    )]
    BadSignature,
    #[error("handshake step out of order: {0}")]
    OutOfOrder(&'static str),
}

/// Failures of the encrypted length-prefixed framing.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("frame declares {len} bytes, more than the maximum of {max}")]
    TooLong { len: usize, max: usize },
    #[error("frame declares {len} bytes, not a multiple of the 16-byte AES block")]
    NotBlockAligned { len: usize },
    #[error("frame declares zero bytes of ciphertext")]
    Empty,
    #[error("frame does not decrypt to valid PKCS#7 padding (wrong key, wrong IV or tampered)")]
    BadPadding,
    #[error("plaintext of {len} bytes does not fit a u16-length frame (at most {max})")]
    PlaintextTooLong { len: usize, max: usize },
}

/// Failures to parse a CoAP message (RFC 7252 framing only).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CoapError {
    #[error("CoAP message is {len} bytes, shorter than the 4-byte header")]
    TooShort { len: usize },
    #[error("CoAP version {version}, only version 1 exists")]
    BadVersion { version: u8 },
    #[error("CoAP token length {len} is reserved (at most 8)")]
    TokenTooLong { len: usize },
    #[error("CoAP message ends inside the {what} at byte {offset}")]
    Truncated { what: &'static str, offset: usize },
    #[error("CoAP option delta nibble 15 is reserved (byte {offset})")]
    ReservedOptionDelta { offset: usize },
    #[error("CoAP option length nibble 15 is reserved (byte {offset})")]
    ReservedOptionLength { offset: usize },
    #[error("CoAP option number overflows 65535 at byte {offset}")]
    OptionNumberOverflow { offset: usize },
}

/// Failures to understand a well-formed CoAP message as a protocol message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MessageError {
    #[error("Hello carries device-id length {len}, expected 12")]
    HelloDeviceIdLength { len: usize },
    #[error(
        "Hello extension at byte {offset} is cut short: {needed} bytes needed, {available} left"
    )]
    HelloExtensionTruncated {
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("Hello extension {ext_type:#04x} has length {len}, expected {expected}")]
    HelloExtensionLength {
        ext_type: u8,
        len: usize,
        expected: usize,
    },
    #[error("UpdateBegin payload is {len} bytes, at least 12 are required")]
    UpdateBeginTooShort { len: usize },
    #[error("UpdateBegin manifest declares {declared} bytes, only {available} follow")]
    ManifestTruncated { declared: usize, available: usize },
    #[error("Chunk CRC option is {len} bytes, expected 4")]
    ChunkCrcLength { len: usize },
    #[error("Chunk index option is {len} bytes, expected 2")]
    ChunkIndexLength { len: usize },
    #[error("Chunk has no CRC query option")]
    ChunkMissingCrc,
    #[error("ChunkMissed payload is {len} bytes, not a whole number of u16 indexes")]
    ChunkMissedLength { len: usize },
    #[error("{what} name is not UTF-8")]
    NameNotUtf8 { what: &'static str },
    #[error("{what} has no name in its Uri-Path")]
    MissingName { what: &'static str },
    #[error("empty message (code 0.00) of type {mtype} is not a request")]
    UnexpectedEmpty { mtype: &'static str },
    #[error("no request is {mtype} code {class}.{detail:02} with Uri-Path {path:?}")]
    UnknownRequest {
        mtype: &'static str,
        class: u8,
        detail: u8,
        path: String,
    },
    #[error("code {class}.{detail:02} is in a reserved class")]
    ReservedCode { class: u8, detail: u8 },
    #[error("variable type {0} is unknown (1 bool, 2 int32, 4 string, 9 double)")]
    UnknownVariableType(u8),
    #[error("{ty} value is {got} bytes, expected {expected}")]
    VariableValueLength {
        ty: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("Describe JSON is invalid: {0}")]
    DescribeJson(String),
}

/// Failures of the message-id counters that reject replays and reordering.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CounterError {
    #[error("message id {got} replayed or reordered: expected {expected}")]
    Replayed { expected: u16, got: u16 },
    #[error("message id {got} skips ahead: expected {expected}")]
    Skipped { expected: u16, got: u16 },
    #[error("message id {got} arrived before the Hello that starts the counter")]
    NotStarted { got: u16 },
}

/// Any protocol failure.
#[derive(Debug, Error)]
pub enum WireError {
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("coap: {0}")]
    Coap(#[from] CoapError),
    #[error("message: {0}")]
    Message(#[from] MessageError),
    #[error("counter: {0}")]
    Counter(#[from] CounterError),
}

//! The Trellis device protocol (version 1, wire-compatible with spark-protocol
//! 0.1.6) without any I/O: callers feed bytes in and send the bytes that come
//! out, so the gateway and the device simulator share one implementation that
//! can be tested byte for byte and fuzzed without sockets.

pub mod coap;
pub mod counter;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod hello;
pub mod id;
pub mod message;
pub mod ota;
pub mod rotation;

pub use coap::{CoapMessage, MessageType};
pub use counter::{IncomingCounter, OutgoingCounter};
pub use error::{CoapError, CounterError, FrameError, HandshakeError, MessageError, WireError};
pub use frame::{FrameDecoder, FrameEncoder, SessionCipher};
pub use handshake::{
    DeviceHandshake, HandshakePlaintext, ServerHandshake, SessionMaterial, assemble_server_reply,
    encrypt_session_material, nonce_matches, session_hmac, sign_session_hmac, verify_server_reply,
};
pub use hello::Hello;
pub use id::{DeviceId, DeviceIdError};
pub use message::{Describe, Incoming, Request, VariableType, VariableValue, classify};
pub use ota::{Chunk, UpdateBegin, chunk_crc, padded_chunks};

/// Length of the server's nonce that opens every handshake.
pub const NONCE_LEN: usize = 40;
/// Length of a device id on the wire.
pub const DEVICE_ID_LEN: usize = 12;
/// Length of the device's RSA-encrypted handshake message (RSA-2048 cloud key).
pub const HANDSHAKE_CIPHERTEXT_LEN: usize = 256;
/// AES key (16) || IV (16) || salt (8).
pub const SESSION_MATERIAL_LEN: usize = 40;
/// RSA-1024 ciphertext of the session material (128) || RSA-2048 signature (256).
pub const SERVER_REPLY_LEN: usize = 384;
/// Frames whose u16 length exceeds the configured maximum are refused; this
/// default fits a 512-byte OTA chunk with room to spare.
pub const DEFAULT_MAX_FRAME_LEN: usize = 4096;
/// Length of the RSA-1024 encryption of the session material inside the reply.
pub const ENCRYPTED_MATERIAL_LEN: usize = 128;
/// Length of the RSA-2048 signature inside the reply.
pub const SIGNATURE_LEN: usize = 256;

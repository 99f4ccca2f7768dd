//! Encrypted framing after the handshake: `u16 length || AES-128-CBC(PKCS#7)`
//! with spark's IV chaining (each direction's next IV is the FIRST ciphertext
//! block of its last message). The decoder accepts any read boundary, even
//! inside the length, and refuses a hostile length before buffering it.

use aes::Aes128;
use cbc::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit, block_padding::Pkcs7};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::FrameError;
use crate::handshake::SessionMaterial;

const BLOCK: usize = 16;
/// The largest plaintext whose padded ciphertext still fits a u16 length.
pub const MAX_PLAINTEXT_LEN: usize = (u16::MAX as usize / BLOCK) * BLOCK - 1;

type Enc = cbc::Encryptor<Aes128>;
type Dec = cbc::Decryptor<Aes128>;

fn first_block(ciphertext: &[u8]) -> Option<[u8; BLOCK]> {
    ciphertext
        .get(..BLOCK)
        .and_then(|b| <[u8; BLOCK]>::try_from(b).ok())
}

/// The sending half of a session.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct FrameEncoder {
    key: [u8; 16],
    iv: [u8; 16],
}

impl FrameEncoder {
    pub fn new(key: [u8; 16], iv: [u8; 16]) -> Self {
        FrameEncoder { key, iv }
    }

    /// The IV the next message will be encrypted with.
    pub fn iv(&self) -> [u8; 16] {
        self.iv
    }

    /// Encrypts and frames one message.
    ///
    /// # Panics
    /// If `plaintext` is longer than [`MAX_PLAINTEXT_LEN`] (65 519 bytes): that
    /// is a caller bug (no protocol message is that large); use
    /// [`FrameEncoder::try_encode`] when the size comes from elsewhere.
    pub fn encode(&mut self, plaintext: &[u8]) -> Vec<u8> {
        match self.try_encode(plaintext) {
            Ok(frame) => frame,
            Err(e) => panic!("FrameEncoder::encode: {e}"),
        }
    }

    /// Encrypts and frames one message, refusing one that cannot be framed.
    pub fn try_encode(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, FrameError> {
        let mut frame = Vec::new();
        self.try_encode_into(plaintext, &mut frame)?;
        Ok(frame)
    }

    /// Appends one framed, encrypted message to `out`: the plaintext is
    /// copied once and encrypted in place there, so a firmware transfer
    /// writing many frames into one buffer allocates nothing per frame.
    /// On an error `out` is as it was.
    pub fn try_encode_into(
        &mut self,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), FrameError> {
        let too_long = FrameError::PlaintextTooLong {
            len: plaintext.len(),
            max: MAX_PLAINTEXT_LEN,
        };
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(too_long);
        }
        // PKCS#7 always adds 1..=16 bytes.
        let padded = (plaintext.len() / BLOCK + 1) * BLOCK;
        let len = u16::try_from(padded).map_err(|_| too_long.clone())?;
        let start = out.len();
        out.reserve(2 + padded);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(plaintext);
        out.resize(start + 2 + padded, 0);
        let encrypted = Enc::new(&self.key.into(), &self.iv.into())
            .encrypt_padded::<Pkcs7>(&mut out[start + 2..], plaintext.len())
            .map(|c| first_block(c).ok_or(FrameError::Empty));
        match encrypted {
            Ok(Ok(iv)) => {
                self.iv = iv;
                Ok(())
            }
            // Cannot happen (the room is exactly the padded length); undo
            // rather than panic all the same.
            Ok(Err(e)) => {
                out.truncate(start);
                Err(e)
            }
            Err(_) => {
                out.truncate(start);
                Err(too_long)
            }
        }
    }
}

/// Capacity a drained decoder may keep: enough for the keepalives and
/// short replies that make up an idle session's traffic.
const IDLE_BUFFER_CAPACITY: usize = 64;

/// The receiving half of a session: push bytes as they arrive, pull messages.
///
/// Memory bound: a frame header declaring more than `max_frame_len` is
/// refused as soon as its two bytes are in, and from then on input is
/// discarded, so a hostile length never causes an allocation. Otherwise the
/// buffer holds the frame in progress plus whatever the caller pushed beyond
/// it in the same `push` (one socket read); callers drain with
/// [`FrameDecoder::next_message`] after every push.
pub struct FrameDecoder {
    key: [u8; 16],
    iv: [u8; 16],
    max_frame_len: usize,
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already returned as messages. Dropped at
    /// the next push, not one message at a time: a read holding many frames
    /// (a firmware window) would otherwise move its tail once per frame.
    start: usize,
    failed: Option<FrameError>,
}

impl Drop for FrameDecoder {
    fn drop(&mut self) {
        self.key.zeroize();
        self.iv.zeroize();
        self.buf.zeroize();
    }
}

impl ZeroizeOnDrop for FrameDecoder {}

impl FrameDecoder {
    pub fn new(key: [u8; 16], iv: [u8; 16], max_frame_len: usize) -> Self {
        FrameDecoder {
            key,
            iv,
            max_frame_len,
            buf: Vec::new(),
            start: 0,
            failed: None,
        }
    }

    /// The IV the next message will be decrypted with.
    pub fn iv(&self) -> [u8; 16] {
        self.iv
    }

    /// Bytes received but not yet returned as a message.
    pub fn buffered_len(&self) -> usize {
        self.buf.len() - self.start
    }

    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    fn check_header(&self) -> Result<Option<usize>, FrameError> {
        let pending = &self.buf[self.start..];
        let (Some(&hi), Some(&lo)) = (pending.first(), pending.get(1)) else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > self.max_frame_len {
            return Err(FrameError::TooLong {
                len,
                max: self.max_frame_len,
            });
        }
        if len % BLOCK != 0 {
            return Err(FrameError::NotBlockAligned { len });
        }
        Ok(Some(len))
    }

    fn fail(&mut self, e: FrameError) -> FrameError {
        self.buf.zeroize();
        self.buf = Vec::new();
        self.start = 0;
        self.failed = Some(e.clone());
        e
    }

    /// Appends bytes from the stream, cut at any boundary.
    pub fn push(&mut self, input: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        if self.buf.len() < 2 {
            // Only take what completes the header, check it, then the rest:
            // this is what keeps a hostile length from being buffered.
            let need = (2 - self.buf.len()).min(input.len());
            self.buf.extend_from_slice(&input[..need]);
            if let Err(e) = self.check_header() {
                self.fail(e);
                return;
            }
            self.buf.extend_from_slice(&input[need..]);
        } else {
            self.buf.extend_from_slice(input);
        }
    }

    /// The next complete message, `Ok(None)` while one is still arriving.
    /// Any error is final: the session must end.
    pub fn next_message(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let len = match self.check_header() {
            Ok(Some(len)) => len,
            Ok(None) => return Ok(None),
            Err(e) => return Err(self.fail(e)),
        };
        let at = self.start + 2;
        let Some(ciphertext) = self.buf.get(at..at + len) else {
            return Ok(None);
        };
        let Some(next_iv) = first_block(ciphertext) else {
            return Err(self.fail(FrameError::Empty));
        };
        let plaintext = match Dec::new(&self.key.into(), &self.iv.into())
            .decrypt_padded_vec::<Pkcs7>(ciphertext)
        {
            Ok(p) => p,
            Err(_) => return Err(self.fail(FrameError::BadPadding)),
        };
        self.iv = next_iv;
        self.start = at + len;
        if self.start == self.buf.len() {
            self.start = 0;
            if self.buf.capacity() > IDLE_BUFFER_CAPACITY {
                // A session idles between messages nearly all its life: it
                // should not keep the largest frame it ever got (a Describe,
                // a firmware window) allocated until it ends.
                self.buf = Vec::new();
            } else {
                self.buf.clear();
            }
        }
        Ok(Some(plaintext))
    }
}

/// Both directions of one session, each starting at the session IV.
pub struct SessionCipher {
    pub encoder: FrameEncoder,
    pub decoder: FrameDecoder,
}

impl SessionCipher {
    pub fn new(material: &SessionMaterial, max_frame_len: usize) -> Self {
        SessionCipher {
            encoder: FrameEncoder::new(material.key, material.iv),
            decoder: FrameDecoder::new(material.key, material.iv, max_frame_len),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drained_decoder_gives_back_a_large_buffer_and_keeps_a_small_one() {
        let (key, iv) = ([7u8; 16], [9u8; 16]);
        let mut enc = FrameEncoder::new(key, iv);
        let mut dec = FrameDecoder::new(key, iv, 4096);
        dec.push(&enc.encode(&[1u8; 1500]));
        assert_eq!(dec.next_message().ok().flatten(), Some(vec![1u8; 1500]));
        assert_eq!(dec.buffered_len(), 0);
        assert_eq!(dec.buf.capacity(), 0, "the 1.5 KB frame's buffer is freed");
        // A keepalive-sized frame keeps its small buffer: no allocation per ping.
        dec.push(&enc.encode(&[2u8; 4]));
        assert_eq!(dec.next_message().ok().flatten(), Some(vec![2u8; 4]));
        let small = dec.buf.capacity();
        assert!(small > 0 && small <= IDLE_BUFFER_CAPACITY, "{small}");
        // And the decoder still decodes what comes next, with the IV chain intact.
        dec.push(&enc.encode(b"next"));
        assert_eq!(dec.next_message().ok().flatten(), Some(b"next".to_vec()));
    }
}

//! The fuzz targets' bodies, kept in a library so that the same code runs
//! under libFuzzer (`fuzz_targets/*.rs`, one line each) and under plain
//! `cargo test` (`tests/replay.rs` replays the seed corpora and every saved
//! crash in `regressions/` on stable, without libFuzzer).
//!
//! Every target checks only that nothing panics (libFuzzer and
//! AddressSanitizer catch the rest) and, where it is cheap, that what was
//! decoded encodes back to itself.

pub mod coap_parser;
pub mod firmware_receiver;
pub mod frame_decoder;
pub mod handshake_server;
pub mod manifest_decoders;
pub mod vectors;

/// Reads a fuzz input front to back; past its end every read is zero or
/// empty, so a target never has to reject a short input.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    /// Up to `n` bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// A length byte, then that many bytes.
    pub fn short_bytes(&mut self) -> &'a [u8] {
        let n = usize::from(self.byte());
        self.take(n)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// Cuts `bytes` into reads of `step` bytes (0: one read), as a socket might
/// deliver them.
pub fn reads(bytes: &[u8], step: usize) -> std::slice::Chunks<'_, u8> {
    bytes.chunks(if step == 0 { bytes.len().max(1) } else { step })
}

//! The encrypted frame codec (`u16 length || AES-128-CBC`).
//!
//! Input: a mode byte, a read size (0 = one read) and the maximum frame
//! length (u16), then the bytes.
//!
//! Mode even, "stream": the bytes are what a peer sent, decoded with the
//! vectors' session key and IV (so the vectors' frames decrypt). Every
//! message that comes out must encrypt back, with an encoder that started
//! at the same IV, to exactly the bytes it was read from; the decoder never
//! buffers a refused length, an error is final, and what was pushed is
//! either returned or still buffered.
//!
//! Mode odd, "round trip": the bytes are plaintexts (u16 length prefixed),
//! encrypted into one buffer, then decoded from reads of the given size:
//! the same messages must come out, with both IVs in step.

use trellis_wire::{FrameDecoder, FrameEncoder, FrameError, frame::MAX_PLAINTEXT_LEN};

use crate::{Input, reads, vectors};

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.byte();
    let step = usize::from(input.byte());
    let max = usize::from(input.u16());
    let (key, iv) = vectors::get().session_key_iv();
    if mode & 1 == 0 {
        stream(key, iv, max, step, mode & 2 != 0, input.rest());
    } else {
        round_trip(key, iv, step, &mut input);
    }
}

fn stream(key: [u8; 16], iv: [u8; 16], max: usize, step: usize, one_per_read: bool, bytes: &[u8]) {
    let mut dec = FrameDecoder::new(key, iv, max);
    let mut enc = FrameEncoder::new(key, iv);
    assert_eq!(dec.max_frame_len(), max);
    let mut consumed = 0usize;
    let mut pushed = 0usize;
    let mut failed: Option<FrameError> = None;
    for piece in reads(bytes, step) {
        dec.push(piece);
        pushed += piece.len();
        if let Some(e) = &failed {
            // Final: nothing more is taken in or given out.
            assert_eq!(dec.buffered_len(), 0);
            assert_eq!(dec.next_message().as_ref(), Err(e));
            continue;
        }
        // A hostile length is never buffered beyond one read's bytes (when
        // every read is drained, at most one partial frame is left over).
        if !one_per_read {
            assert!(dec.buffered_len() < max + 2 + piece.len());
        }
        loop {
            match dec.next_message() {
                Ok(Some(plain)) => {
                    let frame = enc
                        .try_encode(&plain)
                        .expect("a decoded message re-encodes");
                    assert_eq!(
                        &bytes[consumed..consumed + frame.len()],
                        &frame[..],
                        "message does not re-encrypt to its frame"
                    );
                    consumed += frame.len();
                    assert_eq!(enc.iv(), dec.iv());
                    assert_eq!(consumed + dec.buffered_len(), pushed);
                    if one_per_read {
                        break;
                    }
                }
                Ok(None) => {
                    assert_eq!(consumed + dec.buffered_len(), pushed);
                    break;
                }
                Err(e) => {
                    assert_eq!(dec.buffered_len(), 0);
                    assert_eq!(dec.next_message().as_ref(), Err(&e));
                    failed = Some(e);
                    break;
                }
            }
        }
    }
    // What was left behind one-per-read comes out now.
    if failed.is_none() {
        while let Ok(Some(plain)) = dec.next_message() {
            consumed += enc.encode(&plain).len();
        }
    }
    assert!(consumed <= pushed);
}

fn round_trip(key: [u8; 16], iv: [u8; 16], step: usize, input: &mut Input<'_>) {
    let mut messages = Vec::new();
    while !input.is_empty() {
        let len = usize::from(input.u16()).min(MAX_PLAINTEXT_LEN);
        messages.push(input.take(len).to_vec());
    }
    let mut enc = FrameEncoder::new(key, iv);
    let mut buffer = Vec::new();
    for m in &messages {
        let before = buffer.len();
        enc.try_encode_into(m, &mut buffer).expect("fits a frame");
        let framed = buffer.len() - before;
        assert_eq!(framed, 2 + (m.len() / 16 + 1) * 16);
    }
    let mut dec = FrameDecoder::new(key, iv, u16::MAX as usize);
    let mut got = Vec::new();
    for piece in reads(&buffer, step) {
        dec.push(piece);
        while let Some(m) = dec.next_message().expect("own frames decode") {
            got.push(m);
        }
    }
    assert_eq!(got, messages);
    assert_eq!(dec.iv(), enc.iv());
    assert_eq!(dec.buffered_len(), 0);
}

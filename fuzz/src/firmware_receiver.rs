//! The device's side of a firmware transfer (`OtaReceiver`), driven the way
//! a gateway drives it: every request is built, encoded, decoded and
//! classified before `handle` sees it, and every reply must encode and
//! decode back to itself.
//!
//! Input: a configuration byte, then operations until the input ends:
//!
//! | op % 8 | what the "gateway" sends |
//! |---|---|
//! | 0 | UpdateBegin with one of three signed releases (valid, another product, a rollback); chunk size and file size from the input, or the release's own |
//! | 1 | UpdateBegin with a manifest of the input's bytes, or none |
//! | 2 | the right chunk at an index from the input (padded, or the last one cut short) |
//! | 3 | the right chunk with no index (spark's slow OTA: the first gap) |
//! | 4 | a chunk of the input's bytes, its CRC right or from the input |
//! | 5 | UpdateDone |
//! | 6 | any CoAP message from the input's bytes |
//! | 7 | the session ends (`reset`) |
//!
//! A model of the transfer checks the outcomes: the valid release is
//! accepted, a right chunk is stored, UpdateDone lists exactly the missing
//! chunks and completes with exactly the release's image when every chunk
//! is in and none holds wrong bytes (a hash mismatch when one does), and
//! nothing is accepted or completed with no transfer going on.

use trellis_firmware::{OtaReceiver, ReceiverConfig, ReceiverOutput, Rejection};
use trellis_wire::coap::code;
use trellis_wire::message::{self, Incoming, Request};
use trellis_wire::ota::{Chunk, UpdateBegin};
use trellis_wire::{CoapMessage, classify};

use crate::vectors::{self, PRODUCT_ID, VERSION_FLOOR};
use crate::{Input, vectors::Vectors};

const PRECONDITION_FAILED: u8 = code::make(4, 12);

/// What the transfer in progress should look like.
struct Model {
    release: usize,
    chunk_size: usize,
    file_size: usize,
    stored: Vec<bool>,
    /// Chunks stored with bytes that are not the release's.
    wrong: Vec<bool>,
}

impl Model {
    fn missing(&self) -> Vec<u16> {
        (0..self.stored.len())
            .filter(|i| !self.stored[*i])
            .map(|i| i as u16)
            .collect()
    }

    fn right_chunk(&self, v: &Vectors, index: usize, cut_short: bool) -> Vec<u8> {
        let image = &v.releases[self.release].image;
        let start = (index * self.chunk_size).min(image.len());
        let end = (start + self.chunk_size).min(image.len());
        let mut data = image[start..end].to_vec();
        if !cut_short {
            data.resize(self.chunk_size, 0);
        }
        data
    }
}

pub fn run(data: &[u8]) {
    drive(data);
}

/// What a run got to (the seeds are checked to reach the deep states).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reached {
    pub accepted: usize,
    pub stored: usize,
    pub completed: usize,
    pub refused: Vec<&'static str>,
}

pub fn drive(data: &[u8]) -> Reached {
    let mut reached = Reached::default();
    let v = vectors::get();
    let mut input = Input::new(data);
    let config_byte = input.byte();
    let config = ReceiverConfig {
        policy: (config_byte != 0xFF).then(|| v.policy.clone()),
        product_id: PRODUCT_ID,
        version_floor: VERSION_FLOOR,
        max_image_size: if config_byte & 0x40 != 0 {
            256
        } else {
            1 << 20
        },
        max_crc_failures: 1 + u32::from(config_byte & 3),
        max_missed_rounds: 1 + u32::from((config_byte >> 2) & 3),
    };
    let mut rx = OtaReceiver::new(config);
    let mut model: Option<Model> = None;
    let mut id: u16 = 1;
    while !input.is_empty() {
        id = id.wrapping_add(1);
        let token = input.byte();
        let op = input.byte() % 8;
        match op {
            0 => {
                let which = usize::from(input.byte()) % v.releases.len();
                let r = &v.releases[which];
                let own = input.byte();
                let (chunk_size, file_size) = if own < 0xF0 {
                    // Chunk sizes 1 to 240 over the 300-byte image.
                    (u16::from(own) + 1, r.image.len() as u32)
                } else {
                    (input.u16(), input.u32())
                };
                let begin = UpdateBegin {
                    flags: 0,
                    chunk_size,
                    file_size,
                    destination: 0,
                    address: 0,
                    manifest: Some(r.signed_bytes.clone()),
                };
                let valid = which == 0
                    && rx.config().policy.is_some()
                    && chunk_size > 0
                    && file_size as usize == r.image.len()
                    && (file_size as u64) <= rx.config().max_image_size;
                let out = send(&mut rx, message::update_begin(id, token, &begin));
                record(&mut reached, &out);
                model = begin_outcome(&out, &rx, which, &begin);
                reached.accepted += usize::from(model.is_some());
                assert_eq!(model.is_some(), valid, "UpdateBegin {begin:?}: {out:?}");
                if which != 0 && rx.config().policy.is_some() {
                    let code = out.rejected.as_ref().map(Rejection::code);
                    assert_eq!(
                        code,
                        Some(if which == 1 {
                            "wrong_product"
                        } else {
                            "rollback"
                        })
                    );
                }
            }
            1 => {
                let bytes = input.short_bytes();
                let begin = UpdateBegin {
                    flags: 0,
                    chunk_size: input.u16(),
                    file_size: input.u32(),
                    destination: 0,
                    address: 0,
                    manifest: (bytes != [0xFF]).then(|| bytes.to_vec()),
                };
                let out = send(&mut rx, message::update_begin(id, token, &begin));
                record(&mut reached, &out);
                // Only the releases' own envelopes carry a valid signature.
                model = begin_outcome(&out, &rx, 0, &begin);
                if model.is_some() {
                    let signed =
                        trellis_firmware::decode_signed_manifest(&bytes).expect("accepted");
                    assert_eq!(signed.manifest, v.releases[0].manifest);
                }
            }
            2 | 3 => {
                let unindexed = op == 3;
                let raw_index = usize::from(input.u16());
                let cut_short = input.byte() % 2 == 0;
                let (index, data) = match &model {
                    Some(m) => {
                        let index = if unindexed {
                            m.stored.iter().position(|s| !s).unwrap_or(m.stored.len())
                        } else {
                            raw_index % (m.stored.len() + 1)
                        };
                        (index, m.right_chunk(v, index, cut_short))
                    }
                    None => (raw_index, Vec::new()),
                };
                let chunk = Chunk::new((!unindexed).then_some(index as u16), data);
                let out = send(&mut rx, message::chunk(id, token, &chunk));
                record(&mut reached, &out);
                reached.stored += usize::from(model.is_some() && last_code(&out) == code::CHANGED);
                chunk_outcome(&out, &mut model, index, &chunk, v, true);
            }
            4 => {
                let index = input.u16();
                let indexed = input.byte() % 2 == 0;
                let crc = input.byte();
                let data = input.short_bytes().to_vec();
                let mut chunk = Chunk::new(indexed.then_some(index), data);
                if crc % 4 == 0 {
                    chunk.crc = input.u32();
                }
                let index = match (&model, chunk.index) {
                    (_, Some(i)) => usize::from(i),
                    (Some(m), None) => m.stored.iter().position(|s| !s).unwrap_or(m.stored.len()),
                    (None, None) => 0,
                };
                let out = send(&mut rx, message::chunk(id, token, &chunk));
                record(&mut reached, &out);
                reached.stored += usize::from(model.is_some() && last_code(&out) == code::CHANGED);
                chunk_outcome(&out, &mut model, index, &chunk, v, false);
            }
            5 => {
                let out = send(&mut rx, message::update_done(id, token));
                record(&mut reached, &out);
                reached.completed += usize::from(out.completed.is_some());
                done_outcome(&out, &mut model, v);
            }
            6 => {
                let bytes = input.short_bytes();
                if let Ok(m) = CoapMessage::decode(bytes)
                    && let Ok(Incoming::Request(request)) = classify(&m)
                {
                    let ota = matches!(
                        request,
                        Request::UpdateBegin(_) | Request::Chunk(_) | Request::UpdateDone
                    );
                    let out = rx.handle(&m, &request);
                    assert_eq!(out.is_some(), ota);
                    if let Some(out) = out {
                        check_replies(&out);
                    }
                    // The model no longer knows what the receiver holds.
                    if ota {
                        model = None;
                        rx.reset();
                    }
                }
            }
            _ => {
                rx.reset();
                model = None;
            }
        }
        assert_eq!(rx.is_receiving(), model.is_some());
    }
    reached
}

fn record(reached: &mut Reached, out: &ReceiverOutput) {
    if let Some(r) = &out.rejected {
        reached.refused.push(r.code());
    }
}

/// Encodes, decodes and classifies `m` as the device would, then handles it.
fn send(rx: &mut OtaReceiver, m: CoapMessage) -> ReceiverOutput {
    let decoded = CoapMessage::decode(&m.encode()).expect("a built request decodes");
    let Ok(Incoming::Request(request)) = classify(&decoded) else {
        panic!("a built OTA request does not classify: {decoded:?}");
    };
    let out = rx
        .handle(&decoded, &request)
        .expect("an OTA request is handled");
    check_replies(&out);
    out
}

fn check_replies(out: &ReceiverOutput) {
    assert!(!out.replies.is_empty());
    assert!(out.rejected.is_none() || out.completed.is_none());
    for reply in &out.replies {
        let bytes = reply.message.encode();
        assert_eq!(CoapMessage::decode(&bytes).as_ref(), Ok(&reply.message));
    }
    if let Some(r) = &out.rejected {
        let last = &out.replies[out.replies.len() - 1].message;
        assert_eq!(last.code, r.coap_code());
        assert_ne!(last.code, code::BAD_REQUEST);
        let (reason, _) =
            trellis_firmware::parse_rejection_event(&last.payload).expect("refusal payload");
        assert_eq!(reason, r.code());
    }
}

fn last_code(out: &ReceiverOutput) -> u8 {
    out.replies[out.replies.len() - 1].message.code
}

fn begin_outcome(
    out: &ReceiverOutput,
    rx: &OtaReceiver,
    release: usize,
    begin: &UpdateBegin,
) -> Option<Model> {
    if out.rejected.is_some() {
        assert!(!rx.is_receiving());
        return None;
    }
    assert_eq!(last_code(out), code::CHANGED);
    assert!(rx.is_receiving());
    let v = vectors::get();
    let manifest = rx.manifest().expect("manifest");
    assert_eq!(manifest.image_size, v.releases[release].image.len() as u64);
    let chunk_size = usize::from(begin.chunk_size);
    let file_size = begin.file_size as usize;
    let count = file_size.div_ceil(chunk_size);
    Some(Model {
        release,
        chunk_size,
        file_size,
        stored: vec![false; count],
        wrong: vec![false; count],
    })
}

fn chunk_outcome(
    out: &ReceiverOutput,
    model: &mut Option<Model>,
    index: usize,
    chunk: &Chunk,
    v: &Vectors,
    right: bool,
) {
    let Some(m) = model else {
        assert!(out.rejected.is_none());
        assert_eq!(last_code(out), PRECONDITION_FAILED);
        return;
    };
    if right && index < m.stored.len() {
        assert_eq!(
            last_code(out),
            code::CHANGED,
            "right chunk {index} not stored: {out:?}"
        );
    }
    if out.rejected.is_some() {
        *model = None;
        return;
    }
    match last_code(out) {
        code::CHANGED => {
            assert!(index < m.stored.len());
            assert!(chunk.crc_ok());
            let useful = m.chunk_size.min(m.file_size - index * m.chunk_size);
            let expected = m.right_chunk(v, index, true);
            m.stored[index] = true;
            m.wrong[index] = chunk.data[..useful] != expected[..];
        }
        code::BAD_REQUEST => assert!(!chunk.crc_ok()),
        other => panic!("chunk reply code {other:#x}: {out:?}"),
    }
}

fn done_outcome(out: &ReceiverOutput, model: &mut Option<Model>, v: &Vectors) {
    let Some(m) = model.take() else {
        assert!(out.rejected.is_none() && out.completed.is_none());
        assert_eq!(last_code(out), PRECONDITION_FAILED);
        return;
    };
    let missing = m.missing();
    if let Some(update) = &out.completed {
        assert!(missing.is_empty());
        assert!(!m.wrong.iter().any(|w| *w));
        assert_eq!(update.image, v.releases[m.release].image);
        assert_eq!(update.sha256().to_vec(), update.manifest.image_sha256);
        return;
    }
    if let Some(r) = &out.rejected {
        match r {
            Rejection::MissingChunks { missing: n, .. } => assert_eq!(*n, missing.len()),
            Rejection::HashMismatch { .. } => {
                assert!(missing.is_empty() && m.wrong.iter().any(|w| *w));
            }
            other => panic!("UpdateDone refused with {other:?}"),
        }
        return;
    }
    // Still receiving: the missing chunks are asked for, all of them, in order.
    assert!(!missing.is_empty());
    let mut asked = Vec::new();
    for reply in &out.replies[1..] {
        match classify(&reply.message) {
            Ok(Incoming::Request(Request::ChunkMissed(ix))) => asked.extend(ix),
            other => panic!("UpdateDone reply {other:?}"),
        }
    }
    assert_eq!(asked, missing);
    *model = Some(m);
}

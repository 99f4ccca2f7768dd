//! The device's half of a firmware transfer, sans-IO. UpdateBegin: the
//! manifest is verified against the trust policy, product and version floor
//! BEFORE any chunk is accepted. Chunk: CRC-checked, stored by index (a bad
//! CRC asks for the chunk again, as the original firmware does). UpdateDone:
//! missing chunks are asked for (ChunkMissed), and once the image is whole
//! its size and SHA-256 must match the manifest before it is handed back.
//!
//! Replies follow the original firmware (see the spark-protocol vectors): an
//! empty ACK on the request's id, then a separate NON with the request's
//! token for UpdateBegin and Chunk; a piggybacked ACK 2.04 for UpdateDone.
//! A refusal is a 4.xx instead of the 2.04, with `<reason_code>: <message>`
//! as its payload.

use std::collections::HashMap;

use trellis_wire::coap::{CoapMessage, MessageType, code};
use trellis_wire::message::{self, Request};
use trellis_wire::ota::{Chunk, UpdateBegin};

use crate::manifest::{FirmwareManifest, decode_signed_manifest};
use crate::policy::{TrustPolicy, verify_image, verify_update};
use crate::rejection::Rejection;

/// Particle firmware asks for at most this many chunks per ChunkMissed.
pub const MAX_MISSED_PER_MESSAGE: usize = 40;

/// 4.12 Precondition Failed: a Chunk or UpdateDone with no transfer going on.
const PRECONDITION_FAILED: u8 = code::make(4, 12);

#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// No policy: every update is refused (`no_trust_policy`).
    pub policy: Option<TrustPolicy>,
    pub product_id: u32,
    /// Only versions strictly above this are accepted.
    pub version_floor: u32,
    /// Largest image the device will buffer.
    pub max_image_size: u64,
    /// Bad CRCs for one chunk before the transfer is refused (`chunk_crc`).
    pub max_crc_failures: u32,
    /// UpdateDone rounds in a row that bring no new chunk before the
    /// transfer is refused (`missing_chunks`).
    pub max_missed_rounds: u32,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            policy: None,
            product_id: 0,
            version_floor: 0,
            max_image_size: 16 * 1024 * 1024,
            max_crc_failures: 5,
            max_missed_rounds: 5,
        }
    }
}

/// A verified image, ready to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedUpdate {
    pub manifest: FirmwareManifest,
    pub image: Vec<u8>,
}

impl ReceivedUpdate {
    pub fn sha256(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(&self.manifest.image_sha256);
        out
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ChunkOutcome {
    Stored {
        index: u16,
    },
    /// Bad CRC: ask for it again (ChunkReceived 4.00).
    Resend {
        index: u16,
    },
    Rejected(Rejection),
    /// No transfer in progress (a chunk left over after a refusal).
    NotReceiving,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DoneOutcome {
    /// Ask for these (all of them, in order).
    Missing(Vec<u16>),
    Complete(ReceivedUpdate),
    Rejected(Rejection),
    NotReceiving,
}

struct Transfer {
    manifest: FirmwareManifest,
    chunk_size: usize,
    file_size: usize,
    /// The image as it arrives, written in place (sized at UpdateBegin,
    /// after the signed manifest and `max_image_size` allowed it): no
    /// allocation per chunk and no copy at the end.
    image: Vec<u8>,
    /// Which chunks are in `image`.
    stored: Vec<bool>,
    received: usize,
    /// Where an index-less (spark, slow OTA) chunk goes: the first gap.
    next_unindexed: usize,
    crc_failures: HashMap<u16, u32>,
    received_at_last_done: usize,
    rounds_without_progress: u32,
}

/// One reply to send. `fresh_id`: the caller gives it its next message id
/// (the id in `message` is a placeholder); otherwise it is a piggybacked
/// ACK and keeps the request's id.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub message: CoapMessage,
    pub fresh_id: bool,
}

/// What handling one OTA request produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReceiverOutput {
    pub replies: Vec<Reply>,
    /// The transfer was refused: report it (`trellis/ota/rejected`) and keep
    /// the current image.
    pub rejected: Option<Rejection>,
    /// The image is whole and verified: apply it.
    pub completed: Option<ReceivedUpdate>,
}

pub struct OtaReceiver {
    config: ReceiverConfig,
    transfer: Option<Transfer>,
    next_token: u8,
}

impl OtaReceiver {
    /// Replaces the trust policy (an accepted rotation): later UpdateBegins
    /// are checked against it; a transfer already verified goes on.
    pub fn set_policy(&mut self, policy: Option<TrustPolicy>) {
        self.config.policy = policy;
    }

    pub fn new(config: ReceiverConfig) -> Self {
        OtaReceiver {
            config,
            transfer: None,
            next_token: 0x80,
        }
    }

    pub fn config(&self) -> &ReceiverConfig {
        &self.config
    }

    pub fn is_receiving(&self) -> bool {
        self.transfer.is_some()
    }

    /// The manifest being received, once UpdateBegin was accepted.
    pub fn manifest(&self) -> Option<&FirmwareManifest> {
        self.transfer.as_ref().map(|t| &t.manifest)
    }

    /// UpdateBegin. Any transfer in progress is abandoned first; on
    /// success the verified manifest is returned and chunks are accepted.
    pub fn begin(&mut self, begin: &UpdateBegin) -> Result<&FirmwareManifest, Rejection> {
        self.transfer = None;
        let Some(policy) = &self.config.policy else {
            return Err(Rejection::NoTrustPolicy);
        };
        let Some(bytes) = &begin.manifest else {
            return Err(Rejection::NoManifest);
        };
        let signed = decode_signed_manifest(bytes)?;
        let manifest = verify_update(
            &signed,
            policy,
            self.config.product_id,
            self.config.version_floor,
        )?;
        if u64::from(begin.file_size) != manifest.image_size {
            return Err(Rejection::SizeMismatch {
                expected: manifest.image_size,
                actual: u64::from(begin.file_size),
            });
        }
        if manifest.image_size > self.config.max_image_size {
            return Err(Rejection::TooLarge {
                size: manifest.image_size,
                limit: self.config.max_image_size,
            });
        }
        let chunk_size = usize::from(begin.chunk_size);
        if chunk_size == 0 {
            return Err(Rejection::BadTransfer {
                detail: "chunk size 0".into(),
            });
        }
        let file_size = begin.file_size as usize;
        let count = file_size.div_ceil(chunk_size);
        if count > usize::from(u16::MAX) + 1 {
            return Err(Rejection::BadTransfer {
                detail: format!(
                    "{count} chunks of {chunk_size} bytes cannot be indexed with 16 bits"
                ),
            });
        }
        let t = self.transfer.insert(Transfer {
            manifest,
            chunk_size,
            file_size,
            image: vec![0; file_size],
            stored: vec![false; count],
            received: 0,
            next_unindexed: 0,
            crc_failures: HashMap::new(),
            received_at_last_done: 0,
            rounds_without_progress: 0,
        });
        Ok(&t.manifest)
    }

    /// Chunk. A refusal ends the transfer.
    pub fn chunk(&mut self, chunk: &Chunk) -> ChunkOutcome {
        let Some(t) = self.transfer.as_mut() else {
            return ChunkOutcome::NotReceiving;
        };
        let index = match chunk.index {
            Some(i) => usize::from(i),
            None => t.next_unindexed,
        };
        if index >= t.stored.len() {
            let detail = format!(
                "chunk index {index} is past the last chunk ({})",
                t.stored.len().saturating_sub(1)
            );
            return self.refuse_chunk(Rejection::BadTransfer { detail });
        }
        // Bounded above by 65535 by the check in `begin`.
        let index16 = index as u16;
        if !chunk.crc_ok() {
            let failures = t.crc_failures.entry(index16).or_insert(0);
            *failures += 1;
            if *failures >= self.config.max_crc_failures {
                let attempts = *failures;
                return self.refuse_chunk(Rejection::ChunkCrc {
                    index: index16,
                    attempts,
                });
            }
            return ChunkOutcome::Resend { index: index16 };
        }
        let start = index * t.chunk_size;
        let useful = t.chunk_size.min(t.file_size - start);
        // The padded chunk, or (leniently) the last chunk without padding.
        if chunk.data.len() != t.chunk_size && chunk.data.len() != useful {
            let detail = format!(
                "chunk {index} is {} bytes, expected {}",
                chunk.data.len(),
                t.chunk_size
            );
            return self.refuse_chunk(Rejection::BadTransfer { detail });
        }
        if !t.stored[index] {
            t.received += 1;
            t.stored[index] = true;
        }
        t.image[start..start + useful].copy_from_slice(&chunk.data[..useful]);
        while t.next_unindexed < t.stored.len() && t.stored[t.next_unindexed] {
            t.next_unindexed += 1;
        }
        ChunkOutcome::Stored { index: index16 }
    }

    fn refuse_chunk(&mut self, r: Rejection) -> ChunkOutcome {
        self.transfer = None;
        ChunkOutcome::Rejected(r)
    }

    /// UpdateDone: the missing chunks, or the verified image. Both a
    /// completed and a refused transfer end here.
    pub fn done(&mut self) -> DoneOutcome {
        let Some(t) = self.transfer.as_mut() else {
            return DoneOutcome::NotReceiving;
        };
        if t.received < t.stored.len() {
            if t.received > t.received_at_last_done {
                t.rounds_without_progress = 0;
            } else {
                t.rounds_without_progress += 1;
            }
            t.received_at_last_done = t.received;
            if t.rounds_without_progress >= self.config.max_missed_rounds {
                let r = Rejection::MissingChunks {
                    missing: t.stored.len() - t.received,
                    rounds: t.rounds_without_progress,
                };
                self.transfer = None;
                return DoneOutcome::Rejected(r);
            }
            let missing = t
                .stored
                .iter()
                .enumerate()
                .filter(|(_, stored)| !**stored)
                .map(|(i, _)| i as u16)
                .collect();
            return DoneOutcome::Missing(missing);
        }
        let Some(t) = self.transfer.take() else {
            return DoneOutcome::NotReceiving;
        };
        let image = t.image;
        match verify_image(&t.manifest, &image) {
            Ok(()) => DoneOutcome::Complete(ReceivedUpdate {
                manifest: t.manifest,
                image,
            }),
            Err(r) => DoneOutcome::Rejected(r),
        }
    }

    /// Drops any transfer in progress (the session ended).
    pub fn reset(&mut self) {
        self.transfer = None;
    }

    fn take_token(&mut self) -> u8 {
        let t = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(0x80);
        t
    }

    /// Handles an OTA request (`UpdateBegin`, `Chunk`, `UpdateDone`) as a
    /// message: `m` is the request, `request` its classification. Returns
    /// `None` for any other request.
    pub fn handle(&mut self, m: &CoapMessage, request: &Request) -> Option<ReceiverOutput> {
        let token = m.token.as_slice();
        let empty_ack = Reply {
            message: message::empty_ack(m.message_id),
            fresh_id: false,
        };
        let separate = |code: u8, payload: &[u8]| Reply {
            message: CoapMessage::new(MessageType::NonConfirmable, code, 0)
                .with_token(token)
                .with_payload(payload),
            fresh_id: true,
        };
        let mut out = ReceiverOutput::default();
        match request {
            Request::UpdateBegin(begin) => {
                out.replies.push(empty_ack);
                match self.begin(begin) {
                    Ok(_) => out.replies.push(separate(code::CHANGED, &[])),
                    Err(r) => {
                        out.replies
                            .push(separate(r.coap_code(), r.event_data().as_bytes()));
                        out.rejected = Some(r);
                    }
                }
            }
            Request::Chunk(chunk) => {
                out.replies.push(empty_ack);
                match self.chunk(chunk) {
                    ChunkOutcome::Stored { .. } => out.replies.push(separate(code::CHANGED, &[])),
                    ChunkOutcome::Resend { .. } => {
                        out.replies.push(separate(code::BAD_REQUEST, &[]));
                    }
                    ChunkOutcome::Rejected(r) => {
                        out.replies
                            .push(separate(r.coap_code(), r.event_data().as_bytes()));
                        out.rejected = Some(r);
                    }
                    ChunkOutcome::NotReceiving => out
                        .replies
                        .push(separate(PRECONDITION_FAILED, b"no update in progress")),
                }
            }
            Request::UpdateDone => {
                let piggyback = |code: u8, payload: &[u8]| Reply {
                    message: CoapMessage::new(MessageType::Acknowledgement, code, m.message_id)
                        .with_token(token)
                        .with_payload(payload),
                    fresh_id: false,
                };
                match self.done() {
                    DoneOutcome::Missing(indexes) => {
                        out.replies.push(empty_ack);
                        for part in indexes.chunks(MAX_MISSED_PER_MESSAGE) {
                            let t = self.take_token();
                            out.replies.push(Reply {
                                message: message::chunk_missed(0, t, part),
                                fresh_id: true,
                            });
                        }
                    }
                    DoneOutcome::Complete(update) => {
                        out.replies.push(Reply {
                            message: message::update_done_ack(m.message_id, token),
                            fresh_id: false,
                        });
                        out.completed = Some(update);
                    }
                    DoneOutcome::Rejected(r) => {
                        out.replies
                            .push(piggyback(r.coap_code(), r.event_data().as_bytes()));
                        out.rejected = Some(r);
                    }
                    DoneOutcome::NotReceiving => out
                        .replies
                        .push(piggyback(PRECONDITION_FAILED, b"no update in progress")),
                }
            }
            _ => return None,
        }
        Some(out)
    }
}

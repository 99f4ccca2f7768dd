//! The gateway's half of a firmware transfer, sans-IO: it owns no socket,
//! no clock and no message counter. The caller asks `poll_transmit` for the
//! next message (giving it a message id and a one-byte token for each
//! request it creates), feeds every message from the device to `handle`, and
//! calls `on_timeout` when the device has been silent for too long.
//!
//! Flow: UpdateBegin (spark's 12 bytes plus the signed manifest) and wait
//! for UpdateReady; then chunks, each with its CRC-32 and its index as the
//! second Uri-Query (fast OTA), at most `window` awaiting their
//! ChunkReceived; a ChunkReceived of 4.00 sends that chunk again, any other
//! 4.xx/5.xx is the device refusing; then UpdateDone, answered either by
//! ChunkMissed requests (those chunks are sent again, then UpdateDone again)
//! or by the final verdict.
//!
//! Replies come back in order over TCP, so when the ChunkReceived for one
//! chunk arrives, every chunk sent before it that is still unanswered was
//! lost on the way (or its answer was): it leaves the window, and the device
//! asks for it at UpdateDone if it really is missing.

use std::collections::VecDeque;
use std::sync::Arc;

use trellis_wire::coap::{CoapMessage, MessageType, code};
use trellis_wire::message::{self, Incoming, Request};
use trellis_wire::ota::{Chunk, UpdateBegin};

use crate::TokenMap;
use crate::rejection::parse_rejection_event;

/// What `next_transmit` decided to send: a chunk is described, not
/// built, so `poll_transmit_into` can encode it from the image in place.
enum Next {
    Message(CoapMessage),
    Chunk { id: u16, token: u8, index: u16 },
}

#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Bytes per chunk, announced in UpdateBegin (spark: 256, Particle: 512).
    pub chunk_size: u16,
    /// Chunks sent ahead of their ChunkReceived (1: spark's stop-and-wait).
    /// Keep it well under the number of free one-byte tokens.
    pub window: usize,
    /// `on_timeout` calls in a row without any answer before giving up.
    pub max_timeouts: u32,
    /// Times one chunk may be sent again (bad CRC or asked for) before
    /// giving up.
    pub max_resends: u32,
    /// UpdateBegin flags (bit 0: fast OTA, chunk indexes in use).
    pub flags: u8,
    pub destination: u8,
    pub address: u32,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            chunk_size: 512,
            window: 8,
            max_timeouts: 3,
            max_resends: 8,
            flags: 0x01,
            destination: 0,
            address: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SenderError {
    #[error("the image is empty")]
    EmptyImage,
    #[error("the image is {0} bytes; UpdateBegin can describe at most 4294967295")]
    ImageTooLarge(usize),
    #[error("chunk size 0")]
    ZeroChunkSize,
    #[error("{chunks} chunks of {chunk_size} bytes cannot be indexed with 16 bits")]
    TooManyChunks { chunks: usize, chunk_size: u16 },
    #[error("the signed manifest is {0} bytes; UpdateBegin carries at most 65535")]
    ManifestTooLarge(usize),
    #[error("window 0 would never send a chunk")]
    ZeroWindow,
}

/// Which step the device refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Begin,
    Chunk(u16),
    Done,
}

/// Why the sender gave up on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendFailure {
    /// No answer after `max_timeouts` timeouts in a row.
    TimedOut { step: Step },
    /// A chunk had to be sent more than `max_resends` times.
    TooManyResends { index: u16 },
}

/// How the transfer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The device verified the image and is applying it. It counts as
    /// updated only when it reconnects reporting the new SHA-256.
    Delivered,
    /// The device refused. `reason` is `(reason_code, message)` when the
    /// device said why (a Trellis device always does).
    Refused {
        step: Step,
        code: u8,
        reason: Option<(String, String)>,
    },
    Failed(SendFailure),
}

impl Outcome {
    /// The device's reason code, if it refused and said why.
    pub fn reason_code(&self) -> Option<&str> {
        match self {
            Outcome::Refused {
                reason: Some((c, _)),
                ..
            } => Some(c),
            _ => None,
        }
    }
}

/// How far the transfer got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub chunks_total: usize,
    pub chunks_acked: usize,
    pub bytes_total: u64,
    pub bytes_acked: u64,
    /// Chunk transmissions, first sends and resends.
    pub chunks_sent: u64,
    pub chunks_resent: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Begin,
    AwaitReady,
    Sending,
    AwaitDone,
    Finished,
}

#[derive(Debug, Clone, Copy)]
struct Flight {
    index: u16,
    seq: u64,
}

pub struct OtaSender {
    /// Shared: a gateway sends one image to many devices at once.
    image: Arc<[u8]>,
    signed_manifest: Vec<u8>,
    config: SenderConfig,
    chunks_total: usize,
    phase: Phase,
    queue: VecDeque<u16>,
    in_flight: TokenMap<Flight>,
    begin_token: Option<u8>,
    done_token: Option<u8>,
    acked: Vec<bool>,
    acked_count: usize,
    bytes_acked: u64,
    sends: Vec<u32>,
    chunks_sent: u64,
    chunks_resent: u64,
    seq: u64,
    timeouts: u32,
    replies: VecDeque<CoapMessage>,
    outcome: Option<Outcome>,
}

impl OtaSender {
    /// `signed_manifest` is the `trellis.v1.SignedManifest` wire bytes, sent
    /// as they are after UpdateBegin's 12 bytes.
    pub fn new(
        image: impl Into<Arc<[u8]>>,
        signed_manifest: Vec<u8>,
        config: SenderConfig,
    ) -> Result<Self, SenderError> {
        let image: Arc<[u8]> = image.into();
        if image.is_empty() {
            return Err(SenderError::EmptyImage);
        }
        if u32::try_from(image.len()).is_err() {
            return Err(SenderError::ImageTooLarge(image.len()));
        }
        if config.chunk_size == 0 {
            return Err(SenderError::ZeroChunkSize);
        }
        if config.window == 0 {
            return Err(SenderError::ZeroWindow);
        }
        let chunks_total = image.len().div_ceil(usize::from(config.chunk_size));
        if chunks_total > usize::from(u16::MAX) + 1 {
            return Err(SenderError::TooManyChunks {
                chunks: chunks_total,
                chunk_size: config.chunk_size,
            });
        }
        if signed_manifest.len() > usize::from(u16::MAX) {
            return Err(SenderError::ManifestTooLarge(signed_manifest.len()));
        }
        Ok(OtaSender {
            image,
            signed_manifest,
            chunks_total,
            phase: Phase::Begin,
            queue: (0..chunks_total).map(|i| i as u16).collect(),
            in_flight: TokenMap::default(),
            begin_token: None,
            done_token: None,
            acked: vec![false; chunks_total],
            acked_count: 0,
            bytes_acked: 0,
            sends: vec![0; chunks_total],
            chunks_sent: 0,
            chunks_resent: 0,
            seq: 0,
            timeouts: 0,
            replies: VecDeque::new(),
            outcome: None,
            config,
        })
    }

    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    pub fn is_finished(&self) -> bool {
        self.outcome.is_some()
    }

    pub fn progress(&self) -> Progress {
        Progress {
            chunks_total: self.chunks_total,
            chunks_acked: self.acked_count,
            bytes_total: self.image.len() as u64,
            bytes_acked: self.bytes_acked,
            chunks_sent: self.chunks_sent,
            chunks_resent: self.chunks_resent,
        }
    }

    /// Tokens of requests still awaiting an answer: the caller must not
    /// reuse them for other requests, and should route answers carrying
    /// them to `handle`.
    pub fn owns_token(&self, token: u8) -> bool {
        self.begin_token == Some(token)
            || self.done_token == Some(token)
            || self.in_flight.contains_key(&token)
    }

    /// The UpdateBegin this transfer sends.
    pub fn update_begin(&self) -> UpdateBegin {
        UpdateBegin {
            flags: self.config.flags,
            chunk_size: self.config.chunk_size,
            file_size: self.image.len() as u32,
            destination: self.config.destination,
            address: self.config.address,
            manifest: Some(self.signed_manifest.clone()),
        }
    }

    /// The image bytes of chunk `index`, unpadded (the last one may be short).
    fn chunk_data(&self, index: u16) -> &[u8] {
        let size = usize::from(self.config.chunk_size);
        let start = usize::from(index) * size;
        &self.image[start..(start + size).min(self.image.len())]
    }

    /// The padded chunk `index` as sent (CRC over the padding included).
    pub fn chunk(&self, index: u16) -> Chunk {
        let mut data = self.chunk_data(index).to_vec();
        data.resize(usize::from(self.config.chunk_size), 0);
        Chunk::new(Some(index), data)
    }

    fn finish(&mut self, outcome: Outcome) {
        self.phase = Phase::Finished;
        self.in_flight.clear();
        self.queue.clear();
        self.begin_token = None;
        self.done_token = None;
        self.outcome = Some(outcome);
    }

    /// The next message to send, if any. `next_ids` is called once for each
    /// request created and returns `(message_id, token)`: the sender's
    /// counter value and a one-byte token not in use by other requests.
    /// Replies (ACKs to the device's ChunkMissed) keep the request's id and
    /// do not call it. Call until it returns `None`.
    pub fn poll_transmit(
        &mut self,
        next_ids: &mut dyn FnMut() -> (u16, u8),
    ) -> Option<CoapMessage> {
        match self.next_transmit(next_ids)? {
            Next::Message(m) => Some(m),
            Next::Chunk { id, token, index } => Some(message::chunk(id, token, &self.chunk(index))),
        }
    }

    /// [`OtaSender::poll_transmit`], appending the next message's CoAP
    /// bytes to `out` instead of returning it; `false` when there is
    /// nothing to send. A chunk goes from the image slice straight into
    /// `out` (`message::encode_chunk_into`): no copy of its data and no
    /// allocation, byte for byte what `poll_transmit` would have built.
    pub fn poll_transmit_into(
        &mut self,
        next_ids: &mut dyn FnMut() -> (u16, u8),
        out: &mut Vec<u8>,
    ) -> bool {
        match self.next_transmit(next_ids) {
            None => false,
            Some(Next::Message(m)) => {
                m.encode_into(out);
                true
            }
            Some(Next::Chunk { id, token, index }) => {
                message::encode_chunk_into(
                    out,
                    id,
                    token,
                    Some(index),
                    self.chunk_data(index),
                    usize::from(self.config.chunk_size),
                );
                true
            }
        }
    }

    /// Whether [`OtaSender::poll_transmit`] would give a message now,
    /// without giving it: the gateway checks that it still owns the device
    /// before anything is taken off the queue (and so before any token is
    /// spent or the session's IV chain moves).
    pub fn wants_transmit(&self) -> bool {
        if !self.replies.is_empty() {
            return true;
        }
        match self.phase {
            Phase::Begin => true,
            Phase::Sending => {
                (self.in_flight.len() < self.config.window && !self.queue.is_empty())
                    || (self.queue.is_empty() && self.in_flight.is_empty())
            }
            Phase::AwaitReady | Phase::AwaitDone | Phase::Finished => false,
        }
    }

    /// Bytes the messages [`OtaSender::poll_transmit`] would give now take
    /// at most, encoded and framed (a chunk's CoAP head is under 32 bytes,
    /// its frame adds at most 18): room to reserve once for a whole pump.
    pub fn transmit_size_hint(&self) -> usize {
        let chunks = self
            .config
            .window
            .saturating_sub(self.in_flight.len())
            .min(self.queue.len());
        let per_chunk = usize::from(self.config.chunk_size) + 32 + 18;
        chunks * per_chunk + self.replies.len() * 64 + self.signed_manifest.len()
    }

    fn next_transmit(&mut self, next_ids: &mut dyn FnMut() -> (u16, u8)) -> Option<Next> {
        if let Some(reply) = self.replies.pop_front() {
            return Some(Next::Message(reply));
        }
        match self.phase {
            Phase::Begin => {
                let (id, token) = next_ids();
                self.begin_token = Some(token);
                self.phase = Phase::AwaitReady;
                Some(Next::Message(message::update_begin(
                    id,
                    token,
                    &self.update_begin(),
                )))
            }
            Phase::Sending => {
                if self.in_flight.len() < self.config.window
                    && let Some(index) = self.queue.pop_front()
                {
                    let (id, token) = next_ids();
                    self.seq += 1;
                    self.in_flight.insert(
                        token,
                        Flight {
                            index,
                            seq: self.seq,
                        },
                    );
                    let i = usize::from(index);
                    if self.sends[i] > 0 {
                        self.chunks_resent += 1;
                    }
                    self.sends[i] += 1;
                    self.chunks_sent += 1;
                    return Some(Next::Chunk { id, token, index });
                }
                if self.queue.is_empty() && self.in_flight.is_empty() {
                    let (id, token) = next_ids();
                    self.done_token = Some(token);
                    self.phase = Phase::AwaitDone;
                    return Some(Next::Message(message::update_done(id, token)));
                }
                None
            }
            Phase::AwaitReady | Phase::AwaitDone | Phase::Finished => None,
        }
    }

    fn queue_again(&mut self, index: u16, front: bool) {
        if self.queue.contains(&index) || self.in_flight.values().any(|f| f.index == index) {
            return;
        }
        if self.sends[usize::from(index)] > self.config.max_resends {
            self.finish(Outcome::Failed(SendFailure::TooManyResends { index }));
            return;
        }
        if front {
            self.queue.push_front(index);
        } else {
            self.queue.push_back(index);
        }
    }

    fn refused(&mut self, step: Step, m: &CoapMessage) {
        let reason = parse_rejection_event(&m.payload);
        self.finish(Outcome::Refused {
            step,
            code: m.code,
            reason,
        });
    }

    /// Feeds a message from the device. Returns `true` if it belonged to
    /// this transfer (an answer carrying one of its tokens, or a
    /// ChunkMissed request while the transfer runs); `false` means the
    /// caller handles it as usual. Empty ACKs only say "received" and are
    /// left to the caller.
    pub fn handle(&mut self, m: &CoapMessage) -> bool {
        if self.phase == Phase::Finished {
            return false;
        }
        match message::classify(m) {
            Ok(Incoming::Request(Request::ChunkMissed(indexes))) => {
                self.timeouts = 0;
                if m.mtype == MessageType::Confirmable {
                    self.replies.push_back(message::empty_ack(m.message_id));
                }
                if matches!(self.phase, Phase::Begin | Phase::AwaitReady) {
                    return true;
                }
                for index in indexes {
                    if usize::from(index) < self.chunks_total {
                        self.queue_again(index, false);
                        if self.phase == Phase::Finished {
                            return true;
                        }
                    }
                }
                if self.phase == Phase::AwaitDone {
                    self.done_token = None;
                    self.phase = Phase::Sending;
                }
                true
            }
            Ok(Incoming::Response) => self.on_response(m),
            _ => false,
        }
    }

    fn on_response(&mut self, m: &CoapMessage) -> bool {
        if m.code == code::EMPTY || m.mtype == MessageType::Reset {
            return false;
        }
        let Some(&token) = m.token.first() else {
            return false;
        };
        let success = code::class(m.code) == 2;
        if self.begin_token == Some(token) {
            self.timeouts = 0;
            self.begin_token = None;
            if success {
                self.phase = Phase::Sending;
            } else {
                self.refused(Step::Begin, m);
            }
            return true;
        }
        if self.done_token == Some(token) {
            self.timeouts = 0;
            self.done_token = None;
            if success {
                self.acked.iter_mut().for_each(|a| *a = true);
                self.acked_count = self.chunks_total;
                self.bytes_acked = self.image.len() as u64;
                self.finish(Outcome::Delivered);
            } else {
                self.refused(Step::Done, m);
            }
            return true;
        }
        let Some(flight) = self.in_flight.remove(&token) else {
            return false;
        };
        self.timeouts = 0;
        // Answers arrive in order: anything sent earlier and unanswered is
        // presumed lost; the device asks for it at UpdateDone if need be.
        self.in_flight.retain(|_, f| f.seq > flight.seq);
        let index = flight.index;
        if success {
            let i = usize::from(index);
            if !self.acked[i] {
                self.acked[i] = true;
                self.acked_count += 1;
                self.bytes_acked += self.chunk_data(index).len() as u64;
            }
        } else if m.code == code::BAD_REQUEST {
            self.queue_again(index, true);
        } else {
            self.refused(Step::Chunk(index), m);
        }
        true
    }

    /// The device has been silent for the caller's timeout. Whatever was
    /// awaited is presumed lost and sent again (UpdateBegin, UpdateDone) or
    /// left for ChunkMissed (chunks); after `max_timeouts` in a row the
    /// transfer fails.
    pub fn on_timeout(&mut self) {
        let step = match self.phase {
            Phase::Finished => return,
            Phase::Begin | Phase::AwaitReady => Step::Begin,
            Phase::AwaitDone => Step::Done,
            Phase::Sending => match self.in_flight.values().min_by_key(|f| f.seq) {
                Some(f) => Step::Chunk(f.index),
                None => return,
            },
        };
        self.timeouts += 1;
        if self.timeouts >= self.config.max_timeouts {
            self.finish(Outcome::Failed(SendFailure::TimedOut { step }));
            return;
        }
        match self.phase {
            Phase::AwaitReady => {
                self.begin_token = None;
                self.phase = Phase::Begin;
            }
            Phase::AwaitDone => {
                self.done_token = None;
                self.phase = Phase::Sending;
            }
            Phase::Sending => self.in_flight.clear(),
            Phase::Begin | Phase::Finished => {}
        }
    }
}

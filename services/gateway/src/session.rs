//! One device's encrypted session after the handshake: Hello, Describe,
//! keepalive, events, and the operator's function calls and variable reads.
//! The loop owns the socket, the frame codec and both message counters, so
//! nothing else can write to the device out of order.
use crate::local::{Inbox, SessionCommand};
use crate::routing::{Action, Failure, FailureKind, Outcome, Output};
use crate::{Gateway, device_state, ownership};

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tracing::Instrument;
use trellis_core::Shutdown;
use trellis_core::audit::{self, AuditRecord};
use trellis_firmware::TokenMap;
use trellis_firmware::{OtaSender, Outcome as SendOutcome, SenderConfig};
use trellis_wire::coap::{CoapMessage, MessageType, code};
use trellis_wire::counter::{IncomingCounter, OutgoingCounter};
use trellis_wire::frame::SessionCipher;
use trellis_wire::hello::Hello;
use trellis_wire::message::{self, Describe, Incoming, Request, VariableType};

/// Why a session ended: logged, and audited when it is the device's fault.
#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    #[error("device closed the connection")]
    DeviceClosed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("no message for {0} s (keepalive timeout)")]
    Silent(u64),
    #[error("a frame was started and not completed within {0} s")]
    StalledFrame(u64),
    #[error("bad frame: {0}")]
    BadFrame(String),
    #[error("not a CoAP message: {0}")]
    BadCoap(String),
    #[error("message id out of sequence: {0}")]
    Counter(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("closed by the cloud: {0}")]
    Closed(String),
    #[error("gateway shutting down")]
    Shutdown,
}

impl SessionEnd {
    /// Violations are the device's fault and go to the audit log.
    pub fn is_violation(&self) -> bool {
        matches!(
            self,
            Self::BadFrame(_)
                | Self::BadCoap(_)
                | Self::Counter(_)
                | Self::Protocol(_)
                | Self::StalledFrame(_)
        )
    }

    pub fn label(&self) -> &'static str {
        match self {
            Self::DeviceClosed => "device_closed",
            Self::Io(_) => "io",
            Self::Silent(_) => "keepalive_timeout",
            Self::StalledFrame(_) => "frame_read_timeout",
            Self::BadFrame(_) => "bad_frame",
            Self::BadCoap(_) => "bad_coap",
            Self::Counter(_) => "bad_message_id",
            Self::Protocol(_) => "protocol_violation",
            Self::Closed(_) => "closed_by_cloud",
            Self::Shutdown => "shutdown",
        }
    }
}

enum Pending {
    Describe,
    /// A token lent to the firmware transfer.
    Ota,
    Function {
        reply: oneshot::Sender<Outcome>,
        deadline: Instant,
    },
    Variable {
        name: String,
        reply: oneshot::Sender<Outcome>,
        deadline: Instant,
    },
    Signal {
        reply: oneshot::Sender<Outcome>,
        deadline: Instant,
    },
    /// A trust policy rotation (POST `tp`, docs/protocol.md §7.5).
    Policy {
        release_id: String,
        version: u64,
        sha256: String,
        bytes: u64,
        reply: oneshot::Sender<Outcome>,
        deadline: Instant,
    },
    /// A device key rotation asked (`dk`): the device's offer comes next.
    RotateKey {
        reply: oneshot::Sender<Outcome>,
        deadline: Instant,
    },
    /// A registered next key sent for the device to commit (`nk`).
    CommitKey {
        next_key_id: String,
        reply: oneshot::Sender<Outcome>,
        deadline: Instant,
    },
    /// A cloud key announcement (`ck`) of this version.
    CloudKey {
        version: u32,
        deadline: Instant,
    },
}

pub struct Session {
    gw: Arc<Gateway>,
    device_id: String,
    epoch: u64,
    peer: SocketAddr,
    stream: TcpStream,
    cipher: SessionCipher,
    incoming: IncomingCounter,
    outgoing: OutgoingCounter,
    hello_seen: bool,
    next_token: u8,
    pending: TokenMap<Pending>,
    /// The variables' types from the device's Describe (a variable read
    /// answers with its type), and nothing else of it: the rest is in the
    /// device state in Redis, and every idle session carries this.
    variable_types: Box<[(Box<str>, VariableType)]>,
    last_received: Instant,
    /// Boxed: an idle session (nearly all of them) should not carry a
    /// transfer's 400 bytes.
    transfer: Option<Box<Transfer>>,
    /// The transfer took answers that the next pump acts on.
    pump_deferred: bool,
    /// The cloud key version the session was opened under.
    cloud_key_version: u32,
    /// The version the device holds (Hello extension 0x03, then its
    /// acknowledgements); `None`: no rotation support.
    device_cloud_key: Option<u32>,
}

/// A firmware transfer in progress on this session (one at a time).
struct Transfer {
    sender: OtaSender,
    release_id: String,
    /// What the delivery fence names in a refusal and its audit record,
    /// made once per transfer rather than once per pump.
    fence_what: String,
    reply: oneshot::Sender<Outcome>,
    deadline: Instant,
    last_heard: Instant,
}

/// Housekeeping period while a deadline is near (see `event_loop`).
const BUSY_TICK: Duration = Duration::from_millis(500);

/// Silence during a transfer after which the awaited step is sent again.
const TRANSFER_STEP_TIMEOUT: Duration = Duration::from_secs(5);

impl Session {
    pub fn new(
        gw: Arc<Gateway>,
        device_id: String,
        epoch: u64,
        peer: SocketAddr,
        stream: TcpStream,
        cipher: SessionCipher,
        cloud_key_version: u32,
    ) -> Self {
        Self {
            gw,
            device_id,
            epoch,
            peer,
            stream,
            cipher,
            incoming: IncomingCounter::new(),
            // The server's counter starts at a random value (PROTOCOL.md).
            outgoing: OutgoingCounter::new(rand::random()),
            hello_seen: false,
            next_token: 1,
            pending: TokenMap::default(),
            variable_types: Box::default(),
            last_received: Instant::now(),
            transfer: None,
            pump_deferred: false,
            cloud_key_version,
            device_cloud_key: None,
        }
    }

    pub async fn run(mut self: Box<Self>, commands: &Inbox, mut shutdown: Shutdown) -> SessionEnd {
        let end = self.event_loop(commands, &mut shutdown).await;
        // Commands still queued (and any submitted from now on) fail at
        // once with "the session ended".
        commands.close();
        // Whatever is still waiting learns that the session is gone.
        if let Some(t) = self.transfer.take() {
            let _ = t.reply.send(Err(Failure::new(
                FailureKind::SessionLost,
                format!(
                    "session ended during the transfer of {}: {end}",
                    t.release_id
                ),
            )));
        }
        for (_, p) in self.pending.drain() {
            if let Pending::Function { reply, .. }
            | Pending::Variable { reply, .. }
            | Pending::Signal { reply, .. }
            | Pending::RotateKey { reply, .. }
            | Pending::CommitKey { reply, .. } = p
            {
                let _ = reply.send(Err(Failure::new(
                    FailureKind::SessionLost,
                    format!("session ended before the device answered: {end}"),
                )));
            }
        }
        // Released before the device sees the close, so its reconnect
        // (through the load balancer, to any gateway) is a clean claim and
        // not a suspected duplicate.
        let mut redis = self.gw.redis.clone();
        if let Err(e) = Box::pin(ownership::release(&mut redis, &self.device_id, self.epoch)).await
        {
            tracing::warn!(device = %self.device_id, error = %e, "could not release ownership; it expires on its own");
        }
        let _ = self.stream.shutdown().await;
        end
    }

    async fn event_loop(&mut self, commands: &Inbox, shutdown: &mut Shutdown) -> SessionEnd {
        let keepalive = Duration::from_secs(self.gw.config.keepalive_secs.max(1));
        let silence_limit = keepalive * 3;
        let hello_deadline = Duration::from_millis(self.gw.config.handshake_step_timeout_ms);
        let frame_deadline = Duration::from_secs(self.gw.config.frame_read_timeout_secs.max(1));
        // When the first bytes of a frame not yet complete arrived: a frame
        // trickled in a byte at a time still has to finish in time.
        let mut frame_started: Option<Instant> = None;
        // The housekeeping timer: every 500 ms while something has a
        // deadline (no Hello yet, commands waiting for the device, a
        // transfer, a drain), otherwise only when the ownership refresh or
        // the silence limit is due. Idle sessions are nearly all of them,
        // and every wake-up of every session costs CPU.
        let tick = tokio::time::sleep(BUSY_TICK);
        tokio::pin!(tick);
        // Drain (gateway shutdown): take no new command, let the device
        // answer what it was already asked, then end (the caller releases
        // ownership and closes, and the device reconnects elsewhere).
        let mut draining = false;
        // Made when a drain starts: a span held by every idle session for
        // its whole life costs the tracing registry memory per session.
        let mut drain_span: Option<tracing::Span> = None;
        loop {
            tokio::select! {
                ready = self.stream.readable() => {
                    if let Err(e) = ready {
                        return SessionEnd::Io(e);
                    }
                    // No read buffer held per session (4 KiB each, idle or
                    // not): the bytes go through stack scratch space
                    // straight into the frame decoder.
                    match read_into_decoder(&self.stream, &mut self.cipher.decoder) {
                        Ok(0) => return SessionEnd::DeviceClosed,
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(e) => return SessionEnd::Io(e),
                    }
                    self.last_received = Instant::now();
                    let mut completed = false;
                    loop {
                        // Pings and a transfer's answers, nearly all of what
                        // devices send, are handled inside `take_message`;
                        // the rest in a boxed future (here and below), so
                        // the idle session's task holds only the loop, not
                        // the largest handler's state (lib.rs, `connection`).
                        match self.take_message() {
                            Ok(Taken::Nothing) => break,
                            Ok(Taken::Handled) => completed = true,
                            Ok(Taken::Await(step)) => {
                                completed = true;
                                if let Err(end) = step.await {
                                    return end;
                                }
                            }
                            Err(end) => return end,
                        }
                    }
                    if self.cipher.decoder.buffered_len() == 0 {
                        frame_started = None;
                    } else if completed || frame_started.is_none() {
                        // What is left is the start of a new frame.
                        frame_started = Some(self.last_received);
                        let due = tokio::time::Instant::from_std(self.last_received + frame_deadline);
                        if tick.deadline() > due {
                            tick.as_mut().reset(due);
                        }
                    }
                    // Every transfer answer of this read is in: one pump
                    // (one fence, one write) refills the window for all.
                    if std::mem::take(&mut self.pump_deferred)
                        && let Err(end) = Box::pin(self.pump_transfer()).await
                    {
                        return end;
                    }
                }
                cmd = commands.recv() => match cmd {
                    Some(SessionCommand::Execute { action, timeout, request, reply }) => {
                        if draining {
                            let _ = reply.send(Err(Failure::new(
                                FailureKind::SessionLost,
                                format!("gateway {} is draining; the command was not delivered to device {}", self.gw.id, self.device_id),
                            )));
                        } else if let Err(end) = Box::pin(self.start_command(action, timeout, request, reply)).await {
                            return end;
                        }
                        // The command has a deadline now: tick soon.
                        let soon = tokio::time::Instant::now() + BUSY_TICK;
                        if tick.deadline() > soon {
                            tick.as_mut().reset(soon);
                        }
                    }
                    Some(SessionCommand::Close { reason }) => return SessionEnd::Closed(reason),
                    Some(SessionCommand::CloudKeyChanged) => {
                        if !draining && self.hello_seen
                            && let Err(end) = Box::pin(self.announce_cloud_key()).await
                        {
                            return end;
                        }
                    }
                    None => return SessionEnd::Shutdown,
                },
                () = &mut tick => {
                    if draining && self.pending.values().all(|p| matches!(p, Pending::Describe | Pending::Ota | Pending::CloudKey { .. })) {
                        let span = drain_span.get_or_insert_with(|| self.drain_span());
                        span.in_scope(|| tracing::info!("in-flight commands answered; closing for the drain"));
                        return SessionEnd::Shutdown;
                    }
                    let silent = self.last_received.elapsed();
                    if !self.hello_seen && silent > hello_deadline {
                        return SessionEnd::Protocol("no Hello after the handshake".into());
                    }
                    if silent > silence_limit {
                        return SessionEnd::Silent(silent.as_secs());
                    }
                    if frame_started.is_some_and(|t| t.elapsed() >= frame_deadline) {
                        return SessionEnd::StalledFrame(frame_deadline.as_secs());
                    }
                    self.expire_pending();
                    if self.transfer.is_some()
                        && let Err(end) = Box::pin(self.transfer_tick()).await
                    {
                        return end;
                    }
                    let busy = draining
                        || !self.hello_seen
                        || !self.pending.is_empty()
                        || self.transfer.is_some();
                    let next = if busy {
                        tokio::time::Instant::now() + BUSY_TICK
                    } else if let Some(t) = frame_started {
                        tokio::time::Instant::from_std((t + frame_deadline).max(Instant::now() + BUSY_TICK))
                    } else {
                        // Idle: wake only when the silence limit is due
                        // (ownership is refreshed for all sessions at once,
                        // refresher.rs); each ping moves it on.
                        let due = self.last_received + silence_limit;
                        tokio::time::Instant::from_std(due.max(Instant::now() + BUSY_TICK))
                    };
                    tick.as_mut().reset(next);
                }
                _ = shutdown.wait(), if !draining => {
                    draining = true;
                    let in_flight = self.pending.values().filter(|p| !matches!(p, Pending::Describe | Pending::Ota | Pending::CloudKey { .. })).count();
                    drain_span.get_or_insert_with(|| self.drain_span()).in_scope(|| tracing::info!(in_flight, "draining"));
                    if in_flight == 0 {
                        return SessionEnd::Shutdown;
                    }
                }
            }
        }
    }

    fn drain_span(&self) -> tracing::Span {
        tracing::info_span!("session.drain", device = %self.device_id, epoch = self.epoch)
    }

    async fn send(&mut self, msg: &CoapMessage) -> Result<(), SessionEnd> {
        if let Some(rest) = self.send_now(msg)? {
            self.stream.write_all(&rest).await?;
        }
        Ok(())
    }

    /// Frames `msg` and writes what the socket takes now, without waiting;
    /// `Some(rest)` is what it did not take, to be written (in order,
    /// before anything else) by the caller.
    fn send_now(&mut self, msg: &CoapMessage) -> Result<Option<Vec<u8>>, SessionEnd> {
        // Built in this worker thread's scratch space and written at once
        // when the socket takes it, as it nearly always does: a ping's ack
        // then allocates nothing, and an idle fleet's pings are most of an
        // idle gateway's work. Only what the socket did not take is copied
        // out to wait for it.
        SEND_SCRATCH.with_borrow_mut(|(plain, frame)| {
            plain.clear();
            frame.clear();
            msg.encode_into(plain);
            self.cipher
                .encoder
                .try_encode_into(plain, frame)
                .map_err(|e| {
                    SessionEnd::Protocol(format!("cannot frame a message to the device: {e}"))
                })?;
            let written = match self.stream.try_write(frame) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(SessionEnd::Io(e)),
            };
            let unwritten = (written < frame.len()).then(|| {
                let mut rest = std::mem::take(frame);
                rest.drain(..written);
                rest
            });
            // A firmware chunk's frame is kept; nothing bigger.
            if frame.capacity() > SEND_SCRATCH_KEEP {
                *plain = Vec::new();
                *frame = Vec::new();
            }
            Ok(unwritten)
        })
    }

    fn take_token(&mut self) -> u8 {
        free_token(&mut self.next_token, &self.pending)
    }

    fn message_span(&self, msg: &CoapMessage, kind: &'static str) -> tracing::Span {
        tracing::info_span!(
            "device.message",
            device = %self.device_id,
            messaging.system = "trellis-coap",
            messaging.operation.name = kind,
            messaging.message.id = msg.message_id,
            coap.type = ?msg.mtype,
        )
    }

    /// The next complete message from the device, decrypted in this
    /// worker thread's scratch space: no allocation per message beyond the
    /// parsed message's own parts.
    fn next_message(&mut self) -> Result<Option<CoapMessage>, SessionEnd> {
        RECV_SCRATCH.with_borrow_mut(|plain| {
            let parsed = match self.cipher.decoder.next_message_into(plain) {
                Ok(true) => CoapMessage::decode(plain)
                    .map(Some)
                    .map_err(|e| SessionEnd::BadCoap(e.to_string())),
                Ok(false) => Ok(None),
                Err(e) => Err(SessionEnd::BadFrame(e.to_string())),
            };
            if plain.capacity() > SEND_SCRATCH_KEEP {
                *plain = Vec::new();
            }
            parsed
        })
    }

    /// Takes the next complete message from the device and does all of
    /// its handling that needs no waiting. Not async, so none of this sits
    /// in the session task's state between messages.
    fn take_message(&mut self) -> Result<Taken<'_>, SessionEnd> {
        let Some(msg) = self.next_message()? else {
            return Ok(Taken::Nothing);
        };
        Ok(match self.triage(&msg)? {
            Triage::Done => Taken::Handled,
            Triage::Request(Request::Ping) => match self.answer_ping(&msg)? {
                None => Taken::Handled,
                Some(rest) => Taken::Await(Box::pin(write_rest(&mut self.stream, rest))),
            },
            triage => Taken::Await(Box::pin(self.handle_triaged(msg, triage))),
        })
    }

    /// Everything about a message from the device that needs no waiting:
    /// the Hello rule, the message counter, a transfer's answers. What is
    /// left is handled by [`Session::handle_triaged`].
    fn triage(&mut self, msg: &CoapMessage) -> Result<Triage, SessionEnd> {
        let is_request_flow = matches!(
            msg.mtype,
            MessageType::Confirmable | MessageType::NonConfirmable
        );
        if is_request_flow {
            if !self.hello_seen {
                let Ok(Incoming::Request(Request::Hello(hello))) = message::classify(msg) else {
                    return Err(SessionEnd::Protocol(
                        "the first message must be Hello".into(),
                    ));
                };
                self.incoming.start(msg.message_id);
                return Ok(Triage::Hello(hello));
            }
            self.incoming
                .check(msg.message_id)
                .map_err(|e| SessionEnd::Counter(e.to_string()))?;
        } else if !self.hello_seen {
            return Err(SessionEnd::Protocol(
                "the first message must be Hello".into(),
            ));
        }
        if let Some(t) = self.transfer.as_mut()
            && t.sender.handle(msg)
        {
            t.last_heard = Instant::now();
            // Pumped once the frames already read are all handled.
            self.pump_deferred = true;
            return Ok(Triage::Done);
        }
        match message::classify(msg).map_err(|e| SessionEnd::Protocol(e.to_string()))? {
            Incoming::Request(req) => Ok(Triage::Request(req)),
            Incoming::Response => Ok(Triage::Response),
        }
    }

    /// A keepalive answered without a future of its own: most of an idle
    /// gateway's work is this, for every device every keepalive period.
    /// `Some(rest)`: the part of the ack the socket did not take.
    fn answer_ping(&mut self, msg: &CoapMessage) -> Result<Option<Vec<u8>>, SessionEnd> {
        let span = self.message_span(msg, "ping");
        let _entered = span.enter();
        self.send_now(&message::ping_ack(msg.message_id, &msg.token))
    }

    async fn handle_triaged(&mut self, msg: CoapMessage, triage: Triage) -> Result<(), SessionEnd> {
        // One span per message handled (transfer acks are the transfer's
        // own: thousands per image, summed in its log line).
        match triage {
            Triage::Done => Ok(()),
            Triage::Hello(hello) => {
                let span = self.message_span(&msg, "hello");
                self.on_hello(hello).instrument(span).await
            }
            Triage::Request(req) => {
                let span = self.message_span(&msg, req.kind());
                self.on_request(&msg, req).instrument(span).await
            }
            Triage::Response => {
                let span = self.message_span(&msg, "response");
                self.on_response(&msg).instrument(span).await;
                Ok(())
            }
        }
    }

    async fn on_hello(&mut self, hello: Hello) -> Result<(), SessionEnd> {
        self.hello_seen = true;
        tracing::info!(device = %self.device_id, firmware = hello.firmware_version, product = hello.product_id, "hello");
        let mut redis = self.gw.redis.clone();
        if let Err(e) = device_state::record_hello(&mut redis, &self.device_id, &hello).await {
            tracing::warn!(device = %self.device_id, error = %e, "could not store the device's Hello");
        }
        // What cloud key version it holds (Hello extension 0x03; none:
        // version 1, no rotation support), recorded before any answer: in
        // the device state with the Hello above, and in the durable count.
        self.device_cloud_key = hello.cloud_key_version;
        crate::cloud_keys::record_durable_holding(
            &self.gw,
            &self.device_id,
            hello.cloud_key_version.unwrap_or(1),
            hello.cloud_key_version.is_some(),
        )
        .await;
        self.tell_scheduler(&hello);
        let token = self.take_token();
        let id = self.outgoing.next();
        self.send(&message::hello_server(id, token)).await?;
        // The original server asks Describe before the first call; asking
        // now means the device's functions are known before anyone calls.
        let token = self.take_token();
        self.pending.insert(token, Pending::Describe);
        let id = self.outgoing.next();
        self.send(&message::describe(id, token)).await?;
        // Cloud key rotation (docs/protocol.md §6.7): the current key if
        // the device holds an older one.
        self.announce_cloud_key().await
    }

    /// Sends the signed announcement of the current cloud key if the device
    /// supports rotation, holds an older version, and is not being told
    /// already. A keyvault that cannot sign it now is logged; the next
    /// Hello or version change tries again.
    async fn announce_cloud_key(&mut self) -> Result<(), SessionEnd> {
        let Some(held) = self.device_cloud_key else {
            return Ok(());
        };
        let current = self.gw.cloud_keys.current();
        if current <= held
            || self
                .pending
                .values()
                .any(|p| matches!(p, Pending::CloudKey { .. }))
        {
            return Ok(());
        }
        let (version, payload) = match self
            .gw
            .cloud_keys
            .announcement(&self.gw, self.cloud_key_version)
            .await
        {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(device = %self.device_id, error = %e, "cannot get the cloud key announcement from keyvault");
                return Ok(());
            }
        };
        if version <= held {
            return Ok(());
        }
        tracing::info!(device = %self.device_id, held, version, session_version = self.cloud_key_version, "announcing the cloud key");
        let token = self.take_token();
        let deadline = Instant::now() + Duration::from_millis(self.gw.config.command_timeout_ms);
        self.pending
            .insert(token, Pending::CloudKey { version, deadline });
        let id = self.outgoing.next();
        self.send(&message::cloud_key_announcement(id, token, &payload))
            .await
    }

    async fn on_request(&mut self, msg: &CoapMessage, req: Request) -> Result<(), SessionEnd> {
        let confirmable = msg.mtype == MessageType::Confirmable;
        match req {
            Request::Hello(_) => {
                return Err(SessionEnd::Protocol("a second Hello in one session".into()));
            }
            Request::Ping => {
                return self
                    .send(&message::ping_ack(msg.message_id, &msg.token))
                    .await;
            }
            Request::Event { public, name, data } => {
                let mut redis = self.gw.redis.clone();
                let gw_id = self.gw.id.clone();
                let max = self.gw.config.events_max_len;
                if let Err(e) = device_state::append_event(
                    &mut redis,
                    max,
                    &self.device_id,
                    &gw_id,
                    &name,
                    &data,
                    public,
                )
                .await
                {
                    tracing::warn!(device = %self.device_id, error = %e, "event not stored");
                }
                tracing::debug!(device = %self.device_id, event = %name, bytes = data.len(), "event");
                trellis_core::metrics::metrics().device_events.add(
                    1,
                    &[trellis_core::metrics::kv("gateway", self.gw.id.clone())],
                );
            }
            Request::GetTime => {
                let now = u32::try_from(trellis_core::time::now_ms() / 1000).unwrap_or(u32::MAX);
                return self
                    .send(&message::time_reply(msg.message_id, &msg.token, now))
                    .await;
            }
            Request::Subscribe { .. } => {
                return self
                    .send(&message::ping_ack(msg.message_id, &msg.token))
                    .await;
            }
            other => {
                // Server-side requests (Describe, calls, OTA steps) coming
                // from a device are not ours to answer; acknowledge so the
                // device does not retransmit, and note it.
                tracing::debug!(device = %self.device_id, request = ?std::mem::discriminant(&other), "unexpected request from device");
            }
        }
        if confirmable {
            self.send(&message::empty_ack(msg.message_id)).await?;
        }
        Ok(())
    }

    async fn on_response(&mut self, msg: &CoapMessage) {
        // An empty ACK only says "received"; the answer follows separately.
        if msg.code == code::EMPTY {
            return;
        }
        let Some(&token) = msg.token.first() else {
            return;
        };
        let Some(pending) = self.pending.remove(&token) else {
            tracing::debug!(device = %self.device_id, token, "answer to nothing we asked");
            return;
        };
        self.release_empty_pending();
        let failed = msg.code >= code::BAD_REQUEST;
        match pending {
            Pending::Describe => {
                if failed {
                    tracing::warn!(device = %self.device_id, code = msg.code, "device refused Describe");
                    return;
                }
                match Describe::from_json(&msg.payload) {
                    Ok(d) => {
                        let functions = d.functions.clone();
                        let variables: Vec<(String, String)> = d
                            .variables
                            .iter()
                            .map(|(n, t)| (n.clone(), t.name().to_string()))
                            .collect();
                        let mut redis = self.gw.redis.clone();
                        if let Err(e) = device_state::record_describe(
                            &mut redis,
                            &self.device_id,
                            &functions,
                            &variables,
                        )
                        .await
                        {
                            tracing::warn!(device = %self.device_id, error = %e, "could not store Describe");
                        }
                        self.variable_types = d
                            .variables
                            .into_iter()
                            .map(|(n, t)| (n.into_boxed_str(), t))
                            .collect();
                    }
                    Err(e) => {
                        tracing::warn!(device = %self.device_id, error = %e, "unreadable Describe")
                    }
                }
            }
            Pending::Ota => {}
            Pending::RotateKey { reply, deadline } => {
                if msg.code != code::CHANGED {
                    let _ = reply.send(Err(Failure::new(
                        FailureKind::Refused,
                        format!(
                            "device answered {}: {}",
                            code_text(msg.code),
                            reason_text(&msg.payload)
                        ),
                    )));
                    return;
                }
                // The device's offer: keyvault checks its signature by the
                // registered key and records it as the next key.
                let mut keyvault = self.gw.keyvault.clone();
                let registered = keyvault
                    .register_next_device_key(trellis_proto::v1::RegisterNextDeviceKeyRequest {
                        device_id: self.device_id.clone(),
                        offer: msg.payload.clone(),
                        gateway_id: self.gw.id.clone(),
                    })
                    .await;
                let device = match registered {
                    Ok(d) => d.into_inner(),
                    Err(status) => {
                        tracing::warn!(device = %self.device_id, error = %status.message(), "keyvault refused the device's new key");
                        let _ = reply.send(Err(Failure::new(
                            FailureKind::Refused,
                            format!("keyvault refused the new key: {}", status.message()),
                        )));
                        return;
                    }
                };
                let Some(sha) = hex::decode(&device.next_key_id)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                else {
                    let _ = reply.send(Err(Failure::new(
                        FailureKind::Internal,
                        format!("keyvault answered a next key id {:?}", device.next_key_id),
                    )));
                    return;
                };
                let token = self.take_token();
                let id = self.outgoing.next();
                self.pending.insert(
                    token,
                    Pending::CommitKey {
                        next_key_id: device.next_key_id.clone(),
                        reply,
                        deadline,
                    },
                );
                if let Err(e) = self
                    .send(&message::device_key_commit(id, token, &sha))
                    .await
                {
                    tracing::warn!(device = %self.device_id, error = %e, "cannot send the key commit");
                }
            }
            Pending::CommitKey {
                next_key_id, reply, ..
            } => {
                let _ = reply.send(if msg.code == code::CHANGED {
                    tracing::info!(device = %self.device_id, %next_key_id, "device committed its new key");
                    Ok(Output::KeyRotated { next_key_id })
                } else {
                    Err(Failure::new(
                        FailureKind::Refused,
                        format!(
                            "device answered {}: {}",
                            code_text(msg.code),
                            reason_text(&msg.payload)
                        ),
                    ))
                });
            }
            Pending::CloudKey { version, .. } => {
                if msg.code == code::CHANGED {
                    tracing::info!(device = %self.device_id, version, "device acknowledged the cloud key");
                    self.device_cloud_key = Some(version);
                    crate::cloud_keys::record_holding(&self.gw, &self.device_id, version, true)
                        .await;
                    crate::cloud_keys::audit(&self.gw, &self.device_id, version, "ok", "").await;
                } else {
                    let reason = reason_text(&msg.payload);
                    tracing::warn!(device = %self.device_id, version, code = %code_text(msg.code), %reason, "device refused the cloud key announcement");
                    crate::cloud_keys::audit(
                        &self.gw,
                        &self.device_id,
                        version,
                        "refused",
                        &reason,
                    )
                    .await;
                }
            }
            Pending::Function { reply, .. } => {
                let outcome = if msg.code == code::FORBIDDEN {
                    // A device with signed commands refused the call; its
                    // reason is the payload (docs/protocol.md §7.4).
                    let reason: String = String::from_utf8_lossy(&msg.payload)
                        .chars()
                        .filter(|c| !c.is_control())
                        .take(80)
                        .collect();
                    Err(Failure::new(
                        FailureKind::Refused,
                        if reason.is_empty() {
                            "no reason given".into()
                        } else {
                            reason
                        },
                    ))
                } else if failed {
                    Err(Failure::new(
                        FailureKind::NotFound,
                        format!("device answered {}", code_text(msg.code)),
                    ))
                } else {
                    match <[u8; 4]>::try_from(msg.payload.as_slice()) {
                        Ok(b) => Ok(Output::FunctionReturn(i32::from_be_bytes(b))),
                        Err(_) => Err(Failure::new(
                            FailureKind::Internal,
                            format!("function return of {} bytes, expected 4", msg.payload.len()),
                        )),
                    }
                };
                let _ = reply.send(outcome);
            }
            Pending::Policy {
                release_id,
                version,
                sha256,
                bytes,
                reply,
                ..
            } => {
                let outcome = policy_outcome(msg.code, &msg.payload, bytes);
                if msg.code == code::CHANGED {
                    let mut redis = self.gw.redis.clone();
                    if let Err(e) = device_state::record_trust_policy(
                        &mut redis,
                        &self.device_id,
                        version,
                        &sha256,
                    )
                    .await
                    {
                        tracing::warn!(device = %self.device_id, error = %e, "accepted trust policy not recorded in the device state");
                    }
                }
                tracing::info!(device = %self.device_id, release = %release_id, code = %code_text(msg.code), "trust policy delivery answered");
                let _ = reply.send(Ok(outcome));
            }
            Pending::Signal { reply, .. } => {
                let _ = reply.send(if failed {
                    Err(Failure::new(
                        FailureKind::NotFound,
                        format!("device answered {}", code_text(msg.code)),
                    ))
                } else {
                    Ok(Output::Signaled)
                });
            }
            Pending::Variable { name, reply, .. } => {
                let outcome = if failed {
                    Err(Failure::new(
                        FailureKind::NotFound,
                        format!("device answered {}", code_text(msg.code)),
                    ))
                } else {
                    let var_type = self
                        .variable_types
                        .iter()
                        .find(|(n, _)| **n == *name)
                        .map(|(_, t)| t.name().to_string())
                        .unwrap_or_default();
                    Ok(Output::Variable {
                        raw: msg.payload.clone(),
                        var_type,
                    })
                };
                let _ = reply.send(outcome);
            }
        }
    }

    async fn start_command(
        &mut self,
        action: Action,
        timeout: Duration,
        request: Option<String>,
        reply: oneshot::Sender<Outcome>,
    ) -> Result<(), SessionEnd> {
        let deadline = Instant::now() + timeout;
        // Fencing at the point of delivery (fence.rs): nothing is written
        // for a device this session no longer owns.
        let what = crate::fence::describe(&action);
        if let Err(refusal) = crate::fence::before_delivery(
            &self.gw,
            &self.device_id,
            self.epoch,
            request.as_deref(),
            &what,
        )
        .await
        {
            let _ = reply.send(Err(refusal.failure));
            return refusal
                .end_session
                .map_or(Ok(()), |r| Err(SessionEnd::Closed(r)));
        }
        tracing::debug!(device = %self.device_id, ?action, "command to device");
        let (name, call_signature, argument) = match action {
            Action::DeliverUpdate { release_id, .. }
                if trellis_records::policy_release::is_policy_release_id(&release_id) =>
            {
                return self.start_policy(release_id, deadline, reply).await;
            }
            Action::DeliverUpdate { release_id, .. } => {
                return self.start_transfer(release_id, deadline, reply).await;
            }
            Action::CallFunction {
                name,
                argument,
                signed,
            } => (name, Some(signed), argument),
            Action::GetVariable { name } => (name, None, String::new()),
            Action::Signal { on } => {
                let token = self.take_token();
                let id = self.outgoing.next();
                self.pending
                    .insert(token, Pending::Signal { reply, deadline });
                return self.send(&message::signal(id, token, on)).await;
            }
            Action::RotateDeviceKey => {
                let token = self.take_token();
                let id = self.outgoing.next();
                self.pending
                    .insert(token, Pending::RotateKey { reply, deadline });
                return self.send(&message::device_key_rotate(id, token)).await;
            }
        };
        let token = self.take_token();
        let id = self.outgoing.next();
        let (msg, pending) = if let Some(signed) = call_signature {
            let msg = match signed {
                Some(signed) => {
                    message::signed_function_call(id, token, &name, argument.as_bytes(), &signed)
                }
                None => message::function_call(id, token, &name, argument.as_bytes()),
            };
            (msg, Pending::Function { reply, deadline })
        } else {
            (
                message::variable_request(id, token, &name),
                Pending::Variable {
                    name,
                    reply,
                    deadline,
                },
            )
        };
        self.pending.insert(token, pending);
        self.send(&msg).await
    }

    /// A map keeps its table when emptied: every idle session would carry
    /// the one its Describe needed (~240 bytes) for the rest of its life.
    fn release_empty_pending(&mut self) {
        if self.pending.is_empty() && self.pending.capacity() > 0 {
            self.pending = TokenMap::default();
        }
    }

    fn expire_pending(&mut self) {
        let now = Instant::now();
        let expired: Vec<u8> = self
            .pending
            .iter()
            .filter(|(_, p)| match p {
                Pending::Function { deadline, .. }
                | Pending::Variable { deadline, .. }
                | Pending::Signal { deadline, .. }
                | Pending::Policy { deadline, .. }
                | Pending::RotateKey { deadline, .. }
                | Pending::CommitKey { deadline, .. }
                | Pending::CloudKey { deadline, .. } => *deadline <= now,
                Pending::Describe | Pending::Ota => false,
            })
            .map(|(t, _)| *t)
            .collect();
        for t in expired {
            if let Some(
                Pending::Function { reply, .. }
                | Pending::Variable { reply, .. }
                | Pending::Signal { reply, .. }
                | Pending::Policy { reply, .. }
                | Pending::RotateKey { reply, .. }
                | Pending::CommitKey { reply, .. },
            ) = self.pending.remove(&t)
            {
                let _ = reply.send(Err(Failure::new(
                    FailureKind::Timeout,
                    format!("device {} did not answer in time", self.device_id),
                )));
            }
        }
        self.release_empty_pending();
    }

    pub async fn audit_end(gw: &Gateway, device_id: &str, peer: SocketAddr, end: &SessionEnd) {
        let record = AuditRecord::new(&gw.id, "protocol_violation", device_id, end.label())
            .with("peer", peer.to_string())
            .with("error", end.to_string());
        let mut durable = gw.durable.clone();
        match tokio::time::timeout(
            crate::home::DURABLE_WRITE_BUDGET,
            audit::append(&mut durable, &record),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "audit write failed"),
            Err(_) => tracing::warn!("audit write timed out (durable store failing over)"),
        }
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }
}

impl Session {
    /// Tells the OTA scheduler what the device runs now, off the session
    /// loop; if the scheduler says the device is due for an update, asks
    /// for the delivery like any routed command.
    fn tell_scheduler(&self, hello: &Hello) {
        let Some(mut ota) = self.gw.ota.clone() else {
            return;
        };
        let request = trellis_proto::v1::DeviceHelloRequest {
            device_id: self.device_id.clone(),
            product_id: u32::from(hello.product_id),
            firmware_version: u32::from(hello.firmware_version),
            firmware_sha256: hello.firmware_sha256.map(hex::encode).unwrap_or_default(),
            gateway_id: self.gw.id.clone(),
            policy_version: hello.trust_policy.map_or(0, |p| p.version),
            policy_sha256: hello
                .trust_policy
                .map(|p| hex::encode(p.sha256))
                .unwrap_or_default(),
        };
        let router = Arc::clone(&self.gw.router);
        let device = self.device_id.clone();
        let gateway_id = self.gw.id.clone();
        tokio::spawn(
            async move {
                let due = match ota.device_hello(request).await {
                    Ok(r) => r.into_inner(),
                    Err(e) => {
                        tracing::warn!(%device, error = %e.message(), "OTA scheduler not told of Hello");
                        return;
                    }
                };
                if due.rollout_id.is_empty() {
                    return;
                }
                let action = Action::DeliverUpdate {
                    release_id: due.release_id.clone(),
                    rollout_id: due.rollout_id.clone(),
                };
                let outcome = router.execute(&device, action, Duration::from_secs(300)).await;
                tracing::info!(%device, release = %due.release_id, rollout = %due.rollout_id, ?outcome, "update delivered on connect");
                // The scheduler learns the result now rather than waiting
                // for its apply timeout.
                let result = delivery_response(outcome, &gateway_id);
                let report = trellis_proto::v1::ReportDeliveryRequest {
                    rollout_id: due.rollout_id,
                    device_id: device.to_string(),
                    result: Some(result),
                    session_epoch: 0,
                };
                if let Err(e) = ota.report_delivery(report).await {
                    tracing::warn!(%device, error = %e.message(), "OTA scheduler not told of the delivery; it falls back on its apply timeout");
                }
            }
            .instrument(tracing::info_span!("ota.device_hello")),
        );
    }

    /// Sends a policy release's SignedPolicy to the device (CON POST `tp`);
    /// its piggybacked answer (2.04, or 4.03/4.06 with the reason) ends the
    /// delivery.
    async fn start_policy(
        &mut self,
        release_id: String,
        deadline: Instant,
        reply: oneshot::Sender<Outcome>,
    ) -> Result<(), SessionEnd> {
        let mut durable = self.gw.durable.clone();
        let record =
            match trellis_records::policy_release::get_policy_release(&mut durable, &release_id)
                .await
            {
                Ok(Some(r)) => r,
                Ok(None) => {
                    let _ = reply.send(Err(Failure::new(
                        FailureKind::NotFound,
                        format!("no policy release {release_id}"),
                    )));
                    return Ok(());
                }
                Err(e) => {
                    let _ = reply.send(Err(Failure::new(
                        FailureKind::NotFound,
                        format!("policy release {release_id}: {e}"),
                    )));
                    return Ok(());
                }
            };
        let bytes = trellis_firmware::encode_signed_policy(&record.signed_policy());
        let token = self.take_token();
        let id = self.outgoing.next();
        tracing::info!(device = %self.device_id, release = %release_id, bytes = bytes.len(), "trust policy delivery starts");
        self.pending.insert(
            token,
            Pending::Policy {
                version: record.version,
                sha256: record.sha256(),
                release_id,
                bytes: bytes.len() as u64,
                reply,
                deadline,
            },
        );
        self.send(&message::trust_policy(id, token, &bytes)).await
    }

    async fn start_transfer(
        &mut self,
        release_id: String,
        deadline: Instant,
        reply: oneshot::Sender<Outcome>,
    ) -> Result<(), SessionEnd> {
        if self.transfer.is_some() {
            let _ = reply.send(Err(Failure::new(
                FailureKind::Internal,
                format!("device {} is already receiving an update", self.device_id),
            )));
            return Ok(());
        }
        // The signer keeps releases and images in the durable store.
        let mut durable = self.gw.durable.clone();
        let bundle = match crate::release::load(&mut durable, &self.gw.releases, &release_id).await
        {
            Ok(b) => b,
            Err(e) => {
                let _ = reply.send(Err(Failure::new(FailureKind::NotFound, e)));
                return Ok(());
            }
        };
        // One copy of the image for every device it goes to (the gateway's
        // release cache holds it; the SHA-256 was checked once, at load).
        let sender = match OtaSender::new(
            bundle.image,
            bundle.signed_manifest,
            SenderConfig {
                window: self.gw.config.ota_window,
                chunk_size: self.gw.config.ota_chunk_size,
                ..SenderConfig::default()
            },
        ) {
            Ok(s) => s,
            Err(e) => {
                let _ = reply.send(Err(Failure::new(
                    FailureKind::Internal,
                    format!("release {release_id} cannot be sent: {e}"),
                )));
                return Ok(());
            }
        };
        tracing::info!(device = %self.device_id, release = %release_id, "firmware transfer starts");
        self.transfer = Some(Box::new(Transfer {
            sender,
            fence_what: format!("firmware transfer of {release_id}"),
            release_id,
            reply,
            deadline,
            last_heard: Instant::now(),
        }));
        self.pump_transfer().await
    }

    /// Sends whatever the transfer has to send, and answers the caller
    /// once it has ended.
    async fn pump_transfer(&mut self) -> Result<(), SessionEnd> {
        let Some(mut t) = self.transfer.take() else {
            return Ok(());
        };
        // Ownership is checked before anything is taken off the transfer's
        // queue: a refused or unverifiable fence leaves the transfer as it
        // was (no token spent, the IV chain unmoved) for the next pump or
        // the step timer.
        if t.sender.wants_transmit() {
            if let Err(refusal) = crate::fence::before_delivery(
                &self.gw,
                &self.device_id,
                self.epoch,
                None,
                &t.fence_what,
            )
            .await
            {
                self.transfer = Some(t);
                return refusal
                    .end_session
                    .map_or(Ok(()), |r| Err(SessionEnd::Closed(r)));
            }
            // Every message of this pump is encoded straight into its frame
            // (a chunk goes from the shared image into the frame buffer in
            // one copy, then is encrypted there) and written at once, in
            // order, so the IV chain and message ids are what sending them
            // one by one would give.
            let mut frames = Vec::with_capacity(t.sender.transmit_size_hint());
            let Session {
                cipher,
                pending,
                outgoing,
                next_token,
                ..
            } = self;
            loop {
                let mut next_ids = || {
                    let token = free_token(next_token, pending);
                    pending.insert(token, Pending::Ota);
                    (outgoing.next(), token)
                };
                match cipher.encoder.encode_with(&mut frames, |buf| {
                    t.sender.poll_transmit_into(&mut next_ids, buf)
                }) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        // The chunk size is checked against the frame limit
                        // at start, so this is a bug, not a device's doing.
                        tracing::error!(device = %self.device_id, release = %t.release_id, error = %e, "cannot frame a firmware message");
                        self.transfer = Some(t);
                        return Err(SessionEnd::Closed(format!(
                            "cannot frame a firmware message: {e}"
                        )));
                    }
                }
            }
            if let Err(e) = self.stream.write_all(&frames).await {
                self.transfer = Some(t);
                return Err(e.into());
            }
        }
        // Tokens the transfer no longer waits on go back to the pool.
        self.pending
            .retain(|tok, p| !matches!(p, Pending::Ota) || t.sender.owns_token(*tok));
        if let Some(outcome) = t.sender.outcome().cloned() {
            self.pending.retain(|_, p| !matches!(p, Pending::Ota));
            let progress = t.sender.progress();
            tracing::info!(
                device = %self.device_id,
                release = %t.release_id,
                ?outcome,
                bytes = progress.bytes_acked,
                resent = progress.chunks_resent,
                "firmware transfer ended"
            );
            let _ = t
                .reply
                .send(Ok(delivery_output(&outcome, progress.bytes_acked)));
        } else {
            self.transfer = Some(t);
        }
        Ok(())
    }

    async fn transfer_tick(&mut self) -> Result<(), SessionEnd> {
        let Some(t) = self.transfer.as_mut() else {
            return Ok(());
        };
        if Instant::now() >= t.deadline {
            if let Some(t) = self.transfer.take() {
                self.pending.retain(|_, p| !matches!(p, Pending::Ota));
                let _ = t.reply.send(Err(Failure::new(
                    FailureKind::Timeout,
                    format!("transfer of {} did not finish in time", t.release_id),
                )));
            }
            return Ok(());
        }
        if t.last_heard.elapsed() >= TRANSFER_STEP_TIMEOUT {
            t.last_heard = Instant::now();
            t.sender.on_timeout();
            return self.pump_transfer().await;
        }
        Ok(())
    }
}

/// The device's answer to POST `tp` as a delivery: 2.04 is SENT (the
/// device accepted and stored the policy), a 4.xx with `<reason>: <message>`
/// REJECTED with that reason.
fn policy_outcome(answer: u8, payload: &[u8], bytes_sent: u64) -> Output {
    use trellis_proto::v1::DeliveryOutcome;
    if answer == code::CHANGED {
        return Output::Delivery {
            outcome: DeliveryOutcome::Sent as i32,
            reason: String::new(),
            message: "the device accepted the trust policy".into(),
            bytes_sent,
        };
    }
    let (reason, message) = trellis_firmware::parse_rejection_event(payload).unwrap_or_else(|| {
        (
            "refused".into(),
            format!("device answered {} to the trust policy", code_text(answer)),
        )
    });
    Output::Delivery {
        outcome: if answer >= code::BAD_REQUEST {
            DeliveryOutcome::Rejected as i32
        } else {
            DeliveryOutcome::Failed as i32
        },
        reason,
        message,
        bytes_sent,
    }
}

fn delivery_output(outcome: &SendOutcome, bytes_sent: u64) -> Output {
    use trellis_proto::v1::DeliveryOutcome;
    match outcome {
        SendOutcome::Delivered => Output::Delivery {
            outcome: DeliveryOutcome::Sent as i32,
            reason: String::new(),
            message: "the device took the image and UpdateDone".into(),
            bytes_sent,
        },
        SendOutcome::Refused { step, code, reason } => {
            let (reason, message) = reason.clone().unwrap_or_else(|| {
                (
                    "refused".into(),
                    format!("device answered {} to {step:?}", code_text(*code)),
                )
            });
            Output::Delivery {
                outcome: DeliveryOutcome::Rejected as i32,
                reason,
                message,
                bytes_sent,
            }
        }
        SendOutcome::Failed(f) => Output::Delivery {
            outcome: DeliveryOutcome::Failed as i32,
            reason: "transfer_failed".into(),
            message: format!("{f:?}"),
            bytes_sent,
        },
    }
}

/// The scheduler's view of a delivery this gateway made on its behalf.
fn delivery_response(
    outcome: Outcome,
    gateway_id: &str,
) -> trellis_proto::v1::DeliverUpdateResponse {
    use trellis_proto::v1::{DeliverUpdateResponse, DeliveryOutcome};
    match outcome {
        Ok(Output::Delivery {
            outcome,
            reason,
            message,
            bytes_sent,
        }) => DeliverUpdateResponse {
            outcome,
            reason,
            message,
            bytes_sent,
            gateway_id: gateway_id.to_string(),
        },
        Ok(other) => DeliverUpdateResponse {
            outcome: DeliveryOutcome::Failed as i32,
            reason: "unexpected_answer".into(),
            message: format!("unexpected answer {other:?}"),
            bytes_sent: 0,
            gateway_id: gateway_id.to_string(),
        },
        Err(f) => DeliverUpdateResponse {
            outcome: DeliveryOutcome::Failed as i32,
            reason: format!("delivery_{:?}", f.kind).to_lowercase(),
            message: f.message,
            bytes_sent: 0,
            gateway_id: gateway_id.to_string(),
        },
    }
}

/// Largest scratch space `Session::send` or `Session::next_message`
/// keeps per worker thread.
const SEND_SCRATCH_KEEP: usize = 16 * 1024;

thread_local! {
    /// `Session::send`'s plaintext and frame buffers.
    static SEND_SCRATCH: std::cell::RefCell<(Vec<u8>, Vec<u8>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    /// `Session::next_message`'s plaintext: decrypted there and parsed
    /// into an owned message at once, so no session holds it.
    static RECV_SCRATCH: std::cell::RefCell<Vec<u8>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// What [`Session::take_message`] found.
enum Taken<'a> {
    /// No complete message is buffered.
    Nothing,
    Handled,
    /// The rest of the handling, to be awaited.
    Await(Pin<Box<dyn Future<Output = Result<(), SessionEnd>> + Send + 'a>>),
}

/// What [`Session::triage`] left to do with a message.
enum Triage {
    /// Nothing more (a transfer's answer, pumped after the read).
    Done,
    Hello(Hello),
    Request(Request),
    Response,
}

/// Writes what the socket did not take of a frame.
async fn write_rest(stream: &mut TcpStream, rest: Vec<u8>) -> Result<(), SessionEnd> {
    stream.write_all(&rest).await?;
    Ok(())
}

/// The next one-byte token not in flight, as the original server's tokens
/// (never 0). A free function so a transfer's pump can take tokens while
/// the session's encoder is borrowed.
fn free_token(next: &mut u8, pending: &TokenMap<Pending>) -> u8 {
    for _ in 0..=u8::MAX {
        let t = *next;
        *next = next.wrapping_add(1).max(1);
        if !pending.contains_key(&t) {
            return t;
        }
    }
    *next
}

/// One non-blocking read of up to 4 KiB into `decoder`. The scratch buffer
/// lives on this function's stack, never in the session's future.
fn read_into_decoder(
    stream: &TcpStream,
    decoder: &mut trellis_wire::frame::FrameDecoder,
) -> std::io::Result<usize> {
    let mut scratch = [0u8; 4096];
    let mut got = 0;
    // A read that did not fill the scratch space emptied the socket, so its
    // readiness is cleared now (by answering WouldBlock to `try_io`), as
    // tokio's own `poll_read` does on epoll: otherwise every ping costs a
    // second read that only says EAGAIN. Should more bytes have arrived in
    // between, the driver's newer readiness event is kept.
    let read = stream.try_io(tokio::io::Interest::READABLE, || {
        got = stream.try_read(&mut scratch)?;
        if got > 0 && got < scratch.len() {
            Err(std::io::ErrorKind::WouldBlock.into())
        } else {
            Ok(got)
        }
    });
    match read {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && got > 0 => {}
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    decoder.push(&scratch[..got]);
    Ok(got)
}

/// A device's refusal reason (a UTF-8 payload), printable and short.
fn reason_text(payload: &[u8]) -> String {
    let reason: String = String::from_utf8_lossy(payload)
        .chars()
        .filter(|c| !c.is_control())
        .take(80)
        .collect();
    if reason.is_empty() {
        "no reason given".into()
    } else {
        reason
    }
}

fn code_text(code: u8) -> String {
    format!("{}.{:02}", code >> 5, code & 0x1f)
}

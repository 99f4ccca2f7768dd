//! One device's connection: the handshake, Hello, and the message loop
//! (answers, keepalive, periodic events, firmware updates) over a TCP
//! stream, driving the sans-IO `trellis-wire` engine and, for updates,
//! `trellis-firmware`'s `OtaReceiver`. Reconnecting is the caller's
//! business, and so is applying a verified update (`SessionEnd`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use trellis_firmware::command::CommandGuard;
use trellis_firmware::rotation::{POLICY_REJECTED_EVENT, verify_policy_update_bytes};
use trellis_firmware::{
    OtaReceiver, REJECTED_EVENT, ReceivedUpdate, ReceiverConfig, Rejection, TrustPolicy,
};
use trellis_wire::coap::{CoapMessage, MessageType, code};
use trellis_wire::message::{self, Incoming, Request, encode_value};
use trellis_wire::{
    CoapError, CounterError, DeviceHandshake, FrameError, HandshakeError, Hello, IncomingCounter,
    MessageError, NONCE_LEN, OutgoingCounter, SERVER_REPLY_LEN, SessionCipher,
};

use crate::app::DeviceApp;
use crate::identity::DeviceIdentity;
use crate::keys::SharedKeys;

/// How the device behaves on one connection.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub product_id: u16,
    pub firmware_version: u16,
    pub platform_id: u16,
    pub firmware_sha256: [u8; 32],
    /// Ping after this long without receiving anything (firmware: 15 s).
    pub keepalive: Duration,
    /// Drop the connection if nothing arrives this long after a ping (10 s).
    pub ping_timeout: Duration,
    pub event_interval: Option<Duration>,
    pub event_name: String,
    pub send_public_key: bool,
    /// Limit for each handshake read (protocol: 30 s).
    pub handshake_step_timeout: Duration,
    pub max_frame_len: usize,
    /// Hello flags (bit 0, `hello::FLAG_UPDATED`: running an update applied
    /// since the last session).
    pub hello_flags: u8,
    /// The release keys this device trusts and how many must sign. `None`:
    /// every update is refused (`no_trust_policy`).
    pub trust_policy: Option<TrustPolicy>,
    /// Updates must have a version above both this and the running
    /// `firmware_version` (no rollback, no reinstall).
    pub version_floor: u32,
    /// Largest firmware image the device accepts.
    pub max_image_size: u64,
    /// Signed commands (docs/protocol.md §7.4): the guard every function
    /// call passes before it runs, shared by this device's sessions so the
    /// last accepted sequence survives reconnects. `None`: calls run
    /// unsigned, as with the original protocol.
    pub command_guard: Option<SharedCommandGuard>,
    /// Key rotation (docs/protocol.md §6.7, §6.8): the keys this device
    /// holds and changes, shared by its sessions. With them the device
    /// announces Hello extension 0x03, accepts signed cloud key
    /// announcements (`ck`) and rotates its own key when asked (`dk`,
    /// `nk`). `None`: a legacy device (the identity's keys, fixed).
    pub keys: Option<SharedKeys>,
}

/// One device's command guard, kept across its sessions.
pub type SharedCommandGuard = Arc<Mutex<CommandGuard>>;

/// A guard for `device_id` if `policy` has a command policy.
pub fn command_guard_for(
    device_id: &str,
    policy: Option<&TrustPolicy>,
) -> Option<SharedCommandGuard> {
    let commands = policy?.commands()?.clone();
    Some(Arc::new(Mutex::new(CommandGuard::new(
        device_id,
        Some(commands),
        0,
    ))))
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            product_id: 0,
            firmware_version: 0,
            platform_id: 0,
            firmware_sha256: [0; 32],
            keepalive: Duration::from_secs(15),
            ping_timeout: Duration::from_secs(10),
            event_interval: None,
            event_name: "sim/telemetry".into(),
            send_public_key: true,
            handshake_step_timeout: Duration::from_secs(30),
            max_frame_len: trellis_wire::DEFAULT_MAX_FRAME_LEN,
            hello_flags: 0,
            trust_policy: None,
            version_floor: 0,
            max_image_size: ReceiverConfig::default().max_image_size,
            command_guard: None,
            keys: None,
        }
    }
}

/// Something the application did, for the simulator's reports.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    EventPublished {
        name: String,
    },
    FunctionCalled {
        name: String,
        argument: Vec<u8>,
        result: i32,
    },
    VariableRead {
        name: String,
    },
    /// The cloud asked the device to signal (`true`) or stop.
    Signaled(bool),
    /// A function call refused by the command guard; the function did not
    /// run.
    CommandRefused {
        name: String,
        reason: String,
    },
    /// A signed cloud key announcement was checked and the key stored.
    CloudKeyStored {
        version: u32,
    },
    /// A cloud key announcement was refused (answered 4.03 with `reason`).
    CloudKeyRefused {
        reason: String,
    },
    /// The device made a new key and offered it (`dk`).
    DeviceKeyOffered,
    /// The cloud registered the new key; it is used from the next
    /// handshake (`nk`).
    DeviceKeyCommitted,
    /// An update was refused; the device keeps its image. Also published as
    /// the private event `trellis/ota/rejected`, data `<reason_code>: <message>`.
    UpdateRejected {
        reason_code: String,
        message: String,
    },
    /// A signed trust policy (POST `tp`, docs/protocol.md §7.5) passed the
    /// rotation rule and is now in force for this session's updates and
    /// calls. The caller persists `signed_policy` (the exact envelope) so
    /// the device keeps it across restarts, and uses `policy` for its
    /// later sessions.
    PolicyAccepted {
        policy: TrustPolicy,
        signed_policy: Vec<u8>,
    },
    /// A signed trust policy was refused; the device keeps its policy.
    /// Also published as the private event `trellis/policy/rejected`.
    PolicyRejected {
        reason_code: String,
        message: String,
    },
}

/// Why `Session::run` returned without an error.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEnd {
    Shutdown,
    /// A firmware image arrived whole and verified (signatures, product,
    /// version, size, SHA-256) and UpdateDone was acknowledged: the caller
    /// applies it and reconnects with Hello flag bit 0 and the new SHA-256.
    UpdateApplied(ReceivedUpdate),
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out waiting for the {0}")]
    HandshakeTimeout(&'static str),
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("CoAP: {0}")]
    Coap(#[from] CoapError),
    #[error("message: {0}")]
    Message(#[from] MessageError),
    #[error("server message id: {0}")]
    Counter(#[from] CounterError),
    #[error("server closed the connection")]
    Closed,
    #[error("no answer within {0:?} of a ping")]
    PingTimeout(Duration),
}

/// The handshake step that waits for the server's nonce. A gateway sends
/// its nonce as soon as it has accepted a connection (before any RSA
/// work), so a connection on which it never comes is one nobody serves.
pub const NONCE_STEP: &str = "server nonce";

impl SessionError {
    /// The server accepted the TCP connection but sent no nonce within the
    /// step limit: a listener that does not serve (a hung process), not a
    /// busy one (a busy gateway closes the connection).
    pub fn no_nonce(&self) -> bool {
        matches!(self, Self::HandshakeTimeout(step) if *step == NONCE_STEP)
    }
}

/// How many answered CON requests are remembered for retransmissions.
const DEDUP_WINDOW: usize = 32;

/// A reply remembered for a CON request, so a retransmission is answered
/// again without running the request twice. Piggybacked ACKs keep the
/// request's id; other replies get a fresh counter id when resent, since the
/// server would refuse an old one as a replay.
#[derive(Clone)]
struct CachedReply {
    message: CoapMessage,
    keeps_id: bool,
}

/// An established, encrypted session.
pub struct Session {
    stream: TcpStream,
    cipher: SessionCipher,
    out_ids: OutgoingCounter,
    in_ids: IncomingCounter,
    server_hello_seen: bool,
    config: SessionConfig,
    answered: VecDeque<(u16, Vec<CachedReply>)>,
    ota: OtaReceiver,
    applied: Option<ReceivedUpdate>,
    /// Frames waiting for one write. While the messages of one read are
    /// handled, replies (a firmware window's ChunkReceived, say) collect
    /// here and go out in one write instead of one each.
    outbox: Vec<u8>,
    batching: bool,
    /// The cloud key this session was opened under: announcements must be
    /// signed by it.
    session_cloud_key: rsa::PublicKey,
}

async fn read_step(
    stream: &mut TcpStream,
    buf: &mut [u8],
    limit: Duration,
    what: &'static str,
) -> Result<(), SessionError> {
    match timeout(limit, stream.read_exact(buf)).await {
        Err(_) => Err(SessionError::HandshakeTimeout(what)),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(SessionError::Closed),
        Ok(r) => r.map(|_| ()).map_err(SessionError::Io),
    }
}

impl Session {
    /// Runs the handshake on a connected stream and sends Hello.
    pub async fn connect(
        mut stream: TcpStream,
        identity: &DeviceIdentity,
        config: SessionConfig,
    ) -> Result<Self, SessionError> {
        stream.set_nodelay(true)?;
        // A device with key rotation uses the keys it holds now.
        let (device_key, cloud_key, cloud_key_version) = match &config.keys {
            Some(keys) => {
                let k = keys.lock().unwrap_or_else(|p| p.into_inner());
                (
                    k.private_key.clone(),
                    k.cloud_public_key.clone(),
                    Some(k.cloud_key_version),
                )
            }
            None => (
                identity.private_key.clone(),
                identity.cloud_public_key.clone(),
                None,
            ),
        };
        let mut handshake = DeviceHandshake::new(
            identity.device_id,
            device_key,
            cloud_key.clone(),
            config.send_public_key,
        );
        let mut nonce = [0u8; NONCE_LEN];
        read_step(
            &mut stream,
            &mut nonce,
            config.handshake_step_timeout,
            NONCE_STEP,
        )
        .await?;
        let hello_bytes = {
            // ThreadRng is not Send: keep it out of any await.
            let mut rng = rand::rng();
            handshake.on_nonce(&nonce, &mut rng)?
        };
        // One write: spark-protocol decrypts only its first read.
        stream.write_all(&hello_bytes).await?;
        let mut reply = [0u8; SERVER_REPLY_LEN];
        read_step(
            &mut stream,
            &mut reply,
            config.handshake_step_timeout,
            "server reply",
        )
        .await?;
        let material = handshake.on_reply(&reply)?;

        let ota = OtaReceiver::new(ReceiverConfig {
            policy: config.trust_policy.clone(),
            product_id: u32::from(config.product_id),
            version_floor: config.version_floor.max(u32::from(config.firmware_version)),
            max_image_size: config.max_image_size,
            ..ReceiverConfig::default()
        });
        let mut session = Session {
            stream,
            cipher: SessionCipher::new(&material, config.max_frame_len),
            out_ids: OutgoingCounter::new(material.device_first_message_id()),
            in_ids: IncomingCounter::new(),
            server_hello_seen: false,
            config,
            answered: VecDeque::new(),
            ota,
            applied: None,
            outbox: Vec::new(),
            batching: false,
            session_cloud_key: cloud_key,
        };
        let hello = Hello {
            product_id: session.config.product_id,
            firmware_version: session.config.firmware_version,
            reserved: 0,
            flags: session.config.hello_flags,
            platform_id: session.config.platform_id,
            device_id: Some(identity.device_id),
            firmware_sha256: Some(session.config.firmware_sha256),
            command_policy: session.config.command_guard.as_ref().and_then(|g| {
                let g = g.lock().unwrap_or_else(|p| p.into_inner());
                Some(trellis_wire::hello::CommandPolicyReport {
                    policy_sha256: g.policy()?.digest(),
                    last_sequence: g.last_sequence(),
                })
            }),
            trust_policy: session.config.trust_policy.as_ref().map(|p| {
                trellis_wire::hello::TrustPolicyReport {
                    version: p.version(),
                    sha256: p.sha256(),
                }
            }),
            cloud_key_version,
        };
        let id = session.out_ids.next();
        session.send(&message::hello_device(id, &hello)).await?;
        Ok(session)
    }

    async fn send(&mut self, m: &CoapMessage) -> Result<(), SessionError> {
        self.cipher
            .encoder
            .try_encode_into(&m.encode(), &mut self.outbox)?;
        if self.batching {
            return Ok(());
        }
        self.flush_outbox().await
    }

    async fn flush_outbox(&mut self) -> Result<(), SessionError> {
        if !self.outbox.is_empty() {
            self.stream.write_all(&self.outbox).await?;
            self.outbox.clear();
        }
        Ok(())
    }

    /// Sends a public event now.
    pub async fn publish(&mut self, name: &str, data: &[u8]) -> Result<(), SessionError> {
        let id = self.out_ids.next();
        self.send(&message::event(id, true, name, data)).await
    }

    /// The message loop, until shutdown or an update to apply (`Ok`) or a
    /// failure (`Err`).
    pub async fn run(
        mut self,
        app: &dyn DeviceApp,
        shutdown: CancellationToken,
        mut on_event: impl FnMut(SessionEvent) + Send,
    ) -> Result<SessionEnd, SessionError> {
        // Most of a firmware window (32 chunks of 512 bytes) in one read.
        let mut buf = vec![0u8; 16 * 1024];
        let mut last_rx = Instant::now();
        let mut ping_deadline: Option<Instant> = None;
        let mut next_event = self.config.event_interval.map(|i| Instant::now() + i);
        loop {
            let keepalive_at = last_rx + self.config.keepalive;
            let far = Instant::now() + Duration::from_secs(86_400);
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
                read = self.stream.read(&mut buf) => {
                    let n = read?;
                    if n == 0 {
                        return Err(SessionError::Closed);
                    }
                    last_rx = Instant::now();
                    ping_deadline = None;
                    self.cipher.decoder.push(&buf[..n]);
                    self.batching = true;
                    let handled = self.handle_buffered(app, &mut on_event).await;
                    self.batching = false;
                    // The replies to what was handled go out even when a
                    // later message in the same read ends the session.
                    let flushed = self.flush_outbox().await;
                    let applied = handled?;
                    flushed?;
                    if let Some(update) = applied {
                        // UpdateDone is acknowledged; the connection
                        // closes as the device restarts into the image.
                        self.stream.flush().await?;
                        return Ok(SessionEnd::UpdateApplied(update));
                    }
                }
                _ = sleep_until(keepalive_at), if ping_deadline.is_none() => {
                    let id = self.out_ids.next();
                    self.send(&message::ping(id)).await?;
                    ping_deadline = Some(Instant::now() + self.config.ping_timeout);
                }
                _ = sleep_until(ping_deadline.unwrap_or(far)), if ping_deadline.is_some() => {
                    return Err(SessionError::PingTimeout(self.config.ping_timeout));
                }
                _ = sleep_until(next_event.unwrap_or(far)), if next_event.is_some() => {
                    let name = self.config.event_name.clone();
                    self.publish(&name, &app.event_data()).await?;
                    on_event(SessionEvent::EventPublished { name });
                    next_event = self.config.event_interval.map(|i| Instant::now() + i);
                }
            }
        }
    }

    /// Handles every complete message buffered, up to an applied update.
    async fn handle_buffered(
        &mut self,
        app: &dyn DeviceApp,
        on_event: &mut (impl FnMut(SessionEvent) + Send),
    ) -> Result<Option<ReceivedUpdate>, SessionError> {
        while let Some(plain) = self.cipher.decoder.next_message()? {
            let m = CoapMessage::decode(&plain)?;
            self.handle(&m, app, on_event).await?;
            if let Some(update) = self.applied.take() {
                return Ok(Some(update));
            }
        }
        Ok(None)
    }

    /// The command guard's verdict on a call (docs/protocol.md §7.4); the
    /// device's clock is the system clock, which a real device sets from
    /// the cloud's time sync.
    fn check_command(
        &mut self,
        name: &str,
        argument: &[u8],
        signed: Option<&[u8]>,
    ) -> Result<(), String> {
        let Some(guard) = &self.config.command_guard else {
            return Ok(());
        };
        let mut guard = guard.lock().unwrap_or_else(|p| p.into_inner());
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        // A signed argument is text; bytes that are not cannot match one.
        let argument = match std::str::from_utf8(argument) {
            Ok(a) => a,
            Err(_) if guard.policy().is_some_and(|p| p.protects(name)) => {
                return Err(trellis_firmware::command::CommandRefusal::WrongCall.reason());
            }
            Err(_) => return Ok(()),
        };
        guard
            .check(name, argument, signed, now_ms)
            .map_err(|r| r.reason())
    }

    /// A signed trust policy from the gateway (§7.5): the rotation rule
    /// against the policy in force; on success the new policy governs every
    /// later update and signed call (its `commands` part included).
    fn rotate_policy(&mut self, signed_policy: &[u8]) -> Result<TrustPolicy, Rejection> {
        let current = self
            .config
            .trust_policy
            .as_ref()
            .ok_or(Rejection::NoTrustPolicy)?;
        let new = verify_policy_update_bytes(current, signed_policy)?;
        self.config.trust_policy = Some(new.clone());
        self.ota.set_policy(Some(new.clone()));
        match &self.config.command_guard {
            Some(g) => g
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_policy(new.commands().cloned()),
            None if new.commands().is_some() => {
                tracing::warn!(
                    "the new trust policy has a command policy, but this device was started without a command guard; calls stay unsigned until it restarts"
                );
            }
            None => {}
        }
        Ok(new)
    }

    async fn handle(
        &mut self,
        m: &CoapMessage,
        app: &dyn DeviceApp,
        on_event: &mut (impl FnMut(SessionEvent) + Send),
    ) -> Result<(), SessionError> {
        let request = match message::classify(m)? {
            // ACKs (ping answers, EventSlowdown, ...) need nothing from us.
            Incoming::Response => return Ok(()),
            Incoming::Request(r) => r,
        };
        // A retransmitted CON (same id) is answered from the cache before
        // the counter check, which would otherwise call it a replay.
        if m.mtype == MessageType::Confirmable
            && let Some(replies) = self
                .answered
                .iter()
                .find(|(id, _)| *id == m.message_id)
                .map(|(_, r)| r.clone())
        {
            tracing::debug!(
                id = m.message_id,
                "retransmitted request answered from cache"
            );
            for r in replies {
                let mut msg = r.message;
                if !r.keeps_id {
                    msg.message_id = self.out_ids.next();
                }
                self.send(&msg).await?;
            }
            return Ok(());
        }
        if matches!(request, Request::Hello(_)) && !self.server_hello_seen {
            self.server_hello_seen = true;
            self.in_ids.start(m.message_id);
            return Ok(());
        }
        self.in_ids.check(m.message_id)?;

        let token = m.token.as_slice();
        let ack = |code: u8| CachedReply {
            message: CoapMessage::new(MessageType::Acknowledgement, code, m.message_id)
                .with_token(token),
            keeps_id: true,
        };
        let fresh = |message: CoapMessage| CachedReply {
            message,
            keeps_id: false,
        };
        let mut rejected = None;
        let mut policy_rejected: Option<Rejection> = None;
        let replies: Vec<CachedReply> = match request {
            Request::Ping => vec![CachedReply {
                message: message::ping_ack(m.message_id, token),
                keeps_id: true,
            }],
            Request::Describe => {
                vec![fresh(message::describe_reply(
                    0,
                    token,
                    &app.describe().to_json(),
                ))]
            }
            Request::FunctionCall {
                name,
                argument,
                signed,
            } => {
                let empty = CachedReply {
                    message: message::empty_ack(m.message_id),
                    keeps_id: true,
                };
                match self.check_command(&name, &argument, signed.as_deref()) {
                    Err(reason) => {
                        tracing::warn!(function = %name, %reason, "function call refused");
                        let refusal = fresh(message::function_refused(token, &reason));
                        on_event(SessionEvent::CommandRefused { name, reason });
                        vec![empty, refusal]
                    }
                    Ok(()) => match app.call(&name, &argument) {
                        Some(result) => {
                            on_event(SessionEvent::FunctionCalled {
                                name,
                                argument,
                                result,
                            });
                            vec![empty, fresh(message::function_return(0, token, result))]
                        }
                        None => vec![
                            empty,
                            fresh(
                                CoapMessage::new(MessageType::NonConfirmable, code::NOT_FOUND, 0)
                                    .with_token(token),
                            ),
                        ],
                    },
                }
            }
            Request::VariableRequest { name } => match app.read(&name) {
                Some(value) => {
                    on_event(SessionEvent::VariableRead { name });
                    vec![CachedReply {
                        message: message::variable_value(
                            m.message_id,
                            token,
                            &encode_value(&value),
                        ),
                        keeps_id: true,
                    }]
                }
                None => vec![ack(code::NOT_FOUND)],
            },
            // Subscriptions delivered to us, a second Hello: nothing to do
            // beyond acknowledging a CON.
            Request::Event { .. } | Request::Hello(_) => {
                if m.mtype == MessageType::Confirmable {
                    vec![ack(code::EMPTY)]
                } else {
                    Vec::new()
                }
            }
            Request::UpdateBegin(_) | Request::Chunk(_) | Request::UpdateDone => {
                let Some(out) = self.ota.handle(m, &request) else {
                    return Ok(());
                };
                if let Some(rejection) = &out.rejected {
                    tracing::warn!(reason = rejection.code(), %rejection, "firmware update refused; keeping the current image");
                    rejected = Some(rejection.clone());
                }
                if let Some(update) = out.completed {
                    tracing::info!(
                        version = update.manifest.version,
                        bytes = update.image.len(),
                        "firmware update verified"
                    );
                    self.applied = Some(update);
                }
                out.replies
                    .into_iter()
                    .map(|r| CachedReply {
                        message: r.message,
                        keeps_id: !r.fresh_id,
                    })
                    .collect()
            }
            Request::Signal(on) => {
                on_event(SessionEvent::Signaled(on));
                vec![ack(code::CHANGED)]
            }
            Request::TrustPolicy(signed_policy) => match self.rotate_policy(&signed_policy) {
                Ok(policy) => {
                    tracing::info!(
                        version = policy.version(),
                        sha256 = %hex::encode(policy.sha256()),
                        "trust policy rotated"
                    );
                    on_event(SessionEvent::PolicyAccepted {
                        policy,
                        signed_policy,
                    });
                    vec![CachedReply {
                        message: message::trust_policy_reply(m.message_id, token, None),
                        keeps_id: true,
                    }]
                }
                Err(r) => {
                    tracing::warn!(reason = r.code(), rejection = %r, "trust policy refused; keeping the current one");
                    let data = r.event_data();
                    let reply = message::trust_policy_reply(
                        m.message_id,
                        token,
                        Some((r.coap_code(), &data)),
                    );
                    policy_rejected = Some(r);
                    vec![CachedReply {
                        message: reply,
                        keeps_id: true,
                    }]
                }
            },
            Request::CloudKey(payload) => match &self.config.keys {
                None => vec![ack(code::METHOD_NOT_ALLOWED)],
                Some(keys) => {
                    let stored = keys
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .accept_announcement(&self.session_cloud_key, &payload);
                    match stored {
                        Ok(version) => {
                            tracing::info!(version, "cloud key announcement verified; key stored");
                            on_event(SessionEvent::CloudKeyStored { version });
                            vec![ack(code::CHANGED)]
                        }
                        Err(reason) => {
                            tracing::warn!(%reason, "cloud key announcement refused");
                            on_event(SessionEvent::CloudKeyRefused {
                                reason: reason.clone(),
                            });
                            vec![CachedReply {
                                message: message::piggybacked(
                                    m.message_id,
                                    token,
                                    code::FORBIDDEN,
                                    reason.as_bytes(),
                                ),
                                keeps_id: true,
                            }]
                        }
                    }
                }
            },
            Request::RotateDeviceKey => match &self.config.keys {
                None => vec![ack(code::METHOD_NOT_ALLOWED)],
                Some(keys) => {
                    let offer = keys
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .start_rotation();
                    let (code, payload) = match offer {
                        Ok(offer) => {
                            on_event(SessionEvent::DeviceKeyOffered);
                            (code::CHANGED, offer)
                        }
                        Err(reason) => (code::FORBIDDEN, reason.into_bytes()),
                    };
                    vec![CachedReply {
                        message: message::piggybacked(m.message_id, token, code, &payload),
                        keeps_id: true,
                    }]
                }
            },
            Request::CommitDeviceKey(key_sha256) => match &self.config.keys {
                None => vec![ack(code::METHOD_NOT_ALLOWED)],
                Some(keys) => {
                    let committed = keys
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .commit_rotation(&key_sha256);
                    match committed {
                        Ok(()) => {
                            tracing::info!(
                                "device key rotated; the new key is used from the next handshake"
                            );
                            on_event(SessionEvent::DeviceKeyCommitted);
                            vec![ack(code::CHANGED)]
                        }
                        Err(reason) => vec![CachedReply {
                            message: message::piggybacked(
                                m.message_id,
                                token,
                                code::FORBIDDEN,
                                reason.as_bytes(),
                            ),
                            keeps_id: true,
                        }],
                    }
                }
            },
            Request::Subscribe { .. } | Request::GetTime | Request::ChunkMissed(_) => {
                vec![ack(code::METHOD_NOT_ALLOWED)]
            }
        };
        for r in &replies {
            let mut msg = r.message.clone();
            if !r.keeps_id {
                msg.message_id = self.out_ids.next();
            }
            self.send(&msg).await?;
        }
        if m.mtype == MessageType::Confirmable {
            if self.answered.len() == DEDUP_WINDOW {
                self.answered.pop_front();
            }
            self.answered.push_back((m.message_id, replies));
        }
        if let Some(rejection) = policy_rejected {
            let data = rejection.event_data();
            let id = self.out_ids.next();
            self.send(&message::event(
                id,
                false,
                POLICY_REJECTED_EVENT,
                data.as_bytes(),
            ))
            .await?;
            on_event(SessionEvent::PolicyRejected {
                reason_code: rejection.code().to_owned(),
                message: rejection.to_string(),
            });
        }
        if let Some(rejection) = rejected {
            let data = rejection.event_data();
            let id = self.out_ids.next();
            self.send(&message::event(id, false, REJECTED_EVENT, data.as_bytes()))
                .await?;
            on_event(SessionEvent::UpdateRejected {
                reason_code: rejection.code().to_owned(),
                message: rejection.to_string(),
            });
        }
        Ok(())
    }
}

//! Command routing between gateways. Any gateway takes an operator's request
//! for any device; when another gateway owns the device's session, the
//! request goes into that gateway's inbox (a Redis stream) and the answer
//! comes back through the asking gateway's own inbox. One blocking reader
//! per gateway serves both directions, so routed load costs no extra Redis
//! connections.
use crate::local::LocalSessions;
use crate::ownership;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument;
use trellis_core::Shutdown;
use trellis_core::redis_conn::{self, Redis, keys};
use trellis_core::{metrics, telemetry};

/// Entries kept in a gateway's inbox stream.
const INBOX_MAX_LEN: usize = 10_000;
/// Allowance for the Redis hops of a routed command, on top of its timeout.
const ROUTE_SLACK: Duration = Duration::from_secs(2);
/// How often an asker waiting for a routed answer checks that the device's
/// session has not moved (its gateway died or drained).
const OWNER_WATCH: Duration = Duration::from_millis(500);
/// How often a retry looks for the device's next session.
const OWNER_POLL: Duration = Duration::from_millis(100);
/// A retry needs at least this much of the command's time left.
const MIN_ATTEMPT: Duration = Duration::from_millis(200);

/// How one attempt at a command ended.
enum Attempt {
    Answer(Outcome),
    /// The device's session moved while we waited for its old owner.
    OwnerChanged,
    /// Nothing came back in time.
    NoAnswer,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    CallFunction {
        name: String,
        argument: String,
        /// A signed command for the device to check (docs/protocol.md §7.4).
        signed: Option<Vec<u8>>,
    },
    GetVariable {
        name: String,
    },
    /// Signal (Particle's rainbow LED) or stop.
    Signal {
        on: bool,
    },
    /// Send a signed release to the device over its session.
    DeliverUpdate {
        release_id: String,
        rollout_id: String,
    },
    /// Ask the device to rotate its key (docs/protocol.md §6.8).
    RotateDeviceKey,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    FunctionReturn(i32),
    /// The device acknowledged a Signal.
    Signaled,
    /// The value's bytes as the device sent them, and the type it declared
    /// in Describe (empty when it declared none).
    Variable {
        raw: Vec<u8>,
        var_type: String,
    },
    /// How a firmware transfer ended (`DeliveryOutcome` as its proto number).
    Delivery {
        outcome: i32,
        reason: String,
        message: String,
        bytes_sent: u64,
    },
    /// The device's new key is registered as its next key and committed.
    KeyRotated {
        next_key_id: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The device has no live session.
    Offline,
    /// The device does not know the function or variable, or refused it.
    NotFound,
    /// The device did not answer in time.
    Timeout,
    /// The session ended (or moved) while the command was in flight.
    SessionLost,
    /// The device refused the call (signed commands); the message is the
    /// device's reason.
    Refused,
    Internal,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

pub type Outcome = Result<Output, Failure>;

/// Routes commands to the owning gateway and collects their answers.
pub struct Router {
    gateway_id: String,
    redis: Redis,
    local: Arc<LocalSessions>,
    waiting: Mutex<HashMap<String, oneshot::Sender<Outcome>>>,
}

impl Router {
    pub fn new(gateway_id: String, redis: Redis, local: Arc<LocalSessions>) -> Self {
        Self {
            gateway_id,
            redis,
            local,
            waiting: Mutex::new(HashMap::new()),
        }
    }

    /// Runs a command on a device wherever its session lives.
    #[tracing::instrument(name = "command.route", skip(self), fields(gateway = %self.gateway_id))]
    pub async fn execute(&self, device_id: &str, action: Action, timeout: Duration) -> Outcome {
        let started = std::time::Instant::now();
        let kind = match &action {
            Action::CallFunction { .. } => "function",
            Action::GetVariable { .. } => "variable",
            Action::Signal { .. } => "signal",
            Action::DeliverUpdate { .. } => "update",
            Action::RotateDeviceKey => "rotate_key",
        };
        let outcome = self.route(device_id, action, timeout).await;
        metrics::metrics().routed_command_duration.record(
            started.elapsed().as_secs_f64(),
            &[metrics::kv("kind", kind)],
        );
        outcome
    }

    /// Sends the command to whoever owns the device now, and again to the
    /// device's next session when the first one provably never delivered
    /// it (its delivery record in Redis says so, `ownership::withdraw`):
    /// a command whose gateway dies or drains before answering is retried
    /// on the device's new session or fails with a sentence saying whether
    /// it may have run; it never vanishes and never runs twice.
    async fn route(&self, device_id: &str, action: Action, timeout: Duration) -> Outcome {
        let deadline = Instant::now() + timeout + ROUTE_SLACK;
        let mut redis = self.redis.clone();
        let mut previous: Option<ownership::Owner> = None;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let owner = match &previous {
                None => ownership::current(&mut redis, device_id)
                    .await
                    .map_err(|e| Failure::new(FailureKind::Internal, format!("redis: {e}")))?
                    .ok_or_else(|| {
                        Failure::new(
                            FailureKind::Offline,
                            format!("device {device_id} is offline"),
                        )
                    })?,
                Some(prev) => self.next_owner(device_id, prev, deadline).await?,
            };
            let remote = owner.gateway_id != self.gateway_id;
            let slack = if remote { ROUTE_SLACK } else { Duration::ZERO };
            let budget = deadline
                .saturating_duration_since(Instant::now())
                .saturating_sub(slack);
            if budget < MIN_ATTEMPT {
                return Err(Failure::new(
                    FailureKind::Timeout,
                    format!(
                        "device {device_id}'s session moved to {} too late to retry within {} ms; the command was not delivered",
                        owner.gateway_id,
                        timeout.as_millis()
                    ),
                ));
            }
            let request_id = hex::encode(rand::random::<[u8; 12]>());
            let span = tracing::info_span!(
                "command.attempt",
                attempt,
                request = %request_id,
                owner = %owner.gateway_id,
                epoch = owner.epoch,
                result = tracing::field::Empty,
            );
            let result = if remote {
                self.remote(device_id, &owner, &request_id, &action, budget)
                    .instrument(span.clone())
                    .await
            } else {
                Attempt::Answer(
                    self.local
                        .execute(
                            device_id,
                            owner.epoch,
                            Some(&request_id),
                            action.clone(),
                            budget,
                        )
                        .instrument(span.clone())
                        .await,
                )
            };
            let lost = match result {
                Attempt::Answer(Ok(output)) => {
                    span.record("result", "answered");
                    return Ok(output);
                }
                Attempt::Answer(Err(f))
                    if matches!(f.kind, FailureKind::SessionLost | FailureKind::Offline) =>
                {
                    f.message
                }
                Attempt::Answer(Err(f)) => {
                    span.record("result", "failed");
                    return Err(f);
                }
                Attempt::OwnerChanged => format!(
                    "device {device_id} left gateway {} (epoch {}) while the command was in flight",
                    owner.gateway_id, owner.epoch
                ),
                Attempt::NoAnswer => {
                    span.record("result", "no_answer");
                    return Err(match ownership::withdraw(&mut redis, &request_id).await {
                        Ok(None) => Failure::new(
                            FailureKind::Timeout,
                            format!(
                                "gateway {} did not take the command for device {device_id} within {} ms; it was not delivered",
                                owner.gateway_id,
                                timeout.as_millis()
                            ),
                        ),
                        Ok(Some(_)) | Err(_) => Failure::new(
                            FailureKind::Timeout,
                            format!(
                                "device {device_id} did not answer within {} ms (through gateway {})",
                                timeout.as_millis(),
                                owner.gateway_id
                            ),
                        ),
                    });
                }
            };
            // The attempt's session is gone. Send it again only if it never
            // reached the device; otherwise say so rather than run it twice.
            match ownership::withdraw(&mut redis, &request_id).await {
                Ok(None) => {
                    span.record("result", "retry");
                    tracing::info!(device = %device_id, attempt, reason = %lost, "command not delivered; retrying on the device's next session");
                    previous = Some(owner);
                }
                Ok(Some(record)) => {
                    span.record("result", "lost_after_delivery");
                    return Err(Failure::new(
                        FailureKind::SessionLost,
                        format!(
                            "the command reached device {device_id} ({record}) but its session ended before the device answered ({lost}); not retried, because it may have run"
                        ),
                    ));
                }
                Err(e) => {
                    span.record("result", "unknown");
                    return Err(Failure::new(
                        FailureKind::Internal,
                        format!(
                            "{lost}; whether the command reached device {device_id} is unknown (redis: {e}); not retried"
                        ),
                    ));
                }
            }
        }
    }

    /// Waits until the device is owned by a session other than `prev`
    /// (its reconnect, anywhere), or fails when it does not come back in time.
    async fn next_owner(
        &self,
        device_id: &str,
        prev: &ownership::Owner,
        deadline: Instant,
    ) -> Result<ownership::Owner, Failure> {
        let mut redis = self.redis.clone();
        loop {
            match ownership::current(&mut redis, device_id).await {
                Ok(Some(o)) if o.gateway_id != prev.gateway_id || o.epoch != prev.epoch => {
                    return Ok(o);
                }
                // The same session, registered here since: the attempt came
                // between its claim in Redis and its registration in this
                // gateway (lib.rs, `connection`: the clone check runs in
                // between), and found no session yet.
                Ok(Some(o))
                    if o.gateway_id == self.gateway_id && self.local.holds(device_id, o.epoch) =>
                {
                    return Ok(o);
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(Failure::new(
                        FailureKind::Internal,
                        format!("redis: {e} (the command was not delivered)"),
                    ));
                }
            }
            if Instant::now() + OWNER_POLL >= deadline {
                return Err(Failure::new(
                    FailureKind::SessionLost,
                    format!(
                        "device {device_id}'s session on gateway {} ended before the command was delivered, and the device did not reconnect in time; the command was not delivered",
                        prev.gateway_id
                    ),
                ));
            }
            tokio::time::sleep(OWNER_POLL).await;
        }
    }

    /// One attempt through another gateway's inbox.
    async fn remote(
        &self,
        device_id: &str,
        owner: &ownership::Owner,
        request_id: &str,
        action: &Action,
        timeout: Duration,
    ) -> Attempt {
        let mut redis = self.redis.clone();
        tracing::debug!(owner = %owner.gateway_id, epoch = owner.epoch, "routing to owner");
        let (tx, mut rx) = oneshot::channel();
        self.lock_waiting().insert(request_id.to_string(), tx);
        let mut fields = vec![
            ("kind", "command".to_string()),
            ("request", request_id.to_string()),
            ("device", device_id.to_string()),
            ("epoch", owner.epoch.to_string()),
            ("reply_to", self.gateway_id.clone()),
            ("timeout_ms", timeout.as_millis().to_string()),
        ];
        // The owner continues this trace: W3C trace context rides in the entry.
        let context = telemetry::inject_fields();
        for (k, v) in &context {
            match k.as_str() {
                "traceparent" => fields.push(("traceparent", v.clone())),
                "tracestate" => fields.push(("tracestate", v.clone())),
                _ => {}
            }
        }
        let publish = tracing::info_span!(
            "redis.publish",
            otel.kind = "producer",
            messaging.system = "redis",
            messaging.operation.type = "send",
            messaging.destination.name = %keys::gateway_commands(&owner.gateway_id),
        );
        match action {
            Action::CallFunction {
                name,
                argument,
                signed,
            } => {
                fields.push(("action", "call".into()));
                fields.push(("name", name.clone()));
                fields.push(("argument", argument.clone()));
                if let Some(signed) = signed {
                    fields.push(("signed", hex::encode(signed)));
                }
            }
            Action::GetVariable { name } => {
                fields.push(("action", "get".into()));
                fields.push(("name", name.clone()));
            }
            Action::Signal { on } => {
                fields.push(("action", "signal".into()));
                fields.push(("name", if *on { "1" } else { "0" }.into()));
            }
            Action::DeliverUpdate {
                release_id,
                rollout_id,
            } => {
                fields.push(("action", "deliver".into()));
                fields.push(("name", release_id.clone()));
                fields.push(("argument", rollout_id.clone()));
            }
            Action::RotateDeviceKey => {
                fields.push(("action", "rotate_key".into()));
            }
        }
        if let Err(e) = xadd(
            &mut redis,
            &keys::gateway_commands(&owner.gateway_id),
            &fields,
        )
        .instrument(publish)
        .await
        {
            metrics::metrics()
                .redis_errors
                .add(1, &[metrics::kv("service", "gateway")]);
            self.lock_waiting().remove(request_id);
            return Attempt::Answer(Err(Failure::new(
                FailureKind::Internal,
                format!("redis: {e}"),
            )));
        }
        // The owner enforces `timeout` towards the device; allow for the
        // Redis hops on top. Meanwhile, watch the device's ownership: when
        // its session moves (its gateway died or drained and the device
        // reconnected elsewhere), no answer will come from the old owner.
        let give_up = tokio::time::sleep(timeout + ROUTE_SLACK);
        tokio::pin!(give_up);
        let mut watch = tokio::time::interval_at(Instant::now() + OWNER_WATCH, OWNER_WATCH);
        let result = loop {
            tokio::select! {
                reply = &mut rx => break match reply {
                    Ok(outcome) => Attempt::Answer(outcome),
                    Err(_) => Attempt::Answer(Err(Failure::new(
                        FailureKind::Internal,
                        "router dropped the request",
                    ))),
                },
                _ = &mut give_up => break Attempt::NoAnswer,
                _ = watch.tick() => {
                    match ownership::current(&mut redis, device_id).await {
                        Ok(Some(o)) if o.gateway_id == owner.gateway_id && o.epoch == owner.epoch => {}
                        Ok(_) => break Attempt::OwnerChanged,
                        // Redis away: keep waiting for the answer.
                        Err(_) => {}
                    }
                }
            }
        };
        self.lock_waiting().remove(request_id);
        result
    }

    /// Asks the gateway holding `epoch` of a device to close that session.
    pub async fn close_remote(&self, gateway_id: &str, device_id: &str, epoch: u64, reason: &str) {
        let mut redis = self.redis.clone();
        let fields = [
            ("kind", "close".to_string()),
            ("device", device_id.to_string()),
            ("epoch", epoch.to_string()),
            ("reason", reason.to_string()),
        ];
        if let Err(e) = xadd(&mut redis, &keys::gateway_commands(gateway_id), &fields).await {
            tracing::warn!(%gateway_id, %device_id, error = %e, "could not ask the old owner to close its session");
        }
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Outcome>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads this gateway's inbox until `shutdown` (which, in a drain, the
    /// gateway triggers only after its sessions have closed): commands for
    /// its devices, answers to its routed requests, and close requests.
    /// Whatever is still in the inbox then is answered by `final_sweep`.
    pub async fn run_inbox(self: Arc<Self>, redis_url: String, mut shutdown: Shutdown) {
        let inbox = keys::gateway_commands(&self.gateway_id);
        // An explicit position (not `$`), so the last read of a drain knows
        // where to resume even if nothing was read before it.
        let mut last_id = self.inbox_tail(&inbox).await;
        let mut conn: Option<redis::aio::MultiplexedConnection> = None;
        loop {
            if shutdown.is_triggered() {
                self.final_sweep(&inbox, &last_id).await;
                return;
            }
            let c = match &mut conn {
                Some(c) => c,
                None => match redis_conn::connect_blocking(&redis_url).await {
                    Ok(c) => conn.insert(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "inbox: redis unavailable, retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {},
                            _ = shutdown.wait() => {
                                self.final_sweep(&inbox, &last_id).await;
                                return;
                            }
                        }
                        continue;
                    }
                },
            };
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT")
                .arg(256)
                .arg("BLOCK")
                .arg(redis_conn::BLOCKING_READ_MS)
                .arg("STREAMS")
                .arg(&inbox)
                .arg(&last_id);
            let read = cmd.query_async::<Option<redis::streams::StreamReadReply>>(c);
            let reply = tokio::select! {
                r = read => r,
                _ = shutdown.wait() => {
                    self.final_sweep(&inbox, &last_id).await;
                    return;
                }
            };
            match reply {
                Ok(Some(reply)) => {
                    for key in reply.keys {
                        for entry in key.ids {
                            last_id = entry.id.clone();
                            self.dispatch(InboxEntry::from_stream(&entry));
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "inbox: read failed, reconnecting");
                    metrics::metrics()
                        .redis_reconnects
                        .add(1, &[metrics::kv("service", "gateway")]);
                    conn = None;
                }
            }
        }
    }

    /// The id of the newest entry already in the inbox (older ones are not
    /// ours: a previous process with this id had them); `0-0` when empty.
    async fn inbox_tail(&self, inbox: &str) -> String {
        let mut redis = self.redis.clone();
        let newest: redis::RedisResult<redis::streams::StreamRangeReply> = redis::cmd("XREVRANGE")
            .arg(inbox)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut redis)
            .await;
        match newest {
            Ok(r) => r
                .ids
                .first()
                .map(|e| e.id.clone())
                .unwrap_or_else(|| "0-0".to_string()),
            Err(e) => {
                tracing::warn!(error = %e, "inbox: cannot read its tail; starting from new entries");
                "$".to_string()
            }
        }
    }

    /// The last read of the inbox when the gateway stops: answers still
    /// waiting here go to their callers, and commands that arrived too late
    /// are answered "not delivered" (they never reached a device, so their
    /// askers retry them on the device's new session) instead of vanishing.
    async fn final_sweep(self: &Arc<Self>, inbox: &str, last_id: &str) {
        let span = tracing::info_span!("gateway.inbox_sweep", gateway = %self.gateway_id, commands = tracing::field::Empty, replies = tracing::field::Empty);
        let mut redis = self.redis.clone();
        let mut last_id = last_id.to_string();
        if last_id == "$" {
            // Position unknown (Redis was away at start): nothing to resume from.
            return;
        }
        let (mut commands, mut replies) = (0u32, 0u32);
        for _ in 0..64 {
            let read: redis::RedisResult<Option<redis::streams::StreamReadReply>> =
                redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(256)
                    .arg("STREAMS")
                    .arg(inbox)
                    .arg(&last_id)
                    .query_async(&mut redis)
                    .instrument(span.clone())
                    .await;
            let entries: Vec<redis::streams::StreamId> = match read {
                Ok(Some(reply)) => reply.keys.into_iter().flat_map(|k| k.ids).collect(),
                Ok(None) => Vec::new(),
                Err(e) => {
                    span.in_scope(|| tracing::warn!(error = %e, "inbox: last read failed; senders fall back on their timeouts"));
                    break;
                }
            };
            if entries.is_empty() {
                break;
            }
            for entry in entries {
                last_id = entry.id.clone();
                match InboxEntry::from_stream(&entry) {
                    InboxEntry::Command {
                        request,
                        device,
                        reply_to,
                        ..
                    } => {
                        commands += 1;
                        let failure = Failure::new(
                            FailureKind::SessionLost,
                            format!(
                                "gateway {} stopped before delivering the command to device {device}; it was not delivered",
                                self.gateway_id
                            ),
                        );
                        self.send_reply(&reply_to, &request, Err(failure))
                            .instrument(span.clone())
                            .await;
                    }
                    other => {
                        if matches!(other, InboxEntry::Reply { .. }) {
                            replies += 1;
                        }
                        self.dispatch(other);
                    }
                }
            }
        }
        span.record("commands", commands);
        span.record("replies", replies);
        span.in_scope(|| tracing::info!(commands, replies, "inbox: stopped reading"));
    }

    fn dispatch(self: &Arc<Self>, entry: InboxEntry) {
        match entry {
            InboxEntry::Command {
                request,
                device,
                epoch,
                reply_to,
                action,
                timeout,
                trace,
            } => {
                let router = Arc::clone(self);
                let span = tracing::info_span!(
                    "command.deliver",
                    otel.kind = "consumer",
                    messaging.system = "redis",
                    messaging.operation.type = "process",
                    messaging.destination.name = %keys::gateway_commands(&self.gateway_id),
                    gateway = %self.gateway_id,
                    %device,
                );
                telemetry::extract_fields(&span, &trace);
                // Handed to the session here, in inbox order (a Close read
                // after this command must not overtake it); only the wait
                // for the device's answer runs apart.
                let submitted = span.in_scope(|| {
                    router
                        .local
                        .submit(&device, epoch, Some(&request), action, timeout)
                });
                tokio::spawn(
                    async move {
                        let outcome = match submitted {
                            Ok(s) => s.answer().await,
                            Err(failure) => Err(failure),
                        };
                        router.send_reply(&reply_to, &request, outcome).await;
                    }
                    .instrument(span),
                );
            }
            InboxEntry::Reply { request, outcome } => {
                if let Some(tx) = self.lock_waiting().remove(&request) {
                    let _ = tx.send(outcome);
                }
            }
            InboxEntry::Close {
                device,
                epoch,
                reason,
            } => self.local.close(&device, epoch, &reason),
            InboxEntry::Malformed(why) => tracing::warn!(%why, "inbox: malformed entry skipped"),
        }
    }

    async fn send_reply(&self, reply_to: &str, request: &str, outcome: Outcome) {
        let mut fields = vec![
            ("kind", "reply".to_string()),
            ("request", request.to_string()),
        ];
        match outcome {
            Ok(Output::FunctionReturn(v)) => {
                fields.push(("result", "function".into()));
                fields.push(("value", v.to_string()));
            }
            Ok(Output::Signaled) => {
                fields.push(("result", "signaled".into()));
            }
            Ok(Output::KeyRotated { next_key_id }) => {
                fields.push(("result", "key_rotated".into()));
                fields.push(("value", next_key_id));
            }
            Ok(Output::Variable { raw, var_type }) => {
                fields.push(("result", "variable".into()));
                fields.push(("raw", hex::encode(raw)));
                fields.push(("type", var_type));
            }
            Ok(Output::Delivery {
                outcome,
                reason,
                message,
                bytes_sent,
            }) => {
                fields.push(("result", "delivery".into()));
                fields.push(("value", outcome.to_string()));
                fields.push(("reason", reason));
                fields.push(("message", message));
                fields.push(("bytes", bytes_sent.to_string()));
            }
            Err(f) => {
                fields.push(("result", "failure".into()));
                fields.push(("failure", failure_kind_name(f.kind).into()));
                fields.push(("message", f.message));
            }
        }
        let mut redis = self.redis.clone();
        if let Err(e) = xadd(&mut redis, &keys::gateway_commands(reply_to), &fields).await {
            tracing::warn!(%reply_to, error = %e, "could not return a routed command's answer");
        }
    }
}

async fn xadd(
    redis: &mut Redis,
    stream: &str,
    fields: &[(&str, String)],
) -> redis::RedisResult<String> {
    redis::cmd("XADD")
        .arg(stream)
        .arg("MAXLEN")
        .arg("~")
        .arg(INBOX_MAX_LEN)
        .arg("*")
        .arg(fields)
        .query_async(redis)
        .await
}

fn failure_kind_name(kind: FailureKind) -> &'static str {
    match kind {
        FailureKind::Offline => "offline",
        FailureKind::NotFound => "not_found",
        FailureKind::Timeout => "timeout",
        FailureKind::SessionLost => "session_lost",
        FailureKind::Refused => "refused",
        FailureKind::Internal => "internal",
    }
}

fn failure_kind_from(name: &str) -> FailureKind {
    match name {
        "offline" => FailureKind::Offline,
        "not_found" => FailureKind::NotFound,
        "timeout" => FailureKind::Timeout,
        "session_lost" => FailureKind::SessionLost,
        "refused" => FailureKind::Refused,
        _ => FailureKind::Internal,
    }
}

#[derive(Debug, PartialEq)]
enum InboxEntry {
    Command {
        request: String,
        device: String,
        epoch: u64,
        reply_to: String,
        action: Action,
        timeout: Duration,
        /// W3C trace context of the request, if it carried one.
        trace: HashMap<String, String>,
    },
    Reply {
        request: String,
        outcome: Outcome,
    },
    Close {
        device: String,
        epoch: u64,
        reason: String,
    },
    Malformed(String),
}

impl InboxEntry {
    fn from_stream(entry: &redis::streams::StreamId) -> Self {
        let get = |k: &str| -> Option<String> { entry.get::<String>(k) };
        let parse = || -> Result<Self, String> {
            let need = |k: &str| get(k).ok_or_else(|| format!("entry {} has no {k}", entry.id));
            match need("kind")?.as_str() {
                "command" => {
                    let action = match need("action")?.as_str() {
                        "call" => Action::CallFunction {
                            name: need("name")?,
                            argument: get("argument").unwrap_or_default(),
                            signed: match get("signed") {
                                None => None,
                                Some(h) => Some(hex::decode(h).map_err(|_| "bad signed command")?),
                            },
                        },
                        "get" => Action::GetVariable {
                            name: need("name")?,
                        },
                        "signal" => Action::Signal {
                            on: need("name")? == "1",
                        },
                        "deliver" => Action::DeliverUpdate {
                            release_id: need("name")?,
                            rollout_id: get("argument").unwrap_or_default(),
                        },
                        "rotate_key" => Action::RotateDeviceKey,
                        other => return Err(format!("unknown action {other}")),
                    };
                    Ok(Self::Command {
                        request: need("request")?,
                        device: need("device")?,
                        epoch: need("epoch")?.parse().map_err(|_| "bad epoch")?,
                        reply_to: need("reply_to")?,
                        action,
                        timeout: Duration::from_millis(
                            get("timeout_ms")
                                .and_then(|t| t.parse().ok())
                                .unwrap_or(10_000),
                        ),
                        trace: ["traceparent", "tracestate"]
                            .iter()
                            .filter_map(|k| get(k).map(|v| (k.to_string(), v)))
                            .collect(),
                    })
                }
                "reply" => {
                    let outcome = match need("result")?.as_str() {
                        "function" => Ok(Output::FunctionReturn(
                            need("value")?.parse().map_err(|_| "bad function value")?,
                        )),
                        "signaled" => Ok(Output::Signaled),
                        "key_rotated" => Ok(Output::KeyRotated {
                            next_key_id: need("value")?,
                        }),
                        "delivery" => Ok(Output::Delivery {
                            outcome: need("value")?.parse().map_err(|_| "bad delivery outcome")?,
                            reason: get("reason").unwrap_or_default(),
                            message: get("message").unwrap_or_default(),
                            bytes_sent: get("bytes").and_then(|b| b.parse().ok()).unwrap_or(0),
                        }),
                        "variable" => Ok(Output::Variable {
                            raw: hex::decode(need("raw")?).map_err(|_| "bad variable bytes")?,
                            var_type: get("type").unwrap_or_default(),
                        }),
                        _ => Err(Failure::new(
                            failure_kind_from(&get("failure").unwrap_or_default()),
                            get("message").unwrap_or_default(),
                        )),
                    };
                    Ok(Self::Reply {
                        request: need("request")?,
                        outcome,
                    })
                }
                "close" => Ok(Self::Close {
                    device: need("device")?,
                    epoch: need("epoch")?.parse().map_err(|_| "bad epoch")?,
                    reason: get("reason").unwrap_or_default(),
                }),
                other => Err(format!("unknown kind {other}")),
            }
        };
        parse().unwrap_or_else(Self::Malformed)
    }
}

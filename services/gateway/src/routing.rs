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
use tracing::Instrument;
use trellis_core::Shutdown;
use trellis_core::redis_conn::{self, Redis, keys};
use trellis_core::{metrics, telemetry};

/// Entries kept in a gateway's inbox stream.
const INBOX_MAX_LEN: usize = 10_000;

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    CallFunction {
        name: String,
        argument: String,
    },
    GetVariable {
        name: String,
    },
    /// Send a signed release to the device over its session.
    DeliverUpdate {
        release_id: String,
        rollout_id: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    FunctionReturn(i32),
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
            Action::DeliverUpdate { .. } => "update",
        };
        let outcome = self.route(device_id, action, timeout).await;
        metrics::metrics().routed_command_duration.record(
            started.elapsed().as_secs_f64(),
            &[metrics::kv("kind", kind)],
        );
        outcome
    }

    async fn route(&self, device_id: &str, action: Action, timeout: Duration) -> Outcome {
        let mut redis = self.redis.clone();
        let owner = ownership::current(&mut redis, device_id)
            .await
            .map_err(|e| Failure::new(FailureKind::Internal, format!("redis: {e}")))?
            .ok_or_else(|| {
                Failure::new(
                    FailureKind::Offline,
                    format!("device {device_id} is offline"),
                )
            })?;
        if owner.gateway_id == self.gateway_id {
            return self
                .local
                .execute(device_id, owner.epoch, action, timeout)
                .await;
        }
        tracing::debug!(owner = %owner.gateway_id, epoch = owner.epoch, "routing to owner");
        let request_id = hex::encode(rand::random::<[u8; 12]>());
        let (tx, rx) = oneshot::channel();
        self.lock_waiting().insert(request_id.clone(), tx);
        let mut fields = vec![
            ("kind", "command".to_string()),
            ("request", request_id.clone()),
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
        match &action {
            Action::CallFunction { name, argument } => {
                fields.push(("action", "call".into()));
                fields.push(("name", name.clone()));
                fields.push(("argument", argument.clone()));
            }
            Action::GetVariable { name } => {
                fields.push(("action", "get".into()));
                fields.push(("name", name.clone()));
            }
            Action::DeliverUpdate {
                release_id,
                rollout_id,
            } => {
                fields.push(("action", "deliver".into()));
                fields.push(("name", release_id.clone()));
                fields.push(("argument", rollout_id.clone()));
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
            self.lock_waiting().remove(&request_id);
            return Err(Failure::new(FailureKind::Internal, format!("redis: {e}")));
        }
        // The owner enforces `timeout` towards the device; allow for the
        // Redis hops on top before giving up here.
        let outcome = tokio::time::timeout(timeout + Duration::from_secs(2), rx).await;
        self.lock_waiting().remove(&request_id);
        match outcome {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(Failure::new(
                FailureKind::Internal,
                "router dropped the request",
            )),
            Err(_) => Err(Failure::new(
                FailureKind::Timeout,
                format!(
                    "gateway {} did not answer for device {device_id} within {} ms",
                    owner.gateway_id,
                    timeout.as_millis()
                ),
            )),
        }
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

    /// Reads this gateway's inbox until shutdown: commands for its devices,
    /// answers to its routed requests, and close requests.
    pub async fn run_inbox(self: Arc<Self>, redis_url: String, mut shutdown: Shutdown) {
        let inbox = keys::gateway_commands(&self.gateway_id);
        let mut last_id = "$".to_string();
        let mut conn: Option<redis::aio::MultiplexedConnection> = None;
        loop {
            if shutdown.is_triggered() {
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
                            _ = shutdown.wait() => return,
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
                _ = shutdown.wait() => return,
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
                tokio::spawn(
                    async move {
                        let outcome = router.local.execute(&device, epoch, action, timeout).await;
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
        FailureKind::Internal => "internal",
    }
}

fn failure_kind_from(name: &str) -> FailureKind {
    match name {
        "offline" => FailureKind::Offline,
        "not_found" => FailureKind::NotFound,
        "timeout" => FailureKind::Timeout,
        "session_lost" => FailureKind::SessionLost,
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
                        },
                        "get" => Action::GetVariable {
                            name: need("name")?,
                        },
                        "deliver" => Action::DeliverUpdate {
                            release_id: need("name")?,
                            rollout_id: get("argument").unwrap_or_default(),
                        },
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

//! The operator's `DeviceService`, served by every gateway for every device.
use crate::routing::{Action, Failure, FailureKind, Output};
use crate::{Gateway, device_state, ownership};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use trellis_auth::Principal;
use trellis_core::redis_conn::{self, keys};
use trellis_proto::v1::device_service_server::DeviceService;
use trellis_proto::v1::variable_value::Value;
use trellis_proto::v1::*;
use trellis_wire::DeviceId;

pub struct DeviceApi {
    gw: Arc<Gateway>,
    orgs: Arc<OrgCache>,
}

/// Which organisation each device belongs to, as keyvault's registry says
/// (fixed at registration), remembered for a minute so a routed call or an
/// event costs no registry read.
#[derive(Default)]
struct OrgCache(std::sync::Mutex<HashMap<String, (Option<String>, std::time::Instant)>>);

const ORG_CACHE_FOR: Duration = Duration::from_secs(60);

impl OrgCache {
    /// The device's organisation; `None` when it is not registered.
    async fn org_of(&self, gw: &Gateway, device_id: &str) -> Result<Option<String>, Status> {
        {
            let cache = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((org, at)) = cache.get(device_id)
                && at.elapsed() < ORG_CACHE_FOR
            {
                return Ok(org.clone());
            }
        }
        let mut keyvault = gw.keyvault.clone();
        let org = match keyvault
            .get_device(GetDeviceRequest {
                device_id: device_id.to_string(),
            })
            .await
        {
            Ok(d) => Some(d.into_inner().organization),
            Err(s) if s.code() == tonic::Code::NotFound => None,
            Err(s) => return Err(s),
        };
        let mut cache = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > 100_000 {
            cache.retain(|_, (_, at)| at.elapsed() < ORG_CACHE_FOR);
        }
        cache.insert(
            device_id.to_string(),
            (org.clone(), std::time::Instant::now()),
        );
        Ok(org)
    }

    /// `Ok` when `principal` may see the device; otherwise NOT_FOUND with
    /// keyvault's words for a device that is not registered, so another
    /// organisation's device cannot be told apart from none.
    async fn check(
        &self,
        gw: &Gateway,
        principal: &Principal,
        device_id: &str,
    ) -> Result<(), Status> {
        if principal.is_service() {
            return Ok(());
        }
        match self.org_of(gw, device_id).await? {
            Some(org) if principal.sees(&org) => Ok(()),
            _ => Err(not_registered(device_id)),
        }
    }
}

fn not_registered(device_id: &str) -> Status {
    Status::not_found(format!("device {device_id} is not registered"))
}

impl DeviceApi {
    pub fn new(gw: Arc<Gateway>) -> Self {
        Self {
            gw,
            orgs: Arc::default(),
        }
    }

    fn timeout(&self, requested_ms: u32) -> Duration {
        let ms = if requested_ms == 0 {
            self.gw.config.command_timeout_ms
        } else {
            u64::from(requested_ms).min(120_000)
        };
        Duration::from_millis(ms)
    }

    async fn state_of(
        &self,
        device: Option<&Device>,
        device_id: &str,
    ) -> Result<DeviceState, Status> {
        let mut redis = self.gw.redis.clone();
        let state = device_state::load(&mut redis, device_id)
            .await
            .map_err(redis_status)?;
        let owner = ownership::current(&mut redis, device_id)
            .await
            .map_err(redis_status)?;
        Ok(build_state(device, device_id, &state, owner.as_ref()))
    }
}

fn redis_status(e: redis::RedisError) -> Status {
    Status::unavailable(format!("redis unavailable: {e}"))
}

fn parse_device_id(id: &str) -> Result<String, Status> {
    id.parse::<DeviceId>()
        .map(|d| d.to_string())
        .map_err(|e| Status::invalid_argument(format!("device id {id:?}: {e}")))
}

fn failure_status(f: Failure) -> Status {
    match f.kind {
        FailureKind::Offline => Status::unavailable(f.message),
        FailureKind::NotFound => Status::not_found(f.message),
        FailureKind::Timeout => Status::deadline_exceeded(f.message),
        FailureKind::SessionLost => Status::unavailable(f.message),
        FailureKind::Refused => Status::permission_denied(format!("device refused: {}", f.message)),
        FailureKind::Internal => Status::internal(f.message),
    }
}

fn build_state(
    device: Option<&Device>,
    device_id: &str,
    state: &HashMap<String, String>,
    owner: Option<&ownership::Owner>,
) -> DeviceState {
    let get = |k: &str| state.get(k).cloned().unwrap_or_default();
    let num = |k: &str| {
        state
            .get(k)
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0)
    };
    DeviceState {
        device_id: device_id.to_string(),
        product_id: device
            .map(|d| d.product_id)
            .unwrap_or_else(|| u32::try_from(num("product")).unwrap_or(0)),
        online: owner.is_some(),
        gateway_id: owner.map(|o| o.gateway_id.clone()).unwrap_or_default(),
        epoch: owner.map(|o| o.epoch).unwrap_or(0),
        firmware_version: u32::try_from(num("firmware_version")).unwrap_or(0),
        firmware_sha256: get("firmware_sha256"),
        platform_id: u32::try_from(num("platform")).unwrap_or(0),
        peer_addr: owner
            .map(|o| o.peer_addr.clone())
            .unwrap_or_else(|| get("peer")),
        connected_at_ms: owner
            .map(|o| o.since_ms)
            .unwrap_or_else(|| num("connected_at")),
        last_seen_ms: num("last_seen"),
        revoked: device.is_some_and(|d| d.revoked),
        functions: serde_json::from_str(&get("functions")).unwrap_or_default(),
        variables: serde_json::from_str(&get("variables")).unwrap_or_default(),
        // Filled in by GetDeviceState only (crate::clones::fill_state).
        recent_sessions: Vec::new(),
        clone_flags: Vec::new(),
        quarantined_until_ms: 0,
        name: device.map(|d| d.name.clone()).unwrap_or_default(),
        region: get("region"),
        command_policy_sha256: get("command_policy"),
        command_sequence: state
            .get("command_sequence")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        trust_policy_version: state
            .get("trust_policy_version")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        trust_policy_sha256: get("trust_policy_sha256"),
    }
}

fn decode_value(raw: &[u8], var_type: &str) -> Option<Value> {
    match var_type {
        "bool" => raw.first().map(|b| Value::BoolValue(*b != 0)),
        "int32" => <[u8; 4]>::try_from(raw)
            .ok()
            .map(|b| Value::IntValue(i32::from_be_bytes(b))),
        // Doubles are the one little-endian value on the wire (PROTOCOL.md).
        "double" => <[u8; 8]>::try_from(raw)
            .ok()
            .map(|b| Value::DoubleValue(f64::from_le_bytes(b))),
        "string" => Some(Value::StringValue(
            String::from_utf8_lossy(raw).into_owned(),
        )),
        _ => None,
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<DeviceEvent, Status>> + Send>>;

#[tonic::async_trait]
impl DeviceService for DeviceApi {
    #[tracing::instrument(name = "rpc.list_devices", skip_all)]
    async fn list_devices(
        &self,
        request: Request<ListDeviceStatesRequest>,
    ) -> Result<Response<ListDeviceStatesResponse>, Status> {
        let principal = Principal::of(&request)?;
        let req = request.into_inner();
        let mut keyvault = self.gw.keyvault.clone();
        let registry = keyvault
            .list_devices(ListDevicesRequest {
                product_id: req.product_id,
            })
            .await?
            .into_inner();
        let mut devices = Vec::with_capacity(registry.devices.len());
        for d in registry
            .devices
            .iter()
            .filter(|d| principal.sees(&d.organization))
        {
            let state = self.state_of(Some(d), &d.device_id).await?;
            if req.online_only && !state.online {
                continue;
            }
            devices.push(state);
        }
        Ok(Response::new(ListDeviceStatesResponse { devices }))
    }

    #[tracing::instrument(name = "rpc.get_device_state", skip_all)]
    async fn get_device_state(
        &self,
        request: Request<GetDeviceStateRequest>,
    ) -> Result<Response<DeviceState>, Status> {
        let principal = Principal::of(&request)?;
        let id = parse_device_id(&request.into_inner().device_id)?;
        let mut keyvault = self.gw.keyvault.clone();
        let device = keyvault
            .get_device(GetDeviceRequest {
                device_id: id.clone(),
            })
            .await?
            .into_inner();
        if !principal.sees(&device.organization) {
            return Err(not_registered(&id));
        }
        let mut state = self.state_of(Some(&device), &id).await?;
        // History, flags and quarantine are durable records (clones.rs).
        let mut redis = self.gw.durable.clone();
        crate::clones::fill_state(&mut redis, &mut state, self.gw.config.session_history_len)
            .await
            .map_err(redis_status)?;
        Ok(Response::new(state))
    }

    #[tracing::instrument(name = "rpc.call_function", skip_all, fields(device, function))]
    async fn call_function(
        &self,
        request: Request<CallFunctionRequest>,
    ) -> Result<Response<CallFunctionResponse>, Status> {
        let principal = Principal::of(&request)?;
        let req = request.into_inner();
        let id = parse_device_id(&req.device_id)?;
        tracing::Span::current().record("device", id.as_str());
        tracing::Span::current().record("function", req.function.as_str());
        self.orgs.check(&self.gw, &principal, &id).await?;
        if req.function.is_empty() || req.function.len() > 64 {
            return Err(Status::invalid_argument(
                "function name must be 1 to 64 bytes",
            ));
        }
        if req.argument.len() > 622 {
            return Err(Status::invalid_argument(
                "function argument is limited to 622 bytes",
            ));
        }
        let signed = (!req.signed_command.is_empty()).then_some(req.signed_command);
        let sequence = match &signed {
            Some(bytes) => Some(crate::commands::sequence_of(bytes)?),
            None => None,
        };
        let function = req.function.clone();
        let action = Action::CallFunction {
            name: req.function,
            argument: req.argument,
            signed,
        };
        let outcome = self
            .gw
            .router
            .execute(&id, action, self.timeout(req.timeout_ms))
            .await;
        if sequence.is_some() || matches!(&outcome, Err(f) if f.kind == FailureKind::Refused) {
            // The record and the audit are written off the reply path: the
            // caller has the device's answer already.
            let (gw, outcome, id) = (Arc::clone(&self.gw), outcome.clone(), id.clone());
            tokio::spawn(async move {
                crate::commands::after_call(&gw, &principal, &id, &function, sequence, &outcome)
                    .await;
            });
        }
        match outcome {
            Ok(Output::FunctionReturn(v)) => Ok(Response::new(CallFunctionResponse {
                return_value: v,
                gateway_id: self.gw.id.clone(),
            })),
            Ok(other) => Err(Status::internal(format!("unexpected answer {other:?}"))),
            Err(f) => Err(failure_status(f)),
        }
    }

    #[tracing::instrument(name = "rpc.signal_device", skip_all, fields(device, on))]
    async fn signal_device(
        &self,
        request: Request<SignalDeviceRequest>,
    ) -> Result<Response<SignalDeviceResponse>, Status> {
        let principal = Principal::of(&request)?;
        let req = request.into_inner();
        let id = parse_device_id(&req.device_id)?;
        tracing::Span::current().record("device", id.as_str());
        tracing::Span::current().record("on", req.on);
        self.orgs.check(&self.gw, &principal, &id).await?;
        match self
            .gw
            .router
            .execute(
                &id,
                Action::Signal { on: req.on },
                self.timeout(req.timeout_ms),
            )
            .await
        {
            Ok(Output::Signaled) => Ok(Response::new(SignalDeviceResponse {
                gateway_id: self.gw.id.clone(),
            })),
            Ok(other) => Err(Status::internal(format!("unexpected answer {other:?}"))),
            Err(f) => Err(failure_status(f)),
        }
    }

    #[tracing::instrument(name = "rpc.rotate_device_key", skip_all, fields(device))]
    async fn rotate_device_key(
        &self,
        request: Request<RotateDeviceKeyRequest>,
    ) -> Result<Response<RotateDeviceKeyResponse>, Status> {
        let principal = Principal::of(&request)?;
        let req = request.into_inner();
        let id = parse_device_id(&req.device_id)?;
        tracing::Span::current().record("device", id.as_str());
        self.orgs.check(&self.gw, &principal, &id).await?;
        match self
            .gw
            .router
            .execute(&id, Action::RotateDeviceKey, self.timeout(req.timeout_ms))
            .await
        {
            Ok(Output::KeyRotated { next_key_id }) => Ok(Response::new(RotateDeviceKeyResponse {
                gateway_id: self.gw.id.clone(),
                next_key_id,
            })),
            Ok(other) => Err(Status::internal(format!("unexpected answer {other:?}"))),
            Err(f) => Err(failure_status(f)),
        }
    }

    #[tracing::instrument(name = "rpc.get_variable", skip_all, fields(device, variable))]
    async fn get_variable(
        &self,
        request: Request<GetVariableRequest>,
    ) -> Result<Response<GetVariableResponse>, Status> {
        let principal = Principal::of(&request)?;
        let req = request.into_inner();
        let id = parse_device_id(&req.device_id)?;
        tracing::Span::current().record("device", id.as_str());
        tracing::Span::current().record("variable", req.name.as_str());
        self.orgs.check(&self.gw, &principal, &id).await?;
        if req.name.is_empty() || req.name.len() > 64 {
            return Err(Status::invalid_argument(
                "variable name must be 1 to 64 bytes",
            ));
        }
        let action = Action::GetVariable { name: req.name };
        match self
            .gw
            .router
            .execute(&id, action, self.timeout(req.timeout_ms))
            .await
        {
            Ok(Output::Variable { raw, var_type }) => Ok(Response::new(GetVariableResponse {
                value: Some(VariableValue {
                    value: decode_value(&raw, &var_type),
                }),
                raw,
                r#type: var_type,
                gateway_id: self.gw.id.clone(),
            })),
            Ok(other) => Err(Status::internal(format!("unexpected answer {other:?}"))),
            Err(f) => Err(failure_status(f)),
        }
    }

    #[tracing::instrument(name = "rpc.deliver_update", skip_all, fields(device, release))]
    async fn deliver_update(
        &self,
        request: Request<DeliverUpdateRequest>,
    ) -> Result<Response<DeliverUpdateResponse>, Status> {
        let req = request.into_inner();
        let id = parse_device_id(&req.device_id)?;
        tracing::Span::current().record("device", id.as_str());
        tracing::Span::current().record("release", req.release_id.as_str());
        if req.release_id.is_empty() {
            return Err(Status::invalid_argument("release_id is required"));
        }
        let timeout = Duration::from_millis(if req.timeout_ms == 0 {
            300_000
        } else {
            u64::from(req.timeout_ms).min(3_600_000)
        });
        let action = Action::DeliverUpdate {
            release_id: req.release_id,
            rollout_id: req.rollout_id,
        };
        match self.gw.router.execute(&id, action, timeout).await {
            Ok(Output::Delivery {
                outcome,
                reason,
                message,
                bytes_sent,
            }) => Ok(Response::new(DeliverUpdateResponse {
                outcome,
                reason,
                message,
                bytes_sent,
                gateway_id: self.gw.id.clone(),
            })),
            Ok(other) => Err(Status::internal(format!("unexpected answer {other:?}"))),
            Err(f) => Err(failure_status(f)),
        }
    }

    #[tracing::instrument(name = "rpc.publish_event", skip_all, fields(event))]
    async fn publish_event(
        &self,
        request: Request<PublishEventRequest>,
    ) -> Result<Response<PublishEventResponse>, Status> {
        let principal = Principal::of(&request)?;
        let req = request.into_inner();
        tracing::Span::current().record("event", req.name.as_str());
        if req.name.is_empty() || req.name.len() > 64 {
            return Err(Status::invalid_argument("event name must be 1 to 64 bytes"));
        }
        if req.data.len() > 1024 {
            return Err(Status::invalid_argument(
                "event data is limited to 1024 bytes",
            ));
        }
        let mut redis = self.gw.redis.clone();
        let id = device_state::append_published_event(
            &mut redis,
            self.gw.config.events_max_len,
            &principal.org,
            &format!("{}@{}", principal.user, principal.org),
            &self.gw.id,
            &req.name,
            &req.data,
            !req.private,
        )
        .await
        .map_err(redis_status)?;
        Ok(Response::new(PublishEventResponse { id }))
    }

    type StreamEventsStream = EventStream;

    async fn stream_events(
        &self,
        request: Request<StreamEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let principal = Principal::of(&request)?;
        let req = request.into_inner();
        let device_filter = if req.device_id.is_empty() {
            None
        } else {
            let id = parse_device_id(&req.device_id)?;
            self.orgs.check(&self.gw, &principal, &id).await?;
            Some(id)
        };
        let (gw, orgs) = (Arc::clone(&self.gw), Arc::clone(&self.orgs));
        let mut conn = redis_conn::connect_blocking(&self.gw.redis_url)
            .await
            .map_err(redis_status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let prefix = req.prefix;
        let mut last_id = if req.from_start {
            "0".to_string()
        } else {
            "$".to_string()
        };
        tokio::spawn(async move {
            loop {
                let reply: redis::RedisResult<Option<redis::streams::StreamReadReply>> =
                    redis::cmd("XREAD")
                        .arg("COUNT")
                        .arg(500)
                        .arg("BLOCK")
                        .arg(redis_conn::BLOCKING_READ_MS)
                        .arg("STREAMS")
                        .arg(keys::EVENTS)
                        .arg(&last_id)
                        .query_async(&mut conn)
                        .await;
                let reply = match reply {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(redis_status(e))).await;
                        return;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
                    last_id = entry.id.clone();
                    let event = DeviceEvent {
                        id: entry.id.clone(),
                        device_id: entry.get("device").unwrap_or_default(),
                        name: entry.get("name").unwrap_or_default(),
                        data: entry.get::<Vec<u8>>("data").unwrap_or_default(),
                        public: entry.get::<String>("public").is_some_and(|p| p == "1"),
                        time_ms: entry.get("time_ms").unwrap_or_default(),
                        gateway_id: entry.get("gateway").unwrap_or_default(),
                        publisher: entry.get("publisher").unwrap_or_default(),
                    };
                    if device_filter
                        .as_ref()
                        .is_some_and(|d| *d != event.device_id)
                        || !event.name.starts_with(&prefix)
                    {
                        continue;
                    }
                    if event.device_id.is_empty() {
                        // Published by a user or app (PublishEvent): its
                        // organisation's streams only, never a device's.
                        let org: Option<String> = entry.get("org");
                        if device_filter.is_some() || !org.is_some_and(|o| principal.sees(&o)) {
                            continue;
                        }
                    } else if device_filter.is_none()
                        && orgs.check(&gw, &principal, &event.device_id).await.is_err()
                    {
                        // Another organisation's events are not this caller's.
                        continue;
                    }
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

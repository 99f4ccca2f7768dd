//! `/v1/devices...` and `/v1/products/:p/devices...`: list, details,
//! function calls, variable reads (PARTICLE-API.md §1).
use crate::error::ApiError;
use crate::grpc::Token;
use crate::{AppState, iso_time};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use serde_json::{Value, json};
use std::collections::HashMap;
use trellis_proto::v1::variable_value::Value as Var;
use trellis_proto::v1::{
    CallFunctionRequest, DeviceState, GetDeviceStateRequest, GetVariableRequest,
    ListDeviceStatesRequest, RegisterDeviceRequest,
};

type Params = Query<HashMap<String, String>>;

/// A device as Particle describes one (`name` null when it has none);
/// `product_id` is the device's Trellis product.
pub fn device_json(state: &DeviceState, details: bool) -> Value {
    let last_heard = (state.last_seen_ms > 0).then(|| iso_time(state.last_seen_ms));
    let ip = state
        .peer_addr
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip().to_string())
        .ok();
    let mut device = json!({
        "id": state.device_id,
        "name": (!state.name.is_empty()).then_some(state.name.as_str()),
        "last_app": Value::Null,
        "last_ip_address": ip,
        "last_heard": last_heard,
        "last_handshake_at": (state.connected_at_ms > 0).then(|| iso_time(state.connected_at_ms)),
        "product_id": state.product_id,
        "platform_id": state.platform_id,
        "connected": state.online,
        "online": state.online,
        "cellular": false,
        "notes": Value::Null,
        "status": if state.revoked { "revoked" } else { "normal" },
        "firmware_version": state.firmware_version,
        "firmware_sha256": state.firmware_sha256,
        "development": false,
        "quarantined": state.quarantined_until_ms > 0,
    });
    if details && let Some(map) = device.as_object_mut() {
        map.insert("functions".into(), json!(state.functions));
        map.insert("variables".into(), json!(state.variables));
    }
    device
}

/// `text` as a device id (24 hex characters, lowercased), if it is one.
fn hex_id(text: &str) -> Option<String> {
    let id = text.trim();
    (id.len() == 24 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// The device id a path names: a 24-hex id as it is, anything else a
/// device name of the caller's organisation (`trellis device rename`,
/// `PUT /v1/devices/:id {"name"}`), which keyvault resolves.
pub async fn device_id(
    state: &AppState,
    token: &Token,
    id_or_name: &str,
) -> Result<String, ApiError> {
    if let Some(id) = hex_id(id_or_name) {
        return Ok(id);
    }
    let id = id_or_name.trim();
    if id.is_empty() || id.len() > 64 {
        return Err(ApiError::UnknownDevice);
    }
    let device = state
        .services
        .keyvault()
        .get_device(token.request(trellis_proto::v1::GetDeviceRequest {
            device_id: id.to_string(),
        }))
        .await
        .map_err(|s| match s.code() {
            tonic::Code::NotFound | tonic::Code::InvalidArgument => ApiError::UnknownDevice,
            _ => ApiError::from(s),
        })?
        .into_inner();
    Ok(device.device_id)
}

/// The caller's view of one device (403 if it is not theirs), optionally
/// only if it belongs to `product`.
pub async fn resolve(
    state: &AppState,
    token: &Token,
    id_or_name: &str,
    product: Option<u32>,
) -> Result<DeviceState, ApiError> {
    let id = device_id(state, token, id_or_name).await?;
    let device = state
        .services
        .devices()
        .get_device_state(token.request(GetDeviceStateRequest { device_id: id }))
        .await?
        .into_inner();
    if product.is_some_and(|p| p != device.product_id) {
        return Err(ApiError::UnknownDevice);
    }
    Ok(device)
}

fn product_id(p: &str) -> Result<u32, ApiError> {
    p.parse::<u32>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::NotFound(format!("Product {p} not found")))
}

async fn list(state: &AppState, token: &Token, product: u32) -> Result<Vec<Value>, ApiError> {
    let devices = state
        .services
        .devices()
        .list_devices(token.request(ListDeviceStatesRequest {
            product_id: product,
            online_only: false,
        }))
        .await
        .map_err(|s| ApiError::from_status_or(&s, || ApiError::NotFound(s.message().into())))?
        .into_inner()
        .devices;
    Ok(devices.iter().map(|d| device_json(d, false)).collect())
}

/// `GET /v1/devices`: an array of the caller's devices.
pub async fn list_devices(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<Value>, ApiError> {
    let token = Token::from_request(&headers, &query, None)?;
    Ok(Json(Value::Array(list(&state, &token, 0).await?)))
}

/// `GET /v1/products/:p/devices`: `{devices, customers, meta}`.
pub async fn list_product_devices(
    State(state): State<AppState>,
    Path(product): Path<String>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<Value>, ApiError> {
    let token = Token::from_request(&headers, &query, None)?;
    let product = product_id(&product)?;
    let devices = list(&state, &token, product).await?;
    Ok(Json(json!({
        "devices": devices,
        "customers": [],
        "meta": {"total_pages": 1, "total_records": devices.len()},
    })))
}

/// `GET /v1/devices/:id`: the device with its functions and variables.
pub async fn get_device(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<Value>, ApiError> {
    let token = Token::from_request(&headers, &query, None)?;
    let device = resolve(&state, &token, &id, None).await?;
    Ok(Json(device_json(&device, true)))
}

/// `GET /v1/products/:p/devices/:id`.
pub async fn get_product_device(
    State(state): State<AppState>,
    Path((product, id)): Path<(String, String)>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<Value>, ApiError> {
    let token = Token::from_request(&headers, &query, None)?;
    let device = resolve(&state, &token, &id, Some(product_id(&product)?)).await?;
    Ok(Json(device_json(&device, true)))
}

/// A request body's fields: JSON object or form; anything else is none.
pub fn body_fields(headers: &HeaderMap, body: &[u8]) -> Result<HashMap<String, String>, ApiError> {
    if body.is_empty() {
        return Ok(HashMap::new());
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if content_type.starts_with("application/x-www-form-urlencoded") {
        return serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
            .map(|pairs| pairs.into_iter().collect())
            .map_err(|e| ApiError::bad_request(format!("the form body is malformed: {e}")));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    };
    Ok(map
        .into_iter()
        .filter_map(|(k, v)| match v {
            Value::Null => None,
            Value::String(s) => Some((k, s)),
            other => Some((k, other.to_string())),
        })
        .collect())
}

async fn call(
    state: &AppState,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    body: &[u8],
    id: &str,
    function: &str,
    product: Option<u32>,
) -> Result<Json<Value>, ApiError> {
    let fields = body_fields(headers, body)?;
    let token = Token::from_request(headers, query, Some(&fields))?;
    // `args` is what the clients send; `arg` is Particle's older form.
    let argument = fields
        .get("args")
        .or_else(|| fields.get("arg"))
        .cloned()
        .unwrap_or_default();
    // A Trellis addition: the signed command (`trellis command sign`'s
    // file, base64) for a device that requires one (README "Signed commands").
    let signed_command = match fields.get("signed_command") {
        None => Vec::new(),
        Some(b64) => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| {
                    ApiError::Other(
                        axum::http::StatusCode::BAD_REQUEST,
                        "signed_command must be base64 (the file `trellis command sign` writes)"
                            .into(),
                    )
                })?
        }
    };
    let device = resolve(state, &token, id, product).await?;
    let missing = || ApiError::NotFound(format!("Function {function} not found"));
    // Only a device that has described itself is known to lack it.
    if device.online
        && !device.functions.is_empty()
        && !device.functions.iter().any(|f| f == function)
    {
        return Err(missing());
    }
    let reply = state
        .services
        .devices()
        .call_function(token.request(CallFunctionRequest {
            device_id: device.device_id.clone(),
            function: function.to_string(),
            argument,
            timeout_ms: 0,
            signed_command,
        }))
        .await
        .map_err(|s| ApiError::from_status_or(&s, missing))?
        .into_inner();
    Ok(Json(json!({
        "id": device.device_id,
        "name": Value::Null,
        "connected": true,
        "return_value": reply.return_value,
    })))
}

/// `POST /v1/devices/:id/:function` (`args` in, `return_value` out).
pub async fn call_function(
    State(state): State<AppState>,
    Path((id, function)): Path<(String, String)>,
    headers: HeaderMap,
    Query(query): Params,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    call(&state, &headers, &query, &body, &id, &function, None).await
}

/// `POST /v1/products/:p/devices/:id/:function`.
pub async fn call_product_function(
    State(state): State<AppState>,
    Path((product, id, function)): Path<(String, String, String)>,
    headers: HeaderMap,
    Query(query): Params,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let product = product_id(&product)?;
    call(
        &state,
        &headers,
        &query,
        &body,
        &id,
        &function,
        Some(product),
    )
    .await
}

async fn read(
    state: &AppState,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    id: &str,
    variable: &str,
    product: Option<u32>,
) -> Result<Json<Value>, ApiError> {
    let token = Token::from_request(headers, query, None)?;
    let device = resolve(state, &token, id, product).await?;
    let missing = || ApiError::NotFound("Variable not found".into());
    if device.online && !device.variables.is_empty() && !device.variables.contains_key(variable) {
        return Err(missing());
    }
    let reply = state
        .services
        .devices()
        .get_variable(token.request(GetVariableRequest {
            device_id: device.device_id.clone(),
            name: variable.to_string(),
            timeout_ms: 0,
        }))
        .await
        .map_err(|s| ApiError::from_status_or(&s, missing))?
        .into_inner();
    let result = match reply.value.and_then(|v| v.value) {
        Some(Var::BoolValue(b)) => json!(b),
        Some(Var::IntValue(i)) => json!(i),
        Some(Var::DoubleValue(d)) => json!(d),
        Some(Var::StringValue(s)) => json!(s),
        None => json!(String::from_utf8_lossy(&reply.raw)),
    };
    let now = iso_time(trellis_core::time::now_ms());
    Ok(Json(json!({
        "cmd": "VarReturn",
        "name": variable,
        "result": result,
        "coreInfo": {
            "last_app": "",
            "last_heard": now,
            "connected": true,
            "last_handshake_at": (device.connected_at_ms > 0).then(|| iso_time(device.connected_at_ms)),
            "deviceID": device.device_id,
            "product_id": device.product_id,
        },
    })))
}

/// `GET /v1/devices/:id/:variable` (`result`).
pub async fn get_variable(
    State(state): State<AppState>,
    Path((id, variable)): Path<(String, String)>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<Value>, ApiError> {
    read(&state, &headers, &query, &id, &variable, None).await
}

/// `GET /v1/products/:p/devices/:id/:variable`.
pub async fn get_product_variable(
    State(state): State<AppState>,
    Path((product, id, variable)): Path<(String, String, String)>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<Value>, ApiError> {
    let product = product_id(&product)?;
    read(&state, &headers, &query, &id, &variable, Some(product)).await
}

/// `POST /v1/devices` (claim). Trellis has no claiming: a device belongs to
/// the organisation that registered its key. Claiming one of the caller's
/// devices succeeds (nothing changes); any other is refused, with how to
/// register it.
pub async fn claim(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Params,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let fields = body_fields(&headers, &body)?;
    let token = Token::from_request(&headers, &query, Some(&fields))?;
    let id = fields.get("id").cloned().unwrap_or_default();
    let refused = || {
        ApiError::bad_request(format!(
            "Trellis has no device claiming: device {id} must be registered in your organisation \
             with its public key (`trellis device register --id ID --product P --public-key FILE`, \
             or POST /v1/provisioning/ID with publicKey and product_id)"
        ))
    };
    let device = match resolve(&state, &token, &id, None).await {
        Ok(device) => device,
        Err(ApiError::UnknownDevice) => return Err(refused()),
        Err(other) => return Err(other),
    };
    Ok(Json(json!({
        "ok": true,
        "id": device.device_id,
        "connected": device.online,
    })))
}

/// `POST /v1/provisioning/:id` (`particle keys send`): registers the
/// device's public key (RSA-1024 PEM, protocol v1) in the caller's
/// organisation for `product_id`, or for the product it already has. Sending
/// the registered key again changes nothing; another key for a registered
/// device is refused by keyvault (revoke it first).
pub async fn provision(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(query): Params,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let fields = body_fields(&headers, &body)?;
    let token = Token::from_request(&headers, &query, Some(&fields))?;
    // A new device has no name yet: only an id will do.
    let device_id = hex_id(fields.get("deviceID").unwrap_or(&id)).ok_or(ApiError::UnknownDevice)?;
    let key = fields
        .get("publicKey")
        .filter(|k| !k.trim().is_empty())
        .ok_or_else(|| ApiError::bad_request("publicKey is required (PEM)"))?;
    if fields
        .get("algorithm")
        .is_some_and(|a| !a.eq_ignore_ascii_case("rsa"))
    {
        return Err(ApiError::bad_request(
            "Trellis devices use RSA-1024 keys (protocol v1): algorithm must be rsa",
        ));
    }
    let product = match fields.get("product_id").map(|p| p.trim()) {
        Some(p) if !p.is_empty() => p
            .parse::<u32>()
            .map_err(|_| ApiError::bad_request("product_id must be a number"))?,
        _ => {
            let existing = state
                .services
                .devices()
                .get_device_state(token.request(GetDeviceStateRequest {
                    device_id: device_id.clone(),
                }))
                .await;
            match existing {
                Ok(d) => d.into_inner().product_id,
                Err(s) if s.code() == tonic::Code::NotFound => {
                    return Err(ApiError::bad_request(
                        "product_id is required for a device Trellis does not know yet \
                         (every Trellis device belongs to a product): particle keys send --product_id P",
                    ));
                }
                Err(s) => return Err(ApiError::from_status(&s)),
            }
        }
    };
    let device = state
        .services
        .keyvault()
        .register_device(token.request(RegisterDeviceRequest {
            device_id: device_id.clone(),
            product_id: product,
            public_key: key.as_bytes().to_vec(),
            organization: String::new(),
        }))
        .await
        .map_err(|s| {
            ApiError::from_status_or(&s, || ApiError::bad_request(s.message().to_string()))
        })?
        .into_inner();
    Ok(Json(json!({
        "ok": true,
        "id": device.device_id,
        "product_id": device.product_id,
    })))
}

/// `DELETE /v1/devices/:id` (`particle device remove`): Trellis devices are
/// not claimed, so they cannot be released; stopping to trust one is a
/// revocation, which is final and is not done from here.
pub async fn unclaim(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<Value>, ApiError> {
    let token = Token::from_request(&headers, &query, None)?;
    let device = resolve(&state, &token, &id, None).await?;
    Err(ApiError::bad_request(format!(
        "Trellis devices belong to the organisation that registered them and are not removed \
         from an account; to stop trusting device {} for good, revoke it: \
         `trellis device revoke {}`",
        device.device_id, device.device_id
    )))
}

/// `PUT /v1/devices/:id {"name"}`: Particle's rename (keyvault checks and
/// keeps the name; it must be unique in the organisation).
pub async fn rename(
    state: &AppState,
    token: &Token,
    device: &DeviceState,
    name: &str,
) -> Result<Json<Value>, ApiError> {
    let renamed = state
        .services
        .keyvault()
        .set_device_name(token.request(trellis_proto::v1::SetDeviceNameRequest {
            device_id: device.device_id.clone(),
            name: name.to_string(),
        }))
        .await?
        .into_inner();
    Ok(Json(json!({
        "id": renamed.device_id,
        "name": (!renamed.name.is_empty()).then_some(renamed.name.as_str()),
        "updated_at": iso_time(trellis_core::time::now_ms()),
    })))
}

/// `PUT /v1/devices/:id {"signal": "1"|"0"}`: Particle's nyan, answered
/// once the device acknowledged.
pub async fn signal(
    state: &AppState,
    token: &Token,
    device: &DeviceState,
    signal: &str,
) -> Result<Json<Value>, ApiError> {
    let on = match signal.trim() {
        "1" | "true" => true,
        "0" | "false" => false,
        other => {
            return Err(ApiError::bad_request(format!(
                "signal is \"1\" or \"0\", not {other:?}"
            )));
        }
    };
    state
        .services
        .devices()
        .signal_device(token.request(trellis_proto::v1::SignalDeviceRequest {
            device_id: device.device_id.clone(),
            on,
            timeout_ms: 0,
        }))
        .await?;
    Ok(Json(json!({
        "id": device.device_id,
        "connected": true,
        "signaling": on,
    })))
}

//! `/v1/devices...` and `/v1/products/:p/devices...`: list, details,
//! function calls, variable reads (PARTICLE-API.md §1).
use crate::error::{ApiError, ErrorBody};
use crate::grpc::Token;
use crate::{AppState, iso_time};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use trellis_proto::v1::variable_value::Value as Var;
use trellis_proto::v1::{
    CallFunctionRequest, DeviceState, GetDeviceStateRequest, GetVariableRequest,
    ListDeviceStatesRequest, RegisterDeviceRequest,
};
use utoipa::ToSchema;

type Params = Query<HashMap<String, String>>;

/// A device as Particle describes one (`name` null when it has none);
/// `product_id` is the device's Trellis product. Fields in
/// alphabetical order: the bytes are those of the sorted JSON object the
/// Particle clients were tested against.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Device {
    /// Always false.
    pub cellular: bool,
    /// Whether the device is in session now.
    pub connected: bool,
    /// Always false.
    pub development: bool,
    /// Hex SHA-256 of the running firmware, empty if the device did not say.
    pub firmware_sha256: String,
    pub firmware_version: u32,
    /// The device's functions (device details only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub functions: Option<Vec<String>>,
    /// The device id (24 hex digits).
    pub id: String,
    /// Always null.
    pub last_app: Option<String>,
    /// When the current or last session started (ISO 8601).
    pub last_handshake_at: Option<String>,
    /// When the device was last heard from (ISO 8601).
    pub last_heard: Option<String>,
    pub last_ip_address: Option<String>,
    /// The device's name (`trellis device rename`, `PUT /v1/devices/:id
    /// {"name"}`); null when it has none.
    pub name: Option<String>,
    /// Always null.
    pub notes: Option<String>,
    /// As `connected`.
    pub online: bool,
    pub platform_id: u32,
    /// The device's Trellis product.
    pub product_id: u32,
    /// Whether the device is quarantined (suspected clone).
    pub quarantined: bool,
    /// `normal`, or `revoked` for a device no longer trusted.
    pub status: String,
    /// The device's variables, name to type (device details only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variables: Option<BTreeMap<String, String>>,
}

/// `state` as Particle describes a device; `details` adds its functions
/// and variables.
pub fn device_json(state: &DeviceState, details: bool) -> Device {
    let ip = state
        .peer_addr
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip().to_string())
        .ok();
    Device {
        cellular: false,
        connected: state.online,
        development: false,
        firmware_sha256: state.firmware_sha256.clone(),
        firmware_version: state.firmware_version,
        functions: details.then(|| state.functions.clone()),
        id: state.device_id.clone(),
        last_app: None,
        last_handshake_at: (state.connected_at_ms > 0).then(|| iso_time(state.connected_at_ms)),
        last_heard: (state.last_seen_ms > 0).then(|| iso_time(state.last_seen_ms)),
        last_ip_address: ip,
        name: (!state.name.is_empty()).then(|| state.name.clone()),
        notes: None,
        online: state.online,
        platform_id: state.platform_id,
        product_id: state.product_id,
        quarantined: state.quarantined_until_ms > 0,
        status: if state.revoked { "revoked" } else { "normal" }.into(),
        variables: details.then(|| {
            state
                .variables
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }),
    }
}

/// `GET /v1/products/:p/devices`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProductDevices {
    /// Always empty (Trellis has no customers).
    #[schema(value_type = Vec<Object>)]
    pub customers: Vec<Value>,
    pub devices: Vec<Device>,
    pub meta: Meta,
}

/// Paging of a product's device list: one page with everything.
#[derive(Debug, Serialize, ToSchema)]
pub struct Meta {
    pub total_pages: u32,
    pub total_records: u64,
}

/// A function call's answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct FunctionResult {
    /// Always true (the device answered).
    pub connected: bool,
    pub id: String,
    /// Always null.
    pub name: Option<String>,
    /// What the function returned.
    pub return_value: i32,
}

/// A variable's value: boolean, integer, number or string as the device
/// declared it (null for a double that is not finite).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum VariableValue {
    Bool(bool),
    Int(i32),
    Double(f64),
    String(String),
}

fn variable_value_schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, Type};
    AnyOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::Boolean))
        .item(ObjectBuilder::new().schema_type(Type::Integer))
        .item(ObjectBuilder::new().schema_type(Type::Number))
        .item(ObjectBuilder::new().schema_type(Type::String))
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .description(Some(
            "The value: boolean, integer, number or string as the device declared it",
        ))
        .into()
}

/// A variable read's answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct VariableResult {
    /// Always `VarReturn`.
    pub cmd: String,
    #[serde(rename = "coreInfo")]
    pub core_info: CoreInfo,
    /// The variable's name.
    pub name: String,
    #[schema(schema_with = variable_value_schema)]
    pub result: VariableValue,
}

/// The device a variable was read from.
#[derive(Debug, Serialize, ToSchema)]
pub struct CoreInfo {
    pub connected: bool,
    #[serde(rename = "deviceID")]
    pub device_id: String,
    /// Always empty.
    pub last_app: String,
    pub last_handshake_at: Option<String>,
    /// Now (the device just answered).
    pub last_heard: String,
    pub product_id: u32,
}

/// `POST /v1/devices` (claim) of one's own device.
#[derive(Debug, Serialize, ToSchema)]
pub struct Claimed {
    pub connected: bool,
    pub id: String,
    /// Always true.
    pub ok: bool,
}

/// `POST /v1/provisioning/:id`: the registered device.
#[derive(Debug, Serialize, ToSchema)]
pub struct Provisioned {
    pub id: String,
    /// Always true.
    pub ok: bool,
    pub product_id: u32,
}

/// The body of a function call (JSON or form).
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct FunctionArgs {
    /// The function's argument (at most what the device takes).
    pub args: Option<String>,
    /// Particle's older name for `args`.
    pub arg: Option<String>,
    /// A Trellis addition: the signed command (`trellis command sign`'s
    /// `signed_command`, base64) a device with a command policy requires.
    pub signed_command: Option<String>,
}

/// The body of a claim (JSON or form).
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct ClaimRequest {
    /// The device id.
    pub id: String,
}

/// The body of a key upload (JSON or form).
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct ProvisionRequest {
    /// RSA-1024 public key, PEM.
    #[schema(rename = "publicKey")]
    pub public_key: String,
    /// The device id (24 hex digits), instead of the path's.
    #[schema(rename = "deviceID", pattern = "^[0-9a-fA-F]{24}$")]
    pub device_id: Option<String>,
    /// `rsa` (the only one Trellis devices use).
    pub algorithm: Option<String>,
    /// The device's product (required for a device Trellis does not know yet).
    pub product_id: Option<u32>,
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

async fn list(state: &AppState, token: &Token, product: u32) -> Result<Vec<Device>, ApiError> {
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
#[utoipa::path(get, path = "/v1/devices", tag = "devices",
    responses((status = 200, description = "The caller's devices", body = [Device])))]
pub async fn list_devices(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<Vec<Device>>, ApiError> {
    let token = Token::from_request(&headers, &query, None)?;
    Ok(Json(list(&state, &token, 0).await?))
}

/// `GET /v1/products/:p/devices`: `{devices, customers, meta}`.
#[utoipa::path(get, path = "/v1/products/{p}/devices", tag = "devices",
    params(("p" = u32, Path, description = "Product id")),
    responses(
        (status = 200, description = "The product's devices", body = ProductDevices),
        (status = 404, description = "No such product", body = ErrorBody)))]
pub async fn list_product_devices(
    State(state): State<AppState>,
    Path(product): Path<String>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<ProductDevices>, ApiError> {
    let token = Token::from_request(&headers, &query, None)?;
    let product = product_id(&product)?;
    let devices = list(&state, &token, product).await?;
    Ok(Json(ProductDevices {
        customers: Vec::new(),
        meta: Meta {
            total_pages: 1,
            total_records: devices.len() as u64,
        },
        devices,
    }))
}

/// `GET /v1/devices/:id`: the device with its functions and variables.
#[utoipa::path(get, path = "/v1/devices/{id}", tag = "devices",
    params(("id" = String, Path, pattern = "^(?!events$)",
        description = "Device id or name: any but `events`, which is the event stream of the \
                       caller's devices (`GET /v1/devices/events`)")),
    responses((status = 200, description = "The device with its functions and variables", body = Device)))]
pub async fn get_device(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<Device>, ApiError> {
    let token = Token::from_request(&headers, &query, None)?;
    let device = resolve(&state, &token, &id, None).await?;
    Ok(Json(device_json(&device, true)))
}

/// `GET /v1/products/:p/devices/:id`.
#[utoipa::path(get, path = "/v1/products/{p}/devices/{id}", tag = "devices",
    params(("p" = u32, Path, description = "Product id"),
        ("id" = String, Path, description = "Device id or name")),
    responses(
        (status = 200, description = "The device with its functions and variables", body = Device),
        (status = 404, description = "No such product", body = ErrorBody)))]
pub async fn get_product_device(
    State(state): State<AppState>,
    Path((product, id)): Path<(String, String)>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<Device>, ApiError> {
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
) -> Result<Json<FunctionResult>, ApiError> {
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
    Ok(Json(FunctionResult {
        connected: true,
        id: device.device_id,
        name: None,
        return_value: reply.return_value,
    }))
}

/// `POST /v1/devices/:id/events`: a call of a function named `events`
/// (the path's GET is the device's event stream, so the router sends the
/// POST here rather than to [`call_function`]).
#[utoipa::path(post, path = "/v1/devices/{id}/events", tag = "devices",
    params(("id" = String, Path, description = "Device id or name")),
    request_body(content(
        (FunctionArgs = "application/json"),
        (FunctionArgs = "application/x-www-form-urlencoded"))),
    responses(
        (status = 200, description = "The return value of the device's function `events`", body = FunctionResult),
        (status = 404, description = "The device has no function `events`", body = ErrorBody)))]
pub async fn call_function_named_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(query): Params,
    body: Bytes,
) -> Result<Json<FunctionResult>, ApiError> {
    call(&state, &headers, &query, &body, &id, "events", None).await
}

/// `POST /v1/devices/:id/:function` (`args` in, `return_value` out).
#[utoipa::path(post, path = "/v1/devices/{id}/{name}", tag = "devices",
    params(("id" = String, Path, description = "Device id or name"),
        ("name" = String, Path, description = "Function name")),
    request_body(content(
        (FunctionArgs = "application/json"),
        (FunctionArgs = "application/x-www-form-urlencoded"))),
    responses(
        (status = 200, description = "The function's return value", body = FunctionResult),
        (status = 404, description = "The device has no such function", body = ErrorBody)))]
pub async fn call_function(
    State(state): State<AppState>,
    Path((id, function)): Path<(String, String)>,
    headers: HeaderMap,
    Query(query): Params,
    body: Bytes,
) -> Result<Json<FunctionResult>, ApiError> {
    call(&state, &headers, &query, &body, &id, &function, None).await
}

/// `POST /v1/products/:p/devices/:id/:function`.
#[utoipa::path(post, path = "/v1/products/{p}/devices/{id}/{name}", tag = "devices",
    params(("p" = u32, Path, description = "Product id"),
        ("id" = String, Path, description = "Device id or name"),
        ("name" = String, Path, description = "Function name")),
    request_body(content(
        (FunctionArgs = "application/json"),
        (FunctionArgs = "application/x-www-form-urlencoded"))),
    responses(
        (status = 200, description = "The function's return value", body = FunctionResult),
        (status = 404, description = "No such product, or the device has no such function", body = ErrorBody)))]
pub async fn call_product_function(
    State(state): State<AppState>,
    Path((product, id, function)): Path<(String, String, String)>,
    headers: HeaderMap,
    Query(query): Params,
    body: Bytes,
) -> Result<Json<FunctionResult>, ApiError> {
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
) -> Result<Json<VariableResult>, ApiError> {
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
        Some(Var::BoolValue(b)) => VariableValue::Bool(b),
        Some(Var::IntValue(i)) => VariableValue::Int(i),
        Some(Var::DoubleValue(d)) => VariableValue::Double(d),
        Some(Var::StringValue(s)) => VariableValue::String(s),
        None => VariableValue::String(String::from_utf8_lossy(&reply.raw).into_owned()),
    };
    let now = iso_time(trellis_core::time::now_ms());
    Ok(Json(VariableResult {
        cmd: "VarReturn".into(),
        core_info: CoreInfo {
            connected: true,
            device_id: device.device_id,
            last_app: String::new(),
            last_handshake_at: (device.connected_at_ms > 0)
                .then(|| iso_time(device.connected_at_ms)),
            last_heard: now,
            product_id: device.product_id,
        },
        name: variable.to_string(),
        result,
    }))
}

/// `GET /v1/devices/:id/:variable` (`result`).
#[utoipa::path(get, path = "/v1/devices/{id}/{name}", tag = "devices",
    params(("id" = String, Path, description = "Device id or name"),
        ("name" = String, Path, pattern = "^(?!events$)",
            description = "Variable name: any but `events`, which is the device's event stream \
                           (`GET /v1/devices/{id}/events`), as on Particle's cloud")),
    responses(
        (status = 200, description = "The variable's value", body = VariableResult),
        (status = 404, description = "The device has no such variable", body = ErrorBody)))]
pub async fn get_variable(
    State(state): State<AppState>,
    Path((id, variable)): Path<(String, String)>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<VariableResult>, ApiError> {
    read(&state, &headers, &query, &id, &variable, None).await
}

/// `GET /v1/products/:p/devices/:id/:variable`.
#[utoipa::path(get, path = "/v1/products/{p}/devices/{id}/{name}", tag = "devices",
    params(("p" = u32, Path, description = "Product id"),
        ("id" = String, Path, description = "Device id or name"),
        ("name" = String, Path, description = "Variable name")),
    responses(
        (status = 200, description = "The variable's value", body = VariableResult),
        (status = 404, description = "No such product, or the device has no such variable", body = ErrorBody)))]
pub async fn get_product_variable(
    State(state): State<AppState>,
    Path((product, id, variable)): Path<(String, String, String)>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<VariableResult>, ApiError> {
    let product = product_id(&product)?;
    read(&state, &headers, &query, &id, &variable, Some(product)).await
}

/// `POST /v1/devices` (claim). Trellis has no claiming: a device belongs to
/// the organisation that registered its key. Claiming one of the caller's
/// devices succeeds (nothing changes); any other is refused, with how to
/// register it.
#[utoipa::path(post, path = "/v1/devices", tag = "devices",
    request_body(content(
        (ClaimRequest = "application/json"),
        (ClaimRequest = "application/x-www-form-urlencoded"))),
    responses((status = 200, description = "The device is the caller's already", body = Claimed)))]
pub async fn claim(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Params,
    body: Bytes,
) -> Result<Json<Claimed>, ApiError> {
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
    Ok(Json(Claimed {
        connected: device.online,
        id: device.device_id,
        ok: true,
    }))
}

/// `POST /v1/provisioning/:id` (`particle keys send`): registers the
/// device's public key (RSA-1024 PEM, protocol v1) in the caller's
/// organisation for `product_id`, or for the product it already has. Sending
/// the registered key again changes nothing; another key for a registered
/// device is refused by keyvault (revoke it first).
#[utoipa::path(post, path = "/v1/provisioning/{id}", tag = "devices",
    params(("id" = String, Path, description = "Device id (24 hex digits)", pattern = "^[0-9a-fA-F]{24}$")),
    request_body(content(
        (ProvisionRequest = "application/json"),
        (ProvisionRequest = "application/x-www-form-urlencoded"))),
    responses((status = 200, description = "The key is registered", body = Provisioned)))]
pub async fn provision(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(query): Params,
    body: Bytes,
) -> Result<Json<Provisioned>, ApiError> {
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
    Ok(Json(Provisioned {
        id: device.device_id,
        ok: true,
        product_id: device.product_id,
    }))
}

/// `DELETE /v1/devices/:id` (`particle device remove`): Trellis devices are
/// not claimed, so they cannot be released; stopping to trust one is a
/// revocation, which is final and is not done from here.
#[utoipa::path(delete, path = "/v1/devices/{id}", tag = "devices",
    params(("id" = String, Path, description = "Device id or name")),
    responses((status = 400, description = "Always refused: how to revoke the device instead", body = ErrorBody)))]
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

/// `PUT /v1/devices/:id {"name"}` answered (fields in alphabetical order).
#[derive(Debug, Serialize, ToSchema)]
pub struct Renamed {
    pub id: String,
    /// Null when the name was removed.
    pub name: Option<String>,
    pub updated_at: String,
}

/// `PUT /v1/devices/:id {"signal"}` answered, once the device acknowledged.
#[derive(Debug, Serialize, ToSchema)]
pub struct Signaled {
    /// Always true (an offline device cannot signal).
    pub connected: bool,
    pub id: String,
    pub signaling: bool,
}

/// `PUT /v1/devices/:id {"name"}`: Particle's rename (keyvault checks and
/// keeps the name; it must be unique in the organisation).
pub async fn rename(
    state: &AppState,
    token: &Token,
    device: &DeviceState,
    name: &str,
) -> Result<Renamed, ApiError> {
    let renamed = state
        .services
        .keyvault()
        .set_device_name(token.request(trellis_proto::v1::SetDeviceNameRequest {
            device_id: device.device_id.clone(),
            name: name.to_string(),
        }))
        .await?
        .into_inner();
    Ok(Renamed {
        name: (!renamed.name.is_empty()).then_some(renamed.name),
        id: renamed.device_id,
        updated_at: iso_time(trellis_core::time::now_ms()),
    })
}

/// `PUT /v1/devices/:id {"signal": "1"|"0"}`: Particle's nyan, answered
/// once the device acknowledged.
pub async fn signal(
    state: &AppState,
    token: &Token,
    device: &DeviceState,
    signal: &str,
) -> Result<Signaled, ApiError> {
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
    Ok(Signaled {
        connected: true,
        id: device.device_id.clone(),
        signaling: on,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The JSON the handlers built by hand before they had types, which
    /// the Particle clients were tested against.
    fn before(state: &DeviceState, details: bool) -> Value {
        let mut device = json!({
            "id": state.device_id,
            "name": Value::Null,
            "last_app": Value::Null,
            "last_ip_address": state.peer_addr.parse::<std::net::SocketAddr>().map(|a| a.ip().to_string()).ok(),
            "last_heard": (state.last_seen_ms > 0).then(|| iso_time(state.last_seen_ms)),
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

    #[test]
    fn a_typed_device_is_the_same_bytes_as_before() {
        let mut state = DeviceState {
            device_id: "0123456789abcdef01234567".into(),
            product_id: 6,
            online: true,
            firmware_version: 3,
            firmware_sha256: "ab".repeat(32),
            platform_id: 6,
            peer_addr: "127.0.0.1:4000".into(),
            connected_at_ms: 1_796_280_251_299,
            last_seen_ms: 1_796_280_252_000,
            functions: vec!["add".into(), "led".into()],
            ..Default::default()
        };
        state.variables.insert("temp".into(), "double".into());
        state.variables.insert("count".into(), "int32".into());
        state.variables.insert("name".into(), "string".into());
        for details in [false, true] {
            let typed = serde_json::to_string(&device_json(&state, details)).expect("json");
            assert_eq!(typed, before(&state, details).to_string());
        }
        let offline = DeviceState {
            device_id: "0123456789abcdef01234567".into(),
            revoked: true,
            quarantined_until_ms: 5,
            ..Default::default()
        };
        for details in [false, true] {
            let typed = serde_json::to_string(&device_json(&offline, details)).expect("json");
            assert_eq!(typed, before(&offline, details).to_string());
        }
    }

    #[test]
    fn typed_replies_are_the_same_bytes_as_before() {
        let call = FunctionResult {
            connected: true,
            id: "d".into(),
            name: None,
            return_value: 5,
        };
        assert_eq!(
            serde_json::to_string(&call).expect("json"),
            json!({"id": "d", "name": Value::Null, "connected": true, "return_value": 5})
                .to_string()
        );
        for (value, raw) in [
            (VariableValue::Double(21.5), json!(21.5)),
            (VariableValue::Int(-3), json!(-3)),
            (VariableValue::Bool(true), json!(true)),
            (VariableValue::String("x".into()), json!("x")),
            (VariableValue::Double(f64::NAN), json!(f64::NAN)),
        ] {
            let read = VariableResult {
                cmd: "VarReturn".into(),
                core_info: CoreInfo {
                    connected: true,
                    device_id: "d".into(),
                    last_app: String::new(),
                    last_handshake_at: None,
                    last_heard: "now".into(),
                    product_id: 6,
                },
                name: "temp".into(),
                result: value,
            };
            let old = json!({
                "cmd": "VarReturn",
                "name": "temp",
                "result": raw,
                "coreInfo": {
                    "last_app": "",
                    "last_heard": "now",
                    "connected": true,
                    "last_handshake_at": Option::<String>::None,
                    "deviceID": "d",
                    "product_id": 6,
                },
            });
            assert_eq!(serde_json::to_string(&read).expect("json"), old.to_string());
        }
        let list = ProductDevices {
            customers: Vec::new(),
            devices: Vec::new(),
            meta: Meta {
                total_pages: 1,
                total_records: 0,
            },
        };
        assert_eq!(
            serde_json::to_string(&list).expect("json"),
            json!({"devices": [], "customers": [], "meta": {"total_pages": 1, "total_records": 0}})
                .to_string()
        );
        let claimed = Claimed {
            connected: false,
            id: "d".into(),
            ok: true,
        };
        assert_eq!(
            serde_json::to_string(&claimed).expect("json"),
            json!({"ok": true, "id": "d", "connected": false}).to_string()
        );
        let provisioned = Provisioned {
            id: "d".into(),
            ok: true,
            product_id: 6,
        };
        assert_eq!(
            serde_json::to_string(&provisioned).expect("json"),
            json!({"ok": true, "id": "d", "product_id": 6}).to_string()
        );
    }
}

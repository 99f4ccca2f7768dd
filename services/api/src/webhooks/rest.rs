//! `/v1/integrations`: Particle's webhook calls, scoped to the caller's
//! organisation (from keyvault's WhoAmI with the caller's token).
//!
//! - `POST /v1/integrations` (JSON or form): `event` (prefix, required),
//!   `url` (required, http or https), `requestType` (POST default),
//!   `deviceID`, `product_id`, `headers` (object), `body` (template) or
//!   `json` (template object), `rate_limit` (deliveries per second, 0 = no
//!   limit) and `secret` (made when absent). Answers the integration with
//!   its `secret`, the only time it is shown.
//! - `GET /v1/integrations`, `GET|DELETE /v1/integrations/{id}`;
//! - Trellis: `GET /v1/integrations/{id}/dead` (dead letters) and
//!   `POST /v1/integrations/{id}/replay` (queues them again).
//!
//! Reading needs `devices:read`; the rest `devices:admin` or `org:admin`.
use super::{Integration, owned_keys};
use crate::AppState;
use crate::devices::body_fields;
use crate::error::ApiError;
use crate::grpc::Token;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use redis::AsyncCommands;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use trellis_core::redis_conn::{Redis, keys};
use trellis_proto::v1::WhoAmIRequest;

type Params = Query<HashMap<String, String>>;

/// Longest body template, header count and URL accepted.
const MAX_TEMPLATE: usize = 64 * 1024;
const MAX_HEADERS: usize = 32;
const MAX_URL: usize = 2048;

/// Headers a template may not set (the request's own framing and signature).
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "x-trellis-signature",
    "x-trellis-timestamp",
    "x-trellis-delivery",
    "x-trellis-attempt",
];

fn unavailable() -> ApiError {
    ApiError::Other(
        StatusCode::SERVICE_UNAVAILABLE,
        "Webhooks need Redis: set redis.url for the api service".into(),
    )
}

fn redis_error(e: redis::RedisError) -> ApiError {
    tracing::warn!(error = %e, "webhooks: Redis failed");
    ApiError::Other(
        StatusCode::SERVICE_UNAVAILABLE,
        "The webhook store is unavailable".into(),
    )
}

/// The caller's organisation, if the token has one of `scopes`.
async fn caller(
    state: &AppState,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    scopes: &[&str],
) -> Result<(String, Redis), ApiError> {
    let token = Token::from_request(headers, query, None)?;
    let me = state
        .services
        .access()
        .who_am_i(token.request(WhoAmIRequest {}))
        .await?
        .into_inner();
    let allowed = me
        .scopes
        .iter()
        .any(|s| scopes.contains(&s.as_str()) || s == "cluster:admin");
    if !allowed {
        return Err(ApiError::PermissionDenied(format!(
            "managing integrations needs one of the scopes {}",
            scopes.join(", ")
        )));
    }
    let redis = state
        .webhooks
        .as_ref()
        .map(|w| w.redis.clone())
        .ok_or_else(unavailable)?;
    Ok((me.org, redis))
}

const READ: &[&str] = &["devices:read", "devices:admin", "org:admin"];
const WRITE: &[&str] = &["devices:admin", "org:admin"];

/// The integration `id` if it is `org`'s (another's is "not found").
async fn load(redis: &mut Redis, org: &str, id: &str) -> Result<Integration, ApiError> {
    let not_found = || ApiError::Other(StatusCode::NOT_FOUND, "Integration not found".into());
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(not_found());
    }
    let map: HashMap<String, String> = redis
        .hgetall(keys::webhook(id))
        .await
        .map_err(redis_error)?;
    Integration::from_hash(&map)
        .filter(|i| i.org == org)
        .ok_or_else(not_found)
}

async fn view(redis: &mut Redis, integration: &Integration) -> Result<Value, ApiError> {
    let (queued, dead): (u64, u64) = redis::pipe()
        .xlen(keys::webhook_queue(&integration.id))
        .llen(keys::webhook_dead(&integration.id))
        .query_async(redis)
        .await
        .map_err(redis_error)?;
    Ok(integration.view(queued, dead))
}

/// `POST /v1/integrations`.
#[utoipa::path(post, path = "/v1/integrations", tag = "webhooks",
    request_body(content(
        (IntegrationRequest = "application/json"),
        (IntegrationRequest = "application/x-www-form-urlencoded"))),
    responses((status = 201, description = "Created; the answer holds the signing secret, shown only now", body = IntegrationView)))]
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Params,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (org, mut redis) = caller(&state, &headers, &query, WRITE).await?;
    let fields = body_fields(&headers, &body)?;
    let get = |k: &str| fields.get(k).map(|s| s.trim().to_string());
    if let Some(kind) = get("integration_type")
        && !kind.eq_ignore_ascii_case("webhook")
    {
        return Err(ApiError::bad_request(format!(
            "integration_type {kind:?} is not supported: only Webhook"
        )));
    }
    let event = get("event")
        .or_else(|| get("eventName"))
        .ok_or_else(|| ApiError::bad_request("event (the event name prefix) is required"))?;
    if event.len() > 64 {
        return Err(ApiError::bad_request(
            "event is at most 64 characters (an event name prefix)",
        ));
    }
    let url = get("url").ok_or_else(|| ApiError::bad_request("url is required"))?;
    if url.len() > MAX_URL {
        return Err(ApiError::bad_request("url is too long"));
    }
    // Refused targets are refused now, not at the first event.
    let webhooks = state.webhooks.as_ref().ok_or_else(unavailable)?;
    trellis_core::outbound::check_url(&url, &webhooks.allowed, "webhooks.allowed_targets")
        .await
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let method = get("requestType")
        .or_else(|| get("request_type"))
        .or_else(|| get("method"))
        .unwrap_or_else(|| "POST".into())
        .to_ascii_uppercase();
    if !["POST", "PUT", "PATCH", "GET", "DELETE"].contains(&method.as_str()) {
        return Err(ApiError::bad_request(format!(
            "requestType {method:?}: one of POST, PUT, PATCH, GET, DELETE"
        )));
    }
    let device = get("deviceID")
        .or_else(|| get("deviceid"))
        .or_else(|| get("device_id"))
        .unwrap_or_default()
        .to_ascii_lowercase();
    if !device.is_empty() && (device.len() != 24 || !device.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(ApiError::bad_request(
            "deviceID must be a device id (24 hex digits)",
        ));
    }
    let product = match get("product_id").or_else(|| get("productId")) {
        None => 0,
        Some(p) if p.is_empty() => 0,
        Some(p) => p
            .parse::<u32>()
            .map_err(|_| ApiError::bad_request("product_id must be a product number"))?,
    };
    let headers_map: BTreeMap<String, String> = match get("headers") {
        None => BTreeMap::new(),
        Some(h) => {
            let v: BTreeMap<String, Value> = serde_json::from_str(&h)
                .map_err(|_| ApiError::bad_request("headers must be an object of strings"))?;
            v.into_iter()
                .map(|(k, v)| match v {
                    Value::String(s) => (k, s),
                    other => (k, other.to_string()),
                })
                .collect()
        }
    };
    if headers_map.len() > MAX_HEADERS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_HEADERS} headers"
        )));
    }
    for (k, v) in &headers_map {
        if axum::http::HeaderName::from_bytes(k.as_bytes()).is_err()
            || axum::http::HeaderValue::from_str(v).is_err()
        {
            return Err(ApiError::bad_request(format!(
                "header {k:?} is not a valid HTTP header"
            )));
        }
        if RESERVED_HEADERS.contains(&k.to_ascii_lowercase().as_str()) {
            return Err(ApiError::bad_request(format!(
                "header {k:?} is set by Trellis"
            )));
        }
    }
    let body_template = get("json").or_else(|| get("body"));
    if body_template
        .as_ref()
        .is_some_and(|b| b.len() > MAX_TEMPLATE)
    {
        return Err(ApiError::bad_request("the body template is too long"));
    }
    let rate_limit = match get("rate_limit") {
        None => 0.0,
        Some(r) => r
            .parse::<f64>()
            .ok()
            .filter(|r| r.is_finite() && *r >= 0.0)
            .ok_or_else(|| {
                ApiError::bad_request("rate_limit is deliveries per second (0: no limit)")
            })?,
    };
    let secret = match get("secret") {
        Some(s) if !s.is_empty() => s,
        _ => hex::encode(rand::random::<[u8; 32]>()),
    };
    let integration = Integration {
        id: hex::encode(rand::random::<[u8; 12]>()),
        org: org.clone(),
        event,
        device,
        product,
        url,
        method,
        headers: headers_map,
        body: body_template,
        rate_limit,
        secret: secret.clone(),
        created_ms: i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0),
        )
        .unwrap_or(0),
        errors: 0,
        last_error: String::new(),
        last_error_ms: 0,
        delivered: 0,
    };
    let _: () = redis::pipe()
        .atomic()
        .hset_multiple(keys::webhook(&integration.id), &integration.fields())
        .ignore()
        .sadd(keys::WEBHOOK_INDEX, &integration.id)
        .ignore()
        .sadd(keys::webhooks_of(&org), &integration.id)
        .ignore()
        .query_async(&mut redis)
        .await
        .map_err(redis_error)?;
    tracing::info!(integration = %integration.id, org = %org, event = %integration.event, "integration created");
    let mut out = integration.view(0, 0);
    out["ok"] = json!(true);
    out["secret"] = json!(secret);
    Ok((StatusCode::CREATED, Json(out)))
}

/// `GET /v1/integrations`: the organisation's integrations.
#[utoipa::path(get, path = "/v1/integrations", tag = "webhooks",
    responses((status = 200, description = "The organisation's webhooks", body = Vec<IntegrationView>)))]
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<Value>, ApiError> {
    let (org, mut redis) = caller(&state, &headers, &query, READ).await?;
    let mut ids: Vec<String> = redis
        .smembers(keys::webhooks_of(&org))
        .await
        .map_err(redis_error)?;
    ids.sort();
    let mut out = Vec::new();
    for id in ids {
        if let Ok(i) = load(&mut redis, &org, &id).await {
            out.push(view(&mut redis, &i).await?);
        }
    }
    Ok(Json(Value::Array(out)))
}

/// `GET /v1/integrations/{id}`.
#[utoipa::path(get, path = "/v1/integrations/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "Integration id")),
    responses(
        (status = 200, description = "The webhook", body = IntegrationView),
        (status = 404, description = "No such webhook in the caller's organisation", body = crate::error::ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Params,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (org, mut redis) = caller(&state, &headers, &query, READ).await?;
    let i = load(&mut redis, &org, &id).await?;
    Ok(Json(view(&mut redis, &i).await?))
}

/// `DELETE /v1/integrations/{id}`: the integration, its queue and dead letters.
#[utoipa::path(delete, path = "/v1/integrations/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "Integration id")),
    responses(
        (status = 204, description = "Deleted; nothing more is delivered"),
        (status = 404, description = "No such webhook in the caller's organisation", body = crate::error::ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Params,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let (org, mut redis) = caller(&state, &headers, &query, WRITE).await?;
    let i = load(&mut redis, &org, &id).await?;
    let mut pipe = redis::pipe();
    pipe.atomic();
    for key in owned_keys(&i.id) {
        pipe.del(key).ignore();
    }
    pipe.srem(keys::WEBHOOK_INDEX, &i.id)
        .ignore()
        .srem(keys::webhooks_of(&org), &i.id)
        .ignore();
    let _: () = pipe.query_async(&mut redis).await.map_err(redis_error)?;
    tracing::info!(integration = %i.id, org = %org, "integration deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/integrations/{id}/dead`: the dead letters, oldest first.
#[utoipa::path(get, path = "/v1/integrations/{id}/dead", tag = "webhooks",
    params(("id" = String, Path, description = "Integration id")),
    responses(
        (status = 200, description = "Its dead letters, oldest first", body = Vec<Object>),
        (status = 404, description = "No such webhook in the caller's organisation", body = crate::error::ErrorBody)))]
pub async fn dead(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Params,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (org, mut redis) = caller(&state, &headers, &query, READ).await?;
    let i = load(&mut redis, &org, &id).await?;
    let letters: Vec<String> = redis
        .lrange(keys::webhook_dead(&i.id), 0, -1)
        .await
        .map_err(redis_error)?;
    Ok(Json(Value::Array(
        letters
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect(),
    )))
}

/// Moves every dead letter back to the end of the queue, atomically.
const REPLAY: &str = r"
local letters = redis.call('LRANGE', KEYS[1], 0, -1)
local t = redis.call('TIME')
local now_ms = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
for _, l in ipairs(letters) do
  local d = cjson.decode(l)
  redis.call('XADD', KEYS[2], '*', 'event_id', d.event_id, 'name', d.name, 'data', d.data,
    'coreid', d.coreid, 'time_ms', string.format('%d', d.time_ms), 'queued_ms', now_ms,
    'replayed', '1')
end
redis.call('DEL', KEYS[1])
return #letters
";

/// `POST /v1/integrations/{id}/replay`: queues the dead letters again
/// (their age counts from the replay).
#[utoipa::path(post, path = "/v1/integrations/{id}/replay", tag = "webhooks",
    params(("id" = String, Path, description = "Integration id")),
    responses(
        (status = 200, description = "The dead letters are queued again", body = Replayed),
        (status = 404, description = "No such webhook in the caller's organisation", body = crate::error::ErrorBody)))]
pub async fn replay(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Params,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (org, mut redis) = caller(&state, &headers, &query, WRITE).await?;
    let i = load(&mut redis, &org, &id).await?;
    let n: i64 = redis::Script::new(REPLAY)
        .key(keys::webhook_dead(&i.id))
        .key(keys::webhook_queue(&i.id))
        .invoke_async(&mut redis)
        .await
        .map_err(redis_error)?;
    tracing::info!(integration = %i.id, replayed = n, "dead letters replayed");
    Ok(Json(json!({"ok": true, "replayed": n})))
}

/// The body of `POST /v1/integrations` (JSON or form), as Particle's
/// webhook form.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code, non_snake_case)]
pub struct IntegrationRequest {
    /// `Webhook` (the only kind).
    pub integration_type: Option<String>,
    /// The event name prefix that triggers it.
    pub event: String,
    /// Where to send it (http or https; loopback, link-local and metadata
    /// addresses are refused unless `webhooks.allowed_targets` allows them).
    pub url: String,
    /// `POST` (default), `PUT`, `GET` or `DELETE`.
    pub requestType: Option<String>,
    /// Only this device's events.
    pub deviceID: Option<String>,
    /// Only this product's events.
    pub product_id: Option<u32>,
    /// Extra request headers (a JSON object of strings).
    #[schema(value_type = Option<Object>)]
    pub headers: Option<String>,
    /// The body template (`{{{PARTICLE_EVENT_NAME}}}`, `…_VALUE`,
    /// `…_DEVICE_ID`, `…_PUBLISHED_AT`).
    pub body: Option<String>,
    /// Deliveries per second at most.
    pub rate_limit: Option<f64>,
    /// The HMAC-SHA256 secret (default: made for you and shown once).
    pub secret: Option<String>,
}

/// A webhook as the API shows it (its fields: README "Webhooks").
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
#[schema(value_type = Object)]
pub struct IntegrationView(serde_json::Value);

/// `POST /v1/integrations/{id}/replay` answered.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct Replayed {
    pub ok: bool,
    /// How many dead letters were queued again.
    pub replayed: u64,
}

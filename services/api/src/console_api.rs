//! `/v1/trellis/...`: the JSON the web console needs beyond Particle's API
//! (fleet with registry data, device records, releases against their
//! policy, rollouts, audit), and the console's session.
//!
//! Same token scoping as every other route: the caller's token goes to the
//! services as the gRPC bearer, and they decide what it may see and do.
//!
//! ## The console session
//!
//! `POST /v1/trellis/session` takes `{"token"}` or `{"username",
//! "password"}` (the password is a live Trellis token of that user, as the
//! OAuth password grant takes it; the console then mints a new token of
//! that user, named [`SESSION_TOKEN_NAME`], expiring after
//! [`SESSION_SECS`]). The answer sets the cookie [`COOKIE`]: `HttpOnly`
//! (no script reads it), `SameSite=Strict`, `Path=/`, and `Secure` when
//! the API serves HTTPS (`api.tls_cert_file`) or a proxy says it did
//! (`X-Forwarded-Proto: https`). The cookie is accepted only on requests
//! that also carry the header [`CSRF_HEADER`] (which a form post or a
//! link from another site cannot send), so it authenticates only the
//! console's own `fetch()` calls; [`session_cookie`] turns it into the
//! request's bearer token. `DELETE /v1/trellis/session` clears the cookie
//! and revokes the token if the console minted it. The token never
//! appears in a URL: the console reads event streams with `fetch()`.
use crate::devices::device_id;
use crate::error::ApiError;
use crate::grpc::Token;
use crate::{AppState, iso_time};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use trellis_proto::v1::{
    CreateTokenRequest, DeviceUpdateState, GetDeviceRequest, GetDeviceStateRequest,
    GetPolicyRequest, GetRolloutRequest, LiftQuarantineRequest, ListAuditRequest,
    ListDeviceStatesRequest, ListDevicesRequest, ListReleasesRequest, ListRolloutsRequest,
    ListTokensRequest, RevokeDeviceRequest, RevokeTokenRequest, RolloutAction, RolloutStatus,
    SetDeviceTagsRequest, VerifyReleaseRequest, WhoAmIRequest,
};

type Params = Query<HashMap<String, String>>;

/// The session cookie.
pub const COOKIE: &str = "trellis_console";
/// The header the console sends with every request; the cookie counts
/// only together with it.
pub const CSRF_HEADER: &str = "x-trellis-console";
/// The name of tokens minted by a password sign-in (revoked on sign-out).
pub const SESSION_TOKEN_NAME: &str = "console session";
/// Lifetime of a token minted by a password sign-in (12 hours).
pub const SESSION_SECS: u64 = 12 * 3600;
/// Releases checked against their policy per request, newest first.
const MAX_RELEASES: usize = 50;
/// Most audit records one request returns.
const MAX_AUDIT: u32 = 1000;

fn token(headers: &HeaderMap, query: &HashMap<String, String>) -> Result<Token, ApiError> {
    Token::from_request(headers, query, None)
}

fn json_body(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    if body.is_empty() {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request("the body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!("the body is not JSON: {e}"))),
    }
}

fn ms_time(ms: i64) -> Value {
    if ms > 0 {
        Value::String(iso_time(ms))
    } else {
        Value::Null
    }
}

/// `ROLLOUT_STATE_RUNNING` -> `running`.
fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

// ---------------------------------------------------------------- session

/// The cookie's token, if the request has the cookie.
fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Middleware: a request with the console's cookie AND its
/// [`CSRF_HEADER`], and no credential of its own, is authenticated by the
/// cookie's token (as `Authorization: Bearer`). Without the header the
/// cookie is ignored.
pub async fn session_cookie(mut request: Request, next: Next) -> Response {
    let headers = request.headers();
    if !headers.contains_key(header::AUTHORIZATION)
        && headers.contains_key(CSRF_HEADER)
        && let Some(token) = cookie_token(headers)
        && let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}"))
    {
        request.headers_mut().insert(header::AUTHORIZATION, value);
    }
    next.run(request).await
}

/// Characters a token may have to be kept in a cookie unquoted.
fn cookie_safe(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 512
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b))
}

fn secure(state: &AppState, headers: &HeaderMap) -> bool {
    state.https
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

fn set_cookie(value: &str, secure: bool, clear: bool) -> Result<HeaderValue, ApiError> {
    let mut cookie = format!("{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/");
    if clear {
        cookie.push_str("; Max-Age=0");
    }
    if secure {
        cookie.push_str("; Secure");
    }
    HeaderValue::from_str(&cookie)
        .map_err(|_| ApiError::Other(StatusCode::INTERNAL_SERVER_ERROR, "bad cookie".into()))
}

fn need_console_header(headers: &HeaderMap) -> Result<(), ApiError> {
    if headers.contains_key(CSRF_HEADER) {
        Ok(())
    } else {
        Err(ApiError::Other(
            StatusCode::FORBIDDEN,
            format!("console requests must carry the {CSRF_HEADER} header"),
        ))
    }
}

async fn whoami(state: &AppState, token: &Token) -> Result<trellis_proto::v1::Identity, ApiError> {
    Ok(state
        .services
        .access()
        .who_am_i(token.request(WhoAmIRequest {}))
        .await?
        .into_inner())
}

fn identity_json(me: &trellis_proto::v1::Identity) -> Value {
    json!({"user": me.user, "org": me.org, "scopes": me.scopes})
}

/// `POST /v1/trellis/session`: signs in (see the module documentation).
pub async fn sign_in(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    need_console_header(&headers)?;
    let fields = json_body(&body)?;
    let text = |k: &str| fields.get(k).and_then(Value::as_str).unwrap_or("").trim();
    let refused = || ApiError::InvalidToken;
    let (session, me) = if !text("token").is_empty() {
        let given = text("token").to_string();
        if !cookie_safe(&given) {
            return Err(refused());
        }
        let token = Token::new(&given)?;
        let me = whoami(&state, &token).await?;
        (given, me)
    } else if !text("password").is_empty() {
        // The password grant: the password is a live token of the user.
        let password = text("password");
        let username = text("username");
        let token = Token::new(password).map_err(|_| refused())?;
        let me = whoami(&state, &token).await?;
        let qualified = format!("{}@{}", me.user, me.org);
        if me.user.is_empty() || (username != me.user && username != qualified) {
            return Err(refused());
        }
        let created = state
            .services
            .access()
            .create_token(token.request(CreateTokenRequest {
                name: SESSION_TOKEN_NAME.into(),
                scopes: Vec::new(),
                expires_in_secs: SESSION_SECS,
                user: String::new(),
                org: String::new(),
                service: String::new(),
            }))
            .await?
            .into_inner();
        if !cookie_safe(&created.token) {
            return Err(ApiError::Other(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the new token cannot be kept in a cookie".into(),
            ));
        }
        (created.token, me)
    } else {
        return Err(ApiError::bad_request(
            "give a token, or a username and password",
        ));
    };
    tracing::info!(user = %me.user, org = %me.org, "console sign-in");
    let mut response = Json(identity_json(&me)).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(&session, secure(&state, &headers), false)?,
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// `GET /v1/trellis/session`: who the session (or token) is.
pub async fn session(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<Value>, ApiError> {
    let token = token(&headers, &query)?;
    Ok(Json(identity_json(&whoami(&state, &token).await?)))
}

/// `DELETE /v1/trellis/session`: clears the cookie; a token that a
/// password sign-in minted is revoked too.
pub async fn sign_out(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    need_console_header(&headers)?;
    if let Some(t) = cookie_token(&headers)
        && let Ok(token) = Token::new(&t)
        && let Ok(me) = whoami(&state, &token).await
    {
        let minted = state
            .services
            .access()
            .list_tokens(token.request(ListTokensRequest {}))
            .await
            .map(|r| {
                r.into_inner()
                    .tokens
                    .iter()
                    .any(|i| i.id == me.token_id && i.name == SESSION_TOKEN_NAME)
            })
            .unwrap_or(false);
        if minted
            && let Err(e) = state
                .services
                .access()
                .revoke_token(token.request(RevokeTokenRequest { id: me.token_id }))
                .await
        {
            tracing::warn!(error = %e, "cannot revoke the console session's token");
        }
    }
    let mut response = Json(json!({"ok": true})).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie("", secure(&state, &headers), true)?,
    );
    Ok(response)
}

// ---------------------------------------------------------------- devices

/// `GET /v1/trellis/fleet[?product=P]`: every device of the caller's
/// organisation with its live state and registry record, and the counts.
pub async fn fleet(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<Value>, ApiError> {
    let token = token(&headers, &query)?;
    let product = match query.get("product").map(|p| p.trim()) {
        None | Some("") => 0,
        Some(p) => p
            .parse::<u32>()
            .map_err(|_| ApiError::bad_request("product must be a number"))?,
    };
    let mut gateway = state.services.devices();
    let mut keyvault = state.services.keyvault();
    let (live, registry) = tokio::join!(
        gateway.list_devices(token.request(ListDeviceStatesRequest {
            product_id: product,
            online_only: false,
        })),
        keyvault.list_devices(token.request(ListDevicesRequest {
            product_id: product,
        })),
    );
    let live = live?.into_inner().devices;
    // The registry adds tags; a token that may not read it still sees the
    // live states.
    let registry: HashMap<String, trellis_proto::v1::Device> = match registry {
        Ok(r) => r
            .into_inner()
            .devices
            .into_iter()
            .map(|d| (d.device_id.clone(), d))
            .collect(),
        Err(s) if s.code() == tonic::Code::PermissionDenied => HashMap::new(),
        Err(s) => return Err(ApiError::from_status(&s)),
    };
    let mut online = 0;
    let mut devices: Vec<Value> = live
        .iter()
        .map(|d| {
            if d.online {
                online += 1;
            }
            let record = registry.get(&d.device_id);
            json!({
                "id": d.device_id,
                "product_id": d.product_id,
                "platform_id": d.platform_id,
                "online": d.online,
                "firmware_version": d.firmware_version,
                "firmware_sha256": d.firmware_sha256,
                "tags": record.map(|r| r.tags.clone()),
                "last_seen": ms_time(d.last_seen_ms),
                "last_seen_ms": d.last_seen_ms,
                "gateway_id": d.gateway_id,
                "region": d.region,
                "name": d.name,
                "revoked": d.revoked || record.is_some_and(|r| r.revoked),
                "quarantined": d.quarantined_until_ms > 0,
            })
        })
        .collect();
    devices.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    Ok(Json(json!({
        "devices": devices,
        "counts": {"total": live.len(), "online": online, "offline": live.len() - online},
        "time": iso_time(trellis_core::time::now_ms()),
    })))
}

/// `GET /v1/trellis/devices/{id}`: the device's live state, registry
/// record, recent sessions, clone flags and quarantine.
pub async fn device(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<Value>, ApiError> {
    let token = token(&headers, &query)?;
    let id = device_id(&state, &token, &id).await?;
    let live = state
        .services
        .devices()
        .get_device_state(token.request(GetDeviceStateRequest {
            device_id: id.clone(),
        }))
        .await?
        .into_inner();
    let record = match state
        .services
        .keyvault()
        .get_device(token.request(GetDeviceRequest {
            device_id: id.clone(),
        }))
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            json!({
                "organization": r.organization,
                "product_id": r.product_id,
                "tags": r.tags,
                "revoked": r.revoked,
                "registered_at": ms_time(r.registered_at_ms),
                "revoked_at": ms_time(r.revoked_at_ms),
            })
        }
        Err(s) if s.code() == tonic::Code::PermissionDenied => Value::Null,
        Err(s) => return Err(ApiError::from_status(&s)),
    };
    let sessions: Vec<Value> = live
        .recent_sessions
        .iter()
        .map(|s| {
            json!({"time": ms_time(s.time_ms), "gateway_id": s.gateway_id,
                   "peer_addr": s.peer_addr, "epoch": s.epoch})
        })
        .collect();
    let clones: Vec<Value> = live
        .clone_flags
        .iter()
        .map(|c| {
            json!({"time": ms_time(c.time_ms), "gateway_id": c.gateway_id,
                   "peer_addr": c.peer_addr, "other_gateway_id": c.other_gateway_id,
                   "other_peer_addr": c.other_peer_addr, "action": c.action})
        })
        .collect();
    let variables: BTreeMap<&String, &String> = live.variables.iter().collect();
    Ok(Json(json!({
        "id": live.device_id,
        "product_id": live.product_id,
        "platform_id": live.platform_id,
        "online": live.online,
        "gateway_id": live.gateway_id,
        "region": live.region,
        "name": live.name,
        "peer_addr": live.peer_addr,
        "firmware_version": live.firmware_version,
        "firmware_sha256": live.firmware_sha256,
        "connected_at": ms_time(live.connected_at_ms),
        "last_seen": ms_time(live.last_seen_ms),
        "revoked": live.revoked,
        "quarantined_until": ms_time(live.quarantined_until_ms),
        "functions": live.functions,
        "variables": variables,
        "recent_sessions": sessions,
        "clone_flags": clones,
        "record": record,
    })))
}

/// `POST /v1/trellis/devices/{id}/tags` `{"tags": [..]}`: replaces the
/// device's tags.
pub async fn set_tags(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(query): Params,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let token = token(&headers, &query)?;
    let id = device_id(&state, &token, &id).await?;
    let fields = json_body(&body)?;
    let tags: Vec<String> = match fields.get("tags") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::bad_request("tags must be strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(Value::String(s)) => s
            .split([',', ' '])
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect(),
        None | Some(Value::Null) => Vec::new(),
        Some(_) => return Err(ApiError::bad_request("tags must be a list of strings")),
    };
    let device = state
        .services
        .keyvault()
        .set_device_tags(token.request(SetDeviceTagsRequest {
            device_id: id,
            tags,
        }))
        .await?
        .into_inner();
    Ok(Json(
        json!({"ok": true, "id": device.device_id, "tags": device.tags}),
    ))
}

/// `POST /v1/trellis/devices/{id}/revoke` `{"reason"}`: revokes the device
/// (final).
pub async fn revoke(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(query): Params,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let token = token(&headers, &query)?;
    let id = device_id(&state, &token, &id).await?;
    let fields = json_body(&body)?;
    let reason = fields
        .get("reason")
        .and_then(Value::as_str)
        .unwrap_or("revoked in the console")
        .to_string();
    let device = state
        .services
        .keyvault()
        .revoke_device(token.request(RevokeDeviceRequest {
            device_id: id,
            reason,
        }))
        .await?
        .into_inner();
    Ok(Json(
        json!({"ok": true, "id": device.device_id, "revoked": device.revoked}),
    ))
}

/// `POST /v1/trellis/devices/{id}/lift-quarantine`.
pub async fn lift_quarantine(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<Value>, ApiError> {
    let token = token(&headers, &query)?;
    let id = device_id(&state, &token, &id).await?;
    let reply = state
        .services
        .keyvault()
        .lift_quarantine(token.request(LiftQuarantineRequest { device_id: id }))
        .await?
        .into_inner();
    Ok(Json(
        json!({"ok": true, "was_quarantined": reply.was_quarantined}),
    ))
}

// ---------------------------------------------------------------- releases

/// `GET /v1/trellis/releases[?product=P]`: the newest releases, each
/// checked against its product's signing policy (who signed, what is
/// missing), and the policies.
pub async fn releases(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<Value>, ApiError> {
    let token = token(&headers, &query)?;
    let product = match query.get("product").map(|p| p.trim()) {
        None | Some("") => 0,
        Some(p) => p
            .parse::<u32>()
            .map_err(|_| ApiError::bad_request("product must be a number"))?,
    };
    let mut list = state
        .services
        .signer()
        .list_releases(token.request(ListReleasesRequest {
            product_id: product,
        }))
        .await?
        .into_inner()
        .releases;
    list.sort_by_key(|r| std::cmp::Reverse((r.created_at_ms, r.version)));
    list.truncate(MAX_RELEASES);
    let verdicts = futures::future::join_all(list.iter().map(|r| {
        let mut signer = state.services.signer();
        let request = token.request(VerifyReleaseRequest {
            release_id: r.release_id.clone(),
        });
        async move { signer.verify_release(request).await }
    }))
    .await;
    let mut products: Vec<u32> = list.iter().map(|r| r.product_id).collect();
    products.sort_unstable();
    products.dedup();
    let policies = futures::future::join_all(products.iter().map(|p| {
        let mut signer = state.services.signer();
        let request = token.request(GetPolicyRequest { product_id: *p });
        async move { (*p, signer.get_policy(request).await) }
    }))
    .await;
    let mut policy_json = serde_json::Map::new();
    for (product, policy) in policies {
        let value = match policy {
            Ok(p) => {
                let p = p.into_inner();
                json!({
                    "threshold": p.threshold,
                    "cloud_only": p.cloud_only,
                    "keys": p.keys.iter().map(|k| json!({"name": k.name, "key_id": k.key_id})).collect::<Vec<_>>(),
                })
            }
            Err(s) if s.code() == tonic::Code::NotFound => Value::Null,
            Err(s) => return Err(ApiError::from_status(&s)),
        };
        policy_json.insert(product.to_string(), value);
    }
    let releases: Vec<Value> = list
        .iter()
        .zip(verdicts)
        .map(|(r, verdict)| {
            let signatures = r.signed.as_ref().map(|s| s.signatures.len()).unwrap_or(0);
            let check = match verdict {
                Ok(v) => {
                    let v = v.into_inner();
                    json!({"satisfied": v.satisfied, "signed_by": v.signed_by, "missing": v.missing,
                           "threshold": v.threshold, "message": v.message, "warning": v.policy_warning})
                }
                Err(s) => json!({"satisfied": false, "error": s.message()}),
            };
            json!({
                "release_id": r.release_id,
                "product_id": r.product_id,
                "version": r.version,
                "image_sha256": r.image_sha256,
                "image_size": r.image_size,
                "created_at": ms_time(r.created_at_ms),
                "signatures": signatures,
                "policy_check": check,
            })
        })
        .collect();
    Ok(Json(json!({"releases": releases, "policies": policy_json})))
}

// ---------------------------------------------------------------- rollouts

fn rollout_json(r: &RolloutStatus, details: bool) -> Value {
    let spec = r.spec.clone().unwrap_or_default();
    let (mut applied, mut failed, mut in_flight, mut devices) = (0u32, 0u32, 0u32, 0u32);
    let stages: Vec<Value> = r
        .stages
        .iter()
        .map(|s| {
            applied += s.applied;
            failed += s.failed;
            in_flight += s.in_flight;
            devices += s.devices;
            json!({
                "name": s.name, "devices": s.devices, "applied": s.applied,
                "failed": s.failed, "in_flight": s.in_flight, "open": s.open,
                "completed_at": ms_time(s.completed_at_ms),
            })
        })
        .collect();
    let finished = applied + failed;
    let failure_ratio = if finished > 0 {
        f64::from(failed) / f64::from(finished)
    } else {
        0.0
    };
    let mut value = json!({
        "rollout_id": r.rollout_id,
        "release_id": spec.release_id,
        "state": short(r.state().as_str_name(), "ROLLOUT_STATE_"),
        "current_stage": r.current_stage,
        "stages": stages,
        "message": r.message,
        "created_at": ms_time(r.created_at_ms),
        "totals": {"devices": devices, "applied": applied, "failed": failed, "in_flight": in_flight},
        "failure_ratio": failure_ratio,
        "max_failure_ratio": spec.max_failure_ratio,
    });
    if details && let Some(map) = value.as_object_mut() {
        let names: Vec<&str> = r.stages.iter().map(|s| s.name.as_str()).collect();
        let pending: Vec<Value> = r
            .devices
            .iter()
            .filter(|d| d.state() != DeviceUpdateState::Applied)
            .map(|d| {
                json!({
                    "device_id": d.device_id,
                    "state": short(d.state().as_str_name(), "DEVICE_UPDATE_STATE_"),
                    "stage": names.get(d.stage as usize).copied().unwrap_or(""),
                    "reason": d.reason,
                    "attempts": d.attempts,
                    "updated_at": ms_time(d.updated_at_ms),
                })
            })
            .collect();
        map.insert("not_applied".into(), Value::Array(pending));
        map.insert(
            "target".into(),
            spec.target
                .map(|t| {
                    json!({"product_id": t.product_id, "device_ids": t.device_ids,
                                 "percent": t.percent, "tag": t.tag})
                })
                .unwrap_or(Value::Null),
        );
        map.insert("max_concurrent".into(), json!(spec.max_concurrent));
    }
    value
}

fn rollout_error(id: &str) -> impl FnOnce() -> ApiError + '_ {
    move || ApiError::NotFound(format!("Rollout {id} not found (or not yours)"))
}

/// `GET /v1/trellis/rollouts`: every rollout, newest first.
pub async fn rollouts(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<Value>, ApiError> {
    let token = token(&headers, &query)?;
    let mut list = state
        .services
        .ota()
        .list_rollouts(token.request(ListRolloutsRequest {}))
        .await?
        .into_inner()
        .rollouts;
    list.sort_by_key(|r| std::cmp::Reverse(r.created_at_ms));
    let rollouts: Vec<Value> = list.iter().map(|r| rollout_json(r, false)).collect();
    Ok(Json(json!({"rollouts": rollouts})))
}

/// `GET /v1/trellis/rollouts/{id}`: stages, progress, failure ratio
/// against the abort threshold, and the devices not yet applied.
pub async fn rollout(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<Value>, ApiError> {
    let token = token(&headers, &query)?;
    let status = state
        .services
        .ota()
        .get_rollout(token.request(GetRolloutRequest {
            rollout_id: id.clone(),
        }))
        .await
        .map_err(|s| ApiError::from_status_or(&s, rollout_error(&id)))?
        .into_inner();
    Ok(Json(rollout_json(&status, true)))
}

/// `POST /v1/trellis/rollouts/{id}/{pause|resume|abort}` `{"reason"}`.
pub async fn rollout_action(
    State(state): State<AppState>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    Query(query): Params,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let token = token(&headers, &query)?;
    let fields = json_body(&body)?;
    let request = token.request(RolloutAction {
        rollout_id: id.clone(),
        reason: fields
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("from the console")
            .to_string(),
    });
    let mut ota = state.services.ota();
    let reply = match action.as_str() {
        "pause" => ota.pause_rollout(request).await,
        "resume" => ota.resume_rollout(request).await,
        "abort" => ota.abort_rollout(request).await,
        _ => {
            return Err(ApiError::NotFound(format!(
                "no rollout action {action}: pause, resume or abort"
            )));
        }
    }
    .map_err(|s| ApiError::from_status_or(&s, rollout_error(&id)))?
    .into_inner();
    Ok(Json(rollout_json(&reply, true)))
}

// ---------------------------------------------------------------- audit

/// `GET /v1/trellis/audit?limit=N&device=ID&kind=ACTION&actor=TEXT`: the
/// newest audit records. `device` is filtered by keyvault; `kind` (the
/// record's action, exact) and `actor` (substring) here, over the newest
/// 1000 records of that device (or all).
pub async fn audit(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<Value>, ApiError> {
    let token = token(&headers, &query)?;
    let param = |k: &str| query.get(k).map(|v| v.trim()).unwrap_or("").to_string();
    let limit = match param("limit").as_str() {
        "" => 100,
        l => l
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=MAX_AUDIT).contains(l))
            .ok_or_else(|| ApiError::bad_request(format!("limit must be 1 to {MAX_AUDIT}")))?,
    };
    let device = param("device").to_ascii_lowercase();
    let kind = param("kind");
    let actor = param("actor");
    let filtered = !kind.is_empty() || !actor.is_empty();
    let records = state
        .services
        .keyvault()
        .list_audit(token.request(ListAuditRequest {
            limit: if filtered { MAX_AUDIT } else { limit },
            device_id: device,
        }))
        .await?
        .into_inner()
        .records;
    let records: Vec<Value> = records
        .iter()
        .filter(|r| kind.is_empty() || r.action == kind)
        .filter(|r| actor.is_empty() || r.actor.contains(actor.as_str()))
        .take(limit as usize)
        .map(|r| {
            let detail: BTreeMap<&String, &String> = r.detail.iter().collect();
            json!({
                "id": r.id, "time": ms_time(r.time_ms), "actor": r.actor, "action": r.action,
                "device_id": r.device_id, "outcome": r.outcome, "detail": detail,
            })
        })
        .collect();
    Ok(Json(json!({"records": records})))
}

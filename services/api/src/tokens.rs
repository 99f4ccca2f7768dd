//! The caller and their tokens: `/v1/user`, `/v1/access_tokens/...` and
//! `/oauth/token` (PARTICLE-API.md §1).
//!
//! Trellis users have no passwords: the password grant takes a live
//! Trellis token of that user as the password and answers a NEW token of
//! the same user (with every scope the user's role grants, never more than
//! the presented token's user has), expiring as `expires_in` asks.
use crate::devices::body_fields;
use crate::error::{ApiError, ErrorBody};
use crate::grpc::{Token, token_id};
use crate::{AppState, iso_time};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use base64::Engine;
use serde::Serialize;
use std::collections::HashMap;
use trellis_proto::v1::{
    CreateTokenRequest, Identity, ListTokensRequest, RevokeTokenRequest, WhoAmIRequest,
};
use utoipa::ToSchema;

type Params = Query<HashMap<String, String>>;

/// The client ids Particle's clients send (CLI, SDK, Particle's docs); the
/// secret is the id, as Particle's public clients have it.
const CLIENTS: [&str; 3] = ["particle-cli", "particle-api", "particle"];

/// Particle's default token lifetime (90 days), when `expires_in` is absent.
const DEFAULT_EXPIRES_IN: u64 = 7_776_000;

/// `GET /v1/user`. Fields in alphabetical order, as the sorted JSON object
/// the clients were tested against.
#[derive(Debug, Serialize, ToSchema)]
pub struct User {
    pub account_info: AccountInfo,
    pub mfa: Mfa,
    /// Always true: Trellis users have no passwords.
    pub no_password: bool,
    /// The user's organisation.
    pub org: String,
    pub scim_provisioned: bool,
    /// Always empty.
    pub subscription_ids: Vec<String>,
    /// The Trellis user name.
    pub username: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AccountInfo {
    pub business_account: bool,
    /// The user name.
    pub first_name: String,
    pub last_name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Mfa {
    pub enabled: bool,
}

/// `GET /v1/access_tokens/current`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CurrentToken {
    /// The token's name.
    pub client: String,
    /// When it expires (ISO 8601), null for never.
    pub expires_at: Option<String>,
    /// Always empty.
    pub orgs: Vec<String>,
    /// The token's scopes.
    pub scopes: Vec<String>,
}

/// `{"ok": true}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct OkReply {
    pub ok: bool,
}

impl OkReply {
    pub fn json() -> Json<OkReply> {
        Json(OkReply { ok: true })
    }
}

/// `POST /oauth/token`: the new token.
#[derive(Debug, Serialize, ToSchema)]
pub struct OAuthToken {
    pub access_token: String,
    /// Seconds until it expires (0: never).
    pub expires_in: u64,
    /// Always `bearer`.
    pub token_type: String,
}

/// The form of `POST /oauth/token`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct OAuthTokenRequest {
    /// Only `password`.
    pub grant_type: String,
    /// The Trellis user name, or `user@organisation`.
    pub username: String,
    /// A live Trellis token of that user.
    pub password: String,
    /// `particle-cli`, `particle-api` or `particle` (or HTTP Basic).
    pub client_id: Option<String>,
    /// The client id again.
    pub client_secret: Option<String>,
    /// Lifetime of the new token in seconds (0: never expires; default 90 days).
    pub expires_in: Option<u64>,
}

async fn who(state: &AppState, token: &Token) -> Result<Identity, ApiError> {
    Ok(state
        .services
        .access()
        .who_am_i(token.request(WhoAmIRequest {}))
        .await?
        .into_inner())
}

/// `GET /v1/user`: `username` is the Trellis user name.
#[utoipa::path(get, path = "/v1/user", tag = "tokens",
    responses((status = 200, description = "The caller", body = User)))]
pub async fn user(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<User>, ApiError> {
    let token = Token::from_request(&headers, &query, None)?;
    let me = who(&state, &token).await?;
    Ok(Json(User {
        account_info: AccountInfo {
            business_account: false,
            first_name: me.user.clone(),
            last_name: String::new(),
        },
        mfa: Mfa { enabled: false },
        no_password: true,
        org: me.org,
        scim_provisioned: false,
        subscription_ids: Vec::new(),
        username: me.user,
    }))
}

/// `GET /v1/access_tokens/current`: `expires_at` (null: never).
#[utoipa::path(get, path = "/v1/access_tokens/current", tag = "tokens",
    responses((status = 200, description = "The token the request carries", body = CurrentToken)))]
pub async fn current(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<CurrentToken>, ApiError> {
    let token = Token::from_request(&headers, &query, None)?;
    let me = who(&state, &token).await?;
    let tokens = state
        .services
        .access()
        .list_tokens(token.request(ListTokensRequest {}))
        .await?
        .into_inner()
        .tokens;
    let info = tokens.iter().find(|t| t.id == me.token_id);
    Ok(Json(CurrentToken {
        client: info.map(|t| t.name.clone()).unwrap_or_default(),
        expires_at: info
            .filter(|t| t.expires_ms > 0)
            .map(|t| iso_time(t.expires_ms)),
        orgs: Vec::new(),
        scopes: me.scopes,
    }))
}

/// `DELETE /v1/access_tokens/current`: revokes the token the request carries.
#[utoipa::path(delete, path = "/v1/access_tokens/current", tag = "tokens",
    responses((status = 200, description = "The token is revoked", body = OkReply)))]
pub async fn delete_current(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Json<OkReply>, ApiError> {
    let token = Token::from_request(&headers, &query, None)?;
    let me = who(&state, &token).await?;
    state
        .services
        .access()
        .revoke_token(token.request(RevokeTokenRequest { id: me.token_id }))
        .await?;
    Ok(OkReply::json())
}

/// `DELETE /v1/access_tokens/:token`. Particle's SDK sends no credentials
/// here, so knowing the whole token is the authority to revoke it (the
/// token authenticates its own revocation). Failures never answer 401,
/// which would make the CLI forget the login of the user revoking another
/// token.
#[utoipa::path(delete, path = "/v1/access_tokens/{token}", tag = "tokens", security(()),
    params(("token" = String, Path, pattern = "^(?!current$)",
        description = "The whole token to revoke (it authenticates its own revocation); \
                       `current` is `DELETE /v1/access_tokens/current`, the caller's own token")),
    responses(
        (status = 200, description = "The token is revoked", body = OkReply),
        (status = 404, description = "No such live token", body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    Path(presented): Path<String>,
) -> Result<Json<OkReply>, ApiError> {
    let not_found = || {
        ApiError::Other(
            StatusCode::NOT_FOUND,
            "Token not found, or already revoked or expired".into(),
        )
    };
    let id = token_id(&presented).ok_or_else(not_found)?;
    let token = Token::new(&presented).map_err(|_| not_found())?;
    state
        .services
        .access()
        .revoke_token(token.request(RevokeTokenRequest { id }))
        .await
        .map_err(|s| match ApiError::from_status(&s) {
            ApiError::InvalidToken | ApiError::UnknownDevice => not_found(),
            other => other,
        })?;
    Ok(OkReply::json())
}

fn oauth(status: StatusCode, error: &'static str, description: &str) -> ApiError {
    ApiError::OAuth(status, error, description.to_string())
}

/// The OAuth client of a token request: form fields, else HTTP Basic.
fn client_ok(headers: &HeaderMap, fields: &HashMap<String, String>) -> bool {
    let (id, secret) = match (fields.get("client_id"), fields.get("client_secret")) {
        (Some(id), secret) => (id.clone(), secret.cloned().unwrap_or_default()),
        (None, _) => {
            let Some(basic) = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    v.strip_prefix("Basic ")
                        .or_else(|| v.strip_prefix("basic "))
                })
            else {
                return false;
            };
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(basic.trim()) else {
                return false;
            };
            let text = String::from_utf8_lossy(&decoded).into_owned();
            let Some((id, secret)) = text.split_once(':') else {
                return false;
            };
            (id.to_string(), secret.to_string())
        }
    };
    CLIENTS.contains(&id.as_str()) && secret == id
}

/// `POST /oauth/token`, `grant_type=password`: the password is a live
/// Trellis token of `username` (user name, or `user@organisation`); the
/// answer is a new token of that user.
#[utoipa::path(post, path = "/oauth/token", tag = "tokens", security((), ("basic" = [])),
    request_body(content(
        (OAuthTokenRequest = "application/x-www-form-urlencoded"),
        (OAuthTokenRequest = "application/json"))),
    responses(
        (status = 200, description = "A new token of the user", body = OAuthToken),
        (status = 400, description = "`invalid_request`, `unsupported_grant_type` or `invalid_grant`", body = ErrorBody),
        (status = 401, description = "`invalid_client`: the client id or secret is wrong", body = ErrorBody)))]
pub async fn oauth_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<OAuthToken>, ApiError> {
    let fields = body_fields(&headers, &body).map_err(|_| {
        oauth(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The request body must be a form (application/x-www-form-urlencoded)",
        )
    })?;
    if !client_ok(&headers, &fields) {
        return Err(oauth(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Client authentication failed: send client_id and client_secret (particle-cli, particle-api or particle)",
        ));
    }
    let grant = fields
        .get("grant_type")
        .map(String::as_str)
        .unwrap_or_default();
    if grant != "password" {
        return Err(oauth(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "Only grant_type=password is supported",
        ));
    }
    let invalid = || {
        oauth(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "User credentials are invalid",
        )
    };
    let username = fields.get("username").cloned().unwrap_or_default();
    let password = fields.get("password").cloned().unwrap_or_default();
    let expires_in = match fields.get("expires_in").map(|s| s.trim()) {
        None | Some("") => DEFAULT_EXPIRES_IN,
        Some(s) => s.parse::<u64>().map_err(|_| {
            oauth(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "expires_in must be a number of seconds (0: never expires)",
            )
        })?,
    };
    let token = Token::new(&password).map_err(|_| invalid())?;
    let me = who(&state, &token).await.map_err(|e| match e {
        ApiError::InvalidToken => invalid(),
        other => other,
    })?;
    let qualified = format!("{}@{}", me.user, me.org);
    if me.user.is_empty() || (username != me.user && username != qualified) {
        return Err(invalid());
    }
    let client = fields
        .get("client_id")
        .cloned()
        .unwrap_or_else(|| "particle".into());
    let created = state
        .services
        .access()
        .create_token(token.request(CreateTokenRequest {
            name: format!("{client} login"),
            scopes: Vec::new(),
            expires_in_secs: expires_in,
            user: String::new(),
            org: String::new(),
            service: String::new(),
        }))
        .await?
        .into_inner();
    Ok(Json(OAuthToken {
        access_token: created.token,
        expires_in,
        token_type: "bearer".into(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn typed_replies_are_the_same_bytes_as_before() {
        let user = User {
            account_info: AccountInfo {
                business_account: false,
                first_name: "owner".into(),
                last_name: String::new(),
            },
            mfa: Mfa { enabled: false },
            no_password: true,
            org: "default".into(),
            scim_provisioned: false,
            subscription_ids: Vec::new(),
            username: "owner".into(),
        };
        let old = json!({
            "username": "owner",
            "org": "default",
            "subscription_ids": [],
            "account_info": {"first_name": "owner", "last_name": "", "business_account": false},
            "scim_provisioned": false,
            "no_password": true,
            "mfa": {"enabled": false},
        });
        assert_eq!(serde_json::to_string(&user).expect("json"), old.to_string());
        for expires_at in [None, Some("2026-01-01T00:00:00.000Z".to_string())] {
            let current = CurrentToken {
                client: "cli".into(),
                expires_at: expires_at.clone(),
                orgs: Vec::new(),
                scopes: vec!["devices:read".into()],
            };
            let old = json!({
                "expires_at": expires_at,
                "client": "cli",
                "scopes": ["devices:read"],
                "orgs": [],
            });
            assert_eq!(
                serde_json::to_string(&current).expect("json"),
                old.to_string()
            );
        }
        let token = OAuthToken {
            access_token: "t".into(),
            expires_in: 60,
            token_type: "bearer".into(),
        };
        assert_eq!(
            serde_json::to_string(&token).expect("json"),
            json!({"token_type": "bearer", "access_token": "t", "expires_in": 60}).to_string()
        );
        assert_eq!(
            serde_json::to_string(&OkReply { ok: true }).expect("json"),
            json!({"ok": true}).to_string()
        );
    }
}

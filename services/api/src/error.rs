//! Errors as Particle's clients read them (PARTICLE-API.md, "Error
//! replies"): always a JSON body; 401 and the words "access token" only
//! for token problems, because particle-cli wipes its saved login on them.
//!
//! Every gRPC status becomes an HTTP answer in [`ApiError::from_status`],
//! and only there.
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tonic::Code;
use utoipa::ToSchema;

/// Every error body (PARTICLE-API.md, "Error replies"). Token and OAuth
/// problems carry `error` and `error_description`; every other error
/// carries `ok: false`, `error` and, for "Permission Denied", `info`.
/// Fields in alphabetical order: the bytes on the wire are those of the
/// sorted JSON object the clients were tested against.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong (`invalid_token`, `Permission Denied`, a message).
    pub error: String,
    /// Token and OAuth errors: the explanation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
    /// "Permission Denied": why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<String>,
    /// Always false when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ok: Option<bool>,
}

impl ErrorBody {
    fn oauth(error: &str, description: &str) -> Self {
        Self {
            error: error.into(),
            error_description: Some(description.into()),
            info: None,
            ok: None,
        }
    }

    fn refusal(error: &str, info: Option<&str>) -> Self {
        Self {
            error: error.into(),
            error_description: None,
            info: info.map(str::to_string),
            ok: Some(false),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// No token in the request: 400 `invalid_request`.
    MissingToken,
    /// A token the services refused (unknown, revoked, expired, malformed):
    /// 401 `invalid_token`.
    InvalidToken,
    /// A device that does not exist or is not the caller's: 403, as
    /// Particle answers for both.
    UnknownDevice,
    /// The token lacks a scope: 403 `Permission Denied` with the reason.
    PermissionDenied(String),
    /// A function or variable the device does not have: 404.
    NotFound(String),
    /// Anything else, with the status and the message for `error`.
    Other(StatusCode, String),
    /// OAuth errors (`/oauth/token`): `{"error", "error_description"}`.
    OAuth(StatusCode, &'static str, String),
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::Other(StatusCode::BAD_REQUEST, message.into())
    }

    /// The one mapping from a gRPC status to an HTTP answer. NOT_FOUND
    /// means "no such device for you" (the gateway answers another
    /// organisation's device exactly like a missing one); handlers that
    /// already resolved the device map a later NOT_FOUND to the missing
    /// function or variable themselves.
    pub fn from_status(status: &tonic::Status) -> Self {
        let message = sanitize(status.message());
        match status.code() {
            Code::Unauthenticated => Self::InvalidToken,
            Code::PermissionDenied => Self::PermissionDenied(message),
            Code::NotFound => Self::UnknownDevice,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                Self::Other(StatusCode::BAD_REQUEST, message)
            }
            Code::AlreadyExists | Code::Aborted => Self::Other(StatusCode::CONFLICT, message),
            Code::ResourceExhausted => Self::Other(StatusCode::TOO_MANY_REQUESTS, message),
            Code::DeadlineExceeded => Self::Other(StatusCode::REQUEST_TIMEOUT, "Timed out.".into()),
            Code::Unavailable => Self::Other(StatusCode::SERVICE_UNAVAILABLE, message),
            Code::Unimplemented => Self::Other(StatusCode::NOT_IMPLEMENTED, message),
            _ => Self::Other(StatusCode::INTERNAL_SERVER_ERROR, message),
        }
    }

    /// As [`Self::from_status`], but NOT_FOUND is `missing` (a function or
    /// variable of a device the caller was just shown).
    pub fn from_status_or(status: &tonic::Status, missing: impl FnOnce() -> ApiError) -> Self {
        if status.code() == Code::NotFound {
            missing()
        } else {
            Self::from_status(status)
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingToken => StatusCode::BAD_REQUEST,
            Self::InvalidToken => StatusCode::UNAUTHORIZED,
            Self::UnknownDevice | Self::PermissionDenied(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Other(s, _) | Self::OAuth(s, _, _) => *s,
        }
    }

    /// The body as its typed form (the schema in the OpenAPI document).
    pub fn error_body(&self) -> ErrorBody {
        match self {
            Self::MissingToken => {
                ErrorBody::oauth("invalid_request", "The access token was not found")
            }
            Self::InvalidToken => {
                ErrorBody::oauth("invalid_token", "The access token provided is invalid.")
            }
            Self::UnknownDevice => ErrorBody::refusal(
                "Permission Denied",
                Some("I didn't recognize that device name or ID"),
            ),
            Self::PermissionDenied(info) => ErrorBody::refusal("Permission Denied", Some(info)),
            Self::NotFound(message) | Self::Other(_, message) => ErrorBody::refusal(message, None),
            Self::OAuth(_, error, description) => ErrorBody::oauth(error, description),
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(self.error_body()).unwrap_or_default()
    }
}

/// Messages from the services, shown to Particle's clients: they must not
/// say "access token" (the CLI would take that for a token problem and
/// forget its login).
fn sanitize(message: &str) -> String {
    let lower = message.to_ascii_lowercase();
    if lower.contains("access token") || lower.contains("access_token") {
        message
            .replace("access token", "credential")
            .replace("Access token", "Credential")
            .replace("access_token", "credential")
    } else {
        message.to_string()
    }
}

impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> Self {
        Self::from_status(&status)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = ?self, "request failed");
        } else {
            tracing::info!(status = status.as_u16(), error = ?self, "request refused");
        }
        (status, Json(self.error_body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_token_problems_are_401_or_mention_the_access_token() {
        for code in [
            Code::PermissionDenied,
            Code::NotFound,
            Code::InvalidArgument,
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Internal,
            Code::ResourceExhausted,
        ] {
            let e = ApiError::from_status(&tonic::Status::new(code, "the access token x"));
            assert_ne!(e.status(), StatusCode::UNAUTHORIZED, "{code:?}");
            let body = e.body().to_string().to_ascii_lowercase();
            assert!(!body.contains("access token"), "{code:?}: {body}");
        }
        let e = ApiError::from_status(&tonic::Status::unauthenticated("token x was revoked"));
        assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(e.body()["error"], "invalid_token");
        assert_eq!(ApiError::MissingToken.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn the_typed_bodies_are_the_bytes_the_clients_were_tested_against() {
        use serde_json::json;
        let cases = [
            (
                ApiError::MissingToken,
                json!({"error": "invalid_request", "error_description": "The access token was not found"}),
            ),
            (
                ApiError::InvalidToken,
                json!({"error": "invalid_token", "error_description": "The access token provided is invalid."}),
            ),
            (
                ApiError::UnknownDevice,
                json!({"ok": false, "error": "Permission Denied", "info": "I didn't recognize that device name or ID"}),
            ),
            (
                ApiError::PermissionDenied("why".into()),
                json!({"ok": false, "error": "Permission Denied", "info": "why"}),
            ),
            (
                ApiError::NotFound("Variable not found".into()),
                json!({"ok": false, "error": "Variable not found"}),
            ),
            (
                ApiError::bad_request("no"),
                json!({"ok": false, "error": "no"}),
            ),
            (
                ApiError::OAuth(StatusCode::BAD_REQUEST, "invalid_grant", "bad".into()),
                json!({"error": "invalid_grant", "error_description": "bad"}),
            ),
        ];
        for (error, before) in cases {
            let typed = serde_json::to_string(&error.error_body()).expect("serialises");
            assert_eq!(typed, before.to_string(), "{error:?}");
        }
    }

    #[test]
    fn another_organisations_device_is_permission_denied() {
        let e = ApiError::from_status(&tonic::Status::not_found("device x is not registered"));
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        assert_eq!(e.body()["error"], "Permission Denied");
    }
}

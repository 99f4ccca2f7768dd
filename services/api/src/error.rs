//! Errors as Particle's clients read them (PARTICLE-API.md, "Error
//! replies"): always a JSON body; 401 and the words "access token" only
//! for token problems, because particle-cli wipes its saved login on them.
//!
//! Every gRPC status becomes an HTTP answer in [`ApiError::from_status`],
//! and only there.
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tonic::Code;

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

    pub fn body(&self) -> serde_json::Value {
        match self {
            Self::MissingToken => json!({
                "error": "invalid_request",
                "error_description": "The access token was not found",
            }),
            Self::InvalidToken => json!({
                "error": "invalid_token",
                "error_description": "The access token provided is invalid.",
            }),
            Self::UnknownDevice => json!({
                "ok": false,
                "error": "Permission Denied",
                "info": "I didn't recognize that device name or ID",
            }),
            Self::PermissionDenied(info) => json!({
                "ok": false,
                "error": "Permission Denied",
                "info": info,
            }),
            Self::NotFound(message) | Self::Other(_, message) => json!({
                "ok": false,
                "error": message,
            }),
            Self::OAuth(_, error, description) => json!({
                "error": error,
                "error_description": description,
            }),
        }
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
        (status, Json(self.body())).into_response()
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
    fn another_organisations_device_is_permission_denied() {
        let e = ApiError::from_status(&tonic::Status::not_found("device x is not registered"));
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        assert_eq!(e.body()["error"], "Permission Denied");
    }
}

//! The scheduler's errors, mapped to gRPC status codes at the edge. Every
//! message says what to fix.
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum OtaError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

pub type Result<T, E = OtaError> = std::result::Result<T, E>;

impl From<OtaError> for Status {
    fn from(e: OtaError) -> Self {
        if let OtaError::Redis(r) = &e {
            trellis_core::metrics::redis_error("ota", r);
        }
        let code = match &e {
            OtaError::InvalidArgument(_) => Code::InvalidArgument,
            OtaError::NotFound(_) => Code::NotFound,
            OtaError::FailedPrecondition(_) => Code::FailedPrecondition,
            OtaError::Unavailable(_) | OtaError::Redis(_) => Code::Unavailable,
            OtaError::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

impl From<crate::release::ReleaseError> for OtaError {
    fn from(e: crate::release::ReleaseError) -> Self {
        match e {
            crate::release::ReleaseError::NotFound(_) => OtaError::NotFound(e.to_string()),
            crate::release::ReleaseError::Incomplete(_) => {
                OtaError::FailedPrecondition(e.to_string())
            }
            crate::release::ReleaseError::Unavailable { .. } => {
                OtaError::Unavailable(e.to_string())
            }
        }
    }
}

//! keyvault's errors, and how each becomes a gRPC status at the edge. The
//! messages say what to fix; none carries key material.
use crate::pool::PoolError;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum KeyvaultError {
    /// The caller sent something malformed.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    /// The request is well formed but conflicts with what is stored.
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("redis is unavailable ({0}); keyvault reconnects by itself, retry shortly")]
    Redis(#[from] redis::RedisError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<trellis_records::RecordError> for KeyvaultError {
    fn from(e: trellis_records::RecordError) -> Self {
        use trellis_records::RecordError as R;
        match e {
            R::Invalid(m) => KeyvaultError::InvalidArgument(m),
            R::Redis(e) => KeyvaultError::Redis(e),
            R::Corrupt(m) | R::Internal(m) => KeyvaultError::Internal(m),
        }
    }
}

impl From<KeyvaultError> for Status {
    fn from(e: KeyvaultError) -> Self {
        let message = e.to_string();
        match e {
            KeyvaultError::InvalidArgument(_) => Status::invalid_argument(message),
            KeyvaultError::NotFound(_) => Status::not_found(message),
            KeyvaultError::FailedPrecondition(_) => Status::failed_precondition(message),
            KeyvaultError::Pool(PoolError::Full { .. } | PoolError::Expired { .. }) => {
                Status::resource_exhausted(message)
            }
            KeyvaultError::Pool(PoolError::Stopped) => Status::unavailable(message),
            KeyvaultError::Pool(PoolError::Backend(_)) => Status::internal(message),
            KeyvaultError::Redis(e) => {
                trellis_core::metrics::redis_error("keyvault", &e);
                Status::unavailable(message)
            }
            KeyvaultError::Internal(_) => Status::internal(message),
        }
    }
}

pub type Result<T, E = KeyvaultError> = std::result::Result<T, E>;

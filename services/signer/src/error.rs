//! The signer's errors, and how each becomes a gRPC status at the edge. Every
//! message says what to fix; none carries key material.
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// The caller sent something malformed.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The client's stream broke off; nothing was stored.
    #[error("{0}")]
    Aborted(String),
    /// Well formed, but conflicts with what is stored (no policy, a key the
    /// policy does not trust, an image of another product).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Keyvault refused or could not be reached.
    #[error("keyvault ({url}): {message}")]
    Keyvault {
        url: String,
        code: Code,
        message: String,
    },
    #[error("redis is unavailable ({0}); the signer reconnects by itself, retry shortly")]
    Redis(#[from] redis::RedisError),
    /// A stored record cannot be read back.
    #[error("{0}")]
    Corrupt(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<trellis_records::RecordError> for SignerError {
    fn from(e: trellis_records::RecordError) -> Self {
        use trellis_records::RecordError as R;
        match e {
            R::Invalid(m) => SignerError::InvalidArgument(m),
            R::Corrupt(m) => SignerError::Corrupt(m),
            R::Internal(m) => SignerError::Internal(m),
            R::Redis(e) => SignerError::Redis(e),
        }
    }
}

impl SignerError {
    pub fn keyvault(url: &str, status: &Status) -> Self {
        SignerError::Keyvault {
            url: url.to_string(),
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

impl From<SignerError> for Status {
    fn from(e: SignerError) -> Self {
        let message = e.to_string();
        match e {
            SignerError::InvalidArgument(_) => Status::invalid_argument(message),
            SignerError::NotFound(_) => Status::not_found(message),
            SignerError::AlreadyExists(_) => Status::already_exists(message),
            SignerError::Aborted(_) => Status::aborted(message),
            SignerError::FailedPrecondition(_) => Status::failed_precondition(message),
            SignerError::Keyvault { code, .. } => match code {
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                    Status::unavailable(message)
                }
                Code::ResourceExhausted => Status::resource_exhausted(message),
                _ => Status::internal(message),
            },
            SignerError::Redis(e) => {
                trellis_core::metrics::redis_error("signer", &e);
                Status::unavailable(message)
            }
            SignerError::Corrupt(_) | SignerError::Internal(_) => Status::internal(message),
        }
    }
}

pub type Result<T, E = SignerError> = std::result::Result<T, E>;

//! Records one service writes and others read, in one place: the layout of
//! each (field names, encodings) and the reads of it. Key names are in
//! `trellis_core::redis_conn::keys`; who may write which key is in
//! `trellis_core::redis_conn::acl`.
pub mod policy_release;
pub mod registry;
pub mod release;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The caller named a record in a form that cannot exist.
    #[error("{0}")]
    Invalid(String),
    /// A stored record cannot be read back.
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

//! What every Trellis service shares: configuration, telemetry, Redis access,
//! the audit log, and graceful shutdown.
pub mod admin;
pub mod audit;
pub mod config;
pub mod heap;
pub mod keys;
pub mod local_redis;
pub mod metrics;
pub mod outbound;
pub mod redis_conn;
pub mod shutdown;
pub mod telemetry;
pub mod time;
pub mod tls;

pub use config::Config;
pub use shutdown::Shutdown;

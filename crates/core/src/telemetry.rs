//! Logging and tracing setup. Every service calls [`init`] once; spans go to
//! the log now, and to OTLP once the exporter is wired (issue: observability).
use crate::config::TelemetryConfig;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG` wins over the configured filter.
/// Safe to call twice (tests): the second call is a no-op.
pub fn init(service: &str, config: &TelemetryConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
    tracing::debug!(service, "telemetry initialised");
}

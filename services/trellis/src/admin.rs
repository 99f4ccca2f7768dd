//! Starts the admin HTTP port (`/metrics`, `/healthz`, `/readyz`) for a
//! service mode, with the readiness checks that mode depends on.
use anyhow::Context;
use trellis_core::admin::{self, ReadinessCheck};
use trellis_core::{Config, Shutdown};

/// Binds `telemetry.admin_listen` (empty: no admin port) and serves it in
/// the background. Returns the bound address.
pub async fn spawn(
    config: &Config,
    checks: Vec<ReadinessCheck>,
    shutdown: Shutdown,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    let listen = &config.telemetry.admin_listen;
    if listen.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| {
            format!("cannot listen for admin HTTP on {listen} (telemetry.admin_listen)")
        })?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = admin::serve(listener, checks, shutdown).await {
            tracing::warn!(error = %e, "admin HTTP server stopped");
        }
    });
    tracing::info!(%addr, "admin HTTP: /metrics /healthz /readyz");
    Ok(Some(addr))
}

/// `host:port` of a URL such as `http://keyvault:7100`.
pub fn authority(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.split('/').next().unwrap_or(rest).to_string()
}

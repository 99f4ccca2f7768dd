//! The admin HTTP port: `/metrics` (Prometheus text), `/healthz` (the
//! process answers) and `/readyz` (Redis and the services this one depends
//! on answer). Kubernetes probes and Prometheus scrape it.
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// One readiness condition, e.g. "redis answers PING".
#[derive(Clone)]
pub struct ReadinessCheck {
    pub name: String,
    check: Arc<dyn Fn() -> CheckFuture + Send + Sync>,
}

impl ReadinessCheck {
    pub fn new<F, Fut>(name: impl Into<String>, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        Self {
            name: name.into(),
            check: Arc::new(move || Box::pin(check())),
        }
    }

    /// Ready when Redis at `url` answers PING.
    pub fn redis(url: String) -> Self {
        Self::new("redis", move || {
            let url = url.clone();
            async move {
                let mut conn = crate::redis_conn::connect(&url)
                    .await
                    .map_err(|e| e.to_string())?;
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        })
    }

    /// Ready when a TCP connection to `addr` (host:port) opens.
    pub fn tcp(name: impl Into<String>, addr: String) -> Self {
        Self::new(name, move || {
            let addr = addr.clone();
            async move {
                tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    tokio::net::TcpStream::connect(&addr),
                )
                .await
                .map_err(|_| format!("{addr}: timed out"))?
                .map(|_| ())
                .map_err(|e| format!("{addr}: {e}"))
            }
        })
    }
}

async fn metrics() -> Result<String, (StatusCode, String)> {
    let families = crate::telemetry::registry().gather();
    prometheus::TextEncoder::new()
        .encode_to_string(&families)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn ready(State(checks): State<Arc<Vec<ReadinessCheck>>>) -> (StatusCode, String) {
    let mut report = String::new();
    let mut ok = true;
    for c in checks.iter() {
        match tokio::time::timeout(std::time::Duration::from_secs(3), (c.check)()).await {
            Ok(Ok(())) => report.push_str(&format!("{}: ok\n", c.name)),
            Ok(Err(e)) => {
                ok = false;
                report.push_str(&format!("{}: {e}\n", c.name));
            }
            Err(_) => {
                ok = false;
                report.push_str(&format!("{}: no answer within 3 s\n", c.name));
            }
        }
    }
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, report)
}

/// Serves the admin endpoints on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    checks: Vec<ReadinessCheck>,
    mut shutdown: crate::Shutdown,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Arc::new(checks));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readyz_never_shows_a_redis_password() {
        // A port nothing listens on: the check fails and says why.
        let port = crate::local_redis::free_port().expect("port");
        let checks = vec![ReadinessCheck::redis(format!(
            "redis://trellis:hunter2-s3cret@127.0.0.1:{port}/0"
        ))];
        let (status, body) = ready(State(Arc::new(checks))).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.starts_with("redis: "), "{body}");
        assert!(!body.contains("hunter2"), "password in /readyz: {body}");
        assert!(body.contains("trellis:***@127.0.0.1"), "{body}");
    }
}

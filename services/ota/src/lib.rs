//! trellis-ota: the OTA scheduler.
//!
//! A rollout sends one signed release to a target (a product's fleet or
//! named devices, optionally a percentage) in stages (canary, percentages),
//! each with a soak time and a success gate; a failure ratio aborts it; a
//! cap limits devices updating at once; a maintenance window limits when
//! anything starts; an optional approval URL must say yes per device.
//! Everything lives in Redis, so a restarted scheduler carries on and
//! replicas share the work through per-rollout leases.
//!
//! - [`spec`]: checking a request, stage plans, windows (no I/O);
//! - [`record`]: the rollout and device records;
//! - [`store`]: Redis access and the Lua scripts (lease, fencing, CAS);
//! - [`scheduler`]: the tick loop, DeviceHello, pause/resume/abort;
//! - [`clock`], [`deliver`], [`approval`], [`release`]: what the scheduler
//!   depends on, behind traits so tests inject their own;
//! - [`service`]: the gRPC edge.
pub mod approval;
pub mod clock;
pub mod deliver;
pub mod error;
pub mod record;
pub mod release;
pub mod scheduler;
pub mod service;
pub mod spec;
pub mod store;

use anyhow::Context;
use std::sync::Arc;
use tokio::net::TcpListener;
use trellis_core::{Config, Shutdown};

pub use approval::{ApprovalRequest, Approver, Decision, HttpApprover};
pub use clock::{Clock, ManualClock, SystemClock};
pub use deliver::{Deliverer, GatewayDeliverer};
pub use error::OtaError;
pub use release::{MemoryReleases, ReleaseInfo, ReleaseSource, SignerReleases};
pub use scheduler::{Parts, Scheduler, Settings};
pub use service::OtaService;

/// Binds `ota.listen` and serves until `shutdown` fires.
pub async fn serve(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&config.ota.listen)
        .await
        .with_context(|| format!("ota cannot listen on {} (ota.listen)", config.ota.listen))?;
    serve_with_listener(config, listener, shutdown).await
}

/// Serves on a listener the caller bound, with the real gateway, signer and
/// approval clients.
pub async fn serve_with_listener(
    config: Config,
    listener: TcpListener,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let tls = trellis_core::tls::ServiceTls::load(&config, trellis_core::tls::Role::Ota)?;
    let parts = Parts {
        clock: Arc::new(SystemClock),
        deliverer: Arc::new(GatewayDeliverer::new(
            &config.ota.gateway_url,
            tls.as_ref(),
        )?),
        approver: Arc::new(HttpApprover::from_config(&config)?),
        releases: Arc::new(SignerReleases::new(&config.ota.signer_url, tls.as_ref())?),
    };
    serve_with_parts(config, listener, parts, shutdown).await
}

/// The scheduler over Redis with the given parts (tests inject a clock, a
/// simulated fleet, releases).
pub async fn build(config: &Config, parts: Parts) -> anyhow::Result<Scheduler> {
    // Durable records: `redis.durable_url` (default `redis.url`), or the
    // primary Sentinel names when `redis.sentinels` is set.
    let redis = trellis_core::redis_conn::connect_durable(&config.redis)
        .await
        .context("ota needs Redis for durable records: set redis.url in trellis.toml or TRELLIS_REDIS__URL (e.g. redis://127.0.0.1:6379/), or redis.durable_url / redis.sentinels")?;
    // Sessions and reported firmware live in this region's Redis
    // (`redis.url`), which is not the durable store in a multi-region
    // deployment.
    let regional = match config.redis.url.as_deref() {
        Some(url)
            if Some(url) != config.redis.effective_durable_url()
                || !config.redis.sentinels.is_empty() =>
        {
            trellis_core::redis_conn::connect(url)
                .await
                .context("ota needs this region's Redis (redis.url) for session ownership")?
        }
        _ => redis.clone(),
    };
    Ok(Scheduler::with_regional(
        redis,
        regional,
        Settings {
            replica: replica_id(),
            tick_ms: config.ota.tick_ms,
            lease_ms: config.ota.lease_ms,
        },
        parts,
    ))
}

/// Serves the gRPC API and runs the tick loop until `shutdown` fires.
pub async fn serve_with_parts(
    config: Config,
    listener: TcpListener,
    parts: Parts,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    trellis_auth::setup::load_service_credential(&config, "ota")?;
    let scheduler = build(&config, parts).await?;
    let auth_store = trellis_core::redis_conn::connect_durable(&config.redis).await?;
    scheduler::register_metrics();
    trellis_core::metrics::service_started("ota");
    let addr = listener.local_addr().ok();
    tracing::info!(listen = ?addr, tick_ms = config.ota.tick_ms, lease_ms = config.ota.lease_ms, "ota serving");
    let ticker = tokio::spawn(scheduler.clone().run(shutdown.clone()));
    // TCP_NODELAY: Nagle + delayed ACK would stall small replies.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let tls = trellis_core::tls::ServiceTls::load(&config, trellis_core::tls::Role::Ota)?;
    let result = trellis_core::tls::server(tls.as_ref())?
        .trace_fn(trellis_core::telemetry::grpc_server_span)
        .layer(trellis_auth::setup::server_layer(
            &config,
            auth_store.clone(),
            "ota",
        ))
        .add_service(trellis_proto::v1::ota_server::OtaServer::new(
            OtaService::new(scheduler, config.ota.tick_ms, auth_store.clone()),
        ))
        .serve_with_incoming_shutdown(incoming, async move { shutdown.wait().await })
        .await
        .context("ota gRPC server failed");
    let _ = ticker.await;
    tracing::info!("ota stopped");
    result
}

/// This replica's name in leases: host, pid and a random suffix (two
/// schedulers in one process, as in tests, differ too).
pub fn replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "ota".into());
    let n: u32 = rand::random();
    format!("{host}-{}-{n:08x}", std::process::id())
}

//! trellis-keyvault: the only holder of private keys.
//!
//! It registers device public keys, keeps the cloud key sealed under a
//! master key, does the handshake's private-key operations for gateways on a
//! bounded pool of threads, and audits every use of a key.
//!
//! - [`master_key`]: the one secret not kept in Redis;
//! - [`cloud_key`]: the RSA-2048 cloud key, sealed in Redis;
//! - [`keyring`]: versions of a sealed key (rotation, retirement, reload);
//! - [`cloud_keys`]: the cloud key's versions and who holds which;
//! - [`release_key`]: the RSA-2048 release-signing key, sealed the same way,
//!   versioned the same way;
//! - [`signing`]: Sign, GetSigningKey, ListSigningKeys (purpose "release"),
//!   audited;
//! - [`backend`]: which RSA library does the private operations (OpenSSL);
//! - [`pool`]: the threads and bounded queue those operations run on;
//! - [`session`]: OpenSession (handshake steps 3 and 4);
//! - [`registry`]: device records;
//! - [`service`]: the gRPC edge.
pub mod backend;
pub mod cloud_key;
pub mod cloud_keys;
pub mod error;
pub mod keyring;
pub mod master_key;
pub mod pool;
pub mod registry;
pub mod release_key;
pub mod rewrap;
pub mod service;
pub mod session;
pub mod signing;

use anyhow::Context;
use std::sync::Arc;
use tokio::net::TcpListener;
use trellis_core::{Config, Shutdown};

pub use error::KeyvaultError;
pub use master_key::{MasterKey, ensure_dev_master_key};
pub use pool::Pool;
pub use service::KeyVaultService;

/// Binds `config.keyvault.listen` and serves until `shutdown` fires.
pub async fn serve(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&config.keyvault.listen)
        .await
        .with_context(|| {
            format!(
                "keyvault cannot listen on {} (keyvault.listen)",
                config.keyvault.listen
            )
        })?;
    serve_with_listener(config, listener, shutdown).await
}

/// Serves on a listener the caller bound (tests and `trellis up` bind port 0).
pub async fn serve_with_listener(
    config: Config,
    listener: TcpListener,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let service = build(&config).await?;
    // Other keyvaults' rotations and retirements show here within a reload.
    let reloader = service.keyring().clone();
    let release_reloader = service.release_keyring().cloned();
    let mut reload_redis = service.durable();
    let mut reload_stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(cloud_keys::RELOAD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = reload_stop.wait() => return,
            }
            if let Err(e) = reloader.reload(&mut reload_redis).await {
                tracing::warn!(error = %e, "cannot reload the cloud key versions; keeping the ones loaded");
            }
            if let Some(release) = &release_reloader
                && let Err(e) = release.reload(&mut reload_redis).await
            {
                tracing::warn!(error = %e, "cannot reload the release key versions; keeping the ones loaded");
            }
        }
    });
    let addr = listener.local_addr().ok();
    tracing::info!(
        listen = ?addr,
        backend = service.pool().backend_name(),
        workers = service.pool().workers(),
        queue_depth = service.pool().capacity(),
        "keyvault serving"
    );
    // TCP_NODELAY on accepted sockets: tonic sets it only on sockets it
    // accepts itself, and Nagle + delayed ACK stall small gRPC replies 40 ms.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let pool = service.pool().clone();
    trellis_core::metrics::service_started("keyvault");
    trellis_core::metrics::gauge(
        "trellis_keyvault_queue_depth",
        "Private-key operations waiting for a worker",
        move || i64::try_from(pool.queue_depth()).unwrap_or(i64::MAX),
    );
    let durable = service.durable();
    // Single-tenant data from before organisations belongs to `default`.
    let mut migrate = durable.clone();
    trellis_auth::store::ensure_org(&mut migrate, trellis_auth::DEFAULT_ORG)
        .await
        .context("cannot make the default organisation")?;
    let tls = trellis_core::tls::ServiceTls::load(&config, trellis_core::tls::Role::Keyvault)?;
    trellis_core::tls::server(tls.as_ref())?
        .trace_fn(trellis_core::telemetry::grpc_server_span)
        .layer(trellis_auth::setup::server_layer(
            &config,
            durable.clone(),
            "keyvault",
        ))
        .add_service(trellis_proto::v1::key_vault_server::KeyVaultServer::new(
            service,
        ))
        .add_service(trellis_proto::v1::access_server::AccessServer::new(
            trellis_auth::AccessService::new(durable),
        ))
        .serve_with_incoming_shutdown(incoming, async move { shutdown.wait().await })
        .await
        .context("keyvault gRPC server failed")?;
    tracing::info!("keyvault stopped");
    Ok(())
}

/// Everything but the listener: master key, Redis, cloud key, pool.
pub async fn build(config: &Config) -> anyhow::Result<KeyVaultService> {
    let master = MasterKey::from_config(&config.keyvault)?;
    // Durable records: `redis.durable_url` (default `redis.url`), or the
    // primary Sentinel names when `redis.sentinels` is set.
    let mut redis = trellis_core::redis_conn::connect_durable(&config.redis)
        .await
        .context("keyvault needs Redis for durable records: set redis.url in trellis.toml or TRELLIS_REDIS__URL (e.g. redis://127.0.0.1:6379/), or redis.durable_url / redis.sentinels")?;
    let ring = cloud_keys::load(&mut redis, &master, None)
        .await
        .map_err(|e| anyhow::anyhow!("cannot load the cloud key versions: {e}"))?;
    let release = release_key::load(&mut redis, &master)
        .await
        .map_err(|e| anyhow::anyhow!("cannot load the release key versions: {e}"))?;
    let first = ring
        .get(cloud_key::CLOUD_KEY_VERSION)
        .context("cloud key version 1 is missing")?;
    // The pool's own key (Sign uses its own; handshakes pick a version).
    let backend = first.key.clone();
    if let Some(current) = ring.current() {
        tracing::info!(key_id = %current.meta.key_id, version = current.meta.version, versions = ring.all().count(), "cloud keys loaded");
    }
    if let Some(current) = release.current() {
        tracing::info!(key_id = %current.meta.key_id, version = current.meta.version, versions = release.all().count(), "release keys loaded");
    }
    // The master key stays in memory: rotation seals new versions with it.
    let master = Arc::new(master);
    let ring = cloud_keys::SharedKeyring::new(&cloud_keys::CLOUD, ring, master.clone());
    let release = release_key::SharedReleaseKeyring::new(&release_key::RELEASE, release, master);
    let pool = Pool::new(
        backend,
        config.keyvault.workers,
        config.keyvault.queue_depth,
    )
    .context("cannot start keyvault's private-key worker threads")?;
    Ok(KeyVaultService::new(pool, redis, ring)
        .with_retire_grace_days(config.keys.retire_grace_days)
        .with_release_keys(release)
        .with_max_queue_wait(std::time::Duration::from_millis(
            config.keyvault.max_queue_wait_ms,
        )))
}

/// Fills `buf` from the operating system's CSPRNG.
pub fn os_random(buf: &mut [u8]) -> Result<(), rand::rngs::SysError> {
    use rand::TryRng;
    rand::rngs::SysRng.try_fill_bytes(buf)
}

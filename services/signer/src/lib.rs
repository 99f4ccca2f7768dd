//! trellis-signer: firmware images, release manifests and their signatures.
//!
//! It stores images by SHA-256 (client-streamed, hashed while streaming,
//! size-limited, content-addressed), builds each release's manifest once with
//! `trellis-firmware` and keeps the exact bytes, signs them with the cloud
//! release key through keyvault's `Sign` (the private key never leaves
//! keyvault), accepts signatures made elsewhere (a customer's offline key)
//! only after checking them against the product's signing policy, and says
//! which signatures a release still lacks.
//!
//! - [`store`]: the Redis records (one atomic write each);
//! - [`service`]: the gRPC `Signer` service and its rules;
//! - [`delivery`]: what a gateway reads to deliver a release;
//! - [`rotation`]: trust policy rotations (policy releases);
//! - [`cloud_keys`]: keyvault's release key versions, and which one signs;
//! - [`validate`]: operator input checks;
//! - [`error`]: errors and their gRPC codes.
pub mod cloud_keys;
pub mod delivery;
pub mod error;
pub mod rotation;
pub mod service;
pub mod store;
pub mod validate;

use anyhow::Context;
use tokio::net::TcpListener;
use trellis_core::telemetry::TraceInterceptor;
use trellis_core::{Config, Shutdown};
use trellis_proto::v1::key_vault_client::KeyVaultClient;

pub use delivery::{Delivery, load_release_for_delivery};
pub use error::SignerError;
pub use service::SignerService;

/// Binds `config.signer.listen` and serves until `shutdown` fires.
pub async fn serve(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&config.signer.listen)
        .await
        .with_context(|| {
            format!(
                "signer cannot listen on {} (signer.listen)",
                config.signer.listen
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
    trellis_auth::setup::load_service_credential(&config, "signer")?;
    let service = build(&config).await?;
    let auth_store = trellis_core::redis_conn::connect_durable(&config.redis).await?;
    trellis_core::metrics::service_started("signer");
    tracing::info!(
        listen = ?listener.local_addr().ok(),
        keyvault = %config.signer.keyvault_url,
        max_image_bytes = config.signer.max_image_bytes,
        "signer serving"
    );
    // TCP_NODELAY: Nagle + delayed ACK would stall small replies.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    // Chunks are small, but a whole image may arrive in one message.
    let max_message = usize::try_from(config.signer.max_image_bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(64 * 1024);
    let tls = trellis_core::tls::ServiceTls::load(&config, trellis_core::tls::Role::Signer)?;
    trellis_core::tls::server(tls.as_ref())?
        .trace_fn(trellis_core::telemetry::grpc_server_span)
        .layer(trellis_auth::setup::server_layer(
            &config, auth_store, "signer",
        ))
        .add_service(
            trellis_proto::v1::signer_server::SignerServer::new(service)
                .max_decoding_message_size(max_message),
        )
        .serve_with_incoming_shutdown(incoming, async move { shutdown.wait().await })
        .await
        .context("signer gRPC server failed")?;
    tracing::info!("signer stopped");
    Ok(())
}

/// Everything but the listener: Redis and a (lazy) keyvault client, so the
/// signer starts before keyvault does.
pub async fn build(config: &Config) -> anyhow::Result<SignerService> {
    // Durable records: `redis.durable_url` (default `redis.url`), or the
    // primary Sentinel names when `redis.sentinels` is set.
    let redis = trellis_core::redis_conn::connect_durable(&config.redis)
        .await
        .context("the signer needs Redis for durable records: set redis.url in trellis.toml or TRELLIS_REDIS__URL (e.g. redis://127.0.0.1:6379/), or redis.durable_url / redis.sentinels")?;
    let keyvault_url = &config.signer.keyvault_url;
    let tls = trellis_core::tls::ServiceTls::load(config, trellis_core::tls::Role::Signer)?;
    let channel = trellis_core::tls::endpoint(keyvault_url, tls.as_ref())
        .map_err(|e| anyhow::anyhow!("signer.keyvault_url: {e}"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect_lazy();
    let keyvault = KeyVaultClient::with_interceptor(channel, TraceInterceptor::SERVICE);
    Ok(SignerService::new(
        redis,
        keyvault,
        keyvault_url.clone(),
        config.signer.max_image_bytes,
    ))
}

//! trellis-api: the application API. Particle-compatible REST and
//! server-sent events (the calls particle-cli 3.51 and particle-api-js 12
//! make, README "Application API"), so `particle` (particle-cli) and particle-api-js work
//! against Trellis unchanged.
//!
//! Stateless: every request's Particle access token is forwarded as the
//! gRPC bearer token to the gateway, keyvault, signer and ota services,
//! which authenticate it and scope it to its organisation. Scale it like
//! the gateways.
//!
//! - [`devices`]: device list, details, function calls, variable reads;
//! - [`events`]: server-sent event streams;
//! - [`tokens`]: the user, tokens and the OAuth password grant;
//! - [`ota`]: flashing by upload, only as a signed release;
//! - [`webhooks`]: integrations (webhooks), their queues in Redis and delivery;
//! - [`error`]: every error body, and the one gRPC -> HTTP mapping;
//! - [`console`] and [`console_api`]: the web console at `/` and the JSON
//!   it reads under `/v1/trellis/...`. The console's session is an
//!   `HttpOnly`, `SameSite=Strict` cookie that counts only on requests
//!   that also carry the `X-Trellis-Console` header (see [`console_api`]).
pub mod console;
pub mod console_api;
pub mod devices;
pub mod error;
pub mod events;
pub mod grpc;
pub mod openapi;
pub mod ota;
pub mod tls;
pub mod tokens;
pub mod webhooks;

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use tokio::net::TcpListener;
use tracing::Instrument;
use trellis_core::{Config, Shutdown};

pub use error::ApiError;
pub use grpc::Services;

/// What every handler shares.
#[derive(Clone, Debug)]
pub struct AppState {
    pub services: Services,
    /// Ends open event streams when the server stops.
    pub shutdown: Shutdown,
    /// The API serves HTTPS itself: the console's cookie is `Secure`.
    pub https: bool,
    /// Webhook integrations (`None`: no `redis.url`, the calls answer 503).
    pub webhooks: Option<std::sync::Arc<webhooks::deliver::Webhooks>>,
}

/// A time in milliseconds since the epoch as ISO 8601 (`…T06:44:11.299Z`).
pub fn iso_time(ms: i64) -> String {
    let ms = u64::try_from(ms).unwrap_or(0);
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

/// Every route (README "Application API" lists them).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(openapi::PATH, get(openapi::openapi_json))
        .route("/oauth/token", post(tokens::oauth_token))
        .route("/v1/user", get(tokens::user))
        .route(
            "/v1/access_tokens/current",
            get(tokens::current).delete(tokens::delete_current),
        )
        .route("/v1/access_tokens/{token}", delete(tokens::delete))
        .route(
            "/v1/devices",
            get(devices::list_devices).post(devices::claim),
        )
        .route("/v1/provisioning/{id}", post(devices::provision))
        .route("/v1/events", get(events::mine))
        .route("/v1/events/{*prefix}", get(events::mine))
        .route(
            "/v1/devices/events",
            get(events::mine).post(events::publish),
        )
        .route("/v1/devices/events/{*prefix}", get(events::mine))
        .route(
            "/v1/devices/{id}",
            get(devices::get_device)
                .put(ota::update_device)
                .delete(devices::unclaim)
                // Firmware uploads; every other route keeps axum's 2 MB.
                .layer(DefaultBodyLimit::max(ota::MAX_UPLOAD)),
        )
        .route(
            "/v1/devices/{id}/events",
            get(events::device).post(devices::call_function_named_events),
        )
        .route("/v1/devices/{id}/events/{*prefix}", get(events::device))
        .route(
            "/v1/devices/{id}/{name}",
            get(devices::get_variable).post(devices::call_function),
        )
        .route(
            "/v1/products/{p}/devices",
            get(devices::list_product_devices),
        )
        .route(
            "/v1/products/{p}/devices/{id}",
            get(devices::get_product_device),
        )
        .route(
            "/v1/products/{p}/devices/{id}/{name}",
            get(devices::get_product_variable).post(devices::call_product_function),
        )
        .route(
            "/v1/products/{p}/events",
            get(events::product).post(events::publish_product),
        )
        .route("/v1/products/{p}/events/{*prefix}", get(events::product))
        .route(
            "/v1/orgs/{org}/events",
            get(events::org).post(events::publish_org),
        )
        .route("/v1/orgs/{org}/events/{*prefix}", get(events::org))
        .merge(console_routes())
        .route(
            "/v1/integrations",
            get(webhooks::rest::list).post(webhooks::rest::create),
        )
        .route(
            "/v1/integrations/{id}",
            get(webhooks::rest::get).delete(webhooks::rest::delete),
        )
        .route("/v1/integrations/{id}/dead", get(webhooks::rest::dead))
        .route("/v1/integrations/{id}/replay", post(webhooks::rest::replay))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            confirm_token_refusals,
        ))
        // The console's cookie becomes the bearer token before anything
        // reads the token (see console_api).
        .layer(axum::middleware::from_fn(console_api::session_cookie))
        .layer(axum::middleware::from_fn(span))
        .with_state(state)
}

// ------------------------------------------------------------------
// The web console (issue 14): its files and its JSON, every response with
// the console's security headers (CSP, nosniff, no referrer).
fn console_routes() -> Router<AppState> {
    Router::new()
        .route("/", get(console::index))
        .route("/console/assets/{file}", get(console::asset))
        .route(
            "/v1/trellis/session",
            get(console_api::session)
                .post(console_api::sign_in)
                .delete(console_api::sign_out),
        )
        .route("/v1/trellis/fleet", get(console_api::fleet))
        .route("/v1/trellis/devices/{id}", get(console_api::device))
        .route("/v1/trellis/devices/{id}/tags", post(console_api::set_tags))
        .route("/v1/trellis/devices/{id}/revoke", post(console_api::revoke))
        .route(
            "/v1/trellis/devices/{id}/lift-quarantine",
            post(console_api::lift_quarantine),
        )
        .route("/v1/trellis/releases", get(console_api::releases))
        .route("/v1/trellis/rollouts", get(console_api::rollouts))
        .route("/v1/trellis/rollouts/{id}", get(console_api::rollout))
        .route(
            "/v1/trellis/rollouts/{id}/{action}",
            post(console_api::rollout_action),
        )
        .route("/v1/trellis/audit", get(console_api::audit))
        .layer(axum::middleware::map_response(console_headers))
}

async fn console_headers(response: Response) -> Response {
    console::security_headers(response)
}
// ------------------------------------------------------------------

/// A 401 makes particle-cli forget its login, so it must mean that the
/// caller's token is bad, not that one Trellis service refused another's
/// credential on the way (a gateway whose service token or certificate
/// keyvault does not accept answers UNAUTHENTICATED too). Before a 401
/// leaves, keyvault, which owns the tokens, is asked; if it accepts the
/// token, the answer is a 502 that says where to look instead.
async fn confirm_token_refusals(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_string();
    let query: std::collections::HashMap<String, String> = request
        .uri()
        .query()
        .and_then(|q| serde_urlencoded::from_str(q).ok())
        .unwrap_or_default();
    let token = grpc::Token::from_request(request.headers(), &query, None).ok();
    let response = next.run(request).await;
    if response.status() != axum::http::StatusCode::UNAUTHORIZED || path == "/oauth/token" {
        return response;
    }
    let Some(token) = token else {
        return response;
    };
    match state
        .services
        .access()
        .who_am_i(token.request(trellis_proto::v1::WhoAmIRequest {}))
        .await
    {
        Ok(_) => {
            tracing::error!(
                path = %path,
                "a Trellis service refused a token keyvault accepts: check the services' credentials \
                 (auth.service_token with tls.mode off) or certificates"
            );
            ApiError::Other(
                axum::http::StatusCode::BAD_GATEWAY,
                "A Trellis service refused the request on the way although the credential is valid \
                 (a service credential or certificate problem inside Trellis; see the services' logs)"
                    .into(),
            )
            .into_response()
        }
        Err(_) => response,
    }
}

/// Every error is JSON, a wrong method too (the clients parse every body).
async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::Other(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not supported here"),
    )
}

async fn not_found() -> ApiError {
    ApiError::Other(axum::http::StatusCode::NOT_FOUND, "Not found".into())
}

/// Every request is a span, with its status when it is answered.
async fn span(request: Request, next: Next) -> Response {
    let span = tracing::info_span!(
        "api.request",
        otel.kind = "server",
        http.request.method = %request.method(),
        url.path = %request.uri().path(),
        http.response.status_code = tracing::field::Empty,
    );
    // A caller's W3C trace context makes this request part of its trace.
    let carried: std::collections::HashMap<String, String> = ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|k| {
            let v = request.headers().get(k)?.to_str().ok()?;
            Some((k.to_string(), v.to_string()))
        })
        .collect();
    if !carried.is_empty() {
        trellis_core::telemetry::extract_fields(&span, &carried);
    }
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    response.into_response()
}

/// Makes ring the process's rustls provider (reqwest's https: webhook
/// targets, the CLI's api calls), unless one is installed already.
pub fn install_tls_provider() {
    trellis_core::outbound::install_tls_provider();
}

/// The webhook store and delivery settings, when `redis.url` is set.
async fn webhooks_from(
    config: &Config,
) -> anyhow::Result<Option<std::sync::Arc<webhooks::deliver::Webhooks>>> {
    let Some(url) = config.redis.url.clone() else {
        tracing::warn!("no redis.url: webhooks (/v1/integrations) are unavailable");
        return Ok(None);
    };
    // https webhook targets: reqwest's rustls with the ring provider the
    // API's own TLS uses. Another part of the process may have installed
    // one already, which is as good.
    install_tls_provider();
    let allowed = trellis_core::outbound::parse_cidrs(&config.webhooks.allowed_targets)
        .map_err(|e| anyhow::anyhow!("webhooks.allowed_targets: {e}"))?;
    let redis = trellis_core::redis_conn::connect(&url)
        .await
        .context("api webhooks need Redis (redis.url)")?;
    let registry = trellis_core::redis_conn::connect_durable(&config.redis)
        .await
        .context("api webhooks read the device registry (redis.durable_url)")?;
    let replica = format!(
        "{}-{}-{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "api".into()),
        std::process::id(),
        hex::encode(rand::random::<[u8; 4]>())
    );
    Ok(Some(std::sync::Arc::new(webhooks::deliver::Webhooks {
        redis,
        registry,
        redis_url: url,
        config: config.webhooks.clone(),
        allowed,
        replica,
    })))
}

/// Binds `api.listen` and serves until `shutdown` fires.
pub async fn serve(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&config.api.listen)
        .await
        .with_context(|| format!("api cannot listen on {} (api.listen)", config.api.listen))?;
    serve_with_listener(config, listener, shutdown).await
}

/// Serves on a listener the caller bound.
pub async fn serve_with_listener(
    config: Config,
    listener: TcpListener,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let services = Services::new(&config)?;
    let addr = listener.local_addr().ok();
    tracing::info!(
        listen = ?addr,
        gateway = %config.api.gateway_url,
        keyvault = %config.api.keyvault_url,
        signer = %config.api.signer_url,
        ota = %config.api.ota_url,
        "api serving"
    );
    let webhooks = webhooks_from(&config).await?;
    if let Some(w) = &webhooks
        && config.webhooks.enabled
    {
        tokio::spawn(webhooks::deliver::run(
            std::sync::Arc::clone(w),
            shutdown.clone(),
        ));
    }
    let app = router(AppState {
        services,
        shutdown: shutdown.clone(),
        https: config.api.tls_cert_file.is_some(),
        webhooks,
    });
    let mut stop = shutdown;
    let stopped = async move { stop.wait().await };
    match (&config.api.tls_cert_file, &config.api.tls_key_file) {
        (Some(cert), Some(key)) => {
            let acceptor = tls::acceptor(cert, key)?;
            tracing::info!(cert = %cert.display(), "api serving HTTPS");
            axum::serve(tls::TlsListener::new(listener, acceptor)?, app)
                .with_graceful_shutdown(stopped)
                .await
                .context("api HTTPS server failed")?;
        }
        (None, None) => {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
                .context("api HTTP server failed")?;
        }
        _ => anyhow::bail!(
            "api.tls_cert_file and api.tls_key_file go together: set both for HTTPS, or neither"
        ),
    }
    tracing::info!("api stopped");
    Ok(())
}

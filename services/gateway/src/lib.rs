//! The edge gateway: terminates device TCP sessions (handshake through
//! keyvault, then the encrypted message loop), records who owns which device
//! in Redis, and serves the operator's `DeviceService` for every device,
//! routing to the owning gateway when it is not this one. It keeps no state
//! another gateway could not rebuild.
pub mod clones;
pub mod cloud_keys;
pub mod commands;
pub mod device_state;
pub mod fence;
mod grpc;
pub mod handshake;
pub mod home;
pub mod local;
pub mod ownership;
pub mod refresher;
mod release;
pub mod revocations;
pub mod routing;
pub mod session;

use anyhow::Context;
use local::LocalSessions;
use routing::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::Instrument;
use trellis_core::Shutdown;
use trellis_core::audit;
use trellis_core::config::{Config, GatewayConfig};
use trellis_core::metrics::{kv, metrics};
use trellis_core::redis_conn::{self, Redis};
use trellis_core::telemetry::{TraceInterceptor, TracedChannel};
use trellis_proto::v1::device_service_server::DeviceServiceServer;
use trellis_proto::v1::key_vault_client::KeyVaultClient;
use trellis_proto::v1::ota_client::OtaClient;

/// Shared by every session and RPC of one gateway.
pub struct Gateway {
    pub id: String,
    pub region: String,
    pub config: GatewayConfig,
    /// This region's Redis: ownership, fencing, routing, inboxes, events.
    pub redis: Redis,
    /// The durable store every region shares (`connect_durable`): releases
    /// and images, audit, session history, clone flags, quarantine and the
    /// device's home region. Without `redis.durable_url`/`redis.sentinels`
    /// it is the same server as `redis`.
    pub durable: Redis,
    pub redis_url: String,
    pub keyvault: KeyVaultClient<TracedChannel>,
    /// The OTA scheduler, when configured (`gateway.ota_url`).
    pub ota: Option<OtaClient<TracedChannel>>,
    pub local: Arc<LocalSessions>,
    pub router: Arc<Router>,
    /// Handshake admission (token bucket); `None`: unlimited.
    pub admission: Option<governor::DefaultDirectRateLimiter>,
    /// Handshakes in progress (`gateway.handshake_concurrency`); `None`: unlimited.
    pub handshakes_in_flight: Option<Arc<tokio::sync::Semaphore>>,
    /// Verified firmware images, shared by the deliveries of this gateway.
    pub(crate) releases: release::Cache,
    /// Cloud key versions: the current one, announcements, hints.
    pub cloud_keys: cloud_keys::CloudKeys,
}

fn admission(config: &GatewayConfig) -> Option<governor::DefaultDirectRateLimiter> {
    let rate = std::num::NonZeroU32::new(config.handshake_rate)?;
    let burst = std::num::NonZeroU32::new(config.handshake_burst).unwrap_or(rate);
    Some(governor::RateLimiter::direct(
        governor::Quota::per_second(rate).allow_burst(burst),
    ))
}

/// Addresses the gateway actually listens on (ports may have been 0).
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    pub devices: SocketAddr,
    pub grpc: SocketAddr,
}

/// Accept backlog of the device listener (the kernel caps it at
/// `net.core.somaxconn`). A reconnect storm sends thousands of SYNs at once;
/// with a short queue the overflow is answered with SYN cookies whose final
/// ACK is then dropped, and those devices sit on a connection the gateway
/// never sees until their nonce timeout (30 s). Tokio's default is 1024.
pub const DEVICE_ACCEPT_BACKLOG: u32 = 4096;

/// Binds the device listener with [`DEVICE_ACCEPT_BACKLOG`].
pub async fn bind_device_listener(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(a) {
            Ok(()) => return socket.listen(DEVICE_ACCEPT_BACKLOG),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr} resolves to no address"),
        )
    }))
}

/// Binds the configured device and gRPC addresses and serves until shutdown.
pub async fn serve(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let devices = bind_device_listener(&config.gateway.device_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen for devices on {}",
                config.gateway.device_listen
            )
        })?;
    let grpc = TcpListener::bind(&config.gateway.grpc_listen)
        .await
        .with_context(|| format!("cannot listen for gRPC on {}", config.gateway.grpc_listen))?;
    serve_with_listeners(config, devices, grpc, shutdown).await
}

pub async fn serve_with_listeners(
    config: Config,
    devices: TcpListener,
    grpc: TcpListener,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    // A firmware chunk (512 bytes plus CoAP and padding) must fit in a frame,
    // and the frame header's length is a u16.
    if config.gateway.frame_read_timeout_secs == 0 {
        anyhow::bail!(
            "gateway.frame_read_timeout_secs is 0; give the seconds a started frame may take to arrive (default 10)"
        );
    }
    if !(1024..=65535).contains(&config.gateway.max_frame_len) {
        anyhow::bail!(
            "gateway.max_frame_len is {}; give 1024..=65535 (default 4096)",
            config.gateway.max_frame_len
        );
    }
    // A chunk's frame (CoAP header, token, options, CRC, padding: under
    // 128 bytes) must fit under the frame limit the device applies, which
    // for our SDK is the same default as ours.
    let chunk = usize::from(config.gateway.ota_chunk_size);
    let frame = config.gateway.max_frame_len.min(4096);
    if chunk < 64 || chunk + 128 > frame {
        anyhow::bail!(
            "gateway.ota_chunk_size is {chunk}; give 64..={} (a chunk and its framing must fit in \
             a {frame}-byte frame; default 512)",
            frame - 128,
        );
    }
    // One-byte CoAP tokens: the window must leave room for the others.
    if !(1..=128).contains(&config.gateway.ota_window) {
        anyhow::bail!(
            "gateway.ota_window is {}; give 1..=128 (default 32)",
            config.gateway.ota_window
        );
    }
    let redis_url = config
        .redis
        .url
        .clone()
        .context("the gateway needs redis.url (TRELLIS_REDIS__URL)")?;
    let redis = redis_conn::connect(&redis_url).await?;
    let durable = redis_conn::connect_durable(&config.redis)
        .await
        .context("the gateway needs the durable store (redis.durable_url / redis.sentinels)")?;
    trellis_core::metrics::service_started("gateway");
    trellis_auth::setup::load_service_credential(&config, "gateway")?;
    let tls = trellis_core::tls::ServiceTls::load(&config, trellis_core::tls::Role::Gateway)?;
    let keyvault_endpoint = trellis_core::tls::endpoint(&config.gateway.keyvault_url, tls.as_ref())
        .map_err(|e| anyhow::anyhow!("gateway.keyvault_url: {e}"))?
        .connect_timeout(Duration::from_secs(5));
    // Lazy: the gateway starts even while keyvault is still starting.
    let keyvault = KeyVaultClient::with_interceptor(
        keyvault_endpoint.connect_lazy(),
        TraceInterceptor::SERVICE,
    );
    let ota = if config.gateway.ota_url.is_empty() {
        None
    } else {
        let endpoint = trellis_core::tls::endpoint(&config.gateway.ota_url, tls.as_ref())
            .map_err(|e| anyhow::anyhow!("gateway.ota_url: {e}"))?
            .connect_timeout(Duration::from_secs(5));
        Some(OtaClient::with_interceptor(
            endpoint.connect_lazy(),
            TraceInterceptor::SERVICE,
        ))
    };
    let id = config.gateway.effective_id();
    let local = Arc::new(LocalSessions::default());
    let router = Arc::new(Router::new(id.clone(), redis.clone(), Arc::clone(&local)));
    let gw = Arc::new(Gateway {
        id: id.clone(),
        region: config.region.clone(),
        config: config.gateway.clone(),
        redis,
        durable,
        redis_url: redis_url.clone(),
        keyvault,
        ota,
        local,
        router: Arc::clone(&router),
        admission: admission(&config.gateway),
        handshakes_in_flight: (config.gateway.handshake_concurrency > 0).then(|| {
            Arc::new(tokio::sync::Semaphore::new(
                config.gateway.handshake_concurrency as usize,
            ))
        }),
        releases: release::Cache::default(),
        cloud_keys: cloud_keys::CloudKeys::default(),
    });
    let addrs = BoundAddrs {
        devices: devices.local_addr()?,
        grpc: grpc.local_addr()?,
    };
    tracing::info!(gateway = %id, devices = %addrs.devices, grpc = %addrs.grpc, region = %gw.region, "gateway listening");

    // In a drain the inbox outlives the device listener: it carries answers
    // and "not delivered" refusals until the sessions have closed.
    let (inbox_stop, inbox_shutdown) = Shutdown::new();
    let refresher = tokio::spawn(refresher::run(Arc::clone(&gw), inbox_shutdown.clone()));
    let inbox = tokio::spawn(router.run_inbox(redis_url, inbox_shutdown.clone()));
    let cloud_key_watch = tokio::spawn(cloud_keys::watch(Arc::clone(&gw), inbox_shutdown.clone()));
    let revocations = tokio::spawn(revocations::run(
        gw.durable.clone(),
        Arc::clone(&gw.local),
        inbox_shutdown,
    ));
    let grpc_task = {
        let svc = DeviceServiceServer::new(grpc::DeviceApi::new(Arc::clone(&gw)));
        let auth = trellis_auth::setup::server_layer(&config, gw.durable.clone(), "gateway");
        let mut sd = shutdown.clone();
        let server = trellis_core::tls::server(tls.as_ref())?;
        tokio::spawn(async move {
            server
                .trace_fn(trellis_core::telemetry::grpc_server_span)
                .layer(auth)
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    // TCP_NODELAY: Nagle + delayed ACK would stall small replies.
                    tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
                    async move { sd.wait().await },
                )
                .await
        })
    };
    let drain_started = std::time::Instant::now();
    accept_devices(Arc::clone(&gw), devices, shutdown).await;
    // Operator requests already taken finish (answers of routed ones come
    // through the inbox), within what is left of the drain deadline.
    let left = Duration::from_millis(gw.config.drain_deadline_ms)
        .saturating_sub(drain_started.elapsed())
        .max(Duration::from_secs(1));
    let mut grpc_task = grpc_task;
    match tokio::time::timeout(left, &mut grpc_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC server ended with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "gRPC task failed"),
        Err(_) => {
            tracing::warn!(gateway = %id, "operator requests still running at the drain deadline; dropped");
            grpc_task.abort();
        }
    }
    inbox_stop.trigger();
    let _ = refresher.await;
    let _ = revocations.await;
    let _ = cloud_key_watch.await;
    if tokio::time::timeout(Duration::from_secs(3), inbox)
        .await
        .is_err()
    {
        tracing::warn!(gateway = %id, "inbox did not stop in time");
    }
    tracing::info!(gateway = %id, drain_ms = drain_started.elapsed().as_millis() as u64, "drained");
    tracing::info!(gateway = %id, "gateway stopped");
    Ok(())
}

async fn accept_devices(gw: Arc<Gateway>, listener: TcpListener, mut shutdown: Shutdown) {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Turned away before any RSA work or even a nonce: the
                    // cheapest possible refusal during a reconnect storm.
                    let permit = match &gw.handshakes_in_flight {
                        Some(slots) => match Arc::clone(slots).try_acquire_owned() {
                            Ok(permit) => Some(permit),
                            Err(_) => {
                                turn_away(&gw, "busy");
                                continue;
                            }
                        },
                        None => None,
                    };
                    if gw.admission.as_ref().is_some_and(|l| l.check().is_err()) {
                        turn_away(&gw, "rate_limited");
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let span = tracing::info_span!("device.session", gateway = %gw.id, %peer, device = tracing::field::Empty);
                    sessions.spawn(connection(Arc::clone(&gw), stream, peer, permit, shutdown.clone()).instrument(span));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = shutdown.wait() => break,
        }
    }
    // Drain: no new device from here on (the load balancer's health check
    // fails too, so it sends reconnects to the other gateways).
    drop(listener);
    let span = tracing::info_span!(
        "gateway.drain",
        gateway = %gw.id,
        sessions = gw.local.len(),
        deadline_ms = gw.config.drain_deadline_ms,
        outcome = tracing::field::Empty,
    );
    span.in_scope(|| {
        tracing::info!("draining: sessions finish in-flight commands, release ownership and close")
    });
    // Each session sees the shutdown itself (session.rs).
    let deadline = Duration::from_millis(gw.config.drain_deadline_ms);
    let drain = async { while sessions.join_next().await.is_some() {} };
    if tokio::time::timeout(deadline, drain)
        .instrument(span.clone())
        .await
        .is_err()
    {
        span.record("outcome", "deadline");
        span.in_scope(|| {
            tracing::warn!(
                left = gw.local.len(),
                "drain deadline passed; closing the remaining sessions"
            )
        });
        gw.local.close_all("drain deadline passed");
        let rest = async { while sessions.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(2), rest)
            .await
            .is_err()
        {
            sessions.abort_all();
        }
    } else {
        span.record("outcome", "drained");
    }
}

/// Counts a connection closed at accept (the stream is dropped by the caller).
fn turn_away(gw: &Gateway, reason: &'static str) {
    metrics().handshakes.add(
        1,
        &[
            kv("gateway", gw.id.clone()),
            kv("outcome", "refused"),
            kv("reason", reason),
        ],
    );
}

/// One device connection from TCP accept to close. `handshake_slot` is
/// held until the handshake ends, either way.
///
/// Not an async fn: an async fn's future keeps both its arguments and the
/// locals they are moved into, and every session task keeps this future
/// for the life of the session. The one-off steps (handshake, claim,
/// audits) run boxed in [`open_session`] and are gone once the session
/// runs; what stays is [`run_session`]'s future and the arguments
/// (BENCHMARKS.md, idle sessions).
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn connection(
    gw: Arc<Gateway>,
    stream: TcpStream,
    peer: SocketAddr,
    handshake_slot: Option<tokio::sync::OwnedSemaphorePermit>,
    shutdown: Shutdown,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        // `let else`, not `if let`: the scrutinee of an `if let` would stay
        // in the future beside the running session.
        let Some(open) = Box::pin(open_session(gw, stream, peer, handshake_slot)).await else {
            return;
        };
        run_session(open, shutdown).await;
    }
}

/// A session past its handshake, claim and clone check, registered in
/// [`local::LocalSessions`], not running yet.
struct OpenSession {
    gw: Arc<Gateway>,
    device_id: String,
    epoch: u64,
    peer: SocketAddr,
    inbox: Arc<local::Inbox>,
    session: Box<session::Session>,
}

/// The handshake, the ownership claim and the clone check; `None` when the
/// connection ends there (refused, audited and counted as it should be).
async fn open_session(
    gw: Arc<Gateway>,
    mut stream: TcpStream,
    peer: SocketAddr,
    handshake_slot: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Option<OpenSession> {
    let started = std::time::Instant::now();
    let established = {
        let hs_span = tracing::info_span!(
            "device.handshake",
            gateway = %gw.id,
            %peer,
            device = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let result = Box::pin(handshake::run(&gw, &mut stream, peer))
            .instrument(hs_span.clone())
            .await;
        drop(handshake_slot);
        let (outcome, reason) = match &result {
            Ok(e) => {
                hs_span.record("device", e.device_id.as_str());
                ("ok", "")
            }
            Err(f) => ("refused", f.label()),
        };
        hs_span.record("outcome", if reason.is_empty() { outcome } else { reason });
        let m = metrics();
        let labels = [
            kv("gateway", gw.id.clone()),
            kv("outcome", outcome),
            kv("reason", reason),
        ];
        m.handshakes.add(1, &labels);
        if result.is_ok() {
            m.handshake_duration.record(
                started.elapsed().as_secs_f64(),
                &[kv("gateway", gw.id.clone())],
            );
        }
        match result {
            Ok(e) => e,
            Err(failure) => {
                tracing::info!(gateway = %gw.id, %peer, outcome = failure.label(), error = %failure, "handshake refused");
                if let handshake::HandshakeFailure::Malformed(_) = failure {
                    // Counted per source and reason, never one record each:
                    // anyone who can reach this port can cause these.
                    let mut durable = gw.durable.clone();
                    let _ = tokio::time::timeout(
                        home::DURABLE_WRITE_BUDGET,
                        Box::pin(audit::record_refusal(
                            &mut durable,
                            &gw.id,
                            "handshake",
                            failure.label(),
                            &peer.to_string(),
                            "",
                        )),
                    )
                    .await;
                }
                return None;
            }
        }
    };
    // Taken apart: a struct partly moved from stays in the task's future
    // (160 bytes, for the life of the session) until the end of the scope.
    let handshake::Established {
        device_id,
        product_id,
        cipher,
        cloud_key_version,
    } = established;
    tracing::Span::current().record("device", device_id.as_str());

    let mut redis = gw.redis.clone();
    let ttl = ownership::session_ttl_secs(gw.config.keepalive_secs);
    let peer_s = peer.to_string();
    // The connection record rides with the claim: one round trip.
    let claim = match Box::pin(ownership::claim_with(
        &mut redis,
        &device_id,
        &gw.id,
        &peer_s,
        ttl,
        |pipe| {
            device_state::record_connect_in(
                pipe, &device_id, &gw.id, &gw.region, &peer_s, product_id,
            )
        },
    ))
    .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(device = %device_id, error = %e, "cannot record session ownership; closing");
            return None;
        }
    };
    // Reconnect or suspected clone: audited, counted, and the policy
    // (gateway.clone_policy) decides which session survives.
    if let clones::Verdict::Refuse(reason) =
        Box::pin(clones::after_claim(&gw, &device_id, peer, &claim)).await
    {
        tracing::warn!(device = %device_id, %reason, "session refused after the handshake");
        return None;
    }
    // Cross-region: the newest claim anywhere names the device's home; a
    // session in another region sees it and closes (home.rs).
    home::record_claim(&gw, &device_id, claim.epoch, &peer_s);

    let inbox = Arc::new(local::Inbox::default());
    gw.local
        .insert(&device_id, claim.epoch, peer, Arc::clone(&inbox));
    tracing::info!(device = %device_id, epoch = claim.epoch, "session open");
    let session = Box::new(session::Session::new(
        Arc::clone(&gw),
        device_id.clone(),
        claim.epoch,
        peer,
        stream,
        cipher,
        cloud_key_version,
    ));
    Some(OpenSession {
        gw,
        device_id,
        epoch: claim.epoch,
        peer,
        inbox,
        session,
    })
}

/// Runs an open session to its end, then unregisters and audits it. An
/// `async move` block, not an async fn, for the reason given at
/// [`connection`]: the fields are used where they are, never re-bound.
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn run_session(
    open: OpenSession,
    shutdown: Shutdown,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        // Labels made at each end rather than held: the session's task
        // keeps whatever lives across `run` for as long as the device is
        // connected.
        let gauge_labels = |gw: &Gateway| {
            [
                kv("gateway", gw.id.clone()),
                kv("region", gw.region.clone()),
            ]
        };
        metrics().sessions_open.add(1, &gauge_labels(&open.gw));
        let end = open.session.run(&open.inbox, shutdown).await;
        let gw = &open.gw;
        metrics().sessions_open.add(-1, &gauge_labels(gw));
        // Session::run released the ownership record before closing the socket.
        gw.local.remove(&open.device_id, open.epoch);
        if end.is_violation() {
            Box::pin(session::Session::audit_end(
                gw,
                &open.device_id,
                open.peer,
                &end,
            ))
            .await;
            tracing::warn!(device = %open.device_id, reason = end.label(), error = %end, "session closed: protocol violation");
        } else {
            tracing::info!(device = %open.device_id, reason = end.label(), detail = %end, "session closed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn returned_size<A, B, C, D, E, F>(_: fn(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every idle session keeps this future for its whole life, so a byte
    /// here is a byte per device (issue 15's idle target: 4,096 B per
    /// session with everything). A value held across an await inside the
    /// session loop once grew it by 256 B and only the idle bench noticed.
    ///
    /// Measured 2026-12-04: 1,368 B in a release build and 1,376 B in a
    /// debug one, with the span. tokio puts it in a 128-byte aligned cell
    /// with its header and trailer: 1,536 B in release, and anything above
    /// 1,408 B here makes that cell 1,664 B. If a change needs more,
    /// measure the idle bench (`trellis-bench idle`) and raise the bound.
    #[test]
    fn the_session_task_future_stays_small() {
        const BOUND: usize = 1_408;
        let size = returned_size(connection) + std::mem::size_of::<tracing::Span>();
        assert!(
            size <= BOUND,
            "the session task's future is {size} B, more than {BOUND} B: every idle session pays for it"
        );
    }
}

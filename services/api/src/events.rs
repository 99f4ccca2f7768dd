//! Server-sent event streams (PARTICLE-API.md §2): `:ok` on open, a
//! keep-alive comment after [`KEEPALIVE`] of silence, each event's `event:`
//! and `data:` lines in one write, a prefix filter from the last path part
//! (URL-decoded by the router), organisation isolation by the caller's
//! token (the gateway's StreamEvents only yields what the token may see).
//!
//! A client that stops reading is cut off: events wait in a bounded queue
//! and one that cannot be queued within [`SLOW_CONSUMER`] ends the stream.
use crate::devices::resolve;
use crate::error::ApiError;
use crate::grpc::Token;
use crate::tokens::OkReply;
use crate::{AppState, iso_time};
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use futures::StreamExt;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use trellis_proto::v1::{
    DeviceEvent, ListDeviceStatesRequest, PublishEventRequest, StreamEventsRequest, WhoAmIRequest,
};

/// Longest silence on a stream before a keep-alive comment (the clients
/// reconnect after 15 s without a byte).
pub const KEEPALIVE: Duration = Duration::from_secs(9);
/// How long an event may wait for room in a client's queue.
pub const SLOW_CONSUMER: Duration = Duration::from_secs(20);
/// Frames queued per client.
const QUEUE: usize = 128;

type Params = Query<HashMap<String, String>>;

/// One event as the clients parse it: `event:` then `data:`, blank line.
pub fn frame(event: &DeviceEvent) -> Bytes {
    let name: String = event
        .name
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    let data = if event.data.is_empty() {
        Value::Null
    } else {
        Value::String(String::from_utf8_lossy(&event.data).into_owned())
    };
    let payload = json!({
        "data": data,
        "ttl": 60,
        "published_at": iso_time(event.time_ms),
        // Events published through the API have no device: the publisher
        // (user@organisation), as spark-server gave the user.
        "coreid": if event.device_id.is_empty() { &event.publisher } else { &event.device_id },
    });
    // `id:` lets a client resume (Last-Event-ID); Particle's clients ignore it.
    let id: String = event.id.chars().filter(|c| c.is_ascii_graphic()).collect();
    Bytes::from(format!("id: {id}\nevent: {name}\ndata: {payload}\n\n"))
}

/// A Redis stream entry id (`<ms>-<seq>`), ordered.
pub fn stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.trim().split_once('-').unwrap_or((id.trim(), "0"));
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// Where a reconnecting client left off: its `Last-Event-ID` header (the
/// `id:` of the last event it got).
fn resume_from(headers: &HeaderMap) -> Option<(u64, u64)> {
    stream_id(headers.get("last-event-id")?.to_str().ok()?)
}

/// Which of the caller's events a stream carries beyond the prefix.
enum Scope {
    /// Every event the token may see (its organisation's devices).
    Mine,
    /// One device (the gateway filters).
    Device,
    /// The devices of one product.
    Product(u32),
}

/// Keeps the events of one product's devices: the set is refreshed when an
/// event comes from a device not in it (at most every 10 s).
pub struct ProductFilter {
    state: AppState,
    token: Token,
    product: u32,
    devices: HashSet<String>,
    refreshed: Instant,
}

impl ProductFilter {
    async fn admits(&mut self, device_id: &str) -> bool {
        // Published through the API (no device): the gateway passed it, so
        // it is the caller's organisation's, and products publish that way.
        if device_id.is_empty() || self.devices.contains(device_id) {
            return true;
        }
        if self.refreshed.elapsed() < Duration::from_secs(10) {
            return false;
        }
        match product_devices(&self.state, &self.token, self.product).await {
            Ok(d) => self.devices = d,
            Err(e) => tracing::warn!(error = ?e, "cannot refresh the product's devices"),
        }
        self.refreshed = Instant::now();
        self.devices.contains(device_id)
    }
}

/// Moves events from the gateway to one client: `:ok` first, then each
/// event as one frame, a keep-alive after [`KEEPALIVE`] of silence. Ends
/// when the gateway's stream ends, the client goes away, the server
/// stops, or an event waits longer than `slow` for room in the client's
/// queue (a client that stopped reading).
pub async fn pump<S>(
    mut events: S,
    tx: mpsc::Sender<Bytes>,
    mut product: Option<ProductFilter>,
    mut resume_after: Option<(u64, u64)>,
    mut shutdown: trellis_core::Shutdown,
    slow: Duration,
) where
    S: futures::Stream<Item = Result<DeviceEvent, tonic::Status>> + Unpin,
{
    if tx.send(Bytes::from_static(b":ok\n\n")).await.is_err() {
        return;
    }
    let mut keepalive =
        tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
    loop {
        tokio::select! {
            message = events.next() => {
                let event = match message {
                    Some(Ok(event)) => event,
                    None => {
                        tracing::info!("the gateway ended the event stream");
                        return;
                    }
                    Some(Err(status)) => {
                        tracing::warn!(%status, "event stream failed");
                        return;
                    }
                };
                // Resuming: the replay up to the last event the client had.
                if let Some(after) = resume_after {
                    if stream_id(&event.id).is_some_and(|id| id <= after) {
                        continue;
                    }
                    resume_after = None;
                }
                if let Some(filter) = product.as_mut()
                    && !filter.admits(&event.device_id).await
                {
                    continue;
                }
                match tokio::time::timeout(slow, tx.send(frame(&event))).await {
                    Ok(Ok(())) => keepalive.reset(),
                    Ok(Err(_)) => return,
                    Err(_) => {
                        tracing::warn!("client stopped reading events; closing its stream");
                        return;
                    }
                }
            }
            _ = keepalive.tick() => {
                // A full queue means the client is behind, not idle.
                if let Err(mpsc::error::TrySendError::Closed(_)) =
                    tx.try_send(Bytes::from_static(b":\n\n"))
                {
                    return;
                }
            }
            _ = tx.closed() => return,
            _ = shutdown.wait() => return,
        }
    }
}

async fn open(
    state: AppState,
    resume: Option<(u64, u64)>,
    token: Token,
    device_id: String,
    prefix: String,
    scope: Scope,
) -> Result<Response, ApiError> {
    let request = StreamEventsRequest {
        device_id,
        prefix: prefix.clone(),
        // A resume replays what the capped stream still holds, from which
        // the pump drops what the client already had.
        from_start: resume.is_some(),
    };
    let events = state
        .services
        .devices()
        .stream_events(token.stream_request(request))
        .await?
        .into_inner();
    let product = match scope {
        Scope::Product(product) => Some(ProductFilter {
            devices: product_devices(&state, &token, product).await?,
            state: state.clone(),
            token,
            product,
            refreshed: Instant::now(),
        }),
        Scope::Mine | Scope::Device => None,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(QUEUE);
    let span = tracing::info_span!("api.sse", prefix = %prefix);
    tokio::spawn(tracing::Instrument::instrument(
        pump(
            events,
            tx,
            product,
            resume,
            state.shutdown.clone(),
            SLOW_CONSUMER,
        ),
        span,
    ));
    let body = Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<Bytes, std::convert::Infallible>),
    );
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

async fn product_devices(
    state: &AppState,
    token: &Token,
    product: u32,
) -> Result<HashSet<String>, ApiError> {
    Ok(state
        .services
        .devices()
        .list_devices(token.request(ListDeviceStatesRequest {
            product_id: product,
            online_only: false,
        }))
        .await?
        .into_inner()
        .devices
        .into_iter()
        .map(|d| d.device_id)
        .collect())
}

/// The body of an event publication (JSON or form).
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct PublishRequest {
    /// The event name (1 to 64 bytes).
    #[schema(min_length = 1, max_length = 64)]
    pub name: String,
    /// The event data (at most 1024 bytes).
    #[schema(max_length = 1024)]
    pub data: Option<String>,
    /// `true` for a private event.
    pub private: Option<bool>,
    /// Accepted and ignored (events live for 60 s).
    pub ttl: Option<u32>,
}

/// `POST /v1/devices/events`: publishes an event (JSON or form `name`,
/// optional `data`, `private`) to the caller's organisation: it shows up
/// on the organisation's streams (`/v1/devices/events`), not on a
/// device's.
#[utoipa::path(post, path = "/v1/devices/events", tag = "events",
    request_body(content(
        (PublishRequest = "application/json"),
        (PublishRequest = "application/x-www-form-urlencoded"))),
    responses((status = 200, description = "Published", body = OkReply)))]
pub async fn publish(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Params,
    body: axum::body::Bytes,
) -> Result<axum::Json<OkReply>, ApiError> {
    publish_fields(&state, &headers, &query, &body, None).await
}

/// `POST /v1/products/:p/events`: as `/v1/devices/events` (the event goes to
/// the caller's organisation; the product's streams carry it).
#[utoipa::path(post, path = "/v1/products/{p}/events", tag = "events",
    params(("p" = u32, Path, description = "Product id")),
    request_body(content(
        (PublishRequest = "application/json"),
        (PublishRequest = "application/x-www-form-urlencoded"))),
    responses((status = 200, description = "Published", body = OkReply)))]
pub async fn publish_product(
    State(state): State<AppState>,
    Path(_product): Path<String>,
    headers: HeaderMap,
    Query(query): Params,
    body: axum::body::Bytes,
) -> Result<axum::Json<OkReply>, ApiError> {
    publish_fields(&state, &headers, &query, &body, None).await
}

/// `POST /v1/orgs/:org/events`: the organisation must be the token's.
#[utoipa::path(post, path = "/v1/orgs/{org}/events", tag = "events",
    params(("org" = String, Path, description = "The token's organisation")),
    request_body(content(
        (PublishRequest = "application/json"),
        (PublishRequest = "application/x-www-form-urlencoded"))),
    responses((status = 200, description = "Published", body = OkReply)))]
pub async fn publish_org(
    State(state): State<AppState>,
    Path(org): Path<String>,
    headers: HeaderMap,
    Query(query): Params,
    body: axum::body::Bytes,
) -> Result<axum::Json<OkReply>, ApiError> {
    publish_fields(&state, &headers, &query, &body, Some(&org)).await
}

async fn publish_fields(
    state: &AppState,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    body: &[u8],
    org: Option<&str>,
) -> Result<axum::Json<OkReply>, ApiError> {
    let fields = crate::devices::body_fields(headers, body)?;
    let token = Token::from_request(headers, query, Some(&fields))?;
    let name = fields
        .get("name")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request("name is required"))?;
    let private = fields
        .get("private")
        .is_some_and(|p| p == "true" || p == "1");
    if let Some(org) = org {
        same_org(state, &token, org).await?;
    }
    state
        .services
        .devices()
        .publish_event(token.request(PublishEventRequest {
            name: name.clone(),
            data: fields.get("data").cloned().unwrap_or_default().into_bytes(),
            private,
        }))
        .await?;
    Ok(OkReply::json())
}

/// `Ok` when the token belongs to organisation `org`.
async fn same_org(state: &AppState, token: &Token, org: &str) -> Result<(), ApiError> {
    let me = state
        .services
        .access()
        .who_am_i(token.request(WhoAmIRequest {}))
        .await?
        .into_inner();
    if me.org != org {
        return Err(ApiError::PermissionDenied(format!(
            "this token belongs to organisation {}, not {org}",
            me.org
        )));
    }
    Ok(())
}

/// A stream route's path parameters: the resource's id, if any, and the
/// event-name prefix of its `…/events/{*prefix}` form (empty without).
type StreamPath = Path<HashMap<String, String>>;

fn path_param(path: &HashMap<String, String>, name: &str) -> String {
    path.get(name).cloned().unwrap_or_default()
}

/// `GET /v1/events[/:prefix]`, `/v1/devices/events[/:prefix]`: every
/// event of the caller's devices.
pub async fn mine(
    State(state): State<AppState>,
    path: Option<StreamPath>,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Response, ApiError> {
    let token = Token::from_request(&headers, &query, None)?;
    let prefix = path
        .map(|Path(p)| path_param(&p, "prefix"))
        .unwrap_or_default();
    open(
        state,
        resume_from(&headers),
        token,
        String::new(),
        prefix,
        Scope::Mine,
    )
    .await
}

/// `GET /v1/devices/:id/events[/:prefix]`.
pub async fn device(
    State(state): State<AppState>,
    Path(path): StreamPath,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Response, ApiError> {
    let token = Token::from_request(&headers, &query, None)?;
    let device = resolve(&state, &token, &path_param(&path, "id"), None).await?;
    open(
        state,
        resume_from(&headers),
        token,
        device.device_id,
        path_param(&path, "prefix"),
        Scope::Device,
    )
    .await
}

/// `GET /v1/products/:p/events[/:prefix]`.
pub async fn product(
    State(state): State<AppState>,
    Path(path): StreamPath,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Response, ApiError> {
    let token = Token::from_request(&headers, &query, None)?;
    let product = path_param(&path, "p");
    let product = product
        .parse::<u32>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::NotFound(format!("Product {product} not found")))?;
    open(
        state,
        resume_from(&headers),
        token,
        String::new(),
        path_param(&path, "prefix"),
        Scope::Product(product),
    )
    .await
}

/// `GET /v1/orgs/:org/events[/:prefix]`: the organisation must be the
/// token's.
pub async fn org(
    State(state): State<AppState>,
    Path(path): StreamPath,
    headers: HeaderMap,
    Query(query): Params,
) -> Result<Response, ApiError> {
    let token = Token::from_request(&headers, &query, None)?;
    same_org(&state, &token, &path_param(&path, "org")).await?;
    open(
        state,
        resume_from(&headers),
        token,
        String::new(),
        path_param(&path, "prefix"),
        Scope::Mine,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_one_frame_with_event_and_data_lines() {
        let e = DeviceEvent {
            id: "1-0".into(),
            device_id: "0123456789abcdef01234567".into(),
            name: "temp\nx".into(),
            data: b"21.5".to_vec(),
            public: true,
            time_ms: 1_796_280_251_299,
            gateway_id: "gw".into(),
            publisher: String::new(),
        };
        let text = String::from_utf8(frame(&e).to_vec()).expect("utf8");
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(lines[0], "id: 1-0");
        assert_eq!(lines[1], "event: temp x");
        assert!(lines[2].starts_with("data: {"), "{text}");
        assert_eq!(&lines[3..], ["", ""]);
        let data: Value = serde_json::from_str(&lines[2]["data: ".len()..]).expect("json");
        assert_eq!(data["data"], "21.5");
        assert_eq!(data["coreid"], "0123456789abcdef01234567");
        assert_eq!(data["ttl"], 60);
        assert!(
            data["published_at"]
                .as_str()
                .is_some_and(|s| s.ends_with('Z'))
        );
    }

    fn event(n: u64) -> DeviceEvent {
        DeviceEvent {
            id: format!("{n}-0"),
            device_id: "0123456789abcdef01234567".into(),
            name: "temperature".into(),
            data: vec![b'x'; 200],
            public: true,
            time_ms: 1,
            gateway_id: "gw".into(),
            publisher: String::new(),
        }
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_cut_off() {
        // Endless events, a client that reads `:ok` and one event, then
        // nothing: the pump gives up once its queue stays full for `slow`,
        // holding at most QUEUE frames meanwhile.
        let mut n = 0;
        let events = futures::stream::repeat_with(move || {
            n += 1;
            Ok(event(n))
        });
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let pump = tokio::spawn(pump(
            events,
            tx,
            None,
            None,
            trellis_core::Shutdown::never(),
            Duration::from_millis(200),
        ));
        assert_eq!(rx.recv().await.as_deref(), Some(&b":ok\n\n"[..]));
        assert!(
            rx.recv()
                .await
                .is_some_and(|f| f.starts_with(b"id: 1-0\nevent: temperature\n"))
        );
        tokio::time::timeout(Duration::from_secs(5), pump)
            .await
            .expect("the pump must end for a client that stopped reading")
            .expect("pump task");
        let mut queued = 0;
        while rx.try_recv().is_ok() {
            queued += 1;
        }
        assert!(queued <= QUEUE, "{queued}");
    }

    #[tokio::test]
    async fn the_stream_ends_when_the_client_goes() {
        let events = futures::stream::pending::<Result<DeviceEvent, tonic::Status>>();
        let (tx, rx) = mpsc::channel(QUEUE);
        let pump = tokio::spawn(pump(
            events,
            tx,
            None,
            None,
            trellis_core::Shutdown::never(),
            SLOW_CONSUMER,
        ));
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), pump)
            .await
            .expect("the pump must end when the client is gone")
            .expect("pump task");
    }
}

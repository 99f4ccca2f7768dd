//! Delivery, at least once and in order, surviving an api process that
//! dies at any point.
//!
//! **Dispatcher** (one api replica at a time, under the lease
//! `trellis:webhooks:dispatch-lease`): reads `trellis:events` after its
//! cursor `trellis:webhooks:cursor` and, for each event, appends a delivery
//! to the queue stream of every integration it matches. The appends and the
//! cursor's move happen in one Lua script that first checks the lease is
//! still this replica's: an event is either queued for every integration
//! and passed, or not passed (read again by whoever holds the lease next).
//! A first start begins at the stream's newest event.
//!
//! **Workers** (one per integration across all replicas, under the lease
//! `trellis:webhook:<id>:lease`, renewed while held): take the queue's
//! oldest entry, send it, and delete it only after a 2xx answer or once it
//! became a dead letter. An api killed mid-delivery leaves the entry at
//! the head of the queue; when its lease expires another replica takes the
//! integration and sends the entry again (at least once). One entry at a
//! time per integration (head of line), so each device's events arrive in
//! publish order however long the receiver was down.
//!
//! Failures are retried after a jittered exponential backoff (`backon`,
//! `webhooks.min_backoff_ms` doubling up to `webhooks.max_backoff_ms`); the
//! head's attempt count and next attempt time are kept in Redis
//! (`trellis:webhook:<id>:head`), so retries survive a restart too. After
//! `webhooks.max_attempts` attempts, or once the event is older than
//! `webhooks.max_age_ms`, or when the SSRF guard refuses the target, the
//! entry moves to the dead-letter list (`trellis:webhook:<id>:dead`) in the
//! same transaction that removes it from the queue.
use super::{Delivery, Integration, render, signature};
use backon::BackoffBuilder;
use redis::AsyncCommands;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tracing::Instrument;
use trellis_core::Shutdown;
use trellis_core::config::WebhooksConfig;
use trellis_core::outbound::{Cidr, check_url};
use trellis_core::redis_conn::{self, Redis, keys};

/// Entries read from the event stream per dispatcher step.
const BATCH: usize = 500;
/// How long an idle worker waits before looking at its queue again.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// What the dispatcher and the workers share.
#[derive(Clone)]
pub struct Webhooks {
    /// The region's Redis (`redis.url`): events, integrations, queues.
    pub redis: Redis,
    /// The registry's Redis (durable): a device's organisation and product.
    pub registry: Redis,
    pub redis_url: String,
    pub config: WebhooksConfig,
    pub allowed: Vec<Cidr>,
    /// This process's name in the leases.
    pub replica: String,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("replica", &self.replica)
            .finish()
    }
}

/// Takes the lease when free, extends it when already this replica's.
const ACQUIRE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
elseif holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// Releases the lease if it is this replica's.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// KEYS: lease, cursor, queue per delivery. ARGV: replica, new cursor,
/// then per delivery: the number of field/value arguments and them.
const ENQUEUE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local i = 3
for k = 3, #KEYS do
  local n = tonumber(ARGV[i])
  local args = {}
  for j = 1, n do
    args[j] = ARGV[i + j]
  end
  redis.call('XADD', KEYS[k], '*', unpack(args))
  i = i + n + 1
end
redis.call('SET', KEYS[2], ARGV[2])
return 1
";

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Webhooks {
    async fn lease(&self, key: &str) -> bool {
        let mut redis = self.redis.clone();
        redis::Script::new(ACQUIRE)
            .key(key)
            .arg(&self.replica)
            .arg(self.config.lease_ms.max(100))
            .invoke_async::<i64>(&mut redis)
            .await
            .map(|n| n == 1)
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, key, "webhook lease: Redis failed");
                false
            })
    }

    async fn release(&self, key: &str) {
        let mut redis = self.redis.clone();
        let _ = redis::Script::new(RELEASE)
            .key(key)
            .arg(&self.replica)
            .invoke_async::<i64>(&mut redis)
            .await;
    }

    /// Every integration, by id.
    pub async fn integrations(&self) -> redis::RedisResult<Vec<Integration>> {
        let mut redis = self.redis.clone();
        let ids: Vec<String> = redis.smembers(keys::WEBHOOK_INDEX).await?;
        if ids.is_empty() {
            // redis-rs refuses an empty pipeline ("empty command").
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(keys::webhook(id));
        }
        let maps: Vec<HashMap<String, String>> = pipe.query_async(&mut redis).await?;
        Ok(maps.iter().filter_map(Integration::from_hash).collect())
    }
}

/// Runs the dispatcher and the workers until `shutdown`.
pub async fn run(webhooks: Arc<Webhooks>, shutdown: Shutdown) {
    tracing::info!(
        replica = %webhooks.replica,
        workers = webhooks.config.workers,
        "webhook delivery running"
    );
    let dispatcher = tokio::spawn(dispatch_loop(Arc::clone(&webhooks), shutdown.clone()));
    let workers = tokio::spawn(worker_manager(webhooks, shutdown));
    let _ = tokio::join!(dispatcher, workers);
}

// ---------------------------------------------------------------- dispatcher

/// A device's organisation and product, from the registry (cached).
struct Registry {
    cache: HashMap<String, (Option<(String, u32)>, Instant)>,
}

impl Registry {
    async fn lookup(&mut self, redis: &mut Redis, device: &str) -> Option<(String, u32)> {
        if let Some((found, at)) = self.cache.get(device)
            && at.elapsed() < Duration::from_secs(30)
        {
            return found.clone();
        }
        let map: HashMap<String, String> = match redis.hgetall(keys::device(device)).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, device, "webhooks: cannot read the registry");
                return None;
            }
        };
        let found = (!map.is_empty()).then(|| {
            let org = match map.get("organization").map(String::as_str) {
                None | Some("") => keys::DEFAULT_ORG.to_string(),
                Some(o) => o.to_string(),
            };
            let product = map
                .get("product_id")
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            (org, product)
        });
        if self.cache.len() > 100_000 {
            self.cache.clear();
        }
        self.cache
            .insert(device.to_string(), (found.clone(), Instant::now()));
        found
    }
}

async fn dispatch_loop(webhooks: Arc<Webhooks>, mut shutdown: Shutdown) {
    let mut registry = Registry {
        cache: HashMap::new(),
    };
    let mut conn = None;
    while !shutdown.is_triggered() {
        if !webhooks.lease(keys::WEBHOOK_DISPATCH_LEASE).await {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(webhooks.config.lease_ms.max(300) / 3)) => {}
                _ = shutdown.wait() => break,
            }
            continue;
        }
        if conn.is_none() {
            match redis_conn::connect_blocking(&webhooks.redis_url).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "webhook dispatcher cannot connect to Redis");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        let Some(blocking) = conn.as_mut() else {
            continue;
        };
        let step = dispatch_step(&webhooks, blocking, &mut registry)
            .instrument(tracing::debug_span!("webhooks.dispatch"));
        let result = tokio::select! {
            r = step => r,
            _ = shutdown.wait() => break,
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "webhook dispatcher step failed");
            conn = None;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    webhooks.release(keys::WEBHOOK_DISPATCH_LEASE).await;
}

/// Reads the events after the cursor (blocking up to a second) and queues
/// them for the integrations they match.
async fn dispatch_step(
    webhooks: &Webhooks,
    blocking: &mut redis::aio::MultiplexedConnection,
    registry: &mut Registry,
) -> redis::RedisResult<()> {
    let mut redis = webhooks.redis.clone();
    let cursor: Option<String> = redis.get(keys::WEBHOOK_CURSOR).await?;
    let cursor = match cursor {
        Some(c) => c,
        None => {
            // First start: from now on (the newest event so far is passed).
            let newest: redis::streams::StreamRangeReply =
                redis.xrevrange_count(keys::EVENTS, "+", "-", 1).await?;
            let start = newest
                .ids
                .first()
                .map(|e| e.id.clone())
                .unwrap_or_else(|| "0-0".into());
            let _: () = redis.set(keys::WEBHOOK_CURSOR, &start).await?;
            start
        }
    };
    let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(BATCH)
        .arg("BLOCK")
        .arg(redis_conn::BLOCKING_READ_MS)
        .arg("STREAMS")
        .arg(keys::EVENTS)
        .arg(&cursor)
        .query_async(blocking)
        .await?;
    let entries: Vec<redis::streams::StreamId> = reply
        .into_iter()
        .flat_map(|r| r.keys)
        .flat_map(|k| k.ids)
        .collect();
    let Some(last) = entries.last().map(|e| e.id.clone()) else {
        return Ok(());
    };
    let integrations = webhooks.integrations().await?;
    let enqueue = redis::Script::new(ENQUEUE);
    let mut script = enqueue.prepare_invoke();
    script
        .key(keys::WEBHOOK_DISPATCH_LEASE)
        .key(keys::WEBHOOK_CURSOR)
        .arg(&webhooks.replica)
        .arg(&last);
    let mut queued = 0usize;
    for entry in &entries {
        let get = |f: &str| -> String { entry.get(f).unwrap_or_default() };
        let device = get("device");
        let name = get("name");
        let (org, product) = if device.is_empty() {
            (get("org"), None)
        } else {
            match registry
                .lookup(&mut webhooks.registry.clone(), &device)
                .await
            {
                Some((org, product)) => (org, Some(product)),
                // Not registered (any more): nobody's integration.
                None => continue,
            }
        };
        let delivery = Delivery {
            event_id: entry.id.clone(),
            data: String::from_utf8_lossy(&entry.get::<Vec<u8>>("data").unwrap_or_default())
                .into_owned(),
            coreid: if device.is_empty() {
                get("publisher")
            } else {
                device.clone()
            },
            time_ms: get("time_ms").parse().unwrap_or(0),
            queued_ms: now_ms(),
            name,
        };
        for integration in &integrations {
            if integration.matches(&org, &delivery.name, &device, product) {
                let fields = delivery.fields();
                script
                    .key(keys::webhook_queue(&integration.id))
                    .arg(fields.len() * 2);
                for (k, v) in fields {
                    script.arg(k).arg(v);
                }
                queued += 1;
            }
        }
    }
    let moved: i64 = script.invoke_async(&mut redis).await?;
    if moved == 1 {
        tracing::debug!(events = entries.len(), queued, cursor = %last, "webhook events dispatched");
    } else {
        tracing::info!("webhook dispatcher lost its lease; another replica dispatches");
    }
    Ok(())
}

// ------------------------------------------------------------------- workers

/// Starts a worker for every integration no worker of this process runs,
/// up to `webhooks.workers` at a time; a worker that does not get the
/// integration's lease (another replica delivers it) ends at once.
async fn worker_manager(webhooks: Arc<Webhooks>, mut shutdown: Shutdown) {
    let running: Arc<std::sync::Mutex<HashSet<String>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        let ids: Vec<String> = {
            let mut redis = webhooks.redis.clone();
            match redis.smembers(keys::WEBHOOK_INDEX).await {
                Ok(ids) => ids,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook workers: cannot list integrations");
                    continue;
                }
            }
        };
        for id in ids {
            {
                let mut set = running.lock().unwrap_or_else(|p| p.into_inner());
                if set.contains(&id) || set.len() >= webhooks.config.workers.max(1) {
                    continue;
                }
                set.insert(id.clone());
            }
            let (webhooks, running, shutdown) = (
                Arc::clone(&webhooks),
                Arc::clone(&running),
                shutdown.clone(),
            );
            tokio::spawn(async move {
                let span = tracing::info_span!("webhooks.worker", integration = %id);
                worker(&webhooks, &id, shutdown).instrument(span).await;
                running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            });
        }
    }
}

/// Delivers one integration's queue while this replica holds its lease.
async fn worker(webhooks: &Webhooks, id: &str, mut shutdown: Shutdown) {
    let lease_key = keys::webhook_lease(id);
    if !webhooks.lease(&lease_key).await {
        return;
    }
    tracing::info!(replica = %webhooks.replica, "delivering this integration");
    // The lease is renewed beside the deliveries, so a slow receiver does
    // not cost it; once lost, the worker stops after its current request.
    let lost = Arc::new(AtomicBool::new(false));
    let renewer = {
        let (webhooks, lease_key, lost) = (webhooks.clone(), lease_key.clone(), Arc::clone(&lost));
        tokio::spawn(async move {
            let every = Duration::from_millis(webhooks.config.lease_ms.max(300) / 3);
            loop {
                tokio::time::sleep(every).await;
                if !webhooks.lease(&lease_key).await {
                    lost.store(true, Ordering::SeqCst);
                    return;
                }
            }
        })
    };
    let mut last_sent: Option<Instant> = None;
    let mut idle_since = Instant::now();
    while !shutdown.is_triggered() && !lost.load(Ordering::SeqCst) {
        match step(webhooks, id, &mut last_sent).await {
            Ok(Step::Delivered) | Ok(Step::Failed) => idle_since = Instant::now(),
            Ok(Step::Wait(d)) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = shutdown.wait() => break,
                }
            }
            Ok(Step::Idle) => {
                // Give the slot to other integrations after a while.
                if idle_since.elapsed() > Duration::from_secs(5) {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                    _ = shutdown.wait() => break,
                }
            }
            Ok(Step::Gone) => break,
            Err(e) => {
                tracing::warn!(error = %e, "webhook worker: Redis failed");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    renewer.abort();
    webhooks.release(&lease_key).await;
}

enum Step {
    Delivered,
    Failed,
    /// The head waits for its next attempt (or the rate limit).
    Wait(Duration),
    Idle,
    /// The integration was deleted.
    Gone,
}

/// The retry delay after `attempts` failed attempts (jittered).
pub fn backoff(config: &WebhooksConfig, attempts: u32) -> Duration {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(config.min_backoff_ms.max(1)))
        .with_max_delay(Duration::from_millis(
            config.max_backoff_ms.max(config.min_backoff_ms.max(1)),
        ))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(attempts.saturating_sub(1) as usize)
        .unwrap_or(Duration::from_millis(config.max_backoff_ms))
}

async fn step(
    webhooks: &Webhooks,
    id: &str,
    last_sent: &mut Option<Instant>,
) -> redis::RedisResult<Step> {
    let mut redis = webhooks.redis.clone();
    let map: HashMap<String, String> = redis.hgetall(keys::webhook(id)).await?;
    let Some(integration) = Integration::from_hash(&map) else {
        return Ok(Step::Gone);
    };
    let head: redis::streams::StreamRangeReply = redis
        .xrange_count(keys::webhook_queue(id), "-", "+", 1)
        .await?;
    let Some(entry) = head.ids.into_iter().next() else {
        return Ok(Step::Idle);
    };
    let fields: HashMap<String, String> = entry
        .map
        .iter()
        .map(|(k, v)| {
            let s: String = redis::from_redis_value(v.clone()).unwrap_or_default();
            (k.clone(), s)
        })
        .collect();
    let delivery = Delivery::from_map(&fields);
    let head_state: HashMap<String, String> = redis.hgetall(keys::webhook_head(id)).await?;
    let (mut attempts, next_at) = if head_state.get("entry") == Some(&entry.id) {
        (
            head_state
                .get("attempts")
                .and_then(|a| a.parse::<u32>().ok())
                .unwrap_or(0),
            head_state
                .get("next_ms")
                .and_then(|a| a.parse::<i64>().ok())
                .unwrap_or(0),
        )
    } else {
        (0, 0)
    };
    let now = now_ms();
    if next_at > now {
        return Ok(Step::Wait(Duration::from_millis(
            u64::try_from(next_at - now).unwrap_or(0).min(1_000),
        )));
    }
    if integration.rate_limit > 0.0
        && let Some(at) = *last_sent
    {
        let spacing = Duration::from_secs_f64(1.0 / integration.rate_limit);
        if at.elapsed() < spacing {
            return Ok(Step::Wait(spacing.saturating_sub(at.elapsed())));
        }
    }
    let max_age = i64::try_from(webhooks.config.max_age_ms).unwrap_or(i64::MAX);
    let since = if delivery.queued_ms > 0 {
        delivery.queued_ms
    } else {
        delivery.time_ms
    };
    if since > 0 && now.saturating_sub(since) > max_age {
        let reason = format!(
            "older than webhooks.max_age_ms ({} ms) before it could be delivered",
            webhooks.config.max_age_ms
        );
        dead_letter(webhooks, id, &entry.id, &delivery, attempts, &reason).await?;
        return Ok(Step::Failed);
    }
    *last_sent = Some(Instant::now());
    attempts += 1;
    let span = tracing::info_span!(
        "webhooks.deliver",
        otel.kind = "client",
        integration = %id,
        event_id = %delivery.event_id,
        attempt = attempts,
        http.response.status_code = tracing::field::Empty,
    );
    let result = send(webhooks, &integration, &delivery, attempts)
        .instrument(span.clone())
        .await;
    match result {
        Ok(status) => {
            span.record("http.response.status_code", status);
            let _: () = redis::pipe()
                .atomic()
                .xdel(keys::webhook_queue(id), &[&entry.id])
                .ignore()
                .del(keys::webhook_head(id))
                .ignore()
                .hincr(keys::webhook(id), "delivered", 1)
                .ignore()
                .query_async(&mut redis)
                .await?;
            Ok(Step::Delivered)
        }
        Err(failure) => {
            let reason = failure.to_string();
            tracing::info!(integration = %id, attempt = attempts, error = %reason, "webhook delivery failed");
            let _: () = redis::pipe()
                .atomic()
                .hincr(keys::webhook(id), "errors", 1)
                .ignore()
                .hset(keys::webhook(id), "last_error", &reason)
                .ignore()
                .hset(keys::webhook(id), "last_error_ms", now_ms())
                .ignore()
                .query_async(&mut redis)
                .await?;
            // A refused target stays refused: no point in retrying.
            if matches!(failure, Failure::Refused(_))
                || attempts >= webhooks.config.max_attempts.max(1)
            {
                dead_letter(webhooks, id, &entry.id, &delivery, attempts, &reason).await?;
            } else {
                let next = now_ms()
                    + i64::try_from(backoff(&webhooks.config, attempts).as_millis())
                        .unwrap_or(i64::MAX / 2);
                let _: () = redis
                    .hset_multiple(
                        keys::webhook_head(id),
                        &[
                            ("entry", entry.id.clone()),
                            ("attempts", attempts.to_string()),
                            ("next_ms", next.to_string()),
                        ],
                    )
                    .await?;
            }
            Ok(Step::Failed)
        }
    }
}

/// Moves the head entry to the dead letters, in one transaction.
async fn dead_letter(
    webhooks: &Webhooks,
    id: &str,
    entry_id: &str,
    delivery: &Delivery,
    attempts: u32,
    reason: &str,
) -> redis::RedisResult<()> {
    tracing::warn!(integration = %id, event_id = %delivery.event_id, attempts, reason, "webhook delivery dead-lettered");
    let letter = serde_json::json!({
        "event_id": delivery.event_id,
        "name": delivery.name,
        "data": delivery.data,
        "coreid": delivery.coreid,
        "time_ms": delivery.time_ms,
        "attempts": attempts,
        "error": reason,
        "dead_at_ms": now_ms(),
    })
    .to_string();
    let keep = i64::try_from(webhooks.config.max_dead_letters.max(1)).unwrap_or(i64::MAX);
    let mut redis = webhooks.redis.clone();
    redis::pipe()
        .atomic()
        .rpush(keys::webhook_dead(id), letter)
        .ignore()
        .ltrim(keys::webhook_dead(id), -(keep as isize), -1)
        .ignore()
        .xdel(keys::webhook_queue(id), &[entry_id])
        .ignore()
        .del(keys::webhook_head(id))
        .ignore()
        .query_async(&mut redis)
        .await
}

#[derive(Debug)]
enum Failure {
    /// The SSRF guard refused the target.
    Refused(String),
    Other(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(s) | Self::Other(s) => f.write_str(s),
        }
    }
}

/// One HTTP request; the status on a 2xx answer.
async fn send(
    webhooks: &Webhooks,
    integration: &Integration,
    delivery: &Delivery,
    attempt: u32,
) -> Result<u16, Failure> {
    let target = check_url(
        &integration.url,
        &webhooks.allowed,
        "webhooks.allowed_targets",
    )
    .await
    .map_err(|e| match e {
        trellis_core::outbound::OutboundError::Refused { .. } => Failure::Refused(e.to_string()),
        e => Failure::Other(e.to_string()),
    })?;
    // Connect to the address that was checked (no second DNS answer).
    let client = reqwest::Client::builder()
        .resolve(&target.host, target.addr)
        .timeout(Duration::from_millis(webhooks.config.timeout_ms.max(1)))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| Failure::Other(format!("cannot build the HTTP client: {e}")))?;
    let (body, content_type) = render(integration, delivery);
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let method = reqwest::Method::from_bytes(integration.method.as_bytes())
        .map_err(|_| Failure::Other(format!("bad method {:?}", integration.method)))?;
    let mut request = client
        .request(method, target.url.clone())
        .header("content-type", content_type)
        .header("user-agent", "Trellis-Webhooks/1");
    for (k, v) in &integration.headers {
        request = request.header(k.as_str(), v.as_str());
    }
    let request = request
        .header("x-trellis-timestamp", timestamp.to_string())
        .header(
            "x-trellis-signature",
            signature(&integration.secret, timestamp, body.as_bytes()),
        )
        .header("x-trellis-delivery", delivery.event_id.as_str())
        .header("x-trellis-attempt", attempt.to_string())
        .body(body);
    let response = request
        .send()
        .await
        .map_err(|e| Failure::Other(format!("{}: {e}", integration.url)))?;
    let status = response.status();
    if status.is_success() {
        Ok(status.as_u16())
    } else {
        Err(Failure::Other(format!(
            "{} answered HTTP {status}",
            integration.url
        )))
    }
}

//! `webhooks`: webhook deliveries per second to a local receiver. A real
//! redis-server (the api's own ACL user), the api's dispatcher and workers
//! (`trellis_api::webhooks::deliver`, in this process) and an axum receiver
//! on loopback that answers 200 at once. N events are appended to
//! `trellis:events` as published through the API; each of K integrations
//! matches every one, so N×K deliveries are made (one integration's in
//! order, integrations in parallel). Figure: deliveries per second from
//! the first append to the last receipt, and the p50/p99 from an event's
//! append to its receipt.
use crate::util;
use axum::body::Bytes;
use axum::extract::State;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trellis_core::local_redis::{Admin, LocalRedis, RedisData};
use trellis_core::redis_conn::acl::RedisUser;
use trellis_core::redis_conn::keys;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Events appended to the stream.
    #[arg(long, default_value_t = 5000)]
    pub events: usize,
    /// Integrations, each receiving every event.
    #[arg(long, default_value_t = 8)]
    pub integrations: usize,
}

impl Args {
    pub fn smoke() -> Self {
        Self {
            events: 200,
            integrations: 2,
        }
    }
}

#[derive(Clone, Default)]
struct Sink {
    /// Milliseconds from each event's append to its receipt.
    latencies: Arc<Mutex<Vec<i64>>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn receive(State(sink): State<Sink>, body: Bytes) -> &'static str {
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let sent: i64 = v["data"].as_str().and_then(|d| d.parse().ok()).unwrap_or(0);
    sink.latencies
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(now_ms() - sent);
    "ok"
}

pub async fn run(args: &Args) -> anyhow::Result<()> {
    println!("== webhook deliveries ({})", util::machine());
    let redis = LocalRedis::start_with_users(RedisData::Ephemeral, Admin::Open)?;
    let mut admin = trellis_core::redis_conn::connect(&redis.url()).await?;
    let sink = Sink::default();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(sink.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut config = trellis_core::Config::default();
    config.webhooks.workers = args.integrations.max(1);
    let api_url = redis.url_for(RedisUser::Api);
    let webhooks = Arc::new(trellis_api::webhooks::deliver::Webhooks {
        redis: trellis_core::redis_conn::connect(&api_url).await?,
        registry: trellis_core::redis_conn::connect(&api_url).await?,
        redis_url: api_url,
        config: config.webhooks.clone(),
        allowed: trellis_core::outbound::parse_cidrs(&["127.0.0.0/8".to_string()])
            .map_err(anyhow::Error::msg)?,
        replica: "bench".into(),
    });
    for n in 0..args.integrations {
        let integration = trellis_api::webhooks::Integration {
            id: format!("bench{n}"),
            org: "default".into(),
            event: "bench/".into(),
            device: String::new(),
            product: 0,
            url: url.clone(),
            method: "POST".into(),
            headers: Default::default(),
            body: None,
            rate_limit: 0.0,
            secret: "bench".into(),
            created_ms: now_ms(),
            errors: 0,
            last_error: String::new(),
            last_error_ms: 0,
            delivered: 0,
        };
        let _: () = redis::pipe()
            .hset_multiple(keys::webhook(&integration.id), &integration.fields())
            .ignore()
            .sadd(keys::WEBHOOK_INDEX, &integration.id)
            .ignore()
            .query_async(&mut admin)
            .await?;
    }
    let (trigger, shutdown) = trellis_core::Shutdown::new();
    let running = tokio::spawn(trellis_api::webhooks::deliver::run(
        Arc::clone(&webhooks),
        shutdown,
    ));
    // Until the dispatcher has its cursor (it starts at the newest event).
    let start = Instant::now();
    loop {
        let cursor: Option<String> = redis::cmd("GET")
            .arg(keys::WEBHOOK_CURSOR)
            .query_async(&mut admin)
            .await?;
        if cursor.is_some() {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(20),
            "the dispatcher never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let want = args.events * args.integrations;
    let start = Instant::now();
    for n in 0..args.events {
        let _: String = redis::cmd("XADD")
            .arg(keys::EVENTS)
            .arg("*")
            .arg("device")
            .arg("")
            .arg("org")
            .arg("default")
            .arg("publisher")
            .arg("bench")
            .arg("name")
            .arg(format!("bench/{n}"))
            .arg("data")
            .arg(now_ms().to_string())
            .arg("time_ms")
            .arg(now_ms())
            .query_async(&mut admin)
            .await?;
    }
    let deadline = Duration::from_secs(600);
    loop {
        let got = sink
            .latencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        if got >= want {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < deadline,
            "only {got} of {want} deliveries within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    trigger.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(5), running).await;
    let mut lat = sink
        .latencies
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let rate = want as f64 / elapsed;
    println!(
        "{} events x {} integrations = {want} deliveries in {elapsed:.2} s: {rate:.0} deliveries/s; \
         append -> receipt p50 {} ms, p99 {} ms",
        args.events,
        args.integrations,
        pct(0.50),
        pct(0.99)
    );
    println!(
        "RESULT webhooks deliveries_per_s={rate:.0} integrations={} p50_ms={} p99_ms={}",
        args.integrations,
        pct(0.50),
        pct(0.99)
    );
    Ok(())
}

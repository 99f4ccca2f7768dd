//! Webhook delivery survives an api process SIGKILLed mid-delivery: real
//! `trellis` processes (keyvault, two gateways, signer, ota, then two api
//! processes one after the other, each service as its own Redis ACL user),
//! a real redis-server and a slow HTTP receiver on loopback. Every event
//! arrives at least once, in publish order.
mod common;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use common::{Options, Proc, Services, addr, wait_ok};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trellis_core::local_redis::{Admin, LocalRedis, RedisData};
use trellis_core::redis_conn::acl::RedisUser;

#[derive(Clone, Default)]
struct Slow {
    /// Event names in the order their requests arrived (duplicates kept).
    got: Arc<Mutex<Vec<String>>>,
    in_flight: Arc<AtomicUsize>,
}

async fn receive(State(s): State<Slow>, _headers: HeaderMap, body: Bytes) -> &'static str {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    s.got
        .lock()
        .unwrap()
        .push(v["event"].as_str().unwrap_or_default().to_string());
    s.in_flight.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.in_flight.fetch_sub(1, Ordering::SeqCst);
    "ok"
}

/// One `trellis api` process as its own Redis user, delivering webhooks.
fn api(
    services: &Services,
    redis: &LocalRedis,
    dir: &std::path::Path,
    name: &str,
) -> (Proc, String, String) {
    let (listen, admin) = (addr(), addr());
    let password_file = dir.join(format!("{name}.redis-password"));
    std::fs::write(
        &password_file,
        redis
            .password_for(RedisUser::Api)
            .expect("the api's Redis password"),
    )
    .expect("write the password file");
    let env = vec![
        ("TRELLIS_REDIS__URL", redis.url()),
        ("TRELLIS_REDIS__USERNAME", RedisUser::Api.name().to_string()),
        (
            "TRELLIS_REDIS__PASSWORD_FILE",
            password_file.display().to_string(),
        ),
        ("TRELLIS_REGION", "test-region".to_string()),
        ("TRELLIS_TELEMETRY__ADMIN_LISTEN", admin.clone()),
        ("TRELLIS_API__LISTEN", listen.clone()),
        (
            "TRELLIS_API__GATEWAY_URL",
            format!("http://{}", services.gateways[0].grpc),
        ),
        (
            "TRELLIS_API__KEYVAULT_URL",
            format!("http://{}", services.keyvault),
        ),
        (
            "TRELLIS_API__SIGNER_URL",
            format!("http://{}", services.signer),
        ),
        ("TRELLIS_API__OTA_URL", format!("http://{}", services.ota)),
        (
            "TRELLIS_WEBHOOKS__ALLOWED_TARGETS",
            "[\"127.0.0.0/8\"]".to_string(),
        ),
        ("TRELLIS_WEBHOOKS__LEASE_MS", "2000".to_string()),
        ("TRELLIS_WEBHOOKS__MIN_BACKOFF_MS", "100".to_string()),
        ("TRELLIS_WEBHOOKS__MAX_BACKOFF_MS", "1000".to_string()),
    ];
    (Proc::spawn(name, dir, &["api"], &env), listen, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_killed_mid_delivery_loses_nothing() -> anyhow::Result<()> {
    let redis = LocalRedis::start_with_users(RedisData::Ephemeral, Admin::Open)?;
    let dir = tempfile::tempdir()?;
    let services = Services::start(Options {
        redis: &redis,
        dir: dir.path(),
        otlp: None,
        log: "info",
    })
    .await?;

    let slow = Slow::default();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(slow.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let (mut first, listen, admin) = api(&services, &redis, dir.path(), "api-1");
    wait_ok(&admin, "/healthz", Duration::from_secs(60), &first).await?;
    trellis_core::outbound::install_tls_provider();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    // Tokens are off in the process harness; the api still wants one.
    let token = "unchecked";
    let base = format!("http://{listen}");
    let start = Instant::now();
    let created: Value = loop {
        let r = http
            .post(format!("{base}/v1/integrations"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(json!({"event": "kill/", "url": hook}).to_string())
            .send()
            .await;
        if let Ok(r) = r
            && r.status().as_u16() == 201
        {
            break serde_json::from_str(&r.text().await?)?;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(30),
            "no integration:\n{}",
            first.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(created["id"].is_string());
    // The dispatcher starts at the newest event: let it take its cursor.
    tokio::time::sleep(Duration::from_secs(2)).await;
    const N: usize = 30;
    for n in 1..=N {
        let r = http
            .post(format!("{base}/v1/devices/events"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(json!({"name": format!("kill/{n:02}"), "data": n.to_string()}).to_string())
            .send()
            .await?;
        anyhow::ensure!(r.status().as_u16() == 200, "publish {n}: {}", r.status());
    }
    // Kill -9 while a delivery is in flight (the receiver takes 300 ms).
    let start = Instant::now();
    while slow.got.lock().unwrap().len() < 5 || slow.in_flight.load(Ordering::SeqCst) == 0 {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(30),
            "deliveries never started:\n{}",
            first.output()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.stop();
    let at_kill = slow.got.lock().unwrap().len();
    assert!(at_kill < N, "everything was delivered before the kill");

    let (second, listen2, admin2) = api(&services, &redis, dir.path(), "api-2");
    wait_ok(&admin2, "/healthz", Duration::from_secs(60), &second).await?;
    let want: Vec<String> = (1..=N).map(|n| format!("kill/{n:02}")).collect();
    let start = Instant::now();
    loop {
        let got: HashSet<String> = slow.got.lock().unwrap().iter().cloned().collect();
        if want.iter().all(|w| got.contains(w)) {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "missing after the kill: {:?}\n--- api-2:\n{}",
            want.iter()
                .filter(|w| !got.contains(*w))
                .collect::<Vec<_>>(),
            second.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = slow.got.lock().unwrap().clone();
    // First arrivals in publish order; the one in flight at the kill came again.
    let mut seen = HashSet::new();
    let firsts: Vec<String> = got
        .iter()
        .filter(|g| seen.insert((*g).clone()))
        .cloned()
        .collect();
    assert_eq!(firsts, want, "first arrivals out of order");
    assert!(
        got.len() > N,
        "the delivery cut by the kill was sent again: {got:?}"
    );

    // The CLI over the api's REST surface: list shows the counters; create,
    // dead, replay and delete answer.
    let cli = |args: &[&str]| {
        let out = common::command_without_trellis_env()
            .args(args)
            .env("TRELLIS_TOKEN", token)
            .env("TRELLIS_API_URL", format!("http://{listen2}"))
            .env("TRELLIS_TLS__MODE", "off")
            .output()
            .expect("run trellis");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let id = created["id"].as_str().unwrap_or_default();
    // The last delivery may still be at the slow receiver: until the
    // queue is empty, its entry counts as queued, not delivered.
    let started = Instant::now();
    loop {
        let (ok, listed) = cli(&["webhook", "list"]);
        assert!(ok, "{listed}");
        let row = listed
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("{id} not listed: {listed}"))
            .to_string();
        let column = |n: usize| -> u64 {
            row.split_whitespace()
                .nth(n)
                .and_then(|d| d.parse().ok())
                .unwrap_or(u64::MAX)
        };
        let (delivered, queued, dead) = (column(2), column(3), column(4));
        if queued == 0 {
            assert!(delivered >= N as u64 && dead == 0, "{row}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "still queued: {row}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ok, out) = cli(&[
        "webhook", "create", "--event", "cli/", "--url", &hook, "--header", "X-A: b",
    ]);
    assert!(ok && out.contains("secret: "), "{out}");
    let new_id = out
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .unwrap_or_default()
        .to_string();
    let (ok, out) = cli(&["webhook", "dead", &new_id]);
    assert!(ok && out.trim().is_empty(), "{out}");
    let (ok, out) = cli(&["webhook", "replay", &new_id]);
    assert!(ok && out.contains("replayed 0"), "{out}");
    let (ok, out) = cli(&["webhook", "delete", &new_id]);
    assert!(ok, "{out}");
    let (ok, out) = cli(&[
        "webhook",
        "create",
        "--event",
        "x",
        "--url",
        "http://169.254.169.254/",
    ]);
    assert!(!ok && out.contains("metadata"), "{out}");
    Ok(())
}

//! Webhooks against a real local HTTP receiver (axum on 127.0.0.1), a real
//! cluster (redis-server with one ACL user per service, keyvault, gateway,
//! signer, ota, the api as its own Redis user) and simulated devices.
mod common;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use common::Fixture;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trellis_api::webhooks::verify;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Got {
    path: String,
    body: String,
    headers: HashMap<String, String>,
    /// Whether the receiver answered 2xx.
    accepted: bool,
}

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Got>>>,
    /// While set, every request is answered 503.
    down: Arc<AtomicBool>,
}

impl Receiver {
    async fn start() -> anyhow::Result<(Self, String)> {
        let receiver = Receiver::default();
        let app = axum::Router::new()
            .route("/{*path}", axum::routing::any(receive))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok((receiver, base))
    }

    fn accepted(&self, path: &str) -> Vec<Got> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|g| g.accepted && g.path == path)
            .cloned()
            .collect()
    }

    fn count(&self, path: &str) -> usize {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|g| g.path == path)
            .count()
    }
}

async fn receive(
    State(r): State<Receiver>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let accepted = !r.down.load(Ordering::SeqCst);
    r.got.lock().unwrap().push(Got {
        path: format!("/{path}"),
        body: String::from_utf8_lossy(&body).into_owned(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
            .collect(),
        accepted,
    });
    if accepted {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Loopback allowed (the receiver is on 127.0.0.1), fast retries.
fn fast(c: &mut trellis_core::Config) {
    c.webhooks.allowed_targets = vec!["127.0.0.0/8".into()];
    c.webhooks.min_backoff_ms = 100;
    c.webhooks.max_backoff_ms = 1_000;
    c.webhooks.max_attempts = 1_000;
    c.webhooks.lease_ms = 2_000;
}

async fn create(f: &Fixture, token: &str, body: Value) -> anyhow::Result<(u16, Value)> {
    let r = f
        .http
        .post(f.url("/v1/integrations"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

async fn created(f: &Fixture, token: &str, body: Value) -> anyhow::Result<Value> {
    let (status, v) = create(f, token, body).await?;
    anyhow::ensure!(status == 201, "create answered {status}: {v}");
    Ok(v)
}

async fn wait_for<F: Fn() -> bool>(within: Duration, what: &str, check: F) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < within {
        if check() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("timed out after {within:?} waiting for {what}")
}

fn event_of(g: &Got) -> Value {
    serde_json::from_str(&g.body).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signature_template_filters_and_organisation_isolation() -> anyhow::Result<()> {
    let f = Fixture::start_with(fast).await?;
    let (rx, base) = Receiver::start().await?;
    let acme = f.org("acme").await?;

    let all = created(
        &f,
        &f.owner,
        json!({
            "integration_type": "Webhook",
            "event": "temp",
            "url": format!("{base}/all"),
            "secret": "s3cret",
            "json": {
                "name": "{{{PARTICLE_EVENT_NAME}}}",
                "value": "{{{PARTICLE_EVENT_VALUE}}}",
                "device": "{{{PARTICLE_DEVICE_ID}}}",
                "at": "{{{PARTICLE_PUBLISHED_AT}}}"
            },
            "headers": {"X-Customer": "yes"}
        }),
    )
    .await?;
    assert_eq!(all["secret"], "s3cret");
    let d1 = f.device(&f.owner, 6, "temp/a").await?;
    let d2 = f.device(&f.owner, 7, "temp/b").await?;
    let d3 = f.device(&acme, 8, "temp/c").await?;
    let by_product = created(
        &f,
        &f.owner,
        json!({"event": "temp", "url": format!("{base}/product"), "product_id": 7}),
    )
    .await?;
    let by_device = created(
        &f,
        &f.owner,
        json!({"event": "temp", "url": format!("{base}/device"), "deviceID": d1}),
    )
    .await?;
    let by_prefix = created(
        &f,
        &f.owner,
        json!({"event": "temp/b", "url": format!("{base}/prefix")}),
    )
    .await?;
    let theirs = created(
        &f,
        &acme,
        json!({"event": "", "url": format!("{base}/acme")}),
    )
    .await?;

    wait_for(
        Duration::from_secs(30),
        "deliveries to every target",
        || {
            ["/all", "/product", "/device", "/prefix", "/acme"]
                .iter()
                .all(|p| rx.accepted(p).len() >= 3)
        },
    )
    .await?;

    // Signature and template.
    let all_got = rx.accepted("/all");
    let mut devices_seen = HashSet::new();
    for g in &all_got {
        let ts: u64 = g.headers["x-trellis-timestamp"].parse()?;
        assert!(
            verify(
                "s3cret",
                ts,
                g.body.as_bytes(),
                &g.headers["x-trellis-signature"]
            ),
            "signature over {:?} does not verify",
            g.body
        );
        assert!(!verify(
            "wrong",
            ts,
            g.body.as_bytes(),
            &g.headers["x-trellis-signature"]
        ));
        assert_eq!(g.headers["x-customer"], "yes");
        assert_eq!(g.headers["content-type"], "application/json");
        assert!(!g.headers["x-trellis-delivery"].is_empty());
        let v = event_of(g);
        let device = v["device"].as_str().unwrap_or_default().to_string();
        assert!(device == d1 || device == d2, "{v}");
        assert_eq!(v["name"], if device == d1 { "temp/a" } else { "temp/b" });
        assert!(v["at"].as_str().is_some_and(|a| a.ends_with('Z')), "{v}");
        devices_seen.insert(device);
    }
    assert!(devices_seen.contains(&d1) && devices_seen.contains(&d2));
    assert!(!devices_seen.contains(&d3), "another organisation's device");

    // The default body, and the filters.
    for (path, only) in [
        ("/product", &d2),
        ("/device", &d1),
        ("/prefix", &d2),
        ("/acme", &d3),
    ] {
        for g in rx.accepted(path) {
            let v = event_of(&g);
            assert_eq!(&v["coreid"], only, "{path}: {v}");
            assert!(v["event"].as_str().is_some_and(|e| e.starts_with("temp/")));
            assert!(v["published_at"].as_str().is_some());
            assert!(v.get("data").is_some());
            let ts: u64 = g.headers["x-trellis-timestamp"].parse()?;
            // A secret was made for each; the signature must still be there.
            assert!(g.headers["x-trellis-signature"].starts_with("sha256="));
            assert!(ts > 1_700_000_000);
        }
    }

    // Organisation isolation over REST.
    let list: Value = f
        .http
        .get(f.url("/v1/integrations"))
        .bearer_auth(&acme)
        .send()
        .await?
        .json()
        .await?;
    let ids: Vec<&str> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["id"].as_str())
        .collect();
    assert_eq!(ids, vec![theirs["id"].as_str().unwrap_or_default()]);
    assert!(
        list[0].get("secret").is_none(),
        "the secret is shown only once"
    );
    for id in [
        &all["id"],
        &by_product["id"],
        &by_device["id"],
        &by_prefix["id"],
    ] {
        let id = id.as_str().unwrap_or_default();
        for r in [
            f.http
                .get(f.url(&format!("/v1/integrations/{id}")))
                .bearer_auth(&acme)
                .send()
                .await?,
            f.http
                .delete(f.url(&format!("/v1/integrations/{id}")))
                .bearer_auth(&acme)
                .send()
                .await?,
        ] {
            assert_eq!(r.status(), 404, "acme reaches another organisation's {id}");
        }
    }
    let mine: Value = f
        .http
        .get(f.url("/v1/integrations"))
        .bearer_auth(&f.owner)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(mine.as_array().map(Vec::len), Some(4));
    assert!(
        mine.as_array()
            .into_iter()
            .flatten()
            .all(|i| i["delivered"].as_u64() > Some(0))
    );

    // Delete stops deliveries.
    let id = theirs["id"].as_str().unwrap_or_default();
    let r = f
        .http
        .delete(f.url(&format!("/v1/integrations/{id}")))
        .bearer_auth(&acme)
        .send()
        .await?;
    assert_eq!(r.status(), 204);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rx.count("/acme");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rx.count("/acme"), before, "deliveries after the delete");
    f.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ssrf_targets_are_refused_unless_allowed() -> anyhow::Result<()> {
    // Default settings: nothing allowed.
    let f = Fixture::start_with(|_| {}).await?;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://localhost:9/hook",
        "http://[::1]:9/hook",
        "http://[::ffff:127.0.0.1]:9/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://0.0.0.0:9/",
        "http://169.254.10.10/",
    ] {
        let (status, body) = create(&f, &f.owner, json!({"event": "x", "url": url})).await?;
        assert_eq!(status, 400, "{url}: {body}");
        let text = body.to_string();
        assert!(text.contains("webhooks.allowed_targets"), "{url}: {text}");
    }
    let (status, body) = create(
        &f,
        &f.owner,
        json!({"event": "x", "url": "ftp://example.com/"}),
    )
    .await?;
    assert_eq!(status, 400, "{body}");
    f.stop().await;

    // Loopback allowed by the setting; metadata still refused.
    let f =
        Fixture::start_with(|c| c.webhooks.allowed_targets = vec!["127.0.0.0/8".into()]).await?;
    let (rx, base) = Receiver::start().await?;
    let (status, body) = create(
        &f,
        &f.owner,
        json!({"event": "ssrf", "url": format!("{base}/ok")}),
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    for url in [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:9/",
    ] {
        let (status, body) = create(&f, &f.owner, json!({"event": "x", "url": url})).await?;
        assert_eq!(status, 400, "{url}: {body}");
    }
    let r = f
        .http
        .post(f.url("/v1/devices/events"))
        .bearer_auth(&f.owner)
        .json(&json!({"name": "ssrf/allowed", "data": "1"}))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    wait_for(Duration::from_secs(20), "the allowed delivery", || {
        !rx.accepted("/ok").is_empty()
    })
    .await?;
    f.stop().await;
    Ok(())
}

async fn publish(f: &Fixture, name: &str, data: &str) -> anyhow::Result<()> {
    let r = f
        .http
        .post(f.url("/v1/devices/events"))
        .bearer_auth(&f.owner)
        .json(&json!({"name": name, "data": data}))
        .send()
        .await?;
    anyhow::ensure!(r.status() == 200, "publish answered {}", r.status());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_after_max_attempts_and_replay_delivers_them() -> anyhow::Result<()> {
    let f = Fixture::start_with(|c| {
        fast(c);
        c.webhooks.max_attempts = 3;
        c.webhooks.min_backoff_ms = 50;
        c.webhooks.max_backoff_ms = 200;
    })
    .await?;
    let (rx, base) = Receiver::start().await?;
    rx.down.store(true, Ordering::SeqCst);
    let hook = created(
        &f,
        &f.owner,
        json!({"event": "dl/", "url": format!("{base}/dl")}),
    )
    .await?;
    let id = hook["id"].as_str().unwrap_or_default().to_string();
    // The dispatcher starts at the newest event when it first runs: give it
    // a moment so that these are after its start.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for n in 1..=3 {
        publish(&f, &format!("dl/{n}"), &format!("v{n}")).await?;
    }
    let dead_url = f.url(&format!("/v1/integrations/{id}/dead"));
    let start = Instant::now();
    let dead = loop {
        let dead: Value = f
            .http
            .get(&dead_url)
            .bearer_auth(&f.owner)
            .send()
            .await?
            .json()
            .await?;
        if dead.as_array().map(Vec::len) == Some(3) {
            break dead;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(30),
            "no 3 dead letters: {dead}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let names: Vec<&str> = dead
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert_eq!(names, vec!["dl/1", "dl/2", "dl/3"]);
    assert!(
        dead.as_array()
            .into_iter()
            .flatten()
            .all(|d| d["attempts"] == 3 && d["error"].as_str().is_some_and(|e| e.contains("503")))
    );
    assert_eq!(rx.count("/dl"), 9, "3 attempts each");
    let shown: Value = f
        .http
        .get(f.url(&format!("/v1/integrations/{id}")))
        .bearer_auth(&f.owner)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(shown["errors"], 9, "{shown}");
    assert_eq!(shown["dead"], 3, "{shown}");
    assert!(
        shown["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("503")),
        "{shown}"
    );

    rx.down.store(false, Ordering::SeqCst);
    let r: Value = f
        .http
        .post(f.url(&format!("/v1/integrations/{id}/replay")))
        .bearer_auth(&f.owner)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(r["replayed"], 3, "{r}");
    wait_for(Duration::from_secs(20), "the replayed deliveries", || {
        rx.accepted("/dl").len() >= 3
    })
    .await?;
    let got: Vec<String> = rx
        .accepted("/dl")
        .iter()
        .map(|g| {
            event_of(g)["event"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(got, vec!["dl/1", "dl/2", "dl/3"]);
    let dead: Value = f
        .http
        .get(&dead_url)
        .bearer_auth(&f.owner)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(dead, json!([]));
    f.stop().await;
    Ok(())
}

/// The receiver is down for 30 s while two devices publish; afterwards
/// every event published gets there, each device's in publish order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receiver_down_for_30_s_gets_everything_in_order_per_device() -> anyhow::Result<()> {
    let f = Fixture::start_with(fast).await?;
    let (rx, base) = Receiver::start().await?;
    created(
        &f,
        &f.owner,
        json!({"event": "order/", "url": format!("{base}/order")}),
    )
    .await?;
    let a = f.device(&f.owner, 6, "order/a").await?;
    let b = f.device(&f.owner, 6, "order/b").await?;
    wait_for(Duration::from_secs(20), "first deliveries", || {
        rx.accepted("/order").len() >= 2
    })
    .await?;

    rx.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(30)).await;
    rx.down.store(false, Ordering::SeqCst);
    // Every event of the two devices in the stream up to now must arrive.
    let mut redis = f.cluster.redis().await?;
    let stream: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(trellis_core::redis_conn::keys::EVENTS)
        .arg("-")
        .arg("+")
        .query_async(&mut redis)
        .await?;
    let published: Vec<(String, String)> = stream
        .ids
        .iter()
        .filter_map(|e| {
            let device: String = e.get("device")?;
            (device == a || device == b).then(|| (device, e.id.clone()))
        })
        .collect();
    let first_delivered = rx.accepted("/order")[0].headers["x-trellis-delivery"].clone();
    let key = |id: &str| -> (u64, u64) {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
    };
    let want: Vec<(String, String)> = published
        .into_iter()
        .filter(|(_, id)| key(id) >= key(&first_delivered))
        .collect();
    assert!(
        want.len() > 100,
        "two devices for 30 s: {} events",
        want.len()
    );
    let want_ids: HashSet<String> = want.iter().map(|(_, id)| id.clone()).collect();
    wait_for(
        Duration::from_secs(60),
        "every event after the outage",
        || {
            let got: HashSet<String> = rx
                .accepted("/order")
                .iter()
                .map(|g| g.headers["x-trellis-delivery"].clone())
                .collect();
            want_ids.is_subset(&got)
        },
    )
    .await?;
    // In publish order per device (first arrival of each event).
    let mut seen = HashSet::new();
    let mut last: HashMap<String, (u64, u64)> = HashMap::new();
    for g in rx.accepted("/order") {
        let id = g.headers["x-trellis-delivery"].clone();
        if !seen.insert(id.clone()) {
            continue;
        }
        let device = event_of(&g)["coreid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let k = key(&id);
        if let Some(prev) = last.insert(device.clone(), k) {
            assert!(prev < k, "{device}: {id} arrived after a later event");
        }
    }
    let refused = rx
        .got
        .lock()
        .unwrap()
        .iter()
        .filter(|g| !g.accepted)
        .count();
    assert!(
        refused > 5,
        "the receiver refused {refused} attempts while down"
    );
    f.stop().await;
    Ok(())
}

//! The dashboards query only what the services export. Keyvault, two
//! gateways, signer and ota run as separate `trellis` processes (as the Helm
//! chart runs them); after real traffic (handshakes, events, a call routed
//! across gateways, a refused handshake, a second live session for one
//! identity from another address, an OTA rollout) every service's `/metrics` is scraped, and
//! every metric name a panel or variable of charts/trellis/dashboards/*.json
//! queries must be among the exported series, with the labels the query
//! selects or groups by. dashboards/METRICS.txt must list exactly those
//! names.
mod common;

use common::{Options, Proc, Services, ok};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;
use trellis_proto::v1 as pb;
use trellis_tests::{RawDevice, eventually};

type Labels = BTreeMap<String, String>;
/// Sample name → the label sets of its series.
type Exported = HashMap<String, Vec<Labels>>;

/// Parses Prometheus text exposition: sample names and their labels.
fn parse_exposition(text: &str, into: &mut Exported) {
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let mut labels = Labels::new();
        if line[name_end..].starts_with('{') {
            let body = &line[name_end + 1..];
            let mut rest = body;
            while let Some(eq) = rest.find("=\"") {
                let key = rest[..eq].trim_start_matches(',').trim().to_string();
                let mut value = String::new();
                let mut chars = rest[eq + 2..].char_indices();
                let mut end = rest.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, n)) = chars.next() {
                                value.push(n);
                            }
                        }
                        '"' => {
                            end = eq + 2 + i + 1;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                labels.insert(key, value);
                rest = &rest[end..];
                if rest.starts_with('}') {
                    break;
                }
            }
        }
        into.entry(name.to_string()).or_default().push(labels);
    }
}

/// One use of a metric in a query: its name and the label matchers of its
/// selector (label, operator, value).
#[derive(Debug)]
struct Use {
    name: String,
    matchers: Vec<(String, String, String)>,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Every `trellis_*` metric in a PromQL expression, with its selector.
fn metric_uses(expr: &str) -> Vec<Use> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("trellis_") {
        let start = i + pos;
        if start > 0 && is_name_char(bytes[start - 1] as char) {
            i = start + 1;
            continue;
        }
        let end = expr[start..]
            .find(|c: char| !is_name_char(c))
            .map_or(expr.len(), |e| start + e);
        let name = expr[start..end].to_string();
        let mut matchers = Vec::new();
        if expr[end..].starts_with('{')
            && let Some(close) = expr[end..].find('}')
        {
            for m in expr[end + 1..end + close].split(',') {
                let m = m.trim();
                if m.is_empty() {
                    continue;
                }
                for op in ["=~", "!~", "!=", "="] {
                    if let Some((label, value)) = m.split_once(op) {
                        matchers.push((
                            label.trim().to_string(),
                            op.to_string(),
                            value.trim().trim_matches('"').to_string(),
                        ));
                        break;
                    }
                }
            }
        }
        out.push(Use { name, matchers });
        i = end;
    }
    out
}

/// `by (labels) (expression)` clauses whose expression uses one metric:
/// (metric, labels).
fn grouping_uses(expr: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("by (") {
        let open = i + pos + 3;
        let Some(close) = expr[open..].find(')').map(|c| open + c) else {
            break;
        };
        let labels: Vec<String> = expr[open + 1..close]
            .split(',')
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        // The aggregated expression: the parenthesised group that follows.
        let after = expr[close + 1..].trim_start();
        let offset = expr.len() - after.len();
        if after.starts_with('(') {
            let mut depth = 0;
            let mut end = expr.len();
            for (j, c) in expr[offset..].char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            end = offset + j;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let inner: BTreeSet<String> = metric_uses(&expr[offset..end])
                .into_iter()
                .map(|u| u.name)
                .collect();
            if inner.len() == 1 {
                out.push((inner.into_iter().next().unwrap_or_default(), labels));
            }
        }
        i = close;
    }
    out
}

/// Every PromQL string in a dashboard: panel targets and variable queries.
fn queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => queries(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

fn dashboards_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../charts/trellis/dashboards")
}

/// (dashboard file, query) for every query of every dashboard.
fn dashboard_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dashboards_dir())
        .expect("charts/trellis/dashboards")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboards found");
    for f in files {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&f).expect("dashboard")).expect("JSON");
        let mut qs = Vec::new();
        queries(&v, &mut qs);
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        out.extend(qs.into_iter().map(|q| (name.clone(), q)));
    }
    out
}

/// What the dashboards need that the exported series do not provide.
fn problems(exported: &Exported) -> Vec<String> {
    let mut missing = BTreeSet::new();
    for (file, q) in dashboard_queries() {
        for u in metric_uses(&q) {
            let Some(series) = exported.get(&u.name) else {
                missing.insert(format!("{} (metric not exported; {file})", u.name));
                continue;
            };
            for (label, op, value) in &u.matchers {
                let has_label = series.iter().any(|s| s.contains_key(label));
                if !has_label {
                    missing.insert(format!(
                        "{}{{{label}}} (no series has label {label:?}; {file}: {q})",
                        u.name
                    ));
                } else if op == "=" && !value.contains('$') {
                    let matched = series
                        .iter()
                        .any(|s| s.get(label).is_some_and(|v| v == value));
                    if !matched {
                        missing.insert(format!(
                            "{}{{{label}=\"{value}\"}} (no such series; {file})",
                            u.name
                        ));
                    }
                }
            }
        }
        for (metric, labels) in grouping_uses(&q) {
            let Some(series) = exported.get(&metric) else {
                continue; // reported above
            };
            for l in labels {
                if !series.iter().any(|s| s.contains_key(&l)) {
                    missing.insert(format!(
                        "{metric} by ({l}) (no series has label {l:?}; {file}: {q})"
                    ));
                }
            }
        }
    }
    missing.into_iter().collect()
}

/// Base names (histogram suffixes removed) the dashboards use.
fn dashboard_metric_names() -> BTreeSet<String> {
    dashboard_queries()
        .iter()
        .flat_map(|(_, q)| metric_uses(q))
        .map(|u| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| u.name.strip_suffix(s))
                .map_or(u.name.clone(), str::to_string)
        })
        .collect()
}

async fn scrape(services: &Services) -> (Exported, HashMap<String, Exported>) {
    let mut all = Exported::new();
    let mut per = HashMap::new();
    for (name, admin) in services.admins() {
        let mut one = Exported::new();
        if let Ok((200, body)) = common::http_get(&admin, "/metrics").await {
            parse_exposition(&body, &mut one);
            parse_exposition(&body, &mut all);
        }
        per.insert(name, one);
    }
    (all, per)
}

fn has(exported: &Exported, name: &str, label: &str, value: &str) -> bool {
    exported
        .get(name)
        .is_some_and(|s| s.iter().any(|l| l.get(label).is_some_and(|v| v == value)))
}

#[test]
fn promql_parsing() {
    let q = r#"sum by (outcome, reason) (rate(trellis_handshakes_total{gateway=~"$gateway",outcome!~"ok|success"}[5m])) / trellis_x_bucket"#;
    let uses = metric_uses(q);
    assert_eq!(uses.len(), 2);
    assert_eq!(uses[0].name, "trellis_handshakes_total");
    assert_eq!(
        uses[0].matchers,
        vec![
            ("gateway".into(), "=~".into(), "$gateway".into()),
            ("outcome".into(), "!~".into(), "ok|success".into())
        ]
    );
    assert_eq!(uses[1].name, "trellis_x_bucket");
    assert_eq!(
        grouping_uses(q),
        vec![(
            "trellis_handshakes_total".to_string(),
            vec!["outcome".to_string(), "reason".to_string()]
        )]
    );
    let mut e = Exported::new();
    parse_exposition(
        "# HELP a b\n# TYPE trellis_h histogram\ntrellis_h_bucket{le=\"0.1\",gateway=\"g\\\"1\"} 3\ntrellis_up 1\n",
        &mut e,
    );
    assert_eq!(e["trellis_h_bucket"][0]["gateway"], "g\"1");
    assert_eq!(e["trellis_h_bucket"][0]["le"], "0.1");
    assert!(e["trellis_up"][0].is_empty());
}

/// dashboards/METRICS.txt names exactly the metrics the dashboards query.
#[test]
fn metrics_txt_matches_the_dashboards() {
    let listed: BTreeSet<String> = std::fs::read_to_string(dashboards_dir().join("METRICS.txt"))
        .expect("METRICS.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    assert_eq!(listed, dashboard_metric_names());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_metric_is_exported_after_real_traffic() -> anyhow::Result<()> {
    let redis = trellis_core::local_redis::LocalRedis::start_with_users(
        trellis_core::local_redis::RedisData::Ephemeral,
        trellis_core::local_redis::Admin::Open,
    )?;
    let dir = tempfile::tempdir()?;
    let mut services = Services::start(Options {
        redis: &redis,
        dir: dir.path(),
        otlp: None,
        log: "info",
    })
    .await?;

    // Two devices, simulated in their own process on gateway 1, with events.
    let keys = dir.path().join("keys");
    let keys_s = keys.display().to_string();
    let ids: Vec<String> = ok(services.cli(
        0,
        &[
            "device",
            "provision",
            "--product",
            "1",
            "--count",
            "2",
            "--out",
            &keys_s,
        ],
        &[],
    ))
    .lines()
    .map(str::to_string)
    .collect();
    assert_eq!(ids.len(), 2);
    let _sim = Proc::spawn(
        "sim",
        dir.path(),
        &[
            "sim",
            "--keys",
            &keys_s,
            "--devices",
            "2",
            "--gateway",
            &services.gateways[0].devices,
            "--event-interval",
            "1",
            "--duration",
            "300",
        ],
        &[("RUST_LOG", "warn".to_string())],
    );
    let mut gw2 = pb::device_service_client::DeviceServiceClient::connect(format!(
        "http://{}",
        services.gateways[1].grpc
    ))
    .await?;
    eventually(Duration::from_secs(60), "both devices online", || {
        let mut gw2 = gw2.clone();
        let ids = ids.clone();
        async move {
            let online = gw2
                .list_devices(pb::ListDeviceStatesRequest {
                    product_id: 0,
                    online_only: true,
                })
                .await
                .ok()?
                .into_inner()
                .devices;
            ids.iter()
                .all(|id| {
                    online
                        .iter()
                        .any(|d| &d.device_id == id && !d.functions.is_empty())
                })
                .then_some(())
        }
    })
    .await?;
    let _ = &mut gw2;

    // A call routed from gateway 2 to the device on gateway 1, and a read.
    assert_eq!(
        ok(services.cli(1, &["device", "call", &ids[0], "add", "2,3"], &[])),
        "5"
    );
    ok(services.cli(1, &["device", "get", &ids[1], "temp"], &[]));

    // A refused handshake: a key keyvault never registered.
    let cloud_public_key = trellis_device::identity::load_fleet(&keys, Some(1), None)?
        .first()
        .map(|i| i.cloud_public_key.clone())
        .expect("a device key");
    let stranger = trellis_device::identity::DeviceIdentity {
        device_id: trellis_wire::DeviceId(rand::random()),
        private_key: trellis_device::identity::generate_device_key(&mut rand::rng())?,
        cloud_public_key,
    };
    let gw1_devices = services.gateways[0].devices.parse()?;
    let gw2_devices = services.gateways[1].devices.parse()?;
    assert!(
        RawDevice::connect(gw1_devices, &stranger).await.is_err(),
        "an unregistered device completed a handshake"
    );

    // One identity in session twice at once (gateway 1, then gateway 2).
    let clone_keys = dir.path().join("clone-keys");
    ok(services.cli(
        0,
        &[
            "device",
            "provision",
            "--product",
            "1",
            "--out",
            &clone_keys.display().to_string(),
        ],
        &[],
    ));
    let cloned = trellis_device::identity::load_fleet(&clone_keys, Some(1), None)?
        .pop()
        .expect("the clone's key");
    // From two addresses: the same address again would be a reconnect.
    let _first = RawDevice::connect(gw1_devices, &cloned).await?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind("127.0.0.2:0".parse()?)?;
    let stream = socket.connect(gw2_devices).await?;
    let _second = trellis_device::session::Session::connect(
        stream,
        &cloned,
        trellis_device::session::SessionConfig::default(),
    )
    .await?;

    // A device that stays offline, so the rollout below stays under way.
    let offline = ok(services.cli(
        0,
        &[
            "device",
            "provision",
            "--product",
            "1",
            "--out",
            &dir.path().join("offline-keys").display().to_string(),
        ],
        &[],
    ));

    // An OTA rollout of a release to one of the simulated devices.
    let mut signer =
        pb::signer_client::SignerClient::connect(format!("http://{}", services.signer)).await?;
    let image = b"trellis metrics test firmware, version 2".to_vec();
    let uploaded = signer
        .upload_image(tokio_stream::iter(vec![
            pb::UploadImageRequest {
                part: Some(pb::upload_image_request::Part::Header(
                    pb::UploadImageHeader {
                        product_id: 1,
                        size: image.len() as u64,
                        organization: String::new(),
                    },
                )),
            },
            pb::UploadImageRequest {
                part: Some(pb::upload_image_request::Part::Data(image.clone())),
            },
        ]))
        .await?
        .into_inner();
    let release = signer
        .create_release(pb::CreateReleaseRequest {
            product_id: 1,
            version: 2,
            image_sha256: uploaded.sha256.clone(),
        })
        .await?
        .into_inner();
    let mut ota = pb::ota_client::OtaClient::connect(format!("http://{}", services.ota)).await?;
    let rollout = ota
        .create_rollout(pb::CreateRolloutRequest {
            release_id: release.release_id.clone(),
            target: Some(pb::RolloutTarget {
                product_id: 1,
                device_ids: vec![ids[0].clone(), ids[1].clone(), offline.clone()],
                percent: 0,
                tag: String::new(),
            }),
            stages: vec![pb::Stage {
                name: "all".into(),
                percent: 100,
                ..Default::default()
            }],
            max_failure_ratio: 1.0,
            ..Default::default()
        })
        .await?
        .into_inner();

    // Scrape until everything the dashboards and the issue need is there.
    let wanted = |all: &Exported, per: &HashMap<String, Exported>| -> Vec<String> {
        let mut p = problems(all);
        let mut need = |ok: bool, what: &str| {
            if !ok {
                p.push(what.to_string());
            }
        };
        need(
            has(all, "trellis_handshakes_total", "outcome", "ok"),
            "trellis_handshakes_total{outcome=\"ok\"}",
        );
        need(
            all.get("trellis_handshakes_total").is_some_and(|s| {
                s.iter().any(|l| {
                    l.get("outcome").is_some_and(|o| o == "refused")
                        && l.get("reason").is_some_and(|r| !r.is_empty())
                })
            }),
            "trellis_handshakes_total{outcome=\"refused\",reason=<why>}",
        );
        need(
            has(
                all,
                "trellis_gateway_sessions_open",
                "region",
                "test-region",
            ),
            "trellis_gateway_sessions_open{region=\"test-region\"}",
        );
        need(
            has(all, "trellis_ota_devices", "rollout", &rollout.rollout_id),
            "trellis_ota_devices{rollout=<the rollout>}",
        );
        need(
            has(
                all,
                "trellis_routed_command_duration_seconds_count",
                "kind",
                "function",
            ),
            "trellis_routed_command_duration_seconds{kind=\"function\"}",
        );
        need(
            all.contains_key("trellis_clone_suspicions_total"),
            "trellis_clone_suspicions_total",
        );
        for (service, metric) in [
            ("keyvault", "trellis_keyvault_queue_depth"),
            (
                "keyvault",
                "trellis_keyvault_private_op_duration_seconds_bucket",
            ),
            ("gw-1", "trellis_handshake_duration_seconds_bucket"),
            ("gw-1", "trellis_device_events_total"),
            ("gw-2", "trellis_routed_command_duration_seconds_bucket"),
            ("ota", "trellis_ota_devices"),
        ] {
            need(
                per.get(service).is_some_and(|e| e.contains_key(metric)),
                &format!("{metric} from {service}"),
            );
        }
        for service in ["keyvault", "gateway", "signer", "ota"] {
            for metric in [
                "trellis_redis_errors_total",
                "trellis_redis_reconnects_total",
            ] {
                need(
                    has(all, metric, "service", service),
                    &format!("{metric}{{service=\"{service}\"}}"),
                );
            }
        }
        p
    };
    let mut last = Vec::new();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let (all, per) = scrape(&services).await;
        last = wanted(&all, &per);
        if last.is_empty() {
            for (service, e) in &per {
                let mut names: Vec<&String> = e.keys().collect();
                names.sort();
                eprintln!("{service} exports {names:?}");
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    services.stop();
    assert!(
        last.is_empty(),
        "dashboards query metrics (or labels) the services do not export:\n  {}",
        last.join("\n  ")
    );
    Ok(())
}

//! The approval URL, served by a real HTTP server in the test: a yes
//! updates, a no holds, silence holds with the timeout as the reason.
mod common;

use axum::Json;
use axum::routing::post;
use common::*;
use pb::DeviceUpdateState as D;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use trellis_ota::ApprovalRequest;
use trellis_proto::v1 as pb;

#[tokio::test]
async fn approval_no_holds_exactly_those_and_silence_times_out() {
    let env = env().await;
    let ids = env.devices(PRODUCT, 8, true).await;
    let denied: HashSet<String> = [ids[1].clone(), ids[4].clone()].into();
    let silent = ids[6].clone();
    let asked: Arc<Mutex<Vec<ApprovalRequest>>> = Arc::default();
    let app = {
        let denied = denied.clone();
        let silent = silent.clone();
        let asked = Arc::clone(&asked);
        axum::Router::new().route(
            "/approve",
            post(move |Json(req): Json<ApprovalRequest>| {
                let denied = denied.clone();
                let silent = silent.clone();
                let asked = Arc::clone(&asked);
                async move {
                    asked.lock().unwrap().push(req.clone());
                    if req.device == silent {
                        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                    }
                    if denied.contains(&req.device) {
                        Json(serde_json::json!({"approve": false, "reason": "customer freeze"}))
                    } else {
                        Json(serde_json::json!({"approve": true}))
                    }
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/approve", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let sched = env.scheduler("a");
    let mut req = request(vec![stage_pct(100)]);
    req.approval_url = url;
    req.approval_timeout_ms = 300;
    req.max_concurrent = 8;
    let rid = sched.create(req).await.unwrap().rollout_id;
    let done = drive(&env, &sched, &rid, ended).await;
    assert_eq!(
        done.state(),
        pb::RolloutState::Completed,
        "{}",
        done.message
    );
    for d in &done.devices {
        if denied.contains(&d.device_id) {
            assert_eq!(d.state(), D::Held, "{d:?}");
            assert!(d.reason.contains("customer freeze"), "{}", d.reason);
        } else if d.device_id == silent {
            assert_eq!(d.state(), D::Held, "{d:?}");
            assert!(
                d.reason.contains("approval timed out after 300 ms"),
                "{}",
                d.reason
            );
        } else {
            assert_eq!(d.state(), D::Applied, "{d:?}");
        }
    }
    let delivered = env.fleet.delivered();
    assert_eq!(delivered.len(), 5);
    assert!(
        delivered
            .iter()
            .all(|d| !denied.contains(d) && *d != silent)
    );
    let asked = asked.lock().unwrap();
    assert_eq!(asked.len(), 8);
    assert!(
        asked
            .iter()
            .all(|a| a.product == PRODUCT && a.release == RELEASE && a.rollout == rid)
    );
}

#[tokio::test]
async fn approval_url_that_is_down_holds_with_the_error() {
    let env = env().await;
    env.devices(PRODUCT, 2, true).await;
    let port = trellis_core::local_redis::free_port().unwrap();
    let sched = env.scheduler("a");
    let mut req = request(vec![stage_pct(100)]);
    req.approval_url = format!("http://127.0.0.1:{port}/approve");
    let rid = sched.create(req).await.unwrap().rollout_id;
    let done = drive(&env, &sched, &rid, ended).await;
    assert_eq!(count(&done, D::Held), 2);
    assert!(
        done.devices
            .iter()
            .all(|d| d.reason.starts_with("approval_error")),
        "{done:#?}"
    );
    assert!(env.fleet.delivered().is_empty());
}

/// The SSRF guard: without the allow-list, a loopback approval URL and the
/// cloud metadata address are refused before any request is made, and the
/// devices are held with the refusal as the reason.
#[tokio::test]
async fn approval_url_on_loopback_or_metadata_is_refused_without_the_allow_list() {
    for url in [
        "http://127.0.0.1:9/approve".to_string(),
        "http://169.254.169.254/latest/meta-data".to_string(),
        "http://[::ffff:127.0.0.1]:9/approve".to_string(),
    ] {
        let env = env().await;
        env.devices(PRODUCT, 1, true).await;
        let sched = env.scheduler_with("a", Arc::new(trellis_ota::HttpApprover::new()));
        let mut req = request(vec![stage_pct(100)]);
        req.approval_url = url.clone();
        req.approval_timeout_ms = 2_000;
        let rid = sched.create(req).await.unwrap().rollout_id;
        let done = drive(&env, &sched, &rid, ended).await;
        assert_eq!(count(&done, D::Held), 1, "{url}");
        assert!(
            done.devices
                .iter()
                .all(|d| d.reason.starts_with("approval_refused")
                    && d.reason.contains("ota.approval_allowed_targets")),
            "{url}: {done:#?}"
        );
        assert!(env.fleet.delivered().is_empty());
    }
}

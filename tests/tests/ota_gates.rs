//! The scheduler's gates over real gateway sessions: the customer's
//! approval URL (a real HTTP server here) and the maintenance window (a
//! `ManualClock`, so the test moves time instead of sleeping). What is held
//! or outside the window never reaches a device: the simulated devices
//! themselves count what they applied.
use axum::Json;
use axum::routing::post;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use trellis_ota::{ApprovalRequest, ManualClock};
use trellis_proto::v1::*;
use trellis_tests::Cluster;
use trellis_tests::ota::*;

const PRODUCT: u32 = 41;

fn everyone(stage_name: &str) -> Stage {
    Stage {
        name: stage_name.into(),
        device_count: 0,
        percent: 100,
        soak_secs: 0,
        min_success_ratio: 1.0,
    }
}

async fn rollout(
    ota: &mut trellis_proto::v1::ota_client::OtaClient<tonic::transport::Channel>,
    id: &str,
) -> anyhow::Result<RolloutStatus> {
    Ok(ota
        .get_rollout(GetRolloutRequest {
            rollout_id: id.into(),
        })
        .await?
        .into_inner())
}

/// Serves the approval hook on a free loopback port: no for `denied`, no
/// answer at all for `silent`, yes for everyone else. Records every ask.
async fn approval_hook(
    denied: HashSet<String>,
    silent: String,
    asked: Arc<Mutex<Vec<ApprovalRequest>>>,
) -> anyhow::Result<String> {
    let app = axum::Router::new().route(
        "/approve",
        post(move |Json(req): Json<ApprovalRequest>| {
            let denied = denied.clone();
            let silent = silent.clone();
            let asked = Arc::clone(&asked);
            async move {
                asked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(req.clone());
                if req.device == silent {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                if denied.contains(&req.device) {
                    Json(serde_json::json!({"approve": false, "reason": "customer freeze"}))
                } else {
                    Json(serde_json::json!({"approve": true}))
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/approve", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approval_no_and_silence_hold_exactly_those_devices() -> anyhow::Result<()> {
    // The hook listens on loopback, which the SSRF guard refuses unless allowed.
    let (cluster, stack) = Cluster::start_with_ota(2, |c| {
        c.ota.approval_allowed_targets = vec!["127.0.0.0/8".into()];
    })
    .await?;
    let keys = ReleaseKeys::provision(&cluster, &stack, &[PRODUCT]).await?;
    let config = device_config(PRODUCT, 1, &keys.policy);
    let g = |n: usize| cluster.gateways[n].devices.to_string();
    let fleet = Fleet::start(&cluster, 6, PRODUCT, config, vec![g(1), g(0)]).await?;
    let ids = fleet.ids();
    all_online(&cluster, &ids, Duration::from_secs(60)).await?;

    let denied: HashSet<String> = [ids[1].clone(), ids[4].clone()].into();
    let silent = ids[3].clone();
    let asked: Arc<Mutex<Vec<ApprovalRequest>>> = Arc::default();
    let url = approval_hook(denied.clone(), silent.clone(), Arc::clone(&asked)).await?;

    let image = test_image(PRODUCT, 2, 16 * 1024);
    let (release, sha) = make_release(&stack, &keys, PRODUCT, 2, &image, Signers::Both).await?;
    let mut ota = stack.ota_client().await?;
    let created = ota
        .create_rollout(CreateRolloutRequest {
            release_id: release.clone(),
            target: Some(RolloutTarget {
                product_id: PRODUCT,
                device_ids: vec![],
                percent: 0,
                tag: String::new(),
            }),
            stages: vec![everyone("all")],
            max_failure_ratio: 1.0,
            max_concurrent: 10,
            apply_timeout_secs: 60,
            approval_url: url,
            approval_timeout_ms: 500,
            ..Default::default()
        })
        .await?
        .into_inner();

    // Held devices end the rollout's work: wait until every device is in
    // a final state (applied or held), then look at what the devices ran.
    let started = std::time::Instant::now();
    let done = loop {
        let r = rollout(&mut ota, &created.rollout_id).await?;
        let settled = r.devices.len() == ids.len()
            && r.devices.iter().all(|d| {
                matches!(
                    d.state(),
                    DeviceUpdateState::Applied | DeviceUpdateState::Held
                )
            });
        if settled {
            break r;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(90),
            "rollout did not settle: {:#?}",
            r.devices
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for d in &done.devices {
        if denied.contains(&d.device_id) {
            assert_eq!(d.state(), DeviceUpdateState::Held, "{d:?}");
            assert!(d.reason.contains("customer freeze"), "{}", d.reason);
        } else if d.device_id == silent {
            assert_eq!(d.state(), DeviceUpdateState::Held, "{d:?}");
            assert!(d.reason.contains("timed out"), "{}", d.reason);
        } else {
            assert_eq!(d.state(), DeviceUpdateState::Applied, "{d:?}");
        }
    }
    // The devices themselves: only the approved ones took the image.
    let states = device_states(&cluster).await?;
    for id in &ids {
        let held = denied.contains(id) || *id == silent;
        assert_eq!(
            fleet.applied_count(id),
            usize::from(!held),
            "{id}: held devices must not be touched, approved ones updated once"
        );
        if let Some(st) = states.iter().find(|s| &s.device_id == id) {
            assert_eq!(
                st.firmware_sha256 == sha,
                !held,
                "{id} runs the wrong image"
            );
        }
    }
    {
        let asked = asked.lock().unwrap_or_else(|p| p.into_inner());
        let asked_ids: HashSet<&str> = asked.iter().map(|a| a.device.as_str()).collect();
        assert_eq!(asked_ids.len(), ids.len(), "every device is asked about");
        assert!(asked.iter().all(|a| a.product == PRODUCT
            && a.release == release
            && a.rollout == created.rollout_id));
    }
    fleet.stop().await;
    stack.stop().await;
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outside_the_window_nothing_is_delivered_inside_it_is() -> anyhow::Result<()> {
    // Saturday 12:00 UTC; the window is weekdays 02:00-05:00 UTC.
    let clock = ManualClock::at(5, 12);
    let (cluster, stack) =
        Cluster::start_with_ota_clock(1, Arc::new(clock.clone()), |_| {}).await?;
    let keys = ReleaseKeys::provision(&cluster, &stack, &[PRODUCT]).await?;
    let config = device_config(PRODUCT, 1, &keys.policy);
    let fleet = Fleet::start(
        &cluster,
        4,
        PRODUCT,
        config,
        vec![cluster.gateways[0].devices.to_string()],
    )
    .await?;
    let ids = fleet.ids();
    all_online(&cluster, &ids, Duration::from_secs(60)).await?;

    let image = test_image(PRODUCT, 2, 8 * 1024);
    let (release, sha) = make_release(&stack, &keys, PRODUCT, 2, &image, Signers::Both).await?;
    let mut ota = stack.ota_client().await?;
    let created = ota
        .create_rollout(CreateRolloutRequest {
            release_id: release,
            target: Some(RolloutTarget {
                product_id: PRODUCT,
                device_ids: vec![],
                percent: 0,
                tag: String::new(),
            }),
            stages: vec![everyone("all")],
            max_failure_ratio: 0.5,
            max_concurrent: 10,
            apply_timeout_secs: 60,
            window: Some(MaintenanceWindow {
                days: vec![0, 1, 2, 3, 4],
                start_hour: 2,
                end_hour: 5,
            }),
            ..Default::default()
        })
        .await?
        .into_inner();

    // The scheduler ticks every 100 ms: 3 s is thirty chances to start
    // something it must not.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = rollout(&mut ota, &created.rollout_id).await?;
    assert!(
        r.devices
            .iter()
            .all(|d| d.state() == DeviceUpdateState::Pending),
        "outside the window a device left pending: {:#?}",
        r.devices
    );
    assert!(
        r.message.contains("maintenance window"),
        "the status says why nothing moves: {:?}",
        r.message
    );
    assert!(ids.iter().all(|id| fleet.applied_count(id) == 0));

    // Monday 03:00 UTC: inside the window, the rollout runs to the end.
    clock.set(ManualClock::at(0, 3).now_ms_value());
    let started = std::time::Instant::now();
    loop {
        let r = rollout(&mut ota, &created.rollout_id).await?;
        match r.state() {
            RolloutState::Completed => break,
            RolloutState::Running => {}
            other => anyhow::bail!("rollout ended {other:?}: {}", r.message),
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "not complete inside the window: {:#?}",
            r.devices
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let states = device_states(&cluster).await?;
    for id in &ids {
        assert_eq!(fleet.applied_count(id), 1, "{id}");
        let st = states.iter().find(|s| &s.device_id == id);
        assert_eq!(st.map(|s| s.firmware_sha256.as_str()), Some(sha.as_str()));
    }
    fleet.stop().await;
    stack.stop().await;
    cluster.stop().await;
    Ok(())
}

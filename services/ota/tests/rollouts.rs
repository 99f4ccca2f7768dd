//! The scheduler against a real redis-server, a simulated fleet and a
//! manual clock.
mod common;

use common::*;
use pb::DeviceUpdateState as D;
use std::time::Duration;
use trellis_proto::v1 as pb;

#[tokio::test]
async fn staged_rollout_completes_and_counts_only_after_hello() {
    let env = env().await;
    let ids = env.devices(PRODUCT, 20, true).await;
    let sched = env.scheduler("a");
    let created = sched
        .create(request(vec![stage_count(2), stage_pct(50), stage_pct(100)]))
        .await
        .unwrap();
    let rid = created.rollout_id.clone();
    assert_eq!(created.devices.len(), 20);
    let per_stage: Vec<u32> = created.stages.iter().map(|s| s.devices).collect();
    assert_eq!(per_stage, vec![2, 8, 10]);

    // First tick: only the canary is started; delivered but not yet applied.
    sched.tick().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let s = sched.status(&rid, true).await.unwrap();
    let canary: Vec<&pb::DeviceUpdate> = s.devices.iter().filter(|d| d.stage == 0).collect();
    assert!(canary.iter().all(|d| d.state() == D::Delivering), "{s:#?}");
    assert_eq!(count(&s, D::Applied), 0);
    assert_eq!(env.fleet.delivered().len(), 2);
    // Ticks without Hellos open nothing further.
    sched.tick().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(env.fleet.delivered().len(), 2);
    assert_eq!(sched.status(&rid, false).await.unwrap().current_stage, 0);

    let done = drive(&env, &sched, &rid, ended).await;
    assert_eq!(
        done.state(),
        pb::RolloutState::Completed,
        "{}",
        done.message
    );
    assert_eq!(count(&done, D::Applied), 20);
    assert_eq!(env.fleet.delivered().len(), 20);
    env.fleet.assert_at_most_once();
    // Stage order held: the canary's devices were delivered first.
    let order = env.fleet.order();
    let stage_of = |d: &str| {
        done.devices
            .iter()
            .find(|x| x.device_id == d)
            .unwrap()
            .stage
    };
    let stages: Vec<u32> = order.iter().map(|d| stage_of(d)).collect();
    let mut sorted = stages.clone();
    sorted.sort();
    assert_eq!(stages, sorted, "devices delivered out of stage order");
    assert!(done.stages.iter().all(|s| s.completed_at_ms > 0));
    assert_eq!(ids.len(), 20);
}

#[tokio::test]
async fn failure_ratio_in_canary_aborts_and_nothing_past_it_is_touched() {
    let env = env().await;
    let ids = env.devices(PRODUCT, 20, true).await;
    for id in &ids {
        env.fleet
            .set(id, Behaviour::Reject("insufficient_signatures"));
    }
    let sched = env.scheduler("a");
    let rid = create(&sched, vec![stage_count(2), stage_pct(50), stage_pct(100)]).await;
    let done = drive(&env, &sched, &rid, ended).await;
    assert_eq!(done.state(), pb::RolloutState::Aborted);
    assert!(
        done.message.contains("max_failure_ratio"),
        "{}",
        done.message
    );
    assert_eq!(env.fleet.delivered().len(), 2, "only the canary is touched");
    for d in &done.devices {
        if d.stage == 0 {
            assert_eq!(d.state(), D::RejectedByDevice);
            assert!(d.reason.contains("insufficient_signatures"), "{}", d.reason);
        } else {
            assert_eq!(d.state(), D::Skipped, "{d:?}");
        }
    }
    // Later ticks start nothing.
    sched.tick().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(env.fleet.delivered().len(), 2);
}

#[tokio::test]
async fn a_device_that_comes_back_with_the_old_image_is_not_applied() {
    let env = env().await;
    let ids = env.devices(PRODUCT, 4, true).await;
    env.fleet.set(&ids[0], Behaviour::NotApplied);
    let sched = env.scheduler("a");
    let mut req = request(vec![stage_pct(100)]);
    req.max_failure_ratio = 1.0;
    let rid = sched.create(req).await.unwrap().rollout_id;
    let done = drive(&env, &sched, &rid, ended).await;
    let bad = done.devices.iter().find(|d| d.device_id == ids[0]).unwrap();
    assert_eq!(bad.state(), D::Failed);
    assert!(bad.reason.starts_with("not_applied"), "{}", bad.reason);
    assert_eq!(count(&done, D::Applied), 3);
}

#[tokio::test]
async fn transfer_failures_are_retried_up_to_max_attempts() {
    let env = env().await;
    let ids = env.devices(PRODUCT, 2, true).await;
    env.fleet.set(&ids[0], Behaviour::Fail);
    let sched = env.scheduler("a");
    let mut req = request(vec![stage_pct(100)]);
    req.max_failure_ratio = 1.0;
    req.max_attempts = 2;
    let rid = sched.create(req).await.unwrap().rollout_id;
    let done = drive(&env, &sched, &rid, ended).await;
    let bad = done.devices.iter().find(|d| d.device_id == ids[0]).unwrap();
    assert_eq!(bad.state(), D::Failed);
    assert_eq!(bad.attempts, 2);
    assert_eq!(env.fleet.deliveries()[&ids[0]], 2);
    assert_eq!(env.fleet.deliveries()[&ids[1]], 1);
}

#[tokio::test]
async fn outside_the_window_nothing_starts_inside_it_does() {
    let env = env().await;
    env.devices(PRODUCT, 4, true).await;
    // Saturday noon; the window is Monday to Friday, 02-05 UTC.
    env.clock
        .set(trellis_ota::ManualClock::at(5, 12).now_ms_value());
    let sched = env.scheduler("a");
    let mut req = request(vec![stage_pct(100)]);
    req.window = Some(pb::MaintenanceWindow {
        days: vec![0, 1, 2, 3, 4],
        start_hour: 2,
        end_hour: 5,
    });
    let rid = sched.create(req).await.unwrap().rollout_id;
    for _ in 0..5 {
        sched.tick().await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let s = sched.status(&rid, true).await.unwrap();
    assert!(env.fleet.delivered().is_empty());
    assert!(s.message.contains("maintenance window"), "{}", s.message);
    assert_eq!(count(&s, D::Pending), 4);
    // Monday 04:00 is inside.
    env.clock
        .set(trellis_ota::ManualClock::at(0, 4).now_ms_value());
    let done = drive(&env, &sched, &rid, ended).await;
    assert_eq!(done.state(), pb::RolloutState::Completed);
    assert_eq!(env.fleet.delivered().len(), 4);
    // And 05:00 is outside again (exclusive end) for a new rollout.
}

#[tokio::test]
async fn restarted_scheduler_carries_on_without_delivering_twice() {
    let env = env().await;
    env.devices(PRODUCT, 12, true).await;
    let first = env.scheduler("first");
    let mut req = request(vec![stage_count(2), stage_pct(100)]);
    req.max_concurrent = 3;
    let rid = first.create(req).await.unwrap().rollout_id;
    // Run until the second stage has started, then "crash".
    drive(&env, &first, &rid, |s| {
        s.current_stage == 1 && count(s, D::Applied) >= 4
    })
    .await;
    first.stop().await;
    drop(first);
    let before = env.fleet.delivered().len();
    assert!(before < 12);
    let second = env.scheduler("second");
    let done = drive(&env, &second, &rid, ended).await;
    assert_eq!(done.state(), pb::RolloutState::Completed);
    assert_eq!(count(&done, D::Applied), 12);
    env.fleet.assert_at_most_once();
}

#[tokio::test]
async fn two_replicas_never_deliver_one_device_twice() {
    let env = env().await;
    env.devices(PRODUCT, 30, true).await;
    env.devices(8, 10, true).await;
    env.releases.insert(trellis_ota::ReleaseInfo {
        release_id: "8-2".into(),
        product_id: 8,
        version: 2,
        image_sha256: NEW_SHA.into(),
    });
    let a = env.scheduler("a");
    let b = env.scheduler("b");
    let mut req = request(vec![stage_count(3), stage_pct(100)]);
    req.max_concurrent = 8;
    let r1 = a.create(req.clone()).await.unwrap().rollout_id;
    req.release_id = "8-2".into();
    req.target = Some(pb::RolloutTarget {
        product_id: 8,
        ..Default::default()
    });
    let r2 = b.create(req).await.unwrap().rollout_id;
    let (trigger, shutdown) = trellis_core::Shutdown::new();
    let ta = tokio::spawn(a.clone().run(shutdown.clone()));
    let tb = tokio::spawn(b.clone().run(shutdown.clone()));
    // Both replicas answer Hellos (alternating), both tick all the time.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut turn = false;
    loop {
        turn = !turn;
        let hello = if turn { &a } else { &b };
        reconnect_all_any(&env, hello, &[&r1, &r2]).await;
        let s1 = a.status(&r1, false).await.unwrap();
        let s2 = b.status(&r2, false).await.unwrap();
        if ended(&s1) && ended(&s2) {
            assert_eq!(s1.state(), pb::RolloutState::Completed, "{}", s1.message);
            assert_eq!(s2.state(), pb::RolloutState::Completed, "{}", s2.message);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{s1:#?} {s2:#?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    trigger.trigger();
    let _ = ta.await;
    let _ = tb.await;
    assert_eq!(env.fleet.delivered().len(), 40);
    env.fleet.assert_at_most_once();
}

/// Reconnects for devices that may be in either of several rollouts.
async fn reconnect_all_any(env: &Env, sched: &trellis_ota::Scheduler, rollouts: &[&str]) {
    let mut redis = env.redis.clone();
    let pending = env.fleet.take_reconnects();
    let mut back = Vec::new();
    for (device, sha) in pending {
        let rollout = trellis_ota::store::rollout_of(&mut redis, &device)
            .await
            .unwrap()
            .unwrap();
        assert!(rollouts.contains(&rollout.as_str()));
        let (_, rec) = trellis_ota::store::device(&mut redis, &rollout, &device)
            .await
            .unwrap()
            .unwrap();
        if !rec.sent {
            back.push((device, sha));
            continue;
        }
        connect_session(&mut redis, &device).await;
        sched
            .device_hello(pb::DeviceHelloRequest {
                device_id: device,
                product_id: 0,
                firmware_version: 2,
                firmware_sha256: sha,
                gateway_id: "gw".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    for (d, s) in back {
        env.fleet.requeue(d, s);
    }
}

#[tokio::test]
async fn pause_resume_abort() {
    let env = env().await;
    let ids = env.devices(PRODUCT, 10, true).await;
    let sched = env.scheduler("a");
    let mut req = request(vec![stage_count(2), stage_pct(100)]);
    req.max_concurrent = 2;
    let rid = sched.create(req).await.unwrap().rollout_id;
    let paused = sched.pause(&rid, "lunch").await.unwrap();
    assert_eq!(paused.state(), pb::RolloutState::Paused);
    assert!(paused.message.contains("lunch"));
    for _ in 0..3 {
        sched.tick().await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(env.fleet.delivered().is_empty(), "paused: nothing starts");
    // Pausing twice is refused with the reason.
    let e = sched.pause(&rid, "").await.unwrap_err();
    assert_eq!(
        tonic::Status::from(e).code(),
        tonic::Code::FailedPrecondition
    );

    sched.resume(&rid, "").await.unwrap();
    drive(&env, &sched, &rid, |s| count(s, D::Applied) >= 4).await;
    let aborted = sched.abort(&rid, "bad batch").await.unwrap();
    assert_eq!(aborted.state(), pb::RolloutState::Aborted);
    let delivered = env.fleet.delivered();
    for d in &aborted.devices {
        if !delivered.contains(&d.device_id) {
            assert_eq!(d.state(), D::Skipped, "{d:?}");
        }
    }
    for _ in 0..3 {
        sched.tick().await;
    }
    reconnect_all(&env, &sched, &rid).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        env.fleet.delivered(),
        delivered,
        "nothing starts after abort"
    );
    let e = sched.resume(&rid, "").await.unwrap_err();
    assert_eq!(
        tonic::Status::from(e).code(),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(ids.len(), 10);
}

#[tokio::test]
async fn offline_device_is_updated_when_it_connects() {
    let env = env().await;
    let ids = env.devices(PRODUCT, 3, false).await;
    let sched = env.scheduler("a");
    let rid = create(&sched, vec![stage_pct(100)]).await;
    sched.tick().await;
    assert!(
        env.fleet.delivered().is_empty(),
        "offline: nothing delivered"
    );
    let mut redis = env.redis.clone();
    let epoch = connect_session(&mut redis, &ids[0]).await;
    let hello = |sha: &str, _epoch: u64| pb::DeviceHelloRequest {
        device_id: ids[0].clone(),
        product_id: PRODUCT,
        firmware_version: 1,
        firmware_sha256: sha.into(),
        gateway_id: "gw-1".into(),
        ..Default::default()
    };
    let due = sched.device_hello(hello(OLD_SHA, epoch)).await.unwrap();
    assert_eq!(due.rollout_id, rid);
    assert_eq!(due.release_id, RELEASE);
    // A second Hello for the same device gets nothing: it is delivering.
    assert!(
        sched
            .device_hello(hello(OLD_SHA, epoch))
            .await
            .unwrap()
            .rollout_id
            .is_empty()
    );
    // The gateway reports the outcome, then the device comes back updated.
    let reported = sched
        .report_delivery(pb::ReportDeliveryRequest {
            rollout_id: rid.clone(),
            device_id: ids[0].clone(),
            result: Some(pb::DeliverUpdateResponse {
                outcome: pb::DeliveryOutcome::Sent as i32,
                ..Default::default()
            }),
            session_epoch: epoch,
        })
        .await
        .unwrap();
    assert_eq!(reported.state(), D::Delivering);
    let epoch = connect_session(&mut redis, &ids[0]).await;
    sched.device_hello(hello(NEW_SHA, epoch)).await.unwrap();
    let s = sched.status(&rid, true).await.unwrap();
    assert_eq!(state_of(&s, &ids[0]), D::Applied);
    assert_eq!(state_of(&s, &ids[1]), D::Pending);
}

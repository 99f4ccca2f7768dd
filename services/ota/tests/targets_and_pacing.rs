//! Which devices a rollout takes (a tag) and how fast it goes through them
//! (devices updating at once, a stage's soak time, its success gate), against
//! a real redis-server, a simulated fleet and a manual clock.
mod common;

use common::*;
use pb::DeviceUpdateState as D;
use redis::AsyncCommands;
use std::collections::HashSet;
use std::time::Duration;
use trellis_core::redis_conn::keys;
use trellis_proto::v1 as pb;

/// Tags as keyvault stores them (`registry::set_tags`: sorted, comma-joined).
async fn tag(env: &Env, device: &str, tags: &str) {
    let mut redis = env.redis.clone();
    let _: () = redis
        .hset(keys::device(device), "tags", tags)
        .await
        .unwrap();
}

fn tagged(t: &str) -> pb::CreateRolloutRequest {
    let mut req = request(vec![stage_pct(100)]);
    if let Some(target) = req.target.as_mut() {
        target.tag = t.into();
    }
    req
}

#[tokio::test]
async fn a_tag_targets_exactly_the_devices_that_carry_it() {
    let env = env().await;
    let ids = env.devices(PRODUCT, 10, true).await;
    for id in &ids[..4] {
        tag(&env, id, "lobby,site-a").await;
    }
    // Tags are whole words: "site-ab" is not "site-a".
    tag(&env, &ids[4], "site-ab").await;
    tag(&env, &ids[5], "site-b").await;
    let sched = env.scheduler("a");

    let created = sched.create(tagged("Site-A ")).await.unwrap();
    let targeted: HashSet<String> = created
        .devices
        .iter()
        .map(|d| d.device_id.clone())
        .collect();
    let want: HashSet<String> = ids[..4].iter().cloned().collect();
    assert_eq!(targeted, want);
    let done = completed(&env, &sched, &created.rollout_id).await;
    assert_eq!(count(&done, D::Applied), 4);
    assert_eq!(
        env.fleet.delivered(),
        want,
        "only tagged devices are touched"
    );

    // Refusals, each with a message that says what to fix, and no record.
    let before: Vec<String> = env.redis.clone().keys("trellis:rollout*").await.unwrap();
    let err = sched.create(tagged("nobody")).await.unwrap_err();
    assert!(err.to_string().contains("\"nobody\""), "{err}");
    let err = sched.create(tagged("bad,tag")).await.unwrap_err();
    assert!(err.to_string().contains("not a tag"), "{err}");
    let mut both = tagged("site-a");
    if let Some(t) = both.target.as_mut() {
        t.device_ids = vec![ids[0].clone()];
    }
    let err = sched.create(both).await.unwrap_err();
    assert!(
        err.to_string().contains("both device_ids and a tag"),
        "{err}"
    );
    let after: Vec<String> = env.redis.clone().keys("trellis:rollout*").await.unwrap();
    assert_eq!(before.len(), after.len(), "a refused rollout left records");
}

/// A device another organisation registered under the product's number is
/// not in the product's rollouts, and cannot be named in one.
#[tokio::test]
async fn a_rollout_takes_only_its_products_organisation() {
    let env = env().await;
    let ids = env.devices(PRODUCT, 4, true).await;
    let mut redis = env.redis.clone();
    let _: () = redis
        .hset(keys::device(&ids[3]), "organization", "acme")
        .await
        .unwrap();
    let sched = env.scheduler("a");
    let created = sched.create(request(vec![stage_pct(100)])).await.unwrap();
    let targeted: HashSet<String> = created
        .devices
        .iter()
        .map(|d| d.device_id.clone())
        .collect();
    let want: HashSet<String> = ids[..3].iter().cloned().collect();
    assert_eq!(
        targeted, want,
        "acme's device is in the default organisation's rollout"
    );
    let done = completed(&env, &sched, &created.rollout_id).await;
    assert_eq!(count(&done, D::Applied), 3);

    let mut named = request(vec![stage_pct(100)]);
    if let Some(t) = named.target.as_mut() {
        t.device_ids = vec![ids[3].clone()];
    }
    let err = sched.create(named).await.unwrap_err();
    assert!(err.to_string().contains("another organisation"), "{err}");
}

#[tokio::test]
async fn no_more_than_max_concurrent_devices_update_at_once() {
    let env = env().await;
    env.devices(PRODUCT, 10, true).await;
    let sched = env.scheduler("a");
    let mut req = request(vec![stage_pct(100)]);
    req.max_concurrent = 3;
    let rid = sched.create(req).await.unwrap().rollout_id;

    // Devices that took the image have not come back yet: still in flight.
    idle_ticks(&sched, 5, 30).await;
    assert_eq!(env.fleet.delivered().len(), 3, "max_concurrent 3");

    // As they come back, the next ones start, never more than 3 at once.
    let mut peak = 0;
    let done = drive(&env, &sched, &rid, |s| {
        let in_flight = count(s, D::Delivering) + count(s, D::WaitingApproval);
        peak = peak.max(in_flight);
        ended(s)
    })
    .await;
    assert_eq!(
        done.state(),
        pb::RolloutState::Completed,
        "{}",
        done.message
    );
    assert_eq!(count(&done, D::Applied), 10);
    assert!(peak <= 3, "{peak} devices were updating at once");
    env.fleet.assert_at_most_once();
}

#[tokio::test]
async fn the_next_stage_waits_out_the_soak_time() {
    let env = env().await;
    env.devices(PRODUCT, 6, true).await;
    let sched = env.scheduler("a");
    let mut canary = stage_count(2);
    canary.soak_secs = 600;
    let rid = create(&sched, vec![canary, stage_pct(100)]).await;

    // The canary finishes; the clock has not moved, so the stage soaks.
    let soaking = drive(&env, &sched, &rid, |s| s.message.contains("soaking")).await;
    assert_eq!(count(&soaking, D::Applied), 2);
    assert_eq!(soaking.current_stage, 0);
    idle_ticks(&sched, 5, 20).await;
    assert_eq!(
        env.fleet.delivered().len(),
        2,
        "nothing past the canary while soaking"
    );

    // Nine minutes in: still soaking. Past ten: the next stage opens.
    env.clock.advance_ms(540_000);
    sched.tick().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(env.fleet.delivered().len(), 2);
    env.clock.advance_ms(61_000);
    let done = completed(&env, &sched, &rid).await;
    assert_eq!(count(&done, D::Applied), 6);
}

#[tokio::test]
async fn a_stage_below_its_success_ratio_pauses_until_an_operator_resumes() {
    let env = env().await;
    let ids = env.devices(PRODUCT, 8, true).await;
    let sched = env.scheduler("a");
    let mut canary = stage_count(4);
    canary.min_success_ratio = 0.9;
    let mut req = request(vec![canary, stage_pct(100)]);
    // High enough that the failures pause the rollout rather than abort it.
    req.max_failure_ratio = 0.6;
    let rid = sched.create(req).await.unwrap().rollout_id;
    let created = sched.status(&rid, true).await.unwrap();
    let canary_ids: Vec<String> = created
        .devices
        .iter()
        .filter(|d| d.stage == 0)
        .map(|d| d.device_id.clone())
        .collect();
    assert_eq!(canary_ids.len(), 4);
    env.fleet
        .set(&canary_ids[0], Behaviour::Reject("version_rollback"));

    // 3 of 4 applied = 0.75 < 0.9: paused, with the reason, nothing further.
    let paused = drive(&env, &sched, &rid, |s| {
        s.state() == pb::RolloutState::Paused || ended(s)
    })
    .await;
    assert_eq!(
        paused.state(),
        pb::RolloutState::Paused,
        "{}",
        paused.message
    );
    assert!(
        paused.message.contains("min_success_ratio"),
        "{}",
        paused.message
    );
    idle_ticks(&sched, 5, 20).await;
    assert_eq!(
        env.fleet.delivered().len(),
        4,
        "nothing past the gated stage"
    );

    // The operator looks and resumes: the next stage opens.
    sched.resume(&rid, "looked at it").await.unwrap();
    let done = completed(&env, &sched, &rid).await;
    assert_eq!(count(&done, D::Applied), 7);
    assert_eq!(count(&done, D::RejectedByDevice), 1);
    assert_eq!(ids.len(), 8);
}

/// A fast device reboots and says Hello running the release before its
/// gateway's report of the delivery reaches the scheduler: it still counts
/// as applied (the Hello is never lost to the report's write).
#[tokio::test]
async fn a_hello_that_beats_the_delivery_report_counts() {
    let env = env().await;
    let ids = env.devices(PRODUCT, 4, true).await;
    for id in &ids {
        env.fleet.set(id, Behaviour::SlowReport(300));
    }
    let sched = env.scheduler("a");
    let rid = create(&sched, vec![stage_pct(100)]).await;
    sched.tick().await;
    // Hello while the delivery's answer is still on its way.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut helloed = 0;
    while helloed < ids.len() && std::time::Instant::now() < deadline {
        for (device, sha) in env.fleet.take_early() {
            let mut redis = env.redis.clone();
            connect_session(&mut redis, &device).await;
            hello(&sched, &device, &sha).await;
            helloed += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(helloed, ids.len());
    // Reports land after the Hellos; nothing undoes Applied.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let done = completed(&env, &sched, &rid).await;
    assert_eq!(count(&done, D::Applied), 4, "{done:#?}");
    env.fleet.assert_at_most_once();
}

/// The scheduler was down (or the gateway's call failed) when a device came
/// back running the release: the gateway still recorded the Hello in
/// Redis, and the scheduler finds it there instead of timing the device out.
#[tokio::test]
async fn a_hello_the_scheduler_never_heard_is_found_in_redis() {
    let env = env().await;
    let ids = env.devices(PRODUCT, 3, true).await;
    let sched = env.scheduler("a");
    let mut req = request(vec![stage_pct(100)]);
    req.apply_timeout_secs = 600;
    let rid = sched.create(req).await.unwrap().rollout_id;
    sched.tick().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Every device took the image and reconnects running it, but nobody
    // tells the scheduler: only the gateway's records change.
    let mut redis = env.redis.clone();
    let back = env.fleet.take_reconnects();
    assert_eq!(back.len(), 3);
    for (device, sha) in &back {
        connect_session(&mut redis, device).await;
        let _: () = redis
            .hset(keys::device_state(device), "firmware_sha256", sha)
            .await
            .unwrap();
    }
    // Not before the device had its chance to say Hello the usual way.
    sched.tick().await;
    let s = sched.status(&rid, true).await.unwrap();
    assert_eq!(count(&s, D::Applied), 0, "{s:#?}");
    env.clock.advance_ms(4_000);
    sched.tick().await;
    let s = sched.status(&rid, true).await.unwrap();
    assert_eq!(count(&s, D::Applied), 3, "{s:#?}");
    assert!(
        s.devices.iter().all(|d| d.reason.contains("Hello record")),
        "{s:#?}"
    );
    assert_eq!(ids.len(), 3);
}

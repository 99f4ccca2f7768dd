//! Two regions: rollouts in one durable Redis, each region's sessions in
//! its own Redis, one scheduler per region. The lease of a rollout goes to
//! the scheduler of the region where its devices are in session.
mod common;

use common::*;
use pb::DeviceUpdateState as D;
use std::time::{Duration, Instant};
use trellis_proto::v1 as pb;

#[tokio::test]
async fn the_lease_goes_to_the_region_where_the_devices_are() {
    let env = env().await;
    let (_a_server, regional_a) = redis_server().await;
    let (_b_server, regional_b) = redis_server().await;
    let ids = env.devices(PRODUCT, 12, false).await;
    // The whole fleet is in session in region A.
    online_in(&regional_a, &ids).await;
    let (fleet_a, fleet_b) = (Fleet::default(), Fleet::default());
    let a = env.scheduler_in("a", &regional_a, &fleet_a, 5_000);
    let b = env.scheduler_in("b", &regional_b, &fleet_b, 5_000);

    let mut req = request(vec![stage_count(2), stage_pct(100)]);
    req.max_concurrent = 3;
    let rid = b.create(req).await.unwrap().rollout_id;

    // B's scheduler starts first: it takes the lease, sees every due device
    // offline in its region and gives the lease up.
    b.tick().await;
    let (holder, fence) = lease_of(&env, &rid).await;
    assert_eq!(fence, 1, "B took the lease");
    assert_eq!(holder, None, "B gave the lease up");
    // ... and does not take it again for a while.
    for _ in 0..3 {
        b.tick().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(lease_of(&env, &rid).await, (None, 1));
    let s = b.status(&rid, true).await.unwrap();
    assert_eq!(count(&s, D::Pending), 12, "{s:#?}");
    assert!(s.message.contains("offline"), "{}", s.message);

    // A's starts shortly after, both tick: A takes the rollout and it
    // completes, every device delivered once, by A.
    let deadline = Instant::now() + Duration::from_secs(20);
    let done = loop {
        b.tick().await;
        a.tick().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        reconnect_in(&env, &regional_a, &fleet_a, &a, &rid).await;
        let s = a.status(&rid, true).await.unwrap();
        if ended(&s) {
            break s;
        }
        assert!(Instant::now() < deadline, "rollout stalled: {s:#?}");
    };
    assert_eq!(
        done.state(),
        pb::RolloutState::Completed,
        "{}",
        done.message
    );
    assert_eq!(count(&done, D::Applied), 12);
    assert_eq!(fleet_a.delivered().len(), 12);
    fleet_a.assert_at_most_once();
    assert!(
        fleet_b.deliveries().is_empty(),
        "B delivered: {:?}",
        fleet_b.deliveries()
    );
    let (holder, fence) = lease_of(&env, &rid).await;
    assert!(
        holder.as_deref().is_some_and(|h| h.starts_with("a:")),
        "the lease ends with A: {holder:?}"
    );
    assert!(fence >= 2, "fence {fence}");
}

#[tokio::test]
async fn a_lone_scheduler_keeps_its_rollout_and_completes_it_once_devices_connect() {
    let env = env().await;
    let ids = env.devices(PRODUCT, 4, false).await;
    let lease_ms = 1_000;
    let sched = env.scheduler_lease("a", lease_ms);
    let rid = create(&sched, vec![stage_pct(100)]).await;

    // Every device offline: the lease is given up once ...
    sched.tick().await;
    assert_eq!(lease_of(&env, &rid).await, (None, 1));
    // ... and taken again after the back-off (about 2 lease periods); as
    // nobody else took it meanwhile, this replica then keeps it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        sched.tick().await;
        if lease_of(&env, &rid).await.0.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the lease was never taken again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..5 {
        sched.tick().await;
        let (holder, fence) = lease_of(&env, &rid).await;
        assert!(
            holder.as_deref().is_some_and(|h| h.starts_with("a:")),
            "kept: {holder:?}, fence {fence}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(env.fleet.delivered().is_empty());

    // The devices connect (no Hello: the scheduler's ticks find them).
    let mut redis = env.redis.clone();
    for id in &ids {
        connect_session(&mut redis, id).await;
    }
    let done = drive(&env, &sched, &rid, ended).await;
    assert_eq!(
        done.state(),
        pb::RolloutState::Completed,
        "{}",
        done.message
    );
    assert_eq!(count(&done, D::Applied), 4);
    env.fleet.assert_at_most_once();
    assert_eq!(env.fleet.delivered().len(), 4);
}

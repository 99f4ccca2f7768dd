//! Bad rollout requests: each a clear gRPC error, and nothing stored.
mod common;

use common::*;
use redis::AsyncCommands;
use tonic::Code;
use trellis_proto::v1 as pb;

async fn refused(env: &Env, req: pb::CreateRolloutRequest, code: Code, needle: &str) {
    let sched = env.scheduler("a");
    let e = sched.create(req).await.expect_err("must be refused");
    let status = tonic::Status::from(e);
    assert_eq!(status.code(), code, "{}", status.message());
    assert!(
        status.message().contains(needle),
        "{:?} does not say {needle:?}",
        status.message()
    );
    let mut redis = env.redis.clone();
    let keys: Vec<String> = redis.keys("trellis:rollout*").await.unwrap();
    assert!(keys.is_empty(), "partial record left: {keys:?}");
    let ota: Vec<String> = redis.keys("trellis:ota:*").await.unwrap();
    assert!(ota.is_empty(), "partial record left: {ota:?}");
}

#[tokio::test]
async fn bad_inputs_are_refused_and_leave_nothing() {
    let env = env().await;
    let ids = env.devices(PRODUCT, 10, true).await;
    let ok = || request(vec![stage_count(2), stage_pct(100)]);

    let mut r = ok();
    r.release_id = "7-99".into();
    refused(&env, r, Code::NotFound, "7-99").await;

    refused(
        &env,
        request(vec![]),
        Code::InvalidArgument,
        "stages is empty",
    )
    .await;
    refused(
        &env,
        request(vec![stage_pct(50), stage_pct(30), stage_pct(100)]),
        Code::InvalidArgument,
        "must increase",
    )
    .await;
    refused(
        &env,
        request(vec![stage_pct(120)]),
        Code::InvalidArgument,
        "at most 100",
    )
    .await;
    refused(
        &env,
        request(vec![stage_count(11)]),
        Code::InvalidArgument,
        "target has 10",
    )
    .await;
    refused(
        &env,
        request(vec![stage_count(2), stage_pct(50)]),
        Code::InvalidArgument,
        "cover 5 of the target's 10",
    )
    .await;
    let mut s = stage_pct(100);
    s.min_success_ratio = 1.5;
    refused(
        &env,
        request(vec![s]),
        Code::InvalidArgument,
        "between 0 and 1",
    )
    .await;
    let mut r = ok();
    r.max_failure_ratio = -0.1;
    refused(&env, r, Code::InvalidArgument, "max_failure_ratio").await;
    let mut both = stage_pct(100);
    both.device_count = 3;
    refused(&env, request(vec![both]), Code::InvalidArgument, "both").await;

    // An empty target: a product without devices.
    let mut r = ok();
    r.target = Some(pb::RolloutTarget {
        product_id: 0,
        ..Default::default()
    });
    env.releases.insert(trellis_ota::ReleaseInfo {
        release_id: "9-1".into(),
        product_id: 9,
        version: 1,
        image_sha256: NEW_SHA.into(),
    });
    r.release_id = "9-1".into();
    refused(&env, r, Code::InvalidArgument, "target is empty").await;

    // Product mismatch, unknown and malformed devices.
    let mut r = ok();
    r.target.as_mut().unwrap().product_id = 3;
    refused(&env, r, Code::InvalidArgument, "for product 7").await;
    let mut r = request(vec![stage_pct(100)]);
    r.target.as_mut().unwrap().device_ids = vec![ids[0].clone(), "00000000ffffffffffffffff".into()];
    refused(&env, r, Code::InvalidArgument, "not registered").await;
    let mut r = request(vec![stage_pct(100)]);
    r.target.as_mut().unwrap().device_ids = vec!["xyz".into()];
    refused(&env, r, Code::InvalidArgument, "24 hex").await;

    // Bad windows.
    for (w, needle) in [
        (
            pb::MaintenanceWindow {
                days: vec![7],
                start_hour: 2,
                end_hour: 5,
            },
            "days",
        ),
        (
            pb::MaintenanceWindow {
                days: vec![],
                start_hour: 24,
                end_hour: 5,
            },
            "start_hour",
        ),
        (
            pb::MaintenanceWindow {
                days: vec![],
                start_hour: 2,
                end_hour: 25,
            },
            "end_hour",
        ),
    ] {
        let mut r = ok();
        r.window = Some(w);
        refused(&env, r, Code::InvalidArgument, needle).await;
    }
    let mut r = ok();
    r.approval_url = "ftp://x".into();
    refused(&env, r, Code::InvalidArgument, "approval_url").await;

    // A device already in a running rollout.
    let sched = env.scheduler("a");
    let mut r = request(vec![stage_pct(100)]);
    r.target.as_mut().unwrap().device_ids = vec![ids[0].clone()];
    let first = sched.create(r.clone()).await.unwrap();
    let e = tonic::Status::from(sched.create(r).await.unwrap_err());
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains(&first.rollout_id), "{}", e.message());
    assert_eq!(sched.list().await.unwrap().len(), 1);
}

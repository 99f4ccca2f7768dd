//! The gRPC surface over loopback: create, get, list, watch until the end,
//! DeviceHello from a "gateway".
mod common;

use common::*;
use std::sync::Arc;
use trellis_proto::v1 as pb;
use trellis_proto::v1::ota_client::OtaClient;

#[tokio::test]
async fn create_get_watch_over_grpc() {
    let env = env().await;
    env.devices(PRODUCT, 6, true).await;
    let mut config = trellis_core::Config::default();
    config.auth.mode = trellis_core::config::AuthMode::Off;
    config.tls.mode = trellis_core::config::TlsMode::Off;
    config.redis.url = Some(env.redis_server.url());
    config.ota.tick_ms = 20;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (trigger, shutdown) = trellis_core::Shutdown::new();
    let parts = trellis_ota::Parts {
        clock: Arc::new(env.clock.clone()),
        deliverer: Arc::new(env.fleet.clone()),
        approver: Arc::new(NoApprover),
        releases: Arc::new(env.releases.clone()),
    };
    let server = tokio::spawn(trellis_ota::serve_with_parts(
        config, listener, parts, shutdown,
    ));
    let mut client = loop {
        match OtaClient::connect(format!("http://{addr}")).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    let created = client
        .create_rollout(request(vec![stage_count(2), stage_pct(100)]))
        .await
        .unwrap()
        .into_inner();
    let rid = created.rollout_id.clone();
    assert_eq!(created.state(), pb::RolloutState::Running);
    let got = client
        .get_rollout(pb::GetRolloutRequest {
            rollout_id: rid.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.devices.len(), 6);
    assert_eq!(got.spec.unwrap().max_concurrent, 5);

    // A "gateway" reconnects devices that took the image, over gRPC.
    let fleet = env.fleet.clone();
    let mut hello_client = client.clone();
    let redis = env.redis.clone();
    let gateway = tokio::spawn(async move {
        let mut redis = redis;
        loop {
            for (device, sha) in fleet.take_reconnects() {
                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
                connect_session(&mut redis, &device).await;
                hello_client
                    .device_hello(pb::DeviceHelloRequest {
                        device_id: device,
                        product_id: PRODUCT,
                        firmware_version: 2,
                        firmware_sha256: sha,
                        gateway_id: "gw".into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    });

    let mut watch = client
        .watch_rollout(pb::GetRolloutRequest {
            rollout_id: rid.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = 0;
    let mut last = None;
    let done = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while let Some(s) = watch.message().await.unwrap() {
            seen += 1;
            last = Some(s);
        }
    })
    .await;
    assert!(done.is_ok(), "watch did not end: {last:#?}");
    let last = last.unwrap();
    assert!(seen >= 2);
    assert_eq!(
        last.state(),
        pb::RolloutState::Completed,
        "{}",
        last.message
    );
    assert_eq!(count(&last, pb::DeviceUpdateState::Applied), 6);

    let list = client
        .list_rollouts(pb::ListRolloutsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.rollouts.len(), 1);
    let missing = client
        .get_rollout(pb::GetRolloutRequest {
            rollout_id: "ro-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    gateway.abort();
    trigger.trigger();
    server.await.unwrap().unwrap();
    env.fleet.assert_at_most_once();
}

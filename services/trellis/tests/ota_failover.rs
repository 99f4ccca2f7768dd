//! A gateway process SIGKILLed in the middle of a firmware transfer: the
//! device reconnects to another gateway and the rollout still updates it,
//! exactly once.
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use trellis_proto::v1::*;
use trellis_tests::Cluster;
use trellis_tests::ota::*;

const PRODUCT: u32 = 7;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(trellis_core::local_redis::free_port()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_killed_mid_transfer_the_update_completes_elsewhere() -> anyhow::Result<()> {
    let (cluster, stack) = Cluster::start_with_ota(1, |_| {}).await?;
    let keys = ReleaseKeys::provision(&cluster, &stack, &[PRODUCT]).await?;

    // A second gateway as its own process, so it can die for real.
    let devices_port = free_port()?;
    let grpc_port = free_port()?;
    let gateway = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .arg("gateway")
        .env("TRELLIS_AUTH__MODE", "off")
        .env("TRELLIS_TLS__MODE", "off")
        .env("TRELLIS_REDIS__URL", cluster.redis.url())
        .env(
            "TRELLIS_GATEWAY__KEYVAULT_URL",
            format!("http://{}", cluster.keyvault),
        )
        .env("TRELLIS_GATEWAY__OTA_URL", format!("http://{}", stack.ota))
        .env("TRELLIS_GATEWAY__ID", "gw-doomed")
        .env(
            "TRELLIS_GATEWAY__DEVICE_LISTEN",
            format!("127.0.0.1:{devices_port}"),
        )
        .env(
            "TRELLIS_GATEWAY__GRPC_LISTEN",
            format!("127.0.0.1:{grpc_port}"),
        )
        .env("TRELLIS_TELEMETRY__ADMIN_LISTEN", "")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut gateway = Killed(gateway);
    let doomed: std::net::SocketAddr = format!("127.0.0.1:{devices_port}").parse()?;
    trellis_tests::eventually(Duration::from_secs(30), "gateway process up", || async {
        tokio::net::TcpStream::connect(doomed)
            .await
            .ok()
            .map(|_| ())
    })
    .await?;

    // The device reaches the doomed gateway through a slow link (so the
    // kill lands mid-transfer), and knows the surviving one as a fallback.
    let slow = Proxy::start(doomed, ProxyMode::Throttle(96 * 1024)).await?;
    let config = device_config(PRODUCT, 1, &keys.policy);
    let survivor = cluster.gateways[0].devices.to_string();
    let fleet = Fleet::start(
        &cluster,
        1,
        PRODUCT,
        config,
        vec![slow.addr.to_string(), survivor],
    )
    .await?;
    let ids = fleet.ids();
    all_online(&cluster, &ids, Duration::from_secs(30)).await?;
    let on = device_states(&cluster).await?;
    assert_eq!(
        on.iter()
            .find(|s| s.device_id == ids[0])
            .map(|s| s.gateway_id.as_str()),
        Some("gw-doomed")
    );

    let image = test_image(PRODUCT, 2, 384 * 1024);
    let (release, sha) = make_release(&stack, &keys, PRODUCT, 2, &image, Signers::Both).await?;
    let mut ota = stack.ota_client().await?;
    let created = ota
        .create_rollout(CreateRolloutRequest {
            release_id: release,
            target: Some(RolloutTarget {
                product_id: PRODUCT,
                device_ids: ids.clone(),
                percent: 0,
                tag: String::new(),
            }),
            stages: vec![Stage {
                name: "all".into(),
                percent: 100,
                min_success_ratio: 1.0,
                ..Default::default()
            }],
            max_failure_ratio: 0.5,
            max_attempts: 3,
            apply_timeout_secs: 60,
            ..Default::default()
        })
        .await?
        .into_inner();

    // Kill the gateway once a good part of the image is on its way.
    let bytes = slow.bytes_to_device.clone();
    let before = bytes.load(std::sync::atomic::Ordering::Relaxed);
    trellis_tests::eventually(Duration::from_secs(30), "transfer under way", || {
        let bytes = bytes.clone();
        async move {
            (bytes.load(std::sync::atomic::Ordering::Relaxed) > before + 64 * 1024).then_some(())
        }
    })
    .await?;
    gateway.0.kill()?;
    let _ = gateway.0.wait();
    let sent = bytes.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert!(
        sent < image.len() as u64,
        "the kill came after the whole image ({sent} bytes) went out"
    );

    let end = rollout_until(
        &stack,
        &created.rollout_id,
        &[RolloutState::Completed, RolloutState::Aborted],
        Duration::from_secs(120),
    )
    .await?;
    assert_eq!(end.state(), RolloutState::Completed, "{}", end.message);
    let states = device_states(&cluster).await?;
    let st = states
        .iter()
        .find(|s| s.device_id == ids[0])
        .expect("device online");
    assert_eq!(st.gateway_id, "gw-1", "the device moved to the survivor");
    assert_eq!(st.firmware_sha256, sha);
    assert_eq!(fleet.applied_count(&ids[0]), 1, "applied exactly once");
    fleet.stop().await;
    stack.stop().await;
    cluster.stop().await;
    Ok(())
}

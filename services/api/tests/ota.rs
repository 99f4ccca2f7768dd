//! Flashing through the API (`PUT /v1/devices/:id`, multipart `file`, as
//! `particle flash --cloud` sends it): only the image of a release that
//! meets the product's signing policy starts an update, as a one-device
//! rollout that the device applies; anything else is refused with how to
//! sign it, and nothing reaches the device.
//!
//! Auth is off here (the OTA fixtures of `trellis-tests` run without
//! tokens); the token checks of the API are in api.rs.
use serde_json::Value;
use std::time::Duration;
use tokio::net::TcpListener;
use trellis_core::Shutdown;
use trellis_proto::v1::RolloutState;
use trellis_tests::Cluster;
use trellis_tests::ota::{
    Fleet, ReleaseKeys, Signers, all_online, device_config, make_release, rollout_until, test_image,
};

const PRODUCT: u32 = 7;

async fn flash(
    http: &reqwest::Client,
    api: &str,
    device: &str,
    image: Vec<u8>,
) -> anyhow::Result<(u16, Value)> {
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(image)
                .file_name("/home/someone/firmware.bin")
                .mime_str("application/octet-stream")?,
        )
        .text("latest", "true");
    let r = http
        .put(format!("{api}/v1/devices/{device}"))
        .bearer_auth("any-token-auth-is-off")
        .multipart(form)
        .send()
        .await?;
    let status = r.status().as_u16();
    let text = r.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status} {text:?}: {e}")),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flash_takes_only_signed_releases() -> anyhow::Result<()> {
    let (cluster, stack) = Cluster::start_with_ota(1, |_| {}).await?;
    let keys = ReleaseKeys::provision(&cluster, &stack, &[PRODUCT]).await?;
    let fleet = Fleet::start(
        &cluster,
        1,
        PRODUCT,
        device_config(PRODUCT, 1, &keys.policy),
        vec![cluster.gateways[0].devices.to_string()],
    )
    .await?;
    let ids = fleet.ids();
    all_online(&cluster, &ids, Duration::from_secs(60)).await?;
    let device = ids[0].clone();

    let mut config = cluster.config.clone();
    config.api.gateway_url = format!("http://{}", cluster.gateways[0].grpc);
    config.api.keyvault_url = format!("http://{}", cluster.keyvault);
    config.api.signer_url = format!("http://{}", stack.signer);
    config.api.ota_url = format!("http://{}", stack.ota);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let api = format!("http://{}", listener.local_addr()?);
    let (trigger, shutdown) = Shutdown::new();
    tokio::spawn(trellis_api::serve_with_listener(config, listener, shutdown));
    // reqwest (rustls-no-provider) needs the process's provider.
    trellis_core::outbound::install_tls_provider();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;

    // An image no release has: refused, with how to sign one.
    let (status, body) = flash(&http, &api, &device, test_image(PRODUCT, 9, 4096)).await?;
    assert_eq!(status, 400, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(message.contains("trellis release sign"), "{message}");
    assert!(
        !message.to_ascii_lowercase().contains("access token"),
        "{message}"
    );

    // A release signed by the cloud alone does not meet the policy
    // (customer and cloud must both sign): refused too.
    let cloud_only = test_image(PRODUCT, 3, 8 * 1024);
    let (release, _) =
        make_release(&stack, &keys, PRODUCT, 3, &cloud_only, Signers::CloudOnly).await?;
    let (status, body) = flash(&http, &api, &device, cloud_only).await?;
    assert_eq!(status, 400, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(message.contains(&release), "{message}");
    assert!(message.contains("customer"), "{message}");

    // The image of a fully signed release: "Update started", and the
    // device applies that release.
    let image = test_image(PRODUCT, 2, 16 * 1024);
    let (release, _) = make_release(&stack, &keys, PRODUCT, 2, &image, Signers::Both).await?;
    let (status, body) = flash(&http, &api, &device, image).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "Update started");
    assert_eq!(body["id"], device.as_str());
    assert_eq!(body["release_id"], release.as_str());
    let rollout = body["rollout_id"].as_str().unwrap_or_default().to_string();
    let done = rollout_until(
        &stack,
        &rollout,
        &[RolloutState::Completed, RolloutState::Aborted],
        Duration::from_secs(90),
    )
    .await?;
    assert_eq!(done.state(), RolloutState::Completed, "{done:?}");
    assert_eq!(done.devices.len(), 1);
    assert_eq!(fleet.applied_count(&device), 1);
    // The refused images never reached it: one update applied, no more.

    // A device that is not there: Particle's 403.
    let (status, body) = flash(&http, &api, "0123456789abcdef01234567", vec![1, 2, 3]).await?;
    assert_eq!(status, 403, "{body}");

    drop(trigger);
    fleet.stop().await;
    stack.stop().await;
    cluster.stop().await;
    Ok(())
}

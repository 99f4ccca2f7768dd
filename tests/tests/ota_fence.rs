//! The ownership fence during a firmware transfer, over a real gateway
//! session and a real Redis: while the gateway owns the device, each
//! ChunkReceived refills the window; once another session holds the device
//! (a newer epoch), the next refill is refused before any chunk is taken
//! off the queue or written, the refusal is audited with the release it
//! was for, and the session ends.
use anyhow::Context;
use std::time::Duration;
use trellis_proto::v1::*;
use trellis_tests::Cluster;
use trellis_tests::RawDevice;
use trellis_tests::ota::*;
use trellis_wire::coap::CoapMessage;
use trellis_wire::message::{self, Incoming, Request};

/// The raw test device is product 1 (`Cluster::device_in_session`).
const PRODUCT: u32 = 1;

/// Reads until a message that `wanted` accepts; other messages (Describe,
/// the server's Hello) are skipped. Errors when none comes in time.
async fn recv_until(
    dev: &mut RawDevice,
    what: &str,
    wanted: impl Fn(&Request) -> bool,
) -> anyhow::Result<CoapMessage> {
    loop {
        let m = dev
            .recv(Duration::from_secs(10))
            .await?
            .with_context(|| format!("the connection closed before {what}"))?;
        if let Ok(Incoming::Request(r)) = message::classify(&m)
            && wanted(&r)
        {
            return Ok(m);
        }
    }
}

/// Every chunk that arrives within `quiet` of the previous message, until
/// the connection is quiet or closed; `Ok((chunks, closed))`.
async fn chunks_until_quiet(
    dev: &mut RawDevice,
    quiet: Duration,
) -> anyhow::Result<(Vec<CoapMessage>, bool)> {
    let mut chunks = Vec::new();
    loop {
        match dev.recv(quiet).await {
            Ok(Some(m)) => {
                if matches!(
                    message::classify(&m),
                    Ok(Incoming::Request(Request::Chunk(_)))
                ) {
                    chunks.push(m);
                }
            }
            Ok(None) => return Ok((chunks, true)),
            // Nothing within `quiet`.
            Err(_) => return Ok((chunks, false)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transfer_stops_at_the_fence_once_another_session_owns_the_device() -> anyhow::Result<()>
{
    let (cluster, stack) = Cluster::start_with_ota(1, |c| {
        c.gateway.ota_window = 4;
        c.gateway.ota_chunk_size = 512;
    })
    .await?;
    let keys = ReleaseKeys::provision(&cluster, &stack, &[PRODUCT]).await?;
    let image = test_image(PRODUCT, 2, 64 * 512);
    let (release, _sha) = make_release(&stack, &keys, PRODUCT, 2, &image, Signers::Both).await?;
    let (mut dev, device_id) = cluster.device_in_session().await?;

    let mut gw = cluster.gateway_client(0).await?;
    let request = DeliverUpdateRequest {
        device_id: device_id.clone(),
        release_id: release.clone(),
        rollout_id: String::new(),
        timeout_ms: 30_000,
    };
    let delivery = tokio::spawn(async move { gw.deliver_update(request).await });

    let begin = recv_until(&mut dev, "UpdateBegin", |r| {
        matches!(r, Request::UpdateBegin(_))
    })
    .await?;
    let id = dev.take_id();
    dev.send(&message::update_ready(id, &begin.token)).await?;

    // The first window: 4 chunks, then nothing until one is answered.
    let (window, closed) = chunks_until_quiet(&mut dev, Duration::from_millis(700)).await?;
    assert!(!closed, "the session closed during the first window");
    assert_eq!(window.len(), 4, "the first window");

    // Owned: answering one chunk refills the window with exactly one more.
    let id = dev.take_id();
    dev.send(&message::chunk_received(id, &window[0].token, true))
        .await?;
    let (refill, closed) = chunks_until_quiet(&mut dev, Duration::from_millis(700)).await?;
    assert!(!closed, "the session closed while it owned the device");
    assert_eq!(refill.len(), 1, "one answer, one more chunk");

    // Another session takes the device over (a newer epoch, as a claim
    // through another gateway writes it).
    let mut redis = cluster.redis().await?;
    let session_key = trellis_core::redis_conn::keys::session(&device_id);
    let epoch: u64 = redis::cmd("HINCRBY")
        .arg(&session_key)
        .arg("epoch")
        .arg(1)
        .query_async(&mut redis)
        .await?;
    redis::cmd("HSET")
        .arg(&session_key)
        .arg("gateway")
        .arg("gw-elsewhere")
        .query_async::<()>(&mut redis)
        .await?;

    // The next answer would refill the window: the fence refuses first.
    let id = dev.take_id();
    dev.send(&message::chunk_received(id, &window[1].token, true))
        .await?;
    let (late, closed) = chunks_until_quiet(&mut dev, Duration::from_secs(5)).await?;
    assert!(
        late.is_empty(),
        "{} chunk(s) written after another session took the device",
        late.len()
    );
    assert!(closed, "the stale session did not end");

    // The caller hears that the transfer did not complete.
    let answer = tokio::time::timeout(Duration::from_secs(10), delivery)
        .await
        .context("DeliverUpdate did not answer")??;
    if let Ok(response) = &answer {
        let response = response.get_ref();
        assert_ne!(
            response.outcome(),
            DeliveryOutcome::Sent,
            "a fenced transfer was reported delivered: {response:?}"
        );
    }

    // And the refusal is audited with the release it was for.
    let audit = cluster.audit(Some(&device_id)).await?;
    let refusal = audit
        .iter()
        .find(|r| r.action == "stale_delivery")
        .context("no stale_delivery audit record")?;
    let detail = |k: &str| refusal.detail(k).unwrap_or_default();
    assert_eq!(detail("what"), format!("firmware transfer of {release}"));
    assert_eq!(detail("owner_gateway"), "gw-elsewhere");
    assert_eq!(detail("owner_epoch"), epoch.to_string());

    stack.stop().await;
    cluster.stop().await;
    Ok(())
}

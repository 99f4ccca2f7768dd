//! The gateway's ownership refresh (refresher.rs), one pass for all its
//! sessions, against a real redis-server: a session whose record another
//! gateway took without the close reaching us is closed within one
//! keepalive; one whose record vanished is closed too; the others stay.
use std::time::{Duration, Instant};
use trellis_core::redis_conn::keys;
use trellis_proto::v1::GetDeviceStateRequest;
use trellis_tests::{Cluster, RawDevice};
use trellis_wire::message;

const KEEPALIVE_SECS: u64 = 2;

/// Pings every 500 ms (so silence never ends the session) until it closes
/// or `within` passes; returns when it closed.
async fn closed_while_pinging(dev: &mut RawDevice, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        let id = dev.take_id();
        if dev.send(&message::ping(id)).await.is_err() {
            return Some(started.elapsed());
        }
        if dev.closed_within(Duration::from_millis(500)).await {
            return Some(started.elapsed());
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_and_lost_records_close_their_sessions_and_only_those() -> anyhow::Result<()> {
    let cluster = Cluster::start_configured(1, |c| {
        c.gateway.keepalive_secs = KEEPALIVE_SECS;
    })
    .await?;
    let (mut taken, taken_id) = cluster.device_in_session().await?;
    let (mut lost, lost_id) = cluster.device_in_session().await?;
    let (mut kept, kept_id) = cluster.device_in_session().await?;
    let mut r = cluster.redis().await?;

    // Another gateway claims `taken` (a newer epoch) and its close never
    // comes; `lost`'s record disappears (a Redis that lost its data).
    trellis_gateway::ownership::claim(&mut r, &taken_id, "gw-elsewhere", "127.0.0.9:1", 60).await?;
    let _: () = redis::cmd("DEL")
        .arg(keys::session(&lost_id))
        .query_async(&mut r)
        .await?;

    let keepalive = Duration::from_secs(KEEPALIVE_SECS);
    // Two passes at most (half a keepalive apart) for a superseded one.
    let t = closed_while_pinging(&mut taken, keepalive * 2).await;
    assert!(t.is_some(), "the superseded session was not closed");
    let l = closed_while_pinging(&mut lost, keepalive).await;
    assert!(
        l.is_some(),
        "the session whose record was lost was not closed"
    );
    assert!(
        closed_while_pinging(&mut kept, keepalive * 2)
            .await
            .is_none(),
        "a session that still owns its record must stay"
    );
    // The kept session's record was renewed and its last_seen touched.
    let ttl: i64 = redis::cmd("TTL")
        .arg(keys::session(&kept_id))
        .query_async(&mut r)
        .await?;
    assert!(ttl > 0, "the kept session's record has no TTL: {ttl}");
    let state = cluster
        .gateway_client(0)
        .await?
        .get_device_state(GetDeviceStateRequest {
            device_id: kept_id.clone(),
        })
        .await?
        .into_inner();
    assert!(state.online);
    cluster.stop().await;
    Ok(())
}

//! A revoked or deleted device loses its live session within a second, on
//! whichever gateway holds it, in every region: keyvault appends each
//! revocation to the durable stream `trellis:revocations` (in the same
//! script that marks the record), and every gateway reads the stream twice
//! a second and closes the sessions it holds for those devices.
//!
//! A poll, not a blocking read: the durable store may be a Sentinel-named
//! primary that moves, which the shared durable connection follows and a
//! dedicated blocking connection would not. One `XREAD` per half second per
//! gateway is nothing next to a session's traffic.
use crate::local::LocalSessions;
use std::sync::Arc;
use std::time::Duration;
use trellis_core::redis_conn::{Redis, keys};
use trellis_core::shutdown::Shutdown;

pub const POLL: Duration = Duration::from_millis(500);

/// Entries after `last_id` (at most 1000), as (id, device id).
async fn read_after(redis: &mut Redis, last_id: &str) -> redis::RedisResult<Vec<(String, String)>> {
    let reply: redis::streams::StreamReadReply = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(1000)
        .arg("STREAMS")
        .arg(keys::REVOCATIONS)
        .arg(last_id)
        .query_async(redis)
        .await?;
    Ok(reply
        .keys
        .into_iter()
        .flat_map(|k| k.ids)
        .map(|entry| {
            let device: String = entry.get("device").unwrap_or_default();
            (entry.id, device)
        })
        .collect())
}

pub async fn run(mut durable: Redis, local: Arc<LocalSessions>, mut shutdown: Shutdown) {
    // Only revocations from now on: older ones were refused at handshake.
    let mut last_id = format!("{}-0", trellis_core::time::now_ms());
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tick.tick() => {}
        }
        match read_after(&mut durable, &last_id).await {
            Ok(entries) => {
                if failing {
                    tracing::info!("revocation stream readable again");
                    failing = false;
                }
                for (id, device) in entries {
                    if local.close_device(&device, "revoked") {
                        tracing::info!(device_id = %device, "session closed: the device was revoked");
                    }
                    last_id = id;
                }
            }
            Err(error) => {
                // Logged once per outage; a revoked device is still refused
                // at its next handshake.
                if !failing {
                    tracing::warn!(%error, "cannot read the revocation stream; retrying");
                    failing = true;
                }
            }
        }
    }
}

//! Ownership refresh for every session of this gateway in one pass, every
//! half keepalive, instead of a timer and three Redis round trips per
//! session. An idle session then costs the gateway only its device's pings:
//! at 100k sessions a per-session refresh is ~13,000 script calls, touches
//! and home reads a second, each waking a task; here it is a few pipelined
//! round trips per pass.
//!
//! What each session's refresh decided still holds, per session:
//! - the regional record still names our epoch: renewed (and `last_seen`
//!   touched), then the cross-region home check (home.rs);
//! - a newer epoch holds it: the session closes (superseded) at the second
//!   pass that sees it so. The new owner's gateway closes it at once
//!   through this gateway's inbox, in order after any command already
//!   queued for it, so a stale command meets the delivery fence (and its
//!   `stale_delivery` audit record) first; this pass is the safety net for
//!   a close that never arrived, within one keepalive;
//! - no record (expired while we were paused, or Redis lost it): the session
//!   closes, and the device reconnects for a clean claim;
//! - Redis away: every session is kept (devices should not pay for our
//!   outage); the next pass decides.
use crate::{Gateway, device_state, ownership};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;
use trellis_core::shutdown::Shutdown;

/// Sessions per pipelined round trip: big enough to amortise the round
/// trip (a few dozen round trips per pass at 20k sessions), small enough
/// not to hold Redis for long, and small enough that the pass's transient
/// buffers stay small: the redis connection keeps its write buffer at the
/// largest pipeline it has sent, and 1,000 sessions' commands (~1.2 MB
/// encoded, queued and answered) were a quarter of 1,000 idle sessions'
/// heap (BENCHMARKS.md, idle sessions).
pub(crate) const BATCH: usize = 256;

pub async fn run(gw: Arc<Gateway>, mut shutdown: Shutdown) {
    let period = Duration::from_secs(gw.config.keepalive_secs.max(1)) / 2;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; sessions were claimed just now.
    tick.tick().await;
    let mut superseded = HashSet::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let span = tracing::debug_span!("gateway.refresh", gateway = %gw.id, sessions = tracing::field::Empty);
                pass(&gw, &mut superseded).instrument(span).await;
                // The pass's buffers, freed among the sessions' own.
                trellis_core::heap::release_free();
            }
            _ = shutdown.wait() => return,
        }
    }
}

/// One refresh of every session. `superseded`: the sessions the previous
/// pass found superseded (and left open); replaced by this pass's.
async fn pass(gw: &Arc<Gateway>, superseded: &mut HashSet<(String, u64)>) {
    let seen_before = std::mem::take(superseded);
    let sessions = gw.local.snapshot();
    tracing::Span::current().record("sessions", sessions.len());
    if sessions.is_empty() {
        return;
    }
    let ttl = ownership::session_ttl_secs(gw.config.keepalive_secs);
    let mut redis = gw.redis.clone();
    // Which sessions this pass keeps, by index: no copy of their ids.
    let mut keep = vec![false; sessions.len()];
    for (chunk_index, chunk) in sessions.chunks(BATCH).enumerate() {
        // One round trip: each session's refresh (answered, in order) and
        // its `last_seen` touch (not answered).
        let now = trellis_core::time::now_ms();
        let mut pipe = redis::pipe();
        ownership::load_refresh(&mut pipe);
        for (device, epoch, _) in chunk {
            ownership::refresh_in(&mut pipe, device, *epoch, ttl);
            device_state::touch_in(&mut pipe, device, now);
        }
        let currents: Vec<u64> = match pipe.query_async(&mut redis).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, sessions = chunk.len(), "ownership refresh failed; keeping the sessions");
                continue;
            }
        };
        for (i, (session, current)) in chunk.iter().zip(currents).enumerate() {
            let (device, epoch, _) = session;
            if current == *epoch {
                keep[chunk_index * BATCH + i] = true;
            } else if current > *epoch {
                let key = (device.clone(), *epoch);
                if seen_before.contains(&key) {
                    gw.local.close(
                        device,
                        *epoch,
                        &format!("superseded: epoch {current} is newer than ours ({epoch})"),
                    );
                } else {
                    superseded.insert(key);
                }
            } else {
                gw.local.close(device, *epoch, "ownership record lost");
            }
        }
    }
    let kept: Vec<(String, u64, SocketAddr)> = sessions
        .into_iter()
        .zip(keep)
        .filter_map(|(session, kept)| kept.then_some(session))
        .collect();
    // Off the pass: a durable store failing over must not delay the next
    // regional refresh.
    let gw = Arc::clone(gw);
    tokio::spawn(
        async move { crate::home::check_many(&gw, &kept).await }
            .instrument(tracing::debug_span!("gateway.home_check")),
    );
}

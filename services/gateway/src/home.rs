//! The device's home across regions. Session ownership (ownership.rs) lives
//! in each region's own Redis, so two regions cannot see each other's
//! claims there; the home record, in the durable store every region
//! shares, names the region and gateway of the newest claim anywhere. A
//! session whose region lost the device to a newer claim elsewhere sees it
//! at its next ownership refresh (every half keepalive) and closes itself,
//! so two regions never both talk to one device for longer than that.
//!
//! Epochs compare across regions because a claim's epoch is at least the
//! wall-clock milliseconds (ownership.rs), so the newer claim has the
//! larger epoch as long as the regions' clocks agree to within the time
//! between the two claims.
use crate::Gateway;
use redis::Script;
use std::sync::LazyLock;
use std::time::Duration;
use trellis_core::audit::{self, AuditRecord};
use trellis_core::redis_conn::keys;
use trellis_core::time::now_ms;

/// Only a newer epoch replaces the record: two claims' writes may arrive
/// out of order (they are spawned, and one may wait out a failover).
const RECORD: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if cur ~= nil and cur >= tonumber(ARGV[3]) then
  return 0
end
redis.call('HSET', KEYS[1], 'region', ARGV[1], 'gateway', ARGV[2], 'epoch', ARGV[3], 'since', ARGV[4], 'peer', ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"#;
static RECORD_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RECORD));

/// The record outlives any session by far; it expires only so devices
/// that are gone for good leave nothing behind.
const HOME_TTL_SECS: u64 = 30 * 24 * 3600;

/// How long a durable write on the session path may take before we go on
/// without it. During a Sentinel failover a write waits for the new
/// primary (`redis.failover_wait_ms`); a device must not wait that long
/// for its Hello answer while its region is failing over.
pub const DURABLE_WRITE_BUDGET: Duration = Duration::from_secs(2);

/// The newest claim on a device, in any region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    pub region: String,
    pub gateway: String,
    pub epoch: u64,
    /// The device's address as that claim's gateway saw it ("" in records
    /// written before it was kept).
    pub peer: String,
}

/// Records this claim as the device's home, off the session path: the
/// handshake never waits for (or fails on) the durable store, which may
/// be in the middle of a failover. A lost write only means a session in
/// another region is closed later (by its keepalive timeout) rather than
/// at its next refresh.
pub fn record_claim(gw: &Gateway, device_id: &str, epoch: u64, peer: &str) {
    let mut durable = gw.durable.clone();
    let (device, region, gateway) = (device_id.to_string(), gw.region.clone(), gw.id.clone());
    let peer = peer.to_string();
    tokio::spawn(async move {
        let result: redis::RedisResult<i64> = RECORD_SCRIPT
            .key(keys::home(&device))
            .arg(&region)
            .arg(&gateway)
            .arg(epoch)
            .arg(now_ms())
            .arg(HOME_TTL_SECS)
            .arg(&peer)
            .invoke_async(&mut durable)
            .await;
        if let Err(e) = result {
            tracing::warn!(%device, epoch, error = %e, "could not record the device's home region (durable store unavailable); going on without it");
        }
    });
}

/// The cross-region check for many live sessions at once (refresher.rs):
/// one pipelined read of their home records' epochs (a read, so this
/// region's replica answers it while the durable primary is away), then,
/// for the few whose home names a newer epoch, the whole record and what
/// `superseded_by` says: closed, audited, and flagged as a suspected clone
/// when the newer claim came from another address. Under the `quarantine`
/// policy a quarantined identity's session closes too. An unreadable store
/// keeps every session (as a failed refresh does).
///
/// Only the epoch first: this runs for every session every half keepalive,
/// and four fields per session were most of the gateway's idle CPU spent
/// on Redis replies (BENCHMARKS.md, idle sessions).
pub async fn check_many(gw: &Gateway, sessions: &[(String, u64, std::net::SocketAddr)]) {
    let quarantine = gw.config.clone_policy == trellis_core::config::ClonePolicy::Quarantine;
    for chunk in sessions.chunks(crate::refresher::BATCH) {
        let mut pipe = redis::pipe();
        for (device, _, _) in chunk {
            pipe.cmd("HGET").arg(keys::home(device)).arg("epoch");
            if quarantine {
                pipe.cmd("EXISTS").arg(keys::quarantine(device));
            }
        }
        let Some(values) = durable_read(gw, &pipe).await else {
            continue;
        };
        let per = if quarantine { 2 } else { 1 };
        let mut newer_home = Vec::new();
        for (session, answer) in chunk.iter().zip(values.chunks(per)) {
            let (device, epoch, _) = session;
            let home_epoch = redis::from_redis_value_ref::<Option<u64>>(&answer[0])
                .ok()
                .flatten();
            let quarantined = quarantine
                && answer
                    .get(1)
                    .and_then(|v| redis::from_redis_value_ref::<bool>(v).ok())
                    .unwrap_or(false);
            if home_epoch.is_some_and(|e| e > *epoch) {
                newer_home.push((session, quarantined));
            } else if quarantined {
                tracing::warn!(device = %device, "identity quarantined (suspected clone); closing");
                gw.local
                    .close(device, *epoch, "quarantined: suspected clone");
            }
        }
        if newer_home.is_empty() {
            continue;
        }
        let mut pipe = redis::pipe();
        for ((device, _, _), _) in &newer_home {
            pipe.cmd("HMGET")
                .arg(keys::home(device))
                .arg("region")
                .arg("gateway")
                .arg("epoch")
                .arg("peer");
        }
        let Some(values) = durable_read(gw, &pipe).await else {
            continue;
        };
        for (((device, epoch, peer), quarantined), answer) in newer_home.into_iter().zip(values) {
            type Fields = (
                Option<String>,
                Option<String>,
                Option<String>,
                Option<String>,
            );
            let home: Option<Fields> = redis::from_redis_value_ref(&answer).ok();
            let home = match home {
                Some((Some(region), Some(gateway), Some(e), peer)) => {
                    e.parse().ok().map(|epoch| Home {
                        region,
                        gateway,
                        epoch,
                        peer: peer.unwrap_or_default(),
                    })
                }
                _ => None,
            };
            if let Some(newer) = home
                .as_ref()
                .and_then(|h| superseded_by(h, &gw.region, *epoch))
            {
                let reason = format!(
                    "superseded by region {} (gateway {}, epoch {} > ours {epoch})",
                    newer.region, newer.gateway, newer.epoch
                );
                tracing::warn!(device = %device, %reason, "session held by another region; closing");
                audit_superseded(gw, device, *epoch, newer).await;
                // This session was live when the other region's claim came,
                // so a different address there is one identity in two
                // places at once: the cross-region half of clones.rs.
                let peer = peer.to_string();
                if !newer.peer.is_empty() && !crate::clones::same_host(&newer.peer, &peer) {
                    crate::clones::across_regions(gw, device, &peer, *epoch, newer).await;
                }
                gw.local.close(device, *epoch, &reason);
            } else if quarantined {
                tracing::warn!(device = %device, "identity quarantined (suspected clone); closing");
                gw.local
                    .close(device, *epoch, "quarantined: suspected clone");
            }
        }
    }
}

/// One pipelined read from the durable store within its write budget;
/// `None` (logged) when it times out or fails: the caller keeps every
/// session.
async fn durable_read(gw: &Gateway, pipe: &redis::Pipeline) -> Option<Vec<redis::Value>> {
    let mut durable = gw.durable.clone();
    match tokio::time::timeout(DURABLE_WRITE_BUDGET, pipe.query_async(&mut durable)).await {
        Ok(Ok(values)) => Some(values),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "home records unreadable");
            None
        }
        Err(_) => {
            tracing::debug!("home records: read timed out (durable store failing over)");
            None
        }
    }
}

/// Whether a session of this gateway at `epoch` has lost the device to a
/// newer claim in another region. Claims within our region are fenced by
/// the regional ownership record already.
pub fn superseded_by<'h>(home: &'h Home, region: &str, epoch: u64) -> Option<&'h Home> {
    (home.epoch > epoch && home.region != region).then_some(home)
}

/// Audits a session closed because another region holds the device now.
pub async fn audit_superseded(gw: &Gateway, device_id: &str, epoch: u64, home: &Home) {
    let record = AuditRecord::new(&gw.id, "session_superseded", device_id, "closed")
        .with("reason", format!("superseded by region {}", home.region))
        .with("old_region", gw.region.clone())
        .with("old_epoch", epoch.to_string())
        .with("new_region", home.region.clone())
        .with("new_gateway", home.gateway.clone())
        .with("new_epoch", home.epoch.to_string());
    let mut durable = gw.durable.clone();
    match tokio::time::timeout(DURABLE_WRITE_BUDGET, audit::append(&mut durable, &record)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(device = %device_id, error = %e, "audit write failed"),
        Err(_) => {
            tracing::warn!(device = %device_id, "audit write timed out (durable store failing over)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn home(region: &str, epoch: u64) -> Home {
        Home {
            region: region.into(),
            gateway: "gw".into(),
            epoch,
            peer: String::new(),
        }
    }

    #[test]
    fn only_a_newer_claim_in_another_region_supersedes() {
        assert!(superseded_by(&home("b", 10), "a", 5).is_some());
        assert!(superseded_by(&home("b", 5), "a", 5).is_none());
        assert!(superseded_by(&home("b", 4), "a", 5).is_none());
        // Same region: the regional ownership record decides.
        assert!(superseded_by(&home("a", 10), "a", 5).is_none());
    }
}

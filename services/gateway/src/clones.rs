//! Clone detection. A device identity is one RSA key; if two sessions hold
//! it at the same time from different addresses, the key has most likely
//! been copied onto a second device. The ownership claim that opens every
//! session already sees the session it supersedes, on whichever gateway it
//! is, so that is where the comparison happens: at the second handshake,
//! well within one keepalive interval.
//!
//! What counts: the previous owner's record is still live (it is refreshed
//! every half keepalive and expires after three) and its peer's IP differs
//! from the new one. A device that drops and comes back from the same IP
//! (a new source port) is a reconnect, audited as `duplicate_session` and
//! not flagged. A device that changes network while its old session is
//! still open looks like a clone for that one connect; the flag says
//! "suspected" for that reason, and `quarantine` suits fleets whose
//! addresses are stable.
//!
//! Every connect is also appended to a short per-device history (capped
//! list with a TTL) that `trellis device show` prints with the clone flags.
//!
//! History, flags, quarantine and audit live in the durable store every
//! region shares (`Gateway::durable`), so a clone that connects in another
//! region is still seen in the history, and keyvault (which reads the
//! quarantine from its durable store) refuses it everywhere. Ownership
//! stays regional (`Gateway::redis`).
use crate::Gateway;
use crate::ownership::{self, Claim, Owner};
use redis::Script;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::sync::LazyLock;
use trellis_core::audit::{self, AuditRecord};
use trellis_core::config::ClonePolicy;
use trellis_core::metrics::{kv, metrics};
use trellis_core::redis_conn::{Redis, keys};
use trellis_core::time::now_ms;
use trellis_proto::v1 as pb;

/// One session in the device's history (JSON in Redis).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionEntry {
    pub time_ms: i64,
    pub gateway: String,
    pub peer: String,
    pub epoch: u64,
}

/// One suspected clone (JSON in Redis).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CloneFlag {
    pub time_ms: i64,
    pub gateway: String,
    pub peer: String,
    pub other_gateway: String,
    pub other_peer: String,
    pub action: String,
}

/// Whether the session that just claimed ownership may go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Proceed,
    /// Closed at once; the reason is logged.
    Refuse(String),
}

/// Appends to the history, trims it, renews both lists' TTL, and says
/// whether the identity is quarantined right now (set by another gateway
/// after keyvault checked, but before our claim).
const RECORD: &str = r#"
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return redis.call('EXISTS', KEYS[3])
"#;
static RECORD_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RECORD));

const FLAG: &str = r#"
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"#;
static FLAG_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(FLAG));

/// The IP of a `host:port` peer string (IPv4-mapped IPv6 made IPv4).
fn peer_ip(peer: &str) -> Option<IpAddr> {
    peer.parse::<SocketAddr>()
        .ok()
        .map(|a| a.ip().to_canonical())
}

/// Two peers are the same host when their IPs are equal (ports differ on
/// every reconnect). Unparseable addresses compare as whole strings.
pub fn same_host(a: &str, b: &str) -> bool {
    match (peer_ip(a), peer_ip(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// Records the session and applies the clone policy against the session
/// the claim superseded. Redis trouble never refuses a device: it is logged
/// and the session goes on (as ownership refresh does).
#[tracing::instrument(name = "device.clone_check", skip_all, fields(device = %device_id, epoch = claim.epoch))]
pub async fn after_claim(
    gw: &Gateway,
    device_id: &str,
    peer: SocketAddr,
    claim: &Claim,
) -> Verdict {
    let mut redis = gw.durable.clone();
    let peer_s = peer.to_string();
    // Bounded: during a durable failover the write would wait for the new
    // primary, and the device for its Hello answer (home.rs).
    let recorded = tokio::time::timeout(
        crate::home::DURABLE_WRITE_BUDGET,
        record(gw, &mut redis, device_id, &peer_s, claim.epoch),
    )
    .await;
    let quarantined = match recorded {
        Ok(Ok(q)) => q,
        Ok(Err(e)) => {
            tracing::warn!(device = %device_id, error = %e, "could not record the session history");
            false
        }
        Err(_) => {
            tracing::warn!(device = %device_id, "recording the session history timed out (durable store failing over)");
            false
        }
    };
    let Some(prev) = &claim.previous else {
        if quarantined {
            return refuse_quarantined(gw, &mut redis, device_id, &peer_s, claim).await;
        }
        return Verdict::Proceed;
    };
    if same_host(&prev.peer_addr, &peer_s) {
        // A reconnect (new source port) while the old session's record
        // was still live: the newer session wins, nothing is flagged.
        let record = AuditRecord::new(&gw.id, "duplicate_session", device_id, "previous_closed")
            .with("old_peer", prev.peer_addr.clone())
            .with("old_gateway", prev.gateway_id.clone())
            .with("old_epoch", prev.epoch.to_string())
            .with("new_peer", peer_s.clone())
            .with("new_gateway", gw.id.clone())
            .with("new_epoch", claim.epoch.to_string());
        write_audit(&mut redis, &record).await;
        tracing::info!(device = %device_id, old_peer = %prev.peer_addr, old_gateway = %prev.gateway_id, "reconnect from the same address: closing the older session");
        close_previous(gw, device_id, prev, "superseded by a newer session").await;
        if quarantined {
            return refuse_quarantined(gw, &mut redis, device_id, &peer_s, claim).await;
        }
        return Verdict::Proceed;
    }
    suspected_clone(gw, &mut redis, device_id, &peer_s, claim, prev).await
}

async fn suspected_clone(
    gw: &Gateway,
    redis: &mut Redis,
    device_id: &str,
    peer: &str,
    claim: &Claim,
    prev: &Owner,
) -> Verdict {
    let policy = gw.config.clone_policy;
    tracing::warn!(
        device = %device_id,
        peer,
        old_peer = %prev.peer_addr,
        old_gateway = %prev.gateway_id,
        policy = policy.as_str(),
        "suspected clone: one device identity in session from two addresses"
    );
    let flag = CloneFlag {
        time_ms: now_ms(),
        gateway: gw.id.clone(),
        peer: peer.to_string(),
        other_gateway: prev.gateway_id.clone(),
        other_peer: prev.peer_addr.clone(),
        action: policy.as_str().to_string(),
    };
    let outcome = record_suspicion(gw, redis, device_id, &flag).await;
    let mut record = AuditRecord::new(&gw.id, "clone_suspected", device_id, outcome)
        .with("policy", policy.as_str())
        .with("old_peer", prev.peer_addr.clone())
        .with("old_gateway", prev.gateway_id.clone())
        .with("old_epoch", prev.epoch.to_string())
        .with("new_peer", peer.to_string())
        .with("new_gateway", gw.id.clone())
        .with("new_epoch", claim.epoch.to_string());
    if policy == ClonePolicy::Quarantine {
        record = record.with(
            "quarantine_secs",
            gw.config.clone_quarantine_secs.to_string(),
        );
    }
    write_audit(redis, &record).await;
    match policy {
        ClonePolicy::NewestWins => {
            close_previous(
                gw,
                device_id,
                prev,
                "superseded by a newer session from another address (suspected clone)",
            )
            .await;
            Verdict::Proceed
        }
        ClonePolicy::Quarantine => {
            // Quarantine first, then close and release: any claim made
            // after our release finds the quarantine (RECORD checks it).
            if let Err(e) = quarantine(redis, device_id, gw.config.clone_quarantine_secs).await {
                tracing::warn!(device = %device_id, error = %e, "could not quarantine the device; closing both sessions anyway");
            }
            close_previous(gw, device_id, prev, "quarantined: suspected clone").await;
            let _ = ownership::release(&mut gw.redis.clone(), device_id, claim.epoch).await;
            Verdict::Refuse("quarantined: suspected clone".into())
        }
    }
}

/// A session of ours (`peer`, `epoch`) that was still live when a claim
/// from another address was made in another region (`newer`): flagged,
/// counted and audited like a clone seen within the region. Our session
/// closes either way (the newer claim holds the device); with
/// `quarantine`, the identity is also quarantined in the durable store,
/// so keyvault refuses its next handshake in every region, and the other
/// region's session is closed by its own gateway at its next ownership
/// refresh (the home check reads the quarantine, `home::check_many`).
pub async fn across_regions(
    gw: &Gateway,
    device_id: &str,
    peer: &str,
    epoch: u64,
    newer: &crate::home::Home,
) {
    let policy = gw.config.clone_policy;
    let mut redis = gw.durable.clone();
    tracing::warn!(
        device = %device_id,
        peer,
        other_peer = %newer.peer,
        other_region = %newer.region,
        other_gateway = %newer.gateway,
        policy = policy.as_str(),
        "suspected clone: one device identity in session in two regions from two addresses"
    );
    let flag = CloneFlag {
        time_ms: now_ms(),
        gateway: newer.gateway.clone(),
        peer: newer.peer.clone(),
        other_gateway: gw.id.clone(),
        other_peer: peer.to_string(),
        action: policy.as_str().to_string(),
    };
    let outcome = record_suspicion(gw, &mut redis, device_id, &flag).await;
    let record = AuditRecord::new(&gw.id, "clone_suspected", device_id, outcome)
        .with("policy", policy.as_str())
        .with("scope", "cross_region")
        .with("old_peer", peer.to_string())
        .with("old_gateway", gw.id.clone())
        .with("old_region", gw.region.clone())
        .with("old_epoch", epoch.to_string())
        .with("new_peer", newer.peer.clone())
        .with("new_gateway", newer.gateway.clone())
        .with("new_region", newer.region.clone())
        .with("new_epoch", newer.epoch.to_string());
    write_audit(&mut redis, &record).await;
    if policy == ClonePolicy::Quarantine
        && let Err(e) = quarantine(&mut redis, device_id, gw.config.clone_quarantine_secs).await
    {
        tracing::warn!(device = %device_id, error = %e, "could not quarantine the device");
    }
}

/// The identity was quarantined between keyvault's check and our claim.
async fn refuse_quarantined(
    gw: &Gateway,
    redis: &mut Redis,
    device_id: &str,
    peer: &str,
    claim: &Claim,
) -> Verdict {
    let _ = ownership::release(&mut gw.redis.clone(), device_id, claim.epoch).await;
    let record = AuditRecord::new(&gw.id, "session", device_id, "quarantined")
        .with("peer", peer.to_string())
        .with("epoch", claim.epoch.to_string());
    write_audit(redis, &record).await;
    Verdict::Refuse("quarantined: suspected clone".into())
}

/// Closes the superseded session wherever it is.
async fn close_previous(gw: &Gateway, device_id: &str, prev: &Owner, reason: &str) {
    if prev.gateway_id == gw.id {
        // `LocalSessions::insert` closes it too when this session goes on;
        // a refused session is never inserted, so close it here.
        gw.local.close(device_id, prev.epoch, reason);
    } else {
        gw.router
            .close_remote(&prev.gateway_id, device_id, prev.epoch, reason)
            .await;
    }
}

/// Audits into the durable store, bounded like the history write.
async fn write_audit(redis: &mut Redis, record: &AuditRecord) {
    match tokio::time::timeout(
        crate::home::DURABLE_WRITE_BUDGET,
        audit::append(redis, record),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, action = %record.action, "audit write failed"),
        Err(_) => {
            tracing::warn!(action = %record.action, "audit write timed out (durable store failing over)")
        }
    }
}

async fn record(
    gw: &Gateway,
    redis: &mut Redis,
    device_id: &str,
    peer: &str,
    epoch: u64,
) -> Result<bool, redis::RedisError> {
    let entry = SessionEntry {
        time_ms: now_ms(),
        gateway: gw.id.clone(),
        peer: peer.to_string(),
        epoch,
    };
    let json = serde_json::to_string(&entry).unwrap_or_default();
    let quarantined: i64 = RECORD_SCRIPT
        .key(keys::session_history(device_id))
        .key(keys::clone_flags(device_id))
        .key(keys::quarantine(device_id))
        .arg(json)
        .arg(gw.config.session_history_len.max(1))
        .arg(gw.config.session_history_ttl_secs.max(1))
        .invoke_async(redis)
        .await?;
    Ok(quarantined == 1)
}

/// What every suspected clone leaves, wherever it was seen: the metric and
/// the device's clone flag. Returns the audit outcome the policy implies.
async fn record_suspicion(
    gw: &Gateway,
    redis: &mut Redis,
    device_id: &str,
    flag: &CloneFlag,
) -> &'static str {
    metrics().clone_suspicions.add(
        1,
        &[
            kv("gateway", gw.id.clone()),
            kv("region", gw.region.clone()),
        ],
    );
    if let Err(e) = push_flag(gw, redis, device_id, flag).await {
        tracing::warn!(device = %device_id, error = %e, "could not record the clone flag");
    }
    match gw.config.clone_policy {
        ClonePolicy::NewestWins => "previous_closed",
        ClonePolicy::Quarantine => "quarantined",
    }
}

async fn push_flag(
    gw: &Gateway,
    redis: &mut Redis,
    device_id: &str,
    flag: &CloneFlag,
) -> Result<(), redis::RedisError> {
    let json = serde_json::to_string(flag).unwrap_or_default();
    let _: i64 = FLAG_SCRIPT
        .key(keys::clone_flags(device_id))
        .arg(json)
        .arg(gw.config.session_history_len.max(1))
        .arg(gw.config.session_history_ttl_secs.max(1))
        .invoke_async(redis)
        .await?;
    Ok(())
}

async fn quarantine(redis: &mut Redis, device_id: &str, secs: u64) -> redis::RedisResult<()> {
    redis::cmd("SET")
        .arg(keys::quarantine(device_id))
        .arg(now_ms())
        .arg("EX")
        .arg(secs.max(1))
        .query_async(redis)
        .await
}

/// Fills in the history, clone flags and quarantine of a `DeviceState`.
pub async fn fill_state(
    redis: &mut Redis,
    state: &mut pb::DeviceState,
    max: usize,
) -> redis::RedisResult<()> {
    let last = isize::try_from(max.max(1)).unwrap_or(isize::MAX) - 1;
    let device_id = state.device_id.clone();
    let (history, flags, pttl): (Vec<String>, Vec<String>, i64) = redis::pipe()
        .cmd("LRANGE")
        .arg(keys::session_history(&device_id))
        .arg(0)
        .arg(last)
        .cmd("LRANGE")
        .arg(keys::clone_flags(&device_id))
        .arg(0)
        .arg(last)
        .cmd("PTTL")
        .arg(keys::quarantine(&device_id))
        .query_async(redis)
        .await?;
    state.recent_sessions = history
        .iter()
        .filter_map(|j| serde_json::from_str::<SessionEntry>(j).ok())
        .map(|e| pb::SessionAddress {
            time_ms: e.time_ms,
            gateway_id: e.gateway,
            peer_addr: e.peer,
            epoch: e.epoch,
        })
        .collect();
    state.clone_flags = flags
        .iter()
        .filter_map(|j| serde_json::from_str::<CloneFlag>(j).ok())
        .map(|f| pb::CloneFlag {
            time_ms: f.time_ms,
            gateway_id: f.gateway,
            peer_addr: f.peer,
            other_gateway_id: f.other_gateway,
            other_peer_addr: f.other_peer,
            action: f.action,
        })
        .collect();
    state.quarantined_until_ms = match pttl {
        // -2: not quarantined; -1: no expiry (set by hand).
        -2 => 0,
        -1 => i64::MAX,
        ms => now_ms().saturating_add(ms),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_host_ignores_ports_and_v4_mapping() {
        assert!(same_host("127.0.0.2:4000", "127.0.0.2:5000"));
        assert!(!same_host("127.0.0.2:4000", "127.0.0.3:4000"));
        assert!(same_host("[::ffff:10.0.0.1]:1", "10.0.0.1:2"));
        assert!(same_host("weird", "weird"));
        assert!(!same_host("weird", "10.0.0.1:2"));
    }
}

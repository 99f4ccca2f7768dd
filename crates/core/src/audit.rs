//! The audit log: every private-key use, registry change and security-relevant
//! session event, appended to a Redis stream by whichever service saw it.
//!
//! Refused handshakes are not in that stream. Anyone who can reach a device
//! port can cause them, as fast as the admission limit allows, and one
//! record each would push the key-use records out of a capped stream in
//! minutes. They are counted instead, per source address, action and
//! reason ([`record_refusal`]): a flood from one address is one line with
//! a large count, and cannot evict anything else.
use crate::redis_conn::{Redis, keys};
use crate::time::now_ms;
use redis::AsyncCommands;

/// Entries kept in the audit stream (approximate trim).
pub const AUDIT_MAX_LEN: usize = 100_000;

/// Refusal aggregates kept (source, action, reason); the ones refused
/// longest ago are dropped first.
pub const REFUSALS_MAX: usize = 10_000;

/// Many refused handshakes of one kind from one source address.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The peer's IP address (the port is dropped: each attempt has its own).
    pub source: String,
    /// What was refused (`open_session`, `handshake`).
    pub action: String,
    /// Why (`unknown_device`, `revoked`, `bad_handshake`, ...).
    pub reason: String,
    pub count: u64,
    pub first_ms: i64,
    pub last_ms: i64,
    /// The device id the last attempt claimed (empty when unreadable).
    pub last_device: String,
    /// The service that refused the last attempt.
    pub last_actor: String,
}

/// One refusal counted into its aggregate, which is dropped last-seen
/// oldest first beyond [`REFUSALS_MAX`]. One round trip.
static RECORD_REFUSAL: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r#"
local member, now, device, actor, cap = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local count, first = 1, now
local current = redis.call('HGET', KEYS[2], member)
if current then
  local c, f = string.match(current, '^(%d+)|(%d+)|')
  if c then count = tonumber(c) + 1; first = f end
end
redis.call('HSET', KEYS[2], member, count .. '|' .. first .. '|' .. now .. '|' .. device .. '|' .. actor)
redis.call('ZADD', KEYS[1], now, member)
local n = redis.call('ZCARD', KEYS[1])
if n > cap then
  local old = redis.call('ZPOPMIN', KEYS[1], n - cap)
  for i = 1, #old, 2 do redis.call('HDEL', KEYS[2], old[i]) end
end
return count
"#,
    )
});

/// Counts one refused handshake from `peer` (an address with or without
/// port). Callers log a failure, as for [`append`].
pub async fn record_refusal(
    redis: &mut Redis,
    actor: &str,
    action: &str,
    reason: &str,
    peer: &str,
    device_id: &str,
) -> redis::RedisResult<u64> {
    let member = format!(
        "{}|{}|{}",
        source_address(peer),
        clean(action),
        clean(reason)
    );
    RECORD_REFUSAL
        .key(keys::AUDIT_REFUSALS)
        .key(keys::AUDIT_REFUSAL_COUNTS)
        .arg(member)
        .arg(now_ms())
        .arg(clean(device_id))
        .arg(clean(actor))
        .arg(REFUSALS_MAX)
        .invoke_async(redis)
        .await
}

/// The most recently refused `limit` aggregates, newest first, optionally
/// only those whose last attempt claimed `device_id`.
pub async fn refusals(
    redis: &mut Redis,
    limit: usize,
    device_id: Option<&str>,
) -> redis::RedisResult<Vec<Refusal>> {
    let members: Vec<String> = if device_id.is_some() {
        redis.zrevrange(keys::AUDIT_REFUSALS, 0, -1).await?
    } else {
        redis
            .zrevrange(keys::AUDIT_REFUSALS, 0, limit.max(1) as isize - 1)
            .await?
    };
    if members.is_empty() {
        return Ok(Vec::new());
    }
    let values: Vec<Option<String>> = redis::cmd("HMGET")
        .arg(keys::AUDIT_REFUSAL_COUNTS)
        .arg(&members)
        .query_async(redis)
        .await?;
    let mut out = Vec::new();
    for (member, value) in members.iter().zip(values) {
        let Some(refusal) = value.and_then(|v| parse_refusal(member, &v)) else {
            continue;
        };
        if device_id.is_none_or(|d| d == refusal.last_device) {
            out.push(refusal);
        }
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

fn parse_refusal(member: &str, value: &str) -> Option<Refusal> {
    let mut key = member.rsplitn(3, '|');
    let (reason, action, source) = (key.next()?, key.next()?, key.next()?);
    let mut v = value.splitn(5, '|');
    Some(Refusal {
        source: source.to_string(),
        action: action.to_string(),
        reason: reason.to_string(),
        count: v.next()?.parse().ok()?,
        first_ms: v.next()?.parse().ok()?,
        last_ms: v.next()?.parse().ok()?,
        last_device: v.next()?.to_string(),
        last_actor: v.next()?.to_string(),
    })
}

/// `1.2.3.4:5678` -> `1.2.3.4`, `[::1]:5678` -> `::1`; anything else as is.
fn source_address(peer: &str) -> String {
    match peer.parse::<std::net::SocketAddr>() {
        Ok(addr) => addr.ip().to_string(),
        Err(_) => clean(peer),
    }
}

/// Fields are joined with `|`: keep it out of them.
fn clean(field: &str) -> String {
    field.replace('|', "/")
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub id: String,
    pub time_ms: i64,
    pub actor: String,
    pub action: String,
    pub device_id: String,
    pub outcome: String,
    pub detail: Vec<(String, String)>,
}

impl AuditRecord {
    pub fn new(actor: &str, action: &str, device_id: &str, outcome: &str) -> Self {
        Self {
            id: String::new(),
            time_ms: now_ms(),
            actor: actor.into(),
            action: action.into(),
            device_id: device_id.into(),
            outcome: outcome.into(),
            detail: Vec::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<String>) -> Self {
        self.detail.push((key.into(), value.into()));
        self
    }

    /// The value of detail `key`, the first if it was given twice.
    pub fn detail(&self, key: &str) -> Option<&str> {
        self.detail
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Appends a record. Callers log and count a failure; an audit write that
/// fails must not crash a session, but must not be silent either.
pub async fn append(redis: &mut Redis, record: &AuditRecord) -> redis::RedisResult<String> {
    let mut fields: Vec<(String, String)> = vec![
        ("time_ms".into(), record.time_ms.to_string()),
        ("actor".into(), record.actor.clone()),
        ("action".into(), record.action.clone()),
        ("device".into(), record.device_id.clone()),
        ("outcome".into(), record.outcome.clone()),
    ];
    for (k, v) in &record.detail {
        fields.push((format!("d.{k}"), v.clone()));
    }
    redis
        .xadd_maxlen(
            keys::AUDIT,
            redis::streams::StreamMaxlen::Approx(AUDIT_MAX_LEN),
            "*",
            &fields,
        )
        .await
}

/// Appends a record where the change it describes is already made: a
/// failed write is logged loudly (and the change stands).
pub async fn append_logged(redis: &mut Redis, record: &AuditRecord) {
    if let Err(e) = append(redis, record).await {
        tracing::error!(
            error = %e,
            action = %record.action,
            device_id = %record.device_id,
            outcome = %record.outcome,
            "audit record not written"
        );
    }
}

/// As [`record_refusal`], a failure logged loudly instead of returned.
pub async fn record_refusal_logged(
    redis: &mut Redis,
    actor: &str,
    action: &str,
    reason: &str,
    peer: &str,
    device_id: &str,
) {
    if let Err(e) = record_refusal(redis, actor, action, reason, peer, device_id).await {
        tracing::error!(error = %e, action, reason, peer, "refusal not counted");
    }
}

/// The newest `limit` records (oldest first), optionally for one device.
pub async fn recent(
    redis: &mut Redis,
    limit: usize,
    device_id: Option<&str>,
) -> redis::RedisResult<Vec<AuditRecord>> {
    // Filtering by device scans further back than `limit`.
    let scan = if device_id.is_some() {
        limit.max(1) * 50
    } else {
        limit.max(1)
    };
    let reply: redis::streams::StreamRangeReply =
        redis.xrevrange_count(keys::AUDIT, "+", "-", scan).await?;
    let mut out = Vec::new();
    for entry in reply.ids {
        let get = |k: &str| -> String {
            entry
                .map
                .get(k)
                .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
                .unwrap_or_default()
        };
        let record = AuditRecord {
            id: entry.id.clone(),
            time_ms: get("time_ms").parse().unwrap_or(0),
            actor: get("actor"),
            action: get("action"),
            device_id: get("device"),
            outcome: get("outcome"),
            detail: entry
                .map
                .iter()
                .filter_map(|(k, v)| {
                    let key = k.strip_prefix("d.")?;
                    let value = redis::from_redis_value::<String>(v.clone()).ok()?;
                    Some((key.to_string(), value))
                })
                .collect(),
        };
        if device_id.is_none_or(|d| d == record.device_id) {
            out.push(record);
        }
        if out.len() >= limit {
            break;
        }
    }
    out.reverse();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detail_reads_the_first_value_of_a_key() {
        let r = AuditRecord::new("gw-1", "stale_delivery", "dev", "refused")
            .with("owner_gateway", "gw-2")
            .with("owner_gateway", "gw-3");
        assert_eq!(r.detail("owner_gateway"), Some("gw-2"));
        assert_eq!(r.detail("owner_epoch"), None);
    }

    #[test]
    fn aggregates_parse_back_and_keys_drop_the_port() {
        assert_eq!(source_address("10.1.2.3:4567"), "10.1.2.3");
        assert_eq!(source_address("[::1]:80"), "::1");
        assert_eq!(source_address("a|b"), "a/b");
        let r = parse_refusal("10.1.2.3|open_session|unknown_device", "7|100|200|abc|gw-1")
            .expect("parses");
        assert_eq!(
            r,
            Refusal {
                source: "10.1.2.3".into(),
                action: "open_session".into(),
                reason: "unknown_device".into(),
                count: 7,
                first_ms: 100,
                last_ms: 200,
                last_device: "abc".into(),
                last_actor: "gw-1".into(),
            }
        );
        assert!(parse_refusal("x|y|z", "garbage").is_none());
    }

    #[tokio::test]
    async fn refusals_are_counted_not_appended_and_the_oldest_aggregates_go_first() {
        let server =
            crate::local_redis::LocalRedis::start(crate::local_redis::RedisData::Ephemeral)
                .expect("redis-server");
        let mut redis = crate::redis_conn::connect(&server.url())
            .await
            .expect("connect");
        for _ in 0..3 {
            record_refusal(
                &mut redis,
                "kv",
                "open_session",
                "unknown_device",
                "10.0.0.1:1000",
                "d1",
            )
            .await
            .expect("record");
        }
        // Ordered by the time of the last refusal, in milliseconds.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        record_refusal(
            &mut redis,
            "kv",
            "open_session",
            "revoked",
            "10.0.0.1:1001",
            "d2",
        )
        .await
        .expect("record");
        let all = refusals(&mut redis, 10, None).await.expect("read");
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(all[0].reason, "revoked", "newest first: {all:?}");
        assert_eq!(all[1].count, 3);
        assert!(all[1].first_ms <= all[1].last_ms);
        let d1 = refusals(&mut redis, 10, Some("d1")).await.expect("read");
        assert_eq!(d1.len(), 1);
        assert_eq!(d1[0].reason, "unknown_device");
        let len: usize = redis.xlen(keys::AUDIT).await.expect("xlen");
        assert_eq!(len, 0, "refusals must not enter the audit stream");

        // Past the cap the aggregate refused longest ago is dropped.
        for n in 0..REFUSALS_MAX {
            record_refusal(
                &mut redis,
                "kv",
                "handshake",
                "malformed",
                &format!("10.9.{}.{}:1", n / 250, n % 250),
                "",
            )
            .await
            .expect("record");
        }
        let kept: usize = redis.zcard(keys::AUDIT_REFUSALS).await.expect("zcard");
        assert_eq!(kept, REFUSALS_MAX);
        let counts: usize = redis.hlen(keys::AUDIT_REFUSAL_COUNTS).await.expect("hlen");
        assert_eq!(
            counts, REFUSALS_MAX,
            "a dropped aggregate's counts go with it"
        );
        let d1 = refusals(&mut redis, 10, Some("d1")).await.expect("read");
        assert!(d1.is_empty(), "the oldest aggregate should be gone: {d1:?}");
    }
}

//! The audit log: every private-key use, registry change and security-relevant
//! session event, appended to a Redis stream by whichever service saw it.
use crate::redis_conn::{Redis, keys};
use crate::time::now_ms;
use redis::AsyncCommands;

/// Entries kept in the audit stream (approximate trim).
pub const AUDIT_MAX_LEN: usize = 100_000;

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

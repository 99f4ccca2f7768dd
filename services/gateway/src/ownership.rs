//! Session ownership in Redis: which gateway holds a device's live session,
//! under an epoch that only grows. A new session bumps the epoch; whoever
//! holds an older epoch has lost the device and must stop talking to it.
use redis::Script;
use trellis_core::redis_conn::{Redis, keys};
use trellis_core::time::now_ms;

/// The owner of a device's session as recorded in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub gateway_id: String,
    pub epoch: u64,
    pub peer_addr: String,
    pub since_ms: i64,
}

/// What claiming a session found and did.
#[derive(Debug, Clone)]
pub struct Claim {
    pub epoch: u64,
    /// The session this claim superseded, if one was live.
    pub previous: Option<Owner>,
}

/// Seconds a session record lives without a refresh: a gateway that dies
/// without cleaning up stops counting as owner after this.
pub fn session_ttl_secs(keepalive_secs: u64) -> u64 {
    keepalive_secs.saturating_mul(3).saturating_add(10)
}

const CLAIM: &str = r#"
local epoch = redis.call('INCR', KEYS[2])
local prev = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'gateway', ARGV[1], 'epoch', epoch, 'peer', ARGV[2], 'since', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {epoch, prev}
"#;

/// Refreshes the record only while we still own it; returns the current
/// owner's epoch (0 when there is none) so the caller can fence itself.
const REFRESH: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return tonumber(epoch or '0')
"#;

const RELEASE: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

pub async fn claim(
    redis: &mut Redis,
    device_id: &str,
    gateway_id: &str,
    peer_addr: &str,
    ttl_secs: u64,
) -> redis::RedisResult<Claim> {
    let (epoch, prev): (u64, Vec<String>) = Script::new(CLAIM)
        .key(keys::session(device_id))
        .key(keys::session_epoch(device_id))
        .arg(gateway_id)
        .arg(peer_addr)
        .arg(now_ms())
        .arg(ttl_secs)
        .invoke_async(redis)
        .await?;
    Ok(Claim {
        epoch,
        previous: owner_from_pairs(&prev),
    })
}

/// Returns the epoch now recorded (0: no live session).
pub async fn refresh(
    redis: &mut Redis,
    device_id: &str,
    epoch: u64,
    ttl_secs: u64,
) -> redis::RedisResult<u64> {
    Script::new(REFRESH)
        .key(keys::session(device_id))
        .arg(epoch.to_string())
        .arg(ttl_secs)
        .invoke_async(redis)
        .await
}

pub async fn release(redis: &mut Redis, device_id: &str, epoch: u64) -> redis::RedisResult<bool> {
    let n: i64 = Script::new(RELEASE)
        .key(keys::session(device_id))
        .arg(epoch.to_string())
        .invoke_async(redis)
        .await?;
    Ok(n == 1)
}

pub async fn current(redis: &mut Redis, device_id: &str) -> redis::RedisResult<Option<Owner>> {
    let pairs: Vec<String> = redis::cmd("HGETALL")
        .arg(keys::session(device_id))
        .query_async(redis)
        .await?;
    Ok(owner_from_pairs(&pairs))
}

/// Parses HGETALL's flat [field, value, ...] reply.
pub fn owner_from_pairs(pairs: &[String]) -> Option<Owner> {
    let get = |name: &str| {
        pairs
            .chunks_exact(2)
            .find(|kv| kv[0] == name)
            .map(|kv| kv[1].as_str())
    };
    Some(Owner {
        gateway_id: get("gateway")?.to_string(),
        epoch: get("epoch")?.parse().ok()?,
        peer_addr: get("peer").unwrap_or_default().to_string(),
        since_ms: get("since").and_then(|s| s.parse().ok()).unwrap_or(0),
    })
}

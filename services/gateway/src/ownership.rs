//! Session ownership in Redis: which gateway holds a device's live session,
//! under an epoch that only grows. A new session bumps the epoch; whoever
//! holds an older epoch has lost the device and must stop talking to it.
use redis::Script;
use std::sync::LazyLock;
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

// The epoch is max(local counter + 1, wall-clock ms): it grows within a
// region's Redis, and a session claimed later in another region (its own
// Redis, its own counter) still gets a larger epoch, as long as the
// regions' clocks agree to within the time between the two claims
// (deploy/README.md, "Session epochs across regions").
const CLAIM: &str = r#"
local epoch = redis.call('INCR', KEYS[2])
local wall = tonumber(ARGV[3])
if wall ~= nil and wall > epoch then
  epoch = wall
  redis.call('SET', KEYS[2], ARGV[3])
end
local prev = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'gateway', ARGV[1], 'epoch', epoch, 'peer', ARGV[2], 'since', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {epoch, prev}
"#;
static CLAIM_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM));

/// Refreshes the record only while we still own it; returns the current
/// owner's epoch (0 when there is none) so the caller can fence itself.
const REFRESH: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return tonumber(epoch or '0')
"#;
static REFRESH_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(REFRESH));

const RELEASE: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;
static RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE));

pub async fn claim(
    redis: &mut Redis,
    device_id: &str,
    gateway_id: &str,
    peer_addr: &str,
    ttl_secs: u64,
) -> redis::RedisResult<Claim> {
    claim_with(redis, device_id, gateway_id, peer_addr, ttl_secs, |_| {}).await
}

/// [`claim`], with `also` (commands whose answers are ignored, such as
/// the connection record) sent in the same round trip: every round trip on
/// the handshake path costs the gateway and Redis CPU that the RSA work
/// could have had. Not atomic with them, so `also` must be safe to repeat
/// (it is sent again after a Redis restart forgot the script).
pub async fn claim_with(
    redis: &mut Redis,
    device_id: &str,
    gateway_id: &str,
    peer_addr: &str,
    ttl_secs: u64,
    also: impl Fn(&mut redis::Pipeline),
) -> redis::RedisResult<Claim> {
    let mut invocation = CLAIM_SCRIPT.key(keys::session(device_id));
    invocation
        .key(keys::session_epoch(device_id))
        .arg(gateway_id)
        .arg(peer_addr)
        .arg(now_ms())
        .arg(ttl_secs);
    let pipeline = || {
        let mut pipe = redis::pipe();
        pipe.invoke_script(&invocation);
        also(&mut pipe);
        pipe
    };
    type Answer = ((u64, Vec<String>),);
    let answer: redis::RedisResult<Answer> = pipeline().query_async(redis).await;
    let ((epoch, prev),) = match answer {
        Ok(a) => a,
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            CLAIM_SCRIPT.load_async(redis).await?;
            pipeline().query_async::<Answer>(redis).await?
        }
        Err(e) => return Err(e),
    };
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
    REFRESH_SCRIPT
        .key(keys::session(device_id))
        .arg(epoch.to_string())
        .arg(ttl_secs)
        .invoke_async(redis)
        .await
}

/// Adds [`refresh`] of one session to `pipe` (its answer: the current
/// owner's epoch), for a pass over many sessions in one round trip. The
/// pipeline must start with [`load_refresh`], so a restarted Redis needs
/// nothing else.
pub fn refresh_in(pipe: &mut redis::Pipeline, device_id: &str, epoch: u64, ttl_secs: u64) {
    // EVALSHA written out rather than through a `ScriptInvocation`, which
    // allocates its key and argument lists per session per pass.
    pipe.cmd("EVALSHA")
        .arg(REFRESH_SCRIPT.get_hash())
        .arg(1)
        .arg(keys::session(device_id))
        .arg(epoch)
        .arg(ttl_secs);
}

/// Loads the refresh script first in a pipeline of [`refresh_in`] calls
/// (no answer of its own).
pub fn load_refresh(pipe: &mut redis::Pipeline) {
    pipe.load_script(&REFRESH_SCRIPT).ignore();
}

pub async fn release(redis: &mut Redis, device_id: &str, epoch: u64) -> redis::RedisResult<bool> {
    let n: i64 = RELEASE_SCRIPT
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

/// The fence at the point of delivery, run before any frame for a command
/// or a firmware chunk is written: the session record must still name this
/// gateway at this epoch. With a command's delivery key (KEYS[2]) it also
/// records, in the same step, that the command reached the device, unless
/// the asker has already withdrawn it (then it must not be delivered).
/// Returns {1} delivered/owned, {0, gateway, epoch} stale, {2} withdrawn.
const FENCE: &str = r#"
local owner = redis.call('HMGET', KEYS[1], 'gateway', 'epoch')
if owner[1] ~= ARGV[1] or owner[2] ~= ARGV[2] then
  return {0, owner[1] or '', owner[2] or '0'}
end
if #KEYS > 1 then
  if redis.call('GET', KEYS[2]) == 'withdrawn' then
    return {2}
  end
  redis.call('SET', KEYS[2], 'delivered:' .. ARGV[1] .. ':' .. ARGV[2], 'PX', ARGV[3])
end
return {1}
"#;
static FENCE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(FENCE));

/// The asker gives a command attempt up, unless it was delivered: returns
/// '' when it is now withdrawn (it never reached the device, so it may be
/// sent again), or the delivery record when it did reach the device.
const WITHDRAW: &str = r#"
if redis.call('SET', KEYS[1], 'withdrawn', 'NX', 'PX', ARGV[1]) then
  return ''
end
return redis.call('GET', KEYS[1]) or ''
"#;
static WITHDRAW_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(WITHDRAW));

/// How long delivery records live: well beyond any command's timeout.
const DELIVERY_RECORD_MS: u64 = 10 * 60 * 1000;

/// What the point-of-delivery fence found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fence {
    /// We still own the device at our epoch (and the command, if any, is now
    /// recorded as delivered).
    Owned,
    /// Another session (or none) holds the device now.
    Stale { gateway_id: String, epoch: u64 },
    /// The asker withdrew the command before we got to it.
    Withdrawn,
}

/// Checks, atomically with recording the delivery of `request` (when given),
/// that `gateway_id` still owns `device_id` at `epoch`.
pub async fn fence(
    redis: &mut Redis,
    device_id: &str,
    gateway_id: &str,
    epoch: u64,
    request: Option<&str>,
) -> redis::RedisResult<Fence> {
    let mut invocation = FENCE_SCRIPT.key(keys::session(device_id));
    if let Some(request) = request {
        invocation.key(keys::command_delivery(request));
    }
    let reply: Vec<redis::Value> = invocation
        .arg(gateway_id)
        .arg(epoch.to_string())
        .arg(DELIVERY_RECORD_MS)
        .invoke_async(redis)
        .await?;
    let text = |v: Option<&redis::Value>| -> String {
        match v {
            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(redis::Value::Int(n)) => n.to_string(),
            Some(redis::Value::SimpleString(s)) => s.clone(),
            _ => String::new(),
        }
    };
    Ok(match text(reply.first()).as_str() {
        "1" => Fence::Owned,
        "2" => Fence::Withdrawn,
        _ => Fence::Stale {
            gateway_id: text(reply.get(1)),
            epoch: text(reply.get(2)).parse().unwrap_or(0),
        },
    })
}

/// Gives up a command attempt if it never reached the device. `Ok(None)`:
/// withdrawn, safe to send again; `Ok(Some(record))`: it was delivered
/// (`delivered:<gateway>:<epoch>`), sending it again could run it twice.
pub async fn withdraw(redis: &mut Redis, request: &str) -> redis::RedisResult<Option<String>> {
    let record: String = WITHDRAW_SCRIPT
        .key(keys::command_delivery(request))
        .arg(DELIVERY_RECORD_MS)
        .invoke_async(redis)
        .await?;
    Ok((!record.is_empty() && record != "withdrawn").then_some(record))
}

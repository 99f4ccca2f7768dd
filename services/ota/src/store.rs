//! Every Redis read and write of the scheduler, and the Lua scripts that
//! make them safe with several replicas:
//! - [`acquire_lease`]: a per-rollout lease (`SET NX PX` semantics) whose
//!   value carries a fencing token from `INCR`; renewed every tick;
//! - [`transition`]: a device record's compare-and-set, optionally checking
//!   that the caller still holds the lease (fencing), that the rollout is
//!   running, and that `max_concurrent` is not exceeded; it keeps the
//!   rollout's in-flight counter exact;
//! - [`create`]: the whole rollout in one step (no partial record), refused
//!   if a device is already in another running or paused rollout;
//! - [`set_state`] / [`set_fields`]: rollout-level changes.
use crate::record::{DevState, DeviceRecord, Loaded, RolloutMeta, RolloutState};
use redis::AsyncCommands;
use std::collections::HashMap;
use std::sync::LazyLock;
use trellis_core::redis_conn::{Redis, keys};

static LEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local cur = redis.call('GET', KEYS[1])
if cur and cur == ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return cur
end
if cur then return false end
local token = redis.call('INCR', KEYS[2])
local v = ARGV[1] .. ':' .. token
redis.call('SET', KEYS[1], v, 'NX', 'PX', ARGV[3])
return v
"#,
    )
});

/// Takes or renews the lease on a rollout. `held` is the value this
/// replica holds ("" if none). Returns the value now held, or `None` when
/// another replica holds it.
pub async fn acquire_lease(
    redis: &mut Redis,
    rollout_id: &str,
    replica: &str,
    held: &str,
    lease_ms: u64,
) -> redis::RedisResult<Option<String>> {
    LEASE
        .key(keys::rollout_lease(rollout_id))
        .key(keys::rollout_fence(rollout_id))
        .arg(replica)
        .arg(held)
        .arg(lease_ms.max(1))
        .invoke_async(redis)
        .await
}

/// Gives a lease up (shutdown), if still ours.
pub async fn release_lease(
    redis: &mut Redis,
    rollout_id: &str,
    held: &str,
) -> redis::RedisResult<()> {
    static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
        redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        )
    });
    let _: i64 = RELEASE
        .key(keys::rollout_lease(rollout_id))
        .arg(held)
        .invoke_async(redis)
        .await?;
    Ok(())
}

static TRANSITION: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if ARGV[4] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[4] then return -1 end
if ARGV[7] == '1' and redis.call('HGET', KEYS[2], 'state') ~= 'running' then return -3 end
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
local delta = tonumber(ARGV[5])
if delta > 0 and tonumber(ARGV[6]) > 0 then
  local inflight = tonumber(redis.call('HGET', KEYS[2], 'inflight') or '0')
  if inflight + delta > tonumber(ARGV[6]) then return -2 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if delta ~= 0 then redis.call('HINCRBY', KEYS[2], 'inflight', delta) end
redis.call('HINCRBY', KEYS[2], 'rev', 1)
return 1
"#,
    )
});

/// What a compare-and-set transition found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cas {
    Done,
    /// The record changed since it was read.
    Stale,
    /// The caller no longer holds the rollout's lease.
    LeaseLost,
    /// `max_concurrent` devices are already in flight.
    Full,
    /// The rollout is not running (paused, aborted, completed).
    NotRunning,
}

/// Guards on a transition.
#[derive(Debug, Clone, Default)]
pub struct Guard<'a> {
    /// Lease value the caller must still hold ("" : no check).
    pub lease: &'a str,
    /// The rollout must be running.
    pub running: bool,
    /// `max_concurrent` (0: no check; only applies when the transition adds
    /// an in-flight device).
    pub max_inflight: u32,
}

pub async fn transition(
    redis: &mut Redis,
    rollout_id: &str,
    device_id: &str,
    expected_raw: &str,
    from: DevState,
    to: &DeviceRecord,
    guard: &Guard<'_>,
) -> redis::RedisResult<Cas> {
    let delta = i64::from(to.state.in_flight()) - i64::from(from.in_flight());
    let r: i64 = TRANSITION
        .key(keys::rollout_devices(rollout_id))
        .key(keys::rollout(rollout_id))
        .key(keys::rollout_lease(rollout_id))
        .arg(device_id)
        .arg(expected_raw)
        .arg(to.encode())
        .arg(guard.lease)
        .arg(delta)
        .arg(guard.max_inflight)
        .arg(if guard.running { "1" } else { "0" })
        .invoke_async(redis)
        .await?;
    Ok(match r {
        1 => Cas::Done,
        -1 => Cas::LeaseLost,
        -2 => Cas::Full,
        -3 => Cas::NotRunning,
        _ => Cas::Stale,
    })
}

static CREATE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
local nmeta = tonumber(ARGV[5])
local first = 6 + 2 * nmeta
for i = first, #ARGV, 2 do
  local other = redis.call('GET', ARGV[3] .. ARGV[i])
  if other then
    local st = redis.call('HGET', ARGV[4] .. other, 'state')
    if st == 'running' or st == 'paused' then return {'conflict', ARGV[i], other} end
  end
end
for i = 6, first - 1, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
for i = first, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  redis.call('SET', ARGV[3] .. ARGV[i], ARGV[1])
end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
return {'ok'}
"#,
    )
});

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    Ok,
    Exists,
    /// (device, the running or paused rollout it is in)
    Conflict(String, String),
}

pub async fn create(
    redis: &mut Redis,
    rollout_id: &str,
    created_at_ms: i64,
    meta: &[(&str, String)],
    devices: &[(String, DeviceRecord)],
) -> redis::RedisResult<Created> {
    let mut inv = CREATE.prepare_invoke();
    inv.key(keys::rollout(rollout_id))
        .key(keys::rollout_devices(rollout_id))
        .key(keys::ROLLOUT_INDEX)
        .key(keys::ROLLOUT_ACTIVE)
        .arg(rollout_id)
        .arg(created_at_ms)
        .arg(keys::OTA_DEVICE_PREFIX)
        .arg(keys::ROLLOUT_PREFIX)
        .arg(meta.len());
    for (k, v) in meta {
        inv.arg(*k).arg(v);
    }
    for (id, rec) in devices {
        inv.arg(id).arg(rec.encode());
    }
    let r: Vec<String> = inv.invoke_async(redis).await?;
    Ok(match r.first().map(String::as_str) {
        Some("ok") => Created::Ok,
        Some("conflict") => Created::Conflict(
            r.get(1).cloned().unwrap_or_default(),
            r.get(2).cloned().unwrap_or_default(),
        ),
        _ => Created::Exists,
    })
}

static SET_STATE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
if ARGV[4] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[4] then return 'lease' end
local st = redis.call('HGET', KEYS[1], 'state')
if not string.find(ARGV[1], ',' .. st .. ',', 1, true) then return st end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'state', ARGV[2]) end
redis.call('HSET', KEYS[1], 'updated_at_ms', ARGV[5])
if ARGV[3] ~= '' or ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'message', ARGV[3]) end
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HINCRBY', KEYS[1], 'rev', 1)
return 'ok'
"#,
    )
});

/// What a rollout-level change found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateChange {
    Done,
    Missing,
    LeaseLost,
    /// The rollout is in another state (given) than the change allows.
    WrongState(String),
}

/// Moves a rollout from one of `from` to `to`, with a message and extra
/// fields, optionally only while `lease` is held.
#[allow(clippy::too_many_arguments)]
pub async fn set_state(
    redis: &mut Redis,
    rollout_id: &str,
    from: &[RolloutState],
    to: Option<RolloutState>,
    message: &str,
    lease: &str,
    now_ms: i64,
    fields: &[(&str, String)],
) -> redis::RedisResult<StateChange> {
    let allowed = format!(
        ",{},",
        from.iter().map(|s| s.name()).collect::<Vec<_>>().join(",")
    );
    let mut inv = SET_STATE.prepare_invoke();
    inv.key(keys::rollout(rollout_id))
        .key(keys::rollout_lease(rollout_id))
        .arg(allowed)
        .arg(to.map(|s| s.name()).unwrap_or(""))
        .arg(message)
        .arg(lease)
        .arg(now_ms);
    for (k, v) in fields {
        inv.arg(*k).arg(v);
    }
    let r: String = inv.invoke_async(redis).await?;
    Ok(match r.as_str() {
        "ok" => StateChange::Done,
        "missing" => StateChange::Missing,
        "lease" => StateChange::LeaseLost,
        other => StateChange::WrongState(other.to_string()),
    })
}

/// Sets fields on a rollout in `state`, only while `lease` is held.
pub async fn set_fields(
    redis: &mut Redis,
    rollout_id: &str,
    state: RolloutState,
    lease: &str,
    now_ms: i64,
    message: Option<&str>,
    fields: &[(&str, String)],
) -> redis::RedisResult<StateChange> {
    let mut all: Vec<(&str, String)> = fields.to_vec();
    if let Some(m) = message {
        all.push(("message", m.to_string()));
    }
    set_state(redis, rollout_id, &[state], None, "", lease, now_ms, &all).await
}

pub async fn load_meta(
    redis: &mut Redis,
    rollout_id: &str,
) -> redis::RedisResult<Option<RolloutMeta>> {
    let map: HashMap<String, String> = redis.hgetall(keys::rollout(rollout_id)).await?;
    if map.is_empty() {
        return Ok(None);
    }
    Ok(RolloutMeta::parse(rollout_id, &map))
}

pub async fn load(redis: &mut Redis, rollout_id: &str) -> redis::RedisResult<Option<Loaded>> {
    let (map, devs): (HashMap<String, String>, HashMap<String, String>) = redis::pipe()
        .hgetall(keys::rollout(rollout_id))
        .hgetall(keys::rollout_devices(rollout_id))
        .query_async(redis)
        .await?;
    if map.is_empty() {
        return Ok(None);
    }
    let Some(meta) = RolloutMeta::parse(rollout_id, &map) else {
        return Ok(None);
    };
    let mut devices: Vec<(String, String, DeviceRecord)> = devs
        .into_iter()
        .filter_map(|(id, raw)| DeviceRecord::decode(&raw).map(|d| (id, raw, d)))
        .collect();
    devices.sort_by_key(|(_, _, d)| d.seq);
    Ok(Some(Loaded { meta, devices }))
}

pub async fn device(
    redis: &mut Redis,
    rollout_id: &str,
    device_id: &str,
) -> redis::RedisResult<Option<(String, DeviceRecord)>> {
    let raw: Option<String> = redis
        .hget(keys::rollout_devices(rollout_id), device_id)
        .await?;
    Ok(raw.and_then(|raw| DeviceRecord::decode(&raw).map(|d| (raw, d))))
}

/// Newest first.
pub async fn list_ids(redis: &mut Redis) -> redis::RedisResult<Vec<String>> {
    redis.zrevrange(keys::ROLLOUT_INDEX, 0, -1).await
}

pub async fn active_ids(redis: &mut Redis) -> redis::RedisResult<Vec<String>> {
    let mut ids: Vec<String> = redis.smembers(keys::ROLLOUT_ACTIVE).await?;
    ids.sort();
    Ok(ids)
}

pub async fn deactivate(redis: &mut Redis, rollout_id: &str) -> redis::RedisResult<()> {
    redis.srem(keys::ROLLOUT_ACTIVE, rollout_id).await
}

/// The rollout a device is in (the newest one that included it).
pub async fn rollout_of(redis: &mut Redis, device_id: &str) -> redis::RedisResult<Option<String>> {
    redis.get(keys::ota_device(device_id)).await
}

/// The live session's epoch, or `None` when the device is offline.
pub async fn session_epoch(redis: &mut Redis, device_id: &str) -> redis::RedisResult<Option<u64>> {
    let (exists, epoch): (bool, Option<String>) = redis::pipe()
        .exists(keys::session(device_id))
        .hget(keys::session(device_id), "epoch")
        .query_async(redis)
        .await?;
    Ok(exists.then(|| epoch.and_then(|e| e.parse().ok()).unwrap_or(0)))
}

/// The SHA-256 the device last reported in Hello ("" if none).
/// What the device last reported for a rollout of this kind: the trust
/// policy's SHA-256 for a policy rollout (Hello extension 0x04, or the
/// policy it accepted since), else its image's.
pub async fn reported(
    redis: &mut Redis,
    device_id: &str,
    policy: bool,
) -> redis::RedisResult<String> {
    if !policy {
        return reported_sha(redis, device_id).await;
    }
    let sha: Option<String> = redis
        .hget(keys::device_state(device_id), "trust_policy_sha256")
        .await?;
    Ok(sha.unwrap_or_default().to_ascii_lowercase())
}

pub async fn reported_sha(redis: &mut Redis, device_id: &str) -> redis::RedisResult<String> {
    let sha: Option<String> = redis
        .hget(keys::device_state(device_id), "firmware_sha256")
        .await?;
    Ok(sha.unwrap_or_default().to_ascii_lowercase())
}

// Keyvault's registry: one layout, read where it is defined.
pub use trellis_records::registry::{fleet, registered};

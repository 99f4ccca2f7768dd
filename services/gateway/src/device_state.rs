//! A device's last reported state (Hello, Describe, where it is connected),
//! kept in Redis so any gateway can answer `device list` for any device.
use std::collections::HashMap;
use trellis_core::redis_conn::{Redis, keys};
use trellis_core::time::now_ms;
use trellis_wire::hello::Hello;

/// Adds the record of a new connection to `pipe` (no answer), to go with
/// the session claim (`ownership::claim_with`).
pub fn record_connect_in(
    pipe: &mut redis::Pipeline,
    device_id: &str,
    gateway_id: &str,
    region: &str,
    peer: &str,
    product_id: u32,
) {
    let now = now_ms().to_string();
    pipe.cmd("HSET")
        .arg(keys::device_state(device_id))
        .arg(&[
            ("gateway", gateway_id),
            ("region", region),
            ("peer", peer),
            ("product", &product_id.to_string()),
            ("connected_at", &now),
            ("last_seen", &now),
        ])
        .ignore();
}

pub async fn record_hello(
    redis: &mut Redis,
    device_id: &str,
    hello: &Hello,
) -> redis::RedisResult<()> {
    let sha = hello.firmware_sha256.map(hex::encode).unwrap_or_default();
    let policy = hello.command_policy.unwrap_or_default();
    let (command_policy, command_sequence) = match hello.command_policy {
        Some(_) => (
            hex::encode(policy.policy_sha256),
            policy.last_sequence.to_string(),
        ),
        None => (String::new(), String::new()),
    };
    let (trust_version, trust_sha) = match hello.trust_policy {
        Some(p) => (p.version.to_string(), hex::encode(p.sha256)),
        None => (String::new(), String::new()),
    };
    redis::cmd("HSET")
        .arg(keys::device_state(device_id))
        .arg(&[
            ("hello_product", hello.product_id.to_string()),
            ("firmware_version", hello.firmware_version.to_string()),
            ("platform", hello.platform_id.to_string()),
            ("hello_flags", hello.flags.to_string()),
            ("firmware_sha256", sha),
            ("command_policy", command_policy),
            ("command_sequence", command_sequence),
            ("trust_policy_version", trust_version),
            ("trust_policy_sha256", trust_sha),
            // The cloud key version held (extension 0x03; none: version 1,
            // no rotation support), in the same write as the rest.
            (
                "cloud_key_version",
                hello.cloud_key_version.unwrap_or(1).to_string(),
            ),
            (
                "cloud_key_rotation",
                u8::from(hello.cloud_key_version.is_some()).to_string(),
            ),
            ("last_seen", now_ms().to_string()),
        ])
        .query_async(redis)
        .await
}

/// The trust policy a device accepted over its session (it answered 2.04
/// to POST `tp`), until its next Hello reports it.
pub async fn record_trust_policy(
    redis: &mut Redis,
    device_id: &str,
    version: u64,
    sha256_hex: &str,
) -> redis::RedisResult<()> {
    redis::cmd("HSET")
        .arg(keys::device_state(device_id))
        .arg(&[
            ("trust_policy_version", version.to_string()),
            ("trust_policy_sha256", sha256_hex.to_string()),
        ])
        .query_async(redis)
        .await
}

pub async fn record_describe(
    redis: &mut Redis,
    device_id: &str,
    functions: &[String],
    variables: &[(String, String)],
) -> redis::RedisResult<()> {
    let vars: HashMap<&str, &str> = variables
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    redis::cmd("HSET")
        .arg(keys::device_state(device_id))
        .arg(&[
            (
                "functions",
                serde_json::to_string(functions).unwrap_or_default(),
            ),
            (
                "variables",
                serde_json::to_string(&vars).unwrap_or_default(),
            ),
        ])
        .query_async(redis)
        .await
}

/// Adds "the device was in session at `now_ms`" to `pipe` (no answer), for
/// the refresher's pass over every session.
pub fn touch_in(pipe: &mut redis::Pipeline, device_id: &str, now_ms: i64) {
    pipe.cmd("HSET")
        .arg(keys::device_state(device_id))
        .arg("last_seen")
        .arg(now_ms)
        .ignore();
}

/// Appends a device event to the capped events stream.
#[allow(clippy::too_many_arguments)]
pub async fn append_event(
    redis: &mut Redis,
    max_len: usize,
    device_id: &str,
    gateway_id: &str,
    name: &str,
    data: &[u8],
    public: bool,
) -> redis::RedisResult<String> {
    let origin = [("device", device_id)];
    append(redis, max_len, &origin, gateway_id, name, data, public).await
}

/// Appends an event a user or app published (no device) to the events
/// stream, marked with the publisher's organisation: only that
/// organisation's streams carry it.
#[allow(clippy::too_many_arguments)]
pub async fn append_published_event(
    redis: &mut Redis,
    max_len: usize,
    org: &str,
    publisher: &str,
    gateway_id: &str,
    name: &str,
    data: &[u8],
    public: bool,
) -> redis::RedisResult<String> {
    let origin = [("device", ""), ("org", org), ("publisher", publisher)];
    append(redis, max_len, &origin, gateway_id, name, data, public).await
}

/// One XADD to the capped events stream: who it comes from, then the
/// fields every event has.
#[allow(clippy::too_many_arguments)]
async fn append(
    redis: &mut Redis,
    max_len: usize,
    origin: &[(&str, &str)],
    gateway_id: &str,
    name: &str,
    data: &[u8],
    public: bool,
) -> redis::RedisResult<String> {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(keys::EVENTS)
        .arg("MAXLEN")
        .arg("~")
        .arg(max_len)
        .arg("*");
    for (field, value) in origin {
        cmd.arg(*field).arg(*value);
    }
    cmd.arg("name")
        .arg(name)
        .arg("data")
        .arg(data)
        .arg("public")
        .arg(if public { "1" } else { "0" })
        .arg("time_ms")
        .arg(now_ms())
        .arg("gateway")
        .arg(gateway_id)
        .query_async(redis)
        .await
}

/// A state hash as field -> value.
pub async fn load(
    redis: &mut Redis,
    device_id: &str,
) -> redis::RedisResult<HashMap<String, String>> {
    redis::cmd("HGETALL")
        .arg(keys::device_state(device_id))
        .query_async(redis)
        .await
}

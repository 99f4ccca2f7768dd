//! Signed commands on the gateway's side (docs/protocol.md §7.4). The
//! gateway never judges a signed command: only the device, which holds the
//! customer's command policy, does. The gateway reads the sequence number
//! so that `device show` can give the last one accepted, and audits every
//! signed call and every refusal with the device's reason.
use crate::Gateway;
use crate::routing::{FailureKind, Outcome};
use tonic::Status;
use trellis_auth::Principal;
use trellis_core::audit::{self, AuditRecord};
use trellis_core::redis_conn::keys;
use trellis_firmware::command::{CommandEnvelope, SignedCommand};

/// The sequence number of a signed command, or INVALID_ARGUMENT for bytes
/// that are not one (a device would refuse them as malformed anyway; the
/// caller learns why sooner).
pub fn sequence_of(signed: &[u8]) -> Result<u64, Status> {
    let max = trellis_wire::coap::MAX_SIGNED_COMMAND_LEN;
    if signed.len() > max {
        return Err(Status::invalid_argument(format!(
            "signed_command is {} bytes; at most {max} fit in a device's frame (fewer or shorter keys)",
            signed.len()
        )));
    }
    let signed = SignedCommand::decode(signed).map_err(|e| {
        Status::invalid_argument(format!(
            "signed_command is not a signed command ({e}); make one with `trellis command sign`"
        ))
    })?;
    let envelope = CommandEnvelope::from_bytes(&signed.envelope).map_err(|e| {
        Status::invalid_argument(format!("signed_command's envelope is malformed ({e})"))
    })?;
    Ok(envelope.sequence)
}

/// Raises the device's recorded sequence to `sequence` unless it is higher
/// already (two calls may finish out of order). Hashed once per process.
static RAISE_SEQUENCE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(RAISE_SEQUENCE_LUA));
const RAISE_SEQUENCE_LUA: &str = r"
local current = tonumber(redis.call('HGET', KEYS[1], 'command_sequence') or '0') or 0
local new = tonumber(ARGV[1])
if new > current then redis.call('HSET', KEYS[1], 'command_sequence', ARGV[1]) end
return 0";

/// After a call: the accepted sequence recorded, signed calls and refusals
/// audited. Failures here are logged, never turned into the caller's error:
/// the device has already answered.
pub async fn after_call(
    gw: &Gateway,
    principal: &Principal,
    device_id: &str,
    function: &str,
    sequence: Option<u64>,
    outcome: &Outcome,
) {
    let record = match (outcome, sequence) {
        (Ok(_), Some(sequence)) => {
            let mut redis = gw.redis.clone();
            let raised: redis::RedisResult<i64> = RAISE_SEQUENCE
                .key(keys::device_state(device_id))
                .arg(sequence.to_string())
                .invoke_async(&mut redis)
                .await;
            if let Err(e) = raised {
                tracing::warn!(device = %device_id, error = %e, "could not record the command sequence");
            }
            AuditRecord::new(&principal.actor(), "signed_command", device_id, "ok")
                .with("function", function)
                .with("sequence", sequence.to_string())
        }
        (Err(f), _) if f.kind == FailureKind::Refused => {
            tracing::warn!(device = %device_id, function, reason = %f.message, "device refused a function call");
            let mut record =
                AuditRecord::new(&principal.actor(), "command_refused", device_id, "refused")
                    .with("function", function)
                    .with("reason", f.message.clone());
            if let Some(sequence) = sequence {
                record = record.with("sequence", sequence.to_string());
            }
            record
        }
        _ => return,
    };
    let mut durable = gw.durable.clone();
    if let Err(e) = audit::append(&mut durable, &record).await {
        tracing::warn!(device = %device_id, error = %e, action = %record.action, "audit write failed");
    }
}

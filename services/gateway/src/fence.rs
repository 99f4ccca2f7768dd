//! Fencing at the point of delivery. A gateway that was paused or cut off
//! may still hold a device's old TCP connection and believe it owns the
//! device while another gateway has taken it over under a newer epoch. So
//! right before a frame for a command or a firmware chunk is written, the
//! session asks Redis (one script, one round trip) whether it still owns the
//! device at its epoch, and for a command records in the same step that it
//! was delivered; a stale session refuses, audits the refusal and closes.
use crate::Gateway;
use crate::ownership::{self, Fence};
use crate::routing::{Failure, FailureKind};
use tracing::Instrument;
use trellis_core::audit::{self, AuditRecord};

/// Why a delivery was refused.
#[derive(Debug)]
pub struct Refusal {
    /// What the command's caller is told.
    pub failure: Failure,
    /// `Some(reason)`: this session no longer owns the device and must end.
    pub end_session: Option<String>,
}

/// Checks that this gateway still owns `device_id` at `epoch` before
/// `what` is written to the device; `request` (a command's attempt id) is
/// recorded as delivered when the check passes.
pub async fn before_delivery(
    gw: &Gateway,
    device_id: &str,
    epoch: u64,
    request: Option<&str>,
    what: &str,
) -> Result<(), Refusal> {
    let span = tracing::debug_span!(
        "command.fence",
        gateway = %gw.id,
        device = %device_id,
        epoch,
        request = request.unwrap_or(""),
        what,
        outcome = tracing::field::Empty,
    );
    let mut redis = gw.redis.clone();
    let result = ownership::fence(&mut redis, device_id, &gw.id, epoch, request)
        .instrument(span.clone())
        .await;
    match result {
        Ok(Fence::Owned) => {
            span.record("outcome", "owned");
            Ok(())
        }
        Ok(Fence::Withdrawn) => {
            span.record("outcome", "withdrawn");
            Err(Refusal {
                failure: Failure::new(
                    FailureKind::SessionLost,
                    format!(
                        "the command for device {device_id} was withdrawn by its caller before delivery"
                    ),
                ),
                end_session: None,
            })
        }
        Ok(Fence::Stale {
            gateway_id,
            epoch: current,
        }) => {
            span.record("outcome", "stale");
            let owner = if gateway_id.is_empty() {
                "nobody".to_string()
            } else {
                format!("{gateway_id} at epoch {current}")
            };
            tracing::warn!(
                gateway = %gw.id, device = %device_id, epoch, owner = %owner, what,
                "stale delivery refused: this gateway no longer owns the device"
            );
            let record = AuditRecord::new(&gw.id, "stale_delivery", device_id, "refused")
                .with("epoch", epoch.to_string())
                .with("owner_gateway", gateway_id.clone())
                .with("owner_epoch", current.to_string())
                .with("what", what.to_string())
                .with("request", request.unwrap_or_default().to_string());
            // Audit is a durable record, shared by every region.
            let mut durable = gw.durable.clone();
            match tokio::time::timeout(
                crate::home::DURABLE_WRITE_BUDGET,
                audit::append(&mut durable, &record),
            )
            .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "audit write failed"),
                Err(_) => tracing::warn!("audit write timed out (durable store failing over)"),
            }
            Err(Refusal {
                failure: Failure::new(
                    FailureKind::SessionLost,
                    format!(
                        "gateway {} no longer owns device {device_id} (its epoch {epoch}, now held by {owner}); not delivered",
                        gw.id
                    ),
                ),
                end_session: Some(format!(
                    "fenced: epoch {epoch} is no longer the device's (now {owner})"
                )),
            })
        }
        Err(e) => {
            // Cannot prove we own the device: do not write (fail closed).
            span.record("outcome", "redis_error");
            tracing::warn!(gateway = %gw.id, device = %device_id, error = %e, "ownership not verifiable; delivery refused");
            Err(Refusal {
                failure: Failure::new(
                    FailureKind::Internal,
                    format!(
                        "cannot verify the session of device {device_id} (redis: {e}); not delivered"
                    ),
                ),
                end_session: None,
            })
        }
    }
}

/// A short description of a command for logs and the audit record.
pub fn describe(action: &crate::routing::Action) -> String {
    use crate::routing::Action;
    match action {
        Action::CallFunction { name, .. } => format!("function {name}"),
        Action::GetVariable { name } => format!("variable {name}"),
        Action::Signal { on } => format!("signal {}", if *on { "on" } else { "off" }),
        Action::DeliverUpdate { release_id, .. } => format!("firmware update {release_id}"),
        Action::RotateDeviceKey => "device key rotation".to_string(),
    }
}

//! Revocation and deletion are immediate and complete: the live session
//! closes on whichever gateway holds it (here the second gateway, while
//! the operator's request goes to keyvault), within 5 s, and the identity
//! is refused at its next handshake; an operator can lift a quarantine.
//! Real redis-server with a Redis user per service, keyvault, two gateways.
use redis::AsyncCommands;
use std::time::{Duration, Instant};
use trellis_device::identity::DeviceIdentity;
use trellis_proto::v1::{DeleteDeviceRequest, LiftQuarantineRequest, RevokeDeviceRequest};
use trellis_tests::{Cluster, RawDevice};

async fn in_session(
    cluster: &Cluster,
    identity: &DeviceIdentity,
    gateway: usize,
) -> anyhow::Result<RawDevice> {
    let mut device = RawDevice::connect(cluster.gateways[gateway].devices, identity).await?;
    device.hello(identity.device_id, [7; 32]).await?;
    Ok(device)
}

async fn refused_everywhere(cluster: &Cluster, identity: &DeviceIdentity) -> bool {
    for gateway in &cluster.gateways {
        if RawDevice::connect(gateway.devices, identity).await.is_ok() {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_closes_the_live_session_on_its_gateway_within_5_s() -> anyhow::Result<()> {
    let cluster = Cluster::start(2).await?;
    let identity = cluster.provision(1).await?;
    let other = cluster.provision(1).await?;
    let id = identity.device_id.to_string();
    let mut device = in_session(&cluster, &identity, 1).await?;
    let mut bystander = in_session(&cluster, &other, 1).await?;
    // Settled: a close after this comes from the revocation.
    assert!(!device.closed_within(Duration::from_millis(700)).await);

    let started = Instant::now();
    cluster
        .keyvault_client()
        .await?
        .revoke_device(RevokeDeviceRequest {
            device_id: id.clone(),
            reason: "stolen".into(),
        })
        .await?;
    assert!(
        device.closed_within(Duration::from_secs(5)).await,
        "the revoked device's session is still open 5 s later"
    );
    eprintln!(
        "revoked session closed {:?} after RevokeDevice",
        started.elapsed()
    );
    assert!(
        !bystander.closed_within(Duration::from_millis(800)).await,
        "another device's session was closed"
    );
    assert!(
        refused_everywhere(&cluster, &identity).await,
        "a revoked device got a session"
    );
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_closes_the_session_keeps_the_audit_and_frees_the_id() -> anyhow::Result<()> {
    let cluster = Cluster::start(2).await?;
    let identity = cluster.provision(1).await?;
    let id = identity.device_id.to_string();
    let mut device = in_session(&cluster, &identity, 1).await?;
    assert!(!device.closed_within(Duration::from_millis(500)).await);

    let mut kv = cluster.keyvault_client().await?;
    kv.delete_device(DeleteDeviceRequest {
        device_id: id.clone(),
        reason: "decommissioned".into(),
    })
    .await?;
    assert!(
        device.closed_within(Duration::from_secs(5)).await,
        "the deleted device's session is still open 5 s later"
    );
    assert!(
        refused_everywhere(&cluster, &identity).await,
        "a deleted device got a session"
    );
    // Deleting again: NOT_FOUND, and nothing else changes.
    let again = kv
        .delete_device(DeleteDeviceRequest {
            device_id: id.clone(),
            reason: String::new(),
        })
        .await
        .expect_err("a second delete");
    assert_eq!(again.code(), tonic::Code::NotFound);
    // The history stays: the registration and the deletion.
    let audit = cluster.audit(Some(&id)).await?;
    assert!(audit.iter().any(|r| r.action == "register"), "{audit:?}");
    let deletion = audit
        .iter()
        .find(|r| r.action == "delete")
        .expect("a delete record");
    assert!(
        deletion
            .detail
            .iter()
            .any(|(k, v)| k == "reason" && v == "decommissioned")
    );
    // The id can be registered again (a replaced board keeps its label).
    cluster.register(&identity, 1).await?;
    let mut back = in_session(&cluster, &identity, 0).await?;
    assert!(!back.closed_within(Duration::from_millis(300)).await);
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_lifts_a_quarantine() -> anyhow::Result<()> {
    let cluster = Cluster::start(1).await?;
    let identity = cluster.provision(1).await?;
    let id = identity.device_id.to_string();
    // What a gateway with clone_policy = "quarantine" writes.
    let mut admin = cluster.redis().await?;
    let _: () = admin
        .set_ex(
            trellis_core::redis_conn::keys::quarantine(&id),
            "clone",
            600,
        )
        .await?;
    assert!(
        refused_everywhere(&cluster, &identity).await,
        "a quarantined device got a session"
    );

    let mut kv = cluster.keyvault_client().await?;
    let lifted = kv
        .lift_quarantine(LiftQuarantineRequest {
            device_id: id.clone(),
        })
        .await?
        .into_inner();
    assert!(lifted.was_quarantined);
    let mut device = in_session(&cluster, &identity, 0).await?;
    assert!(!device.closed_within(Duration::from_millis(300)).await);
    let again = kv
        .lift_quarantine(LiftQuarantineRequest {
            device_id: id.clone(),
        })
        .await?
        .into_inner();
    assert!(!again.was_quarantined);
    let audit = cluster.audit(Some(&id)).await?;
    let outcomes: Vec<&str> = audit
        .iter()
        .filter(|r| r.action == "quarantine_lift")
        .map(|r| r.outcome.as_str())
        .collect();
    assert_eq!(outcomes, ["ok", "not_quarantined"]);
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_devices_key_is_reviewed_then_approved_or_rejected() -> anyhow::Result<()> {
    use trellis_proto::v1::{ApprovePendingRequest, ListPendingRequest, RejectPendingRequest};
    let cluster = Cluster::start(1).await?;
    let unknown = cluster.unregistered_identity()?;
    let stranger = cluster.unregistered_identity()?;
    let id = unknown.device_id.to_string();
    // Refused, and its key kept for review.
    assert!(refused_everywhere(&cluster, &unknown).await);
    assert!(refused_everywhere(&cluster, &stranger).await);
    let mut kv = cluster.keyvault_client().await?;
    let pending = kv
        .list_pending(ListPendingRequest { limit: 0 })
        .await?
        .into_inner()
        .devices;
    let entry = pending
        .iter()
        .find(|p| p.device_id == id)
        .unwrap_or_else(|| panic!("{id} not pending: {pending:?}"));
    assert_eq!(entry.attempts, 1);
    assert_eq!(entry.key_id.len(), 64);

    // A key id other than the one offered is refused, and nothing changes.
    let wrong = kv
        .approve_pending(ApprovePendingRequest {
            device_id: id.clone(),
            product_id: 1,
            organization: String::new(),
            key_id: "00".repeat(32),
        })
        .await
        .expect_err("a key id that was not offered");
    assert_eq!(wrong.code(), tonic::Code::FailedPrecondition);
    assert!(refused_everywhere(&cluster, &unknown).await);

    let device = kv
        .approve_pending(ApprovePendingRequest {
            device_id: id.clone(),
            product_id: 1,
            organization: String::new(),
            key_id: entry.key_id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(device.product_id, 1);
    let mut session = in_session(&cluster, &unknown, 0).await?;
    assert!(!session.closed_within(Duration::from_millis(300)).await);

    kv.reject_pending(RejectPendingRequest {
        device_id: stranger.device_id.to_string(),
    })
    .await?;
    let left = kv
        .list_pending(ListPendingRequest { limit: 0 })
        .await?
        .into_inner()
        .devices;
    assert!(
        left.is_empty(),
        "approved and rejected keys still pending: {left:?}"
    );
    let again = kv
        .reject_pending(RejectPendingRequest {
            device_id: stranger.device_id.to_string(),
        })
        .await
        .expect_err("nothing left to reject");
    assert_eq!(again.code(), tonic::Code::NotFound);
    let audit = cluster.audit(None).await?;
    for action in ["pending_approve", "pending_reject"] {
        assert!(
            audit.iter().any(|r| r.action == action),
            "no {action} record"
        );
    }
    cluster.stop().await;
    Ok(())
}

/// In another region: a gateway with its own Redis, sharing only the
/// durable store, closes its session as fast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_closes_a_session_in_another_region_within_5_s() -> anyhow::Result<()> {
    let cluster = Cluster::start(1).await?;
    let (gateway_b, _regional, _stop) = cluster.gateway_in_region("revocation-b").await?;
    let identity = cluster.provision(1).await?;
    let mut device = RawDevice::connect(gateway_b, &identity).await?;
    device.hello(identity.device_id, [7; 32]).await?;
    assert!(!device.closed_within(Duration::from_millis(700)).await);
    cluster
        .keyvault_client()
        .await?
        .revoke_device(RevokeDeviceRequest {
            device_id: identity.device_id.to_string(),
            reason: "stolen".into(),
        })
        .await?;
    assert!(
        device.closed_within(Duration::from_secs(5)).await,
        "the session in the other region is still open 5 s after the revocation"
    );
    cluster.stop().await;
    Ok(())
}

//! Key rotation end to end (docs/protocol.md §6.7, §6.8): real redis-server,
//! keyvault and two gateways on loopback, simulated devices with keys made
//! at test time, over real TCP sessions.
//!
//! - A live fleet of 20 devices through a cloud key rotation: every call
//!   keeps working, all 20 acknowledge the new version, a device that was
//!   offline comes back before retirement (old version, then told of the
//!   new one), retirement is refused while a recently seen device has not
//!   acknowledged, forced retirement refuses the old version, and the
//!   documented recovery (`keys unretire`) brings the last device back.
//! - Device key rotation: the device rotates over its session (routed to
//!   its gateway), reconnects under the new key, the old key is refused,
//!   and an offer with a bad signature is refused by keyvault.
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use trellis_device::identity::{DeviceIdentity, write_cloud_key, write_identity};
use trellis_device::sim::{DeviceReport, SimConfig, run_fleet};
use trellis_proto::v1::*;
use trellis_tests::{Cluster, RawDevice, eventually};

struct Fleet {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    reports: UnboundedReceiver<DeviceReport>,
}

impl Fleet {
    /// Devices with key rotation, their keys in `dir`, loaded from there
    /// (as `trellis sim --key-rotation --keys DIR` does).
    fn start(dir: &Path, ids: &[String], endpoint: &str) -> anyhow::Result<Fleet> {
        let identities: Vec<DeviceIdentity> =
            trellis_device::identity::load_fleet(dir, None, None)?
                .into_iter()
                .filter(|i| ids.contains(&i.device_id.to_string()))
                .collect();
        assert_eq!(identities.len(), ids.len());
        let config = SimConfig {
            product_id: 1,
            event_interval: None,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(800),
            key_rotation: true,
            keys_dir: Some(dir.to_path_buf()),
            ..SimConfig::default()
        };
        let stop = CancellationToken::new();
        let (tx, reports) = tokio::sync::mpsc::unbounded_channel();
        let task = run_fleet(
            identities,
            config,
            vec![endpoint.to_string()],
            stop.clone(),
            tx,
        );
        Ok(Fleet {
            stop,
            task,
            reports,
        })
    }

    /// Waits for `n` reports matching `pred`.
    async fn wait_for(
        &mut self,
        n: usize,
        what: &str,
        pred: impl Fn(&DeviceReport) -> bool,
    ) -> anyhow::Result<()> {
        let mut seen = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while seen < n {
            let r = tokio::time::timeout_at(deadline, self.reports.recv())
                .await
                .map_err(|_| anyhow::anyhow!("waited 60 s for {n} {what}, saw {seen}"))?
                .ok_or_else(|| anyhow::anyhow!("the fleet stopped"))?;
            if pred(&r) {
                seen += 1;
            }
        }
        Ok(())
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn status(cluster: &Cluster) -> anyhow::Result<CloudKeyStatusResponse> {
    Ok(cluster
        .keyvault_client()
        .await?
        .cloud_key_status(CloudKeyStatusRequest {})
        .await?
        .into_inner())
}

/// Devices holding `version` now, per `keys status`.
async fn holding(cluster: &Cluster, version: u32) -> u64 {
    status(cluster)
        .await
        .ok()
        .and_then(|s| s.versions.into_iter().find(|v| v.version == version))
        .map_or(0, |v| v.devices)
}

async fn wait_holding(cluster: &Cluster, version: u32, n: u64) -> anyhow::Result<()> {
    eventually(
        Duration::from_secs(60),
        &format!("{n} devices on cloud key version {version}"),
        || async move { (holding(cluster, version).await == n).then_some(()) },
    )
    .await
}

/// `add 2,3` on every device through the second gateway (routed to the
/// first, which holds the sessions).
async fn call_all(cluster: &Cluster, ids: &[String]) -> anyhow::Result<()> {
    let mut gw = cluster.gateway_client(1).await?;
    for id in ids {
        let r = gw
            .call_function(CallFunctionRequest {
                device_id: id.clone(),
                function: "add".into(),
                argument: "2,3".into(),
                timeout_ms: 0,
                signed_command: Vec::new(),
            })
            .await
            .map_err(|e| anyhow::anyhow!("call on {id}: {e}"))?
            .into_inner();
        assert_eq!(r.return_value, 5, "{id}");
    }
    Ok(())
}

async fn provision_into(cluster: &Cluster, dir: &Path) -> anyhow::Result<DeviceIdentity> {
    let identity = cluster.provision(1).await?;
    write_identity(dir, &identity)?;
    Ok(identity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_20_goes_through_a_cloud_key_rotation() -> anyhow::Result<()> {
    let cluster = Cluster::start(2).await?;
    let dir = tempfile::tempdir()?;
    write_cloud_key(dir.path(), &cluster.cloud_public_key)?;
    let mut fleet_ids = Vec::new();
    for _ in 0..20 {
        fleet_ids.push(
            provision_into(&cluster, dir.path())
                .await?
                .device_id
                .to_string(),
        );
    }
    // Two devices that are offline during the rotation: one comes back
    // before the old version is retired, one after.
    let early = provision_into(&cluster, dir.path()).await?;
    let late = provision_into(&cluster, dir.path()).await?;
    let early_id = early.device_id.to_string();
    let late_id = late.device_id.to_string();
    let gw1 = cluster.gateways[0].devices.to_string();
    let mut kv = cluster.keyvault_client().await?;

    // Both are seen once, holding version 1, then go offline.
    for (n, id) in [&early_id, &late_id].into_iter().enumerate() {
        let mut f = Fleet::start(dir.path(), std::slice::from_ref(id), &gw1)?;
        f.wait_for(1, "connect", |r| {
            matches!(r, DeviceReport::Connected { .. })
        })
        .await?;
        wait_holding(&cluster, 1, n as u64 + 1).await?;
        f.stop().await;
    }

    // The fleet: 20 devices in session, calls answered.
    let mut fleet = Fleet::start(dir.path(), &fleet_ids, &gw1)?;
    fleet
        .wait_for(20, "connects", |r| {
            matches!(r, DeviceReport::Connected { .. })
        })
        .await?;
    wait_holding(&cluster, 1, 22).await?;
    call_all(&cluster, &fleet_ids).await?;

    // Rotate: version 2 becomes the current one.
    let v2 = kv
        .rotate_cloud_key(RotateCloudKeyRequest {})
        .await?
        .into_inner();
    assert_eq!(v2.version, 2);
    assert!(v2.current);
    // Every device in session is told, over its live session, and stores it.
    fleet
        .wait_for(20, "stored announcements", |r| {
            matches!(r, DeviceReport::CloudKeyStored { version: 2, .. })
        })
        .await?;
    wait_holding(&cluster, 2, 20).await?;
    let s = status(&cluster).await?;
    let v1 = &s.versions[0];
    assert_eq!((v1.version, v1.devices, v1.legacy_devices), (1, 2, 0));
    assert_eq!(v1.retired_ms, 0);
    assert_eq!(s.retire_grace_days, 30);
    let acks = cluster
        .audit(None)
        .await?
        .into_iter()
        .filter(|r| r.action == "cloud_key_ack" && r.outcome == "ok")
        .count();
    assert_eq!(acks, 20, "each acknowledgement is audited");
    // Sessions opened under version 1 keep working.
    call_all(&cluster, &fleet_ids).await?;

    // Retiring version 1 is refused: two recently seen devices hold it.
    let refused = kv
        .retire_cloud_key(RetireCloudKeyRequest {
            version: 1,
            force: false,
        })
        .await
        .expect_err("devices still hold version 1");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("2 device(s)"),
        "{}",
        refused.message()
    );

    // The early one comes back before the retirement: its handshake under
    // version 1 works, and it is told of version 2.
    let mut back = Fleet::start(dir.path(), std::slice::from_ref(&early_id), &gw1)?;
    back.wait_for(1, "announcement", |r| {
        matches!(r, DeviceReport::CloudKeyStored { version: 2, .. })
    })
    .await?;
    back.stop().await;
    let early_sessions: Vec<String> = cluster
        .audit(Some(&early_id))
        .await?
        .into_iter()
        .filter(|r| r.action == "open_session" && r.outcome == "ok")
        .filter_map(|r| r.detail("cloud_key_version").map(str::to_owned))
        .collect();
    assert!(
        early_sessions.iter().all(|v| v == "1"),
        "{early_sessions:?}"
    );
    wait_holding(&cluster, 2, 21).await?;
    let refused = kv
        .retire_cloud_key(RetireCloudKeyRequest {
            version: 1,
            force: false,
        })
        .await
        .expect_err("the late device still holds version 1");
    assert!(
        refused.message().contains("1 device(s)"),
        "{}",
        refused.message()
    );
    assert!(
        refused.message().contains(&late_id),
        "{}",
        refused.message()
    );

    // Forced: version 1 is retired, and a handshake under it is refused.
    let retired = kv
        .retire_cloud_key(RetireCloudKeyRequest {
            version: 1,
            force: true,
        })
        .await?
        .into_inner();
    assert_ne!(retired.retired_ms, 0);
    assert!(
        RawDevice::connect(cluster.gateways[0].devices, &late)
            .await
            .is_err(),
        "a handshake under the retired version was answered"
    );
    let refusals = cluster.refusals(None).await?;
    assert!(
        refusals.iter().any(|r| r.reason == "bad_handshake"),
        "{refusals:?}"
    );
    // The late device itself: refused, again and again.
    let mut late_fleet = Fleet::start(dir.path(), std::slice::from_ref(&late_id), &gw1)?;
    late_fleet
        .wait_for(2, "refused handshakes", |r| {
            matches!(r, DeviceReport::HandshakeFailed { .. })
        })
        .await?;
    // The 20 are unaffected (in session, and their next handshake is under
    // version 2): a restart of the whole fleet connects under version 2.
    call_all(&cluster, &fleet_ids).await?;
    fleet.stop().await;
    for id in &fleet_ids {
        let v = std::fs::read_to_string(dir.path().join(format!("{id}.cloud.version")))?;
        assert_eq!(v.trim(), "2", "{id} saved the new key");
    }
    let mut fleet = Fleet::start(dir.path(), &fleet_ids, &gw1)?;
    fleet
        .wait_for(20, "reconnects", |r| {
            matches!(r, DeviceReport::Connected { .. })
        })
        .await?;
    call_all(&cluster, &fleet_ids).await?;

    // The documented recovery: unretire version 1; the late device gets
    // in, is told of version 2, and then version 1 retires without force.
    kv.unretire_cloud_key(UnretireCloudKeyRequest { version: 1 })
        .await?;
    late_fleet
        .wait_for(1, "announcement after recovery", |r| {
            matches!(r, DeviceReport::CloudKeyStored { version: 2, .. })
        })
        .await?;
    wait_holding(&cluster, 2, 22).await?;
    kv.retire_cloud_key(RetireCloudKeyRequest {
        version: 1,
        force: false,
    })
    .await?;
    // Every change to the versions is audited.
    let actions: Vec<String> = cluster
        .audit(None)
        .await?
        .into_iter()
        .map(|r| r.action)
        .filter(|a| a.starts_with("cloud_key_") && a != "cloud_key_ack")
        .collect();
    for want in [
        "cloud_key_rotate",
        "cloud_key_announcement",
        "cloud_key_retire",
        "cloud_key_unretire",
    ] {
        assert!(actions.iter().any(|a| a == want), "{want} in {actions:?}");
    }
    late_fleet.stop().await;
    fleet.stop().await;
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_rotates_its_key_and_the_old_one_is_refused() -> anyhow::Result<()> {
    let cluster = Cluster::start(2).await?;
    let dir = tempfile::tempdir()?;
    write_cloud_key(dir.path(), &cluster.cloud_public_key)?;
    let old = provision_into(&cluster, dir.path()).await?;
    let id = old.device_id.to_string();
    let gw1 = cluster.gateways[0].devices.to_string();
    let mut kv = cluster.keyvault_client().await?;
    let before = kv
        .get_device(GetDeviceRequest {
            device_id: id.clone(),
        })
        .await?
        .into_inner();
    assert!(before.next_key_id.is_empty());

    // An offer not signed by the registered key: keyvault refuses it.
    let stranger = trellis_device::identity::generate_device_key(&mut rand::rng())?;
    let new_key = trellis_device::identity::generate_device_key(&mut rand::rng())?;
    let der = rsa::pkcs8::EncodePublicKey::to_public_key_der(&new_key.to_public_key())?;
    let forged =
        trellis_wire::rotation::DeviceKeyOffer::sign(&stranger, old.device_id, der.as_bytes())?;
    let err = kv
        .register_next_device_key(RegisterNextDeviceKeyRequest {
            device_id: id.clone(),
            offer: forged.encode(),
            gateway_id: "test".into(),
        })
        .await
        .expect_err("a bad signature");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("signature"), "{}", err.message());
    assert!(
        kv.get_device(GetDeviceRequest {
            device_id: id.clone()
        })
        .await?
        .into_inner()
        .next_key_id
        .is_empty()
    );

    // In session on gateway 1; the rotation is asked through gateway 2.
    let mut fleet = Fleet::start(dir.path(), std::slice::from_ref(&id), &gw1)?;
    fleet
        .wait_for(1, "connect", |r| {
            matches!(r, DeviceReport::Connected { .. })
        })
        .await?;
    let gw2 = cluster.gateway_client(1).await?;
    let rotated = eventually(Duration::from_secs(20), "rotate-key answered", || {
        let mut gw2 = gw2.clone();
        let id = id.clone();
        async move {
            gw2.rotate_device_key(RotateDeviceKeyRequest {
                device_id: id,
                timeout_ms: 10_000,
            })
            .await
            .ok()
            .map(|r| r.into_inner())
        }
    })
    .await?;
    assert_eq!(rotated.gateway_id, "gw-2");
    fleet
        .wait_for(1, "commit", |r| {
            matches!(r, DeviceReport::DeviceKeyCommitted { .. })
        })
        .await?;
    let pending = kv
        .get_device(GetDeviceRequest {
            device_id: id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(pending.key_id, before.key_id, "not promoted before use");
    assert_eq!(pending.next_key_id, rotated.next_key_id);
    // Before promotion the old key still works (a device that crashed
    // before storing the new one).
    fleet.stop().await;
    let raw = RawDevice::connect(cluster.gateways[0].devices, &old).await?;
    drop(raw);

    // The device reconnects under the new key: promoted, audited.
    let mut fleet = Fleet::start(dir.path(), std::slice::from_ref(&id), &gw1)?;
    fleet
        .wait_for(1, "reconnect", |r| {
            matches!(r, DeviceReport::Connected { .. })
        })
        .await?;
    let after = kv
        .get_device(GetDeviceRequest {
            device_id: id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(after.key_id, rotated.next_key_id);
    assert!(after.next_key_id.is_empty());
    let audit = cluster.audit(Some(&id)).await?;
    assert!(
        audit
            .iter()
            .any(|r| r.action == "device_key_promote" && r.outcome == "ok"),
        "{audit:?}"
    );
    assert!(
        audit
            .iter()
            .any(|r| r.action == "device_key_offer" && r.outcome == "refused")
    );
    call_all(&cluster, std::slice::from_ref(&id)).await?;

    // The old key is refused from now on.
    assert!(
        RawDevice::connect(cluster.gateways[0].devices, &old)
            .await
            .is_err(),
        "the old key still opened a session"
    );
    let refusals = cluster.refusals(Some(&id)).await?;
    assert!(
        refusals.iter().any(|r| r.reason == "key_mismatch"),
        "{refusals:?}"
    );
    fleet.stop().await;
    cluster.stop().await;
    Ok(())
}

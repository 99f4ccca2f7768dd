//! The gateway's part in cloud key rotation (docs/protocol.md §6.7): it
//! learns the current cloud key version from keyvault, tells each device
//! with rotation support that holds an older one (a signed `ck`
//! announcement keyvault makes), and records what every device holds and
//! acknowledged, for `trellis keys status` and `trellis keys retire`.
use crate::Gateway;
use crate::local::SessionCommand;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;
use trellis_core::Shutdown;
use trellis_core::audit::{self, AuditRecord};
use trellis_core::redis_conn::keys;
use trellis_core::time::now_ms;

/// How often the gateway asks keyvault for the current cloud key version.
pub const WATCH_EVERY: Duration = Duration::from_secs(3);
/// Peers whose last cloud key version is remembered as a handshake hint.
const MAX_HINTS: usize = 65_536;

/// Signed `ck` payloads by (session's version, announced version).
type Announcements = HashMap<(u32, u32), Arc<Vec<u8>>>;

/// Current version, signed announcements, handshake hints.
#[derive(Debug, Default)]
pub struct CloudKeys {
    /// The newest live version keyvault reported (0: not known yet).
    current: AtomicU32,
    /// `ck` payloads by (session's version, announced version): the same
    /// bytes for every session opened under one version (PKCS#1 v1.5
    /// signatures are deterministic), so keyvault signs each once.
    announcements: Mutex<Announcements>,
    /// The version each peer address last made a handshake under: tried
    /// first next time (the device id is inside the ciphertext, so the
    /// address is all the gateway knows before keyvault decrypts).
    hints: Mutex<HashMap<IpAddr, u32>>,
}

impl CloudKeys {
    pub fn current(&self) -> u32 {
        self.current.load(Ordering::Relaxed)
    }

    /// Sets the current version; true when it changed.
    pub fn set_current(&self, version: u32) -> bool {
        self.current.swap(version, Ordering::Relaxed) != version
    }

    pub fn hint(&self, ip: IpAddr) -> u32 {
        self.hints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip)
            .copied()
            .unwrap_or(0)
    }

    pub fn remember(&self, ip: IpAddr, version: u32) {
        let mut hints = self.hints.lock().unwrap_or_else(|p| p.into_inner());
        if hints.len() >= MAX_HINTS && !hints.contains_key(&ip) {
            hints.clear();
        }
        hints.insert(ip, version);
    }

    /// The `ck` payload announcing the current version to a session opened
    /// under `signing_version` (cached), and the version it announces.
    pub async fn announcement(
        &self,
        gw: &Gateway,
        signing_version: u32,
    ) -> Result<(u32, Arc<Vec<u8>>), String> {
        let target = self.current();
        if let Some(p) = self
            .announcements
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(signing_version, target))
        {
            return Ok((target, p.clone()));
        }
        let mut keyvault = gw.keyvault.clone();
        let answer = keyvault
            .get_cloud_key_announcement(trellis_proto::v1::GetCloudKeyAnnouncementRequest {
                signing_version,
                version: target,
                gateway_id: gw.id.clone(),
            })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let payload = Arc::new(answer.payload);
        self.announcements
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((signing_version, answer.version), payload.clone());
        Ok((answer.version, payload))
    }
}

/// Asks keyvault for the current version every [`WATCH_EVERY`]; when it
/// changes, every local session checks whether its device needs telling.
pub async fn watch(gw: Arc<Gateway>, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        let mut keyvault = gw.keyvault.clone();
        let answer = keyvault
            .get_cloud_public_key(trellis_proto::v1::GetCloudPublicKeyRequest {})
            .instrument(tracing::debug_span!("gateway.cloud_key_watch"))
            .await;
        match answer {
            Ok(key) => {
                let version = key.into_inner().version;
                let before = gw.cloud_keys.current();
                if gw.cloud_keys.set_current(version) {
                    tracing::info!(gateway = %gw.id, version, before, "current cloud key version");
                    if before != 0 {
                        gw.local.broadcast(|| SessionCommand::CloudKeyChanged);
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e.message(), "cannot ask keyvault for the current cloud key")
            }
        }
    }
}

/// Records what a device holds: in its state (`cloud_key_version`,
/// `cloud_key_rotation`) and in the durable holdings keyvault counts.
pub async fn record_holding(gw: &Gateway, device_id: &str, held: u32, rotation: bool) {
    let mut redis = gw.redis.clone();
    let state: redis::RedisResult<()> = redis::cmd("HSET")
        .arg(keys::device_state(device_id))
        .arg("cloud_key_version")
        .arg(held)
        .arg("cloud_key_rotation")
        .arg(u8::from(rotation))
        .query_async(&mut redis)
        .await;
    if let Err(e) = state {
        tracing::warn!(device = %device_id, error = %e, "cannot record the cloud key version in the device state");
    }
    record_durable_holding(gw, device_id, held, rotation).await;
}

/// The durable half of [`record_holding`] (`keys::CLOUD_KEY_DEVICES`, what
/// `keys status` and `keys retire` count). At Hello the device state half
/// rides with the Hello's own write (`device_state::record_hello`).
pub async fn record_durable_holding(gw: &Gateway, device_id: &str, held: u32, rotation: bool) {
    let mut durable = gw.durable.clone();
    let value = format!("{held}|{}|{}", now_ms(), u8::from(rotation));
    let mut cmd = redis::cmd("HSET");
    cmd.arg(keys::CLOUD_KEY_DEVICES).arg(device_id).arg(value);
    let write = cmd.query_async::<()>(&mut durable);
    match tokio::time::timeout(crate::home::DURABLE_WRITE_BUDGET, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(device = %device_id, error = %e, "cannot record the device's cloud key version")
        }
        Err(_) => tracing::warn!(device = %device_id, "recording the cloud key version timed out"),
    }
}

/// Audits an acknowledgement or refusal of an announcement.
pub async fn audit(gw: &Gateway, device_id: &str, version: u32, outcome: &str, reason: &str) {
    let mut record = AuditRecord::new(&gw.id, "cloud_key_ack", device_id, outcome)
        .with("version", version.to_string());
    if !reason.is_empty() {
        record = record.with("reason", reason.to_string());
    }
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
}

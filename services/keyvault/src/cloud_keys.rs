//! Cloud key versions (docs/protocol.md §6.7): the cloud key's
//! [`Family`]. Version 1 is the cloud key made at first start, sealed at
//! `keys::CLOUD_KEY` as it always was; `trellis keys rotate cloud` makes
//! version N+1 at `keys::cloud_key_record(N+1)`, recorded in
//! `keys::CLOUD_KEY_VERSIONS`. Every live version opens handshakes; the
//! current one is what gateways announce to devices. What is particular to
//! the cloud key is here: which devices hold which version, and the
//! retirement check that counts them.
use crate::backend::{BackendError, OpensslBackend, PrivateOps};
use crate::cloud_key::{CloudKey, cloud_slot};
use crate::error::{KeyvaultError, Result};
use crate::keyring::{self, Family};
use redis::AsyncCommands;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use trellis_core::redis_conn::{Redis, keys};
use trellis_core::time::now_ms;

pub use crate::keyring::{RELOAD_EVERY, VersionMeta};

/// The cloud key: every version does raw RSA for handshakes.
pub static CLOUD: Family<dyn PrivateOps> = Family {
    name: "cloud",
    what: "cloud key",
    versions_key: keys::CLOUD_KEY_VERSIONS,
    slot: cloud_slot,
    open: open_ops,
};

fn open_ops(key: &CloudKey) -> std::result::Result<Arc<dyn PrivateOps>, BackendError> {
    Ok(Arc::new(OpensslBackend::from_pkcs8_der(
        key.private_pkcs8_der(),
    )?))
}

/// One cloud key version, opened.
pub type RingKey = keyring::RingKey<dyn PrivateOps>;
/// Every cloud key version this keyvault holds.
pub type Keyring = keyring::Keyring<dyn PrivateOps>;
/// The cloud keyring, shared by the service and its reloader.
pub type SharedKeyring = keyring::SharedKeyring<dyn PrivateOps>;

/// Opens every cloud key version (making version 1 on a first start).
pub async fn load(
    redis: &mut Redis,
    master: &crate::MasterKey,
    previous: Option<&Keyring>,
) -> Result<Keyring> {
    keyring::load(&CLOUD, redis, master, previous).await
}

/// `trellis keys rotate cloud`. Audited.
pub async fn rotate(redis: &mut Redis, shared: &SharedKeyring, actor: &str) -> Result<VersionMeta> {
    keyring::rotate(redis, shared, actor).await
}

/// One device as the gateways recorded it (`keys::CLOUD_KEY_DEVICES`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceHolding {
    pub device_id: String,
    pub held: u32,
    pub seen_ms: i64,
    pub rotation: bool,
}

/// `held|seen_ms|rotation`, as the gateway writes it.
pub fn parse_holding(device_id: &str, value: &str) -> Option<DeviceHolding> {
    let mut parts = value.split('|');
    let held = parts.next()?.parse().ok()?;
    let seen_ms = parts.next()?.parse().ok()?;
    let rotation = parts.next()? == "1";
    Some(DeviceHolding {
        device_id: device_id.to_string(),
        held,
        seen_ms,
        rotation,
    })
}

/// Every registered device's holding (unregistered ids are skipped).
pub async fn holdings(redis: &mut Redis) -> Result<Vec<DeviceHolding>> {
    let raw: HashMap<String, String> = redis.hgetall(keys::CLOUD_KEY_DEVICES).await?;
    let registered: HashSet<String> = redis.smembers(keys::DEVICE_INDEX).await?;
    let mut out: Vec<DeviceHolding> = raw
        .iter()
        .filter(|(id, _)| registered.contains(*id))
        .filter_map(|(id, v)| parse_holding(id, v))
        .collect();
    out.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    Ok(out)
}

/// Counts per version for `keys status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub devices: u64,
    pub legacy: u64,
    pub recent: u64,
}

pub fn count(holdings: &[DeviceHolding], grace_days: u32, now_ms: i64) -> BTreeMap<u32, Counts> {
    let since = now_ms - i64::from(grace_days) * 86_400_000;
    let mut out: BTreeMap<u32, Counts> = BTreeMap::new();
    for h in holdings {
        let c = out.entry(h.held).or_default();
        c.devices += 1;
        if !h.rotation {
            c.legacy += 1;
        }
        if h.seen_ms >= since {
            c.recent += 1;
        }
    }
    out
}

/// `trellis keys retire cloud N [--force]`. Audited.
pub async fn retire(
    redis: &mut Redis,
    shared: &SharedKeyring,
    version: u32,
    force: bool,
    grace_days: u32,
    actor: &str,
) -> Result<VersionMeta> {
    let key = match keyring::retirable(redis, shared, version).await? {
        Ok(key) => key,
        Err(already) => return Ok(already),
    };
    let since = now_ms() - i64::from(grace_days) * 86_400_000;
    let blockers: Vec<DeviceHolding> = holdings(redis)
        .await?
        .into_iter()
        .filter(|h| h.held <= version && h.seen_ms >= since)
        .collect();
    if !blockers.is_empty() && !force {
        let some: Vec<&str> = blockers
            .iter()
            .take(5)
            .map(|h| h.device_id.as_str())
            .collect();
        return Err(KeyvaultError::FailedPrecondition(format!(
            "{} device(s) seen in the last {grace_days} days (keys.retire_grace_days) still hold cloud key version {version} or older and have not acknowledged a newer one (e.g. {}); their handshakes would be refused. Wait until they connect and acknowledge (`trellis keys status`), or retire with --force",
            blockers.len(),
            some.join(", ")
        )));
    }
    keyring::set_retired(
        redis,
        shared,
        &key,
        true,
        actor,
        &[
            ("forced", force.to_string()),
            ("unacknowledged_recent", blockers.len().to_string()),
        ],
    )
    .await
}

/// `trellis keys unretire cloud N`: the documented recovery for devices
/// that missed a rotation and came back after the retirement. Audited.
pub async fn unretire(
    redis: &mut Redis,
    shared: &SharedKeyring,
    version: u32,
    actor: &str,
) -> Result<VersionMeta> {
    keyring::unretire(redis, shared, version, actor).await
}

/// DigestInfo of SHA-256 (RFC 8017 §9.2 note 1): with the raw PKCS#1 v1.5
/// type-1 operation over `prefix || SHA-256(m)`, the result is exactly the
/// standard PKCS#1 v1.5 SHA-256 signature of `m`.
const SHA256_DIGEST_INFO: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

/// What the raw private operation signs for a PKCS#1 v1.5 SHA-256
/// signature of `message`.
pub fn pkcs1_sha256_input(message: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut out = SHA256_DIGEST_INFO.to_vec();
    out.extend_from_slice(&sha2::Sha256::digest(message));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holdings_parse_and_count() {
        let now = 100 * 86_400_000;
        let h = [
            parse_holding("a", &format!("1|{now}|0")).unwrap(),
            parse_holding("b", &format!("1|{}|1", now - 40 * 86_400_000)).unwrap(),
            parse_holding("c", &format!("2|{now}|1")).unwrap(),
        ];
        assert!(parse_holding("d", "x|1|1").is_none());
        let c = count(&h, 30, now);
        assert_eq!(
            c[&1],
            Counts {
                devices: 2,
                legacy: 1,
                recent: 1
            }
        );
        assert_eq!(c[&2].devices, 1);
    }

    #[test]
    fn the_digest_info_prefix_makes_the_standard_signature() {
        use rsa::pkcs8::DecodePrivateKey;
        let der = crate::backend::generate_pkcs8_der(2048).unwrap();
        let ossl = OpensslBackend::from_pkcs8_der(&der).unwrap();
        let private = rsa::PrivateKey::from_pkcs8_der(&der).unwrap();
        let msg = b"announce";
        let ours = ossl.sign_raw(&pkcs1_sha256_input(msg)).unwrap();
        let reference = private.pkcs1v15_sign::<sha2::Sha256>(msg).unwrap();
        assert_eq!(ours, reference);
    }
}

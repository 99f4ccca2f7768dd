//! The keys a device with key rotation keeps and changes over its life
//! (docs/protocol.md §6.7, §6.8): the cloud public key and its version, and
//! its own private key. With a directory they are saved in the identity
//! files and survive a restart:
//!
//! - `<id>.cloud.pub.pem` and `<id>.cloud.version`: the cloud key this
//!   device holds, once it has stored an announced one (until then the
//!   fleet's `cloud.pub.pem`, version 1);
//! - `<id>.pem`: the device key, replaced when a rotation is committed.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rsa::pkcs8::{DecodePublicKey, EncodePublicKey, LineEnding};
use rsa::{PrivateKey as RsaPrivateKey, PublicKey as RsaPublicKey};
use sha2::{Digest, Sha256};
use trellis_wire::DeviceId;
use trellis_wire::rotation::{CloudKeyAnnouncement, DeviceKeyOffer};

use crate::identity::{DeviceIdentity, IdentityError, write_identity};

/// One device's changing keys.
pub struct DeviceKeys {
    pub device_id: DeviceId,
    pub cloud_public_key: RsaPublicKey,
    pub cloud_key_version: u32,
    pub private_key: RsaPrivateKey,
    /// A new key made for a rotation, not yet committed (`nk`).
    pub pending_key: Option<RsaPrivateKey>,
    /// Where the files live (`None`: in memory only).
    pub dir: Option<PathBuf>,
}

impl std::fmt::Debug for DeviceKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKeys")
            .field("device_id", &self.device_id)
            .field("cloud_key_version", &self.cloud_key_version)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Shared by a device's sessions (a rotation in one is used by the next).
pub type SharedKeys = Arc<Mutex<DeviceKeys>>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl DeviceKeys {
    /// The identity's keys, with the cloud key this device stored earlier
    /// in `dir` if any (else the identity's, as version 1).
    pub fn load(identity: &DeviceIdentity, dir: Option<&Path>) -> Result<Self, IdentityError> {
        let mut keys = DeviceKeys {
            device_id: identity.device_id,
            cloud_public_key: identity.cloud_public_key.clone(),
            cloud_key_version: 1,
            private_key: identity.private_key.clone(),
            pending_key: None,
            dir: dir.map(Path::to_path_buf),
        };
        if let Some(dir) = dir {
            let pem_path = dir.join(format!("{}.cloud.pub.pem", identity.device_id));
            let version_path = dir.join(format!("{}.cloud.version", identity.device_id));
            if pem_path.exists() {
                let pem = fs::read_to_string(&pem_path).map_err(io(&pem_path))?;
                keys.cloud_public_key = RsaPublicKey::from_public_key_pem(&pem).map_err(|e| {
                    IdentityError::PublicKey {
                        path: pem_path.clone(),
                        message: e.to_string(),
                    }
                })?;
                let text = fs::read_to_string(&version_path).map_err(io(&version_path))?;
                keys.cloud_key_version =
                    text.trim().parse().map_err(|e: std::num::ParseIntError| {
                        IdentityError::PublicKey {
                            path: version_path.clone(),
                            message: format!("not a cloud key version: {e}"),
                        }
                    })?;
            }
        }
        Ok(keys)
    }

    pub fn shared(self) -> SharedKeys {
        Arc::new(Mutex::new(self))
    }

    /// Checks an announcement (`ck` payload) with the key the session was
    /// opened under, and stores the announced key. The reason of a refusal
    /// is what the device answers with 4.03.
    pub fn accept_announcement(
        &mut self,
        session_cloud_key: &RsaPublicKey,
        payload: &[u8],
    ) -> Result<u32, String> {
        let announcement = CloudKeyAnnouncement::parse(payload).map_err(|e| e.to_string())?;
        let key = announcement
            .verify(session_cloud_key)
            .map_err(|e| e.to_string())?;
        if announcement.version <= self.cloud_key_version {
            return Err(format!(
                "version {} is not newer than the held version {}",
                announcement.version, self.cloud_key_version
            ));
        }
        self.save_cloud_key(&key, announcement.version)
            .map_err(|e| format!("cannot store the key: {e}"))?;
        self.cloud_public_key = key;
        self.cloud_key_version = announcement.version;
        Ok(announcement.version)
    }

    fn save_cloud_key(&self, key: &RsaPublicKey, version: u32) -> Result<(), IdentityError> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let pem = key
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| IdentityError::Encode(e.to_string()))?;
        let pem_path = dir.join(format!("{}.cloud.pub.pem", self.device_id));
        let version_path = dir.join(format!("{}.cloud.version", self.device_id));
        // The version file last: a crash in between leaves the new key
        // with the old version, which the next announcement repairs.
        fs::write(&pem_path, pem).map_err(io(&pem_path))?;
        fs::write(&version_path, format!("{version}\n")).map_err(io(&version_path))
    }

    /// `dk`: makes a new RSA-1024 key, kept pending, and the offer (signed
    /// by the current key) to answer with.
    pub fn start_rotation(&mut self) -> Result<Vec<u8>, String> {
        let new =
            crate::identity::generate_device_key(&mut rand::rng()).map_err(|e| e.to_string())?;
        let der = new
            .to_public_key()
            .to_public_key_der()
            .map_err(|e| e.to_string())?;
        let offer = DeviceKeyOffer::sign(&self.private_key, self.device_id, der.as_bytes())
            .map_err(|e| e.to_string())?;
        self.pending_key = Some(new);
        Ok(offer.encode())
    }

    /// `nk`: the cloud registered the pending key whose DER has this
    /// SHA-256; it becomes the device key (saved) for the next handshake.
    pub fn commit_rotation(&mut self, key_sha256: &[u8]) -> Result<(), String> {
        let Some(pending) = &self.pending_key else {
            return Err("no key rotation in progress".into());
        };
        let der = pending
            .to_public_key()
            .to_public_key_der()
            .map_err(|e| e.to_string())?;
        if Sha256::digest(der.as_bytes()).as_slice() != key_sha256 {
            return Err("not the key this device offered".into());
        }
        let new = pending.clone();
        if let Some(dir) = &self.dir {
            write_identity(
                dir,
                &DeviceIdentity {
                    device_id: self.device_id,
                    private_key: new.clone(),
                    cloud_public_key: self.cloud_public_key.clone(),
                },
            )
            .map_err(|e| format!("cannot store the key: {e}"))?;
        }
        self.private_key = new;
        self.pending_key = None;
        Ok(())
    }
}

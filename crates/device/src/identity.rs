//! A device's keys on disk, in the layout the simulator and provisioning
//! tools share: `<id>.pem` (PKCS#8, mode 0600), `<id>.pub.pem` (SPKI), the
//! cloud's `cloud.pub.pem`, and optionally `policy.json`, the firmware trust
//! policy every device in the directory is provisioned with:
//!
//! ```json
//! {
//!   "threshold": 2,
//!   "keys": [
//!     { "name": "customer", "key_id": "<hex SHA-256 of the key's SPKI DER>",
//!       "public_key": "-----BEGIN PUBLIC KEY-----\n...\n-----END PUBLIC KEY-----\n" },
//!     { "name": "cloud-release", "public_key": "-----BEGIN PUBLIC KEY-----\n..." }
//!   ]
//! }
//! ```
//!
//! `threshold` is how many of the listed keys must have signed a release
//! (here both: the customer's offline key AND the cloud release key); keys
//! are RSA of at least 2048 bits; `key_id` is optional and checked when
//! given. Without `policy.json` a device refuses every firmware update.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rand::CryptoRng;
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
// rsa 0.10 deprecates the `Rsa*` aliases; they name these same types.
use rsa::{PrivateKey as RsaPrivateKey, PublicKey as RsaPublicKey};
use trellis_firmware::TrustPolicy;
use trellis_wire::DeviceId;

/// File name of the cloud public key inside a fleet directory.
pub const CLOUD_KEY_FILE: &str = "cloud.pub.pem";
/// File name of the firmware trust policy inside a fleet directory.
pub const POLICY_FILE: &str = "policy.json";

/// Everything a device needs to connect.
#[derive(Clone)]
pub struct DeviceIdentity {
    pub device_id: DeviceId,
    pub private_key: RsaPrivateKey,
    pub cloud_public_key: RsaPublicKey,
}

impl std::fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a PKCS#8 or PKCS#1 PEM private key: {message}")]
    PrivateKey { path: PathBuf, message: String },
    #[error("{path}: not a PEM public key (BEGIN PUBLIC KEY): {message}")]
    PublicKey { path: PathBuf, message: String },
    #[error("encoding a key as PEM failed: {0}")]
    Encode(String),
    #[error("generating an RSA key failed: {0}")]
    Generate(String),
    #[error("{path}: not a valid firmware trust policy: {message}")]
    Policy { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A factory-style device key: RSA-1024, e = 65537.
pub fn generate_device_key<R: CryptoRng + ?Sized>(
    rng: &mut R,
) -> Result<RsaPrivateKey, IdentityError> {
    RsaPrivateKey::new(rng, 1024).map_err(|e| IdentityError::Generate(e.to_string()))
}

/// Writes `<id>.pem` (owner-only) and `<id>.pub.pem`.
pub fn write_identity(dir: &Path, identity: &DeviceIdentity) -> Result<(), IdentityError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let id = identity.device_id.to_string();
    let pem = identity
        .private_key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| IdentityError::Encode(e.to_string()))?;
    let path = dir.join(format!("{id}.pem"));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(io(&path))?;
    f.write_all(pem.as_bytes()).map_err(io(&path))?;
    let public = identity
        .private_key
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| IdentityError::Encode(e.to_string()))?;
    let path = dir.join(format!("{id}.pub.pem"));
    fs::write(&path, public).map_err(io(&path))
}

/// Writes `cloud.pub.pem`.
pub fn write_cloud_key(dir: &Path, key: &RsaPublicKey) -> Result<(), IdentityError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let pem = key
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| IdentityError::Encode(e.to_string()))?;
    let path = dir.join(CLOUD_KEY_FILE);
    fs::write(&path, pem).map_err(io(&path))
}

fn read_public(path: &Path) -> Result<RsaPublicKey, IdentityError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    RsaPublicKey::from_public_key_pem(&text).map_err(|e| IdentityError::PublicKey {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn read_private(path: &Path) -> Result<RsaPrivateKey, IdentityError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    RsaPrivateKey::from_pkcs8_pem(&text)
        .or_else(|e| RsaPrivateKey::from_pkcs1_pem(&text).map_err(|_| e))
        .map_err(|e| IdentityError::PrivateKey {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// Loads every `<24 hex>.pem` in `dir`, sorted by id, at most `limit` of
/// them, with the cloud key from `cloud_key_override` or `dir/cloud.pub.pem`.
pub fn load_fleet(
    dir: &Path,
    limit: Option<usize>,
    cloud_key_override: Option<&Path>,
) -> Result<Vec<DeviceIdentity>, IdentityError> {
    let cloud_path = cloud_key_override.map_or_else(|| dir.join(CLOUD_KEY_FILE), Path::to_path_buf);
    let cloud = read_public(&cloud_path)?;
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".pem")) else {
            continue;
        };
        if let Ok(id) = stem.parse::<DeviceId>() {
            // Only canonical lowercase names, so `<ID>.pem` and `<id>.pem`
            // cannot both load as the same device.
            if id.to_string() == stem {
                ids.push(id);
            }
        }
    }
    ids.sort();
    ids.truncate(limit.unwrap_or(usize::MAX));
    ids.into_iter()
        .map(|device_id| {
            let private_key = read_private(&dir.join(format!("{device_id}.pem")))?;
            Ok(DeviceIdentity {
                device_id,
                private_key,
                cloud_public_key: cloud.clone(),
            })
        })
        .collect()
}

/// Reads `dir/policy.json` if it exists (`None` if it does not: such
/// devices refuse every update); a file that is there but invalid is an
/// error, never silently "no policy".
pub fn load_trust_policy(dir: &Path) -> Result<Option<TrustPolicy>, IdentityError> {
    let path = dir.join(POLICY_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    TrustPolicy::from_json(&text)
        .map(Some)
        .map_err(|e| IdentityError::Policy {
            path: path.clone(),
            message: e.to_string(),
        })
}

/// Writes `dir/policy.json`.
pub fn write_trust_policy(dir: &Path, policy: &TrustPolicy) -> Result<(), IdentityError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(POLICY_FILE);
    let json = policy.to_json().map_err(|e| IdentityError::Policy {
        path: path.clone(),
        message: e.to_string(),
    })?;
    fs::write(&path, json).map_err(io(&path))
}

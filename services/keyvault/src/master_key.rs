//! The master key: the one secret keyvault does not keep in Redis. Every
//! other secret (today the cloud private key) is sealed under it, as in
//! Vault's barrier, so a copy of Redis alone reveals nothing.
//!
//! It comes from `keyvault.master_key` (64 hex characters) or, preferably,
//! `keyvault.master_key_file` (a file holding them). Without either keyvault
//! refuses to start and says how to make one. `trellis up` (development mode
//! only) uses [`ensure_dev_master_key`] to make one in its data directory.
use std::io::Write;
use std::path::{Path, PathBuf};
use trellis_core::config::KeyvaultConfig;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

pub const MASTER_KEY_LEN: usize = 32;

/// 32 secret bytes, wiped when dropped; `Debug` never shows them.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey([u8; MASTER_KEY_LEN]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    #[error(
        "no master key configured: keyvault seals the cloud private key under a 32-byte master key. \
         Make one with `openssl rand -hex 32 > master.key && chmod 600 master.key` and set \
         TRELLIS_KEYVAULT__MASTER_KEY_FILE=/path/to/master.key (or keyvault.master_key_file in trellis.toml)"
    )]
    Missing,
    #[error(
        "both keyvault.master_key and keyvault.master_key_file are set; set only one \
         (prefer master_key_file)"
    )]
    Ambiguous,
    #[error("cannot read the master key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the master key file {path} can be read by group or others (mode {mode:04o}); \
         a master key must be private to keyvault's user: run `chmod 600 {path}`"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error(
        "the master key {origin} is not 64 hex characters ({problem}); make one with `openssl rand -hex 32`"
    )]
    Malformed { origin: String, problem: String },
    #[error("cannot create the development master key {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl MasterKey {
    pub fn from_bytes(bytes: [u8; MASTER_KEY_LEN]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; MASTER_KEY_LEN] {
        &self.0
    }

    /// Parses 64 hex characters (surrounding whitespace ignored).
    pub fn from_hex(text: &str, origin: &str) -> Result<Self, MasterKeyError> {
        let text = text.trim();
        let malformed = |problem: String| MasterKeyError::Malformed {
            origin: origin.to_string(),
            problem,
        };
        if text.len() != 2 * MASTER_KEY_LEN {
            return Err(malformed(format!("found {} characters", text.len())));
        }
        let mut out = [0u8; MASTER_KEY_LEN];
        if hex::decode_to_slice(text, &mut out).is_err() {
            out.zeroize();
            return Err(malformed("not hexadecimal".into()));
        }
        Ok(Self(out))
    }

    /// The key named by the configuration; [`MasterKeyError::Missing`] says
    /// how to make one.
    pub fn from_config(config: &KeyvaultConfig) -> Result<Self, MasterKeyError> {
        match (&config.master_key, &config.master_key_file) {
            (Some(_), Some(_)) => Err(MasterKeyError::Ambiguous),
            (Some(hex), None) => Self::from_hex(hex, "in keyvault.master_key"),
            (None, Some(path)) => {
                refuse_if_exposed(path)?;
                let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
                    MasterKeyError::Read {
                        path: path.clone(),
                        source,
                    }
                })?);
                Self::from_hex(&text, &format!("in {}", path.display()))
            }
            (None, None) => Err(MasterKeyError::Missing),
        }
    }
}

/// Refuses a key file that others may read, as ssh does with a private key:
/// such a key may already have been copied. Group read is refused too when
/// the file is ours (we could have made it 0600); it is accepted when
/// another user owns the file and we read it through its group, which is
/// how a Kubernetes Secret volume (root-owned, `fsGroup`, mode 0440) gives
/// a non-root keyvault its key.
fn refuse_if_exposed(path: &Path) -> Result<(), MasterKeyError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(path).map_err(|source| MasterKeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o7777;
        // /proc/self belongs to the process's effective user.
        let ours = std::fs::metadata("/proc/self").map_or(true, |me| me.uid() == meta.uid());
        let exposed = if ours { 0o077 } else { 0o007 };
        if mode & exposed != 0 {
            return Err(MasterKeyError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    Ok(())
}

/// Development mode only (`trellis up`): makes `<data_dir>/master.key`
/// (64 hex characters, mode 0600) if it does not exist, and returns its path
/// for `keyvault.master_key_file`. An existing file is left as it is (it is
/// what opens the cloud key already in the local Redis).
pub fn ensure_dev_master_key(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let path = data_dir.join("master.key");
    if path.exists() {
        return Ok(path);
    }
    let create = |source| MasterKeyError::Create {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(data_dir).map_err(create)?;
    let mut bytes = Zeroizing::new([0u8; MASTER_KEY_LEN]);
    crate::os_random(bytes.as_mut()).map_err(|e| create(std::io::Error::other(e.to_string())))?;
    let text = Zeroizing::new(format!("{}\n", hex::encode(bytes.as_ref())));

    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(&path) {
        Ok(mut file) => {
            file.write_all(text.as_bytes()).map_err(create)?;
            file.sync_all().map_err(create)?;
            tracing::warn!(
                path = %path.display(),
                "created a development master key; production deployments must provide their own"
            );
            Ok(path)
        }
        // Another process made it between our check and our open: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(path),
        Err(e) => Err(create(e).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex_and_rejects_bad_input() {
        let key = MasterKey::from_hex(&"ab".repeat(32), "test").unwrap();
        assert_eq!(key.as_bytes(), &[0xab; 32]);
        assert!(format!("{key:?}").contains(".."));
        let err = MasterKey::from_hex("abcd", "test").unwrap_err().to_string();
        assert!(err.contains("64 hex"), "{err}");
        let err = MasterKey::from_hex(&"zz".repeat(32), "test")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not hexadecimal"), "{err}");
    }

    #[test]
    fn a_key_file_others_can_read_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        std::fs::write(&path, "ab".repeat(32)).unwrap();
        let config = KeyvaultConfig {
            master_key_file: Some(path.clone()),
            ..KeyvaultConfig::default()
        };
        for mode in [0o644, 0o640, 0o604] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = MasterKey::from_config(&config).unwrap_err().to_string();
            assert!(err.contains("chmod 600"), "{mode:o}: {err}");
            assert!(err.contains(&format!("{mode:04o}")), "{mode:o}: {err}");
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let key = MasterKey::from_config(&config).unwrap();
            assert_eq!(key.as_bytes(), &[0xab; 32]);
        }
    }

    #[test]
    fn missing_key_says_how_to_make_one() {
        let err = MasterKey::from_config(&KeyvaultConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("openssl rand -hex 32"), "{err}");
        assert!(err.contains("TRELLIS_KEYVAULT__MASTER_KEY_FILE"), "{err}");
    }

    #[test]
    fn dev_master_key_is_made_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = ensure_dev_master_key(dir.path()).unwrap();
        let first = std::fs::read_to_string(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(ensure_dev_master_key(dir.path()).unwrap(), path);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), first);
        let config = KeyvaultConfig {
            master_key_file: Some(path),
            ..KeyvaultConfig::default()
        };
        MasterKey::from_config(&config).unwrap();
    }
}

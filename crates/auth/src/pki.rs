//! The installation's certificate authority, for deployments without
//! cert-manager: `trellis certs init|issue` and `trellis up` (a
//! development CA on first start). Certificates carry their role as a URI
//! SAN ([`trellis_core::tls::ROLE_URI_PREFIX`]); [`role_of`] reads it back
//! from a peer's certificate.
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};
use trellis_core::tls::{Role, files_in};

/// How long `trellis certs init` makes the CA valid.
pub const CA_DAYS: u32 = 3650;
/// How long a role certificate is valid unless `--days` says otherwise.
pub const CERT_DAYS: u32 = 397;
/// `trellis up` re-issues a certificate with less than this left.
pub const RENEW_DAYS: u32 = 30;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A certificate and its private key, both PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    // A day of slack for clocks behind ours.
    let (y, m, d) = civil_date(now - 86_400);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = civil_date(now + i64::from(days) * 86_400);
    params.not_after = rcgen::date_time_ymd(y, m, d);
}

/// The UTC (year, month, day) `unix_secs` falls in.
fn civil_date(unix_secs: i64) -> (i32, u8, u8) {
    // Howard Hinnant's days-to-civil.
    let z = unix_secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

/// A new CA.
pub fn new_ca(common_name: &str, days: u32) -> Result<Issued, PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, days);
    let cert = params.self_signed(&key)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The names every development certificate carries, so that clients on
/// this machine and in a cluster (service `trellis-<role>`) can reach it.
pub fn default_names(role: Role) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
        role.name().to_string(),
        format!("trellis-{}", role.name()),
    ];
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() && !names.iter().any(|n| n == host) {
            names.push(host.to_string());
        }
    }
    names
}

/// A certificate for `role`, valid for `names` (DNS names or IP
/// addresses), signed by the CA.
pub fn issue(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    role: Role,
    names: &[String],
    days: u32,
) -> Result<Issued, PkiError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("trellis-{}", role.name()));
    params
        .subject_alt_names
        .push(SanType::URI(role.uri().try_into()?));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, days);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The role a peer certificate (DER) names, if it names exactly one.
pub fn role_of(der: &[u8]) -> Option<Role> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let sans = cert.subject_alternative_name().ok()??;
    let mut roles = sans
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => uri
                .strip_prefix(trellis_core::tls::ROLE_URI_PREFIX)
                .and_then(Role::parse),
            _ => None,
        });
    let role = roles.next()?;
    roles.next().is_none().then_some(role)
}

/// Days until the certificate in `pem` expires (negative: expired).
pub fn days_left(pem: &str) -> Result<i64, PkiError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| PkiError::Invalid(format!("not a PEM certificate: {e}")))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| PkiError::Invalid(format!("not an X.509 certificate: {e}")))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok((cert.validity().not_after.timestamp() - now).div_euclid(86_400))
}

/// Writes `contents` to `path`, readable by the owner only when `private`.
pub fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    // Write then rename: a reader never sees half a key.
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io(&tmp))?;
    file.write_all(contents.as_bytes()).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Creates a CA in `dir` (`ca.crt`, `ca.key`) unless one is there.
/// Returns whether it made one.
pub fn ensure_ca(dir: &Path) -> Result<bool, PkiError> {
    let ca = trellis_core::tls::ca_in(dir);
    if ca.exists() {
        return Ok(false);
    }
    let issued = new_ca("Trellis development CA", CA_DAYS)?;
    write_file(&dir.join("ca.key"), &issued.key_pem, true)?;
    write_file(&ca, &issued.cert_pem, false)?;
    Ok(true)
}

/// Issues `role`'s certificate with the CA in `ca_dir` into `out_dir`.
pub fn issue_into(
    ca_dir: &Path,
    out_dir: &Path,
    role: Role,
    names: &[String],
    days: u32,
) -> Result<(), PkiError> {
    let ca_cert_path = trellis_core::tls::ca_in(ca_dir);
    let ca_key_path = ca_dir.join("ca.key");
    let ca_cert = std::fs::read_to_string(&ca_cert_path).map_err(io(&ca_cert_path))?;
    let ca_key = std::fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
    let issued = issue(&ca_cert, &ca_key, role, names, days)?;
    let files = files_in(out_dir, role);
    write_file(&files.key, &issued.key_pem, true)?;
    write_file(&files.cert, &issued.cert_pem, false)
}

/// What `trellis up` needs in `dir`: a CA and a certificate per role,
/// each with at least [`RENEW_DAYS`] left. Returns the roles it issued.
pub fn ensure_dev_pki(dir: &Path) -> Result<Vec<Role>, PkiError> {
    let fresh_ca = ensure_ca(dir)?;
    let mut issued = Vec::new();
    for role in Role::ALL {
        let files = files_in(dir, role);
        let current = !fresh_ca
            && files.key.exists()
            && std::fs::read_to_string(&files.cert)
                .ok()
                .and_then(|pem| days_left(&pem).ok())
                .is_some_and(|left| left >= i64::from(RENEW_DAYS));
        if !current {
            issue_into(dir, dir, role, &default_names(role), CERT_DAYS)?;
            issued.push(role);
        }
    }
    Ok(issued)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der_of(pem: &str) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        pem.contents
    }

    #[test]
    fn an_issued_certificate_names_its_role_and_expiry() {
        let ca = new_ca("test CA", 10).unwrap();
        let cert = issue(
            &ca.cert_pem,
            &ca.key_pem,
            Role::Signer,
            &["localhost".into(), "127.0.0.1".into()],
            20,
        )
        .unwrap();
        assert_eq!(role_of(&der_of(&cert.cert_pem)), Some(Role::Signer));
        assert!((19..=20).contains(&days_left(&cert.cert_pem).unwrap()));
        // The CA itself names no role.
        assert_eq!(role_of(&der_of(&ca.cert_pem)), None);
        assert_eq!(role_of(b"garbage"), None);
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        // 2026-12-03T12:00:00Z
        assert_eq!(civil_date(1_796_299_200), (2026, 12, 3));
        assert_eq!(civil_date(951_782_400), (2000, 2, 29));
        assert_eq!(civil_date(-1), (1969, 12, 31));
    }

    #[test]
    fn dev_pki_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure_dev_pki(dir.path()).unwrap();
        assert_eq!(first, Role::ALL.to_vec());
        use std::os::unix::fs::PermissionsExt;
        for role in Role::ALL {
            let key = files_in(dir.path(), role).key;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", key.display());
        }
        assert!(ensure_dev_pki(dir.path()).unwrap().is_empty());
        std::fs::remove_file(files_in(dir.path(), Role::Ota).cert).unwrap();
        assert_eq!(ensure_dev_pki(dir.path()).unwrap(), vec![Role::Ota]);
    }
}

//! Mutual TLS between services (`tls.*`): each service loads the CA it
//! trusts and the certificate of its role, serves with it and calls the
//! others with it. The role a certificate names (a URI SAN
//! `spiffe://trellis/role/<role>`) is what the callee's access rules see of
//! a service; operators show the `operator` role, which grants nothing by
//! itself, and a token.
use crate::config::{Config, TlsMode};
use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

/// The URI SAN prefix that names a role in a service certificate.
pub const ROLE_URI_PREFIX: &str = "spiffe://trellis/role/";

/// What a certificate lets its holder be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Keyvault,
    Gateway,
    Signer,
    Ota,
    /// The CLI and other operator tools: admitted to the network, their
    /// rights come from their token.
    Operator,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Keyvault,
        Role::Gateway,
        Role::Signer,
        Role::Ota,
        Role::Operator,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Keyvault => "keyvault",
            Role::Gateway => "gateway",
            Role::Signer => "signer",
            Role::Ota => "ota",
            Role::Operator => "operator",
        }
    }

    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }

    /// The URI SAN that names this role.
    pub fn uri(self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.name())
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "tls: cannot read the {what} {path}: {source}. Run `trellis up` once (it makes a development CA and \
         certificates in data_dir/tls), or `trellis certs init` / `trellis certs issue --role {role}`, or set \
         tls.mode = \"off\" (TRELLIS_TLS__MODE=off) for plaintext development"
    )]
    Unreadable {
        what: &'static str,
        role: Role,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "tls: tls.cert_file/tls.key_file name one certificate, but this process runs several services: set tls.dir instead"
    )]
    OneCertManyServices,
    #[error("tls: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Where a role's files are.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The directory certificates are looked up in (`tls.dir`, default
/// `data_dir/tls`).
pub fn dir(config: &Config) -> PathBuf {
    config
        .tls
        .dir
        .clone()
        .unwrap_or_else(|| config.data_dir.join("tls"))
}

/// The files of `role` in `dir`, as `trellis certs` writes them.
pub fn files_in(dir: &Path, role: Role) -> TlsFiles {
    TlsFiles {
        ca: ca_in(dir),
        cert: dir.join(format!("{}.crt", role.name())),
        key: dir.join(format!("{}.key", role.name())),
    }
}

/// The files `role` uses under `config`: explicit `tls.*_file` settings
/// first, then the directory.
pub fn files(config: &Config, role: Role) -> TlsFiles {
    let in_dir = files_in(&dir(config), role);
    TlsFiles {
        ca: config.tls.ca_file.clone().unwrap_or(in_dir.ca),
        cert: config.tls.cert_file.clone().unwrap_or(in_dir.cert),
        key: config.tls.key_file.clone().unwrap_or(in_dir.key),
    }
}

/// One role's TLS material, loaded: what its server serves with and its
/// clients call with.
#[derive(Clone)]
pub struct ServiceTls {
    role: Role,
    ca: Certificate,
    identity: Identity,
}

impl std::fmt::Debug for ServiceTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceTls")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl ServiceTls {
    /// `role`'s material under `config`, or `None` with `tls.mode = "off"`
    /// (logged as a warning: every hop is then plaintext).
    pub fn load(config: &Config, role: Role) -> Result<Option<Self>, TlsError> {
        if config.tls.mode == TlsMode::Off {
            if role != Role::Operator {
                tracing::warn!(
                    service = role.name(),
                    "tls.mode is off: this service's gRPC is plaintext and unauthenticated at the transport (development only)"
                );
            }
            return Ok(None);
        }
        Self::from_files(&files(config, role), role).map(Some)
    }

    pub fn from_files(files: &TlsFiles, role: Role) -> Result<Self, TlsError> {
        let read = |what: &'static str, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Unreadable {
                what,
                role,
                path: path.to_path_buf(),
                source,
            })
        };
        let ca = read("CA certificate", &files.ca)?;
        let cert = read("certificate", &files.cert)?;
        let key = read("private key", &files.key)?;
        Ok(Self {
            role,
            ca: Certificate::from_pem(ca),
            identity: Identity::from_pem(cert, key),
        })
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Servers ask every caller for a certificate of the CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
    }

    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
    }
}

/// The certificate this process's operator clients (CLI, demo, bench)
/// call with, or why there is none (told when a command first connects).
static OPERATOR: std::sync::RwLock<Result<Option<ServiceTls>, String>> =
    std::sync::RwLock::new(Ok(None));

pub fn set_operator(tls: Result<Option<ServiceTls>, String>) {
    *OPERATOR.write().unwrap_or_else(|p| p.into_inner()) = tls;
}

pub fn operator() -> Result<Option<ServiceTls>, String> {
    OPERATOR.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The CA certificate in `dir`.
pub fn ca_in(dir: &Path) -> PathBuf {
    dir.join("ca.crt")
}

/// For a process running several services (`trellis up`): a single
/// `tls.cert_file` cannot be every service's.
pub fn check_shared_process(config: &Config) -> Result<(), TlsError> {
    if config.tls.mode == TlsMode::Mutual
        && (config.tls.cert_file.is_some() || config.tls.key_file.is_some())
    {
        return Err(TlsError::OneCertManyServices);
    }
    Ok(())
}

/// A gRPC server builder, with TLS when `tls` is given.
pub fn server(tls: Option<&ServiceTls>) -> Result<Server, TlsError> {
    let builder = Server::builder();
    Ok(match tls {
        Some(tls) => builder.tls_config(tls.server_config())?,
        None => builder,
    })
}

/// An endpoint for `url`. With `tls`, the call is TLS whatever the
/// scheme written (`http://` URLs from plaintext days keep working) and
/// the server must show a certificate of the CA naming the URL's host.
pub fn endpoint(url: &str, tls: Option<&ServiceTls>) -> Result<Endpoint, String> {
    let url = match (tls, url.strip_prefix("http://")) {
        (Some(_), Some(rest)) => format!("https://{rest}"),
        _ => url.to_string(),
    };
    let endpoint = Endpoint::from_shared(url.clone()).map_err(|e| format!("{url:?}: {e}"))?;
    match tls {
        Some(tls) => endpoint
            .tls_config(tls.client_config())
            .map_err(|e| format!("{url:?}: {e}")),
        None => Ok(endpoint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_files_follow_the_role() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.name()), Some(role));
            assert!(role.uri().starts_with(ROLE_URI_PREFIX));
        }
        assert_eq!(Role::parse("root"), None);
        let f = files_in(Path::new("/d"), Role::Gateway);
        assert_eq!(f.cert, Path::new("/d/gateway.crt"));
        assert_eq!(f.key, Path::new("/d/gateway.key"));
        assert_eq!(f.ca, Path::new("/d/ca.crt"));
    }

    #[test]
    fn explicit_files_win_over_the_directory() {
        let mut c = Config {
            data_dir: PathBuf::from("/data"),
            ..Config::default()
        };
        assert_eq!(files(&c, Role::Ota).cert, Path::new("/data/tls/ota.crt"));
        c.tls.cert_file = Some(PathBuf::from("/etc/tls/tls.crt"));
        c.tls.ca_file = Some(PathBuf::from("/etc/tls/ca.crt"));
        let f = files(&c, Role::Ota);
        assert_eq!(f.cert, Path::new("/etc/tls/tls.crt"));
        assert_eq!(f.ca, Path::new("/etc/tls/ca.crt"));
        assert_eq!(f.key, Path::new("/data/tls/ota.key"));
        assert!(matches!(
            check_shared_process(&c),
            Err(TlsError::OneCertManyServices)
        ));
    }

    #[test]
    fn a_missing_file_says_how_to_make_one() {
        let mut c = Config {
            data_dir: PathBuf::from("/nonexistent-trellis"),
            ..Config::default()
        };
        let e = ServiceTls::load(&c, Role::Signer).unwrap_err().to_string();
        assert!(e.contains("/nonexistent-trellis/tls/ca.crt"), "{e}");
        assert!(e.contains("trellis certs issue --role signer"), "{e}");
        c.tls.mode = TlsMode::Off;
        assert!(ServiceTls::load(&c, Role::Signer).unwrap().is_none());
    }

    #[test]
    fn with_tls_an_http_url_becomes_https() {
        assert!(endpoint("http://127.0.0.1:1", None).is_ok());
        assert!(endpoint("not a url", None).is_err());
    }
}

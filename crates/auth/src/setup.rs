//! What each service does with `auth.*` at start: the layer its gRPC
//! server runs behind, and the credential it sends to other services.
use crate::access::{AuthLayer, Mode};
use crate::authenticator::Authenticator;
use trellis_core::config::{AuthMode, Config};
use trellis_core::redis_conn::Redis;

/// The layer for `service`'s gRPC server. With `auth.mode = "off"` every
/// caller is let through, and this says so loudly, at every start.
pub fn server_layer(config: &Config, durable: Redis, service: &str) -> AuthLayer {
    match config.auth.mode {
        AuthMode::Tokens => AuthLayer::new(Mode::Enforce(Authenticator::new(
            durable,
            config.auth.token_rate,
            config.auth.token_burst,
        ))),
        AuthMode::Off => {
            tracing::warn!(
                service,
                "auth.mode is off: this service answers every caller without checking who it is (development only)"
            );
            AuthLayer::new(Mode::Off)
        }
    }
}

/// Sets the credential `service` sends to the services it calls, from
/// `auth.service_token_file` or `auth.service_token`. With tokens on and
/// neither set, the service cannot call anyone: refuse to start, saying how
/// to make one (unless this process already has one, as in `trellis up`).
pub fn load_service_credential(config: &Config, service: &str) -> anyhow::Result<()> {
    let token = match (&config.auth.service_token_file, &config.auth.service_token) {
        (Some(path), _) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cannot read auth.service_token_file {}: {e}",
                        path.display()
                    )
                })?
                .trim()
                .to_string(),
        ),
        (None, Some(token)) => Some(token.trim().to_string()),
        (None, None) => None,
    };
    match token {
        Some(t) => {
            trellis_core::telemetry::set_service_credential(Some(&t)).map_err(anyhow::Error::msg)
        }
        // Over mutual TLS a service is its certificate's role.
        None if config.auth.mode == AuthMode::Off
            || config.tls.mode == trellis_core::config::TlsMode::Mutual
            || trellis_core::telemetry::has_service_credential() =>
        {
            Ok(())
        }
        None => anyhow::bail!(
            "the {service} needs a service credential to call the other services: make one with \
             `trellis token create --service {service}` (with the installation's first owner token) and set \
             auth.service_token_file (TRELLIS_AUTH__SERVICE_TOKEN_FILE) to a file holding it"
        ),
    }
}

/// Which credential [`bootstrap_token`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bootstrap {
    /// The installation's first owner: every scope of an owner of the
    /// default organisation, plus cluster:admin.
    FirstOwner,
    /// The in-process services of `trellis up` (gateway, signer and ota
    /// credentials in one).
    Services,
}

/// The token kept in `path` (0600) if it is still a live token, or a new
/// one written there. `trellis up` calls this at every start.
pub async fn bootstrap_token(
    redis: &mut Redis,
    path: &std::path::Path,
    kind: Bootstrap,
) -> anyhow::Result<(String, bool)> {
    use crate::scope::{Role, Scope};
    use crate::store::{self, TokenRequest};
    if let Ok(text) = std::fs::read_to_string(path) {
        let text = text.trim().to_string();
        if let Some(presented) = crate::token::Presented::parse(&text)
            && let Some(record) = store::get_token(redis, &presented.id).await?
            && presented.matches(&record.secret_sha256)
            && record.revoked_ms == 0
            && !record.expired_at(trellis_core::time::now_ms())
        {
            return Ok((text, false));
        }
    }
    store::ensure_org(redis, crate::DEFAULT_ORG).await?;
    let (org, user, name, scopes) = match kind {
        Bootstrap::FirstOwner => {
            if store::get_user(redis, crate::DEFAULT_ORG, "owner")
                .await?
                .is_none()
            {
                store::add_user(redis, crate::DEFAULT_ORG, "owner", Role::Owner).await?;
            }
            let mut scopes = Role::Owner.scopes();
            scopes.push(Scope::ClusterAdmin);
            (
                crate::DEFAULT_ORG,
                "owner",
                "first owner (trellis up)",
                scopes,
            )
        }
        Bootstrap::Services => (
            "system",
            "service:up",
            "trellis up services",
            vec![
                Scope::ServiceGateway,
                Scope::ServiceSigner,
                Scope::ServiceOta,
            ],
        ),
    };
    let (token, _) = store::create_token(
        redis,
        TokenRequest {
            org,
            user,
            name,
            scopes: &scopes,
            expires_ms: 0,
        },
    )
    .await?;
    write_token_file(path, &token.bearer)?;
    Ok((token.bearer, true))
}

/// Writes `token` to `path`, owner-only (0600), replacing what was there.
pub fn write_token_file(path: &std::path::Path, token: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        // An older file keeps its mode through truncate: make it private first.
        if path.exists() {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("cannot chmod 600 {}", path.display()))?;
        }
    }
    let mut f = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(f, "{token}").with_context(|| format!("cannot write {}", path.display()))
}

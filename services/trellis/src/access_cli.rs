//! Organisations, products, users and tokens from the command line, and
//! where the CLI finds its own token.
use crate::cli::Endpoints;
use anyhow::Context;
use clap::Subcommand;
use std::path::{Path, PathBuf};
use trellis_core::telemetry::TracedChannel;
use trellis_proto::v1 as pb;
use trellis_proto::v1::access_client::AccessClient;

/// The file `trellis up` writes its first owner token to, in `data_dir`.
pub const OWNER_TOKEN_FILE: &str = "owner.token";

#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// A new organisation and its first owner; prints the owner's token
    /// (shown once) on the last line. Needs the installation's first owner.
    Create {
        name: String,
        /// The first owner's user name.
        #[arg(long, default_value = "owner")]
        owner: String,
    },
    /// Organisations you can see.
    List,
}

#[derive(Debug, Subcommand)]
pub enum ProductCommand {
    /// Registers product ID in your organisation (its devices, releases,
    /// policies and rollouts are then the organisation's).
    Create {
        id: u32,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Your organisation's products.
    List,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Adds a user with a role: owner, admin, developer or viewer.
    Add {
        name: String,
        #[arg(long)]
        role: String,
    },
    /// Your organisation's users and roles.
    List,
    /// Removes a user and revokes every token they hold.
    Remove { name: String },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// A new token, printed alone on the last line (shown once; only its
    /// hash is kept). No --scope: every scope of its user.
    Create {
        /// A scope (repeat, or commas): devices:read, devices:call,
        /// devices:admin, firmware:write, releases:sign, rollouts:write,
        /// audit:read, org:admin.
        #[arg(long = "scope", value_delimiter = ',')]
        scopes: Vec<String>,
        /// Seconds until it expires (default: never).
        #[arg(long)]
        expires_in: Option<u64>,
        /// A name to recognise it by in `token list`.
        #[arg(long, default_value = "")]
        name: String,
        /// For another user of the organisation (org:admin).
        #[arg(long)]
        user: Option<String>,
        /// In another organisation (the installation's first owner).
        #[arg(long)]
        org: Option<String>,
        /// A service credential: gateway, signer or ota (the installation's
        /// first owner), for `auth.service_token_file`.
        #[arg(long)]
        service: Option<String>,
    },
    /// Your tokens (every token of the organisation with org:admin).
    List,
    /// Revokes a token by its id (from `token list`).
    Revoke { id: String },
    /// Straight to Redis (redis.url / redis.durable_url), no service
    /// needed: the installation's first owner token, written to OUT (0600)
    /// unless OUT already holds a live one. For deployments without
    /// `trellis up`; run it once where the Redis credentials are.
    Bootstrap {
        #[arg(long)]
        out: PathBuf,
    },
}

/// Where this CLI's token comes from, first found wins: `--token` /
/// `TRELLIS_TOKEN`, the file `trellis login` wrote, then the first owner
/// token of a `trellis up` whose data directory is the configured one
/// (same machine, same directory: the README's commands need no flag).
pub fn find_token(flag: Option<&str>, data_dir: &Path) -> Option<String> {
    if let Some(t) = flag.filter(|t| !t.trim().is_empty()) {
        return Some(t.trim().to_string());
    }
    [login_file(), Some(data_dir.join(OWNER_TOKEN_FILE))]
        .into_iter()
        .flatten()
        .find_map(|path| std::fs::read_to_string(path).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// `$XDG_CONFIG_HOME/trellis/token`, else `~/.config/trellis/token`.
pub fn login_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("trellis").join("token"))
}

pub use trellis_auth::setup::write_token_file;

async fn client(endpoints: &Endpoints) -> anyhow::Result<AccessClient<TracedChannel>> {
    Ok(AccessClient::new(
        crate::ops::channel(&endpoints.keyvault_url, "keyvault", "--keyvault-url").await?,
    ))
}

fn status(e: tonic::Status) -> anyhow::Error {
    crate::ops::status(e)
}

pub async fn login(endpoints: &Endpoints, token: &str) -> anyhow::Result<()> {
    trellis_core::telemetry::set_operator_credential(Some(token)).map_err(anyhow::Error::msg)?;
    let me = client(endpoints)
        .await?
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let path = login_file()
        .context("no home directory to keep the token in (set HOME or XDG_CONFIG_HOME)")?;
    write_token_file(&path, token)?;
    println!(
        "logged in as {}@{} (token {}); token kept in {} (mode 0600)",
        me.user,
        me.org,
        me.token_id,
        path.display()
    );
    Ok(())
}

/// This CLI's identity as keyvault sees it.
pub async fn who_am_i(endpoints: &Endpoints) -> anyhow::Result<pb::Identity> {
    Ok(client(endpoints)
        .await?
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .map_err(status)?
        .into_inner())
}

pub async fn whoami(endpoints: &Endpoints) -> anyhow::Result<()> {
    let me = client(endpoints)
        .await?
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .map_err(status)?
        .into_inner();
    println!("{}@{}", me.user, me.org);
    println!(
        "token: {}",
        if me.token_id.is_empty() {
            "-"
        } else {
            &me.token_id
        }
    );
    println!("scopes: {}", me.scopes.join(" "));
    Ok(())
}

pub async fn org(endpoints: &Endpoints, cmd: OrgCommand) -> anyhow::Result<()> {
    let mut c = client(endpoints).await?;
    match cmd {
        OrgCommand::Create { name, owner } => {
            let created = c
                .create_org(pb::CreateOrgRequest {
                    name: name.clone(),
                    owner: owner.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            eprintln!("organisation {name} created with owner {owner}; their token (shown once):");
            println!("{}", created.token);
        }
        OrgCommand::List => {
            for org in c
                .list_orgs(pb::ListOrgsRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .orgs
            {
                println!("{org}");
            }
        }
    }
    Ok(())
}

pub async fn product(endpoints: &Endpoints, cmd: ProductCommand) -> anyhow::Result<()> {
    let mut c = client(endpoints).await?;
    match cmd {
        ProductCommand::Create { id, name } => {
            let p = c
                .create_product(pb::CreateProductRequest { id, name })
                .await
                .map_err(status)?
                .into_inner();
            println!("product {} ({}) in {}", p.id, p.name, p.org);
        }
        ProductCommand::List => {
            for p in c
                .list_products(pb::ListProductsRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .products
            {
                println!("{:<10} {}", p.id, p.name);
            }
        }
    }
    Ok(())
}

pub async fn user(endpoints: &Endpoints, cmd: UserCommand) -> anyhow::Result<()> {
    let mut c = client(endpoints).await?;
    match cmd {
        UserCommand::Add { name, role } => {
            let u = c
                .add_user(pb::AddUserRequest { name, role })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}@{}: {}", u.name, u.org, u.role);
        }
        UserCommand::List => {
            for u in c
                .list_users(pb::ListUsersRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .users
            {
                println!("{:<24} {}", u.name, u.role);
            }
        }
        UserCommand::Remove { name } => {
            let r = c
                .remove_user(pb::RemoveUserRequest { name: name.clone() })
                .await
                .map_err(status)?
                .into_inner();
            println!("removed {name}; {} token(s) revoked", r.tokens_revoked);
        }
    }
    Ok(())
}

/// `trellis token bootstrap`: straight to Redis, no service involved.
pub async fn bootstrap(config: &trellis_core::Config, out: &Path) -> anyhow::Result<()> {
    let mut redis = trellis_core::redis_conn::connect_durable(&config.redis)
        .await
        .context("token bootstrap writes to Redis: set redis.url (TRELLIS_REDIS__URL)")?;
    let (_, made) = trellis_auth::setup::bootstrap_token(
        &mut redis,
        out,
        trellis_auth::setup::Bootstrap::FirstOwner,
    )
    .await?;
    println!(
        "{} first owner token in {} (mode 0600): `trellis login --token $(cat {})`",
        if made { "made the" } else { "kept the live" },
        out.display(),
        out.display()
    );
    Ok(())
}

pub async fn token(
    endpoints: &Endpoints,
    config: &trellis_core::Config,
    cmd: TokenCommand,
) -> anyhow::Result<()> {
    // Every command but bootstrap asks keyvault; bootstrap works without it.
    match cmd {
        TokenCommand::Bootstrap { out } => bootstrap(config, &out).await?,
        TokenCommand::Create {
            scopes,
            expires_in,
            name,
            user,
            org,
            service,
        } => {
            let created = client(endpoints)
                .await?
                .create_token(pb::CreateTokenRequest {
                    name,
                    scopes,
                    expires_in_secs: expires_in.unwrap_or(0),
                    user: user.unwrap_or_default(),
                    org: org.unwrap_or_default(),
                    service: service.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            if let Some(info) = &created.info {
                eprintln!(
                    "token {} for {}@{} with {}{} (shown once: keep it now)",
                    info.id,
                    info.user,
                    info.org,
                    info.scopes.join(" "),
                    if info.expires_ms == 0 {
                        String::new()
                    } else {
                        format!(
                            ", expires {}",
                            trellis_core::time::format_ms(info.expires_ms)
                        )
                    }
                );
            }
            println!("{}", created.token);
        }
        TokenCommand::List => {
            println!(
                "{:<16} {:<24} {:<16} {:<24} {:<24} scopes",
                "id", "user", "name", "last used", "state"
            );
            for t in client(endpoints)
                .await?
                .list_tokens(pb::ListTokensRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .tokens
            {
                let state = if t.revoked_ms != 0 {
                    format!("revoked {}", trellis_core::time::format_ms(t.revoked_ms))
                } else if t.expires_ms != 0 && t.expires_ms <= trellis_core::time::now_ms() {
                    "expired".to_string()
                } else if t.expires_ms != 0 {
                    format!("until {}", trellis_core::time::format_ms(t.expires_ms))
                } else {
                    "live".to_string()
                };
                let used = if t.last_used_ms == 0 {
                    "never".to_string()
                } else {
                    trellis_core::time::format_ms(t.last_used_ms)
                };
                println!(
                    "{:<16} {:<24} {:<16} {:<24} {:<24} {}",
                    t.id,
                    t.user,
                    t.name,
                    used,
                    state,
                    t.scopes.join(" ")
                );
            }
        }
        TokenCommand::Revoke { id } => {
            let t = client(endpoints)
                .await?
                .revoke_token(pb::RevokeTokenRequest { id })
                .await
                .map_err(status)?
                .into_inner();
            println!("token {} revoked", t.id);
        }
    }
    Ok(())
}

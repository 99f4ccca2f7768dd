//! `trellis certs`: the installation's CA and the role certificates of
//! mutual TLS, for deployments without cert-manager. `trellis up` makes
//! the same files itself on first start.
use anyhow::{Context, bail};
use clap::Subcommand;
use std::path::{Path, PathBuf};
use trellis_auth::pki;
use trellis_core::Config;
use trellis_core::tls::{Role, files_in};

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Make a CA (ca.crt, ca.key) and a certificate for every role
    /// (keyvault, gateway, signer, ota, operator) in DIR.
    Init {
        /// Where to write (default: tls.dir, else data_dir/tls).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Extra DNS names or IP addresses for every service certificate
        /// (the names clients use to reach the services).
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
        /// Replace a CA that is already there (every certificate it
        /// signed stops being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Issue (or renew) one role's certificate with the CA in DIR.
    Issue {
        /// keyvault, gateway, signer, ota or operator.
        #[arg(long)]
        role: String,
        /// DNS names or IP addresses the certificate is valid for
        /// (default: localhost, 127.0.0.1, ::1, ROLE, trellis-ROLE and
        /// this host's name).
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = pki::CERT_DAYS)]
        days: u32,
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Write ROLE.crt and ROLE.key here instead of DIR.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Each file in DIR: its role and days left.
    List {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

pub fn run(config: &Config, command: CertsCommand) -> anyhow::Result<()> {
    let default_dir = trellis_core::tls::dir(config);
    match command {
        CertsCommand::Init { dir, sans, force } => {
            let dir = dir.unwrap_or(default_dir);
            let ca = trellis_core::tls::ca_in(&dir);
            if ca.exists() && !force {
                bail!(
                    "{} already holds a CA; `trellis certs issue --role R` issues more certificates with it, --force replaces it",
                    dir.display()
                );
            }
            if force {
                let _ = std::fs::remove_file(&ca);
            }
            pki::ensure_ca(&dir)?;
            for role in Role::ALL {
                let mut names = pki::default_names(role);
                names.extend(sans.iter().cloned());
                pki::issue_into(&dir, &dir, role, &names, pki::CERT_DAYS)?;
            }
            println!(
                "certs: CA and certificates for {} in {} (keys mode 0600; keep ca.key offline in production)",
                Role::ALL.map(Role::name).join(", "),
                dir.display()
            );
            Ok(())
        }
        CertsCommand::Issue {
            role,
            sans,
            days,
            dir,
            out,
        } => {
            let role = Role::parse(&role).with_context(|| {
                format!(
                    "unknown role {role:?}: one of {}",
                    Role::ALL.map(Role::name).join(", ")
                )
            })?;
            if days == 0 {
                bail!("--days must be at least 1");
            }
            let dir = dir.unwrap_or(default_dir);
            let names = if sans.is_empty() {
                pki::default_names(role)
            } else {
                sans
            };
            let target = out.unwrap_or_else(|| dir.clone());
            pki::issue_into(&dir, &target, role, &names, days).with_context(|| {
                format!(
                    "cannot issue with the CA in {} (`trellis certs init` makes one)",
                    dir.display()
                )
            })?;
            let files = files_in(&target, role);
            println!(
                "certs: {} certificate {} (key {}), valid {days} days for {}",
                role,
                files.cert.display(),
                files.key.display(),
                names.join(", ")
            );
            Ok(())
        }
        CertsCommand::List { dir } => {
            let dir = dir.unwrap_or(default_dir);
            list(&dir)
        }
    }
}

fn list(dir: &Path) -> anyhow::Result<()> {
    let ca = trellis_core::tls::ca_in(dir);
    let ca_pem = std::fs::read_to_string(&ca)
        .with_context(|| format!("no CA at {} (run `trellis certs init`)", ca.display()))?;
    println!(
        "ca        {:>5} days left  {}",
        pki::days_left(&ca_pem)?,
        ca.display()
    );
    for role in Role::ALL {
        let files = files_in(dir, role);
        match std::fs::read_to_string(&files.cert) {
            Ok(pem) => println!(
                "{:<9} {:>5} days left  {}",
                role.name(),
                pki::days_left(&pem)?,
                files.cert.display()
            ),
            Err(_) => println!("{:<9}     -            (none)", role.name()),
        }
    }
    Ok(())
}

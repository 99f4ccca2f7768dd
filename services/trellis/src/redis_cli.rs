//! `trellis redis acl`: one Redis ACL user per service, for deployments
//! that bring their own Redis (`trellis up` does the same for the Redis it
//! starts). Each service then connects with `redis.username` and
//! `redis.password_file`.
use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use trellis_core::redis_conn::acl::{self, RedisUser};

#[derive(Debug, Subcommand)]
pub enum RedisCommand {
    /// Print every service's ACL user: the keys it owns, the keys it only
    /// reads, and the audit stream it may only append to. Passwords are
    /// kept in DIR/<service>.password (made when missing, mode 0600; mount
    /// each as its service's redis.password_file); the output holds only
    /// their SHA-256.
    Acl {
        /// Where the passwords are (or are made).
        #[arg(long, value_name = "DIR")]
        passwords: PathBuf,
        /// `file`: lines of a Redis ACL file (`aclfile` in redis.conf);
        /// `commands`: `ACL SETUSER` commands for `redis-cli`.
        #[arg(long, value_enum, default_value_t = AclFormat::File)]
        format: AclFormat,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AclFormat {
    File,
    Commands,
}

pub fn run(command: RedisCommand) -> anyhow::Result<()> {
    match command {
        RedisCommand::Acl { passwords, format } => {
            for user in RedisUser::ALL {
                let password = password_in(&passwords, user)?;
                let line = user.acl_file_line(&password);
                match format {
                    AclFormat::File => println!("{line}"),
                    AclFormat::Commands => {
                        // `user <name> <rules>` -> `ACL SETUSER <name> reset <rules>`
                        let rules = line
                            .strip_prefix(&format!("user {} ", user.name()))
                            .unwrap_or(&line);
                        println!("ACL SETUSER {} reset {rules}", user.name());
                    }
                }
            }
            eprintln!(
                "redis: passwords in {} ({}); give each service TRELLIS_REDIS__USERNAME=<user> and TRELLIS_REDIS__PASSWORD_FILE=<its file>",
                passwords.display(),
                RedisUser::ALL
                    .map(|u| format!("{}.password for {}", u.service(), u.name()))
                    .join(", ")
            );
            Ok(())
        }
    }
}

/// The password in `dir/<service>.password`, made (0600) when missing.
fn password_in(dir: &Path, user: RedisUser) -> anyhow::Result<String> {
    let path = dir.join(format!("{}.password", user.service()));
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let password = text.trim();
        if password.is_empty() {
            anyhow::bail!(
                "{} is empty: delete it to make a new password",
                path.display()
            );
        }
        return Ok(password.to_string());
    }
    let password = acl::new_password();
    trellis_auth::setup::write_token_file(&path, &password)?;
    Ok(password)
}

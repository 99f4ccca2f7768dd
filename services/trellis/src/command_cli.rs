//! `trellis command …`: signed commands made where the customer's keys are
//! (README "Signed commands"). Everything here except `device call`'s
//! sending runs offline: the cloud never sees these private keys.
//!
//! A signed-command file is JSON: the call in readable form (what a
//! reviewer checks before adding a signature) and `signed_command`, the
//! exact bytes a device checks (docs/protocol.md §7.4), base64. The REST
//! API takes the same base64 as `signed_command`.
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use base64::Engine;
use clap::Subcommand;
use serde::{Deserialize, Serialize};
use trellis_firmware::command::{
    CommandEnvelope, CommandPolicy, Protected, SignedCommand, sign_command,
};
use trellis_firmware::{
    TrustPolicy, TrustedKey, key_id, private_key_from_pem, public_key_from_pem,
};

/// The `format` of a signed-command file.
pub const FILE_FORMAT: &str = "trellis-signed-command-1";

#[derive(Debug, Subcommand)]
pub enum CommandCommand {
    /// Sign one function call for one device, offline, and write it to a
    /// file for `trellis device call --envelope FILE` (or the REST API).
    Sign {
        /// The device (24 hex characters).
        #[arg(long)]
        device: String,
        #[arg(long)]
        function: String,
        #[arg(long, default_value = "")]
        argument: String,
        /// A private key (PKCS#8 PEM) to sign with; repeat for a threshold.
        #[arg(long = "sign-with", value_name = "KEY.pem", required = true)]
        keys: Vec<PathBuf>,
        /// How long the command stays valid from --not-before (the
        /// device's policy caps it: max_validity_secs).
        #[arg(long, default_value = "5m")]
        valid_for: humantime::Duration,
        /// Valid from (RFC 3339; default: now).
        #[arg(long)]
        not_before: Option<humantime::Timestamp>,
        /// The sequence number (default: the current time in milliseconds,
        /// so later envelopes supersede earlier ones without coordination).
        #[arg(long)]
        sequence: Option<u64>,
        /// The organisation, recorded in the envelope.
        #[arg(long, default_value = trellis_auth::DEFAULT_ORG)]
        org: String,
        #[arg(short = 'o', long)]
        out: PathBuf,
    },
    /// Add signatures to a signed-command file (each key holder of a
    /// threshold policy signs the same file in turn).
    Cosign {
        file: PathBuf,
        #[arg(long = "sign-with", value_name = "KEY.pem", required = true)]
        keys: Vec<PathBuf>,
    },
    /// Show a signed-command file: the call, its window, its signers.
    Show { file: PathBuf },
    /// Add a command policy to a device trust policy file (policy.json),
    /// which devices are provisioned with: who must sign which calls.
    Policy {
        /// The trust policy file to extend (`trellis policy show --product
        /// P --json` prints one).
        #[arg(long)]
        policy: PathBuf,
        /// A public key that may sign commands, `NAME=PUB.pem` or
        /// `PUB.pem`; repeat for each.
        #[arg(long = "key", value_name = "[NAME=]PUB.pem", required = true)]
        keys: Vec<String>,
        /// How many of the keys must sign (default: 1).
        #[arg(long, default_value_t = 1)]
        threshold: usize,
        /// A function that needs a signature; repeat. Without any, every
        /// function does.
        #[arg(long = "protect", value_name = "FUNCTION")]
        protect: Vec<String>,
        /// The longest validity a device accepts (at most a year).
        #[arg(long, default_value = "5m")]
        max_validity: humantime::Duration,
        /// Where to write (default: over --policy).
        #[arg(short = 'o', long)]
        out: Option<PathBuf>,
    },
}

impl CommandCommand {
    pub fn name(&self) -> &'static str {
        match self {
            CommandCommand::Sign { .. } => "command sign",
            CommandCommand::Cosign { .. } => "command cosign",
            CommandCommand::Show { .. } => "command show",
            CommandCommand::Policy { .. } => "command policy",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct SignedCommandFile {
    format: String,
    organization: String,
    device_id: String,
    function: String,
    argument: String,
    not_before: String,
    expires: String,
    sequence: u64,
    signers: Vec<String>,
    /// The SignedCommand bytes, base64: what the device checks.
    signed_command: String,
}

use trellis_api::iso_time as iso;
use trellis_core::time::now_ms;

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Signs `envelope` with every key in `keys` (files read here, zeroized
/// after use) and adds the signatures to `existing`.
fn sign_with(
    envelope: &CommandEnvelope,
    keys: &[PathBuf],
    mut existing: SignedCommand,
) -> anyhow::Result<SignedCommand> {
    for path in keys {
        let pem = zeroize::Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the private key {}", path.display()))?,
        );
        let key = private_key_from_pem(&pem)
            .with_context(|| format!("{} is not a private key", path.display()))?;
        let signature = sign_command(&key, envelope)
            .with_context(|| format!("signing with {}", path.display()))?;
        if existing
            .signatures
            .iter()
            .any(|s| s.key_id == signature.key_id)
        {
            bail!("{} has signed this command already", path.display());
        }
        existing.signatures.push(signature);
    }
    Ok(existing)
}

/// A new signed command for one call.
pub fn make(
    envelope: CommandEnvelope,
    keys: &[PathBuf],
) -> anyhow::Result<(CommandEnvelope, SignedCommand)> {
    if envelope
        .device_id
        .parse::<trellis_wire::DeviceId>()
        .is_err()
    {
        bail!(
            "device id {:?} is not 24 hex characters",
            envelope.device_id
        );
    }
    let bytes = envelope
        .to_bytes()
        .map_err(|e| anyhow::anyhow!("cannot sign this call: {e}"))?;
    let signed = sign_with(
        &envelope,
        keys,
        SignedCommand {
            envelope: bytes,
            signatures: Vec::new(),
        },
    )?;
    Ok((envelope, signed))
}

/// The envelope a CLI call signs: valid from `not_before_ms` for
/// `valid_for`.
pub fn envelope(
    org: &str,
    device: &str,
    function: &str,
    argument: &str,
    not_before_ms: i64,
    valid_for: std::time::Duration,
    sequence: u64,
) -> CommandEnvelope {
    CommandEnvelope {
        organization: org.to_string(),
        device_id: device.to_ascii_lowercase(),
        function: function.to_string(),
        argument: argument.to_string(),
        not_before_ms,
        expires_ms: not_before_ms.saturating_add(millis(valid_for)),
        sequence,
    }
}

fn to_file(envelope: &CommandEnvelope, signed: &SignedCommand) -> anyhow::Result<String> {
    let bytes = signed
        .encode()
        .map_err(|e| anyhow::anyhow!("cannot encode the signed command: {e}"))?;
    let file = SignedCommandFile {
        format: FILE_FORMAT.into(),
        organization: envelope.organization.clone(),
        device_id: envelope.device_id.clone(),
        function: envelope.function.clone(),
        argument: envelope.argument.clone(),
        not_before: iso(envelope.not_before_ms),
        expires: iso(envelope.expires_ms),
        sequence: envelope.sequence,
        signers: signed.signatures.iter().map(|s| s.key_id.clone()).collect(),
        signed_command: base64::engine::general_purpose::STANDARD.encode(bytes),
    };
    let mut json = serde_json::to_string_pretty(&file)?;
    json.push('\n');
    Ok(json)
}

/// Reads a signed-command file: the envelope (from the signed bytes, never
/// from the readable fields) and the signed command.
pub fn read_file(path: &Path) -> anyhow::Result<(CommandEnvelope, SignedCommand)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: SignedCommandFile = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a signed-command file (make one with `trellis command sign`)",
            path.display()
        )
    })?;
    if file.format != FILE_FORMAT {
        bail!(
            "{}: format {:?}, expected {FILE_FORMAT:?}",
            path.display(),
            file.format
        );
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(file.signed_command.trim())
        .with_context(|| format!("{}: signed_command is not base64", path.display()))?;
    let signed = SignedCommand::decode(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a signed command: {e}", path.display()))?;
    let envelope = CommandEnvelope::from_bytes(&signed.envelope)
        .map_err(|e| anyhow::anyhow!("{}: malformed envelope: {e}", path.display()))?;
    Ok((envelope, signed))
}

fn write_file(path: &Path, json: &str) -> anyhow::Result<()> {
    std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))
}

fn describe(envelope: &CommandEnvelope, signed: &SignedCommand) -> String {
    format!(
        "{}({:?}) on device {} (organisation {}), valid {} to {}, sequence {}, {} signature(s): {}",
        envelope.function,
        envelope.argument,
        envelope.device_id,
        envelope.organization,
        iso(envelope.not_before_ms),
        iso(envelope.expires_ms),
        envelope.sequence,
        signed.signatures.len(),
        signed
            .signatures
            .iter()
            .map(|s| s.key_id.get(..16).unwrap_or(&s.key_id))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

pub fn run(cmd: CommandCommand) -> anyhow::Result<()> {
    match cmd {
        CommandCommand::Sign {
            device,
            function,
            argument,
            keys,
            valid_for,
            not_before,
            sequence,
            org,
            out,
        } => {
            let now = now_ms();
            let not_before_ms = match not_before {
                Some(t) => millis(
                    std::time::SystemTime::from(t)
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default(),
                ),
                None => now,
            };
            let sequence = sequence.unwrap_or(u64::try_from(now).unwrap_or(0));
            let e = envelope(
                &org,
                &device,
                &function,
                &argument,
                not_before_ms,
                valid_for.into(),
                sequence,
            );
            let (e, signed) = make(e, &keys)?;
            write_file(&out, &to_file(&e, &signed)?)?;
            println!("{}", out.display());
            eprintln!("signed {}", describe(&e, &signed));
        }
        CommandCommand::Cosign { file, keys } => {
            let (e, signed) = read_file(&file)?;
            let signed = sign_with(&e, &keys, signed)?;
            write_file(&file, &to_file(&e, &signed)?)?;
            eprintln!("signed {}", describe(&e, &signed));
        }
        CommandCommand::Show { file } => {
            let (e, signed) = read_file(&file)?;
            println!("{}", describe(&e, &signed));
        }
        CommandCommand::Policy {
            policy,
            keys,
            threshold,
            protect,
            max_validity,
            out,
        } => {
            let text = std::fs::read_to_string(&policy)
                .with_context(|| format!("cannot read {}", policy.display()))?;
            let base = TrustPolicy::from_json(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", policy.display()))?;
            let mut trusted = Vec::new();
            for arg in &keys {
                let (name, path) = crate::firmware_cli::parse_key_arg(arg)?;
                let pem = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let key = public_key_from_pem(&pem)
                    .with_context(|| format!("{} is not a public key", path.display()))?;
                eprintln!("command key {name}: {}", key_id(&key));
                trusted.push(
                    TrustedKey::new(name, key)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
                );
            }
            let signers = TrustPolicy::new(trusted, threshold)
                .map_err(|e| anyhow::anyhow!("command keys: {e}"))?;
            let protected = if protect.is_empty() {
                Protected::All
            } else {
                Protected::Only(protect)
            };
            let max: std::time::Duration = max_validity.into();
            if max.as_secs() > trellis_firmware::policy::MAX_COMMAND_VALIDITY_SECS {
                bail!("--max-validity is at most a year");
            }
            let commands = CommandPolicy::new(signers, protected, millis(max))
                .map_err(|e| anyhow::anyhow!("command policy: {e}"))?;
            let digest = hex::encode(commands.digest());
            let json = base
                .with_commands(Some(commands))
                .to_json()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let out = out.unwrap_or(policy);
            write_file(&out, &json)?;
            println!("{}", out.display());
            eprintln!(
                "command policy {digest} written; devices provisioned with this file report it in `trellis device show`"
            );
        }
    }
    Ok(())
}

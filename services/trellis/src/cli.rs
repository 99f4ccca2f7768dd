//! Command-line surface. Every command and flag is documented in the README.
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "trellis",
    version,
    about = "Trellis device cloud: services, operator CLI and device simulator"
)]
pub struct Cli {
    /// Configuration file (default: ./trellis.toml if it exists).
    #[arg(long, global = true, env = "TRELLIS_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub endpoints: Endpoints,
    /// Print the trace id of this command (spans go to
    /// telemetry.otlp_endpoint when it is set).
    #[arg(long, global = true)]
    pub trace: bool,
    /// API token (default: the file `trellis login` wrote, then
    /// `data_dir/owner.token` of a local `trellis up`).
    #[arg(long, global = true, env = "TRELLIS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the operator commands find the services.
#[derive(Debug, Clone, Args)]
pub struct Endpoints {
    /// Any gateway's gRPC endpoint.
    #[arg(
        long,
        global = true,
        env = "TRELLIS_GATEWAY_URL",
        default_value = "http://127.0.0.1:7200"
    )]
    pub gateway_url: String,
    /// Keyvault's gRPC endpoint.
    #[arg(
        long,
        global = true,
        env = "TRELLIS_KEYVAULT_URL",
        default_value = "http://127.0.0.1:7100"
    )]
    pub keyvault_url: String,
    /// The OTA scheduler's gRPC endpoint.
    #[arg(
        long,
        global = true,
        env = "TRELLIS_OTA_URL",
        default_value = "http://127.0.0.1:7400"
    )]
    pub ota_url: String,
    /// The firmware signer's gRPC endpoint.
    #[arg(
        long,
        global = true,
        env = "TRELLIS_SIGNER_URL",
        default_value = "http://127.0.0.1:7300"
    )]
    pub signer_url: String,
    /// The application API's URL (`trellis webhook`).
    #[arg(
        long,
        global = true,
        env = "TRELLIS_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub api_url: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run keyvault and gateway(s) in one process (the embedded default).
    Up(UpArgs),
    /// Run the key vault service (`keyvault rewrap`: re-seal its keys
    /// under a new master key).
    Keyvault(KeyvaultArgs),
    /// Run an edge gateway.
    Gateway,
    /// Run the firmware signer (images, releases, signatures, policies).
    Signer,
    /// Run the OTA rollout scheduler.
    Ota,
    /// Run the application API (Particle-compatible REST and server-sent events).
    Api,
    /// Run a simulated device fleet against any protocol-v1 server.
    Sim(SimArgs),
    /// Provision, register, inspect, call and revoke devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Cloud key versions: rotate, status, retire, unretire
    /// (docs/protocol.md §6.7).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Device events.
    #[command(subcommand)]
    Events(EventsCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Staged OTA rollouts: create, status, watch, pause, resume, abort, list.
    #[command(subcommand)]
    Rollout(crate::rollout_cli::RolloutCommand),
    /// Webhooks (integrations) of your organisation through the api
    /// service: create, list, delete, dead, replay.
    #[command(subcommand)]
    Webhook(crate::webhook_cli::WebhookCommand),
    /// Firmware images and offline keys: upload, sign (offline), keygen.
    #[command(subcommand)]
    Firmware(crate::firmware_cli::FirmwareCommand),
    /// Releases: create, sign, add-signature, verify, show, list, manifest.
    #[command(subcommand)]
    Release(crate::firmware_cli::ReleaseCommand),
    /// Per-product signing policies: set, show.
    #[command(subcommand)]
    Policy(crate::firmware_cli::PolicyCommand),
    /// Checks a token and keeps it for later commands (0600 file under
    /// the user's config directory).
    Login {
        #[arg(long)]
        token: String,
    },
    /// Who this CLI's token says you are.
    Whoami,
    /// Organisations: create (with their first owner), list.
    #[command(subcommand)]
    Org(crate::access_cli::OrgCommand),
    /// Products of your organisation: create, list.
    #[command(subcommand)]
    Product(crate::access_cli::ProductCommand),
    /// Users of your organisation: add, list, remove.
    #[command(subcommand)]
    User(crate::access_cli::UserCommand),
    /// API tokens: create, list, revoke.
    #[command(subcommand)]
    Token(crate::access_cli::TokenCommand),
    /// The CA and role certificates of mutual TLS: init, issue, list.
    #[command(subcommand)]
    Certs(crate::certs_cli::CertsCommand),
    /// Redis least privilege: `trellis redis acl` prints one ACL user per
    /// service.
    #[command(subcommand)]
    Redis(crate::redis_cli::RedisCommand),
    /// Signed commands, offline: sign, cosign, show, and the command
    /// policy devices enforce (README "Signed commands").
    #[command(subcommand, name = "command")]
    SignedCommands(crate::command_cli::CommandCommand),
}

#[derive(Debug, Args)]
pub struct KeyvaultArgs {
    #[command(subcommand)]
    pub action: Option<KeyvaultAction>,
}

#[derive(Debug, Subcommand)]
pub enum KeyvaultAction {
    /// Re-seal every sealed key (cloud key, release key) under a new
    /// master key, straight in Redis (`redis.url`): each key is replaced
    /// atomically, and a run that stopped half way finishes when run again.
    /// The current master key comes from keyvault.master_key_file as for
    /// `trellis keyvault`. Then restart keyvault with the new key.
    Rewrap {
        /// The new master key (64 hex characters, mode 0600).
        #[arg(long, value_name = "FILE")]
        new_master_key: std::path::PathBuf,
    },
}

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Also provision N devices, run them simulated and show what happens.
    #[arg(long, value_name = "N")]
    pub demo: Option<usize>,
    /// Gateways to run (each on the next device and gRPC port). The demo
    /// uses two, so its function call crosses gateways.
    #[arg(long)]
    pub gateways: Option<usize>,
    /// Stop once the demo has shown a handshake, an event and a routed call
    /// (for scripts and CI); without it, run until Ctrl-C.
    #[arg(long)]
    pub exit_after_demo: bool,
}

#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// How many devices to run (the first N keys in --keys).
    #[arg(long, default_value_t = 1)]
    pub devices: usize,
    /// Directory with <id>.pem, <id>.pub.pem and cloud.pub.pem.
    #[arg(long)]
    pub keys: PathBuf,
    /// Gateway address(es) host:port, tried in order.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:5683")]
    pub gateway: Vec<String>,
    /// The cloud public key the devices trust (default: DIR/cloud.pub.pem).
    #[arg(long)]
    pub cloud_key: Option<PathBuf>,
    /// Product id reported in Hello.
    #[arg(long, default_value_t = 1)]
    pub product: u16,
    /// Firmware version reported in Hello.
    #[arg(long, default_value_t = 1)]
    pub firmware_version: u16,
    /// The firmware image the devices run (its SHA-256 goes in Hello).
    /// Default: a built-in image named after --firmware-version.
    #[arg(long)]
    pub firmware_image: Option<PathBuf>,
    /// Seconds between events published by each device (0: none).
    #[arg(long, default_value_t = 30)]
    pub event_interval: u64,
    /// Seconds between keepalive pings.
    #[arg(long, default_value_t = 15)]
    pub keepalive: u64,
    /// Region preference: --gateway lists home first. Every (re)connect
    /// starts at the first address, and a device connected elsewhere
    /// probes the first (plain TCP connect) about every N seconds,
    /// jittered over N, and moves home once it accepts (0: off; a device
    /// starts at the address that last worked).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub home_return_secs: u64,
    /// Key rotation (docs/protocol.md §6.7, §6.8): devices announce Hello
    /// extension 0x03, store announced cloud keys and rotate their own key
    /// when asked, saving both in --keys (`<id>.cloud.pub.pem`,
    /// `<id>.cloud.version`, `<id>.pem`).
    #[arg(long)]
    pub key_rotation: bool,
    /// Stop after this many seconds (0: run until Ctrl-C). With --smoke: the
    /// time the whole check may take (0: 60).
    #[arg(long, default_value_t = 0)]
    pub duration: u64,
    /// One-shot check of a running cloud (what `helm test` runs): use the
    /// first device key in --keys, or provision a throwaway one through
    /// --keyvault-url when there is none; handshake through --gateway,
    /// publish an event, answer a function call routed through
    /// --gateway-url and see the event come back. Exits 0 when all of it
    /// worked, non-zero with the step that failed otherwise.
    #[arg(long)]
    pub smoke: bool,
}

#[derive(Debug, Subcommand)]
pub enum PendingCommand {
    /// The most recently seen first: id, key id, attempts, last gateway and
    /// address (needs cluster:admin).
    List {
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Register the reviewed key as the device's, in product P.
    Approve {
        id: String,
        #[arg(long)]
        product: u32,
        /// The key id `pending list` showed (refused if the device has
        /// offered another key since).
        #[arg(long)]
        key_id: String,
        /// Default: your own.
        #[arg(long, default_value = "")]
        org: String,
    },
    /// Drop the pending key (needs cluster:admin).
    Reject { id: String },
}

/// Which key a `trellis keys` command is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyKind {
    /// The cloud key devices encrypt their handshake to.
    Cloud,
    /// The cloud release key: keyvault's signature on firmware releases
    /// and policy rotations.
    Release,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make version N+1 (audited); it becomes the current one. cloud:
    /// gateways announce it to every device with rotation support.
    /// release: products move to it by a policy rotation (`trellis policy
    /// rotate` naming it, then a rollout); until then each product's
    /// releases are signed with the version its policy trusts.
    Rotate { which: KeyKind },
    /// Every cloud key version (id, created, live/retired) and how many
    /// devices hold each (legacy devices: version 1, no rotation support),
    /// then every release key version.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Retire a version. cloud: never used for a handshake again; refused
    /// while a device seen within keys.retire_grace_days has not
    /// acknowledged a newer version. release: keyvault stops signing with
    /// it; refused while a product's policy trusts it. The current version
    /// is never retired; --force overrides the other checks.
    Retire {
        which: KeyKind,
        version: u32,
        #[arg(long)]
        force: bool,
    },
    /// Make a retired version live again (audited). cloud: the recovery for
    /// devices that missed the rotation and came back after the
    /// retirement.
    Unretire { which: KeyKind, version: u32 },
}

#[derive(Debug, Subcommand)]
pub enum QuarantineCommand {
    /// End the device's quarantine now (audited).
    Lift { id: String },
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Make a device key pair, register it, write it with the cloud key.
    Provision {
        #[arg(long)]
        product: u32,
        /// Device id (24 hex characters); random if omitted.
        #[arg(long)]
        id: Option<String>,
        /// How many devices (random ids) to provision.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Directory to write <id>.pem, <id>.pub.pem and cloud.pub.pem into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Register a public key made on the device (the normal case for hardware).
    Register {
        #[arg(long)]
        id: String,
        #[arg(long)]
        product: u32,
        /// PEM or DER SubjectPublicKeyInfo.
        #[arg(long)]
        public_key: PathBuf,
    },
    /// Every registered device with online state and firmware.
    List {
        #[arg(long, default_value_t = 0)]
        product: u32,
        #[arg(long)]
        online: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One device's state, its key id and its pending next key (if any).
    Show { id: String },
    /// Ask a connected device to rotate its key (docs/protocol.md §6.8):
    /// it makes a new key pair, keyvault registers the new public key
    /// (signed by the old key) as its next key, and the device uses it
    /// from its next handshake; the old key is refused after that.
    RotateKey {
        id: String,
        #[arg(long, default_value_t = 0)]
        timeout_ms: u32,
    },
    /// Call a function on a device (through any gateway).
    Call {
        id: String,
        function: String,
        #[arg(default_value = "")]
        argument: String,
        #[arg(long, default_value_t = 0)]
        timeout_ms: u32,
        /// Sign the call with this private key (PKCS#8 PEM) for a device
        /// whose command policy requires it; repeat for a threshold. The
        /// key is read here and never sent.
        #[arg(
            long = "sign-with",
            value_name = "KEY.pem",
            conflicts_with = "envelope"
        )]
        sign_with: Vec<PathBuf>,
        /// How long a call signed with --sign-with stays valid.
        #[arg(long, default_value = "1m")]
        valid_for: humantime::Duration,
        /// Send a command signed earlier (`trellis command sign -o FILE`);
        /// FUNCTION and ARGUMENT must match it.
        #[arg(long, value_name = "FILE")]
        envelope: Option<PathBuf>,
    },
    /// Read a variable from a device.
    Get {
        id: String,
        variable: String,
        #[arg(long, default_value_t = 0)]
        timeout_ms: u32,
    },
    /// Revoke a device: it can no longer open a session, and its live
    /// session (on any gateway, in any region) closes within a second.
    Revoke {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Delete a device's record: its key is no longer trusted, its id can
    /// be registered again, its live session closes; its audit history is
    /// kept.
    Delete {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Clone quarantine: `lift ID` ends one before it expires.
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
    /// Keys unknown devices offered at a handshake: list, approve, reject.
    #[command(subcommand)]
    Pending(PendingCommand),
    /// Set a device's tags (replacing its old ones; none: clear them), for
    /// `trellis rollout create --tag`. Tags: a-z, 0-9, '.', '_', '-'.
    Tag { id: String, tags: Vec<String> },
    /// Name a device (unique in its organisation, any case; letters,
    /// digits, '_' and '-'); the REST API and keyvault then take the name
    /// wherever they take the id. An empty NAME removes it.
    Rename { id: String, name: String },
    /// Make a device signal (Particle's rainbow LED, `particle nyan`) so
    /// someone on site can find it; `off` stops it.
    Signal {
        id: String,
        #[arg(value_parser = ["on", "off"], default_value = "on")]
        state: String,
        #[arg(long, default_value_t = 0)]
        timeout_ms: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Follow device events.
    Tail {
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// Only events whose name starts with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Start with what the stream still holds.
        #[arg(long)]
        from_start: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// The newest audit records.
    Tail {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        device: Option<String>,
    },
    /// Refused handshakes, counted per source address and reason (most
    /// recently refused first): count, first and last time, the device id
    /// the last attempt claimed and the gateway that refused it.
    Refusals {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only aggregates whose last attempt claimed this device id.
        #[arg(long)]
        device: Option<String>,
    },
}

impl Command {
    /// A short name for spans and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Up(_) => "up",
            Command::Keyvault(KeyvaultArgs { action: None }) => "keyvault",
            Command::Keyvault(KeyvaultArgs {
                action: Some(KeyvaultAction::Rewrap { .. }),
            }) => "keyvault rewrap",
            Command::Gateway => "gateway",
            Command::Signer => "signer",
            Command::Ota => "ota",
            Command::Api => "api",
            Command::Sim(_) => "sim",
            Command::Device(d) => match d {
                DeviceCommand::Provision { .. } => "device provision",
                DeviceCommand::Register { .. } => "device register",
                DeviceCommand::List { .. } => "device list",
                DeviceCommand::Show { .. } => "device show",
                DeviceCommand::RotateKey { .. } => "device rotate-key",
                DeviceCommand::Call { .. } => "device call",
                DeviceCommand::Get { .. } => "device get",
                DeviceCommand::Revoke { .. } => "device revoke",
                DeviceCommand::Delete { .. } => "device delete",
                DeviceCommand::Quarantine(QuarantineCommand::Lift { .. }) => {
                    "device quarantine lift"
                }
                DeviceCommand::Pending(PendingCommand::List { .. }) => "device pending list",
                DeviceCommand::Pending(PendingCommand::Approve { .. }) => "device pending approve",
                DeviceCommand::Pending(PendingCommand::Reject { .. }) => "device pending reject",
                DeviceCommand::Tag { .. } => "device tag",
                DeviceCommand::Rename { .. } => "device rename",
                DeviceCommand::Signal { .. } => "device signal",
            },
            Command::Keys(KeysCommand::Rotate { .. }) => "keys rotate",
            Command::Keys(KeysCommand::Status { .. }) => "keys status",
            Command::Keys(KeysCommand::Retire { .. }) => "keys retire",
            Command::Keys(KeysCommand::Unretire { .. }) => "keys unretire",
            Command::Events(_) => "events tail",
            Command::Audit(AuditCommand::Tail { .. }) => "audit tail",
            Command::Audit(AuditCommand::Refusals { .. }) => "audit refusals",
            Command::Rollout(r) => r.name(),
            Command::Webhook(c) => c.name(),
            Command::Firmware(c) => c.name(),
            Command::Release(c) => c.name(),
            Command::Policy(c) => c.name(),
            Command::SignedCommands(c) => c.name(),
            Command::Login { .. } => "login",
            Command::Whoami => "whoami",
            Command::Org(_) => "org",
            Command::Product(_) => "product",
            Command::User(_) => "user",
            Command::Token(_) => "token",
            Command::Certs(_) => "certs",
            Command::Redis(_) => "redis",
        }
    }
}

//! Real `trellis` service processes on loopback for the end-to-end tests
//! that need each service on its own (its own admin port, its own log):
//! keyvault, two gateways, signer and ota, as the Helm chart runs them,
//! configured only through `TRELLIS_*` variables.
#![allow(dead_code)]
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_core::local_redis::LocalRedis;
use trellis_core::redis_conn::acl::RedisUser;

/// A free loopback port (bound, then released for the child to take).
/// A free port, never the same one twice in this test process (see
/// `trellis_core::local_redis::free_port`).
pub fn free_port() -> u16 {
    trellis_core::local_redis::free_port().expect("a free port")
}

pub fn addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// `trellis` with none of this process's `TRELLIS_*` variables: what a user
/// who set nothing runs.
pub fn command_without_trellis_env() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trellis"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TRELLIS_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Free loopback addresses for every listener of `trellis up`, so tests
/// can run it side by side.
pub struct UpAddrs {
    pub keyvault: String,
    pub devices: String,
    pub grpc: String,
    pub signer: String,
    pub ota: String,
    pub api: String,
    pub admin: String,
}

impl UpAddrs {
    pub fn new() -> Self {
        Self {
            keyvault: addr(),
            devices: addr(),
            grpc: addr(),
            signer: addr(),
            ota: addr(),
            api: addr(),
            admin: addr(),
        }
    }

    /// The listen settings, as `TRELLIS_*` variables.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("TRELLIS_KEYVAULT__LISTEN", self.keyvault.clone()),
            ("TRELLIS_GATEWAY__DEVICE_LISTEN", self.devices.clone()),
            ("TRELLIS_GATEWAY__GRPC_LISTEN", self.grpc.clone()),
            ("TRELLIS_SIGNER__LISTEN", self.signer.clone()),
            ("TRELLIS_OTA__LISTEN", self.ota.clone()),
            ("TRELLIS_API__LISTEN", self.api.clone()),
            ("TRELLIS_TELEMETRY__ADMIN_LISTEN", self.admin.clone()),
        ]
    }

    /// `trellis up` as the README has a new user run it (working directory
    /// `dir`, nothing set but these addresses), once it is ready.
    pub async fn up_with_defaults(&self, dir: &Path) -> anyhow::Result<Proc> {
        let up = Proc::spawn_with_defaults("up", dir, &["up"], &self.env());
        wait_ok(&self.admin, "/readyz", Duration::from_secs(90), &up).await?;
        Ok(up)
    }
}

/// A child process whose stdout and stderr go to a file; killed on drop.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    /// Runs `trellis args…` with `env`, in `dir`, logging to `dir/<name>.log`.
    pub fn spawn(name: &str, dir: &Path, args: &[&str], env: &[(&str, String)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_trellis"));
        cmd.env("TRELLIS_DATA_DIR", dir.join(format!("{name}-data")));
        // Services started one by one have no credentials or certificates here: these
        // tests are about what they do, auth.rs about who may ask.
        cmd.env("TRELLIS_AUTH__MODE", "off");
        cmd.env("TRELLIS_TLS__MODE", "off");
        Self::spawn_command(cmd, name, dir, args, env)
    }

    /// As a new user runs it: working directory `dir`, no `TRELLIS_*`
    /// variable from this process's environment (so the data directory is
    /// the default, relative one), only those in `env`.
    pub fn spawn_with_defaults(
        name: &str,
        dir: &Path,
        args: &[&str],
        env: &[(&str, String)],
    ) -> Self {
        Self::spawn_command(command_without_trellis_env(), name, dir, args, env)
    }

    fn spawn_command(
        mut cmd: Command,
        name: &str,
        dir: &Path,
        args: &[&str],
        env: &[(&str, String)],
    ) -> Self {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env_remove("RUST_LOG")
            .env_remove("TRELLIS_CONFIG")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn trellis");
        Self {
            name: name.to_string(),
            log,
            child,
        }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Asks the process to stop (SIGTERM: it drains and flushes its
    /// telemetry), then kills it if it is still there after `within`.
    pub fn terminate(&mut self, within: Duration) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.stop();
    }

    /// Stops the process (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `GET path` on `addr` (HTTP/1.1, one request per connection): status and body.
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .context("read timed out")??;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        bail!("chunked bodies are not handled");
    }
    Ok((status, body.to_string()))
}

/// Waits until `GET path` on `addr` answers 200.
pub async fn wait_ok(addr: &str, path: &str, within: Duration, what: &Proc) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < within {
        match http_get(addr, path).await {
            Ok((200, _)) => return Ok(()),
            Ok((status, body)) => last = format!("{status}: {body}"),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "{} never answered 200 on {path} ({last})\n--- its output:\n{}",
        what.name,
        what.output()
    )
}

/// The addresses of one gateway process.
pub struct GatewayProc {
    pub id: String,
    pub devices: String,
    pub grpc: String,
    pub admin: String,
    pub proc: Proc,
}

/// Keyvault, two gateways, signer and ota, each its own `trellis` process.
pub struct Services {
    pub keyvault: String,
    pub keyvault_admin: String,
    pub signer: String,
    pub signer_admin: String,
    pub ota: String,
    pub ota_admin: String,
    pub gateways: Vec<GatewayProc>,
    /// The master key (hex) keyvault seals the cloud keys with.
    pub master_key_hex: String,
    procs: Vec<Proc>,
}

pub struct Options<'a> {
    /// Started with `LocalRedis::start_with_users`: each service process
    /// then connects as its own ACL user (`redis.username`,
    /// `redis.password_file`), as a deployment does.
    pub redis: &'a LocalRedis,
    pub dir: &'a Path,
    pub otlp: Option<&'a str>,
    pub log: &'a str,
}

impl Services {
    pub async fn start(o: Options<'_>) -> anyhow::Result<Self> {
        let master_key_hex = hex::encode(rand::random::<[u8; 32]>());
        let key_file = o.dir.join("master.key");
        std::fs::write(&key_file, &master_key_hex)?;
        // keyvault refuses a master key file others can read.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
        }
        let (keyvault, keyvault_admin) = (addr(), addr());
        let (signer, signer_admin) = (addr(), addr());
        let (ota, ota_admin) = (addr(), addr());
        let common = |admin: &str, user: RedisUser| {
            let mut env = vec![
                ("TRELLIS_REDIS__URL", o.redis.url()),
                ("TRELLIS_REGION", "test-region".to_string()),
                ("TRELLIS_TELEMETRY__ADMIN_LISTEN", admin.to_string()),
                ("TRELLIS_TELEMETRY__LOG", o.log.to_string()),
                ("TRELLIS_TELEMETRY__ENVIRONMENT", "test".to_string()),
            ];
            if let Some(otlp) = o.otlp {
                env.push(("TRELLIS_TELEMETRY__OTLP_ENDPOINT", otlp.to_string()));
            }
            if let Some(password) = o.redis.password_for(user) {
                let file = o.dir.join(format!("{}.redis-password", user.service()));
                std::fs::write(&file, password).expect("write the Redis password file");
                env.push(("TRELLIS_REDIS__USERNAME", user.name().to_string()));
                env.push(("TRELLIS_REDIS__PASSWORD_FILE", file.display().to_string()));
            }
            env
        };
        let mut procs = Vec::new();
        let mut env = common(&keyvault_admin, RedisUser::Keyvault);
        env.extend([
            ("TRELLIS_KEYVAULT__LISTEN", keyvault.clone()),
            (
                "TRELLIS_KEYVAULT__MASTER_KEY_FILE",
                key_file.display().to_string(),
            ),
            ("TRELLIS_KEYVAULT__WORKERS", "1".to_string()),
        ]);
        let kv = Proc::spawn("keyvault", o.dir, &["keyvault"], &env);
        wait_ok(&keyvault_admin, "/readyz", Duration::from_secs(60), &kv).await?;
        trellis_tests::connect_keyvault(keyvault.parse()?)
            .await
            .with_context(|| kv.output())?;
        procs.push(kv);

        let mut gateways = Vec::new();
        for n in 1..=2 {
            let (id, devices, grpc, admin) = (format!("gw-{n}"), addr(), addr(), addr());
            let mut env = common(&admin, RedisUser::Gateway);
            env.extend([
                ("TRELLIS_GATEWAY__ID", id.clone()),
                ("TRELLIS_GATEWAY__DEVICE_LISTEN", devices.clone()),
                ("TRELLIS_GATEWAY__GRPC_LISTEN", grpc.clone()),
                (
                    "TRELLIS_GATEWAY__KEYVAULT_URL",
                    format!("http://{keyvault}"),
                ),
                ("TRELLIS_GATEWAY__OTA_URL", format!("http://{ota}")),
                ("TRELLIS_GATEWAY__HANDSHAKE_STEP_TIMEOUT_MS", "2000".into()),
                ("TRELLIS_GATEWAY__HANDSHAKE_TIMEOUT_MS", "5000".into()),
                ("TRELLIS_GATEWAY__COMMAND_TIMEOUT_MS", "5000".into()),
            ]);
            let g = GatewayProc {
                proc: Proc::spawn(&id, o.dir, &["gateway"], &env),
                id,
                devices,
                grpc,
                admin,
            };
            wait_ok(&g.admin, "/readyz", Duration::from_secs(60), &g.proc).await?;
            gateways.push(g);
        }

        let mut env = common(&signer_admin, RedisUser::Signer);
        env.extend([
            ("TRELLIS_SIGNER__LISTEN", signer.clone()),
            ("TRELLIS_SIGNER__KEYVAULT_URL", format!("http://{keyvault}")),
        ]);
        let s = Proc::spawn("signer", o.dir, &["signer"], &env);
        wait_ok(&signer_admin, "/readyz", Duration::from_secs(60), &s).await?;
        procs.push(s);

        let mut env = common(&ota_admin, RedisUser::Ota);
        env.extend([
            ("TRELLIS_OTA__LISTEN", ota.clone()),
            (
                "TRELLIS_OTA__GATEWAY_URL",
                format!("http://{}", gateways[1].grpc),
            ),
            ("TRELLIS_OTA__SIGNER_URL", format!("http://{signer}")),
            ("TRELLIS_OTA__TICK_MS", "200".into()),
        ]);
        let p = Proc::spawn("ota", o.dir, &["ota"], &env);
        wait_ok(&ota_admin, "/readyz", Duration::from_secs(60), &p).await?;
        procs.push(p);

        Ok(Self {
            keyvault,
            keyvault_admin,
            signer,
            signer_admin,
            ota,
            ota_admin,
            gateways,
            master_key_hex,
            procs,
        })
    }

    /// Every service's admin address, by name.
    pub fn admins(&self) -> Vec<(String, String)> {
        let mut out = vec![("keyvault".to_string(), self.keyvault_admin.clone())];
        for g in &self.gateways {
            out.push((g.id.clone(), g.admin.clone()));
        }
        out.push(("signer".into(), self.signer_admin.clone()));
        out.push(("ota".into(), self.ota_admin.clone()));
        out
    }

    /// Everything every service process wrote, by name.
    pub fn outputs(&self) -> Vec<(String, String)> {
        self.procs
            .iter()
            .chain(self.gateways.iter().map(|g| &g.proc))
            .map(|p| (p.name.clone(), p.output()))
            .collect()
    }

    /// Runs a `trellis` CLI command against these services; its output.
    pub fn cli(
        &self,
        gateway: usize,
        args: &[&str],
        extra: &[(&str, String)],
    ) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_trellis"))
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("TRELLIS_CONFIG")
            .env("TRELLIS_TLS__MODE", "off")
            .env(
                "TRELLIS_GATEWAY_URL",
                format!("http://{}", self.gateways[gateway].grpc),
            )
            .env("TRELLIS_KEYVAULT_URL", format!("http://{}", self.keyvault))
            .env("TRELLIS_OTA_URL", format!("http://{}", self.ota))
            .env("TRELLIS_SIGNER_URL", format!("http://{}", self.signer))
            .envs(extra.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run trellis")
    }

    /// SIGTERM to every service, so each flushes its spans and logs.
    pub fn terminate(&mut self) {
        for p in &mut self.procs {
            p.terminate(Duration::from_secs(10));
        }
        for g in &mut self.gateways {
            g.proc.terminate(Duration::from_secs(10));
        }
    }

    pub fn stop(&mut self) {
        for p in &mut self.procs {
            p.stop();
        }
        for g in &mut self.gateways {
            g.proc.stop();
        }
    }
}

/// Stdout of a CLI run that must succeed.
pub fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "trellis failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

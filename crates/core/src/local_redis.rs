//! A `redis-server` child process on a free loopback port: what `trellis up`
//! runs when no Redis URL is configured, and what tests start. Killed when
//! dropped, so a test that fails never leaves a server behind.
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::redis_conn::acl::{self, RedisUser};

#[derive(Debug, thiserror::Error)]
pub enum LocalRedisError {
    #[error(
        "cannot start redis-server ({0}); install it (Debian: apt-get install redis-server) or set redis.url / TRELLIS_REDIS__URL"
    )]
    Spawn(std::io::Error),
    #[error("no free loopback port: {0}")]
    NoPort(std::io::Error),
    #[error("redis-server on port {port} did not answer PING within {secs} s (log: {log}){tail}")]
    NotReady {
        port: u16,
        secs: u64,
        log: String,
        tail: String,
    },
    #[error("redis-server exited at start ({status}; log: {log}){tail}")]
    Exited {
        status: std::process::ExitStatus,
        log: String,
        tail: String,
    },
    #[error("cannot prepare the redis data directory {dir}: {source}")]
    DataDir {
        dir: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug)]
pub struct LocalRedis {
    child: Child,
    port: u16,
    _tmp: Option<tempfile::TempDir>,
    users: Option<Users>,
}

/// Who may connect to a server started with [`LocalRedis::start_with_users`].
#[derive(Clone)]
struct Users {
    /// `default`'s password; `None`: `default` is open (tests).
    admin: Option<String>,
    services: Vec<(RedisUser, String)>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Users(***)")
    }
}

/// How `default`, the administrator's user, is reached on a server with
/// per-service users.
pub enum Admin<'a> {
    /// No password (tests on loopback: they read and poke every key).
    Open,
    /// This password (`trellis up`: kept in the data directory, 0600).
    Password(&'a str),
}

/// Where the server keeps its data: a directory kept across runs (with
/// append-only persistence) or a throwaway one for tests.
pub enum RedisData<'a> {
    Persistent(&'a Path),
    Ephemeral,
}

impl LocalRedis {
    pub fn start(data: RedisData<'_>) -> Result<Self, LocalRedisError> {
        let port = free_port().map_err(LocalRedisError::NoPort)?;
        Self::start_on(port, data)
    }

    /// Starts with one ACL user per service ([`RedisUser`], fresh random
    /// passwords) besides `default`: what `trellis up` runs, and what the
    /// tests run so that every service in them works with no more than
    /// its own keys. [`LocalRedis::url_for`] is a service's URL.
    pub fn start_with_users(
        data: RedisData<'_>,
        admin: Admin<'_>,
    ) -> Result<Self, LocalRedisError> {
        let port = free_port().map_err(LocalRedisError::NoPort)?;
        let users = Users {
            admin: match admin {
                Admin::Open => None,
                Admin::Password(p) => Some(p.to_string()),
            },
            services: RedisUser::ALL
                .into_iter()
                .map(|u| (u, acl::new_password()))
                .collect(),
        };
        Self::start_inner(port, data, Some(users))
    }

    /// Starts on a given port (a restarted test server keeps its address).
    pub fn start_on(port: u16, data: RedisData<'_>) -> Result<Self, LocalRedisError> {
        Self::start_inner(port, data, None)
    }

    fn start_inner(
        port: u16,
        data: RedisData<'_>,
        users: Option<Users>,
    ) -> Result<Self, LocalRedisError> {
        let (dir, tmp, persist) = match data {
            RedisData::Persistent(dir) => (dir.to_path_buf(), None, true),
            RedisData::Ephemeral => {
                let tmp = tempfile::Builder::new()
                    .prefix("trellis-redis-")
                    .tempdir()
                    .map_err(|source| LocalRedisError::DataDir {
                        dir: std::env::temp_dir(),
                        source,
                    })?;
                (tmp.path().to_path_buf(), Some(tmp), false)
            }
        };
        let data_dir = |source| LocalRedisError::DataDir {
            dir: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(data_dir)?;
        // redis-server changes into --dir before it opens --logfile: every
        // path it is given must be absolute or it means another file.
        let dir = std::path::absolute(&dir).map_err(data_dir)?;
        let log = dir.join("redis.log");
        // What it prints before its log file is open (a bad argument, a
        // log file it cannot create) goes to its own stderr: keep that too.
        let early = dir.join("redis-start.log");
        let early_out = std::fs::File::create(&early).map_err(data_dir)?;
        let early_err = early_out.try_clone().map_err(data_dir)?;
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(&log)
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg(if persist { "yes" } else { "no" })
            .arg("--protected-mode")
            .arg("yes")
            .stdin(Stdio::null())
            .stdout(early_out)
            .stderr(early_err);
        if let Some(users) = &users {
            // Written anew at every start (the passwords are new too); the
            // file holds password hashes only.
            let file = dir.join("users.acl");
            std::fs::write(
                &file,
                acl::acl_file(users.admin.as_deref(), &users.services),
            )
            .map_err(data_dir)?;
            cmd.arg("--aclfile").arg(&file);
        }
        let child = cmd.spawn().map_err(LocalRedisError::Spawn)?;
        let mut server = LocalRedis {
            child,
            port,
            _tmp: tmp,
            users,
        };
        server.wait_ready(Duration::from_secs(10), &log, &early)?;
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The administrator's URL (`default`, with its password if it has one).
    pub fn url(&self) -> String {
        match self.users.as_ref().and_then(|u| u.admin.as_deref()) {
            Some(password) => format!("redis://default:{password}@127.0.0.1:{}/", self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    /// `user`'s password on a server with per-service users.
    pub fn password_for(&self, user: RedisUser) -> Option<&str> {
        self.users
            .as_ref()?
            .services
            .iter()
            .find(|(s, _)| *s == user)
            .map(|(_, p)| p.as_str())
    }

    /// The URL `user` connects with: its own ACL user on a server started
    /// with [`LocalRedis::start_with_users`], else [`LocalRedis::url`].
    pub fn url_for(&self, user: RedisUser) -> String {
        match self.password_for(user) {
            Some(p) => format!("redis://{}:{p}@127.0.0.1:{}/", user.name(), self.port),
            None => self.url(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn wait_ready(
        &mut self,
        within: Duration,
        log: &Path,
        early: &Path,
    ) -> Result<(), LocalRedisError> {
        let start = Instant::now();
        while start.elapsed() < within {
            if ping(self.port) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(LocalRedisError::Exited {
                    status,
                    log: log.display().to_string(),
                    tail: last_lines(&[early, log], 10),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(LocalRedisError::NotReady {
            port: self.port,
            secs: within.as_secs(),
            log: log.display().to_string(),
            tail: last_lines(&[early, log], 10),
        })
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `n` lines of what the server wrote, as an indented block that
/// follows an error sentence (empty when it wrote nothing).
fn last_lines(files: &[&Path], n: usize) -> String {
    let mut lines: Vec<String> = Vec::new();
    for file in files {
        if let Ok(text) = std::fs::read_to_string(file) {
            lines.extend(
                text.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_string),
            );
        }
    }
    let start = lines.len().saturating_sub(n);
    lines[start..]
        .iter()
        .map(|l| format!("\n  | {l}"))
        .collect()
}

fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    // A server whose `default` user has a password answers NOAUTH: up too.
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH"))
}

/// A free TCP port on 127.0.0.1 (bind to port 0, read it, release it).
///
/// Never the same port twice in one process: the kernel may hand a port
/// just released by `bind(0)` out again, and two servers started from one
/// process (a test's Redis and its services) would then collide.
pub fn free_port() -> std::io::Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_that_dies_at_start_is_reported_with_its_own_words() {
        // Hold the port so redis-server cannot bind it and exits at once.
        let held = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = held.local_addr().expect("addr").port();
        let err = LocalRedis::start_on(port, RedisData::Ephemeral).expect_err("port is taken");
        let text = err.to_string();
        assert!(
            matches!(err, LocalRedisError::Exited { .. }),
            "expected an early exit, got: {text}"
        );
        assert!(text.contains("  | "), "no output tail in: {text}");
        assert!(
            text.to_lowercase().contains("address already in use") || text.contains("bind"),
            "the tail should say why: {text}"
        );
    }
}

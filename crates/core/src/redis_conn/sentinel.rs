//! The durable-record connection when Redis Sentinel manages the primary:
//! asks the sentinels where the primary is (`SENTINEL
//! get-master-addr-by-name`), checks that the server named really is a
//! primary (`role:master`), and when a command fails the way a lost or
//! demoted primary fails (refused, dropped, timed out, `READONLY`,
//! `MASTERDOWN`), forgets it and asks again, so the services follow a
//! failover by themselves.
//!
//! While no primary is reachable, reads go to this region's copy (the
//! local replica, `redis.durable_url`) when one is configured; writes are
//! retried for up to `redis.failover_wait_ms` and then fail with an error
//! that says the durable primary is unavailable. A write is retried only
//! when it surely did not run (refused connection, `READONLY`,
//! `MASTERDOWN`, no primary known); one that may have run (connection
//! dropped after sending) fails at once, so nothing runs twice.
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{
    Cmd, ConnectionAddr, ErrorKind, IntoConnectionInfo, RedisError, RedisResult, ServerErrorKind,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::Instrument;

/// Pause between two attempts while no primary is reachable.
const RETRY_STEP: Duration = Duration::from_millis(200);
/// Connect / answer timeout when talking to one sentinel.
const SENTINEL_TIMEOUT: Duration = Duration::from_millis(1_000);
/// Connect timeout to a primary the sentinels named.
const PRIMARY_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) struct SentinelConn {
    sentinels: Vec<String>,
    master: String,
    /// Credentials and database for the primary (its address is replaced).
    template: redis::ConnectionInfo,
    wait: Duration,
    current: Mutex<Option<Primary>>,
    resolving: tokio::sync::Mutex<()>,
    generation: std::sync::atomic::AtomicU64,
    /// This region's copy of the durable records, for reads while no
    /// primary is reachable.
    replica: Option<ConnectionManager>,
}

#[derive(Clone)]
struct Primary {
    addr: String,
    conn: ConnectionManager,
    generation: u64,
}

impl std::fmt::Debug for SentinelConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelConn")
            .field("sentinels", &self.sentinels)
            .field("master", &self.master)
            .field("primary", &self.cached().map(|p| p.addr))
            .finish()
    }
}

impl SentinelConn {
    /// `template` carries credentials and database (from `durable_url` or
    /// `url`); `replica_url` is this region's copy for reads during a
    /// failover.
    pub(super) async fn new(
        sentinels: Vec<String>,
        master: String,
        template: Option<&str>,
        replica_url: Option<&str>,
        wait: Duration,
    ) -> RedisResult<Self> {
        let template = template
            .unwrap_or("redis://127.0.0.1:6379/")
            .into_connection_info()?;
        let replica = match replica_url {
            Some(url) => match super::connect_manager(url).await {
                Ok(conn) => Some(conn),
                Err(e) => {
                    // Not fatal: the replica is only a fallback for reads.
                    tracing::warn!(url = %super::redact_url(url), error = %e, "durable replica unreachable; reads during a failover will wait for the new primary");
                    None
                }
            },
            None => None,
        };
        Ok(Self {
            sentinels,
            master,
            template,
            wait,
            current: Mutex::new(None),
            resolving: tokio::sync::Mutex::new(()),
            generation: std::sync::atomic::AtomicU64::new(0),
            replica,
        })
    }

    pub(super) fn db(&self) -> i64 {
        self.template.redis_settings().db()
    }

    pub(super) fn has_replica(&self) -> bool {
        self.replica.is_some()
    }

    fn cached(&self) -> Option<Primary> {
        self.current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The primary now known, or the one the sentinels name.
    pub(super) async fn primary_addr(&self) -> RedisResult<String> {
        self.primary().await.map(|p| p.addr)
    }

    async fn primary(&self) -> RedisResult<Primary> {
        if let Some(p) = self.cached() {
            return Ok(p);
        }
        let _one_at_a_time = self.resolving.lock().await;
        if let Some(p) = self.cached() {
            return Ok(p);
        }
        let span = tracing::info_span!(
            "redis.sentinel.resolve",
            master = %self.master,
            sentinels = self.sentinels.len(),
            primary = tracing::field::Empty,
        );
        let (addr, conn) = self.resolve().instrument(span.clone()).await?;
        span.record("primary", addr.as_str());
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        tracing::info!(master = %self.master, primary = %addr, generation, "durable Redis primary found through Sentinel");
        let p = Primary {
            addr,
            conn,
            generation,
        };
        *self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(p.clone());
        Ok(p)
    }

    /// Drops the primary of `generation` (it failed); the next command asks
    /// the sentinels again.
    fn forget(&self, generation: u64, error: &RedisError) {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(p) = current.as_ref()
            && p.generation == generation
        {
            tracing::warn!(master = %self.master, primary = %p.addr, %error, "durable Redis primary lost; asking Sentinel again");
            *current = None;
        }
    }

    async fn resolve(&self) -> RedisResult<(String, ConnectionManager)> {
        let mut problems = Vec::new();
        for sentinel in &self.sentinels {
            let (host, port) = match self.ask(sentinel).await {
                Ok(Some(addr)) => addr,
                Ok(None) => {
                    problems.push(format!(
                        "{sentinel}: does not know master {:?}",
                        self.master
                    ));
                    continue;
                }
                Err(e) => {
                    problems.push(format!("{sentinel}: {e}"));
                    continue;
                }
            };
            let addr = format!("{host}:{port}");
            match self.connect_primary(&host, port).await {
                Ok(conn) => return Ok((addr, conn)),
                Err(e) => problems.push(format!("{sentinel} names {addr}: {e}")),
            }
        }
        Err(RedisError::from((
            ErrorKind::MasterNameNotFoundBySentinel,
            "no reachable durable Redis primary",
            format!("master {:?}: {}", self.master, problems.join("; ")),
        )))
    }

    async fn ask(&self, sentinel: &str) -> RedisResult<Option<(String, u16)>> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(SENTINEL_TIMEOUT))
            .set_response_timeout(Some(SENTINEL_TIMEOUT));
        let mut conn = redis::Client::open(format!("redis://{sentinel}/"))?
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let reply: Option<(String, String)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master)
            .query_async(&mut conn)
            .await?;
        Ok(reply.and_then(|(host, port)| Some((host, port.parse().ok()?))))
    }

    async fn connect_primary(&self, host: &str, port: u16) -> RedisResult<ConnectionManager> {
        let info = self
            .template
            .clone()
            .set_addr(ConnectionAddr::Tcp(host.to_string(), port));
        let client = super::client(info)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(PRIMARY_CONNECT_TIMEOUT))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(1);
        let mut conn = ConnectionManager::new_with_config(client, config).await?;
        // A sentinel can name a server that has not been promoted yet (or
        // the old primary before it learns it was demoted): check.
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await?;
        if info.lines().any(|l| l.trim() == "role:master") {
            Ok(conn)
        } else {
            Err(RedisError::from((
                ErrorKind::Server(ServerErrorKind::ReadOnly),
                "named server is not a primary (yet)",
            )))
        }
    }

    /// Runs `op` against the primary, following failovers; reads fall back
    /// to the replica while no primary is reachable.
    pub(super) async fn run<'c, T, P>(&self, read: bool, op: P) -> RedisResult<T>
    where
        P: Fn(ConnectionManager) -> redis::RedisFuture<'c, T>,
    {
        let deadline = Instant::now() + self.wait;
        let mut last: Option<RedisError>;
        loop {
            match self.primary().await {
                Ok(p) => match op(p.conn.clone()).await {
                    Ok(v) => return Ok(v),
                    Err(e) if lost_primary(&e) => {
                        self.forget(p.generation, &e);
                        if !(read || surely_not_run(&e)) {
                            return Err(e);
                        }
                        last = Some(e);
                    }
                    Err(e) => return Err(e),
                },
                Err(e) => last = Some(e),
            }
            if read && let Some(replica) = &self.replica {
                match op(replica.clone()).await {
                    Ok(v) => {
                        tracing::debug!(master = %self.master, "durable read served by the local replica");
                        return Ok(v);
                    }
                    Err(e) => last = Some(e),
                }
            }
            if Instant::now() >= deadline {
                let detail = last.map(|e| e.to_string()).unwrap_or_default();
                return Err(RedisError::from((
                    ErrorKind::Server(ServerErrorKind::MasterDown),
                    "durable Redis primary unavailable (Sentinel failover not finished)",
                    format!(
                        "master {:?}, waited {} ms: {detail}",
                        self.master,
                        self.wait.as_millis()
                    ),
                )));
            }
            tokio::time::sleep(RETRY_STEP).await;
        }
    }
}

/// The error says the primary is gone, demoted or not reachable.
fn lost_primary(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_timeout()
        || surely_not_run(e)
}

/// The command was certainly not executed, so sending it again is safe.
fn surely_not_run(e: &RedisError) -> bool {
    e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::ReadOnly
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
            )
        )
}

/// Commands that only read (safe to retry, and to send to a replica).
pub(super) fn is_read(cmd: &Cmd) -> bool {
    const READS: &[&str] = &[
        "GET",
        "MGET",
        "STRLEN",
        "GETRANGE",
        "EXISTS",
        "TTL",
        "PTTL",
        "TYPE",
        "HGET",
        "HMGET",
        "HGETALL",
        "HEXISTS",
        "HLEN",
        "HKEYS",
        "HVALS",
        "HSCAN",
        "SMEMBERS",
        "SISMEMBER",
        "SCARD",
        "SSCAN",
        "ZRANGE",
        "ZREVRANGE",
        "ZRANGEBYSCORE",
        "ZREVRANGEBYSCORE",
        "ZSCORE",
        "ZCARD",
        "ZSCAN",
        "LRANGE",
        "LLEN",
        "LINDEX",
        "XRANGE",
        "XREVRANGE",
        "XLEN",
        "SCAN",
        "PING",
        "EVAL_RO",
        "EVALSHA_RO",
    ];
    match cmd.args_iter().next() {
        Some(redis::Arg::Simple(name)) => READS
            .iter()
            .any(|r| name.eq_ignore_ascii_case(r.as_bytes())),
        _ => false,
    }
}

/// Wraps the sentinel-backed connection as a `ConnectionLike`.
pub(super) fn command<'a>(
    conn: Arc<SentinelConn>,
    cmd: &'a Cmd,
) -> redis::RedisFuture<'a, redis::Value> {
    Box::pin(async move {
        let read = is_read(cmd);
        conn.run(read, |mut c| {
            Box::pin(async move { c.req_packed_command(cmd).await })
        })
        .await
    })
}

pub(super) fn pipeline<'a>(
    conn: Arc<SentinelConn>,
    pipe: &'a redis::Pipeline,
    offset: usize,
    count: usize,
) -> redis::RedisFuture<'a, Vec<redis::Value>> {
    Box::pin(async move {
        let read = pipe.cmd_iter().all(is_read);
        conn.run(read, |mut c| {
            Box::pin(async move { c.req_packed_commands(pipe, offset, count).await })
        })
        .await
    })
}

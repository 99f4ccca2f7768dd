//! The fleet simulator: thousands of devices as tasks on one runtime (no
//! thread per device), each reconnecting with jittered exponential backoff
//! and failing over across endpoints (a gateway that does not accept is
//! left at once, one that accepts and turns the handshake away as busy is
//! retried first: failover.rs), reporting what happens on a channel.
//! A device that receives a verified firmware update "applies" it: it swaps
//! its running image and version, and reconnects at once with Hello flag
//! bit 0 set and the new image's SHA-256.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::RngExt;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use trellis_firmware::TrustPolicy;
use trellis_wire::DeviceId;
use trellis_wire::hello::FLAG_UPDATED;

use crate::app::{DemoApp, DeviceApp};
use crate::failover::{DEFAULT_MAX_TURNED_AWAY, Failover, Failure, Next};
use crate::identity::DeviceIdentity;
use crate::session::{Session, SessionConfig, SessionEnd, SessionEvent};

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub product_id: u16,
    pub firmware_version: u16,
    pub platform_id: u16,
    /// The image the devices claim to run; its SHA-256 goes in Hello.
    pub firmware_image: Vec<u8>,
    pub event_interval: Option<Duration>,
    pub event_name: String,
    pub keepalive: Duration,
    pub send_public_key: bool,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
    /// Initial connects are spread uniformly over this window, so a fleet
    /// start is a ramp rather than one burst (zero: all at once).
    pub start_spread: Duration,
    /// The release keys every device trusts and how many must sign
    /// (`identity::load_trust_policy` reads `policy.json`). `None`: the
    /// devices refuse every update.
    pub trust_policy: Option<TrustPolicy>,
    /// Updates must have a version above this (and above the running one).
    pub version_floor: u32,
    /// Region preference: the endpoints are in preferred order (the first
    /// is home). With `Some(n)`, every (re)connect starts at the first
    /// endpoint, and a device in session anywhere else probes the first
    /// with a plain TCP connect about every `n` (each wait uniform in
    /// [n/2, 3n/2], the first one uniform in [0, n], so a region that comes
    /// back sees its devices return spread over `n`, not as one storm); when
    /// the probe is accepted the device ends its session and goes home.
    /// `None`: a device starts at the endpoint that last worked.
    pub home_return: Option<Duration>,
    /// A gateway that accepts the TCP connection and then turns the
    /// handshake away (closes it: busy, most often) is retried with
    /// backoff; after this many such failures in a row the device moves on
    /// to the next endpoint (failover.rs). One that does not accept is left
    /// at once. 1: move on after any failure.
    pub max_turned_away: u32,
    /// Where each device keeps what it must remember across restarts: the
    /// signed trust policy it accepted last (`<device id>.policy.bin`, the
    /// exact `SignedPolicy` bytes), loaded at start in place of
    /// `trust_policy`. `None`: an accepted policy lasts until the process
    /// ends.
    pub state_dir: Option<PathBuf>,
    /// Key rotation (docs/protocol.md §6.7, §6.8): devices announce Hello
    /// extension 0x03, store announced cloud keys and rotate their own key
    /// when asked. Off: legacy devices.
    pub key_rotation: bool,
    /// Where rotated keys are saved (the fleet's key directory), so they
    /// survive a restart; `None`: in memory only.
    pub keys_dir: Option<std::path::PathBuf>,
}

/// File (inside [`SimConfig::state_dir`]) holding a device's accepted
/// signed trust policy.
pub fn policy_state_file(dir: &Path, device_id: &DeviceId) -> PathBuf {
    dir.join(format!("{device_id}.policy.bin"))
}

/// The trust policy a device persisted after a rotation, if any. A file that
/// is there but does not hold a valid signed policy is an error, never
/// silently the provisioned policy.
pub fn load_persisted_policy(
    dir: &Path,
    device_id: &DeviceId,
) -> Result<Option<TrustPolicy>, String> {
    let path = policy_state_file(dir, device_id);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let signed = trellis_firmware::decode_signed_policy(&bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    trellis_firmware::decode_policy(&signed.policy)
        .map(Some)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes the accepted signed policy (to a temporary file, then renamed, so
/// a crash leaves the old policy or the new one, never half of one).
fn persist_policy(dir: &Path, device_id: &DeviceId, signed: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = policy_state_file(dir, device_id);
    let tmp = path.with_extension("bin.tmp");
    std::fs::write(&tmp, signed)?;
    std::fs::rename(&tmp, &path)
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            product_id: 6,
            firmware_version: 1,
            platform_id: 6,
            firmware_image: Vec::new(),
            event_interval: Some(Duration::from_secs(60)),
            event_name: "sim/telemetry".into(),
            keepalive: Duration::from_secs(15),
            send_public_key: true,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            start_spread: Duration::ZERO,
            trust_policy: None,
            version_floor: 0,
            home_return: None,
            max_turned_away: DEFAULT_MAX_TURNED_AWAY,
            state_dir: None,
            key_rotation: false,
            keys_dir: None,
        }
    }
}

/// What happened to one simulated device.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceReport {
    Connected {
        device_id: DeviceId,
        endpoint: String,
        handshake: Duration,
    },
    HandshakeFailed {
        device_id: DeviceId,
        endpoint: String,
        error: String,
    },
    Disconnected {
        device_id: DeviceId,
        reason: String,
    },
    EventPublished {
        device_id: DeviceId,
        name: String,
    },
    FunctionCalled {
        device_id: DeviceId,
        name: String,
        argument: Vec<u8>,
        result: i32,
    },
    VariableRead {
        device_id: DeviceId,
        name: String,
    },
    /// Asked to signal (Particle's "nyan") or to stop.
    Signaled {
        device_id: DeviceId,
        on: bool,
    },
    /// A function call its command guard refused (signed commands).
    CommandRefused {
        device_id: DeviceId,
        name: String,
        reason: String,
    },
    /// A trust policy rotation the device accepted (and persisted, with a
    /// state directory).
    PolicyAccepted {
        device_id: DeviceId,
        version: u64,
        sha256: [u8; 32],
    },
    /// A trust policy rotation the device refused, with the reason code.
    PolicyRejected {
        device_id: DeviceId,
        reason_code: String,
        message: String,
    },
    /// A verified cloud key announcement was stored.
    CloudKeyStored {
        device_id: DeviceId,
        version: u32,
    },
    /// A cloud key announcement was refused.
    CloudKeyRefused {
        device_id: DeviceId,
        reason: String,
    },
    /// The device's new key was registered; used from the next handshake.
    DeviceKeyCommitted {
        device_id: DeviceId,
    },
}

/// Full-jitter exponential backoff: uniform in [d/2, d], d = base·2^attempt
/// capped at max. Jitter is what keeps a recovering fleet from returning in
/// synchronised waves (the Particle firmware's fixed schedule does).
fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let d = base
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(max);
    let half = d / 2;
    half + Duration::from_nanos(
        rand::rng().random_range(0..=u64::try_from(half.as_nanos()).unwrap_or(u64::MAX)),
    )
}

/// Probes `home` with a plain TCP connect (no handshake: nothing for the
/// key vault to do) about every `every`, jittered, and cancels `leave` once
/// it is accepted.
async fn probe_home(
    home: String,
    every: Duration,
    connect_timeout: Duration,
    leave: CancellationToken,
) {
    let every_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX).max(1);
    // The first wait is uniform over the whole interval: devices that
    // failed over together (one storm) must not probe, and return, together.
    let mut wait = Duration::from_millis(rand::rng().random_range(0..=every_ms));
    loop {
        tokio::select! {
            _ = leave.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        if let Ok(Ok(stream)) = timeout(connect_timeout, TcpStream::connect(&home)).await {
            drop(stream);
            leave.cancel();
            return;
        }
        wait = Duration::from_millis(every_ms / 2 + rand::rng().random_range(0..=every_ms));
    }
}

/// Starts every device; the handle completes once all of them have stopped
/// after `shutdown` is cancelled.
pub fn run_fleet(
    identities: Vec<DeviceIdentity>,
    config: SimConfig,
    endpoints: Vec<String>,
    shutdown: CancellationToken,
    reports: UnboundedSender<DeviceReport>,
) -> JoinHandle<()> {
    let session_config = SessionConfig {
        product_id: config.product_id,
        firmware_version: config.firmware_version,
        platform_id: config.platform_id,
        firmware_sha256: Sha256::digest(&config.firmware_image).into(),
        keepalive: config.keepalive,
        event_interval: config.event_interval,
        event_name: config.event_name.clone(),
        send_public_key: config.send_public_key,
        trust_policy: config.trust_policy.clone(),
        version_floor: config.version_floor,
        ..SessionConfig::default()
    };
    let config = Arc::new(config);
    let session_config = Arc::new(session_config);
    let endpoints = Arc::new(endpoints);
    tokio::spawn(async move {
        let mut set = JoinSet::new();
        for identity in identities {
            let keys = if config.key_rotation {
                match crate::keys::DeviceKeys::load(&identity, config.keys_dir.as_deref()) {
                    Ok(k) => Some(k.shared()),
                    Err(e) => {
                        tracing::warn!(device_id = %identity.device_id, error = %e, "cannot load the device's rotated keys; using its identity");
                        crate::keys::DeviceKeys::load(&identity, None)
                            .ok()
                            .map(crate::keys::DeviceKeys::shared)
                    }
                }
            } else {
                None
            };
            let device = Device {
                keys,
                identity,
                config: config.clone(),
                session_config: session_config.clone(),
                endpoints: endpoints.clone(),
                reports: reports.clone(),
                app: Arc::new(DemoApp::default()),
            };
            set.spawn(device.run(shutdown.clone()));
        }
        while set.join_next().await.is_some() {}
    })
}

struct Device {
    identity: DeviceIdentity,
    keys: Option<crate::keys::SharedKeys>,
    config: Arc<SimConfig>,
    session_config: Arc<SessionConfig>,
    endpoints: Arc<Vec<String>>,
    reports: UnboundedSender<DeviceReport>,
    app: Arc<dyn DeviceApp>,
}

impl Device {
    fn report(&self, r: DeviceReport) {
        // A dropped receiver only means nobody is listening any more.
        let _ = self.reports.send(r);
    }

    async fn run(self, shutdown: CancellationToken) {
        let device_id = self.identity.device_id;
        if !self.config.start_spread.is_zero() {
            let spread = u64::try_from(self.config.start_spread.as_millis()).unwrap_or(u64::MAX);
            let wait = Duration::from_millis(rand::rng().random_range(0..=spread));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // What this device runs; an applied update changes it.
        let mut session_config = (*self.session_config).clone();
        if let Some(dir) = &self.config.state_dir {
            match load_persisted_policy(dir, &device_id) {
                Ok(Some(policy)) => {
                    tracing::info!(%device_id, version = policy.version(), "trust policy loaded from the state directory");
                    session_config.trust_policy = Some(policy);
                }
                Ok(None) => {}
                Err(e) => {
                    // Like a policy.json that does not parse: the device
                    // trusts nothing rather than something it did not accept.
                    tracing::error!(%device_id, error = %e, "persisted trust policy unreadable; refusing every update");
                    session_config.trust_policy = None;
                }
            }
        }
        // A guard even without a command policy, so a rotation that adds
        // one is enforced at once (a guard without a policy lets every call
        // run).
        session_config.command_guard = session_config.trust_policy.as_ref().map(|p| {
            Arc::new(Mutex::new(trellis_firmware::CommandGuard::new(
                device_id.to_string(),
                p.commands().cloned(),
                0,
            )))
        });
        // A policy accepted in a session, for the sessions after it.
        let rotated: Arc<Mutex<Option<TrustPolicy>>> = Arc::new(Mutex::new(None));
        session_config.keys = self.keys.clone();
        if self.endpoints.is_empty() {
            shutdown.cancelled().await;
            return;
        }
        // Which endpoint next, and when (failover.rs: a gateway that
        // accepts and then turns the handshake away is retried, one that
        // does not accept is left at once).
        let mut failover = Failover::new(self.endpoints.len(), self.config.max_turned_away);
        let mut wait: Option<Duration> = None;
        while !shutdown.is_cancelled() {
            if let Some(w) = wait.take() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(w) => {}
                }
            }
            let index = failover.current();
            let Some(endpoint) = self.endpoints.get(index) else {
                return;
            };
            let started = Instant::now();
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.connect(endpoint, &session_config) => r,
            };
            let session = match result {
                Ok(session) => session,
                Err((failure, error)) => {
                    tracing::debug!(%device_id, endpoint, %error, ?failure, "connect failed");
                    self.report(DeviceReport::HandshakeFailed {
                        device_id,
                        endpoint: endpoint.clone(),
                        error,
                    });
                    if let Next::Backoff(level) = failover.failed(failure) {
                        wait = Some(backoff(
                            self.config.backoff_base,
                            self.config.backoff_max,
                            level,
                        ));
                    }
                    continue;
                }
            };
            failover.connected();
            // The flag reports an update once, in the first Hello after it
            // was applied.
            session_config.hello_flags &= !FLAG_UPDATED;
            self.report(DeviceReport::Connected {
                device_id,
                endpoint: endpoint.clone(),
                handshake: started.elapsed(),
            });
            let reports = self.reports.clone();
            let rotated_slot = rotated.clone();
            let state_dir = self.config.state_dir.clone();
            // Away from home: a prober ends the session (through its own
            // token) once home accepts connections.
            let leave = shutdown.child_token();
            let prober = match self.config.home_return {
                Some(every) if index != 0 => self.endpoints.first().map(|home| {
                    tokio::spawn(probe_home(
                        home.clone(),
                        every,
                        self.config.connect_timeout,
                        leave.clone(),
                    ))
                }),
                _ => None,
            };
            let outcome = session
                .run(self.app.as_ref(), leave.clone(), move |e| {
                    let _ = reports.send(match e {
                        SessionEvent::EventPublished { name } => {
                            DeviceReport::EventPublished { device_id, name }
                        }
                        SessionEvent::FunctionCalled {
                            name,
                            argument,
                            result,
                        } => DeviceReport::FunctionCalled {
                            device_id,
                            name,
                            argument,
                            result,
                        },
                        SessionEvent::VariableRead { name } => {
                            DeviceReport::VariableRead { device_id, name }
                        }
                        SessionEvent::Signaled(on) => DeviceReport::Signaled { device_id, on },
                        SessionEvent::CommandRefused { name, reason } => {
                            DeviceReport::CommandRefused {
                                device_id,
                                name,
                                reason,
                            }
                        }
                        SessionEvent::PolicyAccepted {
                            policy,
                            signed_policy,
                        } => {
                            if let Some(dir) = &state_dir
                                && let Err(e) = persist_policy(dir, &device_id, &signed_policy)
                            {
                                tracing::error!(%device_id, error = %e, "accepted trust policy not persisted");
                            }
                            let report = DeviceReport::PolicyAccepted {
                                device_id,
                                version: policy.version(),
                                sha256: policy.sha256(),
                            };
                            *rotated_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(policy);
                            report
                        }
                        SessionEvent::PolicyRejected {
                            reason_code,
                            message,
                        } => DeviceReport::PolicyRejected {
                            device_id,
                            reason_code,
                            message,
                        },
                        SessionEvent::CloudKeyStored { version } => {
                            DeviceReport::CloudKeyStored { device_id, version }
                        }
                        SessionEvent::CloudKeyRefused { reason } => {
                            DeviceReport::CloudKeyRefused { device_id, reason }
                        }
                        SessionEvent::DeviceKeyOffered => return,
                        SessionEvent::DeviceKeyCommitted => {
                            DeviceReport::DeviceKeyCommitted { device_id }
                        }
                        SessionEvent::UpdateRejected { reason_code, .. } => {
                            DeviceReport::EventPublished {
                                device_id,
                                name: format!(
                                    "{}: {reason_code}",
                                    trellis_firmware::REJECTED_EVENT
                                ),
                            }
                        }
                    });
                })
                .await;
            if let Some(p) = prober {
                p.abort();
            }
            if let Some(policy) = rotated.lock().unwrap_or_else(|p| p.into_inner()).take() {
                session_config.trust_policy = Some(policy);
            }
            let going_home = leave.is_cancelled() && !shutdown.is_cancelled();
            let reason = match outcome {
                Ok(SessionEnd::Shutdown) if going_home => {
                    "going home: the preferred endpoint accepts connections again".to_owned()
                }
                Ok(SessionEnd::Shutdown) => "shutdown".to_owned(),
                Ok(SessionEnd::UpdateApplied(update)) => {
                    let sha = update.sha256();
                    let version = update.manifest.version;
                    session_config.firmware_sha256 = sha;
                    session_config.firmware_version = u16::try_from(version).unwrap_or(u16::MAX);
                    session_config.version_floor = session_config.version_floor.max(version);
                    session_config.hello_flags |= FLAG_UPDATED;
                    tracing::info!(%device_id, version, sha256 = %hex::encode(sha), "update applied");
                    format!(
                        "update applied: version {version}, sha256 {}",
                        hex::encode(sha)
                    )
                }
                Err(e) => e.to_string(),
            };
            let updated = session_config.hello_flags & FLAG_UPDATED != 0;
            self.report(DeviceReport::Disconnected { device_id, reason });
            // Home first on every reconnect with a home; else the endpoint
            // that last worked.
            failover.restart_at(if self.config.home_return.is_some() {
                0
            } else {
                index
            });
            // Restarting into a new image, or moving home: reconnect now.
            if !(updated || going_home) {
                wait = Some(backoff(
                    self.config.backoff_base,
                    self.config.backoff_max,
                    0,
                ));
            }
        }
    }

    /// One connection attempt: TCP connect, then the handshake and Hello.
    /// A failure says whether anything served there (failover.rs).
    async fn connect(
        &self,
        endpoint: &str,
        session_config: &SessionConfig,
    ) -> Result<Session, (Failure, String)> {
        let stream = match timeout(self.config.connect_timeout, TcpStream::connect(endpoint)).await
        {
            Err(_) => {
                return Err((
                    Failure::NotServed,
                    format!(
                        "TCP connect timed out after {:?}",
                        self.config.connect_timeout
                    ),
                ));
            }
            Ok(Err(e)) => return Err((Failure::NotServed, format!("TCP connect: {e}"))),
            Ok(Ok(s)) => s,
        };
        // The whole handshake is bounded too (protocol: 120 s).
        match timeout(
            Duration::from_secs(120),
            Session::connect(stream, &self.identity, session_config.clone()),
        )
        .await
        {
            Err(_) => Err((
                Failure::TurnedAway,
                "handshake took longer than 120 s".into(),
            )),
            Ok(Ok(session)) => Ok(session),
            Ok(Err(e)) => Err((Failure::of_handshake(&e), e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener that accepts every connection and closes it at once,
    /// before the nonce: what a gateway's admission control does to a
    /// handshake it turns away as busy.
    async fn busy_gateway() -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_device_retries_a_busy_gateway_and_skips_a_dead_one() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.to_string())
            .expect("a free port");
        let (first, second) = (busy_gateway().await, busy_gateway().await);
        let private_key =
            crate::identity::generate_device_key(&mut rand::rng()).expect("device key");
        let cloud_public_key = private_key.to_public_key();
        let identity = DeviceIdentity {
            device_id: DeviceId([7; 12]),
            private_key,
            cloud_public_key,
        };
        let config = SimConfig {
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(40),
            max_turned_away: 3,
            ..SimConfig::default()
        };
        let stop = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let fleet = run_fleet(
            vec![identity],
            config,
            vec![dead.clone(), first.clone(), second.clone()],
            stop.clone(),
            tx,
        );
        let mut tried = Vec::new();
        while tried.len() < 8 {
            let report = timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("reports")
                .expect("a report");
            if let DeviceReport::HandshakeFailed { endpoint, .. } = report {
                tried.push(endpoint);
            }
        }
        stop.cancel();
        let _ = fleet.await;
        // Refused: on at once. Accepted and closed: the same gateway, three
        // times in a row, then the next; then the whole list again.
        let expected = [
            &dead, &first, &first, &first, &second, &second, &second, &dead,
        ];
        assert_eq!(tried.iter().collect::<Vec<_>>(), expected);
    }

    #[tokio::test]
    async fn probe_home_leaves_once_home_accepts_and_not_before() {
        // Nothing listens on a port just released: probes fail, we stay.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.to_string())
            .expect("a free port");
        let leave = CancellationToken::new();
        let probe = tokio::spawn(probe_home(
            closed,
            Duration::from_millis(50),
            Duration::from_secs(1),
            leave.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!leave.is_cancelled(), "left for a home that refuses");
        leave.cancel();
        let _ = probe.await;

        // Home accepts: the session is ended within about one interval.
        let home = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = home.local_addr().expect("addr").to_string();
        let leave = CancellationToken::new();
        tokio::spawn(probe_home(
            addr,
            Duration::from_millis(100),
            Duration::from_secs(1),
            leave.clone(),
        ));
        tokio::time::timeout(Duration::from_secs(2), leave.cancelled())
            .await
            .expect("went home");
    }
}

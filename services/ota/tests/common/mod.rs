//! Test kit: a real redis-server, a registry of devices, releases in
//! memory, and a simulated fleet behind the `Deliverer` trait that accepts,
//! rejects or fails deliveries and then "reconnects" the devices that took
//! an image by calling DeviceHello with the new SHA-256.
#![allow(dead_code)]
use futures::future::BoxFuture;
use redis::AsyncCommands;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trellis_core::local_redis::{LocalRedis, RedisData};
use trellis_core::redis_conn::{Redis, connect, keys};
use trellis_ota::approval::{ApprovalRequest, Approver, Decision};
use trellis_ota::{
    Deliverer, HttpApprover, ManualClock, MemoryReleases, Parts, ReleaseInfo, Scheduler, Settings,
};
use trellis_proto::v1 as pb;

pub const OLD_SHA: &str = "1111111111111111111111111111111111111111111111111111111111111111";
pub const NEW_SHA: &str = "2222222222222222222222222222222222222222222222222222222222222222";
pub const RELEASE: &str = "7-2";
pub const PRODUCT: u32 = 7;

pub struct Env {
    pub redis_server: LocalRedis,
    pub redis: Redis,
    pub releases: MemoryReleases,
    pub clock: ManualClock,
    pub fleet: Fleet,
}

pub async fn env() -> Env {
    let redis_server = LocalRedis::start(RedisData::Ephemeral).expect("redis-server");
    let redis = connect(&redis_server.url()).await.expect("redis");
    let releases = MemoryReleases::new();
    releases.insert(ReleaseInfo {
        release_id: RELEASE.into(),
        product_id: PRODUCT,
        version: 2,
        image_sha256: NEW_SHA.into(),
    });
    Env {
        redis_server,
        redis,
        releases,
        clock: ManualClock::at(2, 12),
        fleet: Fleet::default(),
    }
}

impl Env {
    /// A scheduler replica over this environment.
    pub fn scheduler(&self, replica: &str) -> Scheduler {
        self.scheduler_with(replica, Arc::new(loopback_approver()))
    }

    pub fn scheduler_with(&self, replica: &str, approver: Arc<dyn Approver>) -> Scheduler {
        Scheduler::new(
            self.redis.clone(),
            Settings {
                replica: replica.into(),
                tick_ms: 20,
                lease_ms: 5_000,
            },
            Parts {
                clock: Arc::new(self.clock.clone()),
                deliverer: Arc::new(self.fleet.clone()),
                approver,
                releases: Arc::new(self.releases.clone()),
            },
        )
    }

    /// Registers `n` devices of `product` (online unless told otherwise).
    pub async fn devices(&self, product: u32, n: usize, online: bool) -> Vec<String> {
        let mut redis = self.redis.clone();
        let mut ids = Vec::new();
        for i in 0..n {
            let id = format!("{:08x}{:016x}", product, i + 1);
            let _: () = redis
                .hset_multiple(
                    keys::device(&id),
                    &[
                        ("device_id", id.as_str()),
                        ("product_id", &product.to_string()),
                        ("organization", "default"),
                        ("revoked", "0"),
                    ],
                )
                .await
                .unwrap();
            let _: () = redis.sadd(keys::DEVICE_INDEX, &id).await.unwrap();
            let _: () = redis
                .hset(keys::device_state(&id), "firmware_sha256", OLD_SHA)
                .await
                .unwrap();
            if online {
                connect_session(&mut redis, &id).await;
            }
            ids.push(id);
        }
        ids
    }
}

/// A new session for the device (bumps its epoch, as a gateway's claim does).
pub async fn connect_session(redis: &mut Redis, id: &str) -> u64 {
    let epoch: u64 = redis.incr(keys::session_epoch(id), 1).await.unwrap();
    let _: () = redis
        .hset_multiple(
            keys::session(id),
            &[
                ("gateway", "gw-test".to_string()),
                ("epoch", epoch.to_string()),
            ],
        )
        .await
        .unwrap();
    epoch
}

#[derive(Debug, Clone, PartialEq)]
pub enum Behaviour {
    /// Takes the image, reconnects running it.
    Accept,
    /// Refuses with a reason code.
    Reject(&'static str),
    /// The transfer breaks.
    Fail,
    /// Takes the image but comes back running the old one.
    NotApplied,
    /// Takes the image, but the gateway's answer (SENT) comes only after
    /// this many ms: the device's Hello with the new image can come first.
    SlowReport(u64),
}

#[derive(Clone, Default)]
pub struct Fleet {
    inner: Arc<Mutex<FleetState>>,
}

#[derive(Default)]
struct FleetState {
    behaviour: HashMap<String, Behaviour>,
    deliveries: HashMap<String, u32>,
    order: Vec<String>,
    /// Devices that took an image and will reconnect: (device, sha they report).
    reconnect: Vec<(String, String)>,
    /// Devices that reconnect before their gateway's report (SlowReport).
    early: Vec<(String, String)>,
}

impl Fleet {
    pub fn set(&self, device: &str, b: Behaviour) {
        self.inner
            .lock()
            .unwrap()
            .behaviour
            .insert(device.into(), b);
    }
    pub fn deliveries(&self) -> HashMap<String, u32> {
        self.inner.lock().unwrap().deliveries.clone()
    }
    pub fn delivered(&self) -> HashSet<String> {
        self.deliveries().into_keys().collect()
    }
    pub fn order(&self) -> Vec<String> {
        self.inner.lock().unwrap().order.clone()
    }
    pub fn assert_at_most_once(&self) {
        for (d, n) in self.deliveries() {
            assert_eq!(n, 1, "device {d} was delivered {n} times");
        }
    }
    pub fn requeue(&self, device: String, sha: String) {
        self.inner.lock().unwrap().reconnect.push((device, sha));
    }
    pub fn take_early(&self) -> Vec<(String, String)> {
        std::mem::take(&mut self.inner.lock().unwrap().early)
    }
    pub fn take_reconnects(&self) -> Vec<(String, String)> {
        std::mem::take(&mut self.inner.lock().unwrap().reconnect)
    }
}

impl Deliverer for Fleet {
    fn deliver<'a>(
        &'a self,
        device_id: &'a str,
        _release_id: &'a str,
        _rollout_id: &'a str,
    ) -> BoxFuture<'a, Result<pb::DeliverUpdateResponse, String>> {
        let mut s = self.inner.lock().unwrap();
        *s.deliveries.entry(device_id.to_string()).or_default() += 1;
        s.order.push(device_id.to_string());
        let b = s
            .behaviour
            .get(device_id)
            .cloned()
            .unwrap_or(Behaviour::Accept);
        let outcome = |o: pb::DeliveryOutcome, reason: &str| pb::DeliverUpdateResponse {
            outcome: o as i32,
            reason: reason.to_string(),
            message: String::new(),
            bytes_sent: 0,
            gateway_id: "gw-test".into(),
        };
        let delay = match b {
            Behaviour::SlowReport(ms) => ms,
            _ => 0,
        };
        let r = match b {
            Behaviour::Accept => {
                s.reconnect
                    .push((device_id.to_string(), NEW_SHA.to_string()));
                outcome(pb::DeliveryOutcome::Sent, "")
            }
            Behaviour::SlowReport(_) => {
                s.early.push((device_id.to_string(), NEW_SHA.to_string()));
                outcome(pb::DeliveryOutcome::Sent, "")
            }
            Behaviour::NotApplied => {
                s.reconnect
                    .push((device_id.to_string(), OLD_SHA.to_string()));
                outcome(pb::DeliveryOutcome::Sent, "")
            }
            Behaviour::Reject(reason) => outcome(pb::DeliveryOutcome::Rejected, reason),
            Behaviour::Fail => outcome(pb::DeliveryOutcome::Failed, "session_lost"),
        };
        Box::pin(async move {
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            Ok(r)
        })
    }
}

/// Reconnects the devices that took an image: a new session, then Hello.
/// Waits until the scheduler recorded SENT first, as a real device's reboot
/// takes longer than that.
pub async fn reconnect_all(env: &Env, sched: &Scheduler, rollout: &str) {
    let mut redis = env.redis.clone();
    for (device, sha) in env.fleet.take_reconnects() {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (_, rec) = trellis_ota::store::device(&mut redis, rollout, &device)
                .await
                .unwrap()
                .unwrap();
            if rec.sent || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        connect_session(&mut redis, &device).await;
        let _: () = redis
            .hset(keys::device_state(&device), "firmware_sha256", &sha)
            .await
            .unwrap();
        hello(sched, &device, &sha).await;
    }
}

/// What the device's gateway tells the scheduler at its Hello.
pub async fn hello(sched: &Scheduler, device: &str, sha: &str) {
    sched
        .device_hello(pb::DeviceHelloRequest {
            device_id: device.to_string(),
            product_id: PRODUCT,
            firmware_version: 2,
            firmware_sha256: sha.to_string(),
            gateway_id: "gw-test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// `n` scheduler ticks with `pause_ms` between them, and nothing else (no
/// device comes back): for "nothing more starts" checks.
pub async fn idle_ticks(sched: &Scheduler, n: usize, pause_ms: u64) {
    for _ in 0..n {
        sched.tick().await;
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
    }
}

/// Ticks and reconnects until `done` says so (or panics after 20 s).
pub async fn drive(
    env: &Env,
    sched: &Scheduler,
    rollout: &str,
    mut done: impl FnMut(&pb::RolloutStatus) -> bool,
) -> pb::RolloutStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        sched.tick().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        reconnect_all(env, sched, rollout).await;
        let status = sched.status(rollout, true).await.unwrap();
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "rollout did not get there in time: {status:#?}"
        );
    }
}

/// Drives the rollout to its end and checks that it completed.
pub async fn completed(env: &Env, sched: &Scheduler, rollout: &str) -> pb::RolloutStatus {
    let done = drive(env, sched, rollout, ended).await;
    assert_eq!(
        done.state(),
        pb::RolloutState::Completed,
        "{}",
        done.message
    );
    done
}

pub fn state_of(status: &pb::RolloutStatus, device: &str) -> pb::DeviceUpdateState {
    status
        .devices
        .iter()
        .find(|d| d.device_id == device)
        .map(|d| d.state())
        .unwrap_or_default()
}

pub fn count(status: &pb::RolloutStatus, state: pb::DeviceUpdateState) -> usize {
    status.devices.iter().filter(|d| d.state() == state).count()
}

pub fn ended(status: &pb::RolloutStatus) -> bool {
    matches!(
        status.state(),
        pb::RolloutState::Completed | pb::RolloutState::Aborted
    )
}

pub fn stage_count(n: u32) -> pb::Stage {
    pb::Stage {
        name: "canary".into(),
        device_count: n,
        ..Default::default()
    }
}

pub fn stage_pct(p: u32) -> pb::Stage {
    pb::Stage {
        name: format!("{p}%"),
        percent: p,
        ..Default::default()
    }
}

/// Creates a rollout of the test release in `stages`; its id.
pub async fn create(sched: &Scheduler, stages: Vec<pb::Stage>) -> String {
    sched.create(request(stages)).await.unwrap().rollout_id
}

pub fn request(stages: Vec<pb::Stage>) -> pb::CreateRolloutRequest {
    pb::CreateRolloutRequest {
        release_id: RELEASE.into(),
        target: Some(pb::RolloutTarget {
            product_id: PRODUCT,
            ..Default::default()
        }),
        stages,
        max_failure_ratio: 0.2,
        max_concurrent: 5,
        ..Default::default()
    }
}

/// An approver that never gets asked (rollouts without approval).
pub struct NoApprover;
impl Approver for NoApprover {
    fn approve<'a>(
        &'a self,
        _url: &'a str,
        _request: &'a ApprovalRequest,
        _timeout: Duration,
    ) -> BoxFuture<'a, Decision> {
        Box::pin(async { Decision::Held("not expected".into()) })
    }
}

/// A redis-server of its own (a region's Redis) and a connection to it.
pub async fn redis_server() -> (LocalRedis, Redis) {
    let server = LocalRedis::start(RedisData::Ephemeral).expect("redis-server");
    let redis = connect(&server.url()).await.expect("redis");
    (server, redis)
}

impl Env {
    /// A scheduler replica of one region: rollouts in this environment's
    /// (durable) Redis, sessions and reported firmware in `regional`,
    /// deliveries through `fleet`.
    pub fn scheduler_in(
        &self,
        replica: &str,
        regional: &Redis,
        fleet: &Fleet,
        lease_ms: u64,
    ) -> Scheduler {
        Scheduler::with_regional(
            self.redis.clone(),
            regional.clone(),
            Settings {
                replica: replica.into(),
                tick_ms: 20,
                lease_ms,
            },
            Parts {
                clock: Arc::new(self.clock.clone()),
                deliverer: Arc::new(fleet.clone()),
                approver: Arc::new(loopback_approver()),
                releases: Arc::new(self.releases.clone()),
            },
        )
    }

    /// A scheduler over this environment with its own lease period.
    pub fn scheduler_lease(&self, replica: &str, lease_ms: u64) -> Scheduler {
        self.scheduler_in(replica, &self.redis.clone(), &self.fleet, lease_ms)
    }
}

/// Puts registered devices in session in a region's Redis, reporting the
/// old firmware there.
pub async fn online_in(regional: &Redis, ids: &[String]) {
    let mut redis = regional.clone();
    for id in ids {
        let _: () = redis
            .hset(keys::device_state(id), "firmware_sha256", OLD_SHA)
            .await
            .unwrap();
        connect_session(&mut redis, id).await;
    }
}

/// [`reconnect_all`] for a region: the devices `fleet` delivered to come
/// back in session in `regional` and say Hello to that region's `sched`.
pub async fn reconnect_in(
    env: &Env,
    regional: &Redis,
    fleet: &Fleet,
    sched: &Scheduler,
    rollout: &str,
) {
    let mut redis = env.redis.clone();
    let mut region = regional.clone();
    for (device, sha) in fleet.take_reconnects() {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (_, rec) = trellis_ota::store::device(&mut redis, rollout, &device)
                .await
                .unwrap()
                .unwrap();
            if rec.sent || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        connect_session(&mut region, &device).await;
        let _: () = region
            .hset(keys::device_state(&device), "firmware_sha256", &sha)
            .await
            .unwrap();
        sched
            .device_hello(pb::DeviceHelloRequest {
                device_id: device.clone(),
                product_id: PRODUCT,
                firmware_version: 2,
                firmware_sha256: sha,
                gateway_id: "gw-test".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

/// The rollout's lease as stored: (holder's lease value, fencing token).
pub async fn lease_of(env: &Env, rollout: &str) -> (Option<String>, u64) {
    let mut redis = env.redis.clone();
    let holder: Option<String> = redis.get(keys::rollout_lease(rollout)).await.unwrap();
    let fence: Option<u64> = redis.get(keys::rollout_fence(rollout)).await.unwrap();
    (holder, fence.unwrap_or(0))
}

/// The approval hook caller with loopback allowed: these tests' approval
/// servers listen on 127.0.0.1, which the SSRF guard refuses by default.
pub fn loopback_approver() -> HttpApprover {
    HttpApprover::with_allowed(
        trellis_core::outbound::parse_cidrs(&["127.0.0.0/8".to_string()]).expect("a CIDR"),
    )
}

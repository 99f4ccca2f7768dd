//! The scheduler: creates rollouts, advances the ones this replica holds
//! the lease for (one tick every `ota.tick_ms`), answers DeviceHello and
//! delivery reports, and carries out pause, resume and abort.
//!
//! Safety with several replicas rests on two things (see `store`): a
//! replica acts on a rollout only while it holds the rollout's lease, and
//! every step that starts work on a device (pending -> waiting-approval or
//! delivering) is a compare-and-set that checks the lease's fencing token,
//! so a replica that lost its lease cannot start anything and no device is
//! ever started twice. Recording what happened to a delivery already made
//! (the gateway's outcome, the approval's answer) is a compare-and-set on
//! the exact record the delivery began with: a replica that lost its lease
//! mid-delivery still records what the device said, and nothing else.
//!
//! With several regions, a replica sees only the sessions of its own
//! region. A lease holder with due devices of which none is in session
//! here, and nothing of its own in flight, gives the lease up and leaves
//! the rollout alone for about two lease periods, so that a replica of the
//! region where the devices are takes it (see `Handoff`).
use crate::approval::{ApprovalRequest, Approver, Decision};
use crate::clock::Clock;
use crate::deliver::{self, Deliverer};
use crate::error::{OtaError, Result};
use crate::record::{DevState, DeviceRecord, Loaded, RolloutMeta, RolloutState};
use crate::release::ReleaseSource;
use crate::spec;
use crate::store::{self, Cas, Created, Guard, StateChange};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tracing::Instrument;
use trellis_core::Shutdown;
use trellis_core::redis_conn::{Redis, keys};
use trellis_proto::v1 as pb;

/// How often `device_hello` reads again after losing a race for the
/// device record.
const HELLO_RETRIES: usize = 5;

/// How long after its image was sent a device must have said Hello before
/// the scheduler looks for that Hello in Redis itself (housekeeping).
const MISSED_HELLO_AFTER_MS: i64 = 3_000;

/// What the scheduler is built from; tests replace any part.
pub struct Parts {
    pub clock: Arc<dyn Clock>,
    pub deliverer: Arc<dyn Deliverer>,
    pub approver: Arc<dyn Approver>,
    pub releases: Arc<dyn ReleaseSource>,
}

/// Scheduler settings (from `OtaConfig`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// This replica's name in leases.
    pub replica: String,
    pub tick_ms: u64,
    pub lease_ms: u64,
}

#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    redis: Redis,
    /// This region's Redis, where gateways keep session ownership and the
    /// devices' reported state (the same server as `redis` in one region).
    regional: Redis,
    settings: Settings,
    parts: Parts,
    /// rollout id -> lease value this replica holds.
    leases: Mutex<HashMap<String, String>>,
    /// rollout id -> this replica's lease hand-off state (see
    /// [`Scheduler::hand_off`]).
    handoffs: Mutex<HashMap<String, Handoff>>,
    tasks: Mutex<JoinSet<()>>,
}

/// A rollout whose lease this replica gave up because none of its due
/// devices is in session in this region: it does not try to take the lease
/// again before `retry_at`, so a scheduler in the region where the devices
/// are takes it. Real time (like the lease's expiry in Redis), not the
/// scheduler's clock.
#[derive(Debug, Clone, Default)]
struct Handoff {
    /// No lease attempt before this.
    retry_at: Option<Instant>,
    /// The fencing token of the lease given up (until the lease is taken
    /// again): the next token being ours too means no other replica took it.
    released_token: Option<u64>,
    /// Hand-offs that in a row found no taker.
    unanswered: u32,
    /// No hand-off before this (the lease keeps with this replica).
    keep_until: Option<Instant>,
}

fn fence_token(lease: &str) -> Option<u64> {
    lease.rsplit_once(':').and_then(|(_, t)| t.parse().ok())
}

/// Per-rollout device counts for `trellis_ota_devices{rollout,state}`.
fn gauge_snapshot() -> &'static Mutex<HashMap<String, [i64; 8]>> {
    static SNAP: OnceLock<Mutex<HashMap<String, [i64; 8]>>> = OnceLock::new();
    SNAP.get_or_init(Default::default)
}

/// Registers `trellis_ota_devices{rollout,state}` (once per process).
pub fn register_metrics() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        trellis_core::metrics::labeled_gauge(
            "trellis_ota_devices",
            "Devices per rollout and update state (rollouts this replica holds)",
            || {
                let snap = gauge_snapshot().lock().expect("gauge lock");
                let mut out = Vec::new();
                for (rollout, counts) in snap.iter() {
                    for (i, st) in DevState::ALL.iter().enumerate() {
                        out.push((
                            counts[i],
                            vec![
                                trellis_core::metrics::kv("rollout", rollout.clone()),
                                trellis_core::metrics::kv("state", st.name()),
                            ],
                        ));
                    }
                }
                out
            },
        );
    });
}

fn device_span(rollout: &str, device: &str, from: DevState, to: DevState) -> tracing::Span {
    tracing::info_span!(
        "ota.device_update",
        rollout = %rollout,
        device = %device,
        from = from.name(),
        to = to.name(),
    )
}

fn stage_span(rollout: &str, stage: u32, name: &str, event: &'static str) -> tracing::Span {
    tracing::info_span!("ota.stage", rollout = %rollout, stage, name = %name, event)
}

impl Scheduler {
    pub fn new(redis: Redis, settings: Settings, parts: Parts) -> Self {
        Self::with_regional(redis.clone(), redis, settings, parts)
    }

    /// Rollouts in the durable store (`redis`), sessions and reported
    /// firmware read from this region's Redis (`regional`).
    pub fn with_regional(redis: Redis, regional: Redis, settings: Settings, parts: Parts) -> Self {
        Self {
            inner: Arc::new(Inner {
                redis,
                regional,
                settings,
                parts,
                leases: Mutex::new(HashMap::new()),
                handoffs: Mutex::new(HashMap::new()),
                tasks: Mutex::new(JoinSet::new()),
            }),
        }
    }

    fn redis(&self) -> Redis {
        self.inner.redis.clone()
    }

    fn regional(&self) -> Redis {
        self.inner.regional.clone()
    }

    fn now(&self) -> i64 {
        self.inner.parts.clock.now_ms()
    }

    fn spawn(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.inner.tasks.lock().expect("tasks lock");
        while tasks.try_join_next().is_some() {}
        tasks.spawn(fut.in_current_span());
    }

    /// Ticks every `tick_ms` until shutdown, then gives its leases up.
    pub async fn run(self, mut shutdown: Shutdown) {
        let mut interval =
            tokio::time::interval(Duration::from_millis(self.inner.settings.tick_ms.max(10)));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => self.tick().await,
                _ = shutdown.wait() => break,
            }
        }
        self.stop().await;
    }

    /// Stops every delivery and approval task this replica runs and gives
    /// its leases up (what a crash does, minus the leases).
    pub async fn stop(&self) {
        self.abandon();
        let held: Vec<(String, String)> = self
            .inner
            .leases
            .lock()
            .expect("lease lock")
            .drain()
            .collect();
        let mut redis = self.redis();
        for (rollout, lease) in held {
            let _ = store::release_lease(&mut redis, &rollout, &lease).await;
        }
    }

    /// Aborts this replica's in-flight tasks without touching Redis: a crash.
    pub fn abandon(&self) {
        self.inner.tasks.lock().expect("tasks lock").abort_all();
    }

    /// One pass over every running, paused or aborting rollout.
    pub async fn tick(&self) {
        let mut redis = self.redis();
        let ids = match store::active_ids(&mut redis).await {
            Ok(ids) => ids,
            Err(e) => {
                trellis_core::metrics::redis_error("ota", &e);
                tracing::warn!(error = %e, "OTA tick: cannot list rollouts");
                return;
            }
        };
        self.inner
            .leases
            .lock()
            .expect("lease lock")
            .retain(|id, _| ids.contains(id));
        self.inner
            .handoffs
            .lock()
            .expect("handoff lock")
            .retain(|id, _| ids.contains(id));
        gauge_snapshot()
            .lock()
            .expect("gauge lock")
            .retain(|id, _| ids.contains(id));
        for id in ids {
            if let Err(e) = self.advance(&id).await {
                if let crate::error::OtaError::Redis(r) = &e {
                    trellis_core::metrics::redis_error("ota", r);
                }
                tracing::warn!(rollout = %id, error = %e, "OTA tick failed for rollout");
            }
        }
    }

    async fn lease(&self, rollout: &str) -> Result<Option<String>> {
        let held = self
            .inner
            .leases
            .lock()
            .expect("lease lock")
            .get(rollout)
            .cloned()
            .unwrap_or_default();
        if held.is_empty() {
            let mut handoffs = self.inner.handoffs.lock().expect("handoff lock");
            if let Some(h) = handoffs.get_mut(rollout)
                && let Some(at) = h.retry_at
            {
                if Instant::now() < at {
                    // Gave it up for a scheduler where the devices are.
                    return Ok(None);
                }
                h.retry_at = None;
            }
        }
        let mut redis = self.redis();
        let got = store::acquire_lease(
            &mut redis,
            rollout,
            &self.inner.settings.replica,
            &held,
            self.inner.settings.lease_ms,
        )
        .await?;
        let mut leases = self.inner.leases.lock().expect("lease lock");
        match &got {
            Some(v) => {
                if *v != held {
                    tracing::info!(rollout, lease = %v, replica = %self.inner.settings.replica, "rollout lease taken");
                    self.lease_taken(rollout, v);
                }
                leases.insert(rollout.to_string(), v.clone());
            }
            None => {
                leases.remove(rollout);
            }
        }
        Ok(got)
    }

    /// Advances one rollout, if this replica holds (or gets) its lease.
    pub async fn advance(&self, rollout: &str) -> Result<()> {
        let Some(lease) = self.lease(rollout).await? else {
            return Ok(());
        };
        let mut redis = self.redis();
        let Some(mut r) = store::load(&mut redis, rollout).await? else {
            store::deactivate(&mut redis, rollout).await?;
            return Ok(());
        };
        self.housekeeping(&lease, &mut r).await?;
        match r.meta.state {
            RolloutState::Running => self.advance_running(&lease, &mut r).await?,
            RolloutState::Paused => {}
            RolloutState::Aborted => {
                self.skip_unstarted(&mut r, "rollout aborted").await?;
                if !r.devices.iter().any(|(_, _, d)| d.state.in_flight()) {
                    store::deactivate(&mut redis, rollout).await?;
                }
            }
            RolloutState::Completed => store::deactivate(&mut redis, rollout).await?,
        }
        let mut counts = [0i64; 8];
        for (_, _, d) in &r.devices {
            if let Some(i) = DevState::ALL.iter().position(|s| *s == d.state) {
                counts[i] += 1;
            }
        }
        gauge_snapshot()
            .lock()
            .expect("gauge lock")
            .insert(rollout.to_string(), counts);
        Ok(())
    }

    /// Applies a transition to the loaded copy when it succeeded.
    async fn step(
        &self,
        r: &mut Loaded,
        index: usize,
        to: DeviceRecord,
        guard: &Guard<'_>,
    ) -> Result<Cas> {
        let (id, raw, from) = r.devices[index].clone();
        let outcome = self
            .cas(&r.meta.id, &id, &raw, from.state, &to, guard)
            .await?;
        if outcome == Cas::Done {
            if to.state.in_flight() != from.state.in_flight() {
                r.meta.inflight += if to.state.in_flight() { 1 } else { -1 };
            }
            r.devices[index] = (id, to.encode(), to);
        }
        Ok(outcome)
    }

    /// A logged, traced compare-and-set of one device record.
    async fn cas(
        &self,
        rollout: &str,
        device: &str,
        raw: &str,
        from: DevState,
        to: &DeviceRecord,
        guard: &Guard<'_>,
    ) -> Result<Cas> {
        let span = device_span(rollout, device, from, to.state);
        let mut redis = self.redis();
        let outcome = store::transition(&mut redis, rollout, device, raw, from, to, guard)
            .instrument(span.clone())
            .await?;
        if outcome == Cas::Done {
            span.in_scope(|| {
                tracing::info!(
                    rollout,
                    device,
                    from = from.name(),
                    to = to.state.name(),
                    reason = %to.reason,
                    attempts = to.attempts,
                    "device update"
                )
            });
        } else {
            span.in_scope(|| tracing::debug!(rollout, device, ?outcome, "device update not made"));
        }
        Ok(outcome)
    }

    /// Apply timeouts and approvals orphaned by a replica that went away.
    async fn housekeeping(&self, lease: &str, r: &mut Loaded) -> Result<()> {
        let now = self.now();
        let apply_ms = i64::from(r.meta.spec.apply_timeout_secs) * 1000;
        let max_attempts = r.meta.spec.max_attempts;
        let guard = Guard {
            lease,
            running: false,
            max_inflight: 0,
        };
        for i in 0..r.devices.len() {
            let d = r.devices[i].2.clone();
            // A Hello the scheduler never heard of (it was down, or the
            // gateway's call failed): the gateway recorded the device's
            // Hello in Redis all the same. Checked only once the device has
            // had time to say it the usual way.
            if d.state == DevState::Delivering
                && d.sent
                && now - d.updated_at_ms > MISSED_HELLO_AFTER_MS
            {
                let device = r.devices[i].0.clone();
                let mut regional = self.regional();
                let reconnected = store::session_epoch(&mut regional, &device)
                    .await?
                    .is_some_and(|e| e != d.epoch);
                if reconnected
                    && store::reported(&mut regional, &device, r.meta.is_policy()).await?
                        == r.meta.release_sha256
                {
                    let mut to = d.clone();
                    to.state = DevState::Applied;
                    to.updated_at_ms = now;
                    to.reason = format!(
                        "reconnected running {} (its Hello record; the scheduler was not told)",
                        short(&r.meta.release_sha256)
                    );
                    if self.step(r, i, to, &guard).await? == Cas::LeaseLost {
                        return Ok(());
                    }
                    continue;
                }
            }
            if d.state == DevState::Delivering && apply_ms > 0 && now - d.updated_at_ms > apply_ms {
                let mut to = d.clone();
                to.updated_at_ms = now;
                if !d.sent && d.attempts < max_attempts {
                    to.state = DevState::Pending;
                    to.reason = format!(
                        "retrying: no delivery outcome within {} s",
                        r.meta.spec.apply_timeout_secs
                    );
                } else {
                    to.state = DevState::Failed;
                    to.reason = format!(
                        "apply_timeout: the device did not come back running {} within {} s",
                        short(&r.meta.release_sha256),
                        r.meta.spec.apply_timeout_secs
                    );
                }
                if self.step(r, i, to, &guard).await? == Cas::LeaseLost {
                    return Ok(());
                }
            } else if d.state == DevState::WaitingApproval
                && d.owner != lease
                && r.meta.state == RolloutState::Running
            {
                // The replica that asked is gone: ask again, as this one.
                let mut to = d.clone();
                to.owner = lease.to_string();
                to.updated_at_ms = now;
                match self.step(r, i, to.clone(), &guard).await? {
                    Cas::Done => self.spawn_approval(&r.meta, &r.devices[i].0, to, lease),
                    Cas::LeaseLost => return Ok(()),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    async fn advance_running(&self, lease: &str, r: &mut Loaded) -> Result<()> {
        let now = self.now();
        let id = r.meta.id.clone();
        // 1. The failure threshold, as soon as crossing it is certain.
        let cur = r.meta.current_stage;
        let failed = r
            .devices
            .iter()
            .filter(|(_, _, d)| d.state.failure())
            .count();
        let opened = r
            .devices
            .iter()
            .filter(|(_, _, d)| {
                d.stage <= cur && !matches!(d.state, DevState::Held | DevState::Skipped)
            })
            .count();
        if failed > 0 && opened > 0 {
            let ratio = failed as f64 / opened as f64;
            if ratio > r.meta.spec.max_failure_ratio {
                let message = format!(
                    "aborted: {failed} of {opened} devices in the opened stages failed \
                     ({:.0} %), above max_failure_ratio {}",
                    ratio * 100.0,
                    r.meta.spec.max_failure_ratio
                );
                let span = stage_span(&id, cur, &r.meta.stage_name(cur), "aborted");
                let mut redis = self.redis();
                let change = store::set_state(
                    &mut redis,
                    &id,
                    &[RolloutState::Running],
                    Some(RolloutState::Aborted),
                    &message,
                    lease,
                    now,
                    &[],
                )
                .instrument(span.clone())
                .await?;
                if change == StateChange::Done {
                    span.in_scope(|| tracing::warn!(rollout = %id, %message, "rollout aborted"));
                    r.meta.state = RolloutState::Aborted;
                    self.skip_unstarted(r, "rollout aborted: failure threshold crossed")
                        .await?;
                }
                return Ok(());
            }
        }
        // 2. Stage progression.
        let last = r.meta.stage_ends.len().saturating_sub(1) as u32;
        let mut cur = r.meta.current_stage;
        loop {
            let busy = r
                .devices
                .iter()
                .any(|(_, _, d)| d.stage <= cur && !d.state.finished());
            if busy {
                break;
            }
            let name = r.meta.stage_name(cur);
            let mut completed_at = r.meta.completed_at.get(cur as usize).copied().unwrap_or(0);
            if completed_at == 0 {
                completed_at = now;
                let span = stage_span(&id, cur, &name, "completed");
                if !self
                    .meta_fields(
                        r,
                        lease,
                        &[(&format!("completed_at.{cur}"), now.to_string())],
                        None,
                    )
                    .instrument(span.clone())
                    .await?
                {
                    return Ok(());
                }
                if let Some(c) = r.meta.completed_at.get_mut(cur as usize) {
                    *c = now;
                }
                span.in_scope(
                    || tracing::info!(rollout = %id, stage = cur, %name, "stage completed"),
                );
            }
            // The stage's success gate.
            let in_stage = r.devices.iter().filter(|(_, _, d)| d.stage == cur);
            let (applied, finished) = in_stage.fold((0usize, 0usize), |(a, f), (_, _, d)| {
                (
                    a + usize::from(d.state == DevState::Applied),
                    f + usize::from(d.state == DevState::Applied || d.state.failure()),
                )
            });
            let min = r
                .meta
                .spec
                .stages
                .get(cur as usize)
                .map(|s| s.min_success_ratio)
                .unwrap_or(0.0);
            if finished > 0
                && (applied as f64 / finished as f64) < min
                && r.meta.override_stage != i64::from(cur)
            {
                let message = format!(
                    "paused: stage {name:?} finished with {applied} of {finished} applied, below \
                     its min_success_ratio {min}; resume to open the next stage anyway, or abort"
                );
                let mut redis = self.redis();
                let span = stage_span(&id, cur, &name, "gate");
                let change = store::set_state(
                    &mut redis,
                    &id,
                    &[RolloutState::Running],
                    Some(RolloutState::Paused),
                    &message,
                    lease,
                    now,
                    &[("gate_stage", cur.to_string())],
                )
                .instrument(span.clone())
                .await?;
                if change == StateChange::Done {
                    span.in_scope(|| tracing::warn!(rollout = %id, %message, "rollout paused"));
                    r.meta.state = RolloutState::Paused;
                }
                return Ok(());
            }
            if cur >= last {
                let message = format!(
                    "completed: {} applied, {} failed or rejected, {} held, {} skipped",
                    r.count(DevState::Applied),
                    r.count(DevState::Failed) + r.count(DevState::RejectedByDevice),
                    r.count(DevState::Held),
                    r.count(DevState::Skipped)
                );
                let span = stage_span(&id, cur, &name, "rollout_completed");
                let mut redis = self.redis();
                let change = store::set_state(
                    &mut redis,
                    &id,
                    &[RolloutState::Running],
                    Some(RolloutState::Completed),
                    &message,
                    lease,
                    now,
                    &[],
                )
                .instrument(span.clone())
                .await?;
                if change == StateChange::Done {
                    span.in_scope(|| tracing::info!(rollout = %id, %message, "rollout completed"));
                    r.meta.state = RolloutState::Completed;
                }
                return Ok(());
            }
            let soak_ms = i64::from(
                r.meta
                    .spec
                    .stages
                    .get(cur as usize)
                    .map(|s| s.soak_secs)
                    .unwrap_or(0),
            ) * 1000;
            if now < completed_at + soak_ms {
                let message = format!(
                    "stage {name:?} soaking for {} s more before the next stage opens",
                    (completed_at + soak_ms - now + 999) / 1000
                );
                self.meta_fields(r, lease, &[], Some(&message)).await?;
                return Ok(());
            }
            cur += 1;
            let next = r.meta.stage_name(cur);
            let span = stage_span(&id, cur, &next, "opened");
            if !self
                .meta_fields(r, lease, &[("current_stage", cur.to_string())], None)
                .instrument(span.clone())
                .await?
            {
                return Ok(());
            }
            r.meta.current_stage = cur;
            span.in_scope(
                || tracing::info!(rollout = %id, stage = cur, name = %next, "stage opened"),
            );
        }
        // 3. The maintenance window.
        let clock = &self.inner.parts.clock;
        if !spec::in_window(r.meta.spec.window.as_ref(), clock.weekday(), clock.hour()) {
            let message = format!(
                "outside the maintenance window ({}); nothing starts until it opens",
                spec::describe_window(r.meta.spec.window.as_ref())
            );
            self.meta_fields(r, lease, &[], Some(&message)).await?;
            return Ok(());
        }
        // 4. Start devices, up to max_concurrent.
        let max = r.meta.spec.max_concurrent;
        let candidates: Vec<usize> = (0..r.devices.len())
            .filter(|i| {
                let d = &r.devices[*i].2;
                d.state == DevState::Pending && d.stage <= cur
            })
            .collect();
        let mut offline = 0usize;
        let mut online = 0usize;
        let mut regional = self.regional();
        for i in candidates {
            if r.meta.inflight >= i64::from(max) {
                break;
            }
            let device = r.devices[i].0.clone();
            let Some(epoch) = store::session_epoch(&mut regional, &device).await? else {
                offline += 1;
                continue;
            };
            online += 1;
            let d = r.devices[i].2.clone();
            if store::reported(&mut regional, &device, r.meta.is_policy()).await?
                == r.meta.release_sha256
            {
                let mut to = d.clone();
                to.state = DevState::Applied;
                to.updated_at_ms = now;
                to.reason = "already running the release".into();
                self.step(
                    r,
                    i,
                    to,
                    &Guard {
                        lease,
                        running: false,
                        max_inflight: 0,
                    },
                )
                .await?;
                continue;
            }
            let mut to = d.clone();
            to.updated_at_ms = now;
            to.owner = lease.to_string();
            to.reason.clear();
            to.sent = false;
            let approval = !r.meta.spec.approval_url.is_empty();
            if approval {
                to.state = DevState::WaitingApproval;
            } else {
                to.state = DevState::Delivering;
                to.attempts += 1;
                to.epoch = epoch;
            }
            let guard = Guard {
                lease,
                running: true,
                max_inflight: max,
            };
            match self.step(r, i, to.clone(), &guard).await? {
                Cas::Done if approval => self.spawn_approval(&r.meta, &device, to, lease),
                Cas::Done => self.spawn_delivery(&r.meta, &device, to),
                Cas::Stale => {}
                Cas::Full | Cas::LeaseLost | Cas::NotRunning => break,
            }
        }
        let pending = r.count(DevState::Pending);
        let message = format!(
            "stage {:?} open: {} applied, {} failed, {} in flight, {} pending{}",
            r.meta.stage_name(cur),
            r.count(DevState::Applied),
            r.count(DevState::Failed) + r.count(DevState::RejectedByDevice),
            r.meta.inflight,
            pending,
            if offline > 0 {
                format!(" ({offline} offline: updated when they connect)")
            } else {
                String::new()
            }
        );
        self.meta_fields(r, lease, &[], Some(&message)).await?;
        if online > 0 {
            self.progress_here(&id);
        } else if offline > 0 {
            // Due devices, none of them in session here: give the lease up
            // when nothing of this replica's is in flight, for a scheduler
            // in the region where the devices are.
            let replica = &self.inner.settings.replica;
            let owned_in_flight = r.devices.iter().any(|(_, _, d)| {
                d.state.in_flight()
                    && (d.owner == lease
                        || d.owner.rsplit_once(':').map(|(o, _)| o) == Some(replica.as_str()))
            });
            if !owned_in_flight {
                self.hand_off(&id, lease, offline).await?;
            }
        }
        Ok(())
    }

    /// Back-off before this replica tries a lease it gave up again.
    fn handoff_backoff(&self) -> Duration {
        let lease_ms = self.inner.settings.lease_ms.max(1);
        let jitter = (rand::random::<f64>() * lease_ms as f64 / 2.0) as u64;
        Duration::from_millis(2 * lease_ms + jitter)
    }

    /// Gives the rollout's lease up (see [`Handoff`]) unless this replica
    /// keeps it for now: after hand-offs that nobody answered (the lease
    /// came back to this replica with the next fencing token: no scheduler
    /// elsewhere wants it), it keeps the lease for a growing while (2, then 4
    /// lease periods) before it tries again, so a lone replica holds on to
    /// its rollouts most of the time.
    async fn hand_off(&self, rollout: &str, lease: &str, offline: usize) -> Result<()> {
        let now = Instant::now();
        {
            let handoffs = self.inner.handoffs.lock().expect("handoff lock");
            if let Some(until) = handoffs.get(rollout).and_then(|h| h.keep_until)
                && now < until
            {
                return Ok(());
            }
        }
        let replica = self.inner.settings.replica.clone();
        let backoff = self.handoff_backoff();
        let span = tracing::info_span!(
            "ota.lease_handoff",
            rollout = %rollout,
            replica = %replica,
            offline,
            backoff_ms = backoff.as_millis() as u64,
        );
        self.inner
            .leases
            .lock()
            .expect("lease lock")
            .remove(rollout);
        {
            let mut handoffs = self.inner.handoffs.lock().expect("handoff lock");
            let h = handoffs.entry(rollout.to_string()).or_default();
            h.retry_at = Some(now + backoff);
            h.released_token = fence_token(lease);
            h.keep_until = None;
        }
        let mut redis = self.redis();
        store::release_lease(&mut redis, rollout, lease)
            .instrument(span.clone())
            .await?;
        span.in_scope(|| {
            tracing::info!(
                rollout,
                replica = %replica,
                lease,
                offline,
                backoff_ms = backoff.as_millis() as u64,
                "rollout lease given up: no due device is in session in this region"
            )
        });
        Ok(())
    }

    /// The lease was (re)taken: after a hand-off nobody answered, keep it
    /// for a while before handing it off again.
    fn lease_taken(&self, rollout: &str, lease: &str) {
        let mut handoffs = self.inner.handoffs.lock().expect("handoff lock");
        let Some(h) = handoffs.get_mut(rollout) else {
            return;
        };
        let Some(released) = h.released_token.take() else {
            return;
        };
        if fence_token(lease) == Some(released + 1) {
            h.unanswered = (h.unanswered + 1).min(2);
            let keep = 2 * self.inner.settings.lease_ms.max(1) * (1 << (h.unanswered - 1));
            h.keep_until = Some(Instant::now() + Duration::from_millis(keep));
        } else {
            h.unanswered = 0;
            h.keep_until = None;
        }
    }

    /// Due devices are in session here: hand-offs start afresh.
    fn progress_here(&self, rollout: &str) {
        self.inner
            .handoffs
            .lock()
            .expect("handoff lock")
            .remove(rollout);
    }

    /// Writes rollout fields (and the message, when it changed) while the
    /// lease is held and the rollout still running. False: not written.
    async fn meta_fields(
        &self,
        r: &mut Loaded,
        lease: &str,
        fields: &[(&str, String)],
        message: Option<&str>,
    ) -> Result<bool> {
        let message = message.filter(|m| *m != r.meta.message);
        if fields.is_empty() && message.is_none() {
            return Ok(true);
        }
        let mut redis = self.redis();
        let change = store::set_fields(
            &mut redis,
            &r.meta.id,
            RolloutState::Running,
            lease,
            self.now(),
            message,
            fields,
        )
        .await?;
        if let Some(m) = message
            && change == StateChange::Done
        {
            r.meta.message = m.to_string();
        }
        Ok(change == StateChange::Done)
    }

    /// Pending and waiting-approval devices of an aborted rollout become
    /// skipped (nothing was started on them).
    async fn skip_unstarted(&self, r: &mut Loaded, why: &str) -> Result<()> {
        let now = self.now();
        for i in 0..r.devices.len() {
            let d = r.devices[i].2.clone();
            if matches!(d.state, DevState::Pending | DevState::WaitingApproval) {
                let mut to = d;
                to.state = DevState::Skipped;
                to.updated_at_ms = now;
                to.reason = format!("skipped: {why}");
                self.step(r, i, to, &Guard::default()).await?;
            }
        }
        Ok(())
    }

    fn spawn_approval(&self, meta: &RolloutMeta, device: &str, rec: DeviceRecord, lease: &str) {
        let this = self.clone();
        let meta = meta.clone();
        let device = device.to_string();
        let lease = lease.to_string();
        let span = device_span(
            &meta.id,
            &device,
            DevState::WaitingApproval,
            DevState::WaitingApproval,
        );
        self.spawn(
            async move {
                if let Err(e) = this.approve_then_deliver(&meta, &device, rec, &lease).await {
                    tracing::warn!(rollout = %meta.id, %device, error = %e, "approval step failed");
                }
            }
            .instrument(span),
        );
    }

    async fn approve_then_deliver(
        &self,
        meta: &RolloutMeta,
        device: &str,
        rec: DeviceRecord,
        lease: &str,
    ) -> Result<()> {
        let request = ApprovalRequest {
            device: device.to_string(),
            product: meta.product_id,
            release: meta.spec.release_id.clone(),
            rollout: meta.id.clone(),
        };
        let timeout = Duration::from_millis(u64::from(meta.spec.approval_timeout_ms));
        let decision = self
            .inner
            .parts
            .approver
            .approve(&meta.spec.approval_url, &request, timeout)
            .await;
        let raw = rec.encode();
        let now = self.now();
        match decision {
            Decision::Held(reason) => {
                let mut to = rec.clone();
                to.state = DevState::Held;
                to.reason = reason;
                to.updated_at_ms = now;
                self.cas(&meta.id, device, &raw, rec.state, &to, &Guard::default())
                    .await?;
            }
            Decision::Approved => {
                let Some(epoch) = store::session_epoch(&mut self.regional(), device).await? else {
                    // Gone offline while the hook thought: back in the queue.
                    let mut to = rec.clone();
                    to.state = DevState::Pending;
                    to.reason =
                        "approved, but the device went offline; retried when it connects".into();
                    to.updated_at_ms = now;
                    self.cas(&meta.id, device, &raw, rec.state, &to, &Guard::default())
                        .await?;
                    return Ok(());
                };
                let mut to = rec.clone();
                to.state = DevState::Delivering;
                to.attempts += 1;
                to.epoch = epoch;
                to.updated_at_ms = now;
                to.reason = "approved".into();
                let guard = Guard {
                    lease,
                    running: true,
                    max_inflight: 0,
                };
                match self
                    .cas(&meta.id, device, &raw, rec.state, &to, &guard)
                    .await?
                {
                    Cas::Done => self.deliver(meta, device, to).await?,
                    Cas::NotRunning => {
                        let mut back = rec.clone();
                        back.state = DevState::Pending;
                        back.reason = "approved while the rollout was not running".into();
                        back.updated_at_ms = now;
                        self.cas(&meta.id, device, &raw, rec.state, &back, &Guard::default())
                            .await?;
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn spawn_delivery(&self, meta: &RolloutMeta, device: &str, rec: DeviceRecord) {
        let this = self.clone();
        let meta = meta.clone();
        let device = device.to_string();
        let span = device_span(
            &meta.id,
            &device,
            DevState::Delivering,
            DevState::Delivering,
        );
        self.spawn(
            async move {
                if let Err(e) = this.deliver(&meta, &device, rec).await {
                    tracing::warn!(rollout = %meta.id, %device, error = %e, "delivery step failed");
                }
            }
            .instrument(span),
        );
    }

    async fn deliver(&self, meta: &RolloutMeta, device: &str, rec: DeviceRecord) -> Result<()> {
        let response = match self
            .inner
            .parts
            .deliverer
            .deliver(device, &meta.spec.release_id, &meta.id)
            .await
        {
            Ok(r) => r,
            Err(e) => deliver::failed("delivery_error", e),
        };
        self.record_outcome(meta, device, &rec.encode(), rec, &response)
            .await
            .map(|_| ())
    }

    /// Records a delivery's outcome on the exact record it started from.
    async fn record_outcome(
        &self,
        meta: &RolloutMeta,
        device: &str,
        raw: &str,
        rec: DeviceRecord,
        response: &pb::DeliverUpdateResponse,
    ) -> Result<DevState> {
        let now = self.now();
        let mut to = rec.clone();
        to.updated_at_ms = now;
        let detail = match (response.reason.is_empty(), response.message.is_empty()) {
            (true, true) => String::new(),
            (false, true) => response.reason.clone(),
            (true, false) => response.message.clone(),
            (false, false) => format!("{}: {}", response.reason, response.message),
        };
        match pb::DeliveryOutcome::try_from(response.outcome).unwrap_or(pb::DeliveryOutcome::Failed)
        {
            // A trust policy is in force once the device answered 2.04
            // (it verified and stored it); nothing restarts.
            pb::DeliveryOutcome::Sent if meta.is_policy() => {
                to.sent = true;
                to.state = DevState::Applied;
                to.reason = format!(
                    "accepted trust policy {} (2.04)",
                    short(&meta.release_sha256)
                );
            }
            pb::DeliveryOutcome::Sent => {
                to.sent = true;
                to.reason = format!(
                    "sent: waiting for the device to come back running {}",
                    short(&meta.release_sha256)
                );
            }
            pb::DeliveryOutcome::Rejected => {
                to.state = DevState::RejectedByDevice;
                to.reason = if detail.is_empty() {
                    "rejected".into()
                } else {
                    detail
                };
            }
            _ => {
                let detail = if detail.is_empty() {
                    "failed".to_string()
                } else {
                    detail
                };
                if rec.attempts < meta.spec.max_attempts {
                    to.state = DevState::Pending;
                    to.reason = format!(
                        "retrying (attempt {} of {} failed): {detail}",
                        rec.attempts, meta.spec.max_attempts
                    );
                } else {
                    to.state = DevState::Failed;
                    to.reason = detail;
                }
            }
        }
        let outcome = self
            .cas(&meta.id, device, raw, rec.state, &to, &Guard::default())
            .await?;
        Ok(if outcome == Cas::Done {
            to.state
        } else {
            rec.state
        })
    }

    // ----- requests -----

    /// Validates, resolves the target and stores a new rollout, all or nothing.
    pub async fn create(&self, req: pb::CreateRolloutRequest) -> Result<pb::RolloutStatus> {
        let mut req = spec::normalize(req)?;
        let release = self.inner.parts.releases.get(&req.release_id).await?;
        let target = req.target.get_or_insert_with(Default::default);
        if target.product_id == 0 {
            target.product_id = release.product_id;
        } else if target.product_id != release.product_id {
            return Err(OtaError::InvalidArgument(format!(
                "release {} is for product {}, but the target names product {}; \
                 a device refuses firmware for another product",
                release.release_id, release.product_id, target.product_id
            )));
        }
        let product = target.product_id;
        let id = new_rollout_id();
        let mut redis = self.redis();
        // A rollout is its product's organisation's: a device another
        // organisation registered under the same product number is not in
        // its fleet (and cannot be named in it).
        let organization = trellis_auth::store::product_org(&mut redis, product)
            .await
            .map_err(|e| {
                OtaError::Internal(format!("reading product {product}'s organisation: {e}"))
            })?;
        let same_org = |org: &str| {
            let org = if org.is_empty() {
                keys::DEFAULT_ORG
            } else {
                org
            };
            org == organization
        };
        let selection: Vec<String> = if target.device_ids.is_empty() {
            let tag = Some(target.tag.as_str()).filter(|t| !t.is_empty());
            let fleet = store::fleet(&mut redis, product, tag).await?;
            let (ours, theirs): (Vec<_>, Vec<_>) =
                fleet.into_iter().partition(|(_, org)| same_org(org));
            if !theirs.is_empty() {
                tracing::warn!(
                    product,
                    organization = %organization,
                    left_out = theirs.len(),
                    "devices of other organisations registered under this product are not in the rollout"
                );
            }
            spec::fleet_order(&id, ours.into_iter().map(|(d, _)| d).collect())
        } else {
            for d in &target.device_ids {
                match store::registered(&mut redis, d).await? {
                    None => {
                        return Err(OtaError::InvalidArgument(format!(
                            "device {d} is not registered (trellis device register)"
                        )));
                    }
                    Some((p, _, _)) if p != product => {
                        return Err(OtaError::InvalidArgument(format!(
                            "device {d} is registered for product {p}, not {product}; leave it out"
                        )));
                    }
                    Some((_, true, _)) => {
                        return Err(OtaError::InvalidArgument(format!(
                            "device {d} is revoked and cannot connect; leave it out"
                        )));
                    }
                    Some((_, false, org)) if !same_org(&org) => {
                        return Err(OtaError::InvalidArgument(format!(
                            "device {d} belongs to another organisation than product {product}; leave it out"
                        )));
                    }
                    Some((_, false, _)) => {}
                }
            }
            target.device_ids.clone()
        };
        let selection = spec::take_percent(selection, target.percent);
        if selection.is_empty() {
            return Err(OtaError::InvalidArgument(if !target.tag.is_empty() {
                format!(
                    "the target is empty: no registered device of product {product} carries \
                     the tag {:?} (trellis device tag ID {})",
                    target.tag, target.tag
                )
            } else if target.device_ids.is_empty() {
                format!(
                    "the target is empty: product {product} has no registered devices \
                     (register some, or name devices in target.device_ids)"
                )
            } else {
                "the target is empty".to_string()
            }));
        }
        let n = selection.len() as u32;
        let ends = spec::plan_stages(&req.stages, n)?;
        let now = self.now();
        let devices: Vec<(String, DeviceRecord)> = selection
            .into_iter()
            .enumerate()
            .map(|(seq, d)| {
                let seq = seq as u32;
                let stage = ends.iter().position(|e| seq < *e).unwrap_or(0) as u32;
                (d, DeviceRecord::pending(stage, seq, now))
            })
            .collect();
        let meta: Vec<(&str, String)> = vec![
            ("spec", RolloutMeta::spec_hex(&req)),
            ("organization", organization),
            ("product_id", product.to_string()),
            ("release_sha256", release.image_sha256.to_ascii_lowercase()),
            ("release_version", release.version.to_string()),
            ("state", RolloutState::Running.name().to_string()),
            ("message", "created".to_string()),
            ("created_at_ms", now.to_string()),
            ("updated_at_ms", now.to_string()),
            (
                "stage_ends",
                ends.iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("current_stage", "0".to_string()),
            ("inflight", "0".to_string()),
            ("rev", "1".to_string()),
        ];
        match store::create(&mut redis, &id, now, &meta, &devices).await? {
            Created::Ok => {}
            Created::Exists => {
                return Err(OtaError::Internal(format!(
                    "rollout id {id} already exists; retry"
                )));
            }
            Created::Conflict(device, other) => {
                return Err(OtaError::FailedPrecondition(format!(
                    "device {device} is already in rollout {other}, which is running or paused; \
                     abort that rollout or leave the device out"
                )));
            }
        }
        tracing::info!(
            rollout = %id,
            release = %req.release_id,
            product,
            devices = n,
            stages = ?ends,
            "rollout created"
        );
        self.status(&id, true).await
    }

    pub async fn status(&self, rollout: &str, with_devices: bool) -> Result<pb::RolloutStatus> {
        Ok(self.load(rollout).await?.to_status(with_devices))
    }

    pub async fn load(&self, rollout: &str) -> Result<Loaded> {
        let mut redis = self.redis();
        store::load(&mut redis, rollout.trim())
            .await?
            .ok_or_else(|| {
                OtaError::NotFound(format!(
                    "rollout {rollout:?} does not exist (trellis rollout list)"
                ))
            })
    }

    /// Revision of a rollout's record (bumped on every change).
    pub async fn revision(&self, rollout: &str) -> Result<(i64, RolloutState)> {
        let mut redis = self.redis();
        let meta = store::load_meta(&mut redis, rollout)
            .await?
            .ok_or_else(|| OtaError::NotFound(format!("rollout {rollout:?} does not exist")))?;
        Ok((meta.rev, meta.state))
    }

    pub async fn list(&self) -> Result<Vec<pb::RolloutStatus>> {
        let mut redis = self.redis();
        let mut out = Vec::new();
        for id in store::list_ids(&mut redis).await? {
            if let Some(r) = store::load(&mut redis, &id).await? {
                out.push(r.to_status(false));
            }
        }
        Ok(out)
    }

    pub async fn pause(&self, rollout: &str, reason: &str) -> Result<pb::RolloutStatus> {
        let message = with_reason("paused by the operator", reason);
        self.operator_change(
            rollout,
            &[RolloutState::Running],
            RolloutState::Paused,
            &message,
            &[],
        )
        .await?;
        self.status(rollout, true).await
    }

    pub async fn resume(&self, rollout: &str, reason: &str) -> Result<pb::RolloutStatus> {
        let meta = self.load(rollout).await?.meta;
        // Resuming after the success gate paused a stage opens the next one.
        let fields = if meta.state == RolloutState::Paused && meta.gate_stage >= 0 {
            vec![
                ("override_stage", meta.gate_stage.to_string()),
                ("gate_stage", "-1".to_string()),
            ]
        } else {
            vec![]
        };
        let message = with_reason("resumed by the operator", reason);
        self.operator_change(
            rollout,
            &[RolloutState::Paused],
            RolloutState::Running,
            &message,
            &fields,
        )
        .await?;
        self.status(rollout, true).await
    }

    pub async fn abort(&self, rollout: &str, reason: &str) -> Result<pb::RolloutStatus> {
        let message = with_reason("aborted by the operator", reason);
        self.operator_change(
            rollout,
            &[RolloutState::Running, RolloutState::Paused],
            RolloutState::Aborted,
            &message,
            &[],
        )
        .await?;
        let mut r = self.load(rollout).await?;
        self.skip_unstarted(&mut r, &message).await?;
        self.status(rollout, true).await
    }

    async fn operator_change(
        &self,
        rollout: &str,
        from: &[RolloutState],
        to: RolloutState,
        message: &str,
        fields: &[(&str, String)],
    ) -> Result<()> {
        let rollout = rollout.trim();
        let mut redis = self.redis();
        let span = tracing::info_span!("ota.stage", rollout = %rollout, event = to.name());
        match store::set_state(
            &mut redis,
            rollout,
            from,
            Some(to),
            message,
            "",
            self.now(),
            fields,
        )
        .instrument(span.clone())
        .await?
        {
            StateChange::Done => {
                span.in_scope(|| {
                    tracing::info!(
                        rollout,
                        state = to.name(),
                        message,
                        "rollout changed by the operator"
                    )
                });
                Ok(())
            }
            StateChange::Missing => Err(OtaError::NotFound(format!(
                "rollout {rollout:?} does not exist (trellis rollout list)"
            ))),
            StateChange::LeaseLost => Err(OtaError::Internal("unexpected lease check".into())),
            StateChange::WrongState(s) => Err(OtaError::FailedPrecondition(format!(
                "rollout {rollout} is {s}; it cannot become {}",
                to.name()
            ))),
        }
    }

    /// A device's gateway saw its Hello. Counts it as applied when it runs
    /// the release; answers with a delivery when it is due for one.
    pub async fn device_hello(
        &self,
        req: pb::DeviceHelloRequest,
    ) -> Result<pb::DeviceHelloResponse> {
        let none = pb::DeviceHelloResponse::default();
        let device = spec::normalize_device_id(&req.device_id)?;
        let mut redis = self.redis();
        let Some(rollout) = store::rollout_of(&mut redis, &device).await? else {
            return Ok(none);
        };
        let Some(meta) = store::load_meta(&mut redis, &rollout).await? else {
            return Ok(none);
        };
        // The record may change between our read and our write (the
        // delivery's own report lands at the same moment as a fast
        // device's Hello): a stale write is read again and retried, so a
        // Hello is never lost.
        // A policy rollout counts the policy the device reports (Hello
        // extension 0x04), a firmware rollout the image it runs.
        let sha = if meta.is_policy() {
            req.policy_sha256.trim().to_ascii_lowercase()
        } else {
            req.firmware_sha256.trim().to_ascii_lowercase()
        };
        let runs_release = !sha.is_empty() && sha == meta.release_sha256;
        // The gateway claimed the session (a new epoch) before it tells us.
        let epoch = store::session_epoch(&mut self.regional(), &device)
            .await?
            .unwrap_or(0);
        for _ in 0..HELLO_RETRIES {
            let Some((raw, rec)) = store::device(&mut redis, &rollout, &device).await? else {
                return Ok(none);
            };
            let now = self.now();
            let mut to = rec.clone();
            to.updated_at_ms = now;
            // What the Hello means for the record, the guard of its write,
            // and the answer; a counted Hello whose write went stale is read
            // again and retried, a delivery handed out is not (the next
            // Hello asks again).
            let (guard, answer) = match rec.state {
                DevState::Delivering | DevState::Pending if runs_release => {
                    to.state = DevState::Applied;
                    to.epoch = epoch;
                    to.reason = if rec.state == DevState::Pending {
                        "already running the release".into()
                    } else {
                        format!("reconnected running {}", short(&sha))
                    };
                    (Guard::default(), None)
                }
                DevState::Delivering if rec.sent && (epoch == 0 || epoch != rec.epoch) => {
                    to.state = DevState::Failed;
                    to.reason = format!(
                        "not_applied: the device took the image but came back running {} instead of {}",
                        if sha.is_empty() {
                            "an unreported image".to_string()
                        } else {
                            short(&sha)
                        },
                        short(&meta.release_sha256)
                    );
                    (Guard::default(), None)
                }
                DevState::Pending
                    if meta.state == RolloutState::Running
                        && rec.stage <= meta.current_stage
                        && meta.spec.approval_url.is_empty()
                        && spec::in_window(
                            meta.spec.window.as_ref(),
                            self.inner.parts.clock.weekday(),
                            self.inner.parts.clock.hour(),
                        ) =>
                {
                    to.state = DevState::Delivering;
                    to.attempts += 1;
                    to.epoch = epoch;
                    to.sent = false;
                    to.owner.clear();
                    to.reason = format!("delivery handed to gateway {} at Hello", req.gateway_id);
                    let guard = Guard {
                        lease: "",
                        running: true,
                        max_inflight: meta.spec.max_concurrent,
                    };
                    let answer = pb::DeviceHelloResponse {
                        rollout_id: rollout.clone(),
                        release_id: meta.spec.release_id.clone(),
                    };
                    (guard, Some(answer))
                }
                _ => return Ok(none),
            };
            let written = self
                .cas(&rollout, &device, &raw, rec.state, &to, &guard)
                .await?;
            return match (written, answer) {
                (Cas::Stale, None) => continue,
                (Cas::Done, Some(answer)) => Ok(answer),
                _ => Ok(none),
            };
        }
        Err(OtaError::Unavailable(format!(
            "device {device}'s update record kept changing; its gateway asks again at the next Hello"
        )))
    }

    /// The outcome of a delivery a gateway made after DeviceHello.
    pub async fn report_delivery(
        &self,
        req: pb::ReportDeliveryRequest,
    ) -> Result<pb::ReportDeliveryResponse> {
        let device = spec::normalize_device_id(&req.device_id)?;
        let result = req.result.ok_or_else(|| {
            OtaError::InvalidArgument("result is missing: give the DeliverUpdateResponse".into())
        })?;
        let mut redis = self.redis();
        let meta = store::load_meta(&mut redis, &req.rollout_id)
            .await?
            .ok_or_else(|| {
                OtaError::NotFound(format!("rollout {:?} does not exist", req.rollout_id))
            })?;
        let (raw, rec) = store::device(&mut redis, &req.rollout_id, &device)
            .await?
            .ok_or_else(|| {
                OtaError::NotFound(format!(
                    "device {device} is not in rollout {}",
                    req.rollout_id
                ))
            })?;
        let state = if rec.state == DevState::Delivering && !rec.sent {
            self.record_outcome(&meta, &device, &raw, rec, &result)
                .await?
        } else {
            rec.state
        };
        Ok(pb::ReportDeliveryResponse {
            state: state.to_proto() as i32,
        })
    }
}

fn with_reason(what: &str, reason: &str) -> String {
    if reason.trim().is_empty() {
        what.to_string()
    } else {
        format!("{what}: {}", reason.trim())
    }
}

fn short(sha: &str) -> String {
    sha.chars().take(12).collect()
}

fn new_rollout_id() -> String {
    let n: u64 = rand::random();
    format!("ro-{:012x}", n & 0xffff_ffff_ffff)
}

//! What a rollout looks like in Redis. One hash per rollout
//! (`keys::rollout`): the stored spec (protobuf, hex), state, current stage,
//! per-stage completion times, in-flight counter and a revision bumped on
//! every change (watchers poll it). One hash per rollout for its devices
//! (`keys::rollout_devices`): device id -> a JSON [`DeviceRecord`]. The Lua
//! scripts never parse those values: a transition is a compare-and-set of
//! the whole value, so a record can only move from the exact state its
//! writer saw.
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use trellis_proto::v1 as pb;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DevState {
    Pending,
    WaitingApproval,
    Delivering,
    Applied,
    RejectedByDevice,
    Failed,
    Skipped,
    Held,
}

impl DevState {
    pub const ALL: [DevState; 8] = [
        DevState::Pending,
        DevState::WaitingApproval,
        DevState::Delivering,
        DevState::Applied,
        DevState::RejectedByDevice,
        DevState::Failed,
        DevState::Skipped,
        DevState::Held,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DevState::Pending => "pending",
            DevState::WaitingApproval => "waiting_approval",
            DevState::Delivering => "delivering",
            DevState::Applied => "applied",
            DevState::RejectedByDevice => "rejected_by_device",
            DevState::Failed => "failed",
            DevState::Skipped => "skipped",
            DevState::Held => "held",
        }
    }

    /// Counts against `max_concurrent`.
    pub fn in_flight(self) -> bool {
        matches!(self, DevState::WaitingApproval | DevState::Delivering)
    }

    /// Nothing more will happen to the device in this rollout.
    pub fn finished(self) -> bool {
        !matches!(
            self,
            DevState::Pending | DevState::WaitingApproval | DevState::Delivering
        )
    }

    /// Failed in the sense of `max_failure_ratio` / `min_success_ratio`.
    pub fn failure(self) -> bool {
        matches!(self, DevState::Failed | DevState::RejectedByDevice)
    }

    pub fn to_proto(self) -> pb::DeviceUpdateState {
        use pb::DeviceUpdateState as S;
        match self {
            DevState::Pending => S::Pending,
            DevState::WaitingApproval => S::WaitingApproval,
            DevState::Delivering => S::Delivering,
            DevState::Applied => S::Applied,
            DevState::RejectedByDevice => S::RejectedByDevice,
            DevState::Failed => S::Failed,
            DevState::Skipped => S::Skipped,
            DevState::Held => S::Held,
        }
    }
}

/// One device in one rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub state: DevState,
    /// Index into the rollout's stages.
    pub stage: u32,
    /// Position in the rollout's order (canaries first).
    pub seq: u32,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub updated_at_ms: i64,
    /// Session epoch the current delivery went over (0: unknown).
    #[serde(default)]
    pub epoch: u64,
    /// The gateway reported SENT: the device took the image.
    #[serde(default)]
    pub sent: bool,
    /// Lease value of the replica that started the current step ("" when
    /// a gateway took the delivery at Hello).
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub reason: String,
}

impl DeviceRecord {
    pub fn pending(stage: u32, seq: u32, now_ms: i64) -> Self {
        Self {
            state: DevState::Pending,
            stage,
            seq,
            attempts: 0,
            updated_at_ms: now_ms,
            epoch: 0,
            sent: false,
            owner: String::new(),
            reason: String::new(),
        }
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("a device record always serialises")
    }

    pub fn decode(s: &str) -> Option<Self> {
        serde_json::from_str(s).ok()
    }

    pub fn to_proto(&self, device_id: &str) -> pb::DeviceUpdate {
        pb::DeviceUpdate {
            device_id: device_id.to_string(),
            state: self.state.to_proto() as i32,
            stage: self.stage,
            reason: self.reason.clone(),
            updated_at_ms: self.updated_at_ms,
            attempts: self.attempts,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutState {
    Running,
    Paused,
    Aborted,
    Completed,
}

impl RolloutState {
    pub fn name(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Aborted => "aborted",
            RolloutState::Completed => "completed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => RolloutState::Running,
            "paused" => RolloutState::Paused,
            "aborted" => RolloutState::Aborted,
            "completed" => RolloutState::Completed,
            _ => return None,
        })
    }

    pub fn ended(self) -> bool {
        matches!(self, RolloutState::Aborted | RolloutState::Completed)
    }

    pub fn to_proto(self) -> pb::RolloutState {
        match self {
            RolloutState::Running => pb::RolloutState::Running,
            RolloutState::Paused => pb::RolloutState::Paused,
            RolloutState::Aborted => pb::RolloutState::Aborted,
            RolloutState::Completed => pb::RolloutState::Completed,
        }
    }
}

/// The rollout hash, parsed.
#[derive(Debug, Clone)]
pub struct RolloutMeta {
    pub id: String,
    pub spec: pb::CreateRolloutRequest,
    pub organization: String,
    pub product_id: u32,
    pub release_sha256: String,
    pub release_version: u32,
    pub state: RolloutState,
    pub message: String,
    pub created_at_ms: i64,
    pub stage_ends: Vec<u32>,
    pub current_stage: u32,
    pub completed_at: Vec<i64>,
    /// Stage whose success gate paused the rollout (-1: none).
    pub gate_stage: i64,
    /// Stage whose success gate the operator overrode by resuming (-1: none).
    pub override_stage: i64,
    pub inflight: i64,
    pub rev: i64,
}

impl RolloutMeta {
    /// A trust policy rollout (its release is a policy release,
    /// `tp-<product>-<version>`): done on the device's 2.04 or its Hello's
    /// policy report, not on a reconnect running an image.
    pub fn is_policy(&self) -> bool {
        trellis_records::policy_release::is_policy_release_id(&self.spec.release_id)
    }

    pub fn parse(id: &str, map: &HashMap<String, String>) -> Option<Self> {
        use prost::Message;
        let get = |k: &str| map.get(k).map(String::as_str).unwrap_or_default();
        let spec =
            pb::CreateRolloutRequest::decode(hex::decode(get("spec")).ok()?.as_slice()).ok()?;
        let stage_ends: Vec<u32> = get("stage_ends")
            .split(',')
            .filter(|s| !s.is_empty())
            .filter_map(|s| s.parse().ok())
            .collect();
        let completed_at = (0..stage_ends.len())
            .map(|i| get(&format!("completed_at.{i}")).parse().unwrap_or(0))
            .collect();
        Some(Self {
            id: id.to_string(),
            organization: get("organization").to_string(),
            product_id: get("product_id").parse().unwrap_or(0),
            release_sha256: get("release_sha256").to_string(),
            release_version: get("release_version").parse().unwrap_or(0),
            state: RolloutState::parse(get("state"))?,
            message: get("message").to_string(),
            created_at_ms: get("created_at_ms").parse().unwrap_or(0),
            current_stage: get("current_stage").parse().unwrap_or(0),
            gate_stage: get("gate_stage").parse().unwrap_or(-1),
            override_stage: get("override_stage").parse().unwrap_or(-1),
            inflight: get("inflight").parse().unwrap_or(0),
            rev: get("rev").parse().unwrap_or(0),
            stage_ends,
            completed_at,
            spec,
        })
    }

    pub fn spec_hex(spec: &pb::CreateRolloutRequest) -> String {
        use prost::Message;
        hex::encode(spec.encode_to_vec())
    }

    pub fn stage_name(&self, i: u32) -> String {
        self.spec
            .stages
            .get(i as usize)
            .map(|s| s.name.clone())
            .unwrap_or_else(|| format!("stage {}", i + 1))
    }
}

/// A rollout as loaded: the hash and every device, in rollout order.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub meta: RolloutMeta,
    /// (device id, raw stored value, parsed record), by `seq`.
    pub devices: Vec<(String, String, DeviceRecord)>,
}

impl Loaded {
    pub fn to_status(&self, with_devices: bool) -> pb::RolloutStatus {
        let m = &self.meta;
        let mut stages: Vec<pb::StageStatus> = m
            .spec
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| pb::StageStatus {
                name: s.name.clone(),
                devices: 0,
                applied: 0,
                failed: 0,
                in_flight: 0,
                open: (!m.state.ended() && (i as u32) <= m.current_stage)
                    || m.state == RolloutState::Completed,
                completed_at_ms: m.completed_at.get(i).copied().unwrap_or(0),
            })
            .collect();
        for (_, _, d) in &self.devices {
            if let Some(s) = stages.get_mut(d.stage as usize) {
                s.devices += 1;
                match d.state {
                    DevState::Applied => s.applied += 1,
                    st if st.failure() => s.failed += 1,
                    st if st.in_flight() => s.in_flight += 1,
                    _ => {}
                }
            }
        }
        pb::RolloutStatus {
            rollout_id: m.id.clone(),
            spec: Some(m.spec.clone()),
            state: m.state.to_proto() as i32,
            current_stage: m.current_stage,
            stages,
            devices: if with_devices {
                self.devices
                    .iter()
                    .map(|(id, _, d)| d.to_proto(id))
                    .collect()
            } else {
                Vec::new()
            },
            message: m.message.clone(),
            created_at_ms: m.created_at_ms,
        }
    }

    pub fn count(&self, state: DevState) -> usize {
        self.devices
            .iter()
            .filter(|(_, _, d)| d.state == state)
            .count()
    }
}

//! `trellis rollout ...`: the OTA scheduler's operator commands, thin gRPC
//! clients of the `Ota` service (`--ota-url`, `TRELLIS_OTA_URL`).
use crate::cli::Endpoints;
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use trellis_core::telemetry::TracedChannel;
use trellis_proto::v1::ota_client::OtaClient;
use trellis_proto::v1::*;

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Start a staged rollout of a release.
    Create(CreateArgs),
    /// A rollout's state, stages and devices.
    Status {
        id: String,
        /// List every device (default: only those not applied).
        #[arg(long)]
        all: bool,
    },
    /// Live per-stage progress until the rollout ends.
    Watch { id: String },
    /// Start nothing more until resumed (deliveries under way finish).
    Pause {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Carry on (after a success-gate pause: open the next stage anyway).
    Resume {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Stop for good: devices not started are skipped.
    Abort {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Every rollout, newest first.
    List,
}

#[derive(Debug, Clone, Args)]
pub struct CreateArgs {
    /// The release to roll out (trellis release show).
    #[arg(long, required_unless_present = "policy_release")]
    pub release: Option<String>,
    /// A policy release to roll out instead (a trust policy rotation,
    /// `tp-<product>-<version>`, trellis policy show --release): delivered
    /// staged and abortable like firmware; a device is done when it
    /// accepts it (2.04) or reports it in its Hello.
    #[arg(long, conflicts_with = "release")]
    pub policy_release: Option<String>,
    /// Target these devices (comma-separated ids) instead of the whole fleet.
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Target the product's devices carrying this tag (trellis device tag).
    #[arg(long, conflicts_with = "devices")]
    pub tag: Option<String>,
    /// Product (default: the release's).
    #[arg(long, default_value_t = 0)]
    pub product: u32,
    /// Only this share of the selection (1-100).
    #[arg(long, default_value_t = 0)]
    pub percent: u32,
    /// A stage, in order: `canary:2` (2 devices), `50%` (cumulative share),
    /// `early:10%`, `5`. Default: one stage of 100%.
    #[arg(long = "stage")]
    pub stages: Vec<String>,
    /// Seconds to wait after each stage's devices finish.
    #[arg(long, default_value_t = 0)]
    pub soak: u32,
    /// Applied / finished a stage needs before the next opens (0-1).
    #[arg(long, default_value_t = 0.0)]
    pub min_success: f64,
    /// Failed / finished above this aborts the rollout (0: any failure).
    #[arg(long, default_value_t = 0.0)]
    pub max_failure: f64,
    /// Devices updating at once (0: 10).
    #[arg(long, default_value_t = 0)]
    pub max_concurrent: u32,
    /// Maintenance window (UTC): `days=mon-fri,hours=2-5`.
    #[arg(long)]
    pub window: Option<String>,
    /// URL that must answer {"approve": true} before each device.
    #[arg(long)]
    pub approval_url: Option<String>,
    /// How long the approval URL has to answer (0: 5000).
    #[arg(long, default_value_t = 0)]
    pub approval_timeout_ms: u32,
}

impl RolloutCommand {
    pub fn name(&self) -> &'static str {
        match self {
            RolloutCommand::Create(_) => "rollout create",
            RolloutCommand::Status { .. } => "rollout status",
            RolloutCommand::Watch { .. } => "rollout watch",
            RolloutCommand::Pause { .. } => "rollout pause",
            RolloutCommand::Resume { .. } => "rollout resume",
            RolloutCommand::Abort { .. } => "rollout abort",
            RolloutCommand::List => "rollout list",
        }
    }
}

async fn client(url: &str) -> anyhow::Result<OtaClient<TracedChannel>> {
    Ok(OtaClient::new(
        crate::ops::channel(url, "the OTA scheduler", "--ota-url").await?,
    ))
}

fn status_err(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", e.message(), e.code())
}

pub async fn run(endpoints: &Endpoints, cmd: RolloutCommand) -> anyhow::Result<()> {
    let mut ota = client(&endpoints.ota_url).await?;
    match cmd {
        RolloutCommand::Create(args) => {
            let req = create_request(&args)?;
            let s = ota
                .create_rollout(req)
                .await
                .map_err(status_err)?
                .into_inner();
            println!("{}", s.rollout_id);
            eprintln!(
                "rollout {} created: {} devices in {} stages (trellis rollout watch {})",
                s.rollout_id,
                s.devices.len(),
                s.stages.len(),
                s.rollout_id
            );
        }
        RolloutCommand::Status { id, all } => {
            let s = ota
                .get_rollout(GetRolloutRequest { rollout_id: id })
                .await
                .map_err(status_err)?
                .into_inner();
            print_status(&s, all);
        }
        RolloutCommand::Watch { id } => watch(&mut ota, id).await?,
        RolloutCommand::Pause { id, reason } => {
            let s = ota
                .pause_rollout(RolloutAction {
                    rollout_id: id,
                    reason,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            print_status(&s, false);
        }
        RolloutCommand::Resume { id, reason } => {
            let s = ota
                .resume_rollout(RolloutAction {
                    rollout_id: id,
                    reason,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            print_status(&s, false);
        }
        RolloutCommand::Abort { id, reason } => {
            let s = ota
                .abort_rollout(RolloutAction {
                    rollout_id: id,
                    reason,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            print_status(&s, false);
        }
        RolloutCommand::List => {
            let list = ota
                .list_rollouts(ListRolloutsRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            println!(
                "{:<18} {:<10} {:<14} {:>7} {:>9} {:>7}  MESSAGE",
                "ROLLOUT", "STATE", "RELEASE", "STAGE", "APPLIED", "FAILED"
            );
            for s in list.rollouts {
                let devices: u32 = s.stages.iter().map(|x| x.devices).sum();
                let applied: u32 = s.stages.iter().map(|x| x.applied).sum();
                let failed: u32 = s.stages.iter().map(|x| x.failed).sum();
                println!(
                    "{:<18} {:<10} {:<14} {:>7} {:>9} {:>7}  {}",
                    s.rollout_id,
                    state_name(s.state()),
                    s.spec.as_ref().map(|x| x.release_id.as_str()).unwrap_or(""),
                    format!("{}/{}", s.current_stage + 1, s.stages.len()),
                    format!("{applied}/{devices}"),
                    failed,
                    s.message
                );
            }
        }
    }
    Ok(())
}

fn create_request(a: &CreateArgs) -> anyhow::Result<CreateRolloutRequest> {
    let mut stages = Vec::new();
    let specs: Vec<String> = if a.stages.is_empty() {
        vec!["100%".into()]
    } else {
        a.stages.clone()
    };
    for s in &specs {
        let mut stage = parse_stage(s)?;
        stage.soak_secs = a.soak;
        stage.min_success_ratio = a.min_success;
        stages.push(stage);
    }
    Ok(CreateRolloutRequest {
        release_id: a
            .policy_release
            .clone()
            .or_else(|| a.release.clone())
            .unwrap_or_default(),
        target: Some(RolloutTarget {
            product_id: a.product,
            device_ids: a.devices.iter().map(|d| d.trim().to_string()).collect(),
            percent: a.percent,
            tag: a.tag.clone().unwrap_or_default(),
        }),
        stages,
        max_failure_ratio: a.max_failure,
        max_concurrent: a.max_concurrent,
        window: a.window.as_deref().map(parse_window).transpose()?,
        approval_url: a.approval_url.clone().unwrap_or_default(),
        approval_timeout_ms: a.approval_timeout_ms,
        max_attempts: 0,
        apply_timeout_secs: 0,
    })
}

/// `canary:2`, `50%`, `early:10%`, `5`.
fn parse_stage(s: &str) -> anyhow::Result<Stage> {
    let (name, size) = match s.rsplit_once(':') {
        Some((n, v)) => (n.trim().to_string(), v.trim()),
        None => (String::new(), s.trim()),
    };
    let mut stage = Stage {
        name,
        ..Default::default()
    };
    if let Some(p) = size.strip_suffix('%') {
        stage.percent = p
            .trim()
            .parse()
            .with_context(|| format!("--stage {s:?}: {p:?} is not a percentage"))?;
        if stage.name.is_empty() {
            stage.name = format!("{}%", stage.percent);
        }
    } else {
        stage.device_count = size.parse().with_context(|| {
            format!("--stage {s:?}: give a device count (canary:2) or a percentage (50%)")
        })?;
    }
    Ok(stage)
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn day(s: &str) -> anyhow::Result<u32> {
    let s = s.trim().to_ascii_lowercase();
    DAYS.iter()
        .position(|d| s.starts_with(d))
        .map(|i| i as u32)
        .with_context(|| format!("{s:?} is not a day (mon..sun)"))
}

/// `days=mon-fri,hours=2-5`; `days=sat,sun`; `hours=22-4`.
fn parse_window(s: &str) -> anyhow::Result<MaintenanceWindow> {
    let mut w = MaintenanceWindow::default();
    let mut key = String::new();
    for part in s.split(',') {
        let value = match part.split_once('=') {
            Some((k, v)) => {
                key = k.trim().to_string();
                v
            }
            None => part,
        };
        match key.as_str() {
            "days" => match value.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (day(a)?, day(b)?);
                    let mut d = a;
                    loop {
                        w.days.push(d);
                        if d == b {
                            break;
                        }
                        d = (d + 1) % 7;
                    }
                }
                None => w.days.push(day(value)?),
            },
            "hours" => {
                let (a, b) = value.split_once('-').with_context(|| {
                    format!("--window hours={value:?}: give START-END, e.g. 2-5")
                })?;
                w.start_hour = a.trim().parse().context("--window start hour")?;
                w.end_hour = b.trim().parse().context("--window end hour")?;
            }
            other => bail!("--window {s:?}: unknown part {other:?}; use days=mon-fri,hours=2-5"),
        }
    }
    Ok(w)
}

fn state_name(s: RolloutState) -> &'static str {
    match s {
        RolloutState::Running => "running",
        RolloutState::Paused => "paused",
        RolloutState::Aborted => "aborted",
        RolloutState::Completed => "completed",
        RolloutState::Unspecified => "?",
    }
}

fn device_state_name(s: DeviceUpdateState) -> &'static str {
    match s {
        DeviceUpdateState::Pending => "pending",
        DeviceUpdateState::WaitingApproval => "waiting-approval",
        DeviceUpdateState::Delivering => "delivering",
        DeviceUpdateState::Applied => "applied",
        DeviceUpdateState::RejectedByDevice => "rejected-by-device",
        DeviceUpdateState::Failed => "failed",
        DeviceUpdateState::Skipped => "skipped",
        DeviceUpdateState::Held => "held",
        DeviceUpdateState::Unspecified => "?",
    }
}

fn print_status(s: &RolloutStatus, all: bool) {
    let spec = s.spec.clone().unwrap_or_default();
    println!("rollout   {}", s.rollout_id);
    println!("state     {}", state_name(s.state()));
    println!("release   {}", spec.release_id);
    println!("message   {}", s.message);
    println!(
        "\n{:<3} {:<12} {:>7} {:>7} {:>7} {:>9}  OPEN",
        "#", "STAGE", "DEVICES", "APPLIED", "FAILED", "IN FLIGHT"
    );
    for (i, st) in s.stages.iter().enumerate() {
        println!(
            "{:<3} {:<12} {:>7} {:>7} {:>7} {:>9}  {}",
            i + 1,
            st.name,
            st.devices,
            st.applied,
            st.failed,
            st.in_flight,
            if st.completed_at_ms > 0 {
                "done"
            } else if st.open {
                "open"
            } else {
                "-"
            }
        );
    }
    let shown: Vec<&DeviceUpdate> = s
        .devices
        .iter()
        .filter(|d| all || d.state() != DeviceUpdateState::Applied)
        .collect();
    if !shown.is_empty() {
        println!("\n{:<26} {:<5} {:<19} REASON", "DEVICE", "STAGE", "STATE");
        for d in shown {
            println!(
                "{:<26} {:<5} {:<19} {}",
                d.device_id,
                d.stage + 1,
                device_state_name(d.state()),
                d.reason
            );
        }
    }
}

async fn watch(ota: &mut OtaClient<TracedChannel>, id: String) -> anyhow::Result<()> {
    let mut stream = ota
        .watch_rollout(GetRolloutRequest { rollout_id: id })
        .await
        .map_err(status_err)?
        .into_inner();
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:<14} [{bar:30}] {pos:>4}/{len:<4} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let header = multi.add(ProgressBar::new_spinner());
    let mut bars: Vec<ProgressBar> = Vec::new();
    let mut last = None;
    while let Some(s) = stream.message().await.map_err(status_err)? {
        if bars.is_empty() {
            for st in &s.stages {
                let bar = multi.add(ProgressBar::new(u64::from(st.devices)));
                bar.set_style(style.clone());
                bar.set_prefix(st.name.clone());
                bars.push(bar);
            }
        }
        header.set_message(format!(
            "{} {}: {}",
            s.rollout_id,
            state_name(s.state()),
            s.message
        ));
        for (bar, st) in bars.iter().zip(&s.stages) {
            bar.set_position(u64::from(st.applied + st.failed));
            bar.set_message(format!(
                "applied {}, failed {}, in flight {}{}",
                st.applied,
                st.failed,
                st.in_flight,
                if st.completed_at_ms > 0 {
                    " (done)"
                } else if st.open {
                    " (open)"
                } else {
                    ""
                }
            ));
        }
        last = Some(s);
    }
    for bar in &bars {
        bar.abandon();
    }
    header.abandon();
    if let Some(s) = last {
        println!("{} {}: {}", s.rollout_id, state_name(s.state()), s.message);
        if s.state() == RolloutState::Aborted {
            bail!("rollout {} was aborted", s.rollout_id);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_and_windows_parse() {
        let s = parse_stage("canary:2").unwrap();
        assert_eq!((s.name.as_str(), s.device_count), ("canary", 2));
        let s = parse_stage("50%").unwrap();
        assert_eq!((s.name.as_str(), s.percent), ("50%", 50));
        assert!(parse_stage("lots").is_err());
        let w = parse_window("days=mon-fri,hours=2-5").unwrap();
        assert_eq!(w.days, vec![0, 1, 2, 3, 4]);
        assert_eq!((w.start_hour, w.end_hour), (2, 5));
        let w = parse_window("days=sat,sun").unwrap();
        assert_eq!(w.days, vec![5, 6]);
        assert!(parse_window("weeks=1").is_err());
    }
}

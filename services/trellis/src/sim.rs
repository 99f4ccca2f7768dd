//! `trellis sim`: a simulated fleet from a directory of device keys, against
//! any server that speaks protocol v1 (ours or the original).
use crate::cli::SimArgs;
use anyhow::Context;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use trellis_core::Shutdown;
use trellis_device::sim::{DeviceReport, SimConfig, run_fleet};

pub fn sim_config(args: &SimArgs) -> anyhow::Result<SimConfig> {
    let firmware_image = match &args.firmware_image {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("cannot read the firmware image {}", path.display()))?,
        None => format!(
            "trellis simulated firmware, version {}",
            args.firmware_version
        )
        .into_bytes(),
    };
    Ok(SimConfig {
        product_id: args.product,
        firmware_image,
        firmware_version: args.firmware_version,
        event_interval: (args.event_interval > 0).then(|| Duration::from_secs(args.event_interval)),
        keepalive: Duration::from_secs(args.keepalive.max(1)),
        event_name: "temperature".into(),
        // Devices accept firmware only under the policy provisioned with
        // their keys; without policy.json they refuse every update.
        trust_policy: trellis_device::load_trust_policy(&args.keys)
            .with_context(|| format!("reading the trust policy in {}", args.keys.display()))?,
        ..SimConfig::default()
    })
}

pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let identities = trellis_device::identity::load_fleet(
        &args.keys,
        Some(args.devices),
        args.cloud_key.as_deref(),
    )
    .with_context(|| format!("loading device keys from {}", args.keys.display()))?;
    if identities.len() < args.devices {
        eprintln!(
            "note: {} holds keys for {} devices; running those",
            args.keys.display(),
            identities.len()
        );
    }
    let (trigger, shutdown) = Shutdown::on_signals();
    if args.duration > 0 {
        let secs = args.duration;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            trigger.trigger();
        });
    } else {
        std::mem::forget(trigger);
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let fleet = run_fleet(
        identities,
        sim_config(&args)?,
        args.gateway.clone(),
        shutdown_token(shutdown),
        tx,
    );
    while let Some(report) = rx.recv().await {
        print_report(&report);
    }
    let _ = fleet.await;
    Ok(())
}

/// The device crate stops on a cancellation token; cancel it on shutdown.
pub fn shutdown_token(mut shutdown: Shutdown) -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        shutdown.wait().await;
        cancel.cancel();
    });
    token
}

pub fn print_report(report: &DeviceReport) {
    match report {
        DeviceReport::Connected {
            device_id,
            endpoint,
            handshake,
        } => println!(
            "device {device_id}: handshake with {endpoint} done in {} ms",
            handshake.as_millis()
        ),
        DeviceReport::HandshakeFailed {
            device_id,
            endpoint,
            error,
        } => println!("device {device_id}: handshake with {endpoint} failed: {error}"),
        DeviceReport::Disconnected { device_id, reason } => {
            println!("device {device_id}: disconnected ({reason})")
        }
        DeviceReport::EventPublished { device_id, name } => {
            println!("device {device_id}: published event {name}")
        }
        DeviceReport::FunctionCalled {
            device_id,
            name,
            argument,
            result,
        } => println!(
            "device {device_id}: function {name}({}) -> {result}",
            String::from_utf8_lossy(argument)
        ),
        DeviceReport::VariableRead { device_id, name } => {
            println!("device {device_id}: variable {name} read")
        }
    }
}

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
        home_return: (args.home_return_secs > 0)
            .then(|| Duration::from_secs(args.home_return_secs)),
        // Devices accept firmware only under the policy provisioned with
        // their keys; without policy.json they refuse every update.
        trust_policy: trellis_device::load_trust_policy(&args.keys)
            .with_context(|| format!("reading the trust policy in {}", args.keys.display()))?,
        // A rotated trust policy is kept beside the device's keys
        // (`<id>.policy.bin`) and used instead of policy.json from then on.
        state_dir: Some(args.keys.clone()),
        key_rotation: args.key_rotation,
        keys_dir: args.key_rotation.then(|| args.keys.clone()),
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
        DeviceReport::Signaled { device_id, on } => println!(
            "device {device_id}: {}",
            if *on {
                "signalling (rainbow)"
            } else {
                "signalling stopped"
            }
        ),
        DeviceReport::CommandRefused {
            device_id,
            name,
            reason,
        } => println!("device {device_id}: refused function {name}: {reason}"),
        DeviceReport::PolicyAccepted {
            device_id,
            version,
            sha256,
        } => println!(
            "device {device_id}: trust policy version {version} accepted (sha256 {})",
            hex::encode(sha256)
        ),
        DeviceReport::PolicyRejected {
            device_id,
            reason_code,
            message,
        } => println!("device {device_id}: trust policy refused: {reason_code}: {message}"),
        DeviceReport::CloudKeyStored { device_id, version } => {
            println!("device {device_id}: stored cloud key version {version}")
        }
        DeviceReport::CloudKeyRefused { device_id, reason } => {
            println!("device {device_id}: refused a cloud key announcement: {reason}")
        }
        DeviceReport::DeviceKeyCommitted { device_id } => {
            println!("device {device_id}: new device key committed (used from the next handshake)")
        }
    }
}

/// `trellis sim --smoke`: one device checks a running cloud end to end and
/// the exit status says whether it works (the chart's `helm test` runs it).
/// Every step is bounded by the one deadline (`--duration`, default 60 s);
/// a failure names the step.
pub async fn smoke(args: SimArgs, endpoints: &crate::cli::Endpoints) -> anyhow::Result<()> {
    let limit = Duration::from_secs(if args.duration == 0 {
        60
    } else {
        args.duration
    });
    let deadline = tokio::time::Instant::now() + limit;
    let stop = CancellationToken::new();
    let result = smoke_steps(&args, endpoints, deadline, stop.clone()).await;
    stop.cancel();
    match result {
        Ok(()) => {
            println!("smoke: ok");
            Ok(())
        }
        Err(e) => Err(e.context("smoke test failed")),
    }
}

/// Runs `fut` until `deadline`, failing with `step` when time runs out.
async fn step<T>(
    deadline: tokio::time::Instant,
    step: &str,
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout_at(deadline, fut).await {
        Ok(r) => r.with_context(|| format!("step: {step}")),
        Err(_) => anyhow::bail!("timed out (--duration) during step: {step}"),
    }
}

/// Whether `dir` holds any `<device id>.pem` key.
fn has_device_keys(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".pem"))
                .is_some_and(|stem| stem.parse::<trellis_wire::DeviceId>().is_ok())
        })
    })
}

async fn smoke_steps(
    args: &SimArgs,
    endpoints: &crate::cli::Endpoints,
    deadline: tokio::time::Instant,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    use trellis_proto::v1::{
        CallFunctionRequest, GetDeviceStateRequest, RevokeDeviceRequest, StreamEventsRequest,
    };

    // 1. A device key: the first one in --keys, or a throwaway one.
    let provisioned = !has_device_keys(&args.keys);
    if provisioned {
        step(
            deadline,
            "provision a throwaway device through keyvault",
            async {
                let mut kv = crate::ops::keyvault_client(&endpoints.keyvault_url).await?;
                let id = trellis_wire::DeviceId(rand::random());
                crate::ops::provision(&mut kv, u32::from(args.product), vec![id], &args.keys)
                    .await?;
                println!(
                    "smoke: provisioned throwaway device {id} into {}",
                    args.keys.display()
                );
                Ok(())
            },
        )
        .await?;
    }
    let identity =
        trellis_device::identity::load_fleet(&args.keys, Some(1), args.cloud_key.as_deref())
            .with_context(|| format!("loading the device key from {}", args.keys.display()))?
            .into_iter()
            .next()
            .with_context(|| format!("no device key in {}", args.keys.display()))?;
    let device_id = identity.device_id.to_string();

    // 2. Handshake through the devices' endpoint, then publish an event.
    let mut config = sim_config(args)?;
    config.event_interval = Some(Duration::from_secs(1));
    config.event_name = "smoke".into();
    config.start_spread = Duration::ZERO;
    let event_name = config.event_name.clone();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let fleet = run_fleet(
        vec![identity],
        config,
        args.gateway.clone(),
        stop.clone(),
        tx,
    );
    let gateways = args.gateway.join(",");
    step(deadline, &format!("handshake with {gateways}"), async {
        let mut failures = 0;
        loop {
            match rx.recv().await {
                Some(DeviceReport::Connected {
                    endpoint,
                    handshake,
                    ..
                }) => {
                    println!(
                        "smoke: device {device_id}: handshake with {endpoint} done in {} ms",
                        handshake.as_millis()
                    );
                    return Ok(());
                }
                Some(DeviceReport::HandshakeFailed {
                    endpoint, error, ..
                }) => {
                    failures += 1;
                    eprintln!("smoke: handshake with {endpoint} failed: {error}");
                    if failures >= 3 {
                        anyhow::bail!(
                            "{failures} handshakes failed; the last: {endpoint}: {error}"
                        );
                    }
                }
                Some(_) => {}
                None => anyhow::bail!("the simulated device stopped"),
            }
        }
    })
    .await?;
    step(deadline, "publish an event", async {
        loop {
            match rx.recv().await {
                Some(DeviceReport::EventPublished { name, .. }) => {
                    println!("smoke: published event {name}");
                    return Ok(());
                }
                Some(DeviceReport::Disconnected { reason, .. }) => {
                    anyhow::bail!("the session closed: {reason}")
                }
                Some(_) => {}
                None => anyhow::bail!("the simulated device stopped"),
            }
        }
    })
    .await?;

    // 3. The cloud sees the device and routes a function call to it.
    let mut gw = step(
        deadline,
        &format!("connect to the gateway gRPC at {}", endpoints.gateway_url),
        crate::ops::gateway_client(&endpoints.gateway_url),
    )
    .await?;
    step(
        deadline,
        "see the device online with its functions",
        async {
            loop {
                let state = gw
                    .get_device_state(GetDeviceStateRequest {
                        device_id: device_id.clone(),
                    })
                    .await
                    .map(|r| r.into_inner());
                if let Ok(s) = &state
                    && s.online
                    && s.functions.iter().any(|f| f == "add")
                {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        },
    )
    .await?;
    step(deadline, "call add(2,3) on the device", async {
        let r = gw
            .call_function(CallFunctionRequest {
                device_id: device_id.clone(),
                function: "add".into(),
                argument: "2,3".into(),
                timeout_ms: 0,
                signed_command: Vec::new(),
            })
            .await
            .map_err(|e| anyhow::anyhow!("{} ({:?})", e.message(), e.code()))?
            .into_inner();
        anyhow::ensure!(
            r.return_value == 5,
            "add(2,3) returned {}, not 5",
            r.return_value
        );
        println!(
            "smoke: add(2,3) = 5 through gateway {} (device answered)",
            r.gateway_id
        );
        Ok(())
    })
    .await?;

    // 4. The event is in the cloud's event stream.
    step(deadline, "read the device's event back", async {
        let mut events = gw
            .stream_events(StreamEventsRequest {
                device_id: device_id.clone(),
                prefix: event_name.clone(),
                from_start: true,
            })
            .await
            .map_err(|e| anyhow::anyhow!("{} ({:?})", e.message(), e.code()))?
            .into_inner();
        while let Some(e) = events
            .message()
            .await
            .map_err(|e| anyhow::anyhow!("{} ({:?})", e.message(), e.code()))?
        {
            if e.device_id == device_id && e.name == event_name {
                println!("smoke: event {} came back", e.name);
                return Ok(());
            }
        }
        anyhow::bail!("the event stream ended")
    })
    .await?;

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), fleet).await;
    if provisioned {
        // The key lived only for this check; leave no usable credential.
        let revoked = async {
            let mut kv = crate::ops::keyvault_client(&endpoints.keyvault_url).await?;
            kv.revoke_device(RevokeDeviceRequest {
                device_id: device_id.clone(),
                reason: "smoke test device".into(),
            })
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
            anyhow::Ok(())
        };
        if let Err(e) = tokio::time::timeout(Duration::from_secs(5), revoked)
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("keyvault did not answer")))
        {
            eprintln!("smoke: warning: could not revoke the throwaway device {device_id}: {e:#}");
        }
    }
    Ok(())
}

//! `commands`: what signed commands cost (issue 16).
//!
//! 1. On the device: the full check a device runs before a protected
//!    function (decode, signatures against the command policy, device,
//!    call, window, sequence) per call, beside the raw RSA-PSS-SHA256
//!    verifications it contains, timed on the same core in the same run:
//!    the ratio says how much the check adds to the cryptographic floor.
//! 2. End to end: a routed call (made on gateway B for a device on gateway
//!    A) with a signed command, next to the same call unsigned, closed loop
//!    (one call in flight per device, so each device's sequence numbers
//!    arrive in order), same devices' shape, same run.
use crate::cluster::{Cluster, ClusterOptions};
use crate::util::{self, Latencies, micros};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use trellis_device::DemoApp;
use trellis_device::identity::DeviceIdentity;
use trellis_device::session::{Session, SessionConfig, command_guard_for};
use trellis_firmware::command::{
    CommandEnvelope, CommandGuard, CommandPolicy, Protected, SignedCommand, sign_command,
};
use trellis_firmware::{TrustPolicy, TrustedKey, verify_signature};
use trellis_proto::v1::{CallFunctionRequest, GetDeviceStateRequest};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Checks timed on the device side (per threshold).
    #[arg(long, default_value_t = 2000)]
    pub checks: usize,
    /// Devices on gateway A for the routed figure (half guarded).
    #[arg(long, default_value_t = 8)]
    pub devices: usize,
    /// Calls per device, signed and unsigned each.
    #[arg(long, default_value_t = 200)]
    pub calls: usize,
    /// The command keys' RSA modulus size.
    #[arg(long, default_value_t = 2048)]
    pub bits: usize,
}

impl Args {
    pub fn smoke() -> Self {
        Self {
            checks: 50,
            devices: 2,
            calls: 10,
            bits: 2048,
        }
    }
}

const DEVICE_HEX: &str = "0123456789abcdef01234567";

fn envelope(device: &str, sequence: u64) -> CommandEnvelope {
    let now = trellis_core::time::now_ms();
    CommandEnvelope {
        organization: "bench".into(),
        device_id: device.into(),
        function: "add".into(),
        argument: format!("{sequence},1"),
        not_before_ms: now - 60_000,
        expires_ms: now + 1_800_000,
        sequence,
    }
}

fn policy(keys: &[rsa::PrivateKey], threshold: usize) -> anyhow::Result<CommandPolicy> {
    let trusted = keys
        .iter()
        .enumerate()
        .map(|(i, k)| TrustedKey::new(format!("k{i}"), k.to_public_key()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(CommandPolicy::new(
        TrustPolicy::new(trusted, threshold)?,
        Protected::All,
        3_600_000,
    )?)
}

fn signed(e: &CommandEnvelope, keys: &[rsa::PrivateKey]) -> anyhow::Result<Vec<u8>> {
    Ok(SignedCommand {
        envelope: e.to_bytes()?,
        signatures: keys
            .iter()
            .map(|k| sign_command(k, e))
            .collect::<Result<Vec<_>, _>>()?,
    }
    .encode()?)
}

/// Device side: µs per full check and per raw verification, threshold 1 and 2.
fn device_side(args: &Args, keys: &[rsa::PrivateKey]) -> anyhow::Result<()> {
    for threshold in [1usize, 2] {
        let signers = &keys[..threshold];
        let commands: Vec<(String, Vec<u8>)> = (1..=args.checks as u64)
            .map(|s| {
                let e = envelope(DEVICE_HEX, s);
                Ok((e.argument.clone(), signed(&e, signers)?))
            })
            .collect::<anyhow::Result<_>>()?;
        let mut guard = CommandGuard::new(DEVICE_HEX, Some(policy(keys, threshold)?), 0);
        let now = trellis_core::time::now_ms();
        let cpu0 = crate::handshake::thread_cpu();
        for (argument, bytes) in &commands {
            guard
                .check("add", argument, Some(bytes), now)
                .map_err(|r| anyhow::anyhow!("the bench's own command was refused: {r}"))?;
        }
        let check_us = (crate::handshake::thread_cpu() - cpu0) * 1e6 / args.checks as f64;

        // The floor: the RSA-PSS verifications alone, same bytes, same core.
        let first = SignedCommand::decode(&commands[0].1)?;
        let public: Vec<rsa::PublicKey> = signers.iter().map(|k| k.to_public_key()).collect();
        let cpu0 = crate::handshake::thread_cpu();
        for _ in 0..args.checks {
            for (sig, key) in first.signatures.iter().zip(&public) {
                verify_signature(key, &first.envelope, sig)?;
            }
        }
        let verify_us = (crate::handshake::thread_cpu() - cpu0) * 1e6 / args.checks as f64;
        println!(
            "device check, threshold {threshold}: {check_us:>8.1} µs per call ({:.0} calls/s on one core); raw RSA-{}-PSS verifications {verify_us:>8.1} µs; check / floor = {:.2}",
            1e6 / check_us,
            args.bits,
            check_us / verify_us
        );
        println!(
            "RESULT command_check threshold={threshold} bits={} check_us={check_us:.1} verify_us={verify_us:.1} ratio={:.3}",
            args.bits,
            check_us / verify_us
        );
    }
    Ok(())
}

pub async fn run(args: &Args, trellis_bin: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    println!("== signed commands ({})", util::machine());
    let keys: Vec<rsa::PrivateKey> = (0..2)
        .map(|_| rsa::PrivateKey::new(&mut rand::rng(), args.bits))
        .collect::<Result<_, _>>()?;
    device_side(args, &keys)?;

    let mut cluster = Cluster::start(&ClusterOptions {
        gateways: 2,
        keyvaults: 1,
        keepalive_secs: 15,
        log: "warn".into(),
        trellis_bin,
        signer: false,
        gateway_env: Vec::new(),
        admission: false,
        auth: false,
    })
    .await?;
    let device_key = crate::handshake::device_key()?;
    let n = args.devices.max(2);
    let ids = cluster.register_many(&device_key, n, 8).await?;
    let trust = TrustPolicy::new(
        vec![TrustedKey::new("release", keys[1].to_public_key())?],
        1,
    )?
    .with_commands(Some(policy(&keys[..1], 1)?));
    let stop = CancellationToken::new();
    let app = Arc::new(DemoApp::default());
    let mut tasks = Vec::new();
    // Even-numbered devices enforce the policy, odd ones do not.
    for (i, id) in ids.iter().enumerate() {
        let identity = DeviceIdentity {
            device_id: *id,
            private_key: device_key.clone(),
            cloud_public_key: cluster.cloud_public_key.clone(),
        };
        let stream = tokio::net::TcpStream::connect(cluster.gateways[0].devices).await?;
        let session = Session::connect(
            stream,
            &identity,
            SessionConfig {
                product_id: 6,
                platform_id: 6,
                firmware_version: 1,
                command_guard: (i % 2 == 0)
                    .then(|| command_guard_for(&id.to_string(), Some(&trust)))
                    .flatten(),
                ..SessionConfig::default()
            },
        )
        .await?;
        let (app, stop) = (app.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            session.run(&*app, stop, |_| {}).await
        }));
    }
    let mut b = cluster.gateway_client(1).await?;
    let ready = Instant::now();
    for id in &ids {
        loop {
            if let Ok(s) = b
                .get_device_state(GetDeviceStateRequest {
                    device_id: id.to_string(),
                })
                .await
            {
                let s = s.into_inner();
                if s.online && s.gateway_id == cluster.gateways[0].id && !s.functions.is_empty() {
                    break;
                }
            }
            anyhow::ensure!(
                ready.elapsed() < Duration::from_secs(20),
                "device {id} did not come online within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Commands are signed before timing: signing is the customer's cost,
    // once per command, not the cloud's or the device's.
    let mut plans = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let id = id.to_string();
        let mut calls = Vec::new();
        for s in 1..=args.calls as u64 {
            let signed_command = if i % 2 == 0 {
                signed(&envelope(&id, s), &keys[..1])?
            } else {
                Vec::new()
            };
            calls.push((s, signed_command));
        }
        plans.push((id, calls));
    }
    let mut workers = Vec::new();
    for (id, calls) in plans {
        let mut b = b.clone();
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(calls.len());
            let signed = !calls.first().is_some_and(|c| c.1.is_empty());
            for (s, signed_command) in calls {
                let t = Instant::now();
                let r = b
                    .call_function(CallFunctionRequest {
                        device_id: id.clone(),
                        function: "add".into(),
                        argument: format!("{s},1"),
                        timeout_ms: 5_000,
                        signed_command,
                    })
                    .await?
                    .into_inner();
                anyhow::ensure!(
                    i64::from(r.return_value) == s as i64 + 1,
                    "add({s},1) on {id} returned {}",
                    r.return_value
                );
                lat.push(micros(t.elapsed()));
            }
            anyhow::Ok((signed, lat))
        }));
    }
    let (mut signed_lat, mut plain_lat) = (Vec::new(), Vec::new());
    for w in workers {
        let (signed, lat) = w.await??;
        if signed {
            signed_lat.extend(lat);
        } else {
            plain_lat.extend(lat);
        }
    }
    stop.cancel();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    cluster.check_alive()?;
    let (s, p) = (Latencies::new(signed_lat), Latencies::new(plain_lat));
    println!(
        "routed call, closed loop, {} devices each way, {} calls each: unsigned p50 {:.3} ms p99 {:.3} ms; signed (RSA-{}, threshold 1) p50 {:.3} ms p99 {:.3} ms; added p50 {:.3} ms",
        n / 2,
        args.calls,
        p.pct_ms(50.0),
        p.pct_ms(99.0),
        args.bits,
        s.pct_ms(50.0),
        s.pct_ms(99.0),
        s.pct_ms(50.0) - p.pct_ms(50.0)
    );
    println!(
        "RESULT signed_routed unsigned_p50_ms={:.3} unsigned_p99_ms={:.3} signed_p50_ms={:.3} signed_p99_ms={:.3}",
        p.pct_ms(50.0),
        p.pct_ms(99.0),
        s.pct_ms(50.0),
        s.pct_ms(99.0)
    );
    Ok(())
}

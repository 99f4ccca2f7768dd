//! `trellis sim --smoke` (what the chart's `helm test` Pod runs) against a
//! real `trellis up`: it passes when the cloud works, and fails with a
//! clear message and a non-zero status when it does not.
mod common;

use common::{Proc, UpAddrs, addr, wait_ok};
use std::process::Command;
use std::time::{Duration, Instant};

struct Up {
    keyvault: String,
    devices: String,
    grpc: String,
    /// Stopped with SIGTERM at the end: SIGKILL (its drop) would leave
    /// the redis-server `trellis up` started behind.
    proc: Proc,
}

async fn up(dir: &std::path::Path) -> anyhow::Result<Up> {
    let addrs = UpAddrs::new();
    let mut env = addrs.env();
    env.push(("TRELLIS_TELEMETRY__LOG", "info".into()));
    let proc = Proc::spawn("up", dir, &["up"], &env);
    wait_ok(&addrs.admin, "/readyz", Duration::from_secs(90), &proc).await?;
    Ok(Up {
        keyvault: addrs.keyvault,
        devices: addrs.devices,
        grpc: addrs.grpc,
        proc,
    })
}

/// Runs the smoke check as the helm test Pod does; (success, stdout, stderr, seconds).
fn smoke(
    up: &Up,
    keys: &std::path::Path,
    gateway: &str,
    duration: u32,
) -> (bool, String, String, f64) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "sim",
            "--smoke",
            "--devices=1",
            "--product=1",
            &format!("--keys={}", keys.display()),
            &format!("--gateway={gateway}"),
            &format!("--keyvault-url=http://{}", up.keyvault),
            &format!("--gateway-url=http://{}", up.grpc),
            &format!("--duration={duration}"),
        ])
        .env_remove("TRELLIS_CONFIG")
        // `up` runs plaintext here (common::Proc::spawn).
        .env("TRELLIS_TLS__MODE", "off")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run trellis sim --smoke");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
        started.elapsed().as_secs_f64(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_passes_against_a_working_cloud_and_fails_clearly_otherwise() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut up = up(dir.path()).await?;

    // A working cloud: provision, handshake, event, routed call, event back.
    let keys = dir.path().join("smoke-keys");
    let (passed, stdout, stderr, _) = smoke(&up, &keys, &up.devices, 60);
    assert!(
        passed,
        "smoke failed against trellis up:\n{stdout}\n{stderr}"
    );
    for want in [
        "provisioned throwaway device",
        "handshake with",
        "published event smoke",
        "add(2,3) = 5",
        "event smoke came back",
        "smoke: ok",
    ] {
        assert!(stdout.contains(want), "no {want:?} in:\n{stdout}");
    }

    // The throwaway device was revoked afterwards: the same key is now
    // refused, and the smoke check says so and exits non-zero.
    let (passed, stdout, stderr, _) = smoke(&up, &keys, &up.devices, 30);
    assert!(
        !passed,
        "a revoked device passed the smoke check:\n{stdout}"
    );
    assert!(
        stderr.contains("smoke test failed") && stderr.contains("handshake"),
        "{stderr}"
    );

    // Nothing listening where the devices' endpoint should be: fails within
    // the time limit, naming the step.
    let nowhere = addr();
    let (passed, stdout, stderr, secs) = smoke(&up, &dir.path().join("other-keys"), &nowhere, 5);
    assert!(!passed, "smoke passed with no gateway:\n{stdout}");
    assert!(
        stderr.contains("smoke test failed")
            && stderr.contains(&format!("handshake with {nowhere}")),
        "{stderr}"
    );
    assert!(secs < 20.0, "took {secs} s despite --duration=5");
    up.proc.terminate(Duration::from_secs(15));
    Ok(())
}

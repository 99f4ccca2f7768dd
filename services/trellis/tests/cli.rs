//! The `trellis` binary as an operator uses it: real processes (the CLI and
//! `trellis sim`) against keyvault and two gateways on loopback.
use std::process::{Command, Stdio};
use std::time::Duration;
use trellis_tests::{Cluster, eventually};

fn trellis(cluster: &Cluster, gateway: usize, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        // The cluster's services run plaintext (tests/src/lib.rs).
        .env("TRELLIS_TLS__MODE", "off")
        .env(
            "TRELLIS_GATEWAY_URL",
            format!("http://{}", cluster.gateways[gateway].grpc),
        )
        .env(
            "TRELLIS_KEYVAULT_URL",
            format!("http://{}", cluster.keyvault),
        )
        .env("RUST_LOG", "warn")
        .output()
        .expect("run trellis")
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "trellis failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_sim_list_call_get_events_audit_revoke() -> anyhow::Result<()> {
    let cluster = Cluster::start(2).await?;
    let dir = tempfile::tempdir()?;
    let keys = dir.path().to_str().expect("utf-8 path").to_string();

    let ids = ok(trellis(
        &cluster,
        0,
        &[
            "device",
            "provision",
            "--product",
            "9",
            "--count",
            "2",
            "--out",
            &keys,
        ],
    ));
    let ids: Vec<String> = ids.lines().map(str::to_string).collect();
    assert_eq!(ids.len(), 2);
    for id in &ids {
        assert!(dir.path().join(format!("{id}.pem")).exists());
        assert!(dir.path().join(format!("{id}.pub.pem")).exists());
    }
    assert!(dir.path().join("cloud.pub.pem").exists());

    // A key made elsewhere (at the factory) is registered from its PEM.
    let factory = cluster.unregistered_identity()?;
    let pem_path = dir.path().join("factory.pub");
    {
        use rsa::pkcs8::EncodePublicKey;
        let pem = factory
            .private_key
            .to_public_key()
            .to_public_key_pem(Default::default())?;
        std::fs::write(&pem_path, pem)?;
    }
    let out = ok(trellis(
        &cluster,
        0,
        &[
            "device",
            "register",
            "--id",
            &factory.device_id.to_string(),
            "--product",
            "9",
            "--public-key",
            pem_path.to_str().unwrap_or_default(),
        ],
    ));
    assert!(out.contains("registered"), "{out}");

    // Devices run as a separate simulator process on gateway 1.
    let image = dir.path().join("image.bin");
    std::fs::write(&image, b"release 4 image")?;
    let mut sim = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "sim",
            "--keys",
            &keys,
            "--devices",
            "2",
            "--gateway",
            &cluster.gateways[0].devices.to_string(),
        ])
        .args([
            "--firmware-image",
            image.to_str().unwrap_or_default(),
            "--firmware-version",
            "4",
            "--event-interval",
            "1",
            "--duration",
            "60",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;

    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"release 4 image"));
    let listed = eventually(
        Duration::from_secs(30),
        "both simulated devices online in `device list`",
        || {
            let out = trellis(&cluster, 1, &["device", "list", "--online", "--json"]);
            let ok = out.status.success();
            let stdout = String::from_utf8_lossy(&out.stdout).to_string();
            async move {
                let v: serde_json::Value = serde_json::from_str(&stdout).ok()?;
                let rows = v.as_array()?.clone();
                (ok && rows.len() == 2
                    && rows
                        .iter()
                        .all(|r| r["functions"].as_array().is_some_and(|f| !f.is_empty())))
                .then_some(rows)
            }
        },
    )
    .await?;
    for row in &listed {
        assert_eq!(row["firmware_sha256"], sha);
        assert_eq!(row["firmware_version"], 4);
        assert_eq!(row["gateway"], "gw-1");
    }
    // The table form shows the SHA-256 too.
    let table = ok(trellis(&cluster, 1, &["device", "list"]));
    assert!(table.contains(&sha), "{table}");
    assert!(
        table.contains(&factory.device_id.to_string()),
        "offline devices are listed: {table}"
    );

    // Through gateway 2 to devices on gateway 1.
    assert_eq!(
        ok(trellis(
            &cluster,
            1,
            &["device", "call", &ids[0], "add", "2,3"]
        )),
        "5"
    );
    assert_eq!(
        ok(trellis(
            &cluster,
            1,
            &["device", "call", &ids[1], "led", "on"]
        )),
        "1"
    );
    assert_eq!(
        ok(trellis(&cluster, 1, &["device", "get", &ids[0], "temp"])),
        "21.5"
    );
    let shown = ok(trellis(&cluster, 1, &["device", "show", &ids[1]]));
    assert!(shown.contains("\"online\": true"), "{shown}");

    let events = ok(trellis(
        &cluster,
        1,
        &[
            "events",
            "tail",
            "--from-start",
            "--count",
            "1",
            "--device",
            &ids[1],
        ],
    ));
    assert!(
        events.contains(&ids[1]) && events.contains("temperature"),
        "{events}"
    );

    // Clear operator errors, non-zero exit.
    let out = trellis(
        &cluster,
        1,
        &[
            "device",
            "call",
            &factory.device_id.to_string(),
            "add",
            "1,1",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("offline"),
        "{:?}",
        out
    );
    let out = trellis(&cluster, 1, &["device", "call", "not-an-id", "add"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("device id"),
        "{:?}",
        out
    );

    // Tags, for rollouts by tag: normalised, and a bad one says why.
    let tagged = ok(trellis(
        &cluster,
        0,
        &["device", "tag", &ids[1], "Lobby", "site-a"],
    ));
    assert_eq!(tagged.trim(), format!("{}: lobby site-a", ids[1]));
    let out = trellis(&cluster, 0, &["device", "tag", &ids[1], "a,b"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tags use a-z"),
        "{out:?}"
    );

    // Revoke: the device is thrown out at its next handshake, and the audit
    // log shows registry changes and key uses.
    ok(trellis(
        &cluster,
        0,
        &["device", "revoke", &ids[0], "--reason", "test"],
    ));
    let audit = ok(trellis(&cluster, 0, &["audit", "tail", "--limit", "200"]));
    assert!(
        audit.contains("open_session") && audit.contains("register"),
        "{audit}"
    );
    assert!(audit.contains("revoke"), "{audit}");

    // Revoking leaves a live session alone; the device's next handshake is
    // refused. A fresh simulator knocks with the revoked key: counted, per
    // source and reason, under `audit refusals`, not in the audit stream.
    let _ = sim.kill();
    let _ = sim.wait();
    let mut sim = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "sim",
            "--keys",
            &keys,
            "--devices",
            "2",
            "--gateway",
            &cluster.gateways[0].devices.to_string(),
            "--duration",
            "40",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let started = std::time::Instant::now();
    loop {
        let table = ok(trellis(
            &cluster,
            0,
            &["audit", "refusals", "--device", &ids[0]],
        ));
        if let Some(line) = table.lines().find(|l| l.contains("revoked")) {
            assert!(line.starts_with("127.0.0.1 "), "{table}");
            assert!(
                line.contains("open_session") && line.contains(&ids[0]),
                "{table}"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no revoked refusal counted: {table}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let audit = ok(trellis(&cluster, 0, &["audit", "tail", "--limit", "500"]));
    assert!(
        !audit.contains("revoked"),
        "a refusal in the audit stream: {audit}"
    );

    let _ = sim.kill();
    let _ = sim.wait();
    cluster.stop().await;
    Ok(())
}

fn fails_with(out: std::process::Output, want: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(want),
        "expected a failure saying {want:?}; status {:?}, stdout {}, stderr {stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The README's "Signed commands" walk-through with the real binary: keys
/// made by `firmware keygen`, the command policy written into policy.json
/// by `command policy`, devices from `trellis sim` (which load it), calls
/// through the other gateway with `--sign-with` and `--envelope`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_commands_from_the_cli() -> anyhow::Result<()> {
    let cluster = Cluster::start(2).await?;
    let dir = tempfile::tempdir()?;
    let path = |name: &str| dir.path().join(name).to_string_lossy().to_string();
    let keys = path("fleet");
    let id = ok(trellis(
        &cluster,
        0,
        &["device", "provision", "--product", "9", "--out", &keys],
    ));
    for name in ["release", "alice", "bob"] {
        ok(trellis(
            &cluster,
            0,
            &[
                "firmware",
                "keygen",
                "--out",
                &path(&format!("{name}.pem")),
                "--bits",
                "2048",
            ],
        ));
    }
    // A device trust policy (firmware: the release key), then the command
    // policy: alice AND bob must sign `add`.
    let release_pub = std::fs::read_to_string(path("release.pub.pem"))?;
    let policy_file = format!("{keys}/policy.json");
    std::fs::write(
        &policy_file,
        serde_json::json!({"threshold": 1, "keys": [{"name": "release", "public_key": release_pub}]})
            .to_string(),
    )?;
    ok(trellis(
        &cluster,
        0,
        &[
            "command",
            "policy",
            "--policy",
            &policy_file,
            "--key",
            &path("alice.pub.pem"),
            "--key",
            &path("bob.pub.pem"),
            "--threshold",
            "2",
            "--protect",
            "add",
        ],
    ));
    let mut sim = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["sim", "--keys", &keys, "--devices", "1", "--gateway"])
        .arg(cluster.gateways[1].devices.to_string())
        .args(["--duration", "60"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let state = eventually(
        Duration::from_secs(30),
        "the device reports its command policy",
        || {
            let out = trellis(&cluster, 0, &["device", "show", &id]);
            async move {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
                (v["online"] == true
                    && v["command_policy_sha256"]
                        .as_str()
                        .is_some_and(|s| s.len() == 64))
                .then_some(v)
            }
        },
    )
    .await?;
    assert_eq!(state["command_sequence"], 0);

    fails_with(
        trellis(&cluster, 0, &["device", "call", &id, "add", "2,3"]),
        "device refused: signature missing",
    );
    fails_with(
        trellis(
            &cluster,
            0,
            &[
                "device",
                "call",
                &id,
                "add",
                "2,3",
                "--sign-with",
                &path("alice.pem"),
            ],
        ),
        "device refused: signature missing",
    );
    // Unprotected functions run unsigned.
    assert_eq!(
        ok(trellis(&cluster, 0, &["device", "call", &id, "led", "on"])),
        "1"
    );
    // Signed offline by alice, cosigned by bob, sent later: runs once.
    let cmd = path("add.cmd");
    ok(trellis(
        &cluster,
        0,
        &[
            "command",
            "sign",
            "--device",
            &id,
            "--function",
            "add",
            "--argument",
            "2,3",
            "--sign-with",
            &path("alice.pem"),
            "-o",
            &cmd,
        ],
    ));
    fails_with(
        trellis(
            &cluster,
            0,
            &["device", "call", &id, "add", "2,3", "--envelope", &cmd],
        ),
        "device refused: signature missing",
    );
    ok(trellis(
        &cluster,
        0,
        &["command", "cosign", &cmd, "--sign-with", &path("bob.pem")],
    ));
    fails_with(
        trellis(
            &cluster,
            0,
            &["device", "call", &id, "add", "9,9", "--envelope", &cmd],
        ),
        "not add(\"9,9\")",
    );
    assert_eq!(
        ok(trellis(
            &cluster,
            0,
            &["device", "call", &id, "add", "2,3", "--envelope", &cmd]
        )),
        "5"
    );
    fails_with(
        trellis(
            &cluster,
            0,
            &["device", "call", &id, "add", "2,3", "--envelope", &cmd],
        ),
        "device refused: replayed",
    );
    // Signed on the spot by both: the sequence goes above the last one.
    assert_eq!(
        ok(trellis(
            &cluster,
            0,
            &[
                "device",
                "call",
                &id,
                "add",
                "40,2",
                "--sign-with",
                &path("alice.pem"),
                "--sign-with",
                &path("bob.pem"),
            ],
        )),
        "42"
    );
    eventually(
        Duration::from_secs(5),
        "the accepted sequence recorded",
        || {
            let out = trellis(&cluster, 0, &["device", "show", &id]);
            async move {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
                v["command_sequence"]
                    .as_u64()
                    .is_some_and(|s| s > 0)
                    .then_some(())
            }
        },
    )
    .await?;

    // Signal (the device acknowledges through the other gateway) and a name.
    assert!(ok(trellis(&cluster, 0, &["device", "signal", &id, "on"])).ends_with("signalling"));
    assert!(ok(trellis(&cluster, 0, &["device", "signal", &id, "off"])).ends_with("stopped"));
    fails_with(
        trellis(
            &cluster,
            0,
            &["device", "signal", "0123456789abcdef01234567"],
        ),
        "(",
    );
    assert_eq!(
        ok(trellis(
            &cluster,
            0,
            &["device", "rename", &id, "lobby-valve"]
        )),
        format!("{id}: lobby-valve")
    );
    fails_with(
        trellis(&cluster, 0, &["device", "rename", &id, "bad name"]),
        "names use letters",
    );
    let _ = sim.kill();
    let _ = sim.wait();
    cluster.stop().await;
    Ok(())
}

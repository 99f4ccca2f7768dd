//! Signed commands end to end (issue 16): simulated devices whose trust
//! policy carries a command policy, on the second of two gateways, called
//! through the first (so every call is routed through Redis). The device,
//! not the cloud, decides: unsigned, untrusted, foreign, expired, replayed
//! and altered calls are refused with their reason; a correctly signed call
//! runs exactly once; an attacker holding every service credential and
//! write access to Redis gets nothing run; a device without a command
//! policy works as before. Real redis-server, keyvault, two gateways, real
//! TCP device sessions, keys generated here.
use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;
use rsa::PrivateKey;
use tokio::sync::mpsc::UnboundedReceiver;
use tonic::Code;
use trellis_core::redis_conn::keys;
use trellis_device::sim::{DeviceReport, SimConfig, run_fleet};
use trellis_firmware::command::{
    CommandEnvelope, CommandPolicy, Protected, SignedCommand, sign_command,
};
use trellis_firmware::{ManifestSignature, TrustPolicy, TrustedKey};
use trellis_proto::v1::{CallFunctionRequest, GetDeviceStateRequest, SignRequest};
use trellis_tests::{Cluster, eventually};

const MINUTE_MS: i64 = 60_000;

fn key() -> PrivateKey {
    PrivateKey::new(&mut rand::rng(), 2048).expect("RSA key")
}

fn now_ms() -> i64 {
    trellis_core::time::now_ms()
}

struct Keys {
    alice: PrivateKey,
    bob: PrivateKey,
    stranger: PrivateKey,
}

/// Firmware trusted from `release`; `add` needs alice AND bob, `led` is
/// unprotected; a command is valid for at most 10 minutes.
fn policy(keys: &Keys, release: &PrivateKey) -> anyhow::Result<(TrustPolicy, CommandPolicy)> {
    let signers = TrustPolicy::new(
        vec![
            TrustedKey::new("alice", keys.alice.to_public_key())?,
            TrustedKey::new("bob", keys.bob.to_public_key())?,
        ],
        2,
    )?;
    let commands =
        CommandPolicy::new(signers, Protected::Only(vec!["add".into()]), 10 * MINUTE_MS)?;
    let firmware = TrustPolicy::new(
        vec![TrustedKey::new("release", release.to_public_key())?],
        1,
    )?;
    Ok((firmware.with_commands(Some(commands.clone())), commands))
}

fn envelope(device: &str, argument: &str, sequence: u64) -> CommandEnvelope {
    CommandEnvelope {
        organization: "default".into(),
        device_id: device.into(),
        function: "add".into(),
        argument: argument.into(),
        not_before_ms: now_ms() - MINUTE_MS,
        expires_ms: now_ms() + 5 * MINUTE_MS,
        sequence,
    }
}

fn signed(e: &CommandEnvelope, signers: &[&PrivateKey]) -> Vec<u8> {
    SignedCommand {
        envelope: e.to_bytes().expect("envelope"),
        signatures: signers
            .iter()
            .map(|k| sign_command(k, e).expect("sign"))
            .collect(),
    }
    .encode()
    .expect("encode")
}

fn call(device: &str, argument: &str, signed_command: Vec<u8>) -> CallFunctionRequest {
    CallFunctionRequest {
        device_id: device.into(),
        function: "add".into(),
        argument: argument.into(),
        timeout_ms: 5_000,
        signed_command,
    }
}

/// Counts `add` runs and refusals the devices report.
#[derive(Default)]
struct Seen {
    runs: HashMap<String, Vec<String>>,
    refusals: HashMap<String, Vec<String>>,
}

impl Seen {
    fn drain(&mut self, reports: &mut UnboundedReceiver<DeviceReport>) {
        while let Ok(r) = reports.try_recv() {
            match r {
                DeviceReport::FunctionCalled {
                    device_id,
                    name,
                    argument,
                    ..
                } if name == "add" => self
                    .runs
                    .entry(device_id.to_string())
                    .or_default()
                    .push(String::from_utf8_lossy(&argument).into_owned()),
                DeviceReport::CommandRefused {
                    device_id, reason, ..
                } => self
                    .refusals
                    .entry(device_id.to_string())
                    .or_default()
                    .push(reason),
                _ => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_run_only_calls_their_owners_signed() -> anyhow::Result<()> {
    let cluster = Cluster::start(2).await?;
    let keys = Keys {
        alice: key(),
        bob: key(),
        stranger: key(),
    };
    let (trust, commands) = policy(&keys, &key())?;
    let guarded_identity = cluster.provision(1).await?;
    let other_guarded_identity = cluster.provision(1).await?;
    let plain_identity = cluster.provision(1).await?;
    let guarded = guarded_identity.device_id.to_string();
    let other = other_guarded_identity.device_id.to_string();
    let plain = plain_identity.device_id.to_string();

    // Devices on gateway 1; every call below goes in through gateway 0.
    let stop = tokio_util::sync::CancellationToken::new();
    let (tx, mut reports) = tokio::sync::mpsc::unbounded_channel();
    let endpoint = vec![cluster.gateways[1].devices.to_string()];
    tokio::spawn(run_fleet(
        vec![guarded_identity, other_guarded_identity],
        SimConfig {
            product_id: 1,
            trust_policy: Some(trust),
            ..SimConfig::default()
        },
        endpoint.clone(),
        stop.clone(),
        tx.clone(),
    ));
    tokio::spawn(run_fleet(
        vec![plain_identity],
        SimConfig {
            product_id: 1,
            ..SimConfig::default()
        },
        endpoint,
        stop.clone(),
        tx,
    ));
    let mut gw = cluster.gateway_client(0).await?;
    for id in [&guarded, &other, &plain] {
        let g = gw.clone();
        let id = id.clone();
        eventually(Duration::from_secs(30), "devices online", move || {
            let mut g = g.clone();
            let id = id.clone();
            async move {
                let s = g
                    .get_device_state(GetDeviceStateRequest { device_id: id })
                    .await
                    .ok()?
                    .into_inner();
                s.online.then_some(())
            }
        })
        .await?;
    }

    // The device reports the policy it enforces.
    let state = gw
        .get_device_state(GetDeviceStateRequest {
            device_id: guarded.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(state.command_policy_sha256, hex::encode(commands.digest()));
    let plain_state = gw
        .get_device_state(GetDeviceStateRequest {
            device_id: plain.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(plain_state.command_policy_sha256, "");

    let refused = |r: Result<tonic::Response<_>, tonic::Status>, reason: &str| match r {
        Ok(ok) => panic!("expected refusal {reason:?}, the call ran: {ok:?}"),
        Err(s) => {
            assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
            assert_eq!(s.message(), format!("device refused: {reason}"));
        }
    };

    // 1. Unsigned.
    refused(
        gw.call_function(call(&guarded, "2,3", Vec::new())).await,
        "signature missing",
    );
    // 2. Threshold not met: alice alone.
    let e = envelope(&guarded, "2,3", 10);
    refused(
        gw.call_function(call(&guarded, "2,3", signed(&e, &[&keys.alice])))
            .await,
        "signature missing",
    );
    // 3. A key not in the policy (with alice, so the threshold would count it).
    refused(
        gw.call_function(call(
            &guarded,
            "2,3",
            signed(&e, &[&keys.alice, &keys.stranger]),
        ))
        .await,
        "untrusted key",
    );
    // 4. Signed for another device.
    let for_other = envelope(&other, "2,3", 11);
    refused(
        gw.call_function(call(
            &guarded,
            "2,3",
            signed(&for_other, &[&keys.alice, &keys.bob]),
        ))
        .await,
        "wrong device",
    );
    // 5. Expired.
    let mut expired = envelope(&guarded, "2,3", 12);
    expired.not_before_ms = now_ms() - 9 * MINUTE_MS;
    expired.expires_ms = now_ms() - MINUTE_MS;
    refused(
        gw.call_function(call(
            &guarded,
            "2,3",
            signed(&expired, &[&keys.alice, &keys.bob]),
        ))
        .await,
        "expired",
    );
    // 6. Argument changed after signing: in the call, and inside the envelope.
    let good = envelope(&guarded, "2,3", 20);
    let good_bytes = signed(&good, &[&keys.alice, &keys.bob]);
    refused(
        gw.call_function(call(&guarded, "2,30", good_bytes.clone()))
            .await,
        "wrong call",
    );
    let mut tampered = SignedCommand::decode(&good_bytes)?;
    let mut altered = good.clone();
    altered.argument = "2,30".into();
    tampered.envelope = altered.to_bytes()?;
    refused(
        gw.call_function(call(&guarded, "2,30", tampered.encode()?))
            .await,
        "bad signature",
    );
    // 7. Correct: runs, and returns 5.
    let ok = gw
        .call_function(call(&guarded, "2,3", good_bytes.clone()))
        .await?
        .into_inner();
    assert_eq!(ok.return_value, 5);
    // 8. The same envelope again, and an older sequence: replayed.
    refused(
        gw.call_function(call(&guarded, "2,3", good_bytes.clone()))
            .await,
        "replayed",
    );
    let older = envelope(&guarded, "2,3", 19);
    refused(
        gw.call_function(call(
            &guarded,
            "2,3",
            signed(&older, &[&keys.alice, &keys.bob]),
        ))
        .await,
        "replayed",
    );
    // Unprotected functions need nothing.
    let led = gw
        .call_function(CallFunctionRequest {
            device_id: guarded.clone(),
            function: "led".into(),
            argument: "on".into(),
            timeout_ms: 5_000,
            signed_command: Vec::new(),
        })
        .await?
        .into_inner();
    assert_eq!(led.return_value, 1);

    // 9. A device without a command policy runs unsigned calls as before,
    // and ignores the elective option when one comes.
    assert_eq!(
        gw.call_function(call(&plain, "2,3", Vec::new()))
            .await?
            .into_inner()
            .return_value,
        5
    );
    let for_plain = envelope(&plain, "4,4", 30);
    assert_eq!(
        gw.call_function(call(&plain, "4,4", signed(&for_plain, &[&keys.alice])))
            .await?
            .into_inner()
            .return_value,
        8
    );

    // The accepted sequence is recorded and refusals are audited with
    // reasons (both off the reply path, so within a moment).
    {
        let gw = gw.clone();
        let guarded = guarded.clone();
        eventually(Duration::from_secs(5), "sequence 20 recorded", move || {
            let mut gw = gw.clone();
            let guarded = guarded.clone();
            async move {
                let s = gw
                    .get_device_state(GetDeviceStateRequest { device_id: guarded })
                    .await
                    .ok()?
                    .into_inner();
                (s.command_sequence == 20).then_some(())
            }
        })
        .await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let audit = cluster.audit(Some(&guarded)).await?;
    let reasons: Vec<String> = audit
        .iter()
        .filter(|r| r.action == "command_refused")
        .filter_map(|r| r.detail("reason").map(str::to_owned))
        .collect();
    for want in [
        "signature missing",
        "untrusted key",
        "wrong device",
        "expired",
        "wrong call",
        "bad signature",
        "replayed",
    ] {
        assert!(
            reasons.iter().any(|r| r == want),
            "no audited refusal {want:?} in {reasons:?}"
        );
    }
    assert!(
        audit
            .iter()
            .any(|r| r.action == "signed_command" && r.outcome == "ok"),
        "the accepted signed call is not audited"
    );

    // The device ran `add` exactly once, with the signed argument.
    let mut seen = Seen::default();
    tokio::time::sleep(Duration::from_millis(200)).await;
    seen.drain(&mut reports);
    assert_eq!(seen.runs.get(&guarded), Some(&vec!["2,3".to_string()]));
    assert!(seen.refusals.get(&guarded).map_or(0, Vec::len) >= 9);

    stop.cancel();
    cluster.stop().await;
    Ok(())
}

/// The attacker has every service credential (the test's gateway and
/// keyvault clients are fully privileged), write access to Redis, and has
/// captured a signed command from the gateway's inbox stream. Nothing it
/// tries makes the device run `add`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_side_attacker_cannot_make_the_device_run_a_function() -> anyhow::Result<()> {
    let cluster = Cluster::start(2).await?;
    let keys = Keys {
        alice: key(),
        bob: key(),
        stranger: key(),
    };
    let (trust, _) = policy(&keys, &key())?;
    let identity = cluster.provision(1).await?;
    let device = identity.device_id.to_string();
    let stop = tokio_util::sync::CancellationToken::new();
    let (tx, mut reports) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(run_fleet(
        vec![identity],
        SimConfig {
            product_id: 1,
            trust_policy: Some(trust),
            ..SimConfig::default()
        },
        vec![cluster.gateways[1].devices.to_string()],
        stop.clone(),
        tx,
    ));
    let mut gw = cluster.gateway_client(0).await?;
    let state = {
        let gw = gw.clone();
        let device = device.clone();
        eventually(Duration::from_secs(30), "device online", move || {
            let mut gw = gw.clone();
            let device = device.clone();
            async move {
                let s = gw
                    .get_device_state(GetDeviceStateRequest { device_id: device })
                    .await
                    .ok()?
                    .into_inner();
                s.online.then_some(s)
            }
        })
        .await?
    };

    // The owner makes one legitimate call (sequence 50): it runs.
    let legit = signed(&envelope(&device, "1,1", 50), &[&keys.alice, &keys.bob]);
    assert_eq!(
        gw.call_function(call(&device, "1,1", legit.clone()))
            .await?
            .into_inner()
            .return_value,
        2
    );

    // a. The cloud's own signing service will not sign an envelope (it
    // signs stored release manifests only), and its key is not in the
    // device's command policy anyway.
    let e = envelope(&device, "6,6", 60);
    let cloud = cluster
        .keyvault_client()
        .await?
        .sign(SignRequest {
            purpose: "release".into(),
            data: e.to_bytes()?,
            actor: "attacker".into(),
            key_id: String::new(),
        })
        .await;
    assert!(cloud.is_err(), "keyvault signed an arbitrary envelope");
    // b. Its own keys, and a signature forged under a trusted key's id.
    let own = signed(&e, &[&keys.stranger]);
    let forged = SignedCommand {
        envelope: e.to_bytes()?,
        signatures: vec![
            sign_command(&keys.alice, &e)?,
            ManifestSignature {
                key_id: trellis_firmware::key_id(&keys.bob.to_public_key()),
                signature: sign_command(&keys.stranger, &e)?.signature,
            },
        ],
    }
    .encode()?;
    for attempt in [Vec::new(), own, forged] {
        let r = gw.call_function(call(&device, "6,6", attempt)).await;
        let s = r.expect_err("the device ran an attacker's call");
        assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    }

    // c. Redis write access: a command written straight into the owning
    // gateway's inbox (no gRPC, no token), unsigned; then the captured
    // legitimate envelope, replayed to the device and to the call with a
    // different argument.
    let mut redis = cluster.redis().await?;
    let inbox = keys::gateway_commands(&cluster.gateways[1].id);
    let entries: redis::streams::StreamRangeReply = redis.xrange_all(&inbox).await?;
    let captured = entries
        .ids
        .iter()
        .find_map(|e| e.get::<String>("signed"))
        .expect("the routed signed command passed through the inbox");
    assert_eq!(hex::decode(&captured)?, legit);
    let reply_to = "attacker";
    for (n, (argument, signed_hex)) in [
        ("6,6", None),
        ("1,1", Some(captured.clone())),
        ("6,6", Some(captured.clone())),
    ]
    .into_iter()
    .enumerate()
    {
        let request = format!("attack-{n}");
        let mut fields: Vec<(&str, String)> = vec![
            ("kind", "command".into()),
            ("request", request.clone()),
            ("device", device.clone()),
            ("epoch", state.epoch.to_string()),
            ("reply_to", reply_to.into()),
            ("timeout_ms", "5000".into()),
            ("action", "call".into()),
            ("name", "add".into()),
            ("argument", argument.into()),
        ];
        if let Some(h) = signed_hex {
            fields.push(("signed", h));
        }
        let _: String = redis.xadd(&inbox, "*", &fields).await?;
    }
    // Every reply the gateway sends back is a refusal from the device.
    let answers = eventually(Duration::from_secs(10), "three answers", || {
        let mut redis = redis.clone();
        async move {
            let r: redis::streams::StreamRangeReply = redis
                .xrange_all(keys::gateway_commands(reply_to))
                .await
                .ok()?;
            (r.ids.len() >= 3).then_some(r)
        }
    })
    .await?;
    for a in &answers.ids {
        assert_eq!(
            a.get::<String>("result").as_deref(),
            Some("failure"),
            "{a:?}"
        );
        assert_eq!(
            a.get::<String>("failure").as_deref(),
            Some("refused"),
            "{a:?}"
        );
    }
    let messages: Vec<String> = answers
        .ids
        .iter()
        .filter_map(|a| a.get::<String>("message"))
        .collect();
    assert!(
        messages.contains(&"signature missing".to_string()),
        "{messages:?}"
    );
    assert!(messages.contains(&"replayed".to_string()), "{messages:?}");
    assert!(messages.contains(&"wrong call".to_string()), "{messages:?}");

    // The device ran `add` once: the owner's call.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut seen = Seen::default();
    seen.drain(&mut reports);
    assert_eq!(seen.runs.get(&device), Some(&vec!["1,1".to_string()]));

    stop.cancel();
    cluster.stop().await;
    Ok(())
}

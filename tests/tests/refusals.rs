//! Bad input gets a clear refusal, an audit or log record, no panic, and the
//! gateway keeps serving everyone else.
use rsa::pkcs8::EncodePublicKey;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_proto::v1::*;
use trellis_tests::{Cluster, RawDevice, closed_within, eventually};
use trellis_wire::handshake::HandshakePlaintext;
use trellis_wire::message;

async fn audit_outcome(
    cluster: &Cluster,
    device: Option<&str>,
    action: &str,
    outcome: &str,
) -> anyhow::Result<()> {
    eventually(
        Duration::from_secs(5),
        &format!("audit {action}/{outcome} for {device:?}"),
        || async {
            let records = cluster.audit(device).await.ok()?;
            records
                .iter()
                .any(|r| r.action == action && r.outcome == outcome)
                .then_some(())
        },
    )
    .await
}

/// Connects, and expects the handshake to be refused (connection closed
/// instead of a 384-byte reply).
async fn expect_refused(
    cluster: &Cluster,
    identity: &trellis_device::identity::DeviceIdentity,
) -> anyhow::Result<()> {
    let r = RawDevice::connect(cluster.gateways[0].devices, identity).await;
    assert!(r.is_err(), "handshake should have been refused");
    Ok(())
}

async fn read_nonce(stream: &mut TcpStream) -> anyhow::Result<[u8; 40]> {
    let mut nonce = [0u8; 40];
    stream.read_exact(&mut nonce).await?;
    Ok(nonce)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refusals_are_audited_and_others_keep_working() -> anyhow::Result<()> {
    let cluster = Cluster::start(1).await?;
    let gw = cluster.gateways[0].devices;

    // Unknown device: refused, and its offered key kept as pending only.
    let stranger = cluster.unregistered_identity()?;
    expect_refused(&cluster, &stranger).await?;
    let stranger_id = stranger.device_id.to_string();
    audit_outcome(
        &cluster,
        Some(&stranger_id),
        "open_session",
        "unknown_device",
    )
    .await?;

    // A device whose key differs from the registered one.
    let real = cluster.provision(1).await?;
    let mut impostor = cluster.unregistered_identity()?;
    impostor.device_id = real.device_id;
    expect_refused(&cluster, &impostor).await?;
    audit_outcome(
        &cluster,
        Some(&real.device_id.to_string()),
        "open_session",
        "key_mismatch",
    )
    .await?;

    // A revoked device.
    let revoked = cluster.provision(1).await?;
    cluster
        .keyvault_client()
        .await?
        .revoke_device(RevokeDeviceRequest {
            device_id: revoked.device_id.to_string(),
            reason: "stolen".into(),
        })
        .await?;
    expect_refused(&cluster, &revoked).await?;
    audit_outcome(
        &cluster,
        Some(&revoked.device_id.to_string()),
        "open_session",
        "revoked",
    )
    .await?;

    // A handshake that echoes the wrong nonce.
    let good = cluster.provision(1).await?;
    let mut s = TcpStream::connect(gw).await?;
    let mut nonce = read_nonce(&mut s).await?;
    nonce[0] ^= 0xff;
    let plain = HandshakePlaintext {
        nonce,
        device_id: good.device_id,
        public_key_der: Some(
            good.private_key
                .to_public_key()
                .to_public_key_der()?
                .as_bytes()
                .to_vec(),
        ),
    }
    .to_bytes();
    let ct = good
        .cloud_public_key
        .encrypt(&mut rand::rng(), rsa::Pkcs1v15Encrypt, &plain)?;
    s.write_all(&ct).await?;
    assert!(
        closed_within(&mut s, Duration::from_secs(5)).await,
        "wrong nonce must close"
    );

    // Garbage: 256 random bytes (bad padding under the cloud key). Must be
    // refused exactly like the wrong nonce: same outcome in the audit.
    let mut s = TcpStream::connect(gw).await?;
    read_nonce(&mut s).await?;
    s.write_all(&rand::random::<[u8; 256]>()).await?;
    assert!(
        closed_within(&mut s, Duration::from_secs(5)).await,
        "garbage must close"
    );
    let bad = eventually(
        Duration::from_secs(5),
        "two bad_handshake records",
        || async {
            let records = cluster.audit(None).await.ok()?;
            let bad: Vec<_> = records
                .into_iter()
                .filter(|r| r.action == "open_session" && r.outcome == "bad_handshake")
                .collect();
            (bad.len() >= 2).then_some(bad)
        },
    )
    .await?;
    assert_eq!(bad[0].outcome, bad[1].outcome);

    // A client that connects and sends nothing is closed after the step
    // timeout (2 s in tests), not kept forever.
    let mut s = TcpStream::connect(gw).await?;
    read_nonce(&mut s).await?;
    let started = std::time::Instant::now();
    assert!(
        closed_within(&mut s, Duration::from_secs(6)).await,
        "silent client must be closed"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "closed too early: {:?}",
        started.elapsed()
    );

    // Through all of that, a good device still gets in and answers.
    let mut dev = RawDevice::connect(gw, &good).await?;
    dev.hello(good.device_id, [7; 32]).await?;
    let hello = dev
        .recv(Duration::from_secs(5))
        .await?
        .expect("server hello");
    assert_eq!(hello.uri_path(), vec![b"h".as_slice()]);
    cluster.stop().await;
    Ok(())
}

/// Connects a registered device, sends Hello and reads the server's Hello
/// and Describe request.
async fn session(cluster: &Cluster) -> anyhow::Result<(RawDevice, String)> {
    let (mut dev, id) = cluster.device_in_session().await?;
    dev.recv(Duration::from_secs(5)).await?.expect("describe");
    Ok((dev, id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_the_session_with_an_audited_reason() -> anyhow::Result<()> {
    let cluster = Cluster::start(1).await?;

    // Oversized frame: the length alone is enough to close, nothing of the
    // 65535 announced bytes is sent or buffered.
    let (mut dev, id) = session(&cluster).await?;
    dev.send_raw(&[0xff, 0xff]).await?;
    assert!(
        dev.closed_within(Duration::from_secs(3)).await,
        "oversized frame must close"
    );
    audit_outcome(&cluster, Some(&id), "protocol_violation", "bad_frame").await?;

    // A frame replayed byte for byte.
    let (mut dev, id) = session(&cluster).await?;
    let mid = dev.take_id();
    let frame = dev.send(&message::event(mid, true, "temp", b"21")).await?;
    dev.send_raw(&frame).await?;
    assert!(
        dev.closed_within(Duration::from_secs(3)).await,
        "replayed frame must close"
    );
    let records = cluster.audit(Some(&id)).await?;
    assert!(
        records.iter().any(|r| r.action == "protocol_violation"),
        "{records:?}"
    );

    // The same message id again, properly encrypted (a replayed message).
    let (mut dev, id) = session(&cluster).await?;
    let mid = dev.take_id();
    dev.send(&message::event(mid, true, "temp", b"21")).await?;
    dev.send(&message::event(mid, true, "temp", b"21")).await?;
    assert!(
        dev.closed_within(Duration::from_secs(3)).await,
        "replayed id must close"
    );
    audit_outcome(&cluster, Some(&id), "protocol_violation", "bad_message_id").await?;

    // A skipped message id.
    let (mut dev, id) = session(&cluster).await?;
    let mid = dev.take_id().wrapping_add(1);
    dev.send(&message::event(mid, true, "temp", b"21")).await?;
    assert!(
        dev.closed_within(Duration::from_secs(3)).await,
        "skipped id must close"
    );
    audit_outcome(&cluster, Some(&id), "protocol_violation", "bad_message_id").await?;

    // A tampered frame (one ciphertext bit flipped).
    let (mut dev, id) = session(&cluster).await?;
    let mid = dev.take_id();
    let mut probe = dev
        .cipher
        .encoder
        .encode(&message::event(mid, true, "x", b"1").encode());
    let last = probe.len() - 1;
    probe[last] ^= 0x01;
    dev.send_raw(&probe).await?;
    assert!(
        dev.closed_within(Duration::from_secs(3)).await,
        "tampered frame must close"
    );
    audit_outcome(&cluster, Some(&id), "protocol_violation", "bad_frame").await?;

    // The gateway still serves a well-behaved device.
    let (mut dev, _) = session(&cluster).await?;
    let mid = dev.take_id();
    dev.send(&message::ping(mid)).await?;
    let ack = dev.recv(Duration::from_secs(3)).await?.expect("ping ack");
    assert_eq!(ack.message_id, mid);
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_session_closes_the_first_and_is_audited() -> anyhow::Result<()> {
    let cluster = Cluster::start(2).await?;
    let identity = cluster.provision(1).await?;
    let id = identity.device_id.to_string();
    let mut first = RawDevice::connect(cluster.gateways[0].devices, &identity).await?;
    first.hello(identity.device_id, [1; 32]).await?;
    first
        .recv(Duration::from_secs(5))
        .await?
        .expect("server hello");
    let first_peer = first.stream.local_addr()?.to_string();

    // The clone (or the same device after a silent reconnect) comes in
    // through the other gateway.
    let mut second = RawDevice::connect(cluster.gateways[1].devices, &identity).await?;
    second.hello(identity.device_id, [1; 32]).await?;
    second
        .recv(Duration::from_secs(5))
        .await?
        .expect("server hello");
    let second_peer = second.stream.local_addr()?.to_string();

    assert!(
        first.closed_within(Duration::from_secs(5)).await,
        "first session must be closed"
    );
    let dup = eventually(
        Duration::from_secs(5),
        "duplicate_session audit",
        || async {
            cluster
                .audit(Some(&id))
                .await
                .ok()?
                .into_iter()
                .find(|r| r.action == "duplicate_session")
        },
    )
    .await?;
    let detail: std::collections::HashMap<_, _> = dup.detail.into_iter().collect();
    assert_eq!(detail.get("old_peer"), Some(&first_peer));
    assert_eq!(detail.get("new_peer"), Some(&second_peer));
    assert_eq!(detail.get("old_gateway").map(String::as_str), Some("gw-1"));

    // The second session is the owner and stays up.
    let mut gw = cluster.gateway_client(0).await?;
    let state = gw
        .get_device_state(GetDeviceStateRequest {
            device_id: id.clone(),
        })
        .await?
        .into_inner();
    assert!(state.online);
    assert_eq!(state.gateway_id, "gw-2");
    let mid = second.take_id();
    second.send(&message::ping(mid)).await?;
    assert!(
        second.recv(Duration::from_secs(3)).await?.is_some(),
        "second session alive"
    );
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_beyond_the_admission_rate_are_turned_away_before_rsa() -> anyhow::Result<()> {
    let cluster = Cluster::start_configured(1, |c| {
        c.gateway.handshake_rate = 1;
        c.gateway.handshake_burst = 2;
    })
    .await?;
    let gw = cluster.gateways[0].devices;

    // A burst of ten connections: two get a nonce, the rest are closed at
    // once without one (no RSA work, no keyvault call).
    let mut nonces = 0;
    let mut turned_away = 0;
    for _ in 0..10 {
        let mut s = TcpStream::connect(gw).await?;
        let mut nonce = [0u8; 40];
        match tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut nonce)).await {
            Ok(Ok(_)) => nonces += 1,
            Ok(Err(_)) => turned_away += 1,
            Err(_) => anyhow::bail!("neither a nonce nor a close"),
        }
    }
    assert_eq!(nonces, 2, "burst of 2 admitted");
    assert_eq!(turned_away, 8);
    let audit = cluster.audit(None).await?;
    assert!(
        audit.iter().all(|r| r.action != "open_session"),
        "no keyvault work for the turned-away devices: {audit:?}"
    );

    // The bucket refills: a second later a device gets in.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let identity = cluster.provision(1).await?;
    RawDevice::connect(gw, &identity).await?;
    cluster.stop().await;
    Ok(())
}

/// `gateway.max_frame_len` is the limit the gateway applies, not only the
/// default: a frame header under the default but over the configured limit
/// closes the session, and a frame under it still goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_frame_limit_is_the_one_enforced() -> anyhow::Result<()> {
    let cluster = Cluster::start_configured(1, |c| {
        c.gateway.max_frame_len = 1024;
    })
    .await?;

    // 2,048 bytes announced: under the 4,096 default, over the setting.
    let (mut dev, id) = session(&cluster).await?;
    dev.send_raw(&[0x08, 0x00]).await?;
    assert!(
        dev.closed_within(Duration::from_secs(3)).await,
        "a frame over the configured limit must close the session"
    );
    audit_outcome(&cluster, Some(&id), "protocol_violation", "bad_frame").await?;

    // A normal frame under the limit is answered.
    let (mut dev, _) = session(&cluster).await?;
    let mid = dev.take_id();
    dev.send(&message::ping(mid)).await?;
    let ack = dev.recv(Duration::from_secs(5)).await?.expect("ping ack");
    assert_eq!(ack.message_id, mid);
    cluster.stop().await;
    Ok(())
}

/// A device that stops sending anything (no pings) after its Hello is
/// dropped by the gateway after three keepalive intervals, and shows as
/// offline; one that keeps pinging stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_session_is_dropped_after_three_keepalives() -> anyhow::Result<()> {
    let cluster = Cluster::start_configured(1, |c| {
        c.gateway.keepalive_secs = 1;
    })
    .await?;
    let (mut silent, silent_id) = session(&cluster).await?;
    let (mut pinging, pinging_id) = session(&cluster).await?;
    let started = std::time::Instant::now();
    let mut closed_after = None;
    while started.elapsed() < Duration::from_secs(8) {
        let mid = pinging.take_id();
        pinging.send(&message::ping(mid)).await?;
        if closed_after.is_none() && silent.closed_within(Duration::from_millis(500)).await {
            closed_after = Some(started.elapsed());
        }
        if closed_after.is_some() && started.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    let closed_after = closed_after.expect("the silent session was never closed");
    assert!(
        closed_after >= Duration::from_millis(2500),
        "closed before three keepalives: {closed_after:?}"
    );
    let mut gw = cluster.gateway_client(0).await?;
    let state = |id: String| GetDeviceStateRequest { device_id: id };
    let silent_state = gw.get_device_state(state(silent_id)).await?.into_inner();
    assert!(
        !silent_state.online,
        "a dropped session leaves the device offline"
    );
    let pinging_state = gw.get_device_state(state(pinging_id)).await?.into_inner();
    assert!(pinging_state.online, "a device that pings stays in session");
    cluster.stop().await;
    Ok(())
}

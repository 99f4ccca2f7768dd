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

/// Waits until a refusal of `reason` claiming `device` has been counted.
async fn refusal_counted(
    cluster: &Cluster,
    device: &str,
    reason: &str,
) -> anyhow::Result<trellis_core::audit::Refusal> {
    eventually(
        Duration::from_secs(5),
        &format!("refusal {reason} for {device}"),
        || async {
            let refusals = cluster.refusals(Some(device)).await.ok()?;
            refusals
                .into_iter()
                .find(|r| r.action == "open_session" && r.reason == reason)
        },
    )
    .await
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
    refusal_counted(&cluster, &stranger_id, "unknown_device").await?;

    // A device whose key differs from the registered one.
    let real = cluster.provision(1).await?;
    let mut impostor = cluster.unregistered_identity()?;
    impostor.device_id = real.device_id;
    expect_refused(&cluster, &impostor).await?;
    refusal_counted(&cluster, &real.device_id.to_string(), "key_mismatch").await?;

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
    refusal_counted(&cluster, &revoked.device_id.to_string(), "revoked").await?;

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
    // Both counted into one aggregate for this address.
    eventually(
        Duration::from_secs(5),
        "two bad_handshake refusals",
        || async {
            let refusals = cluster.refusals(None).await.ok()?;
            refusals
                .iter()
                .any(|r| {
                    r.action == "open_session"
                        && r.reason == "bad_handshake"
                        && r.source == "127.0.0.1"
                        && r.count >= 2
                })
                .then_some(())
        },
    )
    .await?;
    let audit = cluster.audit(None).await?;
    assert!(
        audit
            .iter()
            .all(|r| r.outcome == "ok" || r.action != "open_session"),
        "refusals must not be records of the audit stream: {audit:?}"
    );

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

/// A frame that has started must complete within
/// `gateway.frame_read_timeout_secs`: a device that sends part of a frame
/// and then nothing, or trickles one byte at a time, is closed as a
/// protocol violation with that reason long before the keepalive limit
/// (45 s here); a frame sent in two parts in time is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_frame_closes_the_session_at_the_read_deadline() -> anyhow::Result<()> {
    let cluster = Cluster::start_configured(1, |c| {
        c.gateway.frame_read_timeout_secs = 2;
    })
    .await?;

    // Part of a real frame, then silence.
    let (mut dev, id) = session(&cluster).await?;
    let mid = dev.take_id();
    let frame = dev
        .cipher
        .encoder
        .encode(&message::event(mid, true, "temp", b"21").encode());
    let started = std::time::Instant::now();
    dev.send_raw(&frame[..5]).await?;
    assert!(
        dev.closed_within(Duration::from_secs(6)).await,
        "a stalled frame must close the session"
    );
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(1900) && after < Duration::from_secs(5),
        "closed after {after:?}, want about 2 s"
    );
    audit_outcome(
        &cluster,
        Some(&id),
        "protocol_violation",
        "frame_read_timeout",
    )
    .await?;

    // One byte every 400 ms: each read is progress, the frame never ends in time.
    let (mut dev, id) = session(&cluster).await?;
    let mid = dev.take_id();
    let frame = dev
        .cipher
        .encoder
        .encode(&message::event(mid, true, "temp", b"21").encode());
    let started = std::time::Instant::now();
    let mut closed = false;
    for byte in &frame {
        if dev.send_raw(&[*byte]).await.is_err()
            || dev.closed_within(Duration::from_millis(400)).await
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "a trickled frame must be closed");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    audit_outcome(
        &cluster,
        Some(&id),
        "protocol_violation",
        "frame_read_timeout",
    )
    .await?;

    // A frame in two parts 500 ms apart is in time, and answered.
    let (mut dev, _) = session(&cluster).await?;
    let mid = dev.take_id();
    let frame = dev.cipher.encoder.encode(&message::ping(mid).encode());
    dev.send_raw(&frame[..3]).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    dev.send_raw(&frame[3..]).await?;
    let ack = dev.recv(Duration::from_secs(5)).await?.expect("ping ack");
    assert_eq!(ack.message_id, mid);
    cluster.stop().await;
    Ok(())
}

/// Anyone who can reach the device port can cause refused handshakes, as
/// fast as admission allows. 10,000 of them are one counted aggregate for
/// their source address and reason: the audit stream does not grow, and
/// every key-use record written before them is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_handshakes_evicts_no_audit_record() -> anyhow::Result<()> {
    const FLOOD: usize = 10_000;
    const CONCURRENT: usize = 8;
    let cluster = Cluster::start_configured(1, |c| {
        c.gateway.handshake_rate = 1_000_000;
        c.gateway.handshake_burst = 1_000_000;
    })
    .await?;
    let gw = cluster.gateways[0].devices;
    // Key uses worth keeping: three sessions opened.
    for _ in 0..3 {
        cluster.device_in_session().await?;
    }
    let before = cluster.audit(None).await?;
    assert!(
        before
            .iter()
            .filter(|r| r.action == "open_session" && r.outcome == "ok")
            .count()
            >= 3,
        "{before:?}"
    );

    // 256 random bytes where the encrypted handshake belongs: keyvault
    // decrypts (a private-key use) and refuses each as bad_handshake.
    let mut tasks = Vec::new();
    for worker in 0..CONCURRENT {
        tasks.push(tokio::spawn(async move {
            let mut refused = 0usize;
            for _ in (worker..FLOOD).step_by(CONCURRENT) {
                let mut s = TcpStream::connect(gw).await?;
                read_nonce(&mut s).await?;
                s.write_all(&rand::random::<[u8; 256]>()).await?;
                if closed_within(&mut s, Duration::from_secs(10)).await {
                    refused += 1;
                }
            }
            anyhow::Ok(refused)
        }));
    }
    let mut refused = 0;
    for t in tasks {
        refused += t.await??;
    }
    assert_eq!(refused, FLOOD, "every garbage handshake must be closed");

    let counted = eventually(
        Duration::from_secs(10),
        "10,000 refusals counted",
        || async {
            let refusals = cluster.refusals(None).await.ok()?;
            refusals
                .into_iter()
                .find(|r| r.reason == "bad_handshake" && r.count as usize >= FLOOD)
        },
    )
    .await?;
    assert_eq!(counted.count as usize, FLOOD, "{counted:?}");
    assert_eq!(counted.source, "127.0.0.1");
    assert!(counted.first_ms <= counted.last_ms);

    let after = cluster.audit(None).await?;
    for record in &before {
        assert!(
            after.iter().any(|r| r.id == record.id),
            "record {} ({} {}) was evicted by the flood",
            record.id,
            record.action,
            record.outcome
        );
    }
    assert_eq!(
        after.len(),
        before.len(),
        "the flood added records to the audit stream"
    );

    // And the gateway still serves a real device.
    cluster.device_in_session().await?;
    cluster.stop().await;
    Ok(())
}

/// `gateway.handshake_concurrency` bounds the handshakes in progress: with
/// two devices holding theirs open, a third connection is closed at once
/// without a nonce, and gets one as soon as a slot is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_beyond_the_concurrency_limit_are_turned_away_at_accept() -> anyhow::Result<()> {
    let cluster = Cluster::start_configured(1, |c| {
        c.gateway.handshake_concurrency = 2;
    })
    .await?;
    let gw = cluster.gateways[0].devices;
    let mut first = TcpStream::connect(gw).await?;
    read_nonce(&mut first).await?;
    let mut second = TcpStream::connect(gw).await?;
    read_nonce(&mut second).await?;

    let mut third = TcpStream::connect(gw).await?;
    let mut nonce = [0u8; 40];
    let turned_away =
        tokio::time::timeout(Duration::from_secs(2), third.read_exact(&mut nonce)).await;
    assert!(
        matches!(turned_away, Ok(Err(_))),
        "a third handshake must be closed without a nonce: {turned_away:?}"
    );

    // One finishes (here: gives up); its slot is free again.
    drop(first);
    let identity = cluster.provision(1).await?;
    eventually(Duration::from_secs(5), "a freed handshake slot", || async {
        RawDevice::connect(gw, &identity).await.ok().map(drop)
    })
    .await?;
    drop(second);
    cluster.stop().await;
    Ok(())
}

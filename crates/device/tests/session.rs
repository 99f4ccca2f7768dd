//! A device session against an in-test loopback server built from
//! trellis-wire's server half, with keys generated at test time.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rsa::{PrivateKey, PublicKey};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use trellis_device::{
    DemoApp, DeviceApp, DeviceIdentity, Session, SessionConfig, SessionError, SessionEvent,
    load_fleet, write_cloud_key, write_identity,
};
use trellis_wire::coap::{CoapMessage, MessageType, code};
use trellis_wire::handshake::{
    assemble_server_reply, encrypt_session_material, session_hmac, sign_session_hmac,
};
use trellis_wire::message::{
    self, Describe, Incoming, Request, VariableType, VariableValue, classify, decode_value,
};
use trellis_wire::{
    DeviceId, HandshakePlaintext, OutgoingCounter, ServerHandshake, SessionCipher, SessionMaterial,
};

struct Keys {
    cloud: PrivateKey,
    wrong_cloud: PrivateKey,
    identity: DeviceIdentity,
}

fn keys() -> Keys {
    let mut rng = rand::rng();
    let cloud = PrivateKey::new(&mut rng, 2048).expect("cloud");
    let wrong_cloud = PrivateKey::new(&mut rng, 2048).expect("wrong cloud");
    let device = trellis_device::generate_device_key(&mut rng).expect("device");
    let identity = DeviceIdentity {
        device_id: "0123456789abcdef01234567".parse().expect("id"),
        private_key: device,
        cloud_public_key: cloud.to_public_key(),
    };
    Keys {
        cloud,
        wrong_cloud,
        identity,
    }
}

struct Server {
    stream: TcpStream,
    cipher: SessionCipher,
    material: SessionMaterial,
}

impl Server {
    /// The server's handshake, signing with `signer` (the wrong key to test refusal).
    async fn accept(
        listener: &TcpListener,
        cloud: &PrivateKey,
        device_pub: &PublicKey,
        signer: &PrivateKey,
    ) -> Server {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let mut hs = ServerHandshake::new(rand::random());
        stream.write_all(hs.nonce()).await.expect("nonce");
        let mut buf = [0u8; 512];
        let ct = loop {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "device closed during handshake");
            if let Some(ct) = hs.receive(&buf[..n]).expect("256 bytes") {
                break ct;
            }
        };
        let plain =
            HandshakePlaintext::parse(&cloud.decrypt(rsa::Pkcs1v15Encrypt, &ct).expect("decrypt"))
                .expect("parse");
        assert!(trellis_wire::nonce_matches(hs.nonce(), &plain.nonce));
        assert_eq!(plain.public_key_der.as_ref().map(Vec::len), Some(162));
        let mut rng = rand::rng();
        let material = SessionMaterial::generate(&mut rng);
        let c = encrypt_session_material(&material, device_pub, &mut rng).expect("C");
        let sig = sign_session_hmac(signer, &session_hmac(&material, &c)).expect("sign");
        let reply = assemble_server_reply(&c, &sig).expect("reply");
        let (bytes, cipher) = hs.accept(material.clone(), &reply).expect("accept");
        stream.write_all(&bytes).await.expect("reply");
        Server {
            stream,
            cipher,
            material,
        }
    }

    async fn send(&mut self, m: &CoapMessage) {
        let f = self.cipher.encoder.encode(&m.encode());
        self.stream.write_all(&f).await.expect("send");
    }

    async fn recv(&mut self) -> CoapMessage {
        let mut buf = [0u8; 2048];
        loop {
            if let Some(p) = self.cipher.decoder.next_message().expect("frame") {
                return CoapMessage::decode(&p).expect("coap");
            }
            let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut buf))
                .await
                .expect("device answered in time")
                .expect("read");
            assert!(n > 0, "device closed the connection");
            self.cipher.decoder.push(&buf[..n]);
        }
    }
}

/// Counts calls so a retransmitted request can be shown to run once.
struct Counting {
    inner: DemoApp,
    calls: AtomicUsize,
}

impl DeviceApp for Counting {
    fn describe(&self) -> Describe {
        self.inner.describe()
    }
    fn call(&self, name: &str, argument: &[u8]) -> Option<i32> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.call(name, argument)
    }
    fn read(&self, name: &str) -> Option<VariableValue> {
        self.inner.read(name)
    }
}

#[tokio::test]
async fn device_session_end_to_end() {
    let k = keys();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let image = b"firmware image bytes".to_vec();
    let sha: [u8; 32] = Sha256::digest(&image).into();
    let config = SessionConfig {
        product_id: 6,
        firmware_version: 3,
        platform_id: 6,
        firmware_sha256: sha,
        keepalive: Duration::from_millis(400),
        ping_timeout: Duration::from_millis(400),
        ..SessionConfig::default()
    };
    let app = Arc::new(Counting {
        inner: DemoApp::new(21.5),
        calls: AtomicUsize::new(0),
    });
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let identity = k.identity.clone();
    let device_app = app.clone();
    let device = tokio::spawn(async move {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let session = Session::connect(stream, &identity, config).await?;
        session
            .run(device_app.as_ref(), CancellationToken::new(), move |e| {
                drop(events_tx.send(e))
            })
            .await
    });

    let device_pub = k.identity.private_key.to_public_key();
    let mut s = Server::accept(&listener, &k.cloud, &device_pub, &k.cloud).await;

    // Hello: the firmware's id rule and the SHA-256 extension.
    let hello = s.recv().await;
    assert_eq!(hello.message_id, s.material.device_first_message_id());
    let Ok(Incoming::Request(Request::Hello(h))) = classify(&hello) else {
        panic!("not a Hello: {hello:?}")
    };
    assert_eq!((h.product_id, h.firmware_version, h.platform_id), (6, 3, 6));
    assert_eq!(h.device_id, Some(k.identity.device_id));
    assert_eq!(h.firmware_sha256, Some(sha));
    let mut device_ids = hello.message_id;
    let mut next_device_id = || {
        device_ids = device_ids.wrapping_add(1);
        device_ids
    };

    let mut ids = OutgoingCounter::new(40000);
    s.send(&message::hello_server(ids.next(), 1)).await;

    // Describe.
    s.send(&message::describe(ids.next(), 2)).await;
    let d = s.recv().await;
    assert_eq!(
        (d.mtype, d.code, d.token.clone()),
        (MessageType::NonConfirmable, code::CHANGED, vec![2])
    );
    assert_eq!(d.message_id, next_device_id());
    let described = Describe::from_json(&d.payload).expect("describe json");
    assert_eq!(described.functions, ["led", "add"]);
    assert_eq!(described.variable_type("temp"), Some(VariableType::Double));

    // add 2,3 = 5: an empty ACK, then NON CHANGED with the result.
    let call_id = ids.next();
    s.send(&message::function_call(call_id, 3, "add", b"2,3"))
        .await;
    assert_eq!(s.recv().await, message::empty_ack(call_id));
    let ret = s.recv().await;
    assert_eq!(ret, message::function_return(next_device_id(), &[3], 5));

    // temp reads back as a little-endian double, piggybacked on the request id.
    let var_id = ids.next();
    s.send(&message::variable_request(var_id, 4, "temp")).await;
    let v = s.recv().await;
    assert_eq!(
        (v.mtype, v.code, v.message_id, v.token.clone()),
        (MessageType::Acknowledgement, code::CONTENT, var_id, vec![4])
    );
    assert_eq!(
        decode_value(VariableType::Double, &v.payload),
        Ok(VariableValue::Double(21.5))
    );

    // A retransmitted CON is answered again but not run again.
    let before = app.calls.load(Ordering::SeqCst);
    let led_id = ids.next();
    for _ in 0..2 {
        s.send(&message::function_call(led_id, 5, "led", b"on"))
            .await;
        assert_eq!(s.recv().await, message::empty_ack(led_id));
        assert_eq!(
            s.recv().await,
            message::function_return(next_device_id(), &[5], 1)
        );
    }
    assert_eq!(app.calls.load(Ordering::SeqCst), before + 1, "led ran once");
    assert!(app.inner.led());

    // EventSlowdown (ACK 4.00 with token) is tolerated; then the keepalive
    // ping arrives after silence and is answered spark-style.
    s.send(&message::event_slowdown(1)).await;
    let ping = s.recv().await;
    assert_eq!(classify(&ping), Ok(Incoming::Request(Request::Ping)));
    assert_eq!(ping.message_id, next_device_id());
    s.send(&message::ping_ack(ping.message_id, &[0])).await;

    // A skipped server id ends the session.
    s.send(&message::describe(ids.next().wrapping_add(5), 6))
        .await;
    let outcome = tokio::time::timeout(Duration::from_secs(10), device)
        .await
        .expect("device ends")
        .expect("join");
    assert!(
        matches!(outcome, Err(SessionError::Counter(_))),
        "{outcome:?}"
    );

    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    assert!(seen.contains(&SessionEvent::FunctionCalled {
        name: "add".into(),
        argument: b"2,3".to_vec(),
        result: 5
    }));
    assert_eq!(
        seen.iter()
            .filter(|e| matches!(e, SessionEvent::FunctionCalled { name, .. } if name == "led"))
            .count(),
        1
    );
    assert!(seen.contains(&SessionEvent::VariableRead {
        name: "temp".into()
    }));
    shutdown.cancel();
}

#[tokio::test]
async fn unanswered_ping_drops_the_connection() {
    let k = keys();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = SessionConfig {
        keepalive: Duration::from_millis(200),
        ping_timeout: Duration::from_millis(200),
        ..SessionConfig::default()
    };
    let identity = k.identity.clone();
    let device = tokio::spawn(async move {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let session = Session::connect(stream, &identity, config).await?;
        session
            .run(&DemoApp::default(), CancellationToken::new(), |_| {})
            .await
    });
    let mut s = Server::accept(
        &listener,
        &k.cloud,
        &k.identity.private_key.to_public_key(),
        &k.cloud,
    )
    .await;
    let _hello = s.recv().await;
    let ping = s.recv().await;
    assert_eq!(ping.code, code::EMPTY);
    let outcome = tokio::time::timeout(Duration::from_secs(5), device)
        .await
        .expect("ends")
        .expect("join");
    assert!(
        matches!(outcome, Err(SessionError::PingTimeout(_))),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn device_refuses_reply_signed_by_wrong_cloud_key() {
    let k = keys();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let identity = k.identity.clone();
    let device = tokio::spawn(async move {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Session::connect(stream, &identity, SessionConfig::default())
            .await
            .map(|_| ())
    });
    let _s = Server::accept(
        &listener,
        &k.cloud,
        &k.identity.private_key.to_public_key(),
        &k.wrong_cloud,
    )
    .await;
    let outcome = device.await.expect("join");
    assert!(
        matches!(
            outcome,
            Err(SessionError::Handshake(
                trellis_wire::HandshakeError::BadSignature
            ))
        ),
        "{outcome:?}"
    );
}

#[test]
fn fleet_directory_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::rng();
    let cloud = PrivateKey::new(&mut rng, 2048)
        .expect("cloud")
        .to_public_key();
    write_cloud_key(dir.path(), &cloud).expect("cloud key");
    let mut ids = Vec::new();
    for i in 0..3u8 {
        let identity = DeviceIdentity {
            device_id: DeviceId([i; 12]),
            private_key: trellis_device::generate_device_key(&mut rng).expect("key"),
            cloud_public_key: cloud.clone(),
        };
        write_identity(dir.path(), &identity).expect("write");
        ids.push(identity.device_id);
    }
    let pem = dir.path().join(format!("{}.pem", ids[0]));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&pem).expect("meta").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    std::fs::write(dir.path().join("notes.pem"), "ignored").expect("write");

    let fleet = load_fleet(dir.path(), None, None).expect("load");
    assert_eq!(fleet.iter().map(|d| d.device_id).collect::<Vec<_>>(), ids);
    assert_eq!(fleet[0].cloud_public_key, cloud);
    assert_eq!(
        load_fleet(dir.path(), Some(2), None).expect("limit").len(),
        2
    );

    std::fs::write(
        dir.path().join(format!("{}.pem", DeviceId([9; 12]))),
        "garbage",
    )
    .expect("write");
    let err = load_fleet(dir.path(), None, None).unwrap_err().to_string();
    assert!(err.contains("090909090909090909090909.pem"), "{err}");
    let missing = load_fleet(dir.path(), None, Some(&dir.path().join("nope.pem")))
        .unwrap_err()
        .to_string();
    assert!(missing.contains("nope.pem"), "{missing}");
}

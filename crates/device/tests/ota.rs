//! Signed firmware updates to a simulated device over loopback TCP: the
//! in-test server drives `OtaSender`; the device (run by the fleet
//! simulator, so it really reconnects) verifies with its trust policy.
//! Keys are generated at test time.

use std::time::Duration;

use rsa::PrivateKey;
use rsa::pkcs8::DecodePublicKey;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use trellis_device::{DeviceIdentity, DeviceReport, SimConfig, run_fleet};
use trellis_firmware::{
    OtaSender, Outcome, REJECTED_EVENT, SenderConfig, SignedManifest, TrustPolicy, TrustedKey,
    build_manifest, encode_manifest, encode_signed_manifest, parse_rejection_event, sign_manifest,
};
use trellis_wire::coap::{CoapMessage, MessageType};
use trellis_wire::handshake::{
    assemble_server_reply, encrypt_session_material, session_hmac, sign_session_hmac,
};
use trellis_wire::message::{self, Incoming, Request, classify};
use trellis_wire::{
    DeviceId, HandshakePlaintext, Hello, OutgoingCounter, ServerHandshake, SessionCipher,
    SessionMaterial,
};

const PRODUCT: u16 = 6;

/// What, signed manifest, image sent, chunk altered in flight, expected reason.
type Case = (&'static str, Vec<u8>, Vec<u8>, Option<u16>, &'static str);

struct Conn {
    stream: TcpStream,
    cipher: SessionCipher,
    ids: OutgoingCounter,
    token: u8,
    /// `trellis/ota/rejected` event data seen so far.
    rejections: Vec<String>,
}

impl Conn {
    async fn accept(listener: &TcpListener, cloud: &PrivateKey) -> (Conn, Hello) {
        let (mut stream, _) = tokio::time::timeout(Duration::from_secs(20), listener.accept())
            .await
            .expect("the device connects")
            .expect("accept");
        let mut hs = ServerHandshake::new(rand::random());
        stream.write_all(hs.nonce()).await.expect("nonce");
        let mut buf = [0u8; 1024];
        let ct = loop {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "device closed during handshake");
            if let Some(ct) = hs.receive(&buf[..n]).expect("256 bytes") {
                break ct;
            }
        };
        let plain =
            HandshakePlaintext::parse(&cloud.decrypt(rsa::Pkcs1v15Encrypt, &ct).expect("dec"))
                .expect("parse");
        let der = plain.public_key_der.expect("device sends its key");
        let device_pub = rsa::PublicKey::from_public_key_der(&der).expect("der");
        let (reply, cipher) = {
            let mut rng = rand::rng();
            let material = SessionMaterial::generate(&mut rng);
            let c = encrypt_session_material(&material, &device_pub, &mut rng).expect("C");
            let sig = sign_session_hmac(cloud, &session_hmac(&material, &c)).expect("sig");
            hs.accept(material, &assemble_server_reply(&c, &sig).expect("reply"))
                .expect("accept")
        };
        stream.write_all(&reply).await.expect("reply");
        let mut conn = Conn {
            stream,
            cipher,
            ids: OutgoingCounter::new(30_000),
            token: 0,
            rejections: Vec::new(),
        };
        let hello = conn.recv().await.expect("hello");
        let Ok(Incoming::Request(Request::Hello(h))) = classify(&hello) else {
            panic!("not a Hello: {hello:?}")
        };
        let (id, token) = conn.next_ids();
        conn.send(&message::hello_server(id, token)).await;
        (conn, h)
    }

    fn next_ids(&mut self) -> (u16, u8) {
        self.token = self.token.wrapping_add(1).max(1);
        (self.ids.next(), self.token)
    }

    async fn send(&mut self, m: &CoapMessage) {
        let f = self.cipher.encoder.encode(&m.encode());
        self.stream.write_all(&f).await.expect("send");
    }

    /// The next message, `None` after `wait` of silence.
    async fn recv_within(&mut self, wait: Duration) -> Option<CoapMessage> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(p) = self.cipher.decoder.next_message().expect("frame") {
                return Some(CoapMessage::decode(&p).expect("coap"));
            }
            let n = tokio::time::timeout(wait, self.stream.read(&mut buf))
                .await
                .ok()?
                .expect("read");
            assert!(n > 0, "device closed the connection");
            self.cipher.decoder.push(&buf[..n]);
        }
    }

    async fn recv(&mut self) -> Option<CoapMessage> {
        self.recv_within(Duration::from_secs(10)).await
    }

    /// What the server does with device messages the sender does not own.
    async fn other(&mut self, m: &CoapMessage) {
        match classify(m) {
            Ok(Incoming::Request(Request::Event { public, name, data })) => {
                assert!(!public, "OTA events are private");
                if name == REJECTED_EVENT {
                    self.rejections
                        .push(String::from_utf8(data).expect("utf-8"));
                }
            }
            Ok(Incoming::Request(Request::Ping)) => {
                self.send(&message::ping_ack(m.message_id, &[0])).await;
            }
            _ => {}
        }
    }

    /// Runs a whole transfer; `alter` may change each outgoing message.
    async fn deliver(
        &mut self,
        mut sender: OtaSender,
        alter: impl Fn(&mut CoapMessage),
    ) -> Outcome {
        while !sender.is_finished() {
            loop {
                let mut ids = || self.next_ids();
                let Some(mut m) = sender.poll_transmit(&mut ids) else {
                    break;
                };
                alter(&mut m);
                self.send(&m).await;
            }
            if sender.is_finished() {
                break;
            }
            match self.recv_within(Duration::from_secs(3)).await {
                None => sender.on_timeout(),
                Some(m) => {
                    if !sender.handle(&m) {
                        self.other(&m).await;
                    }
                }
            }
        }
        sender.outcome().cloned().expect("finished")
    }

    /// Waits for the device's `trellis/ota/rejected` event.
    async fn rejection(&mut self) -> (String, String) {
        while self.rejections.is_empty() {
            let m = self.recv().await.expect("the rejected event arrives");
            self.other(&m).await;
        }
        let data = self.rejections.remove(0);
        parse_rejection_event(data.as_bytes()).expect("<code>: <message>")
    }
}

fn signed(product: u32, version: u32, image: &[u8], signers: &[&PrivateKey]) -> Vec<u8> {
    let bytes = encode_manifest(&build_manifest(product, version, image, 1, "acme"));
    encode_signed_manifest(&SignedManifest {
        signatures: signers
            .iter()
            .map(|k| sign_manifest(k, &bytes).expect("sign"))
            .collect(),
        manifest: bytes,
    })
}

fn sender(image: &[u8], signed: Vec<u8>, chunk_size: u16) -> OtaSender {
    OtaSender::new(
        image.to_vec(),
        signed,
        SenderConfig {
            chunk_size,
            window: 4,
            ..SenderConfig::default()
        },
    )
    .expect("sender")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_update_is_applied_and_every_bad_one_refused() {
    let mut rng = rand::rng();
    let server_key = PrivateKey::new(&mut rng, 2048).expect("server key");
    let customer = PrivateKey::new(&mut rng, 2048).expect("customer");
    let cloud_release = PrivateKey::new(&mut rng, 2048).expect("cloud release");
    let identity = DeviceIdentity {
        device_id: DeviceId([7; 12]),
        private_key: trellis_device::generate_device_key(&mut rng).expect("device key"),
        cloud_public_key: server_key.to_public_key(),
    };
    let policy = TrustPolicy::new(
        vec![
            TrustedKey::new("customer", customer.to_public_key()).expect("key"),
            TrustedKey::new("cloud-release", cloud_release.to_public_key()).expect("key"),
        ],
        2,
    )
    .expect("policy");

    let old_image = b"trellis simulated firmware, version 1".to_vec();
    let old_sha: [u8; 32] = Sha256::digest(&old_image).into();
    let new_image: Vec<u8> = (0..256 * 7 + 100).map(|i| (i % 251) as u8).collect();
    let new_sha: [u8; 32] = Sha256::digest(&new_image).into();

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let shutdown = CancellationToken::new();
    let (tx, mut reports) = mpsc::unbounded_channel();
    let fleet = run_fleet(
        vec![identity],
        SimConfig {
            product_id: PRODUCT,
            firmware_version: 1,
            firmware_image: old_image.clone(),
            event_interval: None,
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(100),
            trust_policy: Some(policy),
            version_floor: 1,
            ..SimConfig::default()
        },
        vec![addr],
        shutdown.clone(),
        tx,
    );

    let (mut conn, hello) = Conn::accept(&listener, &server_key).await;
    assert_eq!(hello.firmware_sha256, Some(old_sha));
    assert_eq!((hello.firmware_version, hello.flags), (1, 0));

    let both = [&customer, &cloud_release];
    let product = u32::from(PRODUCT);
    // (what, signed manifest, image sent, altered chunk index, expected reason)
    let mut altered_image = new_image.clone();
    altered_image[300] ^= 0x10;
    let cases: Vec<Case> = vec![
        (
            "signed by the cloud key only",
            signed(product, 2, &new_image, &[&cloud_release]),
            new_image.clone(),
            None,
            "insufficient_signatures",
        ),
        (
            "another product",
            signed(product + 1, 2, &new_image, &both),
            new_image.clone(),
            None,
            "wrong_product",
        ),
        (
            "a rollback to the floor",
            signed(product, 1, &new_image, &both),
            new_image.clone(),
            None,
            "rollback",
        ),
        (
            "an image altered after signing",
            signed(product, 2, &new_image, &both),
            altered_image,
            None,
            "hash_mismatch",
        ),
        (
            "a chunk altered in flight",
            signed(product, 2, &new_image, &both),
            new_image.clone(),
            Some(3),
            "chunk_crc",
        ),
    ];
    for (what, manifest, image, altered_chunk, reason) in cases {
        let outcome = conn
            .deliver(sender(&image, manifest, 256), |m| {
                let Ok(Incoming::Request(Request::Chunk(c))) = classify(m) else {
                    return;
                };
                if c.index.is_some() && c.index == altered_chunk {
                    m.payload[10] ^= 0x01;
                }
            })
            .await;
        assert!(
            matches!(&outcome, Outcome::Refused { code, .. } if *code >= 0x80),
            "{what}: {outcome:?}"
        );
        assert_eq!(outcome.reason_code(), Some(reason), "{what}");
        let (code, text) = conn.rejection().await;
        assert_eq!(code, reason, "{what}: {text}");
        if reason == "insufficient_signatures" {
            assert!(text.contains("missing: customer"), "{text}");
        }
    }

    // The device kept its old image: drop the connection, it comes back
    // with the same SHA-256, version, and no update flag.
    drop(conn);
    let (mut conn, hello) = Conn::accept(&listener, &server_key).await;
    assert_eq!(hello.firmware_sha256, Some(old_sha));
    assert_eq!((hello.firmware_version, hello.flags), (1, 0));

    // A good release with 512-byte chunks: applied, and the device
    // reconnects reporting it.
    let outcome = conn
        .deliver(
            sender(&new_image, signed(product, 2, &new_image, &both), 512),
            |_| {},
        )
        .await;
    assert_eq!(outcome, Outcome::Delivered);
    let (mut conn, hello) = Conn::accept(&listener, &server_key).await;
    assert_eq!(hello.firmware_sha256, Some(new_sha));
    assert_eq!(hello.firmware_version, 2);
    assert_eq!(hello.flags & 1, 1, "updated flag");
    assert_eq!(hello.product_id, PRODUCT);

    // Version 2 is now the floor: offering it again is a rollback.
    let outcome = conn
        .deliver(
            sender(&new_image, signed(product, 2, &new_image, &both), 512),
            |_| {},
        )
        .await;
    assert_eq!(outcome.reason_code(), Some("rollback"));
    assert_eq!(conn.rejection().await.0, "rollback");

    // The next session no longer reports the update.
    drop(conn);
    let (_conn, hello) = Conn::accept(&listener, &server_key).await;
    assert_eq!(hello.firmware_sha256, Some(new_sha));
    assert_eq!(hello.flags & 1, 0);

    let mut applied = false;
    while let Ok(r) = reports.try_recv() {
        if let DeviceReport::Disconnected { reason, .. } = r
            && reason.starts_with("update applied: version 2")
        {
            applied = true;
        }
    }
    assert!(applied, "the simulator reported the update");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), fleet)
        .await
        .expect("fleet stops")
        .expect("join");
}

#[tokio::test]
async fn a_device_without_a_policy_refuses_every_update() {
    let mut rng = rand::rng();
    let server_key = PrivateKey::new(&mut rng, 2048).expect("server key");
    let release_key = PrivateKey::new(&mut rng, 2048).expect("release");
    let identity = DeviceIdentity {
        device_id: DeviceId([8; 12]),
        private_key: trellis_device::generate_device_key(&mut rng).expect("device key"),
        cloud_public_key: server_key.to_public_key(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let shutdown = CancellationToken::new();
    let (tx, _reports) = mpsc::unbounded_channel();
    let fleet = run_fleet(
        vec![identity],
        SimConfig {
            product_id: PRODUCT,
            event_interval: None,
            ..SimConfig::default()
        },
        vec![addr],
        shutdown.clone(),
        tx,
    );
    let (mut conn, _) = Conn::accept(&listener, &server_key).await;
    let image = vec![1u8; 1000];
    let outcome = conn
        .deliver(
            sender(
                &image,
                signed(u32::from(PRODUCT), 9, &image, &[&release_key]),
                256,
            ),
            |_| {},
        )
        .await;
    assert_eq!(outcome.reason_code(), Some("no_trust_policy"));
    assert_eq!(conn.rejection().await.0, "no_trust_policy");
    // A spark-style transfer (no manifest, no index) is refused too.
    let m = message::update_begin(
        conn.ids.next(),
        9,
        &trellis_wire::UpdateBegin {
            flags: 0,
            chunk_size: 256,
            file_size: 300,
            destination: 0,
            address: 0,
            manifest: None,
        },
    );
    conn.send(&m).await;
    loop {
        let r = conn.recv().await.expect("answer");
        if r.token == [9] && r.mtype == MessageType::NonConfirmable {
            assert!(r.code >= 0x80, "{r:?}");
            break;
        }
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), fleet)
        .await
        .expect("fleet stops")
        .expect("join");
}

#[test]
fn policy_json_in_the_key_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(
        trellis_device::load_trust_policy(dir.path())
            .expect("no file is fine")
            .is_none()
    );
    let key = PrivateKey::new(&mut rand::rng(), 2048).expect("key");
    let policy = TrustPolicy::new(
        vec![TrustedKey::new("customer", key.to_public_key()).expect("key")],
        1,
    )
    .expect("policy");
    trellis_device::write_trust_policy(dir.path(), &policy).expect("write");
    assert_eq!(
        trellis_device::load_trust_policy(dir.path()).expect("load"),
        Some(policy)
    );
    std::fs::write(
        dir.path().join(trellis_device::POLICY_FILE),
        "{\"threshold\": 3}",
    )
    .expect("write");
    let err = trellis_device::load_trust_policy(dir.path()).unwrap_err();
    assert!(err.to_string().contains("policy.json"), "{err}");
}

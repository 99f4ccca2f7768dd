//! The fleet simulator against a loopback server: many devices as tasks,
//! failover past a dead endpoint, reports, and a clean shutdown.

use std::collections::HashSet;
use std::time::Duration;

use rsa::PrivateKey;
use rsa::pkcs8::DecodePublicKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use trellis_device::{DeviceIdentity, DeviceReport, SimConfig, run_fleet};
use trellis_wire::coap::CoapMessage;
use trellis_wire::handshake::{
    assemble_server_reply, encrypt_session_material, session_hmac, sign_session_hmac,
};
use trellis_wire::message::{self, Incoming, Request, classify};
use trellis_wire::{DeviceId, HandshakePlaintext, ServerHandshake, SessionMaterial};

/// Handshakes one device, checks its Hello, calls `add`, then idles.
async fn serve(mut stream: TcpStream, cloud: PrivateKey) {
    let mut hs = ServerHandshake::new(rand::random());
    stream.write_all(hs.nonce()).await.expect("nonce");
    let mut buf = [0u8; 1024];
    let ct = loop {
        let n = stream.read(&mut buf).await.expect("read");
        if let Some(ct) = hs.receive(&buf[..n]).expect("256") {
            break ct;
        }
    };
    let plain = HandshakePlaintext::parse(&cloud.decrypt(rsa::Pkcs1v15Encrypt, &ct).expect("dec"))
        .expect("parse");
    let der = plain.public_key_der.expect("device sends its key");
    let device_pub = rsa::PublicKey::from_public_key_der(&der).expect("der");
    let (reply, mut cipher) = {
        let mut rng = rand::rng();
        let material = SessionMaterial::generate(&mut rng);
        let c = encrypt_session_material(&material, &device_pub, &mut rng).expect("C");
        let sig = sign_session_hmac(&cloud, &session_hmac(&material, &c)).expect("sig");
        hs.accept(material, &assemble_server_reply(&c, &sig).expect("reply"))
            .expect("accept")
    };
    stream.write_all(&reply).await.expect("reply");
    let mut sent_call = false;
    loop {
        let Ok(n) = stream.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        cipher.decoder.push(&buf[..n]);
        while let Some(p) = cipher.decoder.next_message().expect("frame") {
            let m = CoapMessage::decode(&p).expect("coap");
            if let Ok(Incoming::Request(Request::Hello(h))) = classify(&m) {
                assert_eq!(h.device_id, Some(plain.device_id));
                if !sent_call {
                    sent_call = true;
                    let hello = cipher
                        .encoder
                        .encode(&message::hello_server(100, 1).encode());
                    let call = cipher
                        .encoder
                        .encode(&message::function_call(101, 2, "add", b"40,2").encode());
                    stream
                        .write_all(&[hello, call].concat())
                        .await
                        .expect("send");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_connects_fails_over_and_shuts_down() {
    const DEVICES: usize = 12;
    let mut rng = rand::rng();
    let cloud = PrivateKey::new(&mut rng, 2048).expect("cloud");
    let identities: Vec<DeviceIdentity> = (0..DEVICES)
        .map(|i| DeviceIdentity {
            device_id: DeviceId([i as u8; 12]),
            private_key: trellis_device::generate_device_key(&mut rng).expect("key"),
            cloud_public_key: cloud.to_public_key(),
        })
        .collect();

    let dead = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dead_addr = dead.local_addr().expect("addr").to_string();
    drop(dead);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let live_addr = listener.local_addr().expect("addr").to_string();
    let server_cloud = cloud.clone();
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve(stream, server_cloud.clone()));
        }
    });

    let shutdown = CancellationToken::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let config = SimConfig {
        firmware_image: b"image".to_vec(),
        event_interval: Some(Duration::from_millis(100)),
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        connect_timeout: Duration::from_secs(2),
        start_spread: Duration::from_millis(100),
        ..SimConfig::default()
    };
    let fleet = run_fleet(
        identities,
        config,
        vec![dead_addr.clone(), live_addr.clone()],
        shutdown.clone(),
        tx,
    );

    let mut connected = HashSet::new();
    let mut called = HashSet::new();
    let mut events = HashSet::new();
    let mut failed_dead = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while connected.len() < DEVICES || called.len() < DEVICES || events.len() < DEVICES {
        let r = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("fleet progresses")
            .expect("report");
        match r {
            DeviceReport::Connected {
                device_id,
                endpoint,
                ..
            } => {
                assert_eq!(endpoint, live_addr);
                connected.insert(device_id);
            }
            DeviceReport::HandshakeFailed { endpoint, .. } => {
                assert_eq!(endpoint, dead_addr);
                failed_dead += 1;
            }
            DeviceReport::FunctionCalled {
                device_id,
                name,
                result,
                ..
            } => {
                assert_eq!((name.as_str(), result), ("add", 42));
                called.insert(device_id);
            }
            DeviceReport::EventPublished { device_id, .. } => {
                events.insert(device_id);
            }
            DeviceReport::Disconnected { reason, .. } => panic!("unexpected disconnect: {reason}"),
            DeviceReport::VariableRead { .. } => {}
            DeviceReport::Signaled { .. } => {}
            DeviceReport::CommandRefused { reason, .. } => {
                panic!("a device without a command policy refused a call: {reason}")
            }
            DeviceReport::PolicyAccepted { .. } | DeviceReport::PolicyRejected { .. } => {
                panic!("nobody sent a trust policy")
            }
            DeviceReport::CloudKeyStored { .. }
            | DeviceReport::CloudKeyRefused { .. }
            | DeviceReport::DeviceKeyCommitted { .. } => {
                panic!("a device without key rotation changed its keys")
            }
        }
    }
    assert_eq!(
        failed_dead, DEVICES,
        "each device tried the dead endpoint first, once"
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), fleet)
        .await
        .expect("fleet stops")
        .expect("join");
    server.abort();
}

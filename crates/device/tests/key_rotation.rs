//! The device's side of key rotation (docs/protocol.md §6.7, §6.8) against
//! an in-test server built from trellis-wire's server half: Hello extension
//! 0x03, a forged cloud key announcement refused with 4.03, a genuine one
//! stored in the identity files, a device key rotation (offer signed by the
//! old key, commit, new key saved), and the next handshake under the new
//! cloud key and the new device key.

use std::time::Duration;

use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey};
use rsa::{PrivateKey, PublicKey};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use trellis_device::{DemoApp, DeviceIdentity, DeviceKeys, Session, SessionConfig, write_identity};
use trellis_wire::coap::{CoapMessage, MessageType, code};
use trellis_wire::handshake::{
    assemble_server_reply, encrypt_session_material, session_hmac, sign_session_hmac,
};
use trellis_wire::message::{self, Incoming, Request, classify};
use trellis_wire::rotation::{CloudKeyAnnouncement, DeviceKeyOffer};
use trellis_wire::{
    HandshakePlaintext, Hello, OutgoingCounter, ServerHandshake, SessionCipher, SessionMaterial,
};

struct Server {
    stream: TcpStream,
    cipher: SessionCipher,
    ids: OutgoingCounter,
    /// What the device offered in its handshake.
    offered_der: Vec<u8>,
}

impl Server {
    /// Accepts one device whose handshake is encrypted to `cloud`; returns
    /// its Hello too.
    async fn accept(listener: &TcpListener, cloud: &PrivateKey) -> (Server, Hello) {
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
        assert!(
            trellis_wire::nonce_matches(hs.nonce(), &plain.nonce),
            "the device encrypted to another cloud key"
        );
        let offered_der = plain.public_key_der.expect("the device sends its key");
        let device_pub = PublicKey::from_public_key_der(&offered_der).expect("der");
        let mut rng = rand::rng();
        let material = SessionMaterial::generate(&mut rng);
        let c = encrypt_session_material(&material, &device_pub, &mut rng).expect("C");
        let sig = sign_session_hmac(cloud, &session_hmac(&material, &c)).expect("sign");
        let reply = assemble_server_reply(&c, &sig).expect("reply");
        let (bytes, cipher) = hs.accept(material, &reply).expect("accept");
        stream.write_all(&bytes).await.expect("reply");
        let mut server = Server {
            stream,
            cipher,
            ids: OutgoingCounter::new(30000),
            offered_der,
        };
        let hello = server.recv().await;
        let Ok(Incoming::Request(Request::Hello(h))) = classify(&hello) else {
            panic!("not a Hello: {hello:?}")
        };
        let id = server.ids.next();
        server.send(&message::hello_server(id, 1)).await;
        (server, h)
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

    /// Sends a CON request and returns the device's piggybacked answer.
    async fn ask(&mut self, make: impl FnOnce(u16) -> CoapMessage) -> CoapMessage {
        let id = self.ids.next();
        let m = make(id);
        self.send(&m).await;
        loop {
            let answer = self.recv().await;
            if answer.mtype == MessageType::Acknowledgement && answer.message_id == id {
                return answer;
            }
        }
    }
}

fn spawn_device(
    addr: std::net::SocketAddr,
    identity: DeviceIdentity,
    keys: trellis_device::SharedKeys,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let config = SessionConfig {
            keys: Some(keys),
            ..SessionConfig::default()
        };
        let stream = TcpStream::connect(addr).await.expect("connect");
        let session = Session::connect(stream, &identity, config)
            .await
            .expect("handshake");
        let _ = session.run(&DemoApp::default(), stop, |_| {}).await;
    })
}

#[tokio::test]
async fn a_device_stores_a_genuine_announcement_refuses_a_forged_one_and_rotates_its_key() {
    let mut rng = rand::rng();
    let cloud_v1 = PrivateKey::new(&mut rng, 2048).expect("cloud v1");
    let cloud_v2 = PrivateKey::new(&mut rng, 2048).expect("cloud v2");
    let forger = PrivateKey::new(&mut rng, 2048).expect("forger");
    let device_key = trellis_device::generate_device_key(&mut rng).expect("device key");
    let identity = DeviceIdentity {
        device_id: "00112233445566778899aabb".parse().expect("id"),
        private_key: device_key.clone(),
        cloud_public_key: cloud_v1.to_public_key(),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    write_identity(dir.path(), &identity).expect("write identity");
    trellis_device::write_cloud_key(dir.path(), &cloud_v1.to_public_key()).expect("cloud key");
    let keys = DeviceKeys::load(&identity, Some(dir.path()))
        .expect("keys")
        .shared();

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let device = spawn_device(addr, identity.clone(), keys.clone(), stop.clone());
    let (mut s, hello) = Server::accept(&listener, &cloud_v1).await;
    assert_eq!(hello.cloud_key_version, Some(1), "Hello extension 0x03");

    // Forged: the new key announced with a signature by a key that is not
    // the session's cloud key. Refused with 4.03 and a reason; nothing stored.
    let v2_der = cloud_v2
        .to_public_key()
        .to_public_key_der()
        .expect("der")
        .as_bytes()
        .to_vec();
    let forged = CloudKeyAnnouncement::sign(&forger, 2, &v2_der).expect("sign");
    let answer = s
        .ask(|id| message::cloud_key_announcement(id, 7, &forged.encode()))
        .await;
    assert_eq!(answer.code, code::FORBIDDEN, "{answer:?}");
    let reason = String::from_utf8_lossy(&answer.payload).to_string();
    assert!(reason.contains("signature"), "{reason}");
    assert!(
        !dir.path()
            .join(format!("{}.cloud.version", identity.device_id))
            .exists()
    );
    assert_eq!(keys.lock().expect("lock").cloud_key_version, 1);

    // Genuine, but not newer than what the device holds: refused too.
    let v1_der = cloud_v1.to_public_key().to_public_key_der().expect("der");
    let stale = CloudKeyAnnouncement::sign(&cloud_v1, 1, v1_der.as_bytes()).expect("sign");
    let answer = s
        .ask(|id| message::cloud_key_announcement(id, 8, &stale.encode()))
        .await;
    assert_eq!(answer.code, code::FORBIDDEN);

    // Genuine: signed by the session's key (v1). Stored and acknowledged.
    let genuine = CloudKeyAnnouncement::sign(&cloud_v1, 2, &v2_der).expect("sign");
    let answer = s
        .ask(|id| message::cloud_key_announcement(id, 9, &genuine.encode()))
        .await;
    assert_eq!(answer.code, code::CHANGED, "{answer:?}");
    let stored = std::fs::read_to_string(
        dir.path()
            .join(format!("{}.cloud.version", identity.device_id)),
    )
    .expect("version file");
    assert_eq!(stored.trim(), "2");

    // Device key rotation: the offer is signed by the old key.
    let answer = s.ask(|id| message::device_key_rotate(id, 10)).await;
    assert_eq!(answer.code, code::CHANGED, "{answer:?}");
    let offer = DeviceKeyOffer::parse(&answer.payload).expect("offer");
    let new_device_pub = offer
        .verify(&device_key.to_public_key(), identity.device_id)
        .expect("signed by the old key");
    // A commit naming another key is refused.
    let answer = s
        .ask(|id| message::device_key_commit(id, 11, &[0; 32]))
        .await;
    assert_eq!(answer.code, code::FORBIDDEN);
    let sha: [u8; 32] = Sha256::digest(&offer.public_key_der).into();
    let answer = s.ask(|id| message::device_key_commit(id, 12, &sha)).await;
    assert_eq!(answer.code, code::CHANGED, "{answer:?}");
    let saved = std::fs::read_to_string(dir.path().join(format!("{}.pem", identity.device_id)))
        .expect("pem");
    let saved = PrivateKey::from_pkcs8_pem(&saved).expect("saved key");
    assert_eq!(
        saved.to_public_key(),
        new_device_pub,
        "the new key is saved"
    );
    stop.cancel();
    let _ = device.await;
    drop(s);

    // A restart: keys loaded from the files. The handshake is encrypted to
    // cloud key v2 (Server::accept checks the nonce decrypts under it) and
    // offers the new device key; Hello says version 2.
    let mut fleet = trellis_device::load_fleet(dir.path(), None, None).expect("fleet");
    let reloaded_identity = fleet.pop().expect("one device");
    assert_eq!(
        reloaded_identity.private_key.to_public_key(),
        new_device_pub
    );
    let reloaded = DeviceKeys::load(&reloaded_identity, Some(dir.path())).expect("reload");
    assert_eq!(reloaded.cloud_key_version, 2);
    let stop = CancellationToken::new();
    let device = spawn_device(addr, reloaded_identity, reloaded.shared(), stop.clone());
    let (s, hello) = Server::accept(&listener, &cloud_v2).await;
    assert_eq!(hello.cloud_key_version, Some(2));
    assert_eq!(
        PublicKey::from_public_key_der(&s.offered_der).expect("der"),
        new_device_pub
    );
    stop.cancel();
    let _ = device.await;
}

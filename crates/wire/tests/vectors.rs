//! Reproduces every byte of the protocol vectors: the protocol-v1 handshake
//! and conversation, and the spark-protocol 0.1.6 transcript (the authority
//! for version 1). The vectors are data in this repository
//! (`tests/vectors/`, see its README); when the shared folder they were
//! copied from lies beside the checkout (`../shared/vectors`), the copies
//! must still be byte-identical to it.

use std::path::{Path, PathBuf};

use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::{Pkcs1v15Encrypt, PrivateKey, PublicKey};
use serde_json::Value;
use trellis_wire::coap::{CoapMessage, code};
use trellis_wire::frame::{FrameDecoder, FrameEncoder};
use trellis_wire::handshake::{
    HandshakePlaintext, SessionMaterial, assemble_server_reply, session_hmac, sign_session_hmac,
    verify_server_reply,
};
use trellis_wire::message::{
    self, Describe, Incoming, Request, VariableType, VariableValue, classify, decode_value,
};
use trellis_wire::ota::{UpdateBegin, chunk_crc, padded_chunks};
use trellis_wire::{DeviceId, Hello};

/// Every vector file a test here reads, as kept in `tests/vectors/`.
const VECTOR_FILES: [&str; 2] = ["protocol-v1.json", "spark-protocol-0.1.6.json"];

/// The repository's copy of the vectors.
fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/vectors")
}

/// The folder the vectors were copied from, when it lies beside the checkout.
fn shared_vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/vectors")
}

fn load(name: &str) -> Value {
    let path = vectors_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {name}: {e}"))
}

#[test]
fn in_repo_vectors_match_shared() {
    let shared = shared_vectors_dir();
    if !shared.is_dir() {
        eprintln!(
            "note: {} is not beside the checkout; the in-repo vectors ({}) are used \
             as they are, without comparing them to it",
            shared.display(),
            vectors_dir().display()
        );
        return;
    }
    for name in VECTOR_FILES {
        let ours = std::fs::read(vectors_dir().join(name))
            .unwrap_or_else(|e| panic!("reading tests/vectors/{name}: {e}"));
        let theirs = std::fs::read(shared.join(name))
            .unwrap_or_else(|e| panic!("reading {}: {e}", shared.join(name).display()));
        assert!(
            ours == theirs,
            "tests/vectors/{name} differs from {}: copy it again",
            shared.join(name).display()
        );
    }
}

fn h(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))).expect("hex")
}

fn arr<const N: usize>(v: &Value) -> [u8; N] {
    h(v).try_into().expect("length")
}

fn private_key(pem: &Value) -> PrivateKey {
    let pem = pem.as_str().expect("pem");
    PrivateKey::from_pkcs8_pem(pem)
        .or_else(|_| PrivateKey::from_pkcs1_pem(pem))
        .expect("private key")
}

fn public_key(pem: &Value) -> PublicKey {
    PublicKey::from_public_key_pem(pem.as_str().expect("pem")).expect("public key")
}

/// Encodes the CoAP bytes with the given IV, checks the frame and the next
/// IV, then decodes the frame and checks the CoAP message re-encodes exactly.
fn check_frame(
    key: [u8; 16],
    iv: [u8; 16],
    coap: &[u8],
    frame: &[u8],
    next_iv: [u8; 16],
    what: &str,
) -> CoapMessage {
    let mut enc = FrameEncoder::new(key, iv);
    assert_eq!(enc.encode(coap), frame, "{what}: frame");
    assert_eq!(enc.iv(), next_iv, "{what}: encoder IV after");

    let mut dec = FrameDecoder::new(key, iv, trellis_wire::DEFAULT_MAX_FRAME_LEN);
    dec.push(frame);
    let plain = dec.next_message().expect("decodes").expect("complete");
    assert_eq!(plain, coap, "{what}: decrypted");
    assert_eq!(dec.iv(), next_iv, "{what}: decoder IV after");
    assert_eq!(dec.buffered_len(), 0);

    let m = CoapMessage::decode(&plain).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(m.encode(), coap, "{what}: CoAP re-encode");
    m
}

#[test]
fn protocol_v1_handshake() {
    let v = load("protocol-v1.json");
    let cloud_priv = private_key(&v["cloud_private_pem"]);
    let cloud_pub = public_key(&v["cloud_public_pem"]);
    let device_priv = private_key(&v["device_private_pem"]);
    let device_pub = public_key(&v["device_public_pem"]);
    assert_eq!(cloud_priv.to_public_key(), cloud_pub);
    assert_eq!(device_priv.to_public_key(), device_pub);

    // Step 2: the device's plaintext, and decrypting its one valid ciphertext.
    let plaintext = h(&v["device_plaintext"]);
    let parsed = HandshakePlaintext::parse(&plaintext).expect("plaintext");
    assert_eq!(parsed.nonce, arr::<40>(&v["nonce"]));
    assert_eq!(
        parsed.device_id.to_string(),
        v["device_id"].as_str().expect("id")
    );
    assert_eq!(parsed.to_bytes(), plaintext);
    let der = rsa::pkcs8::EncodePublicKey::to_public_key_der(&device_pub).expect("der");
    assert_eq!(parsed.public_key_der.as_deref(), Some(der.as_bytes()));
    let ct = h(&v["device_ciphertext"]);
    assert_eq!(ct.len(), 256);
    assert_eq!(
        cloud_priv.decrypt(Pkcs1v15Encrypt, &ct).expect("decrypt"),
        plaintext
    );

    // Step 4: material, HMAC, the deterministic signature, the reply.
    let material = SessionMaterial::from_bytes(&h(&v["session_material"])).expect("material");
    assert_eq!(material.key, arr::<16>(&v["session_key"]));
    assert_eq!(material.iv, arr::<16>(&v["session_iv"]));
    assert_eq!(material.salt, arr::<8>(&v["session_salt"]));
    let c = h(&v["session_ciphertext"]);
    assert_eq!(
        device_priv.decrypt(Pkcs1v15Encrypt, &c).expect("decrypt C"),
        h(&v["session_material"])
    );
    let hmac = session_hmac(&material, &c);
    assert_eq!(hmac.to_vec(), h(&v["session_hmac_sha1"]));
    let sig = sign_session_hmac(&cloud_priv, &hmac).expect("sign");
    assert_eq!(sig, h(&v["session_signature"]));
    let reply = assemble_server_reply(&c, &sig).expect("assemble");
    assert_eq!(reply.to_vec(), h(&v["server_reply"]));
    let verified = verify_server_reply(&cloud_pub, &device_priv, &reply).expect("verify");
    assert_eq!(verified.to_bytes()[..], h(&v["session_material"])[..]);
}

#[test]
fn protocol_v1_conversation() {
    let v = load("protocol-v1.json");
    let key = arr::<16>(&v["session_key"]);
    let device_id: DeviceId = v["device_id"].as_str().expect("id").parse().expect("id");
    let sha = arr::<32>(&v["image_sha256"]);
    let conv = v["conversation"].as_array().expect("conversation");
    assert_eq!(conv.len(), 11);
    let mut messages = Vec::new();
    for (i, m) in conv.iter().enumerate() {
        let what = format!("#{i} {}", m["what"]);
        let coap = h(&m["coap"]);
        let msg = check_frame(
            key,
            arr(&m["iv_before"]),
            &coap,
            &h(&m["frame"]),
            arr(&m["iv_after"]),
            &what,
        );
        messages.push((coap, msg));
    }
    // Each direction chains from its own previous frame.
    for dir in ["device", "cloud"] {
        let mut iv = arr::<16>(&v["session_iv"]);
        for m in conv.iter().filter(|m| m["from"] == dir) {
            assert_eq!(arr::<16>(&m["iv_before"]), iv, "{dir} IV chain");
            iv = arr(&m["iv_after"]);
        }
    }

    let hello = Hello {
        product_id: 6,
        firmware_version: 1,
        reserved: 0,
        flags: 0,
        platform_id: 6,
        device_id: Some(device_id),
        firmware_sha256: Some(sha),
        command_policy: None,
        trust_policy: None,
        cloud_key_version: None,
    };
    let built = [
        message::hello_device(1000, &hello),
        message::hello_server(40000, 1),
        message::describe(40001, 2),
        message::describe_reply(
            1001,
            &[2],
            &Describe {
                functions: vec!["led".into(), "add".into()],
                variables: vec![
                    ("uptime".into(), VariableType::Int),
                    ("temp".into(), VariableType::Double),
                ],
            }
            .to_json(),
        ),
        message::event(1002, true, "temperature", b"21.5"),
        message::function_call(40002, 3, "add", b"2,3"),
        message::function_return(1003, &[3], 5),
        message::variable_request(40003, 4, "temp"),
        message::variable_value(
            40003,
            &[4],
            &trellis_wire::message::encode_value(&VariableValue::Double(21.5)),
        ),
        message::ping(1004),
        message::ping_ack(1004, &[]),
    ];
    for (i, ((coap, decoded), b)) in messages.iter().zip(built.iter()).enumerate() {
        assert_eq!(&b.encode(), coap, "builder #{i}");
        assert_eq!(decoded, b, "decoded #{i}");
    }

    let kinds: Vec<Incoming> = messages
        .iter()
        .map(|(_, m)| classify(m).expect("classify"))
        .collect();
    assert_eq!(kinds[0], Incoming::Request(Request::Hello(hello)));
    assert!(matches!(kinds[1], Incoming::Request(Request::Hello(_))));
    assert_eq!(kinds[2], Incoming::Request(Request::Describe));
    assert_eq!(kinds[3], Incoming::Response);
    assert_eq!(
        kinds[4],
        Incoming::Request(Request::Event {
            public: true,
            name: "temperature".into(),
            data: b"21.5".to_vec()
        })
    );
    assert_eq!(
        kinds[5],
        Incoming::Request(Request::FunctionCall {
            name: "add".into(),
            argument: b"2,3".to_vec(),
            signed: None,
        })
    );
    assert_eq!(kinds[6], Incoming::Response);
    assert_eq!(
        kinds[7],
        Incoming::Request(Request::VariableRequest {
            name: "temp".into()
        })
    );
    assert_eq!(kinds[8], Incoming::Response);
    assert_eq!(kinds[9], Incoming::Request(Request::Ping));
    assert_eq!(kinds[10], Incoming::Response);

    let d = Describe::from_json(&messages[3].1.payload).expect("describe");
    assert_eq!(d.to_json(), messages[3].1.payload);
    assert_eq!(messages[6].1.payload, 5i32.to_be_bytes());
    assert_eq!(
        decode_value(VariableType::Double, &messages[8].1.payload).expect("double"),
        VariableValue::Double(21.5)
    );
}

#[test]
fn spark_0_1_6_handshake() {
    let v = load("spark-protocol-0.1.6.json");
    let hs = &v["handshake"];
    let server_priv = private_key(&v["keys"]["server_private"]);
    let server_pub = public_key(&v["keys"]["server_public"]);
    let device_priv = private_key(&v["keys"]["device_private"]);
    assert_eq!(server_priv.to_public_key(), server_pub);

    let plaintext = h(&hs["device_plaintext"]["hex"]);
    let parsed = HandshakePlaintext::parse(&plaintext).expect("plaintext");
    assert_eq!(parsed.nonce, arr::<40>(&hs["nonce"]));
    assert_eq!(
        parsed.device_id.to_string(),
        hs["device_id"].as_str().expect("id")
    );
    assert_eq!(parsed.public_key_der, Some(h(&hs["device_public_key_der"])));
    assert_eq!(
        server_priv
            .decrypt(Pkcs1v15Encrypt, &h(&hs["device_ciphertext"]["hex"]))
            .expect("dec"),
        plaintext
    );

    // The 52-byte form of the first Spark Cores.
    let short = HandshakePlaintext::parse(&plaintext[..52]).expect("52 bytes");
    assert_eq!(short.public_key_der, None);

    let material = SessionMaterial::from_bytes(&h(&hs["session"]["hex"])).expect("material");
    let reply = &hs["server_reply"];
    let c = h(&reply["ciphertext"]);
    assert_eq!(
        device_priv.decrypt(Pkcs1v15Encrypt, &c).expect("C"),
        h(&hs["session"]["hex"])
    );
    let hmac = session_hmac(&material, &c);
    assert_eq!(hmac.to_vec(), h(&reply["hmac"]["hex"]));
    let sig = sign_session_hmac(&server_priv, &hmac).expect("sign");
    assert_eq!(sig, h(&reply["signature"]["hex"]));
    let full = assemble_server_reply(&c, &sig).expect("assemble");
    assert_eq!(full.to_vec(), h(&reply["hex"]));
    let verified = verify_server_reply(&server_pub, &device_priv, &full).expect("verify");
    assert_eq!(verified.device_first_message_id(), 58412);
}

#[test]
fn spark_0_1_6_transcript() {
    let v = load("spark-protocol-0.1.6.json");
    let session = h(&v["handshake"]["session"]["hex"]);
    let material = SessionMaterial::from_bytes(&session).expect("material");
    let mut ivs = [material.iv, material.iv]; // device->server, server->device
    let mut msgs = Vec::new();
    for t in v["transcript"].as_array().expect("transcript") {
        let what = format!("#{} {}", t["n"], t["name"]);
        let dir = usize::from(t["dir"] != "device->server");
        assert_eq!(arr::<16>(&t["iv"]), ivs[dir], "{what}: IV chain");
        let coap = h(&t["coap"]);
        let m = check_frame(
            material.key,
            arr(&t["iv"]),
            &coap,
            &h(&t["frame"]),
            arr(&t["next_iv"]),
            &what,
        );
        ivs[dir] = arr(&t["next_iv"]);
        // Header fields as the original decoded them.
        let d = &t["coap_decoded"];
        assert_eq!(
            u64::from(m.message_id),
            d["id"].as_u64().expect("id"),
            "{what}"
        );
        assert_eq!(m.token, h(&d["token"]), "{what}");
        assert_eq!(m.payload, h(&d["payload"]), "{what}");
        let opts: Vec<(u16, Vec<u8>)> = d["options"]
            .as_array()
            .expect("options")
            .iter()
            .map(|o| (o["number"].as_u64().expect("n") as u16, h(&o["hex"])))
            .collect();
        assert_eq!(m.options, opts, "{what}");
        msgs.push((t["name"].as_str().expect("name").to_owned(), m));
    }

    let by = |n: &str| {
        &msgs
            .iter()
            .find(|(name, _)| name == n)
            .unwrap_or_else(|| panic!("{n}"))
            .1
    };
    let cls = |n: &str| classify(by(n)).unwrap_or_else(|e| panic!("{n}: {e}"));

    assert_eq!(
        cls("Hello"),
        Incoming::Request(Request::Hello(
            Hello::parse(&[0, 6, 0, 1, 0, 0, 0, 6]).expect("hello")
        ))
    );
    assert_eq!(by("Hello").message_id, 58412);
    assert!(matches!(
        cls("Hello (server)"),
        Incoming::Request(Request::Hello(_))
    ));
    assert_eq!(
        cls("PublicEvent"),
        Incoming::Request(Request::Event {
            public: true,
            name: "interop/temp".into(),
            data: b"21.5".to_vec()
        })
    );
    assert_eq!(
        cls("EventSlowdown (reply to the event)"),
        Incoming::Response
    );
    assert_eq!(cls("Describe"), Incoming::Request(Request::Describe));
    assert_eq!(cls("DescribeReturn"), Incoming::Response);
    assert_eq!(
        cls("FunctionCall"),
        Incoming::Request(Request::FunctionCall {
            name: "led".into(),
            argument: b"on".to_vec(),
            signed: None,
        })
    );
    assert_eq!(cls("FunctionCall ACK (empty)"), Incoming::Response);
    assert_eq!(cls("FunctionReturn"), Incoming::Response);
    assert_eq!(
        cls("VariableRequest"),
        Incoming::Request(Request::VariableRequest {
            name: "temp".into()
        })
    );
    assert_eq!(cls("VariableValue"), Incoming::Response);
    assert_eq!(cls("Ping"), Incoming::Request(Request::Ping));
    assert_eq!(cls("PingAck"), Incoming::Response);
    assert_eq!(cls("UpdateDone"), Incoming::Request(Request::UpdateDone));
    assert_eq!(cls("UpdateDone ACK (2.04, token)"), Incoming::Response);

    // Builders reproduce what the original and the firmware sent.
    assert_eq!(
        message::hello_device(58412, &Hello::parse(&[0, 6, 0, 1, 0, 0, 0, 6]).expect("h")).encode(),
        by("Hello").encode()
    );
    assert_eq!(message::hello_server(31249, 1), *by("Hello (server)"));
    assert_eq!(
        message::event(58413, true, "interop/temp", b"21.5"),
        *by("PublicEvent")
    );
    assert_eq!(
        message::event_slowdown(58413),
        *by("EventSlowdown (reply to the event)")
    );
    assert_eq!(message::describe(31250, 2), *by("Describe"));
    assert_eq!(
        message::function_call(31251, 3, "led", b"on"),
        *by("FunctionCall")
    );
    assert_eq!(message::empty_ack(31251), *by("FunctionCall ACK (empty)"));
    assert_eq!(
        message::function_return(58414, &[3], 1),
        *by("FunctionReturn")
    );
    assert_eq!(
        message::variable_request(31252, 4, "temp"),
        *by("VariableRequest")
    );
    assert_eq!(
        message::variable_value(31252, &[4], &21.5f64.to_le_bytes()),
        *by("VariableValue")
    );
    assert_eq!(message::ping(58415), *by("Ping"));
    assert_eq!(message::ping_ack(58415, &[0]), *by("PingAck"));
    assert_eq!(message::update_ready(58416, &[5]), *by("UpdateReady"));
    assert_eq!(message::empty_ack(31253), *by("UpdateBegin ACK (empty)"));
    assert_eq!(message::update_done(31256, 8), *by("UpdateDone"));
    assert_eq!(
        message::update_done_ack(31256, &[8]),
        *by("UpdateDone ACK (2.04, token)")
    );
    assert_eq!(by("FunctionCall ACK (empty)").code, code::EMPTY);

    let d = Describe::from_json(&by("DescribeReturn").payload).expect("describe");
    assert_eq!(d.functions, ["led"]);
    assert_eq!(d.variables, [("temp".to_owned(), VariableType::Double)]);
    assert_eq!(d.to_json(), by("DescribeReturn").payload);
    assert_eq!(
        decode_value(VariableType::Double, &by("VariableValue").payload).expect("double"),
        VariableValue::Double(
            v["api_results"]["get_temp"]["result"]
                .as_f64()
                .expect("temp")
        )
    );

    // OTA: UpdateBegin, chunk CRCs, padding, the chunk messages.
    let ota = &v["ota"];
    let image = h(&ota["firmware_hex"]);
    let begin_msg = by("UpdateBegin");
    let Incoming::Request(Request::UpdateBegin(begin)) = cls("UpdateBegin") else {
        panic!("UpdateBegin")
    };
    assert_eq!(
        begin,
        UpdateBegin {
            flags: 0,
            chunk_size: 256,
            file_size: image.len() as u32,
            destination: 0,
            address: 0,
            manifest: None
        }
    );
    assert_eq!(begin.encode(), begin_msg.payload);
    assert_eq!(message::update_begin(31253, 5, &begin), *begin_msg);
    let chunks: Vec<Vec<u8>> = padded_chunks(&image, usize::from(begin.chunk_size)).collect();
    let crcs: Vec<u64> = ota["chunk_crc32"]
        .as_array()
        .expect("crcs")
        .iter()
        .map(|c| c.as_u64().expect("crc"))
        .collect();
    assert_eq!(chunks.len(), crcs.len());
    for (i, (data, crc)) in chunks.iter().zip(&crcs).enumerate() {
        assert_eq!(u64::from(chunk_crc(data)), *crc, "chunk {i} CRC");
        let name = format!("Chunk {i}");
        let Incoming::Request(Request::Chunk(c)) = cls(&name) else {
            panic!("{name}")
        };
        assert_eq!(&c.data, data, "{name} data");
        assert_eq!(u64::from(c.crc), *crc, "{name} CRC option");
        assert!(c.crc_ok());
        assert_eq!(c.index, None);
        let token = 6 + i as u8;
        assert_eq!(message::chunk(31254 + i as u16, token, &c), *by(&name));
        assert_eq!(
            message::empty_ack(31254 + i as u16),
            *by(&format!("Chunk {i} ACK (empty)"))
        );
        assert_eq!(
            message::chunk_received(58417 + i as u16, &[token], true),
            *by(&format!("ChunkReceived {i} (2.04 = CRC ok)"))
        );
    }
}

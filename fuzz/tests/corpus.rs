//! The seed corpora and the saved crashes, on stable and without libFuzzer:
//!
//! - `replay_corpus_and_regressions` runs every file in `corpus/<target>/`
//!   and `regressions/<target>/` through its target (`cargo test --release`
//!   here; CI replays them with the fuzz binaries instead, see README.md);
//! - `write_seeds` (ignored) rewrites `corpus/` from the test vectors and
//!   from values built with the crates' own encoders:
//!   `cargo test --release --test corpus -- --ignored write_seeds`.

use std::fs;
use std::path::{Path, PathBuf};

use trellis_firmware::manifest::{ManifestSignature, SignedManifest, encode_signed_manifest};
use trellis_fuzz::vectors;
use trellis_wire::message::{self, Describe, VariableType};
use trellis_wire::ota::{Chunk, UpdateBegin};
use trellis_wire::{CoapMessage, Hello};

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 5] = [
    ("handshake_server", trellis_fuzz::handshake_server::run),
    ("frame_decoder", trellis_fuzz::frame_decoder::run),
    ("coap_parser", trellis_fuzz::coap_parser::run),
    ("manifest_decoders", trellis_fuzz::manifest_decoders::run),
    ("firmware_receiver", trellis_fuzz::firmware_receiver::run),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n == "README.md"))
        .collect();
    out.sort();
    out
}

#[test]
fn replay_corpus_and_regressions() {
    let mut ran = 0;
    for (name, run) in TARGETS {
        let seeds = files(&root().join("corpus").join(name));
        assert!(!seeds.is_empty(), "no seeds for {name}");
        for kind in ["corpus", "regressions"] {
            for file in files(&root().join(kind).join(name)) {
                let bytes = fs::read(&file).expect("read");
                eprintln!("{name}: {}", file.display());
                run(&bytes);
                ran += 1;
            }
        }
    }
    eprintln!("replayed {ran} inputs");
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = root().join("corpus").join(target);
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join(name), bytes).expect("write");
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[test]
#[ignore = "rewrites corpus/; run by hand"]
fn write_seeds() {
    let v = vectors::get();
    for (name, _) in TARGETS {
        let _ = fs::remove_dir_all(root().join("corpus").join(name));
    }
    let ct = &v.device_ciphertext[..];
    let device = v.device_stream();
    let cloud = v.stream(false);

    // handshake_server: [read size, glued bytes] ciphertext frames...
    write(
        "handshake_server",
        "session-one-read",
        &cat(&[&[0, 0], ct, &device]),
    );
    write(
        "handshake_server",
        "session-reads-of-7",
        &cat(&[&[7, 0], ct, &device]),
    );
    write(
        "handshake_server",
        "session-pipelined",
        &cat(&[&[64, 16], ct, &device]),
    );
    write("handshake_server", "ciphertext-only", &cat(&[&[0, 0], ct]));
    write(
        "handshake_server",
        "half-a-ciphertext",
        &cat(&[&[100, 0], &ct[..128]]),
    );
    let mut plain = v.device_plaintext.clone();
    plain.resize(256, 0);
    write(
        "handshake_server",
        "plaintext-in-clear",
        &cat(&[&[0, 0], &plain]),
    );

    // frame_decoder: [mode, read size, max len u16] bytes...
    write(
        "frame_decoder",
        "device-frames",
        &cat(&[&[0, 0, 0x10, 0], &device]),
    );
    write(
        "frame_decoder",
        "device-frames-reads-of-3",
        &cat(&[&[0, 3, 0x10, 0], &device]),
    );
    write(
        "frame_decoder",
        "cloud-frames-one-per-read",
        &cat(&[&[2, 40, 0x10, 0], &cloud]),
    );
    write(
        "frame_decoder",
        "device-frames-max-32",
        &cat(&[&[0, 0, 0, 32], &device]),
    );
    let mut plaintexts = vec![1u8, 5, 0, 0];
    for f in &v.conversation {
        plaintexts.extend_from_slice(&(f.coap.len() as u16).to_be_bytes());
        plaintexts.extend_from_slice(&f.coap);
    }
    write("frame_decoder", "round-trip-conversation", &plaintexts);

    // coap_parser: one message each.
    for (i, f) in v.conversation.iter().enumerate() {
        write("coap_parser", &format!("conversation-{i:02}"), &f.coap);
    }
    let r = &v.releases[0];
    let begin = UpdateBegin {
        flags: 0,
        chunk_size: 64,
        file_size: r.image.len() as u32,
        destination: 0,
        address: 0x0808_0000,
        manifest: Some(r.signed_bytes.clone()),
    };
    let hello = Hello {
        product_id: 6,
        firmware_version: 2,
        reserved: 0,
        flags: 1,
        platform_id: 6,
        device_id: Some(trellis_wire::DeviceId([7; 12])),
        firmware_sha256: Some([9; 32]),
        command_policy: Some(trellis_wire::hello::CommandPolicyReport {
            policy_sha256: [5; 32],
            last_sequence: 42,
        }),
        trust_policy: None,
        cloud_key_version: None,
    };
    let describe = Describe {
        functions: vec!["add".into(), "reboot".into()],
        variables: vec![
            ("temp".into(), VariableType::Double),
            ("on".into(), VariableType::Bool),
        ],
    };
    let built: Vec<(&str, CoapMessage)> = vec![
        ("hello", message::hello_device(1, &hello)),
        ("update-begin", message::update_begin(2, 3, &begin)),
        (
            "chunk",
            message::chunk(3, 4, &Chunk::new(Some(1), r.image[64..128].to_vec())),
        ),
        (
            "chunk-no-index",
            message::chunk(4, 5, &Chunk::new(None, vec![1, 2, 3])),
        ),
        ("chunk-missed", message::chunk_missed(5, 6, &[0, 2, 4])),
        ("update-done", message::update_done(6, 7)),
        ("function-call", message::function_call(7, 8, "add", b"2&3")),
        (
            "signed-function-call",
            message::signed_function_call(
                7,
                8,
                "open",
                b"valve",
                b"\x00\x10TRELLIS-CMD-1\x00\x00\x00",
            ),
        ),
        ("subscribe", message::subscribe(8, 9, "alerts/")),
        (
            "private-event",
            message::event(9, false, "trellis/ota/rejected", b"rollback: no"),
        ),
        ("get-time", message::get_time(10, 11)),
        (
            "describe-reply",
            message::describe_reply(11, &[12], &describe.to_json()),
        ),
        (
            "long-option",
            CoapMessage::new(trellis_wire::MessageType::Confirmable, 2, 12)
                .with_option(11, b"e")
                .with_option(11, &[b'x'; 300])
                .with_option(2000, b"far"),
        ),
    ];
    for (name, m) in built {
        write("coap_parser", name, &m.encode());
    }

    // manifest_decoders: [selector] bytes...
    write("manifest_decoders", "manifest", &cat(&[&[0], &r.manifest]));
    for (i, rel) in v.releases.iter().enumerate() {
        write(
            "manifest_decoders",
            &format!("signed-release-{i}"),
            &cat(&[&[1], &rel.signed_bytes]),
        );
    }
    let mut two = r.signed.clone();
    two.signatures.push(ManifestSignature {
        key_id: "00".repeat(32),
        signature: vec![1; 256],
    });
    write(
        "manifest_decoders",
        "signed-plus-unknown-key",
        &cat(&[&[1], &encode_signed_manifest(&two)]),
    );
    let forged = SignedManifest {
        manifest: v.releases[1].manifest.clone(),
        signatures: r.signed.signatures.clone(),
    };
    write(
        "manifest_decoders",
        "signature-over-other-bytes",
        &cat(&[&[1], &encode_signed_manifest(&forged)]),
    );
    let policy = v.policy.to_json().expect("policy JSON");
    write(
        "manifest_decoders",
        "policy",
        &cat(&[&[2], policy.as_bytes()]),
    );
    let policy_no_id = format!(
        "{{\"threshold\":1,\"keys\":[{{\"name\":\"c\",\"public_key\":{}}}]}}",
        serde_json::Value::String(v.cloud_public_pem.clone())
    );
    write(
        "manifest_decoders",
        "policy-without-key-id",
        &cat(&[&[2], policy_no_id.as_bytes()]),
    );
    write(
        "manifest_decoders",
        "device-key-pem",
        &cat(&[&[2], v.device_public_pem.as_bytes()]),
    );
    write(
        "manifest_decoders",
        "rejection-event",
        b"\x03bad_signature: the signature by cloud (key 0123) does not verify",
    );
    // Selector 5: signed trust policies (rotation), valid and a rollback.
    for (name, version, verdict) in [
        ("signed-policy-v2", 2, None),
        ("signed-policy-rollback", 1, Some("rollback")),
    ] {
        let next = v.policy.clone().with_version(version);
        let bytes = next.canonical_bytes().expect("canonical policy");
        let signed = trellis_firmware::SignedPolicy {
            signatures: vec![trellis_firmware::sign_policy(&v.cloud_key, &bytes).expect("sign")],
            policy: bytes,
        };
        let wire = trellis_firmware::encode_signed_policy(&signed);
        let got = trellis_firmware::verify_policy_update_bytes(&v.policy, &wire);
        assert_eq!(got.as_ref().err().map(|r| r.code()), verdict, "{name}");
        write("manifest_decoders", name, &cat(&[&[5], &wire]));
    }

    // firmware_receiver: [config] then ops [token, op, ...].
    let mut full = vec![0u8, 1, 0, 0, 63];
    for i in 0..5u16 {
        full.extend_from_slice(&[2, 2]);
        full.extend_from_slice(&i.to_be_bytes());
        full.push(u8::from(i == 4));
    }
    full.extend_from_slice(&[3, 5]);
    write("firmware_receiver", "transfer-indexed", &full);
    write(
        "firmware_receiver",
        "transfer-unindexed",
        &[0, 1, 0, 0, 239, 2, 3, 0, 0, 1, 3, 3, 0, 0, 1, 4, 5],
    );
    write(
        "firmware_receiver",
        "missing-then-done",
        &[0x04, 1, 0, 0, 99, 2, 2, 0, 2, 0, 3, 5, 4, 5, 5, 5, 6, 5],
    );
    write(
        "firmware_receiver",
        "bad-crc-then-right",
        &[
            0x01, 1, 0, 0, 149, 2, 4, 0, 0, 0, 0, 4, 1, 2, 3, 4, 0xaa, 0xbb, 0xcc, 0xdd, 3, 2, 0,
            0, 1, 4, 5,
        ],
    );
    write(
        "firmware_receiver",
        "wrong-product-and-rollback",
        &[0, 1, 0, 1, 63, 2, 0, 2, 63, 3, 5],
    );
    write("firmware_receiver", "too-large", &[0x40, 1, 0, 0, 63, 2, 5]);
    write("firmware_receiver", "no-policy", &[0xFF, 1, 0, 0, 63, 2, 5]);
    let done = message::update_done(9, 9).encode();
    let mut raw = vec![0u8, 1, 0, 0, 63, 2, 6, done.len() as u8];
    raw.extend_from_slice(&done);
    write("firmware_receiver", "raw-update-done", &raw);
}

/// The seeds get where their names say: a fuzzer starting from them
/// starts deep in the handshake and the transfer.
#[test]
fn seeds_reach_the_deep_states() {
    use trellis_fuzz::{firmware_receiver, handshake_server};
    let seed = |target: &str, name: &str| {
        fs::read(root().join("corpus").join(target).join(name)).expect("seed")
    };
    let session = handshake_server::drive(&seed("handshake_server", "session-one-read"));
    assert_eq!(
        session,
        handshake_server::Reached {
            ciphertext: true,
            nonce_ok: true,
            messages: 5
        }
    );
    assert_eq!(
        handshake_server::drive(&seed("handshake_server", "session-reads-of-7")),
        session
    );
    assert!(!handshake_server::drive(&seed("handshake_server", "session-pipelined")).ciphertext);
    assert!(!handshake_server::drive(&seed("handshake_server", "half-a-ciphertext")).ciphertext);

    let fr = |name: &str| firmware_receiver::drive(&seed("firmware_receiver", name));
    for name in [
        "transfer-indexed",
        "transfer-unindexed",
        "bad-crc-then-right",
    ] {
        let r = fr(name);
        assert_eq!(
            (r.accepted, r.completed),
            (1, usize::from(name != "bad-crc-then-right")),
            "{name}: {r:?}"
        );
    }
    assert_eq!(fr("missing-then-done").refused, ["missing_chunks"]);
    assert_eq!(
        fr("wrong-product-and-rollback").refused,
        ["wrong_product", "rollback"]
    );
    assert_eq!(fr("too-large").refused, ["too_large"]);
    assert_eq!(fr("no-policy").refused, ["no_trust_policy"]);
}

//! Unit tests per builder and parser, and the typed rejections the gateway
//! relies on to drop a misbehaving device.

use trellis_wire::coap::{CoapMessage, MessageType, code};
use trellis_wire::counter::{IncomingCounter, OutgoingCounter};
use trellis_wire::frame::{FrameDecoder, FrameEncoder};
use trellis_wire::handshake::{
    DeviceHandshake, HandshakePlaintext, ServerHandshake, SessionMaterial, nonce_matches,
};
use trellis_wire::message::{
    self, Describe, Incoming, Request, VariableType, VariableValue, classify, decode_value,
    encode_value,
};
use trellis_wire::ota::{Chunk, UpdateBegin, chunk_crc, padded_chunks};
use trellis_wire::{
    CoapError, CounterError, DeviceId, FrameError, HandshakeError, Hello, MessageError,
    SessionCipher,
    hello::{CommandPolicyReport, FLAG_UPDATED, TrustPolicyReport},
};

const KEY: [u8; 16] = [7; 16];
const IV: [u8; 16] = [9; 16];

fn hx(s: &str) -> Vec<u8> {
    hex::decode(s).expect("hex")
}

fn req(m: &CoapMessage) -> Request {
    match classify(m) {
        Ok(Incoming::Request(r)) => r,
        other => panic!("not a request: {other:?}"),
    }
}

#[test]
fn device_id_parse_and_display() {
    let id: DeviceId = "0123456789ABCDEF01234567".parse().expect("upper case");
    assert_eq!(id.to_string(), "0123456789abcdef01234567");
    assert_eq!(format!("{id:?}"), "DeviceId(0123456789abcdef01234567)");
    assert!(
        "0123"
            .parse::<DeviceId>()
            .unwrap_err()
            .to_string()
            .contains("24 hex characters, got 4")
    );
    let e = "0123456789abcdef0123456z".parse::<DeviceId>().unwrap_err();
    assert!(e.to_string().contains("position 23"), "{e}");
    assert!("é123456789abcdef0123456".parse::<DeviceId>().is_err());
}

#[test]
fn builders_produce_exact_bytes() {
    assert_eq!(message::ping(0x03ec).encode(), hx("400003ec"));
    assert_eq!(message::ping_ack(0xe42f, &[0]).encode(), hx("6100e42f00"));
    assert_eq!(message::empty_ack(0x7a13).encode(), hx("60007a13"));
    assert_eq!(message::event_slowdown(0xe42d).encode(), hx("6180e42d00"));
    assert_eq!(message::describe(0x7a12, 2).encode(), hx("41017a1202b164"));
    assert_eq!(
        message::hello_server(0x9c40, 1).encode(),
        hx("51029c4001b168")
    );
    assert_eq!(
        message::function_return(0x03eb, &[3], 5).encode(),
        hx("514403eb03ff00000005")
    );
    assert_eq!(
        message::function_return(1, &[3], -1).payload,
        hx("ffffffff")
    );
    assert_eq!(
        message::update_done(0x7a18, 8).encode(),
        hx("41037a1808b175")
    );
    assert_eq!(
        message::update_ready(0xe430, &[5]).encode(),
        hx("5144e43005")
    );
    assert_eq!(
        message::chunk_received(0xe431, &[6], false).code,
        code::BAD_REQUEST
    );
    assert_eq!(
        message::time_reply(5, &[1], 0x01020304).encode(),
        hx("6145000501ff01020304")
    );
    assert_eq!(message::get_time(5, 1).encode(), hx("4101000501b174"));
    assert_eq!(
        message::subscribe(5, 1, "temp/").encode(),
        hx("4101000501b1650574656d702f")
    );
}

#[test]
fn function_call_splits_argument_on_ampersand() {
    let m = message::function_call(1, 9, "set", b"a=1&b=2&");
    assert_eq!(m.uri_query(), vec![&b"a=1"[..], b"b=2", b""]);
    assert_eq!(
        req(&CoapMessage::decode(&m.encode()).expect("decode")),
        Request::FunctionCall {
            name: "set".into(),
            argument: b"a=1&b=2&".to_vec(),
            signed: None,
        }
    );
    let empty = message::function_call(1, 9, "go", b"");
    assert!(empty.uri_query().is_empty());
    assert_eq!(
        req(&empty),
        Request::FunctionCall {
            name: "go".into(),
            argument: Vec::new(),
            signed: None,
        }
    );
}

#[test]
fn events_keep_slashes_in_one_option() {
    let m = message::event(3, false, "a/b/c", b"");
    assert_eq!(m.uri_path(), vec![&b"E"[..], b"a/b/c"]);
    assert!(
        !m.encode().contains(&0xff),
        "no payload marker for empty data"
    );
    assert_eq!(
        req(&m),
        Request::Event {
            public: false,
            name: "a/b/c".into(),
            data: vec![]
        }
    );
    // A strict CoAP client splitting the name into segments still works.
    let split = CoapMessage::new(MessageType::NonConfirmable, code::POST, 1)
        .with_option(11, b"e")
        .with_option(11, b"a")
        .with_option(11, b"b");
    assert_eq!(
        req(&split),
        Request::Event {
            public: true,
            name: "a/b".into(),
            data: vec![]
        }
    );
}

#[test]
fn classify_requests() {
    assert_eq!(req(&message::get_time(1, 1)), Request::GetTime);
    assert_eq!(
        req(&message::subscribe(1, 1, "x")),
        Request::Subscribe { prefix: "x".into() }
    );
    assert_eq!(
        req(&message::variable_request(1, 1, "uptime")),
        Request::VariableRequest {
            name: "uptime".into()
        }
    );
    assert_eq!(
        req(&message::chunk_missed(1, 1, &[1, 513])),
        Request::ChunkMissed(vec![1, 513])
    );
    let c = Chunk::new(Some(7), vec![1, 2, 3]);
    assert_eq!(req(&message::chunk(1, 1, &c)), Request::Chunk(c));
    let ub = UpdateBegin {
        flags: 1,
        chunk_size: 512,
        file_size: 9,
        destination: 0,
        address: 0x80000,
        manifest: Some(vec![1, 2]),
    };
    assert_eq!(
        req(&message::update_begin(1, 1, &ub)),
        Request::UpdateBegin(ub)
    );
    // Responses: ACKs (even empty ones with a token) and response codes.
    for m in [
        message::ping_ack(1, &[0]),
        message::event_slowdown(1),
        message::describe_reply(1, &[1], b"{}"),
    ] {
        assert_eq!(classify(&m), Ok(Incoming::Response));
    }
}

#[test]
fn classify_rejections() {
    let unknown = CoapMessage::new(MessageType::Confirmable, code::GET, 1).with_option(11, b"zz");
    let e = classify(&unknown).unwrap_err();
    assert!(matches!(e, MessageError::UnknownRequest { .. }), "{e}");
    assert!(e.to_string().contains("\"zz\""), "{e}");
    assert_eq!(
        classify(&CoapMessage::new(
            MessageType::NonConfirmable,
            code::EMPTY,
            1
        )),
        Err(MessageError::UnexpectedEmpty { mtype: "NON" })
    );
    assert_eq!(
        classify(&CoapMessage::new(MessageType::Confirmable, 0x20, 1)),
        Err(MessageError::ReservedCode {
            class: 1,
            detail: 0
        })
    );
    let no_name = CoapMessage::new(MessageType::Confirmable, code::POST, 1).with_option(11, b"f");
    assert_eq!(
        classify(&no_name),
        Err(MessageError::MissingName { what: "function" })
    );
    let bad_utf8 = message::variable_request(1, 1, "x").with_option(11, &[0xff]);
    assert!(matches!(
        classify(&bad_utf8),
        Err(MessageError::NameNotUtf8 { .. })
    ));
    let no_crc = CoapMessage::new(MessageType::Confirmable, code::POST, 1).with_option(11, b"c");
    assert_eq!(classify(&no_crc), Err(MessageError::ChunkMissingCrc));
    let short_crc = no_crc.clone().with_option(15, &[1, 2]);
    assert_eq!(
        classify(&short_crc),
        Err(MessageError::ChunkCrcLength { len: 2 })
    );
    let odd = message::chunk_missed(1, 1, &[]).with_payload(&[1, 2, 3]);
    assert_eq!(
        classify(&odd),
        Err(MessageError::ChunkMissedLength { len: 3 })
    );
}

#[test]
fn coap_accepts_spark_quirks_and_rejects_garbage() {
    let m = CoapMessage::decode(&hx("6100e42f00")).expect("token on empty ACK");
    assert_eq!(
        (m.mtype, m.code, m.message_id, m.token.clone()),
        (MessageType::Acknowledgement, 0, 0xe42f, vec![0])
    );
    let marker_only = CoapMessage::decode(&hx("5002e42db16561ff")).map(|m| m.payload);
    assert_eq!(marker_only, Ok(vec![]));

    assert_eq!(
        CoapMessage::decode(&[0x40, 0]),
        Err(CoapError::TooShort { len: 2 })
    );
    assert_eq!(
        CoapMessage::decode(&hx("800003ec")),
        Err(CoapError::BadVersion { version: 2 })
    );
    assert_eq!(
        CoapMessage::decode(&hx("490003ec")),
        Err(CoapError::TokenTooLong { len: 9 })
    );
    assert!(matches!(
        CoapMessage::decode(&hx("420003ec01")),
        Err(CoapError::Truncated { what: "token", .. })
    ));
    assert_eq!(
        CoapMessage::decode(&hx("400003ecf1")),
        Err(CoapError::ReservedOptionDelta { offset: 4 })
    );
    assert_eq!(
        CoapMessage::decode(&hx("400003ec1f")),
        Err(CoapError::ReservedOptionLength { offset: 4 })
    );
    assert!(matches!(
        CoapMessage::decode(&hx("400003ecb3aa")),
        Err(CoapError::Truncated {
            what: "option value",
            ..
        })
    ));
    assert!(matches!(
        CoapMessage::decode(&hx("400003ecd1")),
        Err(CoapError::Truncated {
            what: "option delta",
            ..
        })
    ));
    assert_eq!(
        CoapMessage::decode(&hx("400003ece0ffff")),
        Err(CoapError::OptionNumberOverflow { offset: 4 })
    );
}

#[test]
fn coap_extended_option_encodings() {
    let long = vec![b'x'; 300];
    let m = CoapMessage::new(MessageType::Confirmable, code::GET, 1)
        .with_option(2000, b"big delta")
        .with_option(11, &long)
        .with_option(11, &[b'y'; 20]);
    let bytes = m.encode();
    let back = CoapMessage::decode(&bytes).expect("decode");
    // Options come back in number order, repeats in their order.
    assert_eq!(back.options[0], (11, long));
    assert_eq!(back.options[1], (11, vec![b'y'; 20]));
    assert_eq!(back.options[2], (2000, b"big delta".to_vec()));
    assert_eq!(back.encode(), bytes);
}

#[test]
fn hello_accepts_every_prefix() {
    let id: DeviceId = "0123456789abcdef01234567".parse().expect("id");
    let full = Hello {
        product_id: 6,
        firmware_version: 2,
        reserved: 0,
        flags: FLAG_UPDATED,
        platform_id: 6,
        device_id: Some(id),
        firmware_sha256: Some([0xab; 32]),
        command_policy: None,
        trust_policy: None,
        cloud_key_version: None,
    };
    let bytes = full.encode();
    assert_eq!(bytes.len(), 56);
    assert_eq!(Hello::parse(&bytes), Ok(full.clone()));
    assert!(full.updated());
    for n in [0, 2, 4, 6, 8, 22] {
        let h = Hello::parse(&bytes[..n]).unwrap_or_else(|e| panic!("{n}: {e}"));
        assert_eq!(h.product_id, if n >= 2 { 6 } else { 0 });
        assert_eq!(h.firmware_version, if n >= 4 { 2 } else { 0 });
        assert_eq!(h.flags, if n >= 6 { 1 } else { 0 });
        assert_eq!(h.platform_id, if n >= 8 { 6 } else { 0 });
        assert_eq!(h.device_id, (n >= 22).then_some(id));
        assert_eq!(h.firmware_sha256, None);
    }
    // An id cut short is absent; an unknown extension is skipped.
    assert_eq!(Hello::parse(&bytes[..15]).expect("cut id").device_id, None);
    let mut unknown = bytes[..22].to_vec();
    unknown.extend_from_slice(&[0x7f, 2, 1, 2]);
    unknown.extend_from_slice(&bytes[22..]);
    assert_eq!(
        Hello::parse(&unknown).expect("unknown ext").firmware_sha256,
        Some([0xab; 32])
    );
    // Malformed extension lengths.
    assert!(matches!(
        Hello::parse(&bytes[..23]),
        Err(MessageError::HelloExtensionTruncated { offset: 22, .. })
    ));
    assert!(matches!(
        Hello::parse(&bytes[..40]),
        Err(MessageError::HelloExtensionTruncated { offset: 22, .. })
    ));
    let mut wrong = bytes[..22].to_vec();
    wrong.extend_from_slice(&[1, 3, 1, 2, 3]);
    assert_eq!(
        Hello::parse(&wrong),
        Err(MessageError::HelloExtensionLength {
            ext_type: 1,
            len: 3,
            expected: 32
        })
    );
    let mut bad_id_len = bytes[..22].to_vec();
    bad_id_len[9] = 11;
    assert_eq!(
        Hello::parse(&bad_id_len),
        Err(MessageError::HelloDeviceIdLength { len: 11 })
    );
    // Without the id and hash, the 8-byte spark layout.
    let short = Hello {
        device_id: None,
        firmware_sha256: None,
        command_policy: None,
        trust_policy: None,
        cloud_key_version: None,
        ..full
    };
    assert_eq!(short.encode(), hx("0006000200010006"));
}

/// spark-protocol's RaiseYourHand (`particle nyan`): CON PUT `s`, one
/// Uri-Query byte 1 or 0.
#[test]
fn signal_matches_spark_protocol() {
    let on = message::signal(0x0102, 7, true);
    assert_eq!(on.encode(), hx("4103010207b1734101"));
    assert_eq!(req(&on), Request::Signal(true));
    assert_eq!(req(&message::signal(1, 7, false)), Request::Signal(false));
}

/// §7.4: the command-policy Hello extension, byte for byte, and its length
/// check.
#[test]
fn hello_command_policy_extension() {
    let id: DeviceId = "0123456789abcdef01234567".parse().expect("id");
    let hello = Hello {
        product_id: 6,
        firmware_version: 2,
        reserved: 0,
        flags: 0,
        platform_id: 6,
        device_id: Some(id),
        firmware_sha256: None,
        command_policy: Some(CommandPolicyReport {
            policy_sha256: [0x11; 32],
            last_sequence: 0x0102_0304_0506_0708,
        }),
        trust_policy: None,
        cloud_key_version: None,
    };
    let bytes = hello.encode();
    let mut want = hx("0006000200000006000c0123456789abcdef01234567");
    want.extend_from_slice(&[0x02, 40]);
    want.extend_from_slice(&[0x11; 32]);
    want.extend_from_slice(&hx("0102030405060708"));
    assert_eq!(bytes, want);
    assert_eq!(Hello::parse(&bytes), Ok(hello));
    let mut short = bytes[..22].to_vec();
    short.extend_from_slice(&[0x02, 8, 0, 0, 0, 0, 0, 0, 0, 1]);
    assert_eq!(
        Hello::parse(&short),
        Err(MessageError::HelloExtensionLength {
            ext_type: 2,
            len: 8,
            expected: 40
        })
    );
}

/// §7.4: the signed command rides in option 65000 after the Uri-Query
/// options (delta 64985: nibble 14 and two extended bytes); a call without
/// it encodes exactly as before; the refusal is NON 4.03 with the reason.
#[test]
fn signed_function_call_option_and_refusal() {
    let plain = message::function_call(1, 9, "open", b"valve-3");
    let signed = message::signed_function_call(1, 9, "open", b"valve-3", b"ENVELOPE");
    let bytes = signed.encode();
    let mut want = plain.encode();
    // Options end right before the payload marker; the plain call has none.
    want.extend_from_slice(&[0xe8, 0xfc, 0xcc]);
    want.extend_from_slice(b"ENVELOPE");
    assert_eq!(bytes, want);
    assert_eq!(
        req(&CoapMessage::decode(&bytes).expect("decode")),
        Request::FunctionCall {
            name: "open".into(),
            argument: b"valve-3".to_vec(),
            signed: Some(b"ENVELOPE".to_vec()),
        }
    );
    let refused = message::function_refused(&[9], "replayed");
    assert_eq!(refused.mtype, MessageType::NonConfirmable);
    assert_eq!(refused.code, code::FORBIDDEN);
    assert_eq!(refused.token, vec![9]);
    assert_eq!(refused.payload, b"replayed".to_vec());
}

#[test]
fn update_begin_layouts() {
    let spark = hx("0001000000012c0000000000");
    let ub = UpdateBegin::parse(&spark).expect("spark");
    assert_eq!(
        (ub.chunk_size, ub.file_size, ub.manifest.clone()),
        (256, 300, None)
    );
    assert_eq!(ub.encode(), spark);
    let with = UpdateBegin {
        manifest: Some(vec![9; 5]),
        ..ub
    };
    let bytes = with.encode();
    assert_eq!(bytes.len(), 12 + 2 + 5);
    assert_eq!(UpdateBegin::parse(&bytes), Ok(with));
    assert_eq!(
        UpdateBegin::parse(&spark[..11]),
        Err(MessageError::UpdateBeginTooShort { len: 11 })
    );
    assert_eq!(
        UpdateBegin::parse(&bytes[..13]),
        Err(MessageError::ManifestTruncated {
            declared: 2,
            available: 1
        })
    );
    assert_eq!(
        UpdateBegin::parse(&bytes[..18]),
        Err(MessageError::ManifestTruncated {
            declared: 5,
            available: 4
        })
    );
}

#[test]
fn ota_chunks() {
    let image: Vec<u8> = (0..600u32).map(|i| i as u8).collect();
    let chunks: Vec<_> = padded_chunks(&image, 256).collect();
    assert_eq!(chunks.len(), 3);
    assert!(chunks.iter().all(|c| c.len() == 256));
    assert_eq!(&chunks[2][..88], &image[512..]);
    assert!(chunks[2][88..].iter().all(|b| *b == 0));
    assert_eq!(chunk_crc(b"123456789"), 0xCBF4_3926);
    assert_eq!(padded_chunks(&[], 256).count(), 0);
    assert_eq!(padded_chunks(&[1, 2], 0).count(), 2);
}

#[test]
fn variable_values() {
    assert_eq!(
        decode_value(VariableType::Int, &[0, 0, 1, 0]),
        Ok(VariableValue::Int(256))
    );
    assert_eq!(
        decode_value(VariableType::Bool, &[1]),
        Ok(VariableValue::Bool(true))
    );
    assert_eq!(
        decode_value(VariableType::String, b"hi"),
        Ok(VariableValue::String(b"hi".to_vec()))
    );
    assert_eq!(
        encode_value(&VariableValue::Double(21.5)),
        hx("0000000000803540")
    );
    assert_eq!(
        decode_value(VariableType::Double, &[0; 4]),
        Err(MessageError::VariableValueLength {
            ty: "double",
            expected: 8,
            got: 4
        })
    );
    assert_eq!(
        VariableType::try_from(3),
        Err(MessageError::UnknownVariableType(3))
    );
}

#[test]
fn describe_json() {
    let d = Describe {
        functions: vec!["led".into(), "q\"uote".into()],
        variables: vec![
            ("z".into(), VariableType::String),
            ("a".into(), VariableType::Bool),
        ],
    };
    let json = d.to_json();
    assert_eq!(
        json,
        br#"{"f":["led","q\"uote"],"v":{"z":4,"a":1}}"#.to_vec()
    );
    assert_eq!(Describe::from_json(&json), Ok(d));
    assert_eq!(
        Describe::from_json(br#"{"f":[],"v":[]}"#),
        Ok(Describe::default())
    );
    assert!(matches!(
        Describe::from_json(br#"{"v":{"x":3}}"#),
        Err(MessageError::DescribeJson(_))
    ));
    assert!(matches!(
        Describe::from_json(b"{} trailing"),
        Err(MessageError::DescribeJson(_))
    ));
}

#[test]
fn counters_reject_replay_reorder_and_skip() {
    let mut c = IncomingCounter::new();
    assert_eq!(c.check(1), Err(CounterError::NotStarted { got: 1 }));
    c.start(65534);
    assert_eq!(c.check(65535), Ok(()));
    assert_eq!(c.check(0), Ok(()), "wraps");
    assert_eq!(
        c.check(0),
        Err(CounterError::Replayed {
            expected: 1,
            got: 0
        })
    );
    assert_eq!(
        c.check(65535),
        Err(CounterError::Replayed {
            expected: 1,
            got: 65535
        })
    );
    assert_eq!(
        c.check(3),
        Err(CounterError::Skipped {
            expected: 1,
            got: 3
        })
    );
    // Reordered: 2 arrives before 1, then 1 is behind.
    assert_eq!(c.check(1), Ok(()));
    assert_eq!(
        c.check(3),
        Err(CounterError::Skipped {
            expected: 2,
            got: 3
        })
    );
    assert_eq!(c.check(2), Ok(()));
    assert_eq!(
        c.check(1),
        Err(CounterError::Replayed {
            expected: 3,
            got: 1
        })
    );
    // The boundary: exactly half the space behind is a replay, beyond is a skip.
    assert_eq!(
        c.check(3u16.wrapping_sub(32768)),
        Err(CounterError::Replayed {
            expected: 3,
            got: 32771
        })
    );
    assert_eq!(
        c.check(3u16.wrapping_sub(32769)),
        Err(CounterError::Skipped {
            expected: 3,
            got: 32770
        })
    );

    let mut o = OutgoingCounter::new(65535);
    assert_eq!((o.next(), o.next(), o.peek()), (65535, 0, 1));
}

#[test]
fn frame_rejections() {
    let mut enc = FrameEncoder::new(KEY, IV);
    let frame = enc.encode(b"hello");

    // Truncated: stays pending, one byte at a time, even inside the length.
    let mut dec = FrameDecoder::new(KEY, IV, 4096);
    for b in &frame[..frame.len() - 1] {
        dec.push(std::slice::from_ref(b));
        assert_eq!(dec.next_message(), Ok(None));
    }
    dec.push(&frame[frame.len() - 1..]);
    assert_eq!(dec.next_message(), Ok(Some(b"hello".to_vec())));

    // Tampered: either bad padding, or garbage that CoAP/classify rejects.
    let coap = message::ping(5).encode();
    for i in 2..18 {
        let mut enc = FrameEncoder::new(KEY, IV);
        let mut f = enc.encode(&coap);
        f[i] ^= 0x80;
        let mut dec = FrameDecoder::new(KEY, IV, 4096);
        dec.push(&f);
        let outcome = dec.next_message();
        let rejected = match outcome {
            Err(FrameError::BadPadding) => true,
            Ok(Some(p)) => match CoapMessage::decode(&p) {
                Err(_) => true,
                Ok(m) => classify(&m).is_err() || m != message::ping(5),
            },
            other => panic!("byte {i}: {other:?}"),
        };
        assert!(rejected, "byte {i}");
    }
    let mut f = FrameEncoder::new(KEY, IV).encode(&coap);
    *f.last_mut().expect("last") ^= 1;
    let mut dec = FrameDecoder::new(KEY, IV, 4096);
    dec.push(&f);
    assert_eq!(dec.next_message(), Err(FrameError::BadPadding));
    assert_eq!(
        dec.next_message(),
        Err(FrameError::BadPadding),
        "errors are final"
    );

    // Oversized length: refused once the two bytes are in, nothing buffered.
    let mut dec = FrameDecoder::new(KEY, IV, 64);
    dec.push(&[0xff]);
    assert_eq!(dec.next_message(), Ok(None));
    dec.push(&[0xf0, 1, 2, 3]);
    assert_eq!(dec.buffered_len(), 0);
    assert_eq!(
        dec.next_message(),
        Err(FrameError::TooLong {
            len: 0xfff0,
            max: 64
        })
    );
    dec.push(&[0; 1000]);
    assert_eq!(dec.buffered_len(), 0, "input after a refusal is dropped");

    let mut dec = FrameDecoder::new(KEY, IV, 64);
    dec.push(&[0, 17]);
    assert_eq!(
        dec.next_message(),
        Err(FrameError::NotBlockAligned { len: 17 })
    );
    let mut dec = FrameDecoder::new(KEY, IV, 64);
    dec.push(&[0, 0]);
    assert_eq!(dec.next_message(), Err(FrameError::Empty));

    assert!(matches!(
        FrameEncoder::new(KEY, IV).try_encode(&vec![0; 70_000]),
        Err(FrameError::PlaintextTooLong { len: 70_000, .. })
    ));
}

#[test]
fn several_frames_in_one_read() {
    let mut enc = FrameEncoder::new(KEY, IV);
    let mut stream = Vec::new();
    for i in 0..5u8 {
        stream.extend(enc.encode(&vec![i; usize::from(i) * 10]));
    }
    let mut dec = FrameDecoder::new(KEY, IV, 4096);
    dec.push(&stream);
    for i in 0..5u8 {
        assert_eq!(dec.next_message(), Ok(Some(vec![i; usize::from(i) * 10])));
    }
    assert_eq!(dec.next_message(), Ok(None));
    assert_eq!(dec.iv(), enc.iv());
}

#[test]
fn session_material_bytes_and_debug() {
    let bytes: Vec<u8> = (0..40).collect();
    let m = SessionMaterial::from_bytes(&bytes).expect("40");
    assert_eq!(&m.to_bytes()[..], &bytes[..]);
    assert_eq!(format!("{m:?}"), "SessionMaterial { <redacted> }");
    assert_eq!(m.device_first_message_id(), 0x2021 + 1);
    assert!(matches!(
        SessionMaterial::from_bytes(&bytes[..39]),
        Err(HandshakeError::MaterialLength { len: 39 })
    ));
    let mut rng = rand::rng();
    let a = SessionMaterial::generate(&mut rng);
    let b = SessionMaterial::generate(&mut rng);
    assert_ne!(a.to_bytes()[..], b.to_bytes()[..]);
    let c = SessionCipher::new(&a, 100);
    assert_eq!((c.encoder.iv(), c.decoder.iv()), (a.iv, a.iv));
}

#[test]
fn handshake_plaintext_and_nonce() {
    assert!(matches!(
        HandshakePlaintext::parse(&[0; 51]),
        Err(HandshakeError::PlaintextTooShort { len: 51 })
    ));
    let p = HandshakePlaintext::parse(&[1; 52]).expect("52");
    assert_eq!(p.public_key_der, None);
    assert_eq!(p.to_bytes(), vec![1; 52]);
    assert!(nonce_matches(&[3; 40], &[3; 40]));
    let mut other = [3; 40];
    other[39] = 4;
    assert!(!nonce_matches(&[3; 40], &other));
}

#[test]
fn server_handshake_buffers_exactly_256() {
    let mut s = ServerHandshake::new([5; 40]);
    assert_eq!(s.nonce(), &[5; 40]);
    assert_eq!(s.receive(&[0; 100]).expect("partial"), None);
    assert!(s.receive(&[1; 156]).expect("complete").is_some());
    assert!(matches!(
        s.receive(&[0]),
        Err(HandshakeError::TooMuchInput { len: 257 })
    ));

    let mut s = ServerHandshake::new([5; 40]);
    assert!(matches!(
        s.receive(&[0; 300]),
        Err(HandshakeError::TooMuchInput { len: 300 })
    ));

    let s = ServerHandshake::new([5; 40]);
    let m = SessionMaterial::from_bytes(&[1; 40]).expect("m");
    assert!(matches!(
        s.accept(m.clone(), &[0; 384]),
        Err(HandshakeError::Incomplete { have: 0 })
    ));
    let mut s = ServerHandshake::new([5; 40]);
    s.receive(&[0; 256]).expect("in");
    assert!(matches!(
        s.accept(m, &[0; 383]),
        Err(HandshakeError::ReplyLength { len: 383 })
    ));
}

#[test]
fn full_handshake_in_memory() {
    use rsa::PrivateKey;
    use trellis_wire::handshake::{
        assemble_server_reply, encrypt_session_material, session_hmac, sign_session_hmac,
    };
    let mut rng = rand::rng();
    let cloud = PrivateKey::new(&mut rng, 2048).expect("cloud key");
    let device = PrivateKey::new(&mut rng, 1024).expect("device key");
    let wrong_cloud = PrivateKey::new(&mut rng, 2048).expect("other key");
    let id: DeviceId = "00112233445566778899aabb".parse().expect("id");

    let mut dev = DeviceHandshake::new(id, device.clone(), cloud.to_public_key(), true);
    assert!(matches!(
        dev.on_reply(&[0; 384]),
        Err(HandshakeError::OutOfOrder(_))
    ));
    assert!(matches!(
        dev.on_nonce(&[0; 39], &mut rng),
        Err(HandshakeError::NonceLength { len: 39 })
    ));
    let mut server = ServerHandshake::new([42; 40]);
    let sent = dev.on_nonce(server.nonce(), &mut rng).expect("on_nonce");
    assert_eq!(sent.len(), 256);
    assert!(matches!(
        dev.on_nonce(&[42; 40], &mut rng),
        Err(HandshakeError::OutOfOrder(_))
    ));
    let (a, b) = sent.split_at(100);
    assert_eq!(server.receive(a).expect("a"), None);
    let ct = server.receive(b).expect("b").expect("complete");

    // The keyvault's part.
    let plain =
        HandshakePlaintext::parse(&cloud.decrypt(rsa::Pkcs1v15Encrypt, &ct).expect("decrypt"))
            .expect("parse");
    assert!(nonce_matches(server.nonce(), &plain.nonce));
    assert_eq!(plain.device_id, id);
    assert_eq!(plain.public_key_der.as_ref().map(Vec::len), Some(162));
    let material = SessionMaterial::generate(&mut rng);
    let c = encrypt_session_material(&material, &device.to_public_key(), &mut rng).expect("C");
    assert_eq!(c.len(), 128);
    let hmac = session_hmac(&material, &c);

    // A reply signed with the wrong cloud key is refused.
    let forged = assemble_server_reply(&c, &sign_session_hmac(&wrong_cloud, &hmac).expect("sig"))
        .expect("r");
    let mut dev2 = DeviceHandshake::new(id, device.clone(), cloud.to_public_key(), false);
    dev2.on_nonce(&[1; 40], &mut rng).expect("nonce");
    assert!(matches!(
        dev2.on_reply(&forged),
        Err(HandshakeError::BadSignature)
    ));
    // A tampered C is refused too.
    let mut tampered =
        assemble_server_reply(&c, &sign_session_hmac(&cloud, &hmac).expect("sig")).expect("r");
    tampered[5] ^= 1;
    let mut dev3 = DeviceHandshake::new(id, device, cloud.to_public_key(), false);
    dev3.on_nonce(&[1; 40], &mut rng).expect("nonce");
    assert!(dev3.on_reply(&tampered).is_err());

    let reply =
        assemble_server_reply(&c, &sign_session_hmac(&cloud, &hmac).expect("sig")).expect("reply");
    let (to_send, mut server_cipher) = server.accept(material.clone(), &reply).expect("accept");
    let got = dev.on_reply(&to_send).expect("device accepts");
    assert_eq!(got.to_bytes()[..], material.to_bytes()[..]);
    assert!(matches!(
        dev.on_reply(&to_send),
        Err(HandshakeError::OutOfOrder(_))
    ));

    let mut device_cipher = SessionCipher::new(&got, 4096);
    let f = device_cipher.encoder.encode(&message::ping(1).encode());
    server_cipher.decoder.push(&f);
    let m = CoapMessage::decode(
        &server_cipher
            .decoder
            .next_message()
            .expect("ok")
            .expect("msg"),
    )
    .expect("coap");
    assert_eq!(classify(&m), Ok(Incoming::Request(Request::Ping)));
}

/// §7.5: the trust-policy Hello extension (type 0x04, length 40: version
/// u64 big-endian, then the policy's SHA-256), byte for byte, after the
/// command-policy extension, and its length check.
#[test]
fn hello_trust_policy_extension() {
    let id: DeviceId = "0123456789abcdef01234567".parse().expect("id");
    let hello = Hello {
        product_id: 6,
        firmware_version: 2,
        reserved: 0,
        flags: 0,
        platform_id: 6,
        device_id: Some(id),
        firmware_sha256: None,
        command_policy: Some(CommandPolicyReport {
            policy_sha256: [0x11; 32],
            last_sequence: 1,
        }),
        trust_policy: Some(TrustPolicyReport {
            version: 0x0102_0304_0506_0708,
            sha256: [0x22; 32],
        }),
        cloud_key_version: None,
    };
    let bytes = hello.encode();
    let mut want = hx("0006000200000006000c0123456789abcdef01234567");
    want.extend_from_slice(&[0x02, 40]);
    want.extend_from_slice(&[0x11; 32]);
    want.extend_from_slice(&hx("0000000000000001"));
    want.extend_from_slice(&[0x04, 40]);
    want.extend_from_slice(&hx("0102030405060708"));
    want.extend_from_slice(&[0x22; 32]);
    assert_eq!(bytes, want);
    assert_eq!(Hello::parse(&bytes), Ok(hello.clone()));

    // Alone (no other extension): id, then 0x04.
    let alone = Hello {
        command_policy: None,
        ..hello
    };
    let bytes = alone.encode();
    assert_eq!(bytes.len(), 22 + 2 + 40);
    assert_eq!(&bytes[22..24], &[0x04, 40]);
    assert_eq!(Hello::parse(&bytes), Ok(alone));

    let mut short = bytes[..22].to_vec();
    short.extend_from_slice(&[0x04, 8, 0, 0, 0, 0, 0, 0, 0, 2]);
    assert_eq!(
        Hello::parse(&short),
        Err(MessageError::HelloExtensionLength {
            ext_type: 4,
            len: 8,
            expected: 40
        })
    );
    let mut cut = bytes[..22].to_vec();
    cut.extend_from_slice(&[0x04, 40, 1, 2, 3]);
    assert!(matches!(
        Hello::parse(&cut),
        Err(MessageError::HelloExtensionTruncated { .. })
    ));
}

/// §7.5: CON POST `tp` with the SignedPolicy bytes, and the device's
/// piggybacked answers (2.04, or 4.03/4.06 with `<reason>: <message>`),
/// byte for byte.
#[test]
fn trust_policy_messages() {
    let m = message::trust_policy(0x1234, 0x7a, b"\x0a\x01\x01");
    let bytes = m.encode();
    // ver 1 CON tkl 1 | POST | id | token | Uri-Path(11) len 2 "tp" | ff | payload
    assert_eq!(
        bytes,
        hx("41021234 7a b2 7470 ff 0a0101".replace(' ', "").as_str())
    );
    assert_eq!(
        classify(&CoapMessage::decode(&bytes).expect("decode")),
        Ok(Incoming::Request(Request::TrustPolicy(
            b"\x0a\x01\x01".to_vec()
        )))
    );
    assert_eq!(Request::TrustPolicy(vec![]).kind(), "trust_policy");

    let ok = message::trust_policy_reply(0x1234, &[0x7a], None).encode();
    assert_eq!(ok, hx("61441234 7a".replace(' ', "").as_str()));
    let refused =
        message::trust_policy_reply(0x1234, &[0x7a], Some((code::FORBIDDEN, "rollback: x")))
            .encode();
    let mut want = hx("61831234 7a ff".replace(' ', "").as_str());
    want.extend_from_slice(b"rollback: x");
    assert_eq!(refused, want);
    let r = CoapMessage::decode(&refused).expect("decode");
    assert!(r.is_response());
    assert_eq!(r.code, code::FORBIDDEN);
}

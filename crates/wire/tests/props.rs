//! Property tests: round trips of every codec, and "fuzz" properties that
//! arbitrary bytes never make a parser panic.

use proptest::prelude::*;
use trellis_wire::coap::{CoapMessage, MessageType};
use trellis_wire::frame::{FrameDecoder, FrameEncoder};
use trellis_wire::hello::CommandPolicyReport;
use trellis_wire::message::classify;
use trellis_wire::ota::UpdateBegin;
use trellis_wire::{DeviceId, Hello};

fn mtype() -> impl Strategy<Value = MessageType> {
    prop_oneof![
        Just(MessageType::Confirmable),
        Just(MessageType::NonConfirmable),
        Just(MessageType::Acknowledgement),
        Just(MessageType::Reset)
    ]
}

prop_compose! {
    fn coap()(
        mtype in mtype(),
        code in any::<u8>(),
        message_id in any::<u16>(),
        token in proptest::collection::vec(any::<u8>(), 0..=8),
        mut options in proptest::collection::vec(
            (prop_oneof![0u16..20, 0u16..400, any::<u16>()], proptest::collection::vec(any::<u8>(), 0..300)),
            0..6,
        ),
        payload in proptest::collection::vec(any::<u8>(), 0..200),
    ) -> CoapMessage {
        options.sort_by_key(|(n, _)| *n);
        CoapMessage { mtype, code, message_id, token, options, payload }
    }
}

/// Splits `bytes` at the given cut points (taken modulo the length).
fn cut(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    points
        .windows(2)
        .map(|w| bytes[w[0]..w[1]].to_vec())
        .collect()
}

/// The messages framed one after the other, and the encoder after them.
fn framed(key: [u8; 16], iv: [u8; 16], messages: &[Vec<u8>]) -> (Vec<u8>, FrameEncoder) {
    let mut enc = FrameEncoder::new(key, iv);
    let stream = messages.iter().flat_map(|m| enc.encode(m)).collect();
    (stream, enc)
}

/// Pushes `stream` cut at `cuts`; after each push takes every complete
/// message, or at most one (`one_per_push`, the rest taken at the end).
fn unframed(
    key: [u8; 16],
    iv: [u8; 16],
    stream: &[u8],
    cuts: &[usize],
    one_per_push: bool,
) -> (Vec<Vec<u8>>, FrameDecoder) {
    let mut dec = FrameDecoder::new(key, iv, 4096);
    let mut got = Vec::new();
    for piece in cut(stream, cuts) {
        dec.push(&piece);
        while let Some(m) = dec.next_message().expect("valid stream") {
            got.push(m);
            if one_per_push {
                break;
            }
        }
    }
    while let Some(m) = dec.next_message().expect("valid stream") {
        got.push(m);
    }
    (got, dec)
}

proptest! {
    #[test]
    fn coap_round_trip(m in coap()) {
        let bytes = m.encode();
        let back = CoapMessage::decode(&bytes).expect("decodes");
        prop_assert_eq!(&back, &m);
        prop_assert_eq!(back.encode(), bytes);
    }

    #[test]
    fn frames_round_trip_at_any_read_boundary(
        key in any::<[u8; 16]>(),
        iv in any::<[u8; 16]>(),
        messages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 1..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..20),
    ) {
        let (stream, enc) = framed(key, iv, &messages);
        let (got, dec) = unframed(key, iv, &stream, &cuts, false);
        prop_assert_eq!(got, messages);
        prop_assert_eq!(dec.iv(), enc.iv());
        prop_assert_eq!(dec.buffered_len(), 0);
    }

    #[test]
    fn frames_appended_to_one_buffer_are_the_frames_encoded_one_by_one(
        key in any::<[u8; 16]>(),
        iv in any::<[u8; 16]>(),
        messages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 1..6),
        prefix in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let (one_by_one, encoder) = framed(key, iv, &messages);
        let mut appending = FrameEncoder::new(key, iv);
        let expected = [prefix.clone(), one_by_one].concat();
        let mut buffer = prefix.clone();
        for m in &messages {
            appending.try_encode_into(m, &mut buffer).expect("fits");
        }
        prop_assert_eq!(buffer, expected);
        prop_assert_eq!(appending.iv(), encoder.iv());
    }

    #[test]
    fn frames_taken_one_per_read_with_more_pushed_behind_them(
        key in any::<[u8; 16]>(),
        iv in any::<[u8; 16]>(),
        messages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..10),
        cuts in proptest::collection::vec(any::<usize>(), 0..20),
    ) {
        // Frames left in the decoder when the next read arrives: the
        // consumed front is dropped then, and what is left must still line up.
        let (stream, _) = framed(key, iv, &messages);
        let (got, dec) = unframed(key, iv, &stream, &cuts, true);
        prop_assert_eq!(got, messages);
        prop_assert_eq!(dec.buffered_len(), 0);
    }

    #[test]
    fn coap_encoded_into_a_used_buffer_appends_its_encoding(m in coap(), prefix in proptest::collection::vec(any::<u8>(), 0..40)) {
        let mut buffer = prefix.clone();
        m.encode_into(&mut buffer);
        prop_assert_eq!(&buffer[..prefix.len()], &prefix[..]);
        prop_assert_eq!(&buffer[prefix.len()..], &m.encode()[..]);
    }

    #[test]
    fn a_chunk_encoded_in_place_is_the_chunk_message(
        id in any::<u16>(),
        token in any::<u8>(),
        index in proptest::option::of(any::<u16>()),
        data in proptest::collection::vec(any::<u8>(), 0..700),
        padding in 0usize..300,
        prefix in proptest::collection::vec(any::<u8>(), 0..20),
    ) {
        let padded_len = data.len() + padding;
        let mut padded = data.clone();
        padded.resize(padded_len, 0);
        let expected = trellis_wire::message::chunk(id, token, &trellis_wire::ota::Chunk::new(index, padded)).encode();
        let mut out = prefix.clone();
        trellis_wire::message::encode_chunk_into(&mut out, id, token, index, &data, padded_len);
        prop_assert_eq!(&out[..prefix.len()], &prefix[..]);
        prop_assert_eq!(&out[prefix.len()..], &expected[..]);
    }

    #[test]
    fn hello_round_trip(
        product_id in any::<u16>(), firmware_version in any::<u16>(), reserved in any::<u8>(), flags in any::<u8>(),
        platform_id in any::<u16>(), id in proptest::option::of(any::<[u8; 12]>()), sha in proptest::option::of(any::<[u8; 32]>()),
        commands in proptest::option::of((any::<[u8; 32]>(), any::<u64>())),
        policy in proptest::option::of((any::<u64>(), any::<[u8; 32]>())),
        cloud_key_version in proptest::option::of(any::<u32>()),
    ) {
        let command_policy = commands.map(|(policy_sha256, last_sequence)| CommandPolicyReport { policy_sha256, last_sequence });
        let trust_policy = policy.map(|(version, sha256)| trellis_wire::hello::TrustPolicyReport { version, sha256 });
        let mut h = Hello { product_id, firmware_version, reserved, flags, platform_id, device_id: id.map(DeviceId), firmware_sha256: sha, command_policy, trust_policy, cloud_key_version };
        let back = Hello::parse(&h.encode()).expect("parses");
        // Extensions without an id travel with an all-zero id.
        if h.device_id.is_none() && (h.firmware_sha256.is_some() || h.command_policy.is_some() || h.trust_policy.is_some() || h.cloud_key_version.is_some()) {
            h.device_id = Some(DeviceId::default());
        }
        prop_assert_eq!(back, h);
    }

    #[test]
    fn update_begin_round_trip(
        flags in any::<u8>(), chunk_size in any::<u16>(), file_size in any::<u32>(), destination in any::<u8>(),
        address in any::<u32>(), manifest in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..500)),
    ) {
        let u = UpdateBegin { flags, chunk_size, file_size, destination, address, manifest };
        prop_assert_eq!(UpdateBegin::parse(&u.encode()).expect("parses"), u);
    }

    #[test]
    fn fuzz_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(m) = CoapMessage::decode(&bytes) {
            let _ = classify(&m);
            let _ = m.uri_path();
        }
        let _ = Hello::parse(&bytes);
        let _ = UpdateBegin::parse(&bytes);
        let _ = trellis_wire::message::Describe::from_json(&bytes);
        let _ = trellis_wire::HandshakePlaintext::parse(&bytes);
    }

    #[test]
    fn fuzz_coap_like_bytes_never_panic(
        header in any::<[u8; 4]>(),
        rest in proptest::collection::vec(prop_oneof![any::<u8>(), Just(0xffu8), 0xb0u8..0xbf, 0xd0u8..0xef], 0..100),
    ) {
        let mut bytes = header.to_vec();
        bytes[0] = 0x40 | (bytes[0] & 0x3f);
        bytes.extend(rest);
        if let Ok(m) = CoapMessage::decode(&bytes) {
            let _ = classify(&m);
        }
    }

    #[test]
    fn fuzz_frame_decoder_never_panics(
        key in any::<[u8; 16]>(),
        max in 0usize..5000,
        pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..10),
    ) {
        let mut dec = FrameDecoder::new(key, [0; 16], max);
        for p in pieces {
            dec.push(&p);
            // A bogus length must never be buffered beyond one push's input.
            prop_assert!(dec.buffered_len() <= max + 2 + 200);
            while let Ok(Some(plain)) = dec.next_message() {
                if let Ok(m) = CoapMessage::decode(&plain) {
                    let _ = classify(&m);
                }
            }
        }
    }
}

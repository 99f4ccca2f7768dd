//! OtaSender against OtaReceiver in memory: lost chunks, corrupted chunks,
//! 256- and 512-byte chunks, images that are not a multiple of the chunk
//! size, and refusals carried back to the sender with their reason.

mod common;

use common::{PRODUCT, image, keys, policy_2_of_2, release_bytes};
use trellis_firmware::{
    ChunkOutcome, DoneOutcome, OtaReceiver, OtaSender, Outcome, ReceivedUpdate, ReceiverConfig,
    Rejection, SenderConfig, Step,
};
use trellis_wire::coap::{CoapMessage, code};
use trellis_wire::message::{Incoming, Request, classify};
use trellis_wire::ota::{Chunk, UpdateBegin, padded_chunks};

/// A tiny deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

#[derive(Default)]
struct Faults {
    /// Percent of Chunk messages dropped on the way to the device.
    chunk_loss: u64,
    /// Percent of the device's chunk answers dropped.
    answer_loss: u64,
    /// Corrupt the payload of chunk `i` (CRC kept) the first `n` times.
    corrupt: Option<(u16, u32)>,
    /// Corrupt chunk `i` and recompute its CRC, every time.
    corrupt_with_crc: Option<u16>,
}

struct Run {
    outcome: Outcome,
    completed: Option<ReceivedUpdate>,
    rejected: Option<Rejection>,
    sender: OtaSender,
}

fn request_name(r: &Request) -> String {
    match r {
        Request::Chunk(c) => format!("chunk {:?}", c.index),
        other => format!("{:?}", std::mem::discriminant(other)),
    }
}

fn receiver(floor: u32) -> OtaReceiver {
    OtaReceiver::new(ReceiverConfig {
        policy: Some(policy_2_of_2()),
        product_id: PRODUCT,
        version_floor: floor,
        ..ReceiverConfig::default()
    })
}

fn run(mut sender: OtaSender, mut rx: OtaReceiver, faults: Faults, seed: u64) -> Run {
    let mut rng = Rng(seed | 1);
    let (mut server_id, mut token) = (1000u16, 0u8);
    let mut device_id = 50_000u16;
    let mut corrupted = 0u32;
    let mut completed = None;
    let mut rejected = None;
    for _ in 0..100_000 {
        if sender.is_finished() {
            break;
        }
        let mut next = || {
            server_id = server_id.wrapping_add(1);
            token = token.wrapping_add(1).max(1);
            (server_id, token)
        };
        // The gateway fences on `wants_transmit` before polling and
        // reserves `transmit_size_hint` for what the poll gives: both must
        // agree with the poll itself in every state these runs reach.
        let wants = sender.wants_transmit();
        let room = sender.transmit_size_hint();
        let polled = sender.poll_transmit(&mut next);
        assert_eq!(
            wants,
            polled.is_some(),
            "wants_transmit disagrees with poll_transmit"
        );
        if let Some(m) = &polled {
            let framed = (m.encode().len() / 16 + 1) * 16 + 2;
            assert!(framed <= room, "{framed} bytes framed, {room} hinted");
        }
        let Some(mut m) = polled else {
            // Nothing to send and nothing coming back: the caller's timer.
            if std::env::var("OTA_DEBUG").is_ok() {
                eprintln!("timeout {:?}", sender.progress());
            }
            sender.on_timeout();
            continue;
        };
        let Ok(Incoming::Request(mut request)) = classify(&m) else {
            // An ACK to the device's ChunkMissed: nothing for the device to do.
            continue;
        };
        if let Request::Chunk(chunk) = &mut request {
            let index = chunk.index.expect("fast OTA sends indexes");
            if rng.below(100) < faults.chunk_loss {
                continue;
            }
            if let Some((i, times)) = faults.corrupt
                && i == index
                && corrupted < times
            {
                corrupted += 1;
                chunk.data[3] ^= 0xA5;
                m.payload = chunk.data.clone();
            }
            if faults.corrupt_with_crc == Some(index) {
                chunk.data[0] ^= 0x01;
                *chunk = Chunk::new(Some(index), chunk.data.clone());
            }
        }
        if std::env::var("OTA_DEBUG").is_ok() {
            eprintln!("-> {:?}", request_name(&request));
        }
        let out = rx.handle(&m, &request).expect("an OTA request");
        if let Some(u) = out.completed {
            completed = Some(u);
        }
        if let Some(r) = out.rejected {
            rejected = Some(r);
        }
        for reply in out.replies {
            let mut msg = reply.message;
            if reply.fresh_id {
                device_id = device_id.wrapping_add(1);
                msg.message_id = device_id;
            }
            let is_chunk_answer = matches!(request, Request::Chunk(_)) && msg.code != code::EMPTY;
            if is_chunk_answer && rng.below(100) < faults.answer_loss {
                continue;
            }
            let consumed = sender.handle(&msg);
            assert!(
                consumed || msg.code == code::EMPTY,
                "the sender ignored {msg:?}"
            );
        }
    }
    Run {
        outcome: sender.outcome().cloned().expect("the transfer ended"),
        completed,
        rejected,
        sender,
    }
}

fn good_sender(img: &[u8], chunk_size: u16, window: usize) -> OtaSender {
    lossy_sender(
        img,
        chunk_size,
        window,
        SenderConfig::default().max_timeouts,
    )
}

/// With a quarter of all chunks or answers lost, stop-and-wait sees several
/// timeouts in a row far more often than a TCP link ever would.
fn lossy_sender(img: &[u8], chunk_size: u16, window: usize, max_timeouts: u32) -> OtaSender {
    let k = keys();
    let signed = release_bytes(PRODUCT, 2, img, &[&k.customer, &k.cloud]);
    OtaSender::new(
        img.to_vec(),
        signed,
        SenderConfig {
            chunk_size,
            window,
            max_timeouts,
            ..SenderConfig::default()
        },
    )
    .expect("sender")
}

#[test]
fn clean_transfers_with_256_and_512_byte_chunks() {
    for (chunk_size, len) in [
        (256u16, 256 * 9 + 77),
        (512, 512 * 5 + 1),
        (512, 300),
        (256, 256 * 4),
    ] {
        for window in [1, 8] {
            let img = image(len);
            let r = run(
                good_sender(&img, chunk_size, window),
                receiver(1),
                Faults::default(),
                7,
            );
            assert_eq!(r.outcome, Outcome::Delivered, "{chunk_size} {len} {window}");
            let u = r.completed.expect("completed");
            assert_eq!(u.image, img);
            assert_eq!(u.manifest.version, 2);
            let p = r.sender.progress();
            assert_eq!(p.chunks_total, len.div_ceil(usize::from(chunk_size)));
            assert_eq!(
                (p.chunks_acked, p.bytes_acked),
                (p.chunks_total, len as u64)
            );
            assert_eq!(p.chunks_resent, 0);
        }
    }
}

#[test]
fn random_loss_and_a_corrupted_chunk_are_asked_for_again() {
    for seed in 1..=6u64 {
        for (chunk_size, window) in [(256u16, 8usize), (512, 4), (256, 1)] {
            let img = image(usize::from(chunk_size) * 23 + 111);
            let r = run(
                lossy_sender(&img, chunk_size, window, 30),
                receiver(1),
                Faults {
                    chunk_loss: 15,
                    answer_loss: 10,
                    corrupt: Some((5, 2)),
                    ..Faults::default()
                },
                seed,
            );
            assert_eq!(r.outcome, Outcome::Delivered, "seed {seed} {chunk_size}");
            assert_eq!(r.completed.expect("completed").image, img);
            assert!(r.sender.progress().chunks_resent > 0);
            assert_eq!(r.rejected, None);
        }
    }
}

fn refused(r: &Run) -> (Step, u8, String) {
    let Outcome::Refused { step, code, reason } = &r.outcome else {
        panic!("not refused: {:?}", r.outcome)
    };
    let reason = reason.clone().expect("the device says why").0;
    assert_eq!(
        r.rejected.as_ref().map(|x| x.code().to_owned()),
        Some(reason.clone())
    );
    assert!(r.completed.is_none());
    (*step, *code, reason)
}

#[test]
fn refusals_reach_the_sender_with_their_reason() {
    let k = keys();
    let img = image(2000);
    let send = |signed: Vec<u8>, img: &[u8]| {
        OtaSender::new(img.to_vec(), signed, SenderConfig::default()).expect("sender")
    };
    // Signed by the cloud only: the "cloud breached" case.
    let r = run(
        send(release_bytes(PRODUCT, 2, &img, &[&k.cloud]), &img),
        receiver(1),
        Faults::default(),
        1,
    );
    assert_eq!(
        refused(&r),
        (
            Step::Begin,
            code::FORBIDDEN,
            "insufficient_signatures".into()
        )
    );
    assert_eq!(
        r.sender.progress().chunks_sent,
        0,
        "no chunk before the manifest is accepted"
    );
    // Another product, and a rollback.
    let both = [&k.customer, &k.cloud];
    let r = run(
        send(release_bytes(PRODUCT + 1, 2, &img, &both), &img),
        receiver(1),
        Faults::default(),
        1,
    );
    assert_eq!(refused(&r).2, "wrong_product");
    let r = run(
        send(release_bytes(PRODUCT, 2, &img, &both), &img),
        receiver(2),
        Faults::default(),
        1,
    );
    assert_eq!(refused(&r).2, "rollback");
    // The image altered after signing: the same size, another hash.
    let mut altered = img.clone();
    altered[1500] ^= 0xFF;
    let r = run(
        send(release_bytes(PRODUCT, 2, &img, &both), &altered),
        receiver(1),
        Faults::default(),
        1,
    );
    assert_eq!(refused(&r).0, Step::Done);
    assert_eq!(refused(&r).2, "hash_mismatch");
    // A longer image than signed: UpdateBegin's file size already disagrees.
    let mut longer = img.clone();
    longer.push(0);
    let r = run(
        send(release_bytes(PRODUCT, 2, &img, &both), &longer),
        receiver(1),
        Faults::default(),
        1,
    );
    assert_eq!(refused(&r).2, "size_mismatch");
    // A chunk altered in flight with a matching CRC: caught by the hash.
    let r = run(
        send(release_bytes(PRODUCT, 2, &img, &both), &img),
        receiver(1),
        Faults {
            corrupt_with_crc: Some(1),
            ..Faults::default()
        },
        1,
    );
    assert_eq!(refused(&r).2, "hash_mismatch");
    // A chunk altered in flight every time: the device gives up on it.
    let r = run(
        send(release_bytes(PRODUCT, 2, &img, &both), &img),
        receiver(1),
        Faults {
            corrupt: Some((2, u32::MAX)),
            ..Faults::default()
        },
        1,
    );
    let (step, _, reason) = refused(&r);
    assert_eq!((step, reason.as_str()), (Step::Chunk(2), "chunk_crc"));
    // No policy at all.
    let r = run(
        send(release_bytes(PRODUCT, 2, &img, &both), &img),
        OtaReceiver::new(ReceiverConfig {
            product_id: PRODUCT,
            ..ReceiverConfig::default()
        }),
        Faults::default(),
        1,
    );
    assert_eq!(refused(&r).2, "no_trust_policy");
}

fn begin(manifest: Option<Vec<u8>>, chunk_size: u16, file_size: u32) -> UpdateBegin {
    UpdateBegin {
        flags: 0,
        chunk_size,
        file_size,
        destination: 0,
        address: 0,
        manifest,
    }
}

#[test]
fn receiver_refusals_for_the_transfer_itself() {
    let k = keys();
    let img = image(300);
    let signed = release_bytes(PRODUCT, 2, &img, &[&k.customer, &k.cloud]);
    let mut rx = receiver(1);
    // A spark-style UpdateBegin with no manifest.
    assert_eq!(
        rx.begin(&begin(None, 256, 300)).unwrap_err().code(),
        "no_manifest"
    );
    assert_eq!(
        rx.begin(&begin(Some(b"\xff".to_vec()), 256, 300))
            .unwrap_err()
            .code(),
        "malformed_manifest"
    );
    assert_eq!(
        rx.begin(&begin(Some(signed.clone()), 0, 300))
            .unwrap_err()
            .code(),
        "bad_transfer"
    );
    // Too large for this device.
    let mut small = OtaReceiver::new(ReceiverConfig {
        max_image_size: 299,
        ..rx.config().clone()
    });
    assert_eq!(
        small
            .begin(&begin(Some(signed.clone()), 256, 300))
            .unwrap_err()
            .code(),
        "too_large"
    );
    // Chunks before UpdateBegin, an index past the end.
    assert_eq!(
        rx.chunk(&Chunk::new(Some(0), vec![0; 256])),
        ChunkOutcome::NotReceiving
    );
    rx.begin(&begin(Some(signed.clone()), 256, 300))
        .expect("begin");
    let ChunkOutcome::Rejected(r) = rx.chunk(&Chunk::new(Some(2), vec![0; 256])) else {
        panic!()
    };
    assert_eq!(r.code(), "bad_transfer");
    // Missing chunks are asked for, then given up on.
    rx.begin(&begin(Some(signed.clone()), 256, 300))
        .expect("begin");
    let chunks: Vec<Vec<u8>> = padded_chunks(&img, 256).collect();
    assert_eq!(
        rx.chunk(&Chunk::new(Some(1), chunks[1].clone())),
        ChunkOutcome::Stored { index: 1 }
    );
    assert_eq!(rx.done(), DoneOutcome::Missing(vec![0]));
    let mut last = rx.done();
    for _ in 0..10 {
        if matches!(last, DoneOutcome::Rejected(_)) {
            break;
        }
        last = rx.done();
    }
    let DoneOutcome::Rejected(r) = last else {
        panic!("{last:?}")
    };
    assert_eq!(r.code(), "missing_chunks");
    assert!(!rx.is_receiving());
}

#[test]
fn spark_style_chunks_without_index_and_the_vector_crcs() {
    // PROTOCOL.md's OTA vector: 300 bytes in 256-byte chunks, zero-padded,
    // CRC over the padding.
    let img: Vec<u8> = (0..300u32).map(|i| (3 + 7 * i) as u8).collect();
    let k = keys();
    let sender = good_sender(&img, 256, 1);
    assert_eq!(sender.chunk(1).data.len(), 256);
    assert_eq!(sender.chunk(1).data[44..], [0u8; 212]);
    let mut rx = receiver(1);
    let signed = release_bytes(PRODUCT, 2, &img, &[&k.customer, &k.cloud]);
    rx.begin(&begin(Some(signed), 256, 300)).expect("begin");
    for data in padded_chunks(&img, 256) {
        let mut c = Chunk::new(None, data);
        // A bad CRC once: the same index-less chunk comes again.
        let good = c.clone();
        c.crc ^= 1;
        assert!(matches!(rx.chunk(&c), ChunkOutcome::Resend { .. }));
        assert!(matches!(rx.chunk(&good), ChunkOutcome::Stored { .. }));
    }
    let DoneOutcome::Complete(u) = rx.done() else {
        panic!()
    };
    assert_eq!(u.image, img);
    let _ = CoapMessage::decode;
}

#[test]
fn messages_encoded_in_place_are_the_messages_poll_transmit_builds() {
    // Two senders with the same image and manifest, fed the same device
    // answers: one builds messages, one encodes them into a buffer (the
    // gateway's path). Every message must be the same bytes, through
    // UpdateBegin, a window of chunks (the last one short and padded),
    // a bad-CRC answer that resends a chunk, and UpdateDone.
    let img: Vec<u8> = (0..(512 * 6 + 100) as u32)
        .map(|i| (i * 31 + 7) as u8)
        .collect();
    let k = keys();
    let signed = release_bytes(PRODUCT, 2, &img, &[&k.customer, &k.cloud]);
    let config = SenderConfig {
        chunk_size: 512,
        window: 4,
        ..SenderConfig::default()
    };
    let mut built = OtaSender::new(img.clone(), signed.clone(), config.clone()).expect("sender");
    let mut encoded = OtaSender::new(img.clone(), signed, config).expect("sender");
    let mut rx = receiver(1);
    let (mut a_ids, mut b_ids) = ((100u16, 0u8), (100u16, 0u8));
    let mut compared = 0;
    let mut resent_once = false;
    for _ in 0..200 {
        if built.is_finished() {
            break;
        }
        let mut next_a = || {
            a_ids = (a_ids.0 + 1, a_ids.1.wrapping_add(1).max(1));
            a_ids
        };
        let mut next_b = || {
            b_ids = (b_ids.0 + 1, b_ids.1.wrapping_add(1).max(1));
            b_ids
        };
        let mut out = vec![0xEE; 3];
        let a = built.poll_transmit(&mut next_a);
        let b = encoded.poll_transmit_into(&mut next_b, &mut out);
        assert_eq!(a.is_some(), b, "both have a message, or neither");
        let Some(m) = a else {
            built.on_timeout();
            encoded.on_timeout();
            continue;
        };
        assert_eq!(&out[..3], &[0xEE; 3], "appended, not overwritten");
        assert_eq!(out[3..], m.encode()[..], "message {compared}");
        compared += 1;
        // The device's answers go to both; chunk 2 arrives corrupted once
        // (CRC kept), so the device asks for it again.
        let mut m = m;
        let Ok(Incoming::Request(mut request)) = classify(&m) else {
            continue;
        };
        if let Request::Chunk(chunk) = &mut request
            && chunk.index == Some(2)
            && !resent_once
        {
            resent_once = true;
            chunk.data[3] ^= 0xA5;
            m.payload = chunk.data.clone();
        }
        let out = rx.handle(&m, &request).expect("an OTA request");
        let mut device_id = 60_000u16;
        for reply in out.replies {
            let mut msg = reply.message;
            if reply.fresh_id {
                device_id = device_id.wrapping_add(1);
                msg.message_id = device_id;
            }
            let a_took = built.handle(&msg);
            let b_took = encoded.handle(&msg);
            assert_eq!(a_took, b_took);
        }
    }
    assert!(built.is_finished() && encoded.is_finished());
    assert!(
        resent_once && compared >= 10,
        "compared {compared} messages"
    );
    assert_eq!(built.progress().chunks_resent, 1);
    assert_eq!(built.outcome(), encoded.outcome());
}

//! `wire`: heap allocations per protocol operation and message type
//! (counted by this binary's global allocator), with a quick timing of each;
//! the statistically careful timings are the criterion benchmarks,
//! `cargo bench -p trellis-wire --bench wire`, over the same messages.
use crate::alloc_count::per_call;
use std::time::Instant;
use trellis_wire::coap::CoapMessage;
use trellis_wire::frame::SessionCipher;
use trellis_wire::message::classify;

#[path = "../../crates/wire/benches/support/samples.rs"]
mod samples;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Calls per operation for the averages.
    #[arg(long, default_value_t = 20_000)]
    pub iterations: u64,
}

impl Args {
    pub fn smoke() -> Self {
        Self { iterations: 200 }
    }
}

fn ns_per_call(n: u64, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    println!(
        "== wire: allocations per operation (this binary's counting allocator; times are rough, see criterion)"
    );
    println!(
        "{:<17} {:>5} | {:>13} | {:>13} | {:>13} | {:>13} | {:>13}",
        "message",
        "bytes",
        "coap encode",
        "coap decode",
        "classify",
        "frame encode",
        "frame decode"
    );
    println!(
        "{:<17} {:>5} | {:>13} | {:>13} | {:>13} | {:>13} | {:>13}",
        "", "", "allocs / ns", "allocs / ns", "allocs / ns", "allocs / ns", "allocs / ns"
    );
    let n = args.iterations.max(1);
    let material = samples::material();
    let mut total_allocs = 0.0;
    for (name, msg) in samples::samples() {
        let bytes = msg.encode();
        let decoded = CoapMessage::decode(&bytes)?;
        anyhow::ensure!(decoded == msg, "{name}: CoAP round trip differs");
        let (enc_a, _) = per_call(n, || {
            std::hint::black_box(std::hint::black_box(&msg).encode());
        });
        let enc_ns = ns_per_call(n, || {
            std::hint::black_box(std::hint::black_box(&msg).encode());
        });
        let (dec_a, _) = per_call(n, || {
            std::hint::black_box(CoapMessage::decode(std::hint::black_box(&bytes)).ok());
        });
        let dec_ns = ns_per_call(n, || {
            std::hint::black_box(CoapMessage::decode(std::hint::black_box(&bytes)).ok());
        });
        let (cls_a, _) = per_call(n, || {
            std::hint::black_box(classify(std::hint::black_box(&decoded)).ok());
        });
        let cls_ns = ns_per_call(n, || {
            std::hint::black_box(classify(std::hint::black_box(&decoded)).ok());
        });
        // Frames: an encoder and a decoder in lockstep (each frame moves the IV).
        let mut tx = SessionCipher::new(&material, trellis_wire::DEFAULT_MAX_FRAME_LEN);
        let mut rx = SessionCipher::new(&material, trellis_wire::DEFAULT_MAX_FRAME_LEN);
        let frames: Vec<Vec<u8>> = (0..n).map(|_| tx.encoder.encode(&bytes)).collect();
        let (fenc_a, _) = per_call(n, || {
            std::hint::black_box(tx.encoder.encode(std::hint::black_box(&bytes)));
        });
        let fenc_ns = ns_per_call(n, || {
            std::hint::black_box(tx.encoder.encode(std::hint::black_box(&bytes)));
        });
        let mut it = frames.iter();
        let mut ok = true;
        let (fdec_a, _) = per_call(n / 2, || {
            if let Some(f) = it.next() {
                rx.decoder.push(f);
                ok &= matches!(rx.decoder.next_message(), Ok(Some(ref p)) if *p == bytes);
            }
        });
        let fdec_ns = ns_per_call(n / 2, || {
            if let Some(f) = it.next() {
                rx.decoder.push(f);
                ok &= matches!(rx.decoder.next_message(), Ok(Some(ref p)) if *p == bytes);
            }
        });
        anyhow::ensure!(ok, "{name}: a frame did not decode back to its message");
        total_allocs += enc_a + dec_a + cls_a + fenc_a + fdec_a;
        println!(
            "{:<17} {:>5} | {:>5.1} / {:>5.0} | {:>5.1} / {:>5.0} | {:>5.1} / {:>5.0} | {:>5.1} / {:>5.0} | {:>5.1} / {:>5.0}",
            name,
            bytes.len(),
            enc_a,
            enc_ns,
            dec_a,
            dec_ns,
            cls_a,
            cls_ns,
            fenc_a,
            fenc_ns,
            fdec_a,
            fdec_ns
        );
    }
    println!("RESULT wire allocs_all_ops_all_messages={total_allocs:.1}");
    println!("timings: cargo bench -p trellis-wire --bench wire");
    Ok(())
}

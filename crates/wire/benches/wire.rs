//! Criterion microbenchmarks of the device protocol's hot paths, per message
//! type: CoAP encode and decode (parse), message classification, and frame
//! encode and decode (AES-128-CBC with the IV chaining of PROTOCOL.md).
//! A counting global allocator reports allocations per operation first,
//! since in a gateway holding 100k sessions allocations matter as much as
//! nanoseconds.
//!
//! cargo bench -p trellis-wire --bench wire
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use trellis_wire::coap::CoapMessage;
use trellis_wire::frame::SessionCipher;
use trellis_wire::message::classify;

#[path = "support/samples.rs"]
mod samples;

/// The system allocator, counting allocations (criterion runs the measured
/// code on the main thread; the table is made before any timing starts).
struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs_per_call(n: u64, mut f: impl FnMut()) -> f64 {
    let before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..n {
        f();
    }
    (ALLOCS.load(Ordering::Relaxed) - before) as f64 / n as f64
}

fn allocation_table() {
    const N: u64 = 1000;
    let material = samples::material();
    println!("allocations per operation (mean of {N} calls)");
    println!(
        "{:<17} {:>5} {:>12} {:>12} {:>9} {:>13} {:>13}",
        "message",
        "bytes",
        "coap encode",
        "coap decode",
        "classify",
        "frame encode",
        "frame decode"
    );
    for (name, msg) in samples::samples() {
        let bytes = msg.encode();
        let decoded = CoapMessage::decode(&bytes).expect("sample decodes");
        let mut tx = SessionCipher::new(&material, trellis_wire::DEFAULT_MAX_FRAME_LEN);
        let mut rx = SessionCipher::new(&material, trellis_wire::DEFAULT_MAX_FRAME_LEN);
        let frames: Vec<Vec<u8>> = (0..N).map(|_| tx.encoder.encode(&bytes)).collect();
        let mut it = frames.iter();
        let enc = allocs_per_call(N, || {
            black_box(black_box(&msg).encode());
        });
        let dec = allocs_per_call(N, || {
            black_box(CoapMessage::decode(black_box(&bytes)).ok());
        });
        let cls = allocs_per_call(N, || {
            black_box(classify(black_box(&decoded)).ok());
        });
        let fenc = allocs_per_call(N, || {
            black_box(tx.encoder.encode(black_box(&bytes)));
        });
        let fdec = allocs_per_call(N, || {
            if let Some(f) = it.next() {
                rx.decoder.push(f);
                black_box(rx.decoder.next_message().ok());
            }
        });
        println!(
            "{name:<17} {:>5} {enc:>12.1} {dec:>12.1} {cls:>9.1} {fenc:>13.1} {fdec:>13.1}",
            bytes.len()
        );
    }
}

fn bench(c: &mut Criterion) {
    allocation_table();
    let material = samples::material();
    for (name, msg) in samples::samples() {
        let bytes = msg.encode();
        let decoded = CoapMessage::decode(&bytes).expect("sample decodes");
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function("coap_encode", |b| b.iter(|| black_box(&msg).encode()));
        g.bench_function("coap_decode", |b| {
            b.iter(|| CoapMessage::decode(black_box(&bytes)))
        });
        g.bench_function("classify", |b| b.iter(|| classify(black_box(&decoded))));
        let mut tx = SessionCipher::new(&material, trellis_wire::DEFAULT_MAX_FRAME_LEN);
        g.bench_function("frame_encode", |b| {
            b.iter(|| tx.encoder.encode(black_box(&bytes)))
        });
        // Decoding needs each frame in IV order: a fresh pair per batch.
        g.bench_function("frame_decode", |b| {
            b.iter_batched(
                || {
                    let mut pair =
                        SessionCipher::new(&material, trellis_wire::DEFAULT_MAX_FRAME_LEN);
                    let frame = pair.encoder.encode(&bytes);
                    (pair, frame)
                },
                |(mut pair, frame)| {
                    pair.decoder.push(&frame);
                    pair.decoder.next_message()
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! A counting global allocator: the system allocator, plus per-thread counts
//! of allocations and bytes, so `wire` can say how many heap allocations each
//! protocol operation makes. Counting is per thread (const-initialised
//! thread-locals, which never allocate) and costs two adds per allocation.
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

pub struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    static BYTES: Cell<u64> = const { Cell::new(0) };
}

fn note(size: usize) {
    // try_with: during thread teardown the slots may be gone.
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
    let _ = BYTES.try_with(|c| c.set(c.get() + size as u64));
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// (allocations, bytes) made by this thread so far.
pub fn snapshot() -> (u64, u64) {
    (ALLOCS.with(Cell::get), BYTES.with(Cell::get))
}

/// Allocations and bytes per call of `f`, averaged over `n` calls.
pub fn per_call(n: u64, mut f: impl FnMut()) -> (f64, f64) {
    let (a0, b0) = snapshot();
    for _ in 0..n {
        f();
    }
    let (a1, b1) = snapshot();
    ((a1 - a0) as f64 / n as f64, (b1 - b0) as f64 / n as f64)
}

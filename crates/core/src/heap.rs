//! The process heap (glibc malloc), tuned for what a gateway holds: many
//! small allocations that live as long as a device's session, made and
//! freed among the transient buffers of handshakes and refresh passes.
//!
//! glibc gives every thread that contends for the heap an arena of its
//! own, up to eight per core, and an arena keeps the free memory between
//! its live allocations. With sessions spread over the main thread's arena
//! (the accept loop spawns their tasks) and each worker's, that slack was
//! about half a megabyte over what 1,000 idle sessions hold, an eighth of
//! their heap (BENCHMARKS.md, idle sessions). One arena per core keeps the
//! slack to a core's share while the workers (one per core) still rarely
//! wait for each other: small allocations go through glibc's per-thread
//! cache first.
//!
//! Elsewhere than glibc these are no-ops.

/// The environment variables with which an operator sets the arena count
/// themselves (glibc reads both at its first allocation); either one set
/// leaves it to them.
pub const OPERATOR_SETTINGS: [&str; 2] = ["MALLOC_ARENA_MAX", "GLIBC_TUNABLES"];

/// Caps malloc's arenas at one per core unless the operator set a count
/// (see [`OPERATOR_SETTINGS`]). Call first thing in `main`, before any
/// thread starts: a thread's arena is chosen at its first allocation.
/// Returns the cap applied, if any.
pub fn limit_arenas() -> Option<usize> {
    if OPERATOR_SETTINGS
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
    {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    set_arena_max(cores).then_some(cores)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_arena_max(arenas: usize) -> bool {
    let arenas = libc::c_int::try_from(arenas).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only changes malloc's parameters; M_ARENA_MAX bounds
    // the arenas created from now on and touches no allocation.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_arena_max(_arenas: usize) -> bool {
    false
}

/// Gives the pages malloc holds free back to the system. glibc keeps the
/// free memory between live allocations (transient buffers freed among
/// long-lived sessions) for the life of the process; a gateway calls this
/// after each refresh pass, which walks the free chunks (well under a
/// millisecond at 20k sessions).
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused pages to the kernel; it has
    // no preconditions and touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operator_setting_is_left_alone() {
        // The test process's own environment: set by the operator (or CI)
        // means no cap; unset means a cap of one per core on glibc.
        let operator = OPERATOR_SETTINGS
            .iter()
            .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
        let applied = limit_arenas();
        if operator {
            assert_eq!(applied, None);
        } else if cfg!(all(target_os = "linux", target_env = "gnu")) {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            assert_eq!(applied, Some(cores));
        }
        release_free();
    }
}

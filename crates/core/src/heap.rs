//! The process heap (glibc malloc), tuned for what a gateway holds: many
//! small allocations that live as long as a device's session, made and
//! freed among the transient buffers of handshakes and refresh passes.
//!
//! glibc gives every thread that contends for the heap an arena of its
//! own, up to eight per core, and each arena keeps the free memory between
//! its live allocations. At 1,000 idle sessions that was 4,170 B per
//! session with glibc's count, 4,116 at one arena per core and 3,781 at
//! one (BENCHMARKS.md, idle sessions). One per core is the default: a
//! single arena cost the handshake 6-10 % of its servers' CPU, one per
//! core nothing measurable, since the workers (one per core) serve most
//! small allocations from glibc's per-thread cache.
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
    if operator_set() {
        return None;
    }
    let cores = cores();
    set_arena_max(cores).then_some(cores)
}

/// Whether one of [`OPERATOR_SETTINGS`] is set (an empty value is unset).
fn operator_set() -> bool {
    OPERATOR_SETTINGS
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
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
        let applied = limit_arenas();
        if operator_set() {
            assert_eq!(applied, None);
        } else if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert_eq!(applied, Some(cores()));
        }
        release_free();
    }
}

#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time; exits non-zero,
# naming the input that crashed, if any target crashes (or hangs, or runs
# out of memory). First replays every saved crash in fuzz/regressions/.
#
# Wall time on the 2-core CI machine, from scratch (cargo-fuzz not
# installed, empty fuzz/target, crates.io download cache warm),
# FUZZ_SECONDS=20:
#   5 min 39 s (user CPU 6 min 37 s), load average about 3 from another
#   engineer's builds: cargo install cargo-fuzz 56 s, first build of the
#   targets 2 min 24 s, fuzzing 5 x 20 s plus start-up 2 min 12 s.
#   The same from scratch under a load average of 7-8: 11 min 09 s.
#   With cargo-fuzz installed and the targets built (a machine kept from
#   an earlier run): about 2 min 10 s.
# Most of the build is the network stack that trellis-proto brings along
# (no target runs it; fuzz/Cargo.toml builds it unoptimised).
#
# cargo-fuzz passes rustc -Z flags (-Zsanitizer=address and the coverage
# instrumentation libFuzzer needs), which only a nightly rustc accepts.
# CI has the one stable toolchain, so RUSTC_BOOTSTRAP=1 lets that stable
# rustc take them: the features are in every stable rustc, only gated.
# Nothing else is built with it (this script sets it for its own commands).
#
# Environment:
#   FUZZ_SECONDS  seconds per target (default 20)
#   FUZZ_TARGETS  space-separated targets (default: all of them)
#   FUZZ_SANITIZER  address (default) or none
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fuzz_dir="$(cd "$here/../../fuzz" && pwd)"
seconds="${FUZZ_SECONDS:-20}"
targets="${FUZZ_TARGETS:-handshake_server frame_decoder coap_parser manifest_decoders firmware_receiver}"
sanitizer="${FUZZ_SANITIZER:-address}"
export RUSTC_BOOTSTRAP=1
start=$SECONDS

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install --locked cargo-fuzz || cargo install cargo-fuzz
fi
cargo fuzz --version

cd "$fuzz_dir"
echo "== building the fuzz targets (sanitizer: $sanitizer)"
cargo fuzz build --sanitizer "$sanitizer"
echo "   built after $((SECONDS - start)) s"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()
summary=()
for target in $targets; do
    # Saved crashes first: each must now run clean.
    mapfile -t saved < <(find "regressions/$target" -type f ! -name '*.md' 2>/dev/null | sort)
    if ((${#saved[@]} > 0)); then
        echo "== $target: replaying ${#saved[@]} saved crash(es)"
        if ! cargo fuzz run --sanitizer "$sanitizer" "$target" "${saved[@]}" -- -runs=1 \
            >"$work/$target.replay.log" 2>&1; then
            tail -n 40 "$work/$target.replay.log"
            grep -m 1 -A 3 -E 'panicked at|ERROR: AddressSanitizer|ERROR: libFuzzer' "$work/$target.replay.log" || true
            echo "FAIL $target: a saved crash in fuzz/regressions/$target/ still crashes"
            failed+=("$target (regression)")
            summary+=("$(printf '%-18s %-6s' "$target" "REGRESSION")")
            continue
        fi
    fi

    echo "== $target: fuzzing for ${seconds}s"
    # New inputs go to a scratch directory (the first one given); the
    # committed seeds in corpus/ are only read.
    mkdir -p "$work/$target"
    if cargo fuzz run --sanitizer "$sanitizer" "$target" "$work/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
        -print_final_stats=1 >"$work/$target.log" 2>&1; then
        status=ok
    else
        status=CRASH
        tail -n 60 "$work/$target.log"
        crash="$(grep -o 'Test unit written to [^ ]*' "$work/$target.log" | tail -n 1 | sed 's/Test unit written to //')"
        echo "FAIL $target: crash input ${crash:-<not written: see the log above>}"
        grep -m 1 -A 3 -E 'panicked at|ERROR: AddressSanitizer|ERROR: libFuzzer' "$work/$target.log" || true
        echo "     save it as fuzz/regressions/$target/<what-it-broke> (see fuzz/README.md)"
        failed+=("$target")
    fi
    runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/$target.log" | grep -o '[0-9]*$' | tail -n 1)"
    if [[ -z "$runs" ]]; then
        # No final stats (a crash): the last "#N" status line.
        runs="$(grep -o '^#[0-9]*' "$work/$target.log" | tail -n 1 | tr -d '#')"
    fi
    summary+=("$(printf '%-18s %-6s %12s executions' "$target" "$status" "${runs:-?}")")
done

echo "== summary (${seconds}s per target, $((SECONDS - start)) s in all)"
printf '%s\n' "${summary[@]}"
if ((${#failed[@]} > 0)); then
    echo "fuzzing FAILED: ${failed[*]}"
    exit 1
fi
echo "fuzzing passed: ${#summary[@]} targets, no crash"

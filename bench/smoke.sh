#!/usr/bin/env bash
# Builds the benchmarks and runs every one of them in smoke mode (tiny sizes,
# a few seconds each), so they keep building and running. Exits non-zero on
# the first failure. Full runs are by hand: see BENCHMARKS.md.
# Needs: a Rust toolchain and redis-server on PATH (scripts/test.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p trellis -p trellis-bench
bench=target/release/trellis-bench
export TRELLIS_BIN="$PWD/target/release/trellis"

for figure in wire handshake routed ota idle; do
  echo "--- trellis-bench --smoke $figure"
  timeout 120 "$bench" --smoke "$figure"
done

# The criterion benchmarks must keep compiling and running: one quick pass.
echo "--- cargo bench -p trellis-wire --bench wire (test mode)"
cargo bench -p trellis-wire --bench wire -- --test
echo "bench smoke: all passed"

#!/usr/bin/env bash
# Builds the benchmarks and runs every one of them in smoke mode (tiny sizes,
# a few seconds each), so they keep building and running. Exits non-zero on
# the first failure. Full runs are by hand: see BENCHMARKS.md.
# Needs: a Rust toolchain and redis-server on PATH (scripts/test.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

# Smoke mode checks that every figure builds and runs, not how fast: the dev
# build (dependencies are optimised in it too) that `cargo test --workspace`
# made already, so CI compiles nothing twice. Full runs use --release.
profile="${BENCH_PROFILE:-debug}"
if [ "$profile" = release ]; then
  cargo build --release --locked -p trellis -p trellis-bench
else
  cargo build -q --workspace --locked
fi
bench="target/$profile/trellis-bench"
export TRELLIS_BIN="$PWD/target/$profile/trellis"

for figure in wire handshake routed ota idle; do
  echo "--- trellis-bench --smoke $figure"
  timeout 120 "$bench" --smoke "$figure"
done

# The criterion benchmarks must keep compiling and running: one quick pass.
echo "--- criterion bench wire (test mode: each benchmark once)"
cargo test -q --workspace --locked --bench wire
echo "bench smoke: all passed"

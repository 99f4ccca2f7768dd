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

for figure in wire handshake routed ota idle commands api webhooks scale; do
  echo "--- trellis-bench --smoke $figure"
  timeout 120 "$bench" --smoke "$figure"
done

# The reconnect pattern (16 devices cycling 40 identities through handshake,
# Hello and close against a gateway with its shipped admission limits): no
# handshake may fail.
echo "--- trellis-bench handshake (reconnect pattern)"
reconnect=$(timeout 120 "$bench" handshake --seconds 3 --concurrency 16 --identities 40 --until-hello --admission --limit-seconds 0.4)
echo "$reconnect"
grep -q "^RESULT handshake .* failed=0 " <<<"$reconnect" || { echo "bench smoke: handshakes failed under the reconnect pattern"; exit 1; }

# The criterion benchmarks must keep compiling and running: one quick pass.
echo "--- criterion bench wire (test mode: each benchmark once)"
cargo test -q --workspace --locked --bench wire
echo "bench smoke: all passed"

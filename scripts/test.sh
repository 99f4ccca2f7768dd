#!/usr/bin/env bash
# Every check CI runs: formatting, lints, all tests (real redis-server,
# real gRPC and TCP on loopback), the `trellis up --demo` smoke run, and the
# Helm chart checks.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# CI builds from scratch: incremental compilation would only cost disk (it
# doubled the target directory) and time.
export CARGO_INCREMENTAL=0
disk_report() { echo "disk: $(du -sh target 2>/dev/null | cut -f1) in target, $(df -h --output=avail . | tail -1 | tr -d ' ') free ($1)"; }
disk_report "start"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
disk_report "after clippy"
echo "== cargo machete (unused dependencies)"
command -v cargo-machete >/dev/null || cargo install --locked cargo-machete
cargo machete
echo "== cargo test"
cargo test --workspace --locked 2>&1 | tee target/test-output.txt
disk_report "after cargo test"
# The test executables cargo just ran (about 3.4 GB; nothing later runs
# them) go, for the same reason as the release build below: the CI
# machine's disk is small.
{ grep -o '(target/debug/deps/[^)]*)' target/test-output.txt || true; } | tr -d '()' | sort -u | xargs -r rm -f
disk_report "after removing the test executables"
echo "== trellis up --demo (smoke)"
scripts/smoke.sh
# The README's first command exactly as a new user runs it: from the clone,
# nothing set, default ports and the default (relative) data directory.
echo "== scripts/demo.sh --exit-after-demo (the README's first command)"
demo_log=target/demo-output.txt
if ! env -u TRELLIS_DATA_DIR -u TRELLIS_CONFIG timeout 900 scripts/demo.sh --exit-after-demo >"$demo_log" 2>&1; then
  tail -50 "$demo_log"; echo "demo: scripts/demo.sh --exit-after-demo failed"; exit 1
fi
for want in "returned 5\$" "demo: done"; do
  grep -qE "$want" "$demo_log" || { tail -50 "$demo_log"; echo "demo: missing \"$want\""; exit 1; }
done
echo "demo: scripts/demo.sh --exit-after-demo printed demo: done"
disk_report "after the demo"
# The CI machine has about 8 GB of disk and every later step uses the dev
# build, so the demo's release build goes now: the fuzz targets need the
# room (CI once ran out of disk building them).
rm -rf target/release
disk_report "after removing the release build"
# The application API as Particle's own clients use it (about 90 s, most of
# it the npm install, bounded by NPM_TIMEOUT).
echo "== particle-cli and particle-api-js against trellis up"
ci/particle/check.sh
echo "== console (ci/console/check.sh)"; ci/console/check.sh
echo "== schemathesis (ci/openapi/check.sh)"; ci/openapi/check.sh
# Coverage-guided fuzzing of every decoder a device or a peer feeds, a
# bounded time per target (about 5 min in all from scratch on an idle
# 2-core machine, most of it building cargo-fuzz and the targets); fails on
# any crash, naming the input (fuzz/README.md).
echo "== fuzzing (ci/fuzz/run.sh, ${FUZZ_SECONDS:-15} s per target)"
FUZZ_SECONDS=${FUZZ_SECONDS:-15} ci/fuzz/run.sh
rm -rf fuzz/target
disk_report "after fuzzing (fuzz/target removed)"
echo "== benchmarks (smoke)"
bench/smoke.sh
if [ -x ci/chart/check.sh ]; then
  echo "== helm chart"
  ci/chart/check.sh
fi
disk_report "end"
# Only cargo's own "test result:" lines count (log lines say "failed" too).
passed=$(grep -E '^test result:' target/test-output.txt | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -E '^test result:' target/test-output.txt | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
echo "tests: ${passed} passed, ${failed} failed"

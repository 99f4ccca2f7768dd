#!/usr/bin/env bash
# Every check CI runs: formatting, lints, all tests (real redis-server,
# real gRPC and TCP on loopback), the `trellis up --demo` smoke run, and the
# Helm chart checks.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked 2>&1 | tee target/test-output.txt
echo "== trellis up --demo (smoke)"
scripts/smoke.sh
echo "== benchmarks (smoke)"
bench/smoke.sh
if [ -x ci/chart/check.sh ]; then
  echo "== helm chart"
  ci/chart/check.sh
fi
# Only cargo's own "test result:" lines count (log lines say "failed" too).
passed=$(grep -E '^test result:' target/test-output.txt | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -E '^test result:' target/test-output.txt | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
echo "tests: ${passed} passed, ${failed} failed"

#!/usr/bin/env bash
# The main job: install what is needed, build, and run `trellis up` with a
# simulated fleet of 10 devices (Ctrl-C stops it). Extra arguments go to
# `trellis up`, e.g. `scripts/demo.sh --exit-after-demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p trellis
exec target/release/trellis up --demo 10 "$@"

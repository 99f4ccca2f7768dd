#!/usr/bin/env bash
# Runs `trellis up --demo 3 --exit-after-demo` on free ports in a throwaway
# data directory and checks that it showed a handshake, a routed call and
# an event, then a signed two-stage rollout that completed.
set -euo pipefail
cd "$(dirname "$0")/.."
# The whole workspace, as `cargo test --workspace` built it: building one
# package alone would resolve dependency features differently and rebuild them.
cargo build -q --workspace --locked
data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
out="$data/up.log"
TRELLIS_DATA_DIR="$data" \
TRELLIS_KEYVAULT__LISTEN=127.0.0.1:0 \
TRELLIS_GATEWAY__DEVICE_LISTEN=127.0.0.1:0 \
TRELLIS_GATEWAY__GRPC_LISTEN=127.0.0.1:0 \
TRELLIS_SIGNER__LISTEN=127.0.0.1:0 \
TRELLIS_OTA__LISTEN=127.0.0.1:0 \
TRELLIS_API__LISTEN=127.0.0.1:0 \
TRELLIS_TELEMETRY__ADMIN_LISTEN=127.0.0.1:0 \
  timeout 180 target/debug/trellis up --demo 3 --exit-after-demo >"$out" 2>&1 || { cat "$out"; echo "smoke: trellis up failed"; exit 1; }
# Each is a regular expression; the call's answer must be exactly 5 (not 50-59).
for want in "handshake with" "returned 5\$" "demo: event" "signed by the customer" "complete: every device reconnected" "demo: done"; do
  grep -qE "$want" "$out" || { cat "$out"; echo "smoke: missing \"$want\""; exit 1; }
done
key_mode=$(stat -c %a "$data/demo-customer-release.pem")
[ "$key_mode" = 600 ] || { echo "smoke: the demo customer private key is mode $key_mode, not 600"; exit 1; }
echo "smoke: trellis up --demo showed handshakes, a routed call, an event and a signed two-stage rollout"

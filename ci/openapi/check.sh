#!/usr/bin/env bash
# schemathesis against the application API's own OpenAPI document
# (/v1/openapi.json) on a `trellis up` (mutual TLS and tokens on, as by
# default) with a simulated device: every documented operation gets a
# bounded number of generated requests carrying a valid token, and every
# answer must be no 5xx, a documented status code, a documented content
# type, and a body matching its documented schema.
#
#   ci/openapi/check.sh            # builds nothing: uses target/debug/trellis
#
# Not run (by operation):
# - the event streams (GET …/events[/{prefix}]): they never end, so a
#   generated request would only wait for the request timeout; their
#   opening and refusals are tested in services/api/tests/api.rs.
# - DELETE /v1/access_tokens/current: it revokes the token the run uses,
#   after which every later request is a 401.
# DELETE /v1/access_tokens/{token} is run: a generated token is never a
# live one (the run's token is only in the Authorization header), so it
# answers 404. DELETE /v1/devices/{id} is run: it never removes anything.
#
# Environment: TRELLIS_BIN (default target/debug/trellis), SCHEMATHESIS_VENV
# (where schemathesis is installed and kept between runs, default
# target/schemathesis-venv), PIP_TIMEOUT (seconds, default 300),
# ST_MAX_EXAMPLES (per operation, default 25), ST_MAX_TIME (seconds for the
# whole run, default 100).
set -euo pipefail

SCHEMATHESIS_VERSION=4.32.5
root=$(cd "$(dirname "$0")/../.." && pwd)
trellis=${TRELLIS_BIN:-$root/target/debug/trellis}
venv=${SCHEMATHESIS_VENV:-$root/target/schemathesis-venv}
[ -x "$trellis" ] || { echo "openapi check: $trellis is missing (cargo build -p trellis)"; exit 1; }

# 1. schemathesis, pinned, with a bounded install time.
if ! "$venv/bin/st" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  python3 -m venv "$venv" || { echo "openapi check: python3 -m venv failed (apt-get install python3-venv)"; exit 1; }
  timeout "${PIP_TIMEOUT:-300}" "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "schemathesis==$SCHEMATHESIS_VERSION" \
    || { echo "openapi check: pip install schemathesis==$SCHEMATHESIS_VERSION failed or timed out"; exit 1; }
fi

# 2. trellis up on free loopback ports, its own data directory.
. "$root/ci/lib/up-env.sh"
"$trellis" up >"$work/up.log" 2>&1 &
up_pid=$!
for _ in $(seq 1 120); do
  curl -fs "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && curl -fs "$base/v1/openapi.json" >/dev/null 2>&1 && break
  kill -0 "$up_pid" 2>/dev/null || { cat "$work/up.log"; echo "openapi check: trellis up died"; exit 1; }
  sleep 0.5
done
curl -fs "$base/v1/openapi.json" >"$work/openapi.json" || { tail -40 "$work/up.log"; echo "openapi check: no /v1/openapi.json"; exit 1; }

# A device of product 6 (functions add, led; variables temp, …) online.
device=$(cd "$work" && "$trellis" device provision --product 6 --out devs | grep -E '^[0-9a-f]{24}$' | head -1)
[ -n "$device" ] || { echo "openapi check: device provisioning failed"; exit 1; }
"$trellis" sim --keys "$work/devs" --gateway "127.0.0.1:$dev" --product 6 --event-interval 5 >"$work/sim.log" 2>&1 &
sim_pid=$!
token=$("$trellis" token create --name schemathesis | tail -1)
for _ in $(seq 1 60); do
  curl -s -H "Authorization: Bearer $token" "$base/v1/devices/$device" | grep -q '"connected":true' && break
  sleep 0.5
done
org=$(curl -s -H "Authorization: Bearer $token" "$base/v1/user" | python3 -c 'import json,sys; print(json.load(sys.stdin)["org"])')

# 3. schemathesis. Generated device ids (path and claim body), function and
# variable names, function arguments, products and organisations are mixed
# with real ones (half of the time), so requests reach the device, its
# functions and variables, the product and the organisation, not only the
# refusals.
cat >"$work/schemathesis.toml" <<EOF
[dictionaries]
device = { values = ["$device"] }
product = { values = [6] }
member = { values = ["add", "led", "temp", "uptime"] }
org = { values = ["$org"] }
args = { values = ["2,3", "on", "off", "40,2"] }

[parameters]
"path.id" = { dictionary = "device", probability = 0.5 }
"path.p" = { dictionary = "product", probability = 0.5 }
"path.name" = { dictionary = "member", probability = 0.5 }
"path.org" = { dictionary = "org", probability = 0.5 }
"body.id" = { dictionary = "device", probability = 0.5 }
"body.args" = { dictionary = "args", probability = 0.5 }
EOF
echo "openapi check: schemathesis $SCHEMATHESIS_VERSION against $base (device $device)"
status=0
# From the work directory: schemathesis keeps its cache (.schemathesis/)
# in the current one.
cd "$work"
timeout 240 "$venv/bin/st" --config-file "$work/schemathesis.toml" run "$work/openapi.json" \
  --url "$base" \
  --header "Authorization: Bearer $token" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --exclude-operation-id-regex '^(stream_.*|delete_current)$' \
  --phases examples,coverage,fuzzing \
  --max-examples "${ST_MAX_EXAMPLES:-25}" \
  --max-time "${ST_MAX_TIME:-100}" \
  --request-timeout 20 \
  --workers 2 \
  --seed "${ST_SEED:-$RANDOM}" \
  --no-color \
  >"$work/st.out" 2>&1 || status=$?
cat "$work/st.out"
if [ "$status" -ne 0 ]; then
  echo "--- trellis up log (tail)"; tail -40 "$work/up.log"
  echo "openapi check: schemathesis found problems (exit $status)"
  exit 1
fi
echo "openapi check: passed"

#!/usr/bin/env bash
# Two Trellis regions on loopback, in the foreground, for trying region
# failover by hand. Design and reasoning: deploy/README.md.
#
# Per region (a, b): a region-local redis-server (sessions, routing, inboxes,
# events), HAProxy (deploy/local/haproxy.cfg.tmpl) in front of two
# `trellis gateway`s, `trellis keyvault`, `trellis signer`, `trellis ota`.
# Durable records: one primary redis-server in region a, its replica in
# region b, and three Redis Sentinels (a, b and a witness) that promote the
# replica when region a is lost. Both keyvaults share one master key file.
#
# Everything runs as this script's children, with data and logs in one
# temporary directory; Ctrl-C (or any exit) stops them and removes it.
set -euo pipefail

usage() {
  cat <<EOF
Usage: deploy/local/regions.sh [--base-port PORT] [--dir DIR] [--help]

Starts two Trellis regions (a, b) on 127.0.0.1 in the foreground; Ctrl-C
stops everything it started.

  --base-port PORT  first port used (default 17000; uses PORT..PORT+299)
  --dir DIR         data and logs here, kept on exit (default: a temporary
                    directory, removed on exit)
  -h, --help        this text

Environment:
  TRELLIS_BIN       the trellis binary (default: target/release/trellis;
                    build it with: cargo build --release -p trellis)
  HAPROXY_BIN       haproxy (default: haproxy on PATH, else /usr/sbin/haproxy)
EOF
}

base=17000
dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --base-port) base="${2:?--base-port needs a port}"; shift 2 ;;
    --dir) dir="${2:?--dir needs a directory}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "regions.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
trellis="${TRELLIS_BIN:-$repo/target/release/trellis}"
[ -x "$trellis" ] || { echo "regions.sh: $trellis not found; run: cargo build --release -p trellis (or set TRELLIS_BIN)" >&2; exit 1; }
haproxy="${HAPROXY_BIN:-$(command -v haproxy || echo /usr/sbin/haproxy)}"
[ -x "$haproxy" ] || { echo "regions.sh: haproxy not found; run scripts/setup.sh" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "regions.sh: redis-server not found; run scripts/setup.sh" >&2; exit 1; }

keep_dir=1
if [ -z "$dir" ]; then
  dir="$(mktemp -d -t trellis-regions.XXXXXX)"
  keep_dir=0
fi
mkdir -p "$dir"

# --- children and cleanup -------------------------------------------------
pids=()
names=()
declare -A pid_of=()
cleaning=0
cleanup() {
  [ "$cleaning" -eq 1 ] && return
  cleaning=1
  trap '' INT TERM
  echo
  echo "regions.sh: stopping ${#pids[@]} processes"
  local i
  # Newest first: load balancers and gateways before what they depend on.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[$i]}" 2>/dev/null || true
  done
  for _ in $(seq 1 100); do
    local alive=0
    for i in "${!pids[@]}"; do
      kill -0 "${pids[$i]}" 2>/dev/null && alive=1
    done
    [ "$alive" -eq 0 ] && break
    sleep 0.1
  done
  for i in "${!pids[@]}"; do
    kill -KILL "${pids[$i]}" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  if [ "$keep_dir" -eq 0 ]; then
    rm -rf "$dir"
  else
    echo "regions.sh: logs kept in $dir"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME CMD...: runs CMD in the background, output to $dir/NAME.log.
start() {
  local name="$1"; shift
  "$@" >"$dir/$name.log" 2>&1 </dev/null &
  pids+=("$!")
  names+=("$name")
  pid_of[$name]=$!
}

# gone NAME: true when NAME's process has exited.
gone() { ! kill -0 "${pid_of[$1]}" 2>/dev/null; }

# wait_port PORT NAME: until something listens on 127.0.0.1:PORT.
wait_port() {
  for _ in $(seq 1 150); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    gone "$2" && break
    sleep 0.2
  done
  echo "regions.sh: $2 is not listening on $1 (or exited); its log:" >&2
  tail -n 30 "$dir/$2.log" >&2
  exit 1
}

# wait_ready ADMIN_PORT NAME: until GET /readyz answers 200.
wait_ready() {
  for _ in $(seq 1 300); do
    if curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$1/readyz" 2>/dev/null; then
      return 0
    fi
    gone "$2" && break
    sleep 0.2
  done
  echo "regions.sh: $2 never became ready (http://127.0.0.1:$1/readyz) or exited; its log:" >&2
  tail -n 30 "$dir/$2.log" >&2
  exit 1
}

redis() { # redis NAME PORT [extra redis-server args...]
  local name="$1" port="$2"; shift 2
  mkdir -p "$dir/$name"
  start "$name" redis-server --port "$port" --bind 127.0.0.1 --dir "$dir/$name" \
    --save "" --appendonly yes "$@"
  wait_port "$port" "$name"
}

sentinel() { # sentinel NAME PORT
  local name="$1" port="$2"
  mkdir -p "$dir/$name"
  # Quorum 2 of 3: two sentinels must agree the primary is down, and a
  # majority (2) must elect the one that runs the failover.
  cat >"$dir/$name/sentinel.conf" <<EOF
port $port
bind 127.0.0.1
dir $dir/$name
sentinel monitor mymaster 127.0.0.1 $durable_a 2
sentinel down-after-milliseconds mymaster 3000
sentinel failover-timeout mymaster 10000
sentinel parallel-syncs mymaster 1
EOF
  start "$name" redis-server "$dir/$name/sentinel.conf" --sentinel
  wait_port "$port" "$name"
}

# --- ports -----------------------------------------------------------------
# Region a: base+0.., region b: base+100.., the witness: base+200.
port() { # port REGION OFFSET
  case "$1" in a) echo $((base + $2)) ;; b) echo $((base + 100 + $2)) ;; w) echo $((base + 200 + $2)) ;; esac
}
durable_a=$(port a 1)   # the durable primary (region a)
durable_b=$(port b 1)   # its replica (region b)
sentinels="127.0.0.1:$(port a 2),127.0.0.1:$(port b 2),127.0.0.1:$(port w 2)"

# --- shared state ----------------------------------------------------------
od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$dir/master.key"
chmod 600 "$dir/master.key"

echo "regions.sh: data and logs in $dir"
redis durable-a "$durable_a"
redis durable-b "$durable_b" --replicaof 127.0.0.1 "$durable_a"
sentinel sentinel-a "$(port a 2)"
sentinel sentinel-b "$(port b 2)"
sentinel sentinel-witness "$(port w 2)"

# region R: everything of one region.
region() {
  local r="$1"
  local local_redis; local_redis=$(port "$r" 0)
  local durable; durable=$(port "$r" 1)
  local kv; kv=$(port "$r" 30)
  local signer; signer=$(port "$r" 31)
  local ota; ota=$(port "$r" 32)
  redis "redis-$r" "$local_redis" --appendonly no

  # Settings every service of the region shares.
  local common=(
    env -u TRELLIS_CONFIG -u RUST_LOG -u TRELLIS_BIN
    TRELLIS_REGION="$r"
    TRELLIS_DATA_DIR="$dir/data-$r"
    TRELLIS_REDIS__URL="redis://127.0.0.1:$local_redis/"
    TRELLIS_REDIS__DURABLE_URL="redis://127.0.0.1:$durable/"
    TRELLIS_REDIS__SENTINELS="$sentinels"
    TRELLIS_REDIS__SENTINEL_MASTER=mymaster
    # A local rehearsal of regions and failover, not of credentials: the
    # services warn at start that nobody is checked.
    TRELLIS_AUTH__MODE=off
    TRELLIS_TLS__MODE=off
  )

  start "keyvault-$r" "${common[@]}" \
    TRELLIS_KEYVAULT__LISTEN="127.0.0.1:$kv" \
    TRELLIS_KEYVAULT__MASTER_KEY_FILE="$dir/master.key" \
    TRELLIS_TELEMETRY__ADMIN_LISTEN="127.0.0.1:$(port "$r" 50)" \
    "$trellis" keyvault
  wait_ready "$(port "$r" 50)" "keyvault-$r"

  local servers=""
  for n in 1 2; do
    local dev grpc admin
    dev=$(port "$r" $((10 + n)))
    grpc=$(port "$r" $((20 + n)))
    admin=$(port "$r" $((40 + n)))
    start "gateway-$r$n" "${common[@]}" \
      TRELLIS_GATEWAY__ID="$r-gw$n" \
      TRELLIS_GATEWAY__DEVICE_LISTEN="127.0.0.1:$dev" \
      TRELLIS_GATEWAY__GRPC_LISTEN="127.0.0.1:$grpc" \
      TRELLIS_GATEWAY__KEYVAULT_URL="http://127.0.0.1:$kv" \
      TRELLIS_GATEWAY__OTA_URL="http://127.0.0.1:$ota" \
      TRELLIS_GATEWAY__DRAIN_DEADLINE_MS=10000 \
      TRELLIS_TELEMETRY__ADMIN_LISTEN="127.0.0.1:$admin" \
      "$trellis" gateway
    servers+="    server $r-gw$n 127.0.0.1:$dev check port $admin"$'\n'
  done
  wait_ready "$(port "$r" 41)" "gateway-${r}1"
  wait_ready "$(port "$r" 42)" "gateway-${r}2"

  start "signer-$r" "${common[@]}" \
    TRELLIS_SIGNER__LISTEN="127.0.0.1:$signer" \
    TRELLIS_SIGNER__KEYVAULT_URL="http://127.0.0.1:$kv" \
    TRELLIS_TELEMETRY__ADMIN_LISTEN="127.0.0.1:$(port "$r" 51)" \
    "$trellis" signer
  start "ota-$r" "${common[@]}" \
    TRELLIS_OTA__LISTEN="127.0.0.1:$ota" \
    TRELLIS_OTA__GATEWAY_URL="http://127.0.0.1:$(port "$r" 21)" \
    TRELLIS_OTA__SIGNER_URL="http://127.0.0.1:$signer" \
    TRELLIS_TELEMETRY__ADMIN_LISTEN="127.0.0.1:$(port "$r" 52)" \
    "$trellis" ota
  wait_ready "$(port "$r" 51)" "signer-$r"
  wait_ready "$(port "$r" 52)" "ota-$r"

  local tmpl cfg
  tmpl="$(<"$repo/deploy/local/haproxy.cfg.tmpl")"
  cfg="${tmpl//'{{LISTEN}}'/127.0.0.1:$(port "$r" 10)}"
  cfg="${cfg//'{{SERVERS}}'/${servers%$'\n'}}"
  printf '%s\n' "$cfg" >"$dir/haproxy-$r.cfg"
  "$haproxy" -c -q -f "$dir/haproxy-$r.cfg"
  start "haproxy-$r" "$haproxy" -db -f "$dir/haproxy-$r.cfg"
  wait_port "$(port "$r" 10)" "haproxy-$r"
}

# Region a first: its keyvault creates the cloud keys (sealed under the
# shared master key) that region b's keyvault then loads.
region a
region b

region_a_pids=""
for i in "${!pids[@]}"; do
  case "${names[$i]}" in *-a|*-a[12]) region_a_pids+="${pids[$i]} " ;; esac
done
a_lb="127.0.0.1:$(port a 10)"
b_lb="127.0.0.1:$(port b 10)"
cat <<EOF

Two regions are up (every service answered /readyz).

  region  devices (HAProxy)  keyvault          gateway gRPC       signer            ota
  a       $a_lb    127.0.0.1:$(port a 30)   127.0.0.1:$(port a 21)    127.0.0.1:$(port a 31)   127.0.0.1:$(port a 32)
  b       $b_lb    127.0.0.1:$(port b 30)   127.0.0.1:$(port b 21)    127.0.0.1:$(port b 31)   127.0.0.1:$(port b 32)

  durable Redis: primary 127.0.0.1:$durable_a (a), replica 127.0.0.1:$durable_b (b)
  sentinels:     $sentinels (a, b, witness)
  admin ports:   region base + 41/42 (gateways), 50 (keyvault), 51 (signer), 52 (ota)
  logs:          $dir/*.log

Provision devices and run them, preferring region a and failing over to b:

  TRELLIS_KEYVAULT_URL=http://127.0.0.1:$(port a 30) $trellis device provision --product 1 --count 5 --out $dir/keys
  $trellis sim --keys $dir/keys --devices 5 --gateway $a_lb,$b_lb

Lose region a (every process there, the durable primary and sentinel-a
included), then watch the devices move to b and Sentinel (b + witness, a
majority of 3) promote b's replica within a few seconds:

  kill -KILL $region_a_pids
  redis-cli -p $(port b 2) sentinel get-master-addr-by-name mymaster
  TRELLIS_GATEWAY_URL=http://127.0.0.1:$(port b 21) $trellis device list

Process ids: $(for i in "${!pids[@]}"; do printf '%s=%s ' "${names[$i]}" "${pids[$i]}"; done)

Ctrl-C stops everything.
EOF

# In the foreground until Ctrl-C; a child that dies (a failover drill) does
# not stop the others.
while true; do
  wait -n 2>/dev/null || true
  alive=0
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ "$alive" -eq 0 ] && { echo "regions.sh: every process has exited"; exit 1; }
done

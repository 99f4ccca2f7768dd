# Sourced by the checks that drive a whole `trellis up` (ci/particle,
# ci/console, ci/openapi): a work directory removed on exit with whatever
# `trellis up` and a simulator ($up_pid, $sim_pid) the script started, free
# loopback ports for every listener, the settings and CLI URLs that use
# them, and $base, the API's URL. The script starts `trellis up` itself.
work=$(mktemp -d)
up_pid=""
sim_pid=""
cleanup() {
  [ -n "$sim_pid" ] && kill "$sim_pid" 2>/dev/null || true
  if [ -n "$up_pid" ]; then
    kill -TERM "$up_pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$up_pid" 2>/dev/null || break; sleep 0.5; done
  fi
  rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
kv=$(port); gw=$(port); dev=$(port); sg=$(port); ota=$(port); api=$(port); admin=$(port)
export TRELLIS_DATA_DIR="$work/data"
export TRELLIS_KEYVAULT__LISTEN=127.0.0.1:$kv TRELLIS_GATEWAY__GRPC_LISTEN=127.0.0.1:$gw
export TRELLIS_GATEWAY__DEVICE_LISTEN=127.0.0.1:$dev TRELLIS_SIGNER__LISTEN=127.0.0.1:$sg
export TRELLIS_OTA__LISTEN=127.0.0.1:$ota TRELLIS_API__LISTEN=127.0.0.1:$api
export TRELLIS_TELEMETRY__ADMIN_LISTEN=127.0.0.1:$admin
export TRELLIS_KEYVAULT_URL=http://127.0.0.1:$kv TRELLIS_GATEWAY_URL=http://127.0.0.1:$gw
export TRELLIS_SIGNER_URL=http://127.0.0.1:$sg TRELLIS_OTA_URL=http://127.0.0.1:$ota
base=http://127.0.0.1:$api

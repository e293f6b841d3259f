#!/usr/bin/env bash
# Services the test suite needs; sourced by tools/run_tests.sh (also runnable on its own). Idempotent.
#
# Redis: the serve tests start their own redis-server on free loopback ports, so they need the binary. This
# installs it if missing (apt-get) and keeps one server running on a known loopback port for manual runs
# (SDJAX_REDIS_PORT, default 6390), exported as SDJAX_REDIS_URL.

_sdjax_ci_services() {
  local port="${SDJAX_REDIS_PORT:-6390}"
  if ! command -v redis-server >/dev/null 2>&1; then
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    echo "ci_services: installing redis-server" >&2
    $sudo apt-get update -qq >/dev/null \
      && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null \
      || { echo "error: could not install redis-server (apt-get)" >&2; return 1; }
  fi
  if ! redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1; then
    local dir="${TMPDIR:-/tmp}/sdjax-redis-$port"
    mkdir -p "$dir"
    redis-server --port "$port" --bind 127.0.0.1 --daemonize yes --save "" --appendonly no --dir "$dir" \
      --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" >/dev/null
    local i
    for i in $(seq 1 50); do
      redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1 && break
      sleep 0.1
    done
    redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1 \
      || { echo "error: redis-server did not start on 127.0.0.1:$port (see $dir/redis.log)" >&2; return 1; }
  fi
  export SDJAX_REDIS_URL="redis://127.0.0.1:$port/0"
}

_sdjax_ci_services

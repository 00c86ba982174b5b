#!/usr/bin/env bash
# Run the official conformance suite against `tether serve` on a temporary data folder.
# The suite sends no token: the server grants requests without one through
# `--anonymous '*=subscribe,publish'`, which tether accepts only when bound to loopback.
# Usage: tests/durable_streams/conformance/run.sh [--store URL] [vitest args...]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
store=()
if [ "${1:-}" = "--store" ]; then store=(--store "$2"); shift 2; fi
[ -f "$here/node_modules/.package-lock.json" ] || (cd "$here" && npm ci --no-audit --no-fund)
data="$(mktemp -d)"
port="${PORT:-4437}"
TETHER_DS_LONG_POLL="${TETHER_DS_LONG_POLL:-3}" "$root/.venv/bin/tether" serve --host 127.0.0.1 \
    --port "$port" --data "$data" --agent none --log-level warning \
    --anonymous '*=subscribe,publish' "${store[@]}" &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 50); do
    curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
    sleep 0.2
done
cd "$here"
TETHER_DS_URL="http://127.0.0.1:$port" npx vitest run conformance.test.mjs "$@"

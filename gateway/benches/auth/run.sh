#!/usr/bin/env bash
# Authentication benchmark (issue 3). Release build, one gateway (2 workers, embedded SQLite
# unless YIQIAO_DATABASE_URL is set), wrk with 2 threads and 32 connections for SECS seconds
# each, all in one run:
#   1. GET /healthz                            (no authentication: the baseline)
#   2. GET /oauth2/whoami with a Bearer token   (access-token verification, cached directory)
#   3. GET /healthz again                       (baseline drift)
#   4. POST /oauth2/token, fresh ES256 assertion per request
#   5. POST /oauth2/token, fresh SM2SM3 assertion per request
# (token requests: directory read, signature, replay cache, auth_events insert, token signing).
# Prints each wrk summary and a table with the authenticated/unauthenticated ratio.
# Usage: CARGO_TARGET_DIR=... bash gateway/benches/auth/run.sh [SECS]    (needs wrk)
set -euo pipefail
SECS=${1:-10}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
PORT=${PORT:-18080}
BASE=http://127.0.0.1:$PORT
WORK=$(mktemp -d)
PID=
trap '[ -n "$PID" ] && kill $PID 2>/dev/null; rm -rf "$WORK"' EXIT
cargo build --release -q -p yiqiao --bin yiqiao --example bench_assertions --manifest-path "$ROOT/Cargo.toml"
export YIQIAO_ADMIN_TOKEN=bench-admin-token YIQIAO_DATA_DIR=$WORK YIQIAO_PUBLIC_URL=$BASE
export YIQIAO_LOG__LEVEL=warn YIQIAO_HTTP__WORKERS=2
export YIQIAO_AUTH__IP_PER_MINUTE=100000000 YIQIAO_AUTH__IP_BURST=100000000
export YIQIAO_AUTH__INSTITUTION_PER_MINUTE=100000000 YIQIAO_AUTH__INSTITUTION_BURST=100000000
export YIQIAO_RATE_LIMITS__TOKEN_PER_MINUTE=100000000 YIQIAO_RATE_LIMITS__TOKEN_BURST=100000000
export YIQIAO_RATE_LIMITS__INSTITUTION_PER_MINUTE=100000000 YIQIAO_RATE_LIMITS__INSTITUTION_BURST=100000000
"$TARGET/release/yiqiao" serve --listen 127.0.0.1:$PORT &
PID=$!
for _ in $(seq 50); do curl -fs "$BASE/healthz" >/dev/null && break; sleep 0.2; done
"$TARGET/release/examples/bench_assertions" "$WORK" "$BASE/oauth2/token" $((SECS * 4000 + 1))
curl -fs -o /dev/null -H "Authorization: Bearer bench-admin-token" -H "Content-Type: application/json" \
  --data @"$WORK/institution.json" "$BASE/admin/institutions"
TOKEN=$(head -1 "$WORK/es256.txt" | curl -fs -H "Content-Type: application/x-www-form-urlencoded" \
  --data @- "$BASE/oauth2/token" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
tail -n +2 "$WORK/es256.txt" > "$WORK/es256-rest.txt"

run() { # NAME wrk-args...
  local name=$1; shift
  echo "== $name"
  wrk -t2 -c32 -d"${SECS}s" --latency "$@" | tee "$WORK/out" | grep -E 'Requests/sec|^ +(50|99)%|Non-2xx|Socket errors' | sed 's/^/    /'
  local rps p99 bad
  rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/out")
  p99=$(awk '$1 == "99%" {print $2}' "$WORK/out")
  bad=$(awk '/Non-2xx/ {print $NF}' "$WORK/out"); bad=${bad:-0}
  printf '%s|%s|%s|%s\n' "$name" "$rps" "$p99" "$bad" >> "$WORK/table"
}
run "GET /healthz (no authentication)" "$BASE/healthz"
run "GET /oauth2/whoami (Bearer access token)" -H "Authorization: Bearer $TOKEN" "$BASE/oauth2/whoami"
run "GET /healthz (again)" "$BASE/healthz"
run "POST /oauth2/token, ES256 assertions" -s "$HERE/token.lua" "$BASE" -- "$WORK/es256-rest.txt" 2
run "POST /oauth2/token, SM2SM3 assertions" -s "$HERE/token.lua" "$BASE" -- "$WORK/sm2.txt" 2

echo
echo "| route | requests/s | p99 | non-2xx | vs /healthz (first) |"
echo "|---|---|---|---|---|"
base=$(head -1 "$WORK/table" | cut -d'|' -f2)
while IFS='|' read -r name rps p99 bad; do
  printf '| %s | %s | %s | %s | %s |\n' "$name" "$rps" "$p99" "$bad" \
    "$(python3 -c "print(f'{float(\"$rps\")/float(\"$base\"):.3f}')")"
done < "$WORK/table"

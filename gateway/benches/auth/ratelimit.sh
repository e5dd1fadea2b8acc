#!/usr/bin/env bash
# Cost of the API rate-limit check (issue 25). Release build; three gateways from that one
# binary, sharing one data directory (one SQLite database, one audit key) and one public URL, so
# one access token works at all three; each with 2 workers:
#   off     rate_limits.enabled = false: no check (the baseline)
#   memory  the check in process (keyed governor limiters), budgets never reached
#   redis   the check through Redis: one Lua call takes the token's and the institution's cells
# wrk -t2 -c32 for SECS seconds on GET /oauth2/whoami (Bearer token: verification, cached
# directory entry, the check) at each in turn, the three twice over (off memory redis off memory
# redis), all in one run. Prints each wrk summary and a table with each run's ratio to the mean
# of the two "off" runs.
# Usage: CARGO_TARGET_DIR=... bash gateway/benches/auth/ratelimit.sh [SECS]
#        (needs wrk; Redis at $REDIS_URL, default redis://127.0.0.1:6379)
set -euo pipefail
SECS=${1:-10}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
REDIS=${REDIS_URL:-redis://127.0.0.1:6379}
P0=${PORT:-18280}; P1=$((P0 + 1)); P2=$((P0 + 2))
WORK=$(mktemp -d)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"' EXIT
cargo build --release -q -p yiqiao --bin yiqiao --example bench_assertions --manifest-path "$ROOT/Cargo.toml"
BIG=100000000
export YIQIAO_ADMIN_TOKEN=bench-admin-token YIQIAO_DATA_DIR=$WORK YIQIAO_PUBLIC_URL=http://127.0.0.1:$P0
export YIQIAO_LOG__LEVEL=warn YIQIAO_HTTP__WORKERS=2
export YIQIAO_AUTH__IP_PER_MINUTE=$BIG YIQIAO_AUTH__IP_BURST=$BIG
export YIQIAO_RATE_LIMITS__TOKEN_PER_MINUTE=$BIG YIQIAO_RATE_LIMITS__TOKEN_BURST=$BIG
export YIQIAO_RATE_LIMITS__INSTITUTION_PER_MINUTE=$BIG YIQIAO_RATE_LIMITS__INSTITUTION_BURST=$BIG
up() { for _ in $(seq 150); do curl -fs "$1/healthz" >/dev/null && return 0; sleep 0.2; done; echo "no server at $1" >&2; exit 1; }
YIQIAO_RATE_LIMITS__ENABLED=false "$TARGET/release/yiqiao" serve --listen 127.0.0.1:$P0 &
PIDS+=($!); up "http://127.0.0.1:$P0"
"$TARGET/release/yiqiao" serve --listen 127.0.0.1:$P1 &
PIDS+=($!); up "http://127.0.0.1:$P1"
YIQIAO_REDIS_URL=$REDIS YIQIAO_REDIS__KEY_PREFIX="yqbench:$$:" "$TARGET/release/yiqiao" serve --listen 127.0.0.1:$P2 &
PIDS+=($!); up "http://127.0.0.1:$P2"

"$TARGET/release/examples/bench_assertions" "$WORK" "http://127.0.0.1:$P0/oauth2/token" 1
curl -fs -o /dev/null -H "Authorization: Bearer bench-admin-token" -H "Content-Type: application/json" \
  --data @"$WORK/institution.json" "http://127.0.0.1:$P0/admin/institutions"
TOKEN=$(head -1 "$WORK/es256.txt" | curl -fs -H "Content-Type: application/x-www-form-urlencoded" \
  --data @- "http://127.0.0.1:$P0/oauth2/token" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
for p in $P0 $P1 $P2; do # the token works everywhere (and warms each directory cache)
  curl -fs -o /dev/null -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$p/oauth2/whoami"
done

run() { # NAME PORT
  echo "== $1"
  wrk -t2 -c32 -d"${SECS}s" --latency -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$2/oauth2/whoami" \
    | tee "$WORK/out" | grep -E 'Requests/sec|^ +(50|99)%|Non-2xx|Socket errors' | sed 's/^/    /'
  local rps p50 p99 bad
  rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/out")
  p50=$(awk '$1 == "50%" {print $2}' "$WORK/out")
  p99=$(awk '$1 == "99%" {print $2}' "$WORK/out")
  bad=$(awk '/Non-2xx/ {print $NF}' "$WORK/out"); bad=${bad:-0}
  printf '%s|%s|%s|%s|%s\n' "$1" "$rps" "$p50" "$p99" "$bad" >> "$WORK/table"
}
echo "wrk -t2 -c32 -d${SECS}s, GET /oauth2/whoami, $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
for round in 1 2; do
  run "off (no check), round $round" "$P0"
  run "memory (in-process check), round $round" "$P1"
  run "redis (check in Redis), round $round" "$P2"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

echo
echo "| run | requests/s | p50 | p99 | non-2xx | throughput vs off (mean) |"
echo "|---|---|---|---|---|---|"
base=$(awk -F'|' '$1 ~ /^off/ {s += $2; n++} END {print s / n}' "$WORK/table")
while IFS='|' read -r name rps p50 p99 bad; do
  printf '| %s | %s | %s | %s | %s | %s |\n' "$name" "$rps" "$p50" "$p99" "$bad" \
    "$(python3 -c "print(f'{float(\"$rps\")/float(\"$base\"):.3f}')")"
done < "$WORK/table"

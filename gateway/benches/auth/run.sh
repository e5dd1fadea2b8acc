#!/usr/bin/env bash
# Authentication benchmark (issue 3). Release build, one gateway (2 workers, SQLite unless
# YIQIAO_DATABASE_URL is set), wrk with 2 threads and 32 connections for SECS seconds each:
#   1. GET /healthz                          (no authentication)
#   2. GET /oauth2/whoami with a Bearer token (access-token verification + cached directory)
#   3. POST /oauth2/token with fresh ES256 assertions (signature, replay cache, audit insert)
# Usage: CARGO_TARGET_DIR=... bash gateway/benches/auth/run.sh [SECS]
set -euo pipefail
SECS=${1:-10}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
PORT=${PORT:-18080}
BASE=http://127.0.0.1:$PORT
WORK=$(mktemp -d)
trap 'kill $PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
cargo build --release -p yiqiao --bin yiqiao --manifest-path "$ROOT/Cargo.toml"
export YIQIAO_ADMIN_TOKEN=bench-admin-token YIQIAO_DATA_DIR=$WORK YIQIAO_PUBLIC_URL=$BASE
export YIQIAO_LOG__LEVEL=warn YIQIAO_HTTP__WORKERS=2
export YIQIAO_AUTH__IP_PER_MINUTE=100000000 YIQIAO_AUTH__IP_BURST=100000000
export YIQIAO_AUTH__INSTITUTION_PER_MINUTE=100000000 YIQIAO_AUTH__INSTITUTION_BURST=100000000
"$TARGET/release/yiqiao" serve --listen 127.0.0.1:$PORT &
PID=$!
for _ in $(seq 50); do curl -fs "$BASE/healthz" >/dev/null && break; sleep 0.2; done
python3 "$HERE/make_assertions.py" "$WORK" "$BASE/oauth2/token" $((SECS * 3000 + 1))
python3 - "$WORK/jwk.json" > "$WORK/inst.json" <<'PY'
import json, sys
print(json.dumps({"id": "hosp-bench", "name": "Bench Hospital", "uscc": "91350100M000009998",
  "region_code": "350100", "level": "3A", "kind": "hospital",
  "patient_id_system": "urn:oid:2.16.156.10011.1.99.999",
  "allowed_scopes": ["system/Patient.rs"], "jwks": {"keys": [json.load(open(sys.argv[1]))]}}))
PY
curl -fs -o /dev/null -H "Authorization: Bearer bench-admin-token" -H "Content-Type: application/json" \
  --data @"$WORK/inst.json" "$BASE/admin/institutions"
TOKEN=$(head -1 "$WORK/assertions.txt" | curl -fs -H "Content-Type: application/x-www-form-urlencoded" \
  --data @- "$BASE/oauth2/token" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
tail -n +2 "$WORK/assertions.txt" > "$WORK/rest.txt"
echo "== unauthenticated GET /healthz"
wrk -t2 -c32 -d"${SECS}s" --latency "$BASE/healthz"
echo "== authenticated GET /oauth2/whoami"
wrk -t2 -c32 -d"${SECS}s" --latency -H "Authorization: Bearer $TOKEN" "$BASE/oauth2/whoami"
echo "== POST /oauth2/token (fresh ES256 assertion per request)"
wrk -t2 -c32 -d"${SECS}s" --latency -s "$HERE/token.lua" "$BASE" -- "$WORK/rest.txt" 2

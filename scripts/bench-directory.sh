#!/usr/bin/env bash
# Load benchmark of an institution read (GET /fhir/Organization/{id}) on SQLite and PostgreSQL,
# next to a bare actix-web route measured in the same run. Needs wrk (apt-get install wrk).
#
#   scripts/bench-directory.sh [SECONDS] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"; conns="${2:-32}"
pg_admin="${YIQIAO_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
cargo build --release -q -p yiqiao --bin yiqiao --example bare_actix
bin=target/release/yiqiao
# One wrk address reads the public directory: lift its per-address budget (issue 25).
export YIQIAO_RATE_LIMITS__DIRECTORY_PER_MINUTE=100000000 YIQIAO_RATE_LIMITS__DIRECTORY_BURST=100000000
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
dbname="yq_bench_$$"
psql -q "$pg_admin" -c "DROP DATABASE IF EXISTS $dbname" -c "CREATE DATABASE $dbname"
pg_url="${pg_admin%/*}/$dbname"

register() { # URL
  YIQIAO_DATABASE_URL="$1" "$bin" institution add --id hosp-001 --name "第一人民医院" \
    --uscc 91350100M000100Y43 --region-code 350100 --level 3A \
    --endpoint-url https://his.example/fhir --patient-id-system urn:oid:2.16.156.10011.1.99.1 \
    --scope system/Patient.rs >/dev/null
}
wait_up() { for _ in $(seq 1 100); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "server at $1 did not start" >&2; exit 1; }
run() { # NAME URL
  printf '%s\n' "--- $1"
  wrk -t2 -c"$conns" -d"${secs}s" --latency "$2" | grep -E 'Requests/sec|^ +(50|99)%|Non-2xx|Socket errors' | sed 's/^/    /'
}

target/release/examples/bare_actix 127.0.0.1:18090 & wait_up http://127.0.0.1:18090/fhir/Organization/hosp-001
register "sqlite://$work/y.db"
YIQIAO_DATA_DIR="$work" YIQIAO_DATABASE_URL="sqlite://$work/y.db" YIQIAO_LOG__LEVEL=warn "$bin" serve --listen 127.0.0.1:18091 & wait_up http://127.0.0.1:18091/fhir/Organization/hosp-001
register "$pg_url"
YIQIAO_DATA_DIR="$work" YIQIAO_DATABASE_URL="$pg_url" YIQIAO_LOG__LEVEL=warn "$bin" serve --listen 127.0.0.1:18092 & wait_up http://127.0.0.1:18092/fhir/Organization/hosp-001

echo "wrk -t2 -c$conns -d${secs}s, GET /fhir/Organization/hosp-001, $(nproc) cores"
run "bare actix-web route (baseline)" http://127.0.0.1:18090/fhir/Organization/hosp-001
run "gateway, SQLite" http://127.0.0.1:18091/fhir/Organization/hosp-001
run "gateway, PostgreSQL" http://127.0.0.1:18092/fhir/Organization/hosp-001
run "bare actix-web route (baseline, again)" http://127.0.0.1:18090/fhir/Organization/hosp-001
psql -q "$pg_admin" -c "DROP DATABASE IF EXISTS $dbname WITH (FORCE)" || true

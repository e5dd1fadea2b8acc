#!/usr/bin/env bash
# Audit trail benchmarks (issue 6), all in one run so the ratios compare like with like:
#  1. sustained durable audit events/s through the group-commit Auditor, PostgreSQL and SQLite,
#     and verify speed (gateway/examples/audit_bench.rs);
#  2. overhead of auditing on reads against the real server (wrk): the same directory read
#     recorded without waiting (GET /fhir/Organization/hosp-001: public, its record is not
#     awaited since issue 25) and unaudited (GET /admin/institutions/hosp-001, the admin read
#     runs the same query but records nothing), and a PDQm search (GET /fhir/Patient?family=…,
#     audited, the answer waits for its durable record). There is no switch to turn auditing
#     off, so the unaudited admin read is the baseline.
#
#   scripts/bench-audit.sh [SECONDS] [CONNECTIONS] [BENCH_CONCURRENCY]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"; conns="${2:-32}"; conc="${3:-2000}"
pg_admin="${YIQIAO_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
target="${CARGO_TARGET_DIR:-target}"
cargo build --release -q -p yiqiao --bin yiqiao --example audit_bench
bin="$target/release/yiqiao"
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
token=bench-admin-token-0123456789
new_pg() { # NAME → URL
  psql -q "$pg_admin" -c "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1" >&2
  echo "${pg_admin%/*}/$1"
}

echo "=== 1. audit events/s (${secs}s, concurrency $conc), then verify"
"$target/release/examples/audit_bench" "$(new_pg yq_audit_bench_$$)" "$secs" "$conc"
"$target/release/examples/audit_bench" "sqlite://$work/bench.db" "$secs" "$conc"

wait_up() { for _ in $(seq 1 100); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "server at $1 did not start" >&2; exit 1; }
run() { # NAME URL [wrk args]
  local name=$1 url=$2; shift 2
  printf '%s\n' "--- $name"
  wrk -t2 -c"$conns" -d"${secs}s" --latency "$@" "$url" | grep -E 'Requests/sec|^ +(50|99)%|Non-2xx|Socket errors' | sed 's/^/    /'
}
server() { # PORT DB_URL
  YIQIAO_DATA_DIR="$work" YIQIAO_DATABASE_URL="$2" YIQIAO_ADMIN_TOKEN="$token" \
    YIQIAO_RATE_LIMITS__DIRECTORY_PER_MINUTE=100000000 YIQIAO_RATE_LIMITS__DIRECTORY_BURST=100000000 \
    YIQIAO_LOG__LEVEL=warn "$bin" serve --listen "127.0.0.1:$1" &
  wait_up "http://127.0.0.1:$1/healthz"
  curl -fs -o /dev/null -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
    -d '{"id":"hosp-001","name":"第一人民医院","uscc":"91350100M000100Y43","region_code":"350100","level":"3A","kind":"hospital","endpoint_url":"https://his.example/fhir","patient_id_system":"urn:oid:2.16.156.10011.1.99.1","allowed_scopes":["system/Patient.cruds"]}' \
    "http://127.0.0.1:$1/admin/institutions"
  for i in $(seq 1 50); do
    curl -fs -o /dev/null -H "Authorization: Bearer $token" -H 'X-On-Behalf-Of: hosp-001' \
      -H 'Content-Type: application/fhir+json' \
      -d "{\"resourceType\":\"Patient\",\"identifier\":[{\"system\":\"urn:oid:2.16.156.10011.1.99.1\",\"value\":\"MR-$i\"}],\"name\":[{\"family\":\"王\",\"given\":[\"芳$i\"]}],\"gender\":\"female\",\"birthDate\":\"1975-06-01\"}" \
      "http://127.0.0.1:$1/fhir/Patient"
  done
}
reads() { # PORT LABEL
  local base="http://127.0.0.1:$1"
  run "$2: unaudited admin read (baseline)" "$base/admin/institutions/hosp-001" -H "Authorization: Bearer $token"
  run "$2: public FHIR read, same query, record not awaited" "$base/fhir/Organization/hosp-001"
  run "$2: audited PDQm search family=王 (50 hits, _count=10)" "$base/fhir/Patient?family=%E7%8E%8B&_count=10" -H "Authorization: Bearer $token" -H 'X-On-Behalf-Of: hosp-001'
  run "$2: unaudited admin read (baseline, again)" "$base/admin/institutions/hosp-001" -H "Authorization: Bearer $token"
}

echo "=== 2. wrk -t2 -c$conns -d${secs}s, $(nproc) cores"
server 18191 "$(new_pg yq_audit_http_$$)"
reads 18191 "PostgreSQL"
server 18192 "sqlite://$work/http.db"
reads 18192 "SQLite"
psql -q "$pg_admin" -c "DROP DATABASE IF EXISTS yq_audit_bench_$$ WITH (FORCE)" -c "DROP DATABASE IF EXISTS yq_audit_http_$$ WITH (FORCE)" || true

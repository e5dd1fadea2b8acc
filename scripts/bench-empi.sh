#!/usr/bin/env bash
# EMPI store benchmark on SQLite and PostgreSQL (BENCHMARKS.md, "EMPI store"):
#   1. bulk import of a synthetic population with `yiqiao mpi import` (records/s, peak RSS);
#   2. `POST /fhir/Patient/$match` through the real server against the loaded store (wrk,
#      one connection: per-request latency p50/p99), beside GET /healthz and an institution
#      read measured in the same run as baselines; server RSS after the run.
#
#   scripts/bench-empi.sh [RECORDS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
records="${1:-100000}"; secs="${2:-20}"
pg_admin="${YIQIAO_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
if [ -z "${BENCH_NO_BUILD:-}" ]; then # set to reuse the release binaries already built
  cargo build --release -q -p yiqiao --bin yiqiao
  cargo build --release -q -p yiqiao-registry --example empi_synth_ndjson
fi
target="${CARGO_TARGET_DIR:-target}"
bin="$target/release/yiqiao"
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
dbname="yq_bench_empi_$$"
psql -q "$pg_admin" -c "DROP DATABASE IF EXISTS $dbname" -c "CREATE DATABASE $dbname"
pg_url="${pg_admin%/*}/$dbname"
system="urn:oid:2.16.156.10011.1.99.1"

"$target/release/examples/empi_synth_ndjson" "$records" 1 "$system" "$work/p.ndjson" "$work/match.ndjson" 200

# wrk script: POST the $match bodies in turn, on behalf of hosp-001.
cat >"$work/match.lua" <<LUA
bodies = {}
for line in io.lines("$work/match.ndjson") do bodies[#bodies + 1] = line end
i = 0
request = function()
  i = i % #bodies + 1
  return wrk.format("POST", "/fhir/Patient/\$match",
    { ["Content-Type"] = "application/fhir+json", ["Authorization"] = "Bearer bench-admin",
      ["X-On-Behalf-Of"] = "hosp-001" }, bodies[i])
end
LUA

wait_up() { for _ in $(seq 1 200); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "server at $1 did not start" >&2; exit 1; }
load() { # NAME URL [wrk args]
  local name=$1 url=$2; shift 2
  printf '%s\n' "--- $name"
  wrk -t1 -c1 -d"${secs}s" --latency "$@" "$url" | grep -E 'Requests/sec|^ +(50|90|99)%|Non-2xx|Socket errors' | sed 's/^/    /'
}

bench() { # NAME URL PORT
  local name=$1 url=$2 port=$3
  echo "=== $name: $records records"
  YIQIAO_DATABASE_URL="$url" "$bin" institution add --id hosp-001 --name "第一人民医院" \
    --uscc 91350100M000100Y43 --region-code 350100 --level 3A \
    --endpoint-url https://his.example/fhir --patient-id-system "$system" \
    --scope system/Patient.rs >/dev/null
  YIQIAO_DATABASE_URL="$url" /usr/bin/time -f "    import peak RSS %M KiB, %e s wall, %U s user" \
    "$bin" mpi import "$work/p.ndjson" --institution hosp-001 --format ndjson --batch 1000 \
    --no-progress --checkpoint "$work/$name.cp" --rejects "$work/$name.rejects.csv" | sed 's/^/    /'
  YIQIAO_DATA_DIR="$work" YIQIAO_DATABASE_URL="$url" YIQIAO_ADMIN_TOKEN=bench-admin \
    YIQIAO_LOG__LEVEL=warn YIQIAO_AUTH__IP_PER_MINUTE=100000000 YIQIAO_AUTH__IP_BURST=100000 \
    YIQIAO_RATE_LIMITS__DIRECTORY_PER_MINUTE=100000000 YIQIAO_RATE_LIMITS__DIRECTORY_BURST=100000000 \
    "$bin" serve --listen "127.0.0.1:$port" &
  local pid=$!
  wait_up "http://127.0.0.1:$port/healthz"
  load "GET /healthz (baseline)" "http://127.0.0.1:$port/healthz"
  load "GET /fhir/Organization/hosp-001 (baseline)" "http://127.0.0.1:$port/fhir/Organization/hosp-001"
  load "POST /fhir/Patient/\$match" "http://127.0.0.1:$port/fhir/Patient/\$match" -s "$work/match.lua"
  echo "    server RSS after the run: $(awk '/VmRSS/ {print $2, $3}' /proc/$pid/status)"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

bench sqlite "sqlite://$work/y.db" 18191
bench postgres "$pg_url" 18192
psql -q "$pg_admin" -c "DROP DATABASE IF EXISTS $dbname WITH (FORCE)" || true

#!/usr/bin/env bash
# Federated-query load benchmark (issue 7), release build, everything on this machine:
#   - `yiqiao sim`: 300 simulated hospitals on one port, each person at 5–20 of them,
#     endpoint latency uniform 5–50 ms, every answer SM-sealed and signed;
#   - `yiqiao serve` on SQLite with the region registered (directory + EMPI);
#   - gateway/examples/federation_load.rs: federated GETs over the five types in rotation.
# Reports the gateway's time over the slowest endpoint of each request (client latency minus
# the gateway's `Server-Timing: upstream`), p50/p99, unloaded (1 in flight) and at
# CONCURRENCY in flight with throughput, errors and the gateway's RSS; then the SM primitives
# beside `openssl speed` in the same run.
#
#   scripts/bench-federation.sh [REQUESTS] [CONCURRENCY] [PERSONS]
#   (SKIP_PRIMITIVES=1: no SM part; BENCH_GATEWAY_BIN=PATH / BENCH_LOAD_BIN=PATH: another build
#   of the gateway / of the load generator, for an A/B; BENCH_SIM_BIN=PATH: the build that runs
#   the simulated hospitals (default: the gateway's), so that both sides of an A/B face the
#   same hospitals; LOAD_DUMP=FILE: every answer's latency,
#   size and stages appended to FILE as JSON lines, to see what the tail is made of;
#   BENCH_DATABASE_URL=postgres://…/EMPTY_DB: the gateway on PostgreSQL instead of SQLite;
#   GATEWAY_LOG=FILE: the gateway's log kept there; UNLOADED=N: unloaded requests, default
#   1500 — a p99 over 300 is the 3rd-worst answer and swings by ±1 ms between runs here)
set -euo pipefail
cd "$(dirname "$0")/.."
requests="${1:-4000}"; conc="${2:-200}"; persons="${3:-100}"; unloaded="${UNLOADED:-1500}"
tgt="${CARGO_TARGET_DIR:-target}"
cargo build --release -q -p yiqiao --bin yiqiao --example federation_load
bin="${BENCH_GATEWAY_BIN:-$tgt/release/yiqiao}"; load="${BENCH_LOAD_BIN:-$tgt/release/examples/federation_load}"
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
export YIQIAO_DATA_DIR="$work" YIQIAO_DATABASE_URL="${BENCH_DATABASE_URL:-sqlite://$work/y.db}" \
  YIQIAO_ADMIN_TOKEN=bench-admin-token YIQIAO_LOG__LEVEL=warn \
  YIQIAO_DATABASE__POOL_SIZE=32 YIQIAO_FEDERATION__MAX_CONCURRENCY=8192 \
  YIQIAO_FEDERATION__MAX_CONCURRENCY_PER_ENDPOINT=256 YIQIAO_FEDERATION__POOL_MAX_IDLE_PER_HOST=512 \
  YIQIAO_FEDERATION__ENDPOINT_TIMEOUT_MS=10000 YIQIAO_FEDERATION__OVERALL_TIMEOUT_MS=15000 \
  YIQIAO_OUTBOUND__ALLOW_HTTP=true YIQIAO_OUTBOUND__ALLOW_CIDRS='["127.0.0.0/8"]'
# (the simulated hospitals listen on plain HTTP at 127.0.0.1, refused by the default policy)
wait_up() { for _ in $(seq 1 600); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done; echo "nothing at $1" >&2; exit 1; }

"${BENCH_SIM_BIN:-$bin}" sim --institutions 300 --patients "$persons" --min-sites 5 --max-sites 20 \
  --latency-min-ms 5 --latency-max-ms 50 --listen 127.0.0.1:18190 --workers 2 \
  --register --persons-out "$work/persons.json" 2>"$work/sim.log" &
wait_up http://127.0.0.1:18190/_sim/stats
"$bin" serve --listen 127.0.0.1:18191 2>"$work/gateway.log" &
gw=$!
wait_up http://127.0.0.1:18191/readyz
echo "machine: $(nproc) cores; 300 simulated hospitals, $persons persons at 5–20 each, latency 5–50 ms"
grep registered "$work/sim.log" || true
run() { "$load" http://127.0.0.1:18191 bench-admin-token fz-004 "$work/persons.json" "$1" "$2"; }
echo "--- warm-up (20 in flight, 200 requests)"; run 20 200 >/dev/null
echo "--- unloaded: 1 in flight, $unloaded requests"; run 1 "$unloaded"
echo "--- loaded: $conc in flight, $requests requests"; run "$conc" "$requests"
echo "--- gateway memory after the load: $(grep -E 'VmRSS|VmHWM' /proc/$gw/status | tr -s ' \t' ' ' | tr '\n' ' ')"
kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true
if [ -n "${GATEWAY_LOG:-}" ]; then cp "$work/gateway.log" "$GATEWAY_LOG"; fi

[ "${SKIP_PRIMITIVES:-0}" = 1 ] && exit 0
echo "--- SM primitives, ours (criterion) then OpenSSL, same run"
cargo bench -q -p yiqiao-sm --bench sm -- --noplot 'sm4_gcm_1MiB|sm2/' 2>/dev/null \
  | grep -E '^(sm4_gcm|sm2)|time:|thrpt:' || true
bash sm/benches/openssl-speed.sh 3

#!/usr/bin/env bash
# The service layer's cost (issue 24): PDQm through two builds of the gateway, same run, same
# data. Each build serves `yiqiao demo` (8 institutions: the simulated region registered in the
# EMPI) on a fresh SQLite database of its own; a member token of fz-004 (purpose TREAT, asked
# explicitly so that a build from before the default purpose takes it too); then wrk
# (2 threads, CONNS connections, SECONDS s) on a PDQm search by family and birth date (5 patients),
# the builds interleaved ROUNDS times. Prints requests/s and latency per round and the ratio of
# the medians (new/old). The federation side of the A/B is scripts/bench-federation.sh with
# BENCH_GATEWAY_BIN.
#
#   scripts/bench-service-layer.sh OLD_BIN NEW_BIN [ROUNDS] [SECONDS] [CONNS]
set -euo pipefail
cd "$(dirname "$0")/.."
old="$1"; new="$2"; rounds="${3:-3}"; secs="${4:-10}"; conns="${5:-16}"
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
start() { # name bin port [VAR=VALUE ...]
  mkdir -p "$work/$1"
  env "${@:4}" YIQIAO_DATA_DIR="$work/$1" YIQIAO_LISTEN="127.0.0.1:$3" YIQIAO_ADMIN_TOKEN=bench \
    YIQIAO_PUBLIC_URL="http://127.0.0.1:$3" YIQIAO_LOG__LEVEL=warn \
    "$2" demo --institutions 8 >"$work/$1.log" 2>&1 &
  for _ in $(seq 1 600); do curl -fs "http://127.0.0.1:$3/readyz" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "$1 did not start: $(tail -5 "$work/$1.log")" >&2; exit 1
}
token() { # name port
  python3 - "$work/$1/demo/keys/fz-004.sm2.pem" "http://127.0.0.1:$2" <<'PY'
import sys, os
sys.path.insert(0, os.path.join(os.getcwd(), "scripts", "harness"))
import requests
from attacks import assertion, ASSERTION_TYPE
key, base = sys.argv[1], sys.argv[2]
r = requests.post(base + "/oauth2/token", data={
    "grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
    "client_assertion": assertion(key, "fz-004", base + "/oauth2/token"),
    "scope": "system/Patient.rs", "purpose_of_use": "TREAT"}, timeout=30)
r.raise_for_status()
print(r.json()["access_token"])
PY
}
# The new build's API rate limits (issue 25, not the service layer) are off: one token at wrk's
# rate is far over them. The old build has none.
start old "$old" 18301; start new "$new" 18302 YIQIAO_RATE_LIMITS__ENABLED=false
path='/fhir/Patient?family=%E7%8E%8B&birthdate=1945-04-12'
tok_old=$(token old 18301); tok_new=$(token new 18302)
for n in old new; do
  port=$([ $n = old ] && echo 18301 || echo 18302); tok=$([ $n = old ] && echo "$tok_old" || echo "$tok_new")
  probe=$(curl -s -o "$work/$n.probe" -w '%{http_code} %{size_download}' -H "Authorization: Bearer $tok" "http://127.0.0.1:$port$path")
  echo "$n: $probe bytes, $(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1])).get("entry", [])), "patients")' "$work/$n.probe")"
  # A benchmark of refusals measures nothing: both builds must answer the search.
  [ "${probe%% *}" = 200 ] || { echo "$n answers ${probe%% *}: $(head -c 400 "$work/$n.probe")" >&2; exit 1; }
done
echo "machine: $(nproc) cores; wrk -t2 -c$conns -d${secs}s, $rounds rounds interleaved"
: >"$work/rates"
for r in $(seq 1 "$rounds"); do
  for n in old new; do
    port=$([ $n = old ] && echo 18301 || echo 18302); tok=$([ $n = old ] && echo "$tok_old" || echo "$tok_new")
    # Tokens live 5 minutes: a fresh one per round.
    tok=$(token $n $port)
    out=$(wrk -t2 -c"$conns" -d"${secs}s" --latency -H "Authorization: Bearer $tok" "http://127.0.0.1:$port$path")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1=="50%" {print $2}' <<<"$out"); p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    non2xx=$(awk '/Non-2xx/ {print $5}' <<<"$out")
    echo "round $r $n: $rps requests/s, p50 $p50, p99 $p99, non-2xx ${non2xx:-0}"
    echo "$n $rps" >>"$work/rates"
  done
done
python3 - "$work/rates" <<'PY'
import sys, statistics
rates = {}
for line in open(sys.argv[1]):
    n, r = line.split(); rates.setdefault(n, []).append(float(r))
o, n = statistics.median(rates["old"]), statistics.median(rates["new"])
print(f"median requests/s: old {o:.0f}, new {n:.0f}; new/old = {n / o:.3f}")
PY

#!/usr/bin/env bash
# The attack, fuzz and fault harness (issue 25): two gateway replicas on PostgreSQL and Redis
# behind HAProxy with the simulated region, then named scenarios (scripts/harness/harness.py).
#
#   scripts/harness.sh            full run: release build, attack matrix, schemathesis (50
#                                 examples per operation), 60 s per fuzz target
#   scripts/harness.sh --ci       the CI-sized variant (.ci/run): debug build, attack matrix,
#                                 schemathesis (8 examples per operation, at most 150 s);
#                                 add fuzzing with --scenarios attacks,schemathesis,fuzz
#   scripts/harness.sh --scenarios attacks      (any of attacks,schemathesis,fuzz)
#
# Installs what it needs (Debian haproxy, PyPI packages of scripts/harness/requirements.txt,
# cargo-fuzz from crates.io; libFuzzer needs the nightly toolchain the machine has). Results:
# target/harness/result.json and result.md. Exits non-zero on any leak, 5xx or crash.
set -euo pipefail
cd "$(dirname "$0")/.."
export YIQIAO_TEST_DATABASE_URL="${YIQIAO_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
export YIQIAO_TEST_REDIS_URL="${YIQIAO_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
ci=0
for a in "$@"; do [ "$a" = "--ci" ] && ci=1; done

if ! command -v haproxy >/dev/null 2>&1; then
  echo "== installing haproxy (Debian)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy
fi
python3 -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt -r scripts/harness/requirements.txt
if [[ " $* " == *fuzz* || "$ci" = 0 ]] && ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz (crates.io)"
  cargo install cargo-fuzz --locked
fi
if [ "$ci" = 1 ]; then
  # In .ci/run the test run has just built target/debug/yiqiao (with the test build's feature
  # set: building it again here with `cargo build` would recompile dependencies for minutes).
  [ -x target/debug/yiqiao ] || cargo build --locked -p yiqiao --bin yiqiao
  binary=target/debug/yiqiao
else
  cargo build --locked --release -p yiqiao --bin yiqiao
  binary=target/release/yiqiao
fi
exec python3 scripts/harness/harness.py --binary "$binary" "$@"

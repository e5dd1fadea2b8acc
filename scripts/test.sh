#!/usr/bin/env bash
# Run Yiqiao's whole test suite on a fresh machine.
#
# Installs what the tests need (Python packages for the interop tests, OpenSSL's CLI, the npm
# oidc-provider for the login tests, Debian's chromium and npm playwright-core for the audit
# console's browser tests), makes sure
# PostgreSQL and Redis are running (starting them if they are down), then runs every test on both
# storage backends. Fails loudly — never skips — when a service cannot be reached.
#
#   YIQIAO_TEST_DATABASE_URL  PostgreSQL for tests (default postgres://postgres@127.0.0.1:5432/test);
#                             each test creates and drops a database of its own there.
#   YIQIAO_TEST_REDIS_URL     Redis for tests (default redis://127.0.0.1:6379).
set -euo pipefail
cd "$(dirname "$0")/.."

export YIQIAO_TEST_DATABASE_URL="${YIQIAO_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
export YIQIAO_TEST_REDIS_URL="${YIQIAO_TEST_REDIS_URL:-redis://127.0.0.1:6379}"

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

say "installing the OpenID Connect provider for the login tests (tests/oidc, npm ci)"
command -v node >/dev/null 2>&1 || { echo "FATAL: Node.js (node, npm) is required for the login tests" >&2; exit 1; }
npm ci --prefix tests/oidc --no-audit --no-fund --loglevel=error

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

say "running the tests (SQLite and PostgreSQL)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole run (cargo prints one result line per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "\nsummary: %d passed, %d failed\n", p, f }' "$log"
exit "$status"

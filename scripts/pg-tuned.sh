#!/usr/bin/env bash
# A throw-away local PostgreSQL cluster with deploy/postgres/yiqiao.conf, for benchmarks that
# compare the production settings with the machine's default-configured server.
#   scripts/pg-tuned.sh start [PORT] [DIR]   # prints the connection URL
#   scripts/pg-tuned.sh stop  [PORT] [DIR]
# Default port 5433, directory /tmp/yiqiao-pg-tuned. Runs as the `postgres` OS user when
# started as root (initdb refuses root).
set -euo pipefail
cd "$(dirname "$0")/.."
cmd="${1:?start|stop}"; port="${2:-5433}"; dir="${3:-/tmp/yiqiao-pg-tuned}"
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$bin/initdb" ] || { echo "no PostgreSQL server binaries under /usr/lib/postgresql" >&2; exit 1; }
conf="$(pwd)/deploy/postgres/yiqiao.conf"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
case "$cmd" in
  start)
    if [ ! -f "$dir/PG_VERSION" ]; then
      mkdir -p "$dir"; [ "$(id -u)" = 0 ] && chown postgres: "$dir"
      as_pg "$bin/initdb" -D "$dir" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >/dev/null
      cp "$conf" "$dir/yiqiao.conf"
      printf "include 'yiqiao.conf'\nlisten_addresses = '127.0.0.1'\nport = %s\nunix_socket_directories = '%s'\n" \
        "$port" "$dir" >> "$dir/postgresql.conf"
    fi
    as_pg "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w start >/dev/null
    echo "postgres://postgres@127.0.0.1:$port/postgres"
    ;;
  stop) as_pg "$bin/pg_ctl" -D "$dir" -m fast -w stop >/dev/null ;;
  *) echo "usage: $0 start|stop [PORT] [DIR]" >&2; exit 2 ;;
esac

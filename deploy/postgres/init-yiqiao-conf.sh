#!/bin/sh
# Run once by the postgres image's entrypoint after initdb (docker-entrypoint-initdb.d): make
# the cluster read Yiqiao's settings (mounted at /etc/postgresql/yiqiao.conf). The entrypoint
# restarts the server after its init scripts, so they apply from the first real start.
set -eu
grep -q "include_if_exists '/etc/postgresql/yiqiao.conf'" "$PGDATA/postgresql.conf" ||
  echo "include_if_exists '/etc/postgresql/yiqiao.conf'" >> "$PGDATA/postgresql.conf"

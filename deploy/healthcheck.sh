#!/bin/bash
# yiqiao-healthcheck [PATH] - HTTP GET http://127.0.0.1:<port><PATH> without curl or wget.
#
# Used by the container image's HEALTHCHECK (debian:bookworm-slim has bash but no HTTP client).
# It opens a TCP connection with bash's /dev/tcp, sends one HTTP/1.1 request and succeeds only
# on a "200" status line. It does not depend on the yiqiao binary.
#
#   PATH defaults to /healthz (liveness); use /readyz for readiness (database + Redis).
#   Port: YIQIAO_HEALTHCHECK_PORT, else the port of YIQIAO_LISTEN, else 8080.
#   Host: YIQIAO_HEALTHCHECK_HOST, else 127.0.0.1 (fine for YIQIAO_LISTEN=0.0.0.0:PORT; set it
#         when the gateway listens on one specific address or on IPv6 only).
# Exit status: 0 healthy, 1 unhealthy (as Docker expects).
set -u

path="${1:-/healthz}"
listen="${YIQIAO_LISTEN:-127.0.0.1:8080}"
port="${YIQIAO_HEALTHCHECK_PORT:-${listen##*:}}"
host="${YIQIAO_HEALTHCHECK_HOST:-127.0.0.1}"
timeout_s="${YIQIAO_HEALTHCHECK_TIMEOUT:-4}"

case "$port" in
    '' | *[!0-9]*) echo "yiqiao-healthcheck: cannot derive a port from '$listen'" >&2; exit 1 ;;
esac

if ! { exec 3<>"/dev/tcp/${host}/${port}"; } 2>/dev/null; then
    echo "yiqiao-healthcheck: cannot connect to ${host}:${port}" >&2
    exit 1
fi
printf 'GET %s HTTP/1.1\r\nHost: %s:%s\r\nUser-Agent: yiqiao-healthcheck\r\nConnection: close\r\n\r\n' \
    "$path" "$host" "$port" >&3

status=''
if ! IFS= read -r -t "$timeout_s" status <&3; then
    echo "yiqiao-healthcheck: no response from ${host}:${port}${path}" >&2
    exit 1
fi
exec 3<&-
status="${status%$'\r'}"

case "$status" in
    'HTTP/1.'[01]' 200'*) exit 0 ;;
    *) echo "yiqiao-healthcheck: ${path}: ${status:-empty status line}" >&2; exit 1 ;;
esac

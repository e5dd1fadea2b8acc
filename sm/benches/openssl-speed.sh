#!/usr/bin/env bash
# OpenSSL's own figures for the SM primitives, to set beside `cargo bench -p yiqiao-sm --bench sm`.
# Usage: sm/benches/openssl-speed.sh [seconds]   (default 3). Single process, like criterion.
set -euo pipefail
secs="${1:-3}"
openssl version
echo "== sm4-ctr (EVP)"
openssl speed -seconds "$secs" -bytes 16384 -evp sm4-ctr 2>/dev/null | tail -n 2
if openssl list -cipher-algorithms 2>/dev/null | grep -qi 'sm4-gcm'; then
  echo "== sm4-gcm (EVP)"
  openssl speed -seconds "$secs" -bytes 16384 -evp sm4-gcm 2>/dev/null | tail -n 2
else
  echo "== sm4-gcm: not offered by this OpenSSL build"
fi
echo "== sm3"
openssl speed -seconds "$secs" -bytes 16384 -evp sm3 2>/dev/null | tail -n 2
echo "== sm2 sign/verify"
openssl speed -seconds "$secs" sm2 2>/dev/null | tail -n 3

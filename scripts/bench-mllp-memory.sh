#!/usr/bin/env bash
# Memory of the gateway under MLLP frames of ~500,000 empty PID fields (issue 25): the RSS of the
# server process (VmRSS, and the peak VmHWM) before, after one such frame, after four sent at
# once on four connections, and after ROUNDS more rounds of four; each frame's ACK code and time.
# Then ROUNDS rounds of four messages just inside the default structure limits (9,551 values in
# 39 segments), which are parsed whole: the most one accepted message may cost.
#
#   scripts/bench-mllp-memory.sh [BINARY] [ROUNDS]
#
# BINARY defaults to a release build of this tree (built first). Python's hl7 package is the
# peer (python3 -m pip install -r tests/requirements.txt). SQLite, one institution.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-}"
rounds="${2:-3}"
if [ -z "$bin" ]; then
  cargo build --release -q -p yiqiao --bin yiqiao
  bin=target/release/yiqiao
fi
port=18575
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
db="sqlite://$work/y.db"
cat > "$work/yiqiao.toml" <<EOF
[mllp]
enabled = true
listen = "127.0.0.1:$port"
allow = [{ address = "127.0.0.1", institution = "hosp-001" }]
EOF
YIQIAO_DATABASE_URL="$db" "$bin" institution add --id hosp-001 --name "第一人民医院" \
  --uscc 91350100M000100Y43 --region-code 350100 --level 3A \
  --endpoint-url https://his.example/fhir --patient-id-system urn:oid:2.16.156.10011.1.99.1 \
  --scope system/Patient.rs >/dev/null
YIQIAO_DATA_DIR="$work" YIQIAO_DATABASE_URL="$db" YIQIAO_LOG__LEVEL=warn \
  "$bin" --config "$work/yiqiao.toml" serve --listen 127.0.0.1:18576 &
server=$!
for _ in $(seq 1 100); do curl -fs http://127.0.0.1:18576/healthz >/dev/null 2>&1 && break; sleep 0.1; done

rss() { # LABEL
  awk -v l="$1" '/^VmRSS/ {r=$2} /^VmHWM/ {h=$2} END {printf "%-34s VmRSS %6.0f MB   VmHWM %6.0f MB\n", l, r/1024, h/1024}' "/proc/$server/status"
}
send() { # CONNECTIONS [wide|limits]
  python3 - "$port" "$1" "${2:-wide}" <<'PY'
import sys, threading, time
import hl7.client
port, n, kind = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
msh = "MSH|^~\\&|HIS|hosp-001|YIQIAO|YIQIAO|20261129120000||ADT^A08^ADT_A01|w{}|P|2.5\r"
if kind == "wide":
    wide = "PID" + "|" * 500_000
else:  # 38 segments of 250 fields + MSH: inside max_values 10,000 and max_fields 256
    wide = "\r".join(["PID" + "|" * 250] + ["NTE" + "|" * 250] * 37)
out = [None] * n
def one(i):
    start = time.monotonic()
    with hl7.client.MLLPClient("127.0.0.1", port) as c:
        data = c.send_message(msh.format(i) + wide)
        while not data.endswith(b"\x1c\r"):
            data += c.socket.recv(65536)
    ack = data.decode().split("\r")[1].split("|")
    out[i] = f"{ack[1]} {time.monotonic() - start:.2f}s"
threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join()
print("    frames of %d bytes, ACKs: %s" % (len(msh) + len(wide), ", ".join(out)))
PY
}

echo "$("$bin" --version 2>/dev/null || echo "$bin"), $(nproc) cores"
sleep 1; rss "idle"
send 1; sleep 1; rss "after 1 frame"
send 4; sleep 1; rss "after 4 frames at once"
for r in $(seq 1 "$rounds"); do send 4; done; sleep 1; rss "after $rounds more rounds of 4"
for r in $(seq 1 "$rounds"); do send 4 limits; done; sleep 1; rss "after $rounds rounds of 4 at the limits"

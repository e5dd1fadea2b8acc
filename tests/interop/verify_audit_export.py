#!/usr/bin/env python3
"""Independent offline verifier of a Yiqiao audit export (docs/audit.md), written from the
documentation, not from the Rust code. Needs only the gateway's SM2 public key (PEM).

    python3 verify_audit_export.py BUNDLE.json --public-key gateway-audit.pub.pem

Exit 0 when the bundle verifies; exit 1 printing "FAILED at position N: KIND: detail" for the
first broken position otherwise. SM2/SM3 from PyPI gmssl (tests/requirements.txt).
"""

import argparse
import json
import sys

from smcommon import InteropError, load_public_key, sig_der_to_raw, sm2_verify_raw, sm3

GENESIS = "0" * 64


def chain_hash(prev_hash, resource):
    return sm3(b"yiqiao-audit-v1\n" + prev_hash.encode() + b"\n" + resource.encode("utf-8")).hex()


def verify_sig(pub_hex, message, sig_hex):
    try:
        raw = sig_der_to_raw(bytes.fromhex(sig_hex))
    except (InteropError, ValueError):
        return False
    return sm2_verify_raw(pub_hex, message, raw)


def key_id(pub_hex):
    return sm3(bytes.fromhex("04" + pub_hex)).hex()[:16]


def check(bundle, pub_hex):
    """Returns a list of (position, kind, detail)."""
    if not verify_sig(pub_hex, bundle["manifest"].encode("utf-8"), bundle["manifest_signature"]):
        return [(0, "bad-manifest", "manifest signature does not verify")]
    m = json.loads(bundle["manifest"])
    if m["format"] != "yiqiao-audit-export-v1":
        return [(0, "bad-manifest", "unknown format")]
    problems = []
    records = bundle["records"]
    hashes = {r["hash"]: i for i, r in enumerate(records)}
    expected_seq = m["from"]
    for i, r in enumerate(records):
        seq = r["seq"]
        if seq > expected_seq:
            problems.append((expected_seq, "deleted", f"records {expected_seq}..{seq - 1} missing"))
            break
        if seq < expected_seq:
            problems.append((seq, "reordered", f"position {seq} after {expected_seq - 1}"))
            break
        expected_seq = seq + 1
        if chain_hash(r["prev_hash"], r["resource"]) != r["hash"]:
            problems.append((seq, "modified", "content does not match the hash"))
            break
        link = m["anchor_prev_hash"] if i == 0 else records[i - 1]["hash"]
        if r["prev_hash"] != link:
            j = hashes.get(r["prev_hash"])
            if j is not None and j > i:
                problems.append((seq, "reordered", "links to a later record"))
            elif j is not None and j + 1 < i:
                problems.append((records[j + 1]["seq"], "inserted", "record(s) not linked into the chain"))
            else:
                problems.append((seq, "deleted", "the record it links to is missing"))
            break
    last = records[-1] if records else None
    if last is not None and last["seq"] == m["to"] and last["hash"] != m["last_hash"] and not problems:
        problems.append((last["seq"], "modified", "last hash differs from the manifest"))
    if last is None or last["seq"] < m["to"]:
        end = last["seq"] if last else m["from"] - 1
        problems.append((end + 1, "truncated", f"manifest vouches for records up to {m['to']}"))
    if not problems and len(records) != m["count"]:
        problems.append((m["to"], "bad-manifest", "record count differs from the manifest"))
    by_seq = {r["seq"]: r["hash"] for r in records}
    want = key_id(pub_hex)
    for cp in bundle["checkpoints"]:
        msg = "yiqiao-audit-checkpoint-v1\n%d\n%s\n%s\n%s\n" % (
            cp["seq"], cp["head_hash"], cp["signed_at"], cp["key_id"])
        if cp["key_id"] != want or not verify_sig(pub_hex, msg.encode(), cp["signature"]):
            problems.append((cp["seq"], "bad-checkpoint-signature", "checkpoint does not verify"))
        elif cp["seq"] in by_seq and by_seq[cp["seq"]] != cp["head_hash"]:
            problems.append((cp["seq"], "checkpoint-mismatch", "chain rewritten before this checkpoint"))
    if len(bundle["checkpoints"]) != m["checkpoints"]:
        problems.append((m["to"], "bad-checkpoint-signature", "checkpoint count differs from the manifest"))
    return sorted(problems)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--public-key", required=True)
    args = ap.parse_args()
    pub_hex = load_public_key(args.public_key)
    with open(args.bundle, encoding="utf-8") as f:
        bundle = json.load(f)
    problems = check(bundle, pub_hex)
    if problems:
        pos, kind, detail = problems[0]
        print(f"FAILED at position {pos}: {kind}: {detail}", file=sys.stderr)
        return 1
    print(f"OK: {len(bundle['records'])} records, {len(bundle['checkpoints'])} checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())

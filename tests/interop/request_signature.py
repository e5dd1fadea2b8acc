#!/usr/bin/env python3
"""Independent Python check of the gateway's request signatures (docs/hospital-contract.md,
"Verifying the gateway"): what a hospital runs on every request it receives.

    request_signature.py verify --gateway-pub GW.pub.pem --method GET --target '/fhir/Patient?x=1' \
        --timestamp 1765000000 --requester yiqiao-gateway --request-id ID --signature B64 \
        [--body FILE] [--now UNIX_SECONDS] [--max-skew 300]
    request_signature.py sign --key GW.pem --method GET --target '/fhir/Patient?x=1' \
        --timestamp 1765000000 --requester yiqiao-gateway --request-id ID [--body FILE]
    request_signature.py canonical --method GET ... (prints the canonical string)

`verify` prints the canonical string and exits 0, or exits 1 with the failed check's name
(Malformed, ClockSkew, BadSignature) on stderr. Written from the contract, not from the Rust
code: SM3 and SM2 arithmetic come from PyPI `gmssl`, DER and base64 are done here.
"""

import argparse
import base64
import binascii
import sys
import time

import smcommon as sm

VERSION = "yiqiao-request-v1"


def canonical(args):
    body = open(args.body, "rb").read() if args.body else b""
    fields = [VERSION, args.method.upper(), args.target, str(args.timestamp), args.requester,
              args.request_id, sm.sm3(body).hex()]
    for f in fields:
        if not f or any(ord(c) < 0x20 or ord(c) == 0x7F for c in f):
            raise sm.InteropError("Malformed")
    return "\n".join(fields)


def verify(args):
    now = int(time.time()) if args.now is None else args.now
    if abs(args.timestamp - now) > args.max_skew:
        raise sm.InteropError("ClockSkew")
    try:
        der = base64.b64decode(args.signature, validate=True)
    except (binascii.Error, ValueError):
        raise sm.InteropError("Malformed")
    raw = sm.sig_der_to_raw(der)
    text = canonical(args)
    if not sm.sm2_verify_raw(sm.load_public_key(args.gateway_pub), text.encode("utf-8"), raw):
        raise sm.InteropError("BadSignature")
    print(text)


def sign(args):
    private_hex, public_hex = sm.load_private_key(args.key)
    raw = sm.sm2_sign_raw(private_hex, public_hex, canonical(args).encode("utf-8"))
    print(base64.b64encode(sm.sig_raw_to_der(raw)).decode())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ["verify", "sign", "canonical"]:
        c = sub.add_parser(name)
        c.add_argument("--method", required=True)
        c.add_argument("--target", required=True)
        c.add_argument("--timestamp", type=int, required=True)
        c.add_argument("--requester", required=True)
        c.add_argument("--request-id", required=True)
        c.add_argument("--body")
        if name == "verify":
            c.add_argument("--gateway-pub", required=True)
            c.add_argument("--signature", required=True)
            c.add_argument("--now", type=int)
            c.add_argument("--max-skew", type=int, default=300)
        if name == "sign":
            c.add_argument("--key", required=True)
    args = p.parse_args()
    sm.run_command({"verify": verify, "sign": sign,
                    "canonical": lambda a: print(canonical(a))}, args)


if __name__ == "__main__":
    main()

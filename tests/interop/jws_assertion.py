#!/usr/bin/env python3
"""SM2 JWS client assertions (docs/sm2-jws.md), independent of the Rust crate.

    jws_assertion.py sign --key client.pem --iss H330100 --aud https://gw/token \
        [--kid k1] [--signer gmssl|openssl]          # prints a compact JWS
    jws_assertion.py verify --pub client.pub.pem < token   # prints the claims JSON

`--signer openssl` signs with `openssl pkeyutl -sign -rawin -digest sm3
-pkeyopt distid:1234567812345678` and converts the DER signature to raw r||s;
`gmssl` (the default) signs with PyPI gmssl's SM2.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

import smcommon as sm


def sign(args):
    header = {"alg": "SM2SM3", "typ": "JWT"}
    if args.kid:
        header["kid"] = args.kid
    now = int(time.time())
    claims = {"iss": args.iss, "sub": args.iss, "aud": args.aud, "iat": now,
              "exp": now + 300, "jti": str(uuid.uuid4())}
    signing_input = (sm.b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                     + sm.b64url(json.dumps(claims, separators=(",", ":")).encode()))
    if args.signer == "openssl":
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "input")
            open(path, "wb").write(signing_input.encode())
            der = subprocess.run(
                ["openssl", "pkeyutl", "-sign", "-rawin", "-digest", "sm3", "-inkey", args.key,
                 "-pkeyopt", "distid:1234567812345678", "-in", path],
                check=True, capture_output=True).stdout
        raw = sm.sig_der_to_raw(der)
    else:
        private_hex, public_hex = sm.load_private_key(args.key)
        raw = sm.sm2_sign_raw(private_hex, public_hex, signing_input.encode())
    print(signing_input + "." + sm.b64url(raw))


def verify(args):
    token = sys.stdin.read().strip()
    parts = token.split(".")
    if len(parts) != 3:
        raise sm.InteropError("Malformed")
    header = json.loads(sm.b64url_decode(parts[0]))
    if header.get("alg") != "SM2SM3" or "crit" in header:
        raise sm.InteropError("UnsupportedAlg")
    message = (parts[0] + "." + parts[1]).encode()
    if not sm.sm2_verify_raw(sm.load_public_key(args.pub), message, sm.b64url_decode(parts[2])):
        raise sm.InteropError("BadSignature")
    print(json.dumps(json.loads(sm.b64url_decode(parts[1]))))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sign")
    s.add_argument("--key", required=True)
    s.add_argument("--iss", required=True)
    s.add_argument("--aud", required=True)
    s.add_argument("--kid")
    s.add_argument("--signer", choices=["gmssl", "openssl"], default="gmssl")
    v = sub.add_parser("verify")
    v.add_argument("--pub", required=True)
    sm.run_command({"sign": sign, "verify": verify}, parser.parse_args())


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark helper: an ES256 key for institution hosp-bench and N client assertions.

    make_assertions.py OUTDIR AUD N
writes OUTDIR/jwk.json (public JWK, kid bench) and OUTDIR/assertions.txt (one form body per line).
"""
import base64, json, sys, time, uuid
from urllib.parse import urlencode
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


out, aud, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
key = ec.generate_private_key(ec.SECP256R1())
nums = key.public_key().public_numbers()
jwk = {"kty": "EC", "crv": "P-256", "kid": "bench",
       "x": b64(nums.x.to_bytes(32, "big")), "y": b64(nums.y.to_bytes(32, "big"))}
json.dump(jwk, open(f"{out}/jwk.json", "w"))
header = b64(json.dumps({"alg": "ES256", "kid": "bench", "typ": "JWT"}).encode())
now = int(time.time())
with open(f"{out}/assertions.txt", "w") as f:
    for _ in range(n):
        claims = {"iss": "hosp-bench", "sub": "hosp-bench", "aud": aud, "iat": now,
                  "exp": now + 290, "jti": str(uuid.uuid4())}
        signing_input = header + "." + b64(json.dumps(claims).encode())
        r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        token = signing_input + "." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
        f.write(urlencode({
            "grant_type": "client_credentials",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": token, "scope": "system/Patient.rs",
            "purpose_of_use": "TREAT"}) + "\n")

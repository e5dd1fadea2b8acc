#!/usr/bin/env python3
"""Independent Python implementation of the Yiqiao SM envelope (docs/sm-envelope.md).

    envelope.py seal --recipient-pub R.pub.pem --recipient-key-id KID --sender-key S.pem \
        --sender-id SID --method GET --path '/fhir/Patient?x=1' --requester-id RID \
        --request-id NONCE --content-type application/fhir+json --in payload.bin > env.json
    envelope.py open --recipient-key R.pem --sender-pub S.pub.pem --method GET \
        --path '/fhir/Patient?x=1' --requester-id RID --request-id NONCE \
        [--max-skew 300] --in env.json --out payload.bin   # prints the content type

`open` exits 1 and prints the failed check's name (BadSignature, Expired, ClockSkew,
BindingMismatch, KeyUnwrap, TagMismatch, Malformed:<field>, Unsupported:<field>) on stderr.
"""

import argparse
import base64
import binascii
import datetime
import json
import secrets
import sys

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import smcommon as sm

FIELDS = ["version", "enc_alg", "key_wrap_alg", "sig_alg", "sender_id", "recipient_key_id",
          "timestamp", "request_binding", "content_type", "wrapped_key", "nonce",
          "ciphertext", "signature"]
TS_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def binding_hex(method, path, requester_id, request_id):
    canonical = (sm.lp("yiqiao-sm-binding-v1") + sm.lp(method.upper()) + sm.lp(path)
                 + sm.lp(requester_id) + sm.lp(request_id))
    return sm.sm3(canonical).hex()


def canonical_header(env, wrapped_key, nonce):
    out = sm.lp("yiqiao-sm-envelope-v1") + sm.lp(str(env["version"]))
    for name in ["enc_alg", "key_wrap_alg", "sig_alg", "sender_id", "recipient_key_id",
                 "timestamp", "request_binding", "content_type"]:
        out += sm.lp(env[name])
    return out + sm.lp(wrapped_key) + sm.lp(nonce)


def seal(args):
    recipient_pub = sm.load_public_key(args.recipient_pub)
    sender_priv, sender_pub = sm.load_private_key(args.sender_key)
    payload = open(args.infile, "rb").read()
    key, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    wrapped = sm.sm2_encrypt_der(recipient_pub, key)
    now = args.timestamp or datetime.datetime.now(datetime.timezone.utc).strftime(TS_FORMAT)
    env = {
        "version": 1, "enc_alg": "SM4-GCM", "key_wrap_alg": "SM2-GMT0009-DER",
        "sig_alg": "SM2-SM3", "sender_id": args.sender_id,
        "recipient_key_id": args.recipient_key_id, "timestamp": now,
        "request_binding": binding_hex(args.method, args.path, args.requester_id, args.request_id),
        "content_type": args.content_type,
        "wrapped_key": base64.b64encode(wrapped).decode(),
        "nonce": base64.b64encode(nonce).decode(),
    }
    aad = canonical_header(env, wrapped, nonce)
    enc = Cipher(algorithms.SM4(key), modes.GCM(nonce)).encryptor()
    enc.authenticate_additional_data(aad)
    ciphertext = enc.update(payload) + enc.finalize() + enc.tag
    env["ciphertext"] = base64.b64encode(ciphertext).decode()
    raw = sm.sm2_sign_raw(sender_priv, sender_pub, aad + sm.lp(ciphertext))
    env["signature"] = base64.b64encode(sm.sig_raw_to_der(raw)).decode()
    json.dump(env, sys.stdout)


def b64field(env, name, limit):
    text = env[name]
    if not isinstance(text, str) or len(text) > (limit + 2) // 3 * 4:
        raise sm.InteropError(f"Malformed:{name}")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise sm.InteropError(f"Malformed:{name}")


def open_envelope(args):
    sender_pub = sm.load_public_key(args.sender_pub)
    recipient_priv, _ = sm.load_private_key(args.recipient_key)
    env = json.loads(open(args.infile, "rb").read())
    if sorted(env) != sorted(FIELDS):
        raise sm.InteropError("Malformed:json")
    for name, value in [("version", 1), ("enc_alg", "SM4-GCM"),
                        ("key_wrap_alg", "SM2-GMT0009-DER"), ("sig_alg", "SM2-SM3")]:
        if env[name] != value:
            raise sm.InteropError(f"Unsupported:{name}")
    try:
        ts = datetime.datetime.strptime(env["timestamp"], TS_FORMAT).replace(
            tzinfo=datetime.timezone.utc)
    except ValueError:
        raise sm.InteropError("Malformed:timestamp")
    if ts.strftime(TS_FORMAT) != env["timestamp"]:
        raise sm.InteropError("Malformed:timestamp")
    wrapped = b64field(env, "wrapped_key", 256)
    nonce = b64field(env, "nonce", 12)
    if len(nonce) != 12:
        raise sm.InteropError("Malformed:nonce")
    ciphertext = b64field(env, "ciphertext", 8 * 1024 * 1024 + 16)
    if len(ciphertext) < 16:
        raise sm.InteropError("Malformed:ciphertext")
    raw_sig = sm.sig_der_to_raw(b64field(env, "signature", 72))

    aad = canonical_header(env, wrapped, nonce)
    if not sm.sm2_verify_raw(sender_pub, aad + sm.lp(ciphertext), raw_sig):
        raise sm.InteropError("BadSignature")
    age = (datetime.datetime.now(datetime.timezone.utc) - ts).total_seconds()
    if age > args.max_skew:
        raise sm.InteropError("Expired")
    if -age > args.max_skew:
        raise sm.InteropError("ClockSkew")
    if env["request_binding"] != binding_hex(args.method, args.path, args.requester_id,
                                             args.request_id):
        raise sm.InteropError("BindingMismatch")
    key = sm.sm2_decrypt_der(recipient_priv, wrapped)
    if len(key) != 16:
        raise sm.InteropError("KeyUnwrap")
    dec = Cipher(algorithms.SM4(key), modes.GCM(nonce, ciphertext[-16:])).decryptor()
    dec.authenticate_additional_data(aad)
    try:
        payload = dec.update(ciphertext[:-16]) + dec.finalize()
    except InvalidTag:
        raise sm.InteropError("TagMismatch")
    open(args.outfile, "wb").write(payload)
    print(env["content_type"])


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ["seal", "open"]:
        p = sub.add_parser(name)
        for flag in ["--method", "--path", "--requester-id", "--request-id", "--in"]:
            p.add_argument(flag, required=True, dest=flag[2:].replace("-", "_") if flag != "--in" else "infile")
    s = sub.choices["seal"]
    for flag in ["--recipient-pub", "--recipient-key-id", "--sender-key", "--sender-id",
                 "--content-type"]:
        s.add_argument(flag, required=True)
    s.add_argument("--timestamp", help="override (tests): YYYY-MM-DDTHH:MM:SSZ")
    o = sub.choices["open"]
    for flag in ["--recipient-key", "--sender-pub"]:
        o.add_argument(flag, required=True)
    o.add_argument("--out", required=True, dest="outfile")
    o.add_argument("--max-skew", type=int, default=300)
    sm.run_command({"seal": seal, "open": open_envelope}, parser.parse_args())


if __name__ == "__main__":
    main()

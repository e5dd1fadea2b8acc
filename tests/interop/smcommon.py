"""SM2/SM3/SM4 helpers for the interop scripts, written independently of the Rust crate.

SM2 arithmetic and SM3 come from PyPI `gmssl`; SM4-GCM from `cryptography`; DER, PEM and
the canonical encodings are written here by hand from docs/sm-envelope.md and
docs/sm2-jws.md. Known `gmssl` 3.2.2 pitfalls worked around here:
- CryptSM2 strips "04" from public keys with `lstrip`, which can eat digits of x:
  we set `public_key` after construction;
- `func.random_hex` uses `random`, not a CSPRNG: we pick k with `secrets`;
- `decrypt` never checks C3: we do SM2 decryption ourselves and check C3;
- `verify` does not range-check r and s: we do.
"""

import base64
import secrets
import struct

from gmssl import sm2 as gm_sm2
from gmssl import sm3 as gm_sm3

SIGNER_ID = b"1234567812345678"
N = int(gm_sm2.default_ecc_table["n"], 16)
SM2_CURVE_OID = bytes.fromhex("06082a811ccf5501822d")  # 1.2.156.10197.1.301


class InteropError(Exception):
    """Raised with the name of the check that failed (matches the Rust error variants)."""


# ---- DER ---------------------------------------------------------------------------

def der_read(buf, pos=0):
    """Returns (tag, content, next_pos) of the TLV at pos (definite lengths only)."""
    if pos + 2 > len(buf):
        raise InteropError("Malformed")
    tag, length = buf[pos], buf[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4:
            raise InteropError("Malformed")
        length = int.from_bytes(buf[pos:pos + n], "big")
        pos += n
    if pos + length > len(buf):
        raise InteropError("Malformed")
    return tag, buf[pos:pos + length], pos + length


def der_children(content):
    out, pos = [], 0
    while pos < len(content):
        tag, value, pos = der_read(content, pos)
        out.append((tag, value))
    return out


def der_tlv(tag, content):
    n = len(content)
    if n < 0x80:
        head = bytes([tag, n])
    else:
        size = n.to_bytes((n.bit_length() + 7) // 8, "big")
        head = bytes([tag, 0x80 | len(size)]) + size
    return head + content


def der_int(value):
    body = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
    if body[0] & 0x80:
        body = b"\x00" + body
    return der_tlv(0x02, body)


def der_uint(content):
    if not content or content[0] & 0x80:
        raise InteropError("Malformed")
    return int.from_bytes(content, "big")


# ---- keys --------------------------------------------------------------------------

def pem_to_der(text, label):
    lines = [l.strip() for l in text.strip().splitlines()]
    if lines[0] != f"-----BEGIN {label}-----" or lines[-1] != f"-----END {label}-----":
        raise InteropError(f"not a {label} PEM")
    return base64.b64decode("".join(lines[1:-1]), validate=True)


def load_private_key(path):
    """PKCS#8 PEM → (d as 64 hex chars, public x||y as 128 hex chars)."""
    der = pem_to_der(open(path).read(), "PRIVATE KEY")
    _, info, _ = der_read(der)
    version, alg, key = der_children(info)[:3]
    if version != (0x02, b"\x00") or SM2_CURVE_OID not in alg[1]:
        raise InteropError("not an SM2 PKCS#8 key")
    _, ec_key, _ = der_read(key[1])
    fields = der_children(ec_key)
    d = int.from_bytes(fields[1][1], "big")
    return "%064x" % d, scalar_mult(d, gm_sm2.default_ecc_table["g"])


def load_public_key(path):
    """SPKI PEM → public x||y as 128 hex chars."""
    der = pem_to_der(open(path).read(), "PUBLIC KEY")
    _, spki, _ = der_read(der)
    alg, bits = der_children(spki)[:2]
    if SM2_CURVE_OID not in alg[1] or bits[1][:2] != b"\x00\x04" or len(bits[1]) != 66:
        raise InteropError("not an uncompressed SM2 SPKI key")
    return bits[1][2:].hex()


def _crypt(private_hex="", public_hex=""):
    c = gm_sm2.CryptSM2(private_key=private_hex, public_key="")
    c.public_key = public_hex  # never through the constructor's lstrip("04")
    return c


def scalar_mult(k, point_hex):
    out = _crypt()._kg(k, point_hex)
    if out is None:
        raise InteropError("point at infinity")
    return out


def on_curve(point_hex):
    p = int(gm_sm2.default_ecc_table["p"], 16)
    a = int(gm_sm2.default_ecc_table["a"], 16)
    b = int(gm_sm2.default_ecc_table["b"], 16)
    x, y = int(point_hex[:64], 16), int(point_hex[64:], 16)
    return x < p and y < p and (y * y - x * x * x - a * x - b) % p == 0


# ---- SM3 ---------------------------------------------------------------------------

def sm3(data):
    return bytes.fromhex(gm_sm3.sm3_hash(list(data)))


def _kdf(xy_hex, length):
    return bytes.fromhex(gm_sm3.sm3_kdf(xy_hex.encode(), length))


# ---- SM2 signatures (SM3, signer ID 1234567812345678) ------------------------------

def sm2_sign_raw(private_hex, public_hex, message):
    """Returns raw r||s (64 bytes)."""
    c = _crypt(private_hex, public_hex)
    while True:
        k = secrets.randbelow(N - 1) + 1
        sig = c.sign_with_sm3(message, "%064x" % k)
        if sig is not None:
            return bytes.fromhex(sig)


def sm2_verify_raw(public_hex, message, raw):
    if len(raw) != 64:
        return False
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    if not (0 < r < N and 0 < s < N):
        return False
    return bool(_crypt("", public_hex).verify_with_sm3(raw.hex(), message))


def sig_raw_to_der(raw):
    return der_tlv(0x30, der_int(int.from_bytes(raw[:32], "big")) + der_int(int.from_bytes(raw[32:], "big")))


def sig_der_to_raw(der):
    tag, body, end = der_read(der)
    items = der_children(body)
    if tag != 0x30 or end != len(der) or len(items) != 2 or any(t != 0x02 for t, _ in items):
        raise InteropError("Malformed")
    r, s = der_uint(items[0][1]), der_uint(items[1][1])
    if r >= 2**256 or s >= 2**256:
        raise InteropError("Malformed")
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


# ---- SM2 encryption, GM/T 0009 DER ciphertext --------------------------------------

def sm2_encrypt_der(public_hex, message):
    """SEQUENCE { x INTEGER, y INTEGER, hash OCTET STRING (C3), ciphertext OCTET STRING (C2) }."""
    while True:
        k = secrets.randbelow(N - 1) + 1
        c1 = scalar_mult(k, gm_sm2.default_ecc_table["g"])
        xy = scalar_mult(k, public_hex)
        t = _kdf(xy, len(message))
        if any(t):
            break
    c2 = bytes(a ^ b for a, b in zip(message, t))
    c3 = sm3(bytes.fromhex(xy[:64]) + message + bytes.fromhex(xy[64:]))
    body = der_int(int(c1[:64], 16)) + der_int(int(c1[64:], 16)) + der_tlv(0x04, c3) + der_tlv(0x04, c2)
    return der_tlv(0x30, body)


def sm2_decrypt_der(private_hex, der):
    tag, body, end = der_read(der)
    items = der_children(body)
    if tag != 0x30 or end != len(der) or [t for t, _ in items] != [0x02, 0x02, 0x04, 0x04]:
        raise InteropError("KeyUnwrap")
    c1 = "%064x%064x" % (der_uint(items[0][1]), der_uint(items[1][1]))
    c3, c2 = items[2][1], items[3][1]
    if not on_curve(c1):
        raise InteropError("KeyUnwrap")
    xy = scalar_mult(int(private_hex, 16), c1)
    t = _kdf(xy, len(c2))
    if not any(t):
        raise InteropError("KeyUnwrap")
    message = bytes(a ^ b for a, b in zip(c2, t))
    if sm3(bytes.fromhex(xy[:64]) + message + bytes.fromhex(xy[64:])) != c3:
        raise InteropError("KeyUnwrap")
    return message


# ---- encodings ---------------------------------------------------------------------

def lp(data):
    """4-byte big-endian length, then the bytes."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return struct.pack(">I", len(data)) + data


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text):
    if "=" in text:
        raise InteropError("Malformed")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def run_command(handlers, args):
    """Calls handlers[args.command](args); an InteropError exits 1 with its name on stderr."""
    import sys

    try:
        handlers[args.command](args)
    except InteropError as e:
        print(e, file=sys.stderr)
        sys.exit(1)

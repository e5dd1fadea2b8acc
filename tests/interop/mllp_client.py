#!/usr/bin/env python3
"""An independent HL7 v2 peer for the MLLP tests: python-hl7's MLLPClient.

Usage: mllp_client.py HOST PORT [--source ADDRESS] [--tls CA [CERT KEY]] < messages.json

stdin: a JSON list of HL7 messages (strings, segments separated by "\\r"). Each is sent in
its own MLLP block over one connection, in order; stdout: a JSON list with one object per
message: {"raw": the ACK, "code": MSA-1, "control_id": MSA-2, "text": MSA-3,
"err_location": ERR-2, "err_code": ERR-3.1, "ack_type": MSH-9}. When the server refuses the
connection or closes it before an ACK, the list ends with {"closed": why} instead.

--source binds the client's end to ADDRESS (e.g. 127.0.0.2) before connecting; --tls speaks
MLLP over TLS, trusting the server certificate issued by CA and presenting CERT/KEY (PEM files).
"""
import argparse
import json
import socket
import ssl
import sys

import hl7
import hl7.client


class Closed(Exception):
    """The server closed the connection (or refused it) before the ACK."""


class Client(hl7.client.MLLPClient):
    """MLLPClient with a chosen source address and, optionally, TLS."""

    def __init__(self, host, port, source=None, tls=None):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if source:
            sock.bind((source, 0))
        sock.connect((host, port))
        if tls:
            context = ssl.create_default_context(cafile=tls[0])
            if len(tls) > 1:
                context.load_cert_chain(tls[1], tls[2])
            sock = context.wrap_socket(sock, server_hostname=host)
        self.socket = sock
        self.encoding = "utf-8"


def read_ack(client, first):
    """MLLPClient.send returns the first recv(); read on until the end of the block."""
    data = first
    while not data.endswith(hl7.client.EB + hl7.client.CR):
        more = client.socket.recv(65536)
        if not more:
            raise Closed("the server closed the connection before the ACK was complete")
        data += more
    return data.decode("utf-8")


def field(msg, segment, n, component=None):
    try:
        seg = msg.segment(segment)
    except KeyError:
        return None
    if n >= len(seg):
        return None
    value = seg[n]
    if component is not None:
        try:
            return str(value[0][component - 1])
        except (IndexError, TypeError):
            return str(value) if component == 1 else None
    return str(value)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--source")
    parser.add_argument("--tls", nargs="+", metavar="PEM")
    args = parser.parse_args()
    messages = json.load(sys.stdin)
    out = []
    try:
        with Client(args.host, args.port, args.source, args.tls) as client:
            for text in messages:
                raw = read_ack(client, client.send_message(text))
                body = raw.strip("\x0b\x1c\r")
                ack = hl7.parse(body)
                out.append({
                    "raw": body,
                    "ack_type": field(ack, "MSH", 9),
                    "code": field(ack, "MSA", 1),
                    "control_id": field(ack, "MSA", 2),
                    "text": ack.unescape(field(ack, "MSA", 3) or ""),
                    "err_location": field(ack, "ERR", 2),
                    "err_code": field(ack, "ERR", 3, 1),
                })
    except (Closed, OSError) as e:  # ssl.SSLError and ConnectionResetError are OSErrors
        out.append({"closed": str(e) or type(e).__name__})
    json.dump(out, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()

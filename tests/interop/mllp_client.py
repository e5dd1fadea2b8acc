#!/usr/bin/env python3
"""An independent HL7 v2 peer for the MLLP tests: python-hl7's MLLPClient.

Usage: mllp_client.py HOST PORT < messages.json

stdin: a JSON list of HL7 messages (strings, segments separated by "\\r"). Each is sent in
its own MLLP block over one connection, in order; stdout: a JSON list with one object per
message: {"raw": the ACK, "code": MSA-1, "control_id": MSA-2, "text": MSA-3,
"err_location": ERR-2, "err_code": ERR-3.1, "ack_type": MSH-9}.
"""
import json
import sys

import hl7
import hl7.client


def read_ack(client, first):
    """MLLPClient.send returns the first recv(); read on until the end of the block."""
    data = first
    while not data.endswith(hl7.client.EB + hl7.client.CR):
        more = client.socket.recv(65536)
        if not more:
            raise SystemExit("the server closed the connection before the ACK was complete")
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
    host, port = sys.argv[1], int(sys.argv[2])
    messages = json.load(sys.stdin)
    out = []
    with hl7.client.MLLPClient(host, port) as client:
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
    json.dump(out, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The benchmark's real packets, for BPF_PROG_TEST_RUN (bench/stages.py).

    packets.py --capture     capture them (root: the namespace node of `make bench`,
                             nginx as there, one wrk connection) into packets.json

packets.json holds one request segment (wrk -> nginx) and one response segment
(nginx -> wrk) as seen on the server pod's veth: whole Ethernet frames, TCP
options included. Frames() rewrites their client port and sequence numbers, so
that a run of them is keep-alive traffic on as many connections as wanted.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PACKETS = os.path.join(HERE, "packets.json")
ETH_HLEN = 14

# run in the node namespace: the first payload frame each way on the interface
_SNIFF = r"""
import socket, sys, json
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((sys.argv[1], 0))
s.settimeout(20)
got = {}
print("ready", flush=True)
while len(got) < 2:
    frame, addr = s.recvfrom(65536)
    if frame[12:14] != b"\x08\x00" or frame[23] != 6:
        continue
    ihl = (frame[14] & 15) * 4
    tcp = 14 + ihl
    doff = (frame[tcp + 12] >> 4) * 4
    payload = frame[tcp + doff:14 + int.from_bytes(frame[16:18], "big")]
    if payload.startswith(b"GET ") and "request" not in got:
        got["request"] = frame.hex()
    elif payload.startswith(b"HTTP/1.1 ") and "response" not in got:
        got["response"] = frame.hex()
print(json.dumps(got), flush=True)
"""


def capture() -> dict:
    from pyloader.lab.netnode import Node
    import loadgen

    node = Node(pods=3)
    try:
        node.setup()
        server, client = node.pods[0], node.pods[2]
        loadgen.start_nginx(node, server)
        sniff = subprocess.Popen(["ip", "netns", "exec", node.node_ns, sys.executable, "-c",
                                  _SNIFF, server.veth], stdout=subprocess.PIPE, text=True)
        assert sniff.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        node.ns_exec(client.ns, "wrk", "-t1", "-c1", "-d1s", f"http://{server.ip}/",
                     timeout=60)
        got = json.loads(sniff.stdout.readline())
        sniff.wait(timeout=10)
        nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
        return {"request": got["request"], "response": got["response"],
                "captured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "server": nginx, "client": "wrk -c1", "where": "server pod's veth"}
    finally:
        node.teardown()


def load() -> tuple[bytes, bytes]:
    with open(PACKETS) as f:
        d = json.load(f)
    return bytes.fromhex(d["request"]), bytes.fromhex(d["response"])


def _tcp_off(frame: bytes) -> int:
    return ETH_HLEN + (frame[ETH_HLEN] & 15) * 4


def payload(frame: bytes) -> bytes:
    tcp = _tcp_off(frame)
    end = ETH_HLEN + int.from_bytes(frame[16:18], "big")
    return frame[tcp + (frame[tcp + 12] >> 4) * 4:end]


def rewrite(frame: bytes, client_port: int, seq: int, ack: int, to_server: bool) -> bytes:
    """@frame with the client's port and the segment's seq/ack replaced."""
    tcp = _tcp_off(frame)
    b = bytearray(frame)
    port_at = tcp + 0 if to_server else tcp + 2  # the client's port: source of requests
    struct.pack_into("!H", b, port_at, client_port)
    struct.pack_into("!II", b, tcp + 4, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF)
    return bytes(b)


class Frames:
    """Keep-alive request/response pairs on @conns connections, round robin."""

    def __init__(self, conns: int = 16, base_port: int = 40000):
        self.req, self.resp = load()
        self.req_len, self.resp_len = len(payload(self.req)), len(payload(self.resp))
        self.ports = [base_port + i for i in range(conns)]
        self.cseq = [1000 + 7919 * i for i in range(conns)]
        self.sseq = [500000 + 104729 * i for i in range(conns)]
        self.i = 0

    def next_pair(self) -> tuple[bytes, bytes]:
        c = self.i % len(self.ports)
        self.i += 1
        q = rewrite(self.req, self.ports[c], self.cseq[c], self.sseq[c], True)
        self.cseq[c] += self.req_len
        r = rewrite(self.resp, self.ports[c], self.sseq[c], self.cseq[c], False)
        self.sseq[c] += self.resp_len
        return q, r

    @property
    def endpoint(self) -> str:
        """The server IP:port of the frames (the endpoint to trace)."""
        ip = ".".join(str(x) for x in self.req[30:34])
        return f"{ip}:{int.from_bytes(self.req[_tcp_off(self.req) + 2:][:2], 'big')}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--capture", action="store_true")
    a = ap.parse_args()
    if a.capture:
        d = capture()
        with open(PACKETS, "w") as f:
            json.dump(d, f, indent=1)
            f.write("\n")
    req, resp = load()
    print(f"request {len(payload(req))} B: {payload(req)!r}")
    print(f"response {len(payload(resp))} B: {payload(resp)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

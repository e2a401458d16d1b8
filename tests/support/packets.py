"""Crafted Ethernet/IPv4/IPv6/TCP frames for BPF_PROG_TEST_RUN.

Checksums are left zero: the TC program never looks at them.
"""
from __future__ import annotations

import ipaddress
import struct

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

ETH = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01"


def tcp_frame(src: str, dst: str, sport: int, dport: int, payload: bytes = b"",
              seq: int = 1000, ack: int = 1, flags: int = PSH | ACK) -> bytes:
    """One Ethernet frame carrying a TCP segment over IPv4 or IPv6."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xffffffff, ack, 5 << 4, flags,
                      65535, 0, 0)
    if s.version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 1, 0x4000,
                         64, 6, 0, s.packed, d.packed)
        return ETH + b"\x08\x00" + ip + tcp + payload
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(tcp) + len(payload), 6, 64, s.packed, d.packed)
    return ETH + b"\x86\xdd" + ip6 + tcp + payload


class Conn:
    """Both directions of one TCP connection, tracking sequence numbers."""

    def __init__(self, client=("198.18.0.20", 40000), server=("198.18.0.10", 80),
                 cseq=1000, sseq=5000):
        self.client, self.server = client, server
        self.cseq, self.sseq = cseq, sseq

    def req(self, payload: bytes, flags: int = PSH | ACK, seq: int | None = None) -> bytes:
        """A client -> server segment (advances the client's sequence)."""
        s = self.cseq if seq is None else seq
        f = tcp_frame(self.client[0], self.server[0], self.client[1], self.server[1], payload,
                      seq=s, ack=self.sseq, flags=flags)
        if seq is None:
            self.cseq += len(payload) + (1 if flags & (FIN | SYN) else 0)
        return f

    def resp(self, payload: bytes, flags: int = PSH | ACK, seq: int | None = None) -> bytes:
        """A server -> client segment (advances the server's sequence)."""
        s = self.sseq if seq is None else seq
        f = tcp_frame(self.server[0], self.client[0], self.server[1], self.client[1], payload,
                      seq=s, ack=self.cseq, flags=flags)
        if seq is None:
            self.sseq += len(payload) + (1 if flags & (FIN | SYN) else 0)
        return f


def get(path: str = "/", host: str = "example", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def response(status: int = 200, body: bytes = b"ok", reason: str = "OK", extra: str = "",
             version: str = "1.1") -> bytes:
    return (f"HTTP/{version} {status} {reason}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)

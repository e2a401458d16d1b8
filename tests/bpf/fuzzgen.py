"""Generators for tests/bpf/test_fuzz.py: Ethernet frames with every header
field bendable, hostile HTTP payloads, segment sequences and whole
conversations (hypothesis strategies)."""
from __future__ import annotations

import ipaddress
import struct

from hypothesis import strategies as st

from support import packets as P

ENDPOINTS = ("198.18.0.0/16", "2001:db8::/32")
SERVERS = [("198.18.0.10", 80), ("198.18.0.10", 8080), ("2001:db8::10", 80), ("198.18.0.11", 65535)]
CLIENTS = {4: [("198.18.0.20", 40000), ("198.18.1.2", 1)], 6: [("2001:db8::20", 40000)]}
U32 = 1 << 32
MAX_PIPELINE = 128  # abi.MAX_PIPELINE


# -- frames -------------------------------------------------------------------
def frame(src, dst, sport, dport, payload=b"", seq=0, ack=0, flags=P.PSH | P.ACK, *,
          ip_opts=b"", v6_ext=(), vlan=(), tot_len=None, tcp_opts=b"", doff=None,
          frag_off=0x4000, ihl=None) -> bytes:
    """An Ethernet frame with every header field a test may want to bend."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    tcp_opts = tcp_opts[:40] + b"\x01" * (-len(tcp_opts[:40]) % 4)
    if doff is None:
        doff = 5 + len(tcp_opts) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq % U32, ack % U32, (doff & 15) << 4,
                      flags & 0xff, 65535, 0, 0) + tcp_opts
    if s.version == 4:
        ip_opts = ip_opts[:40] + b"\x00" * (-len(ip_opts[:40]) % 4)
        hl = 5 + len(ip_opts) // 4 if ihl is None else ihl
        tl = 20 + len(ip_opts) + len(tcp) + len(payload) if tot_len is None else tot_len
        l3 = struct.pack("!BBHHHBBH4s4s", 0x40 | (hl & 15), 0, tl & 0xffff, 1, frag_off, 64, 6,
                         0, s.packed, d.packed) + ip_opts
        etype = 0x0800
    else:
        ext, nxt = b"", 6
        for kind in reversed(v6_ext):  # each 8 bytes: next header, length 0, padding
            ext = struct.pack("!BB6s", nxt, 0, b"\x01\x04" + bytes(4) if kind != 44 else bytes(6)) + ext
            nxt = kind
        pl = len(ext) + len(tcp) + len(payload) if tot_len is None else tot_len
        l3 = struct.pack("!IHBB16s16s", 6 << 28, pl & 0xffff, nxt, 64, s.packed, d.packed) + ext
        etype = 0x86DD
    eth = P.ETH
    for tpid, vid in vlan:
        eth += struct.pack("!HH", tpid, vid)
    return eth + struct.pack("!H", etype) + l3 + tcp + payload


def min_frame(f: bytes) -> int:
    """The shortest frame BPF_PROG_TEST_RUN accepts: an Ethernet header and,
    for an IPv4/IPv6 ethertype (skb->protocol), the fixed IP header after it
    (the kernel pulls it before the program runs; shorter: EINVAL)."""
    etype = f[12:14]
    return 14 + {b"\x08\x00": 20, b"\x86\xdd": 40}.get(etype, 0)


# -- payloads -----------------------------------------------------------------
METHODS = [b"GET ", b"POST ", b"HEAD ", b"PUT ", b"DELETE ", b"CONNECT ", b"OPTIONS ",
           b"TRACE ", b"PATCH ", b"PROPFIND ", b"M-SEARCH ", b"G", b"GE", b"GET", b"POS",
           b"XXXXXXXXXXXXXXXXXXXX ", b"get ", b"\r\nGET ", b"\nGET ", b" GET "]
LENGTHS = [b"0", b"5", b"-1", b"99999999999999999999999999", b"18446744073709551615",
           b"281474976710657", b"1e3", b"0x10", b" 12 ", b"5, 6", b"", b"+4", b"4\x00"]
CHUNKS = [b"ffffffffffffffffffffffffffffffff", b"1" * 200, b"-1", b"0", b"g", b"5;" + b"e" * 400,
          b"10000000000", b"a\r\n0123456789\r\n0", b"0\r\nTrailer: x", b"3\r\nabc\r\n0\r\n\r\n"]
STATUS = [b"HTTP/1.1 200 OK", b"HTTP/1.0 204 No", b"HTTP/1.1 100 Continue", b"HTTP/1.1 101 Up",
          b"HTTP/1.1 304 N", b"HTTP/1.1 999 ?", b"HTTP/1.1 000 ?", b"HTTP/9.9 200 OK",
          b"HTTP/1.1 20", b"HTTP/1.1 2000 OK", b"HTTP/1.1 -20 X"]
junk = st.binary(max_size=64)
target = st.one_of(st.sampled_from([b"/", b"*", b"/a?b=c", b"http://x/y", b"/" + b"%00" * 120]),
                   st.binary(min_size=1, max_size=300).map(lambda b: b.replace(b" ", b"_")))
version = st.sampled_from([b" HTTP/1.1", b" HTTP/1.0", b" HTTP/2.0", b"", b" HTTP/1.1 extra",
                           b" http/1.1"])
eol = st.sampled_from([b"\r\n", b"\n", b"\r", b""])


@st.composite
def header_block(draw) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.integers(0, 4))
        if kind == 0:
            out += b"Content-Length: " + draw(st.sampled_from(LENGTHS)) + draw(eol)
        elif kind == 1:
            out += b"Transfer-Encoding: " + draw(st.sampled_from(
                [b"chunked", b"gzip, chunked", b"chunked, gzip", b"CHUNKED", b"identity"])) + draw(eol)
        elif kind == 2:
            out += b"X-" + draw(junk) + b": " + draw(junk) + draw(eol)
        elif kind == 3:
            out += draw(junk) + draw(eol)
        else:
            out += b"X-Long: " + b"a" * draw(st.sampled_from([100, 3000, 5000])) + draw(eol)
    if draw(st.integers(0, 3)):  # most heads end, some never do
        out += draw(st.sampled_from([b"\r\n", b"\n"]))
    return out


@st.composite
def payload(draw) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=600))
    if kind == 1:  # a method-like start, anything after
        return draw(st.sampled_from(METHODS)) + draw(st.binary(max_size=80))
    if kind in (2, 3):  # a request line and a hostile head, maybe a body
        return (draw(st.sampled_from(METHODS)) + draw(target) + draw(version) + draw(eol) +
                draw(header_block()) + draw(st.binary(max_size=40)))
    if kind == 4:  # chunk-size lines
        return b"\r\n".join(draw(st.lists(st.sampled_from(CHUNKS), min_size=1, max_size=4)))
    if kind == 5:  # status lines and heads
        return draw(st.sampled_from(STATUS)) + draw(eol) + draw(header_block()) + draw(junk)
    if kind == 6:  # more of a head that may never end
        return b"X-Drip: " + b"d" * draw(st.integers(0, 700)) + draw(eol)
    if kind == 7:  # as big as a test-run frame can be
        return draw(st.sampled_from([b"a", b"\r\n", b"GET / HTTP/1.1\r\n", b"0\r\n"])) * 4000
    if kind == 8:
        return b""
    # several pipelined messages in one segment
    return b"".join(draw(st.lists(st.sampled_from(
        [P.get("/p"), P.response(200), P.response(204, b""), b"HEAD / HTTP/1.1\r\n\r\n",
         b"POST /u HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", b"HTTP/1.1 100 Continue\r\n\r\n"]),
        min_size=1, max_size=40)))


FLAGS = [P.PSH | P.ACK] * 8 + [P.ACK, P.FIN | P.ACK, P.RST, P.RST | P.ACK, P.SYN,
                               P.SYN | P.ACK, P.FIN | P.PSH | P.ACK, 0, 0xff]
MUTATIONS = [None] * 8 + ["ip_opts", "v6_ext", "vlan", "qinq", "truncate", "tot_len",
                          "tcp_opts", "doff", "frag", "ihl"]


class Conns:
    """Sequence numbers of both directions of each fuzzed connection."""

    def __init__(self):
        self.seq: dict[tuple, list[int]] = {}

    def next_seq(self, key, to_server: bool, mode: str, n: int, rnd: int) -> int:
        st_ = self.seq.setdefault(key, [rnd % U32, (rnd * 7919) % U32])
        i = 0 if to_server else 1
        cur = st_[i]
        if mode == "retx":
            return (cur - rnd % (n + 1)) % U32
        if mode == "gap":
            cur = (cur + 1 + rnd % 5000) % U32
        elif mode == "random":
            cur = rnd % U32
        elif mode == "wrap":
            cur = (U32 - 1 - rnd % 64) if rnd % 2 else cur
        st_[i] = (cur + n) % U32
        return cur


@st.composite
def segment(draw, limit: int):
    server = draw(st.sampled_from(SERVERS))
    fam = 6 if ":" in server[0] else 4
    client = draw(st.sampled_from(CLIENTS[fam]))
    return dict(server=server, client=client, to_server=draw(st.booleans()),
                payload=draw(payload()),
                mode=draw(st.sampled_from(["next"] * 6 + ["retx", "gap", "random", "wrap"])),
                flags=draw(st.sampled_from(FLAGS)), mutation=draw(st.sampled_from(MUTATIONS)),
                rnd=draw(st.integers(0, U32 - 1)), limit=limit)


def build(seg: dict, conns: Conns) -> bytes:
    (sip, sport), (cip, cport) = seg["server"], seg["client"]
    src, dst = ((cip, cport), (sip, sport)) if seg["to_server"] else ((sip, sport), (cip, cport))
    data, mut, rnd = seg["payload"], seg["mutation"], seg["rnd"]
    v6 = ":" in sip
    kw: dict = {}
    if mut == "ip_opts" and not v6:
        kw["ip_opts"] = bytes([0x94, 4, 0, 0]) + bytes([7, 11, 4]) + bytes(8)  # router alert, RR
        kw["ip_opts"] = kw["ip_opts"][:4 * (1 + rnd % 10)]
    elif mut == "v6_ext" and v6:
        kw["v6_ext"] = [(0, 43, 60, 44)[i % 4] for i in range(1 + rnd % 4)]
    elif mut == "vlan":
        kw["vlan"] = [(0x8100, rnd & 0xfff)]
    elif mut == "qinq":
        kw["vlan"] = [(0x88A8, 1), (0x8100, rnd & 0xfff)]
    elif mut == "tot_len":
        kw["tot_len"] = (0, 65535, 1, 20, 40, rnd & 0xffff)[rnd % 6]
    elif mut == "tcp_opts":
        kw["tcp_opts"] = bytes([2, 4, 5, 0xb4, 1, 1, 8, 10]) + bytes(rnd % 32)
    elif mut == "doff":
        kw["doff"] = rnd % 16
    elif mut == "frag":
        kw["frag_off"] = (0x2000, 0x0001, 0x3fff, 0x8000)[rnd % 4]
    elif mut == "ihl" and not v6:
        kw["ihl"] = rnd % 16
    room = seg["limit"] - 14 - 8 - 60 - 40 - 40  # worst-case headers
    data = data[:room]
    flags = seg["flags"]
    n = len(data) + (1 if flags & (P.SYN | P.FIN) else 0)
    key = (seg["server"], seg["client"])
    seq = conns.next_seq(key, seg["to_server"], seg["mode"], n, rnd)
    other = conns.seq.get(key, [0, 0])[1 if seg["to_server"] else 0]
    f = frame(src[0], dst[0], src[1], dst[1], data, seq, other, flags, **kw)
    if mut == "truncate":  # cut anywhere after the fixed IP header
        lo = min(min_frame(f), len(f))
        f = f[:max(lo, len(f) - 1 - rnd % max(1, len(f) - lo))]
    return f


# -- conversations ------------------------------------------------------------
REQ_METHODS = [b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"PROPFIND"]
RESP_STATUS = [200, 201, 204, 304, 404, 500, 100, 103]


@st.composite
def body(draw, framing: bytes) -> tuple[bytes, bytes]:
    """(header lines, body) for a message: well framed, mostly."""
    kind = draw(st.integers(0, 6))
    if kind == 0:
        return b"", b""
    if kind in (1, 2):
        data = b"x" * draw(st.integers(0, 5000))
        return b"Content-Length: %d\r\n" % len(data), data
    if kind == 3:
        parts = draw(st.lists(st.integers(1, 3000), max_size=4))
        chunks = b"".join(b"%x;e=1\r\n" % n + b"c" * n + b"\r\n" for n in parts)
        trailer = draw(st.sampled_from([b"", b"T: 1\r\n"]))
        return b"Transfer-Encoding: chunked\r\n", chunks + b"0\r\n" + trailer + b"\r\n"
    if kind == 4:  # hostile framing
        return (b"Content-Length: " + draw(st.sampled_from(LENGTHS)) + b"\r\n",
                draw(st.binary(max_size=50)))
    if kind == 5:
        return b"Transfer-Encoding: chunked\r\n", b"\r\n".join(
            draw(st.lists(st.sampled_from(CHUNKS), min_size=1, max_size=3)))
    return b"X-Junk: " + draw(junk).replace(b"\n", b"") + b"\r\n", b""


@st.composite
def request_msg(draw) -> bytes:
    m = draw(st.sampled_from(REQ_METHODS))
    hdrs, data = draw(body(m))
    t = draw(target)
    return (m + b" " + t + draw(version) + b"\r\nHost: h\r\n" + hdrs +
            draw(header_block()) * draw(st.integers(0, 1)) + b"\r\n" + data)


@st.composite
def response_msg(draw) -> bytes:
    code = draw(st.sampled_from(RESP_STATUS))
    hdrs, data = draw(body(b""))
    if code in (204, 304) or code < 200:
        data = b""
    return b"HTTP/1.1 %d X\r\n" % code + hdrs + b"\r\n" + data


@st.composite
def conversation(draw, limit: int) -> list[tuple[bool, bytes, str]]:
    """Exchanges on one connection, as (to_server, segment payload, seq mode):
    pipelined requests then their responses, each stream cut at random
    places, with junk, retransmits and gaps now and then."""
    out = []
    room = limit - 14 - 40 - 20
    for _ in range(draw(st.integers(1, 6))):
        k = draw(st.sampled_from([1, 1, 2, 2, 3, 4, 5, 140]))
        if k > MAX_PIPELINE:  # a burst past the FIFO: small messages
            reqs = [b"GET /b%d HTTP/1.1\r\n\r\n" % i for i in range(k)]
            resps = [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"] * k
        else:
            reqs = [draw(request_msg()) for _ in range(k)]
            resps = [draw(response_msg()) for _ in range(k)]
        for to_server, msgs in ((True, reqs), (False, resps)):
            stream = b"".join(msgs)
            if not draw(st.integers(0, 8)):
                stream += draw(payload())
            pos = 0
            while pos < len(stream):
                n = draw(st.one_of(st.integers(1, 16), st.integers(1, room)))
                mode = draw(st.sampled_from(["next"] * 20 + ["retx", "gap"]))
                out.append((to_server, stream[pos:pos + n], mode))
                pos += n
    return out

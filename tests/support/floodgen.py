"""Hostile clients and a do-nothing server for tests/e2e/test_floods.py,
run inside the test's namespaces (`python floodgen.py CMD ...`). Each
prints JSON lines: what it did, so the test compares with the log.

    hold PORT                      accept every connection, never read or answer
                                   (SO_REUSEPORT: run several); SIGTERM: close them
    conns HOST PORT N PATH FIRST [SRC]  N connections (from address SRC), one
                                   request each (PATH + number from FIRST on),
                                   kept open until SIGTERM
    slowloris HOST PORT N SECONDS  N connections that drip a request head one
                                   byte at a time and never finish it
    synflood HOST PORT COUNT DATA  COUNT spoofed SYNs from 198.19.0.0/16 (raw
                                   socket); DATA=1: each with a request as payload
    pipeline HOST PORT N WAIT PAD [OK BAD]  N pipelined requests (each with a
                                   PAD-byte header; request i to OK + i, every
                                   third to BAD + ?n=i) written without reading,
                                   WAIT seconds, then all N responses read
"""
from __future__ import annotations

import ipaddress
import json
import os
import random
import resource
import select
import signal
import socket
import struct
import sys
import threading
import time

STOP = threading.Event()
IP_BIND_ADDRESS_NO_PORT = 24


def out(**kw) -> None:
    print(json.dumps(kw), flush=True)


def on_term(*_):
    STOP.set()


def raise_nofile() -> int:
    """Soft file limit up to the hard one (raising the hard one needs
    CAP_SYS_RESOURCE, which a test machine may not have: the test splits
    big floods over several processes). Returns the limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def hold(port: int) -> None:
    raise_nofile()
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # several holders share the port
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    s.listen(65535)
    s.setblocking(False)
    held = []
    out(listening=port)
    while not STOP.is_set():
        r, _, _ = select.select([s], [], [], 0.2)
        if not r:
            continue
        while True:
            try:
                c, _ = s.accept()
            except BlockingIOError:
                break
            except OSError as e:  # EMFILE: the rest waits in the accept queue
                out(error=repr(e), held=len(held))
                time.sleep(1)
                break
            held.append(c)
    for c in held:
        c.close()
    out(held=len(held))


def conns(host: str, port: int, n: int, path: str, first: int, src: str = "") -> None:
    """Non-blocking connects in waves (from source address @src if given);
    each connection sends its request as soon as it is established."""
    limit = raise_nofile()
    if n > limit - 100:
        raise SystemExit(f"{n} connections need more than the file limit {limit}")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    ep = select.epoll()
    socks, failed, t0, i = [], 0, time.monotonic(), 0
    while i < n and not STOP.is_set():
        wave = {}
        for _ in range(min(500, n - i)):
            c = socket.socket(fam, socket.SOCK_STREAM)
            c.setblocking(False)
            if src:  # the port is chosen at connect time, per source address
                c.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                c.bind((src, 0))
            c.connect_ex((host, port))
            wave[c.fileno()] = (c, first + i)
            ep.register(c.fileno(), select.EPOLLOUT)
            i += 1
        deadline = time.monotonic() + 20
        while wave and time.monotonic() < deadline:
            for fd, _ in ep.poll(1.0):
                c, num = wave.pop(fd)
                ep.unregister(fd)
                err = c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    failed += 1
                    out(error=os.strerror(err), at=num) if failed <= 3 else None
                    c.close()
                    continue
                c.setblocking(True)
                c.sendall(b"GET %s%d HTTP/1.1\r\nHost: x\r\n\r\n" % (path.encode(), num))
                socks.append(c)
        for fd, (c, _) in wave.items():  # never connected
            ep.unregister(fd)
            c.close()
            failed += 1
    out(sent=len(socks), failed=failed, seconds=round(time.monotonic() - t0, 1))
    while not STOP.wait(0.2):
        pass
    for c in socks:
        c.close()
    out(closed=len(socks))


def slowloris(host: str, port: int, n: int, seconds: float) -> None:
    raise_nofile()
    socks = []
    for i in range(n):
        c = socket.create_connection((host, port), timeout=10)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.sendall(b"GET /slowloris/%d HTTP/1.1\r\nHost: x\r\nX-Drip: " % i)
        socks.append(c)
    out(open=len(socks))
    drip, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        for c in socks:  # one byte per connection per round, never the blank line
            c.send(b"a" if drip % 40 else b"\r\nX-Drip: ")
        drip += 1
        time.sleep(0.25)
    out(dripped=drip)
    for c in socks:
        c.close()
    out(closed=len(socks))


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff


def synflood(host: str, port: int, count: int, with_data: bool) -> None:
    """Spoofed sources in 198.19.0.0/16 only (a test range the node blackholes)."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    dst = ipaddress.IPv4Address(host).packed
    payload = b"GET /synflood HTTP/1.1\r\nHost: x\r\n\r\n" if with_data else b""
    rnd = random.Random(9)
    sent, t0, used = 0, time.monotonic(), set()
    for _ in range(count):
        while True:  # each a new connection: no 4-tuple twice
            src = bytes([198, 19, rnd.randrange(256), rnd.randrange(1, 255)])
            sport = rnd.randrange(1024, 65536)
            if (src, sport) not in used:
                used.add((src, sport))
                break
        assert ipaddress.IPv4Address(src) in ipaddress.ip_network("198.19.0.0/16")
        seq = rnd.randrange(1 << 32)
        tcp = struct.pack("!HHIIBBHHH", sport, port, seq, 0, 5 << 4, 0x02, 64240, 0, 0)
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp) + len(payload))
        tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp + payload)) + tcp[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0, 64, 6, 0,
                         src, dst)
        try:
            raw.sendto(ip + tcp + payload, (host, 0))
            sent += 1
        except OSError:  # ENOBUFS when the queue is full: counted, not retried
            pass
    out(sent=sent, seconds=round(time.monotonic() - t0, 2))


class _Counted:
    """A socket file that counts the bytes read through it."""

    def __init__(self, f):
        self.f, self.pos = f, 0

    def readline(self) -> bytes:
        b = self.f.readline()
        self.pos += len(b)
        return b

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        self.pos += len(b)
        return b


# struct tcp_info (linux/tcp.h): (offset, format) of the fields read
TCP_INFO = {"total_retrans": (100, "I"), "bytes_acked": (120, "Q"),
            "bytes_received": (128, "Q"), "reord_seen": (220, "I"), "rcv_ooopack": (224, "I")}


def tcp_info(c: socket.socket) -> dict:
    raw = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    return {k: struct.unpack_from(f, raw, o)[0] for k, (o, f) in TCP_INFO.items()}


def watch_tcp(c: socket.socket, done: threading.Event, seen: dict) -> None:
    """Poll the connection's TCP_INFO until @done. seen["clean_sent"]: bytes
    the server had acknowledged when this side had not yet retransmitted nor
    heard of reordering, the last time that was so; seen["clean_received"]:
    bytes received in order while none had arrived out of order. A segment
    lost (or overtaken) on the way lies beyond them."""
    while True:
        last = done.is_set()  # then once more: what came in after the last look
        i = tcp_info(c)
        if not (i["total_retrans"] or i["reord_seen"]):
            seen["clean_sent"] = i["bytes_acked"]
        if not i["rcv_ooopack"]:
            seen["clean_received"] = i["bytes_received"]
        if last:
            return
        time.sleep(0.0005)


def pipeline(host: str, port: int, n: int, wait: float, pad: int,
             ok_path: str = "/status/pipe", bad_path: str = "/error") -> None:
    """Every third request goes to BAD_PATH (another status), so that any
    mispairing in the log shows; each request padded by a PAD-byte header.
    Says how many requests (and responses) went through before the first
    sign of a lost or reordered segment (TCP_INFO, polled), and the
    connection's totals."""
    c = socket.create_connection((host, port), timeout=60)
    paths = [f"{bad_path}?n={i}" if i % 3 == 0 else f"{ok_path}{i}" for i in range(n)]
    extra = b"X-Pad: %s\r\n" % (b"p" * pad) if pad else b""
    reqs = [b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (p.encode(), extra) for p in paths]
    data = b"".join(reqs)
    seen = {"clean_sent": 0, "clean_received": 0}
    done = threading.Event()
    watcher = threading.Thread(target=watch_tcp, args=(c, done, seen), daemon=True)
    watcher.start()
    sender = threading.Thread(target=c.sendall, args=(data,), daemon=True)
    sender.start()
    time.sleep(wait)  # not reading: the server's output and then our output stall
    f = _Counted(c.makefile("rb"))
    from pyloader.lab.trafficgen import read_response
    statuses, ends = [], []
    for _ in range(n):
        statuses.append(read_response(f))
        ends.append(f.pos)
    sender.join(timeout=30)
    done.set()
    watcher.join()
    final = tcp_info(c)
    c.close()
    req_ends, pos = [], 0
    for r in reqs:
        pos += len(r)
        req_ends.append(pos)
    out(sent=n, statuses={str(s): statuses.count(s) for s in set(statuses)},
        clean_requests=sum(e <= seen["clean_sent"] for e in req_ends),
        clean_responses=sum(e <= seen["clean_received"] for e in ends), tcp=final)


def main() -> None:
    signal.signal(signal.SIGTERM, on_term)
    a = sys.argv[1:]
    cmd = a[0]
    if cmd == "hold":
        hold(int(a[1]))
    elif cmd == "conns":
        conns(a[1], int(a[2]), int(a[3]), a[4], int(a[5]), *(a[6:7]))
    elif cmd == "slowloris":
        slowloris(a[1], int(a[2]), int(a[3]), float(a[4]))
    elif cmd == "synflood":
        synflood(a[1], int(a[2]), int(a[3]), a[4] == "1")
    elif cmd == "pipeline":
        pipeline(a[1], int(a[2]), int(a[3]), float(a[4]), int(a[5]), *a[6:8])
    else:
        raise SystemExit(f"unknown command {cmd}")
    os._exit(0)


if __name__ == "__main__":
    main()

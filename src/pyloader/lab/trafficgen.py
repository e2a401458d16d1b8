"""HTTP/1.1 clients for the demo and tests (run inside a namespace).

Each command prints one JSON line per request it made: what it sent and
what it got back, so a test can compare the access log with the truth.
    keepalive HOST PORT N PATH     N sequential requests on one connection
    pipeline  HOST PORT N PATH     N requests in one write, then N responses
    post      HOST PORT PATH SIZE  one POST with a SIZE-byte body
    reset     HOST PORT PATH       send a request, then RST before the answer
    download  HOST PORT PATH KBPS  GET with a 16 kB receive buffer, read at KBPS
"""
from __future__ import annotations

import json
import socket
import struct
import sys


def connect(host: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(30)
    s.connect((host, port))
    return s


def read_response(f, method: str = "GET") -> int:
    """Read one response from a socket file; return its status."""
    line = f.readline()
    if not line:
        raise EOFError("connection closed")
    status = int(line.split()[1])
    length, chunked = 0, False
    while True:
        h = f.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        k, _, v = h.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip())
        if k.strip().lower() == b"transfer-encoding" and b"chunked" in v.lower():
            chunked = True
    if method == "HEAD" or status in (204, 304) or status < 200:
        return status
    if chunked:
        while True:
            size = int(f.readline().split(b";")[0], 16)
            f.read(size + 2) if size else f.readline()
            if not size:
                break
    else:
        f.read(length)
    return status


def out(method: str, path: str, status) -> None:
    print(json.dumps({"method": method, "path": path, "status": status}), flush=True)


def request(method: str, path: str, host: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: redtap-trafficgen\r\n"
    if body or method in ("POST", "PUT"):
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def keepalive(host, port, n, path, method="GET"):
    s = connect(host, port)
    f = s.makefile("rb")
    for i in range(n):
        p = path.replace("{i}", str(i))
        s.sendall(request(method, p, host))
        out(method, p, read_response(f, method))
    s.close()


def pipeline(host, port, n, path):
    s = connect(host, port)
    paths = [path.replace("{i}", str(i)) for i in range(n)]
    s.sendall(b"".join(request("GET", p, host) for p in paths))
    f = s.makefile("rb")
    for p in paths:
        out("GET", p, read_response(f))
    s.close()


def post(host, port, path, size):
    s = connect(host, port)
    s.sendall(request("POST", path, host, b"p" * size))
    out("POST", path, read_response(s.makefile("rb")))
    s.close()


def reset(host, port, path):
    s = connect(host, port)
    s.sendall(request("GET", path, host))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # linger 0: RST instead of FIN
    out("GET", path, None)


def download(host, port, path, kbps):
    """A slow reader: a small receive window makes the server send at our pace."""
    import time
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    s.settimeout(60)
    s.connect((host, port))
    s.sendall(request("GET", path, host))
    f = s.makefile("rb", buffering=0)
    line = f.readline()
    status, length = int(line.split()[1]), 0
    while True:
        h = f.readline()
        if h in (b"\r\n", b""):
            break
        if h.lower().startswith(b"content-length:"):
            length = int(h.split(b":")[1])
    got, t0, chunk = 0, time.monotonic(), 8192
    while got < length:
        data = f.read(min(chunk, length - got))
        if not data:
            break
        got += len(data)
        ahead = got / (kbps * 1024) - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)
    s.close()
    out("GET", path, status)


def main(argv=None) -> None:
    a = argv or sys.argv[1:]
    cmd, host, port = a[0], a[1], int(a[2])
    if cmd == "keepalive":
        keepalive(host, port, int(a[3]), a[4], *(a[5:6]))
    elif cmd == "pipeline":
        pipeline(host, port, int(a[3]), a[4])
    elif cmd == "post":
        post(host, port, a[3], int(a[4]))
    elif cmd == "reset":
        reset(host, port, a[3])
    elif cmd == "download":
        download(host, port, a[3], int(a[4]))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()

"""Send llhttp's test vectors over real TCP connections (one per vector).

    python llhttp_wire.py server VECTORS PORT LOG     (in the server namespace)
    python llhttp_wire.py client VECTORS HOST PORT LOG

Request vectors: the client sends the raw bytes; the server answers each
message llhttp found with "HTTP/1.1 200 OK" (Content-Length: 0) and closes.
Response vectors: the client sends one GET per message; the server answers
with the raw bytes and closes. Both log one JSON line per vector.
"""
from __future__ import annotations

import base64
import json
import socket
import sys

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def usable(v: dict) -> bool:
    if v["kind"] == "request" and v["meta"].get("skipBody"):
        return False  # a parser option with no meaning on the wire
    return (not v["lenient"] and not v["expect_error"] and v["all_http1"] and v["messages"]
            and all(m.get("message_complete") for m in v["messages"]))


def finals(v: dict) -> list[dict]:
    """The final (non-1xx, or 101) messages of a response vector."""
    return [m for m in v["messages"]
            if m["status"] is not None and (m["status"] >= 200 or m["status"] == 101)]


def client_method(v: dict) -> str:
    """skipBody response vectors are what answers to HEAD look like."""
    return "HEAD" if v["meta"].get("skipBody") else "GET"


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [v for v in (json.loads(l) for l in f if l.strip()) if usable(v)]


def recv_until_closed_or(sock, want: int) -> bytes:
    buf = b""
    while len(buf) < want:
        data = sock.recv(65536)
        if not data:
            break
        buf += data
    return buf


def server(vectors, port, log):
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(16)
    with open(log, "w") as out:
        for v in vectors:
            conn, peer = ls.accept()
            conn.settimeout(5)
            raw = base64.b64decode(v["raw_b64"])
            try:
                if v["kind"] == "request":
                    recv_until_closed_or(conn, len(raw))
                    conn.sendall(OK * len(v["messages"]))
                else:
                    n, buf = len(finals(v)), b""
                    while buf.count(b"\r\n\r\n") < n:
                        data = conn.recv(65536)
                        if not data:
                            break
                        buf += data
                    conn.sendall(raw)
            except OSError:
                pass
            conn.close()
            out.write(json.dumps({"id": v["id"], "client_port": peer[1]}) + "\n")
            out.flush()


def connect(host, port, wait: float):
    """Connect, retrying while the server is not listening yet."""
    import time
    end = time.monotonic() + wait
    while True:
        try:
            return socket.create_connection((host, port), timeout=5)
        except ConnectionRefusedError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def client(vectors, host, port, log):
    with open(log, "w") as out:
        for i, v in enumerate(vectors):
            s = connect(host, port, 15 if i == 0 else 0)
            raw = base64.b64decode(v["raw_b64"])
            try:
                if v["kind"] == "request":
                    s.sendall(raw)
                else:
                    s.sendall(b"".join(b"%s /v%d HTTP/1.1\r\nHost: t\r\n\r\n"
                                       % (client_method(v).encode(), i)
                                       for i in range(len(finals(v)))))
                recv_until_closed_or(s, 1 << 30)
            except OSError:
                pass
            out.write(json.dumps({"id": v["id"], "client_port": s.getsockname()[1]}) + "\n")
            out.flush()
            s.close()


if __name__ == "__main__":
    mode, path = sys.argv[1], sys.argv[2]
    vecs = load(path)
    if mode == "server":
        server(vecs, int(sys.argv[3]), sys.argv[4])
    else:
        client(vecs, sys.argv[3], int(sys.argv[4]), sys.argv[5])

"""A small HTTP/1.1 server for the demo and tests (run inside a pod namespace).

GET  /py/slow?ms=N  answers after N ms       GET /py/error  -> 503
GET  /py/chunked?n=N&size=S  N chunks of S bytes (Transfer-Encoding: chunked)
GET  /py/...        -> 200                    POST/PUT       -> 201 (body read)
HEAD                -> headers of GET
"""
from __future__ import annotations

import argparse
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "redtap-testserver"
    disable_nagle_algorithm = True  # no 40 ms delayed-ACK stalls on keep-alive

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, status: int, body: bytes, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _get(self, head: bool) -> None:
        u = urlsplit(self.path)
        if u.path == "/py/slow":
            ms = int(parse_qs(u.query).get("ms", ["100"])[0])
            time.sleep(ms / 1000)
        if u.path == "/py/error":
            return self._reply(503, b"unavailable\n", head)
        if u.path == "/py/chunked":
            q = parse_qs(u.query)
            return self._chunked(int(q.get("n", ["5"])[0]), int(q.get("size", ["100"])[0]), head)
        self._reply(200, b"py ok\n", head)

    def _chunked(self, n: int, size: int, head: bool) -> None:
        """n chunks of size bytes, each in its own write, 5 ms apart."""
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if head:
            return
        for i in range(n):
            self.wfile.write(b"%x\r\n" % size + bytes([97 + i % 26]) * size + b"\r\n")
            self.wfile.flush()
            time.sleep(0.005)
        self.wfile.write(b"0\r\n\r\n")

    def do_GET(self):
        self._get(False)

    def do_HEAD(self):
        self._get(True)

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        while n > 0:
            chunk = self.rfile.read(min(n, 65536))
            if not chunk:
                break
            n -= len(chunk)
        self._reply(201, b"created\n")

    do_PUT = do_POST


class DualStackServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8080)
    args = ap.parse_args()
    DualStackServer(("::", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()

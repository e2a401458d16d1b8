"""A small Kubernetes API server for tests, speaking the real wire protocol.

Resources: pods, services (v1), endpointslices (discovery.k8s.io/v1),
replicasets (apps/v1). Verbs: list (resourceVersion, limit/continue,
fieldSelector spec.nodeName / metadata.name / metadata.namespace), watch
(chunked JSON lines: ADDED, MODIFIED, DELETED, BOOKMARK, ERROR 410 when the
requested resourceVersion was compacted), get. HTTPS with a generated CA and
a bearer token; a real kubeconfig points at it (kubeconfig()).

Tests change the cluster with put()/delete() (objects from the make_* builders
of fakeobjs.py; the store and the HTTP handler are in fakeapi_wire.py) and
inject faults: stop()/start() (API down),
drop_connections(), compact() (410 Gone on resume), delay (slow answers),
fail[resource] = HTTP status. A minimal EndpointSlice controller derives the
slices of every Service with a selector, as the real one does.

Runs in-process: FakeApi(host, port, netns=...) creates its listening socket
inside a network namespace (e.g. a test node's) and serves from threads here.
"""
from __future__ import annotations

import base64
import ctypes
import json
import os
import socket
import ssl
import subprocess
import tempfile
import threading
from http.server import ThreadingHTTPServer

from pyloader.lab.fakeapi_wire import Handler, Store
from pyloader.lab.fakeobjs import reconcile_slices

TOKEN = "fakeapi-test-token"
CLONE_NEWNET = 0x40000000


# -- TLS material and kubeconfig -------------------------------------------------
_TLS: dict = {}


def tls_files(ips=("127.0.0.1", "198.18.0.1")) -> tuple[str, str, str]:
    """(ca.crt, server.crt, server.key), made once per process with openssl."""
    key = tuple(ips)
    if key not in _TLS:
        d = tempfile.mkdtemp(prefix="fakeapi-tls-")
        p = lambda n: os.path.join(d, n)  # noqa: E731
        run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
        run("openssl", "req", "-x509", *ec, "-keyout", p("ca.key"), "-out", p("ca.crt"),
            "-days", "2", "-subj", "/CN=fakeapi-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        run("openssl", "req", *ec, "-keyout", p("srv.key"), "-out", p("srv.csr"),
            "-subj", "/CN=fakeapi")
        with open(p("ext.cnf"), "w") as f:
            f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                    "extendedKeyUsage=serverAuth\n"
                    "subjectAltName=" + ",".join(f"IP:{ip}" for ip in ips) + "\n")
        run("openssl", "x509", "-req", "-in", p("srv.csr"), "-CA", p("ca.crt"), "-CAkey",
            p("ca.key"), "-CAcreateserial", "-out", p("srv.crt"), "-days", "2",
            "-extfile", p("ext.cnf"))
        _TLS[key] = (p("ca.crt"), p("srv.crt"), p("srv.key"))
    return _TLS[key]


def kubeconfig_text(server: str, ca_file: str, token: str = TOKEN) -> str:
    with open(ca_file, "rb") as f:
        ca = base64.b64encode(f.read()).decode()
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
           "clusters": [{"name": "fake", "cluster": {"server": server,
                                                     "certificate-authority-data": ca}}],
           "users": [{"name": "redtap", "user": {"token": token}}],
           "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "redtap"}}]}
    return json.dumps(cfg, indent=1)  # JSON is YAML


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        import sys
        if not isinstance(sys.exc_info()[1], (OSError, ssl.SSLError)):
            super().handle_error(request, client_address)  # a bug in the fake: show it


def _socket_in_netns(netns: str | None, host: str, port: int) -> socket.socket:
    """A listening socket created inside network namespace @netns (this thread
    switches in, the process stays where it is)."""
    out: dict = {}

    def make():
        try:
            if netns:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        e = ctypes.get_errno()
                        raise OSError(e, f"setns({netns}): {os.strerror(e)}")
                finally:
                    os.close(fd)
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(64)
            out["s"] = s
        except BaseException as e:
            out["e"] = e
    t = threading.Thread(target=make)
    t.start()
    t.join()
    if "e" in out:
        raise out["e"]
    return out["s"]


class FakeApi:
    """The server. start() it, point kubeconfig() at it, stop() in the end."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, netns: str | None = None,
                 tls: bool = True, slice_controller: bool = True):
        self.host, self.port, self.netns = host, port, netns
        self.store = Store()
        self.token = TOKEN
        self.tls = None
        if tls:
            self.ca, crt, key = tls_files()
            self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls.load_cert_chain(crt, key)
        self.slice_controller = slice_controller
        self.delay = 0.0
        self.fail: dict[str, int] = {}
        self.gone_as_status = False  # 410 as the HTTP status instead of an ERROR event
        self.bookmark_interval = 1.0
        self.requests: list[tuple] = []  # (verb, resource, query)
        self.snapshots: dict[str, tuple] = {}
        self.conns: set = set()
        self.lock = threading.Lock()
        self.httpd = None
        self.stopping = False

    @property
    def url(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{h}:{self.port}"

    def kubeconfig(self, path: str) -> str:
        with open(path, "w") as f:
            f.write(kubeconfig_text(self.url, self.ca))
        return path

    # -- life cycle and faults ----------------------------------------------------
    def start(self) -> "FakeApi":
        sock = _socket_in_netns(self.netns, self.host, self.port)
        self.port = sock.getsockname()[1]
        self.stopping = False
        httpd = _Server((self.host, self.port), Handler, bind_and_activate=False)
        httpd.socket.close()
        httpd.socket = sock
        httpd.api = self
        self.httpd = httpd
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                         daemon=True, name="fakeapi").start()
        return self

    def stop(self) -> None:
        """The API goes down: no listener, open connections cut."""
        if self.httpd is None:
            return
        self.stopping = True
        with self.store.cond:
            self.store.cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.httpd = None
        self.drop_connections()

    def track(self, sock, add: bool) -> None:
        with self.lock:
            (self.conns.add if add else self.conns.discard)(sock)

    def drop_connections(self) -> int:
        """Cut every open connection (watches end mid-stream)."""
        with self.lock:
            conns = list(self.conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(conns)

    def compact(self) -> None:
        self.store.compact()
        self.snapshots.clear()

    def watches(self, res: str) -> int:
        return sum(1 for v, r, _ in self.requests if v == "watch" and r == res)

    def lists(self, res: str) -> int:
        return sum(1 for v, r, q in self.requests if v == "list" and r == res
                   and not q.get("continue"))

    # -- the cluster ------------------------------------------------------------
    def put(self, res: str, obj: dict) -> dict:
        out = self.store.put(res, obj)
        if self.slice_controller and res in ("pods", "services"):
            reconcile_slices(self.store)
        return out

    def delete(self, res: str, ns: str, name: str) -> dict | None:
        out = self.store.delete(res, ns, name)
        if self.slice_controller and res in ("pods", "services"):
            reconcile_slices(self.store)
        return out

"""redtap demo: trace real HTTP traffic on a throwaway namespace "node".

Run as root:  python -m pyloader.demo   (or `make demo`)

It builds a node of network namespaces (pyloader.netnode), starts nginx in
pod0 (:80) and the Python test server in pod1 (:8080), runs the agent in the
node namespace, drives mixed traffic (pod-to-pod, host-to-pod, from another
node, keep-alive, pipelining, POST bodies, IPv6, 404/500/503, a slow request),
prints the access-log records as they arrive, then stops the agent and prints
a R.E.D. summary and the kernel counters. Everything is torn down at the end,
also on Ctrl-C or SIGTERM. Exit status 1 if the number of logged records
differs from the number of requests the clients made.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from .abi import LOSS_STATS
from .netnode import Node
from .summary import RedSummary

ENDPOINTS = ("198.18.0.10:80", "[2001:db8::a]:80", "198.18.0.11:8080")
START_TIMEOUT_S = 15.0
SETTLE_TIMEOUT_S = 3.0


def log(msg: str = "") -> None:
    print(msg, flush=True)


# -- the access log ------------------------------------------------------------
def read_lines(path: str) -> list[dict]:
    try:
        with open(path, "rb") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def records(lines: list[dict]) -> list[dict]:
    return [r for r in lines if "event" not in r]


def find_event(lines: list[dict], name: str) -> dict | None:
    return next((r for r in reversed(lines) if r.get("event") == name), None)


def format_record(r: dict) -> str:
    """One compact line: time, client -> server, method, path, status, duration."""
    t = r.get("time", "")[11:23]
    client = f"{r['client.address']}:{r['client.port']}"
    server = r["server.address"]
    server = f"[{server}]" if ":" in server else server
    target = r["url.path"] + (f"?{r['url.query']}" if "url.query" in r else "")
    status = r.get("http.response.status_code", "no response")
    return (f"  {t}  {client:>22} -> {server}:{r['server.port']:<5} "
            f"{r['http.request.method']:<5} {target:<24} {status!s:>3}  {r['duration_ms']:8.3f} ms")


class LogTail(threading.Thread):
    """Prints access-log records (not event lines) as they are written."""

    def __init__(self, path: str):
        super().__init__(daemon=True, name="logtail")
        self.path, self.offset, self.partial = path, 0, b""
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.1):
            self.drain()
        self.drain()

    def drain(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            rec = json.loads(line) if line.strip() else {}
            if rec and "event" not in rec:
                log(format_record(rec))

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(timeout=2)


# -- the agent -----------------------------------------------------------------
def start_agent(node: Node, logpath: str) -> subprocess.Popen:
    errpath = os.path.join(node.dir, "agent.stderr")
    args = [a for ep in ENDPOINTS for a in ("--endpoint", ep)]
    with open(errpath, "wb") as err:
        proc = node.spawn(node.node_ns, sys.executable, "-m", "pyloader", "run",
                          "--log", logpath, *args, stderr=err)
    end = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < end:
        start = find_event(read_lines(logpath), "redtap.start")
        if start:
            log(f"agent pid {proc.pid} traces {', '.join(start['endpoints'])} "
                f"on {', '.join(start['interfaces'])}")
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    with open(errpath, errors="replace") as f:
        raise RuntimeError(f"the agent did not start (exit {proc.poll()}):\n{f.read()}")


def stop_agent(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    return proc.wait(timeout=15)


# -- the clients ---------------------------------------------------------------
class Clients:
    """Runs clients in namespaces and counts the requests they made."""

    def __init__(self, node: Node):
        self.node = node
        self.requests = 0
        self.problems: list[str] = []
        self.names = {node.node_ns: "node", node.ext_ns: "ext"}
        self.names.update({p.ns: f"pod{p.index}" for p in node.pods})

    def step(self, what: str, ns: str, desc: str) -> None:
        log(f"> {what:<22} from {self.names[ns]:<5} {desc}")

    def curl(self, what: str, ns: str, url: str, expect: int, *args: str) -> None:
        self.step(what, ns, f"curl {' '.join(args)} {url}".replace("  ", " "))
        r = self.node.curl(ns, "-g", "-o", "/dev/null", "-w", "%{http_code}", *args, url)
        self.requests += 1
        if r.stdout.strip() != str(expect):
            self.problems.append(f"curl {url}: got {r.stdout.strip()!r}, expected {expect} "
                                 f"{r.stderr.strip()}")

    def gen(self, what: str, ns: str, *args) -> None:
        """pyloader.trafficgen: one JSON line per request made."""
        args = [str(a) for a in args]
        self.step(what, ns, "trafficgen " + " ".join(args))
        try:
            out = self.node.traffic(ns, *args).stdout
        except subprocess.CalledProcessError as e:
            out = e.stdout or ""
            self.problems.append(f"trafficgen {' '.join(args)} failed: {(e.stderr or '').strip()}")
        self.requests += sum(1 for line in out.splitlines() if line.strip())


def drive_traffic(node: Node, c: Clients) -> None:
    p0, p1, p2, p3 = (p.ns for p in node.pods[:4])
    web, web6 = f"http://{node.pods[0].ip}", f"http://[{node.pods[0].ip6}]"
    py = f"http://{node.pods[1].ip}:8080"
    ip0, ip1 = node.pods[0].ip, node.pods[1].ip
    c.curl("same-node pod-to-pod", p2, f"{web}/", 200)
    c.curl("same-node pod-to-pod", p3, f"{web}/status/ready", 200)
    c.curl("host-to-pod", node.node_ns, f"{web}/status/health", 200)
    c.curl("other node", node.ext_ns, f"{web}/", 200)
    c.curl("404", p2, f"{web}/nothing-here", 404)
    c.curl("500", p3, f"{web}/error", 500)
    c.curl("POST (curl -d)", p2, f"{web}/upload", 201, "-d", "name=redtap&kind=demo")
    c.curl("IPv6", p3, f"{web6}/", 200)
    c.curl("IPv6 from host", node.node_ns, f"{web6}/status/v6", 200)
    c.curl("python server", p2, f"{py}/py/hello?lang=en", 200)
    c.curl("503", p3, f"{py}/py/error", 503)
    c.curl("slow request", node.ext_ns, f"{py}/py/slow?ms=400", 200)
    c.gen("POST 100000 bytes", p2, "post", ip0, 80, "/upload", 100000)
    c.gen("POST to python", p3, "post", ip1, 8080, "/py/items", 20000)
    c.gen("keep-alive x50", p2, "keepalive", ip0, 80, 50, "/status/{i}")
    c.gen("pipelined x16", p3, "pipeline", ip0, 80, 16, "/status/p{i}")
    c.gen("keep-alive x10", node.ext_ns, "keepalive", ip1, 8080, 10, "/py/ka{i}")
    c.gen("reset before answer", p2, "reset", ip1, 8080, "/py/slow?ms=300")


def wait_for_records(logpath: str, want: int, timeout: float = SETTLE_TIMEOUT_S) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and len(records(read_lines(logpath))) < want:
        time.sleep(0.1)


# -- the report ----------------------------------------------------------------
def report(lines: list[dict], started: float, requests: int) -> bool:
    recs = records(lines)
    red = RedSummary()
    red.started = started  # rates over the traffic window, not since now
    for r in recs:
        red.add(r)
    log("\nR.E.D. per server endpoint")
    log(red.table())
    exit_ev = find_event(lines, "redtap.exit")
    if exit_ev:
        k = exit_ev["kernel"]
        log("\nkernel counters: " + ", ".join(f"{n}={v}" for n, v in k.items()
                                               if v and n not in LOSS_STATS))
        lost = {n: k[n] for n in LOSS_STATS if k.get(n)}
        log("kernel loss counters: " + (", ".join(f"{n}={v}" for n, v in lost.items())
                                        if lost else "all zero"))
    else:
        log("\nno redtap.exit line in the log (the agent did not exit cleanly)")
    ok = len(recs) == requests
    log(f"\nclients made {requests} requests; the agent logged {len(recs)} records: "
        + ("OK" if ok else "MISMATCH"))
    return ok


# -- main ----------------------------------------------------------------------
def _on_sigterm(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def run(node: Node) -> int:
    t0 = time.monotonic()
    node.setup()
    node.start_nginx(node.pods[0])
    node.start_pyserver(node.pods[1])
    log(f"node {node.tag}: nginx on {node.pods[0].ip}:80 and [{node.pods[0].ip6}]:80, "
        f"python server on {node.pods[1].ip}:8080 ({time.monotonic() - t0:.1f}s)")
    logpath = os.path.join(node.dir, "access.log")
    agent = start_agent(node, logpath)
    tail = LogTail(logpath)
    tail.start()
    try:
        clients = Clients(node)
        started = time.monotonic()
        drive_traffic(node, clients)
        log(f"traffic done in {time.monotonic() - started:.1f}s")
        wait_for_records(logpath, clients.requests)
        rc = stop_agent(agent)
        log(f"agent exited with status {rc}")
    finally:
        tail.stop()
    for p in clients.problems:
        log(f"warning: {p}")
    ok = report(read_lines(logpath), started, clients.requests)
    log(f"demo took {time.monotonic() - t0:.1f}s (before teardown)")
    return 0 if ok and rc == 0 else 1


def main() -> int:
    if os.geteuid() != 0:
        print("redtap demo: must run as root (network namespaces, BPF); try: sudo make demo",
              file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _on_sigterm)
    node = Node(pods=4)
    try:
        return run(node)
    except KeyboardInterrupt:
        log("\ninterrupted")
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # let the teardown finish
        node.teardown()
        log(f"torn down namespaces {node.tag}-*")


if __name__ == "__main__":
    sys.exit(main())

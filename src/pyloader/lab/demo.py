"""redtap demo: trace real HTTP traffic on a throwaway namespace "node".

Run as root:  python -m pyloader.lab.demo   (or `make demo`)

It builds a node of network namespaces (pyloader.lab.netnode), starts nginx in
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

from pyloader.kernel.abi import LOSS_STATS
from pyloader.tools import top
from pyloader.lab.netnode import NODE_IP, Node

ENDPOINTS = ("198.18.0.10:80", "[2001:db8::a]:80", "198.18.0.11:8080")
METRICS_URL = f"http://{NODE_IP}:9400/metrics"  # the agent's --metrics-addr, in the node namespace
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


def hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def format_record(r: dict) -> str:
    """One compact line: time (UTC), client -> server, method, path, status, duration."""
    t = r.get("time", "")[11:23]
    client = hostport(r["client.address"], r["client.port"])
    server = hostport(r["server.address"], r["server.port"])
    target = r["url.path"] + (f"?{r['url.query']}" if "url.query" in r else "")
    status = r.get("http.response.status_code", "no response")
    line = (f"  {t} {client:>23} -> {server:<19} {r['http.request.method']:<5} "
            f"{target:<20} {status!s:<11} {r['duration_ms']:8.3f} ms")
    return line + k8s_names(r)


def k8s_names(r: dict) -> str:
    """'  [client-a -> shop/web-5d8f7-x1 svc web, Deployment web]' (Kubernetes metadata)."""
    if "server.k8s.pod.name" not in r and "client.k8s.pod.name" not in r:
        return ""
    server = f"{r.get('server.k8s.namespace.name', '?')}/{r.get('server.k8s.pod.name', '?')}"
    extra = [f"svc {r['server.k8s.service.name']}"] if "server.k8s.service.name" in r else []
    if "server.k8s.workload.name" in r:
        extra.append(f"{r['server.k8s.workload.kind']} {r['server.k8s.workload.name']}")
    return f"  [{r.get('client.k8s.pod.name', '-')} -> {server} {', '.join(extra)}]"


class PollingTail(threading.Thread):
    """A thread calling drain() every 0.1 s, and once more when stopped."""

    def __init__(self, name: str):
        super().__init__(daemon=True, name=name)
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.1):
            self.drain()
        self.drain()

    def drain(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(timeout=5)


class LogTail(PollingTail):
    """Prints access-log records (not event lines) as they are written."""

    def __init__(self, path: str):
        super().__init__("logtail")
        self.path, self.offset, self.partial = path, 0, b""

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


# -- the agent -----------------------------------------------------------------
def start_fake_api(node: Node):
    """The lab's test API server (lab/fakeapi.py) as the node's Kubernetes API:
    (server, agent args)."""
    from pyloader.lab.fakeobjs import demo_cluster
    api = demo_cluster(node)
    log(f"Kubernetes API (lab/fakeapi.py) on {api.url}: the agent gets no --endpoint")
    return api, ["--kubeconfig", api.kubeconfig(os.path.join(node.dir, "kubeconfig")),
                 "--node-name", "node-a"]


def start_agent(node: Node, logpath: str, k8s_args=()) -> subprocess.Popen:
    errpath = os.path.join(node.dir, "agent.stderr")
    args = list(k8s_args) or [a for ep in ENDPOINTS for a in ("--endpoint", ep)]
    args += ["--metrics-addr", f"{NODE_IP}:9400"]
    with open(errpath, "wb") as err:
        proc = node.spawn(node.node_ns, sys.executable, "-m", "pyloader", "run",
                          "--log", logpath, *args, stderr=err)
    end = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < end:
        start = find_event(read_lines(logpath), "redtap.start")
        if start:
            log(f"agent pid {proc.pid} traces {', '.join(start['endpoints'])} "
                f"on {', '.join(start['interfaces'])}")
            log(f"live view: sudo ip netns exec {node.node_ns} {sys.executable} -m pyloader top "
                f"--metrics-url {METRICS_URL}")
            while k8s_args and time.monotonic() < end + START_TIMEOUT_S:
                ev = find_event(read_lines(logpath), "redtap.endpoints")
                if ev:
                    log(f"from the API: traces {', '.join(ev['endpoints'])}")
                    break
                time.sleep(0.1)
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

    PAUSE_S = 0.1  # between steps, so the records show up between them

    def __init__(self, node: Node):
        self.node = node
        self.requests = 0
        self.problems: list[str] = []
        self.lock = threading.Lock()
        self.names = {node.node_ns: "node", node.ext_ns: "ext"}
        self.names.update({p.ns: f"pod{p.index}" for p in node.pods})

    def step(self, what: str, ns: str, desc: str) -> None:
        log(f"> {what:<22} from {self.names[ns]:<5} {desc}")

    def count(self, n: int, problem: str | None = None) -> None:
        with self.lock:
            self.requests += n
            if problem:
                self.problems.append(problem)

    def curl(self, what: str, ns: str, url: str, expect: int, *args: str) -> None:
        self.step(what, ns, " ".join(("curl", *args, url)))
        r = self.node.curl(ns, "-g", "-o", "/dev/null", "-w", "%{http_code}", *args, url)
        got = r.stdout.strip()
        self.count(1, None if got == str(expect) else
                   f"curl {url}: got {got!r}, expected {expect} {r.stderr.strip()}")
        time.sleep(self.PAUSE_S)

    def gen(self, what: str, ns: str, *args, pause: bool = True) -> None:
        """pyloader.lab.trafficgen: one JSON line per request made."""
        args = [str(a) for a in args]
        self.step(what, ns, "trafficgen " + " ".join(args))
        problem = None
        try:
            out = self.node.traffic(ns, *args).stdout
        except subprocess.CalledProcessError as e:
            out = e.stdout or ""
            problem = f"trafficgen {' '.join(args)} failed: {(e.stderr or '').strip()}"
        self.count(sum(1 for line in out.splitlines() if line.strip()), problem)
        if pause:
            time.sleep(self.PAUSE_S)

    def together(self, *jobs: tuple) -> None:
        """Run several trafficgen jobs (what, ns, args...) at the same time."""
        threads = [threading.Thread(target=self.gen, args=job, kwargs={"pause": False},
                                    daemon=True) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def drive_traffic(node: Node, c: Clients) -> None:
    p2, p3 = node.pods[2].ns, node.pods[3].ns
    ip0, ip1, ip0v6 = node.pods[0].ip, node.pods[1].ip, node.pods[0].ip6
    web, web6, py = f"http://{ip0}", f"http://[{ip0v6}]", f"http://{ip1}:8080"
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
    c.gen("reset before answer", p2, "reset", ip1, 8080, "/py/slow?ms=300")
    log("> four clients at once:")
    c.together(("keep-alive x10", node.ext_ns, "keepalive", ip1, 8080, 10, "/py/ka{i}"),
               ("keep-alive x20", p3, "keepalive", ip0, 80, 20, "/status/c{i}"),
               ("IPv6 pipelined x8", node.node_ns, "pipeline", ip0v6, 80, 8, "/status/v6p{i}"),
               ("404 keep-alive x5", p2, "keepalive", ip0, 80, 5, "/missing/{i}"))


def wait_for_records(logpath: str, want: int, timeout: float = SETTLE_TIMEOUT_S) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and len(records(read_lines(logpath))) < want:
        time.sleep(0.1)


# -- the report ----------------------------------------------------------------
def scrape_metrics(node: Node, requests: int, timeout: float = SETTLE_TIMEOUT_S) -> str:
    """The agent's /metrics, once it counts every request the clients made."""
    end, text = time.monotonic() + timeout, ""
    while True:
        r = node.ns_exec(node.node_ns, "curl", "-sS", "--noproxy", "*", "-m", "5", METRICS_URL,
                         check=False)
        if r.returncode == 0:
            text = r.stdout
            if metrics_total(text) >= requests or time.monotonic() > end:
                return text
        elif time.monotonic() > end:
            log(f"warning: cannot scrape {METRICS_URL}: {r.stderr.strip()}")
            return text
        time.sleep(0.1)


def metrics_total(text: str) -> int:
    return int(sum(r.total for r in top.rows(top.parse(text), None))) if text else 0


def report(lines: list[dict], window_s: float, requests: int, metrics: str = "") -> bool:
    recs = records(lines)
    rows = top.rows(top.parse(metrics), None, elapsed=window_s, top_routes=3) if metrics else []
    log("")  # the same aggregation that feeds Prometheus and `redtap top`
    log(top.render(rows, f"R.E.D. per server from {METRICS_URL} "
                         f"(rates over the {window_s:.1f}s of traffic; busiest routes below each)"))
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
    counted = metrics_total(metrics)
    ok = len(recs) == requests == counted
    log(f"\nclients made {requests} requests; the agent logged {len(recs)} records "
        f"and counted {counted} in its metrics: " + ("OK" if ok else "MISMATCH"))
    return ok


# -- main ----------------------------------------------------------------------
def _on_sigterm(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def start_servers(node: Node) -> None:
    web, py = node.pods[0], node.pods[1]
    node.start_nginx(web)
    node.start_pyserver(py)
    log(f"node {node.tag}: nginx on {web.ip}:80 and [{web.ip6}]:80, "
        f"python server on {py.ip}:8080")


def run(node: Node) -> int:
    node.setup()
    start_servers(node)
    logpath = os.path.join(node.dir, "access.log")
    api, k8s_args = start_fake_api(node)
    try:
        agent = start_agent(node, logpath, k8s_args)
    except BaseException:
        if api:
            api.stop()
        raise
    clients, tail = Clients(node), LogTail(logpath)
    tail.start()
    try:
        started = time.monotonic()
        drive_traffic(node, clients)
        window = time.monotonic() - started
        log(f"traffic done in {window:.1f}s")
        wait_for_records(logpath, clients.requests)
        metrics = scrape_metrics(node, clients.requests)
        rc = stop_agent(agent)
        log(f"agent exited with status {rc}")
    finally:
        tail.stop()
        if api:
            api.stop()
    for p in clients.problems:
        log(f"warning: {p}")
    ok = report(read_lines(logpath), window, clients.requests, metrics)
    return 0 if ok and rc == 0 else 1


def main() -> int:
    if os.geteuid() != 0:
        print("redtap demo: must run as root (network namespaces, BPF); try: sudo make demo",
              file=sys.stderr)
        return 1
    return run_torn_down(lambda: Node(pods=4), run)


def run_torn_down(make, body) -> int:
    """body(make()) with Ctrl-C and SIGTERM unwinding into the environment's
    teardown (its namespaces never outlive the demo)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited ignored
    t0 = time.monotonic()
    env = make()
    try:
        return body(env)
    except KeyboardInterrupt:
        log("\ninterrupted")
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # let the teardown finish
        env.teardown()
        log(f"torn down {env.tag}-* (demo took {time.monotonic() - t0:.1f}s)")


if __name__ == "__main__":
    sys.exit(main())

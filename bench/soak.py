"""`make soak`: the agent as a node runs it, at a steady rate for a long time,
its memory sampled (not part of `make test`; root; SOAK_MINUTES, default 60).

Each configuration gets its own simulated node (lab/netnode.py), all running
at once: nginx in pod0, hey in pod2 at a fixed rate in back-to-back chunks
(each chunk a new set of keep-alive connections and its own paths, so the
agent keeps meeting new connections and URLs), and the agent:

  C  log file only
  D  log file + --metrics-addr (scraped each sample) + Kubernetes names (lab/fakeapi.py)

The agent's log rotates by size (--log-max-bytes) and is followed as Fluent
Bit's tail would follow it, counting records. Every --interval seconds the
agent's RSS is sampled. At the end: records against nginx's own count
(stub_status), the kernel's loss counters from the agent's redtap.exit line,
the curve, and a verdict: growth over the last half of the run at most
--max-growth-mb (2 MB), every request logged, no loss.

Results: bench/results/soak-latest.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time

from pyloader.kernel.abi import LOSS_STATS
from pyloader.lab.netnode import NGINX_CONF, Node

import configs
import loadgen

HERE = os.path.dirname(os.path.abspath(__file__))
STATUS_PORT = 8099  # stub_status on the pod's loopback: never traced, not counted twice
STATUS_SERVER = """\
    server {{
        listen 127.0.0.1:%d;
        location = /stub {{ stub_status; }}
    }}
}}
""" % STATUS_PORT


def start_nginx(node: Node, pod) -> None:
    d = os.path.join(node.dir, "soak-nginx")
    os.makedirs(os.path.join(d, "www", "files"), exist_ok=True)
    template = NGINX_CONF.rstrip()[:-2] + STATUS_SERVER  # (the http block reopened)  # the same server, plus status
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(template.format(dir=d, port=80, access_log="off"))
    node.spawn(pod.ns, "taskset", "-c", loadgen.SERVER_CPU, "nginx", "-c", conf,
               "-e", os.path.join(d, "error.log"))
    node.wait_port(pod.ns, pod.ip, 80)


def nginx_requests(node: Node, pod) -> int:
    """stub_status's request count (it includes this status request itself)."""
    cp = node.ns_exec(pod.ns, "curl", "-sS", "--max-time", "5",
                      f"http://127.0.0.1:{STATUS_PORT}/stub")
    m = re.search(r"^\s*\d+\s+\d+\s+(\d+)\s*$", cp.stdout, re.M)
    if not m:
        raise RuntimeError(f"unexpected stub_status output: {cp.stdout!r} {cp.stderr!r}")
    return int(m.group(1))


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class LogFollower:
    """Counts the records of a log that rotates by size (PATH -> PATH.1), as
    a tail reader does: by the open file, finishing it when PATH is a new file."""

    def __init__(self, path: str):
        self.path, self.f, self.ino = path, None, None
        self.records = self.events = 0
        self.rest = b""
        self.exits: list[dict] = []

    def _count(self, data: bytes) -> None:
        data = self.rest + data
        cut = data.rfind(b"\n") + 1
        whole, self.rest = data[:cut], data[cut:]
        n = whole.count(b"\n")
        ev = whole.count(b'"event":"redtap.')
        if b'"event":"redtap.exit"' in whole:
            for line in whole.splitlines():
                if b'"event":"redtap.exit"' in line:
                    self.exits.append(json.loads(line))
        self.events += ev
        self.records += n - ev

    def poll(self) -> int:
        if self.f is None:
            try:
                self.f = open(self.path, "rb")
            except FileNotFoundError:
                return self.records
            self.ino = os.fstat(self.f.fileno()).st_ino
        while True:
            data = self.f.read(1 << 22)
            if data:
                self._count(data)
                continue
            try:
                ino = os.stat(self.path).st_ino
            except FileNotFoundError:
                return self.records
            if ino == self.ino:
                return self.records
            self.f.close()  # rotated: the old file was read to its end above
            self.f = open(self.path, "rb")
            self.ino = os.fstat(self.f.fileno()).st_ino


class Soak:
    """One configuration on its own node."""

    def __init__(self, name: str, rate: float, log_max: str):
        self.name, self.rate = name, rate
        self.agent = None
        self.node = Node(pods=4, tag=f"soak{name.lower()}{os.getpid() % 1000}").setup()
        try:  # (pods as in `make demo`: the fake API names pod0..pod3)
            self.server, self.client = self.node.pods[0], self.node.pods[2]
            start_nginx(self.node, self.server)
            ep = f"{self.server.ip}:80"
            self.agent = (configs.AgentFull(self.node, ep) if name == "D"
                          else configs.AgentRun(self.node, ep))
        except BaseException:
            self.close()
            raise
        self.agent.extra = ("--log-max-bytes", log_max, "--log-backups", "1")
        self.samples: list[dict] = []
        self.client_ok = self.client_errors = 0
        self.load_error = None

    def start(self) -> None:
        self.nginx_before = nginx_requests(self.node, self.server)
        self.agent.start(timeout=180)  # (the kubernetes client imports slowly on a busy machine)
        self.follow = LogFollower(self.agent.log_path)

    def load(self, until: float, chunk_s: float) -> None:
        """hey in chunks until @until: new connections and paths each chunk."""
        k = 0
        try:
            while (left := until - time.monotonic()) > 1:
                path = ("/", f"/status/soak-{k}?n={k}&token=t{k}", "/error")[k % 3]
                res = loadgen.hey(self.node, self.client, self.server, min(chunk_s, left),
                                  self.rate, path=path)
                self.client_ok += res["requests"]
                self.client_errors += res["errors"]
                k += 1
        except Exception as e:  # reported in the verdict, never silently
            self.load_error = repr(e)

    def sample(self, t0: float) -> dict:
        s = {"t_s": round(time.monotonic() - t0, 1), "rss_kb": rss_kb(self.agent.pid),
             "records": self.follow.poll()}
        if self.name == "D":
            s["metrics_bytes"] = self.agent.scrape()
        self.samples.append(s)
        return s

    def finish(self) -> dict:
        time.sleep(2)  # answers in flight reach the ring
        served = nginx_requests(self.node, self.server) - self.nginx_before - 1
        final = self._stop()
        kernel = final.get("kernel", {})
        losses = {k: kernel.get(k, 0) for k in (*LOSS_STATS, "lru_evicted_pending")}
        return {"config": self.name, "label": self.agent.label, "rate": self.rate,
                "served": served, "logged": self.follow.records,
                "client_answered": self.client_ok, "client_errors": self.client_errors,
                "load_error": self.load_error,
                "losses": {k: v for k, v in losses.items() if v},
                "log": final.get("log", {}), "agent": final.get("agent", {}),
                "samples": self.samples}

    def _stop(self) -> dict:
        rc = configs._terminate(self.agent.proc)
        self.agent.proc = None
        time.sleep(0.2)
        self.follow.poll()
        if rc != 0 or not self.follow.exits:
            raise RuntimeError(f"agent {self.name} exited {rc} without redtap.exit: "
                               f"{self.agent.stderr()}")
        return self.follow.exits[-1]

    def close(self) -> None:
        if getattr(self.agent, "proc", None):
            configs._terminate(self.agent.proc)
        if self.agent is not None and hasattr(self.agent, "close"):
            self.agent.close()
        self.node.teardown()


def growth(samples: list[dict], frac: float = 0.5) -> dict:
    """RSS at start, at the start of the last half, at the end, peak; MB."""
    if not samples:
        return {}
    half = [s for s in samples if s["t_s"] >= samples[-1]["t_s"] * (1 - frac)]
    mb = lambda kb: round(kb / 1024, 2)
    return {"first_mb": mb(samples[0]["rss_kb"]), "half_mb": mb(half[0]["rss_kb"]),
            "last_mb": mb(samples[-1]["rss_kb"]), "peak_mb": mb(max(s["rss_kb"] for s in samples)),
            "last_half_growth_mb": mb(max(s["rss_kb"] for s in half) - half[0]["rss_kb"]),
            "records_last_half": samples[-1]["records"] - half[0]["records"]}


def verdict(r: dict, max_growth_mb: float) -> list[str]:
    bad = []
    g = r["growth"]
    if g.get("last_half_growth_mb", 1e9) > max_growth_mb:
        bad.append(f"RSS grew {g.get('last_half_growth_mb')} MB over the last half (> {max_growth_mb})")
    if r["logged"] != r["served"]:
        bad.append(f"logged {r['logged']} of {r['served']} requests nginx served")
    if r["losses"]:
        bad.append(f"kernel losses {r['losses']}")
    if r["log"].get("dropped_lines"):
        bad.append(f"log dropped {r['log']['dropped_lines']} lines")
    if r["load_error"]:
        bad.append(f"load: {r['load_error']}")
    return bad


def report_md(res: dict) -> str:
    out = [f"# Soak: {res['minutes']} min at {res['rate']:g} req/s per config "
           f"({res['started']}, kernel {res['kernel']})", "",
           "| config | served (nginx) | logged | losses | RSS first / half / last / peak MB "
           "| growth last half MB | verdict |", "|---|---|---|---|---|---|---|"]
    for r in res["configs"]:
        g = r["growth"]
        out.append(f"| {r['config']} {r['label']} | {r['served']:,} | {r['logged']:,} | "
                   f"{sum(r['losses'].values())} | {g['first_mb']} / {g['half_mb']} / "
                   f"{g['last_mb']} / {g['peak_mb']} | {g['last_half_growth_mb']} | "
                   f"{'ok' if not r['verdict'] else '; '.join(r['verdict'])} |")
    out += ["", "RSS curve (MB, one column per config; every sample):", "",
            "| t (s) | " + " | ".join(r["config"] for r in res["configs"]) + " |",
            "|---|" + "---|" * len(res["configs"])]
    for i in range(max(len(r["samples"]) for r in res["configs"])):
        row = [r["samples"][i] if i < len(r["samples"]) else None for r in res["configs"]]
        t = next(s["t_s"] for s in row if s)
        out.append(f"| {t:.0f} | " + " | ".join(
            f"{s['rss_kb'] / 1024:.1f}" if s else "" for s in row) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", 60)))
    ap.add_argument("--rate", type=float, default=4000.0, help="requests/s per configuration")
    ap.add_argument("--configs", default="C,D")
    ap.add_argument("--interval", type=float, default=15.0, help="seconds between samples")
    ap.add_argument("--chunk", type=float, default=60.0, help="seconds per load chunk")
    ap.add_argument("--log-max-bytes", default="256M")
    ap.add_argument("--max-growth-mb", type=float, default=2.0)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "soak-latest"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: needs root (namespaces, BPF)", file=sys.stderr)
        return 2
    # SIGTERM (timeout, a CI runner) unwinds like ^C: the nodes are torn down
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    soaks = []
    try:
        for name in args.configs.split(","):
            soaks.append(Soak(name.strip(), args.rate, args.log_max_bytes))
        for s in soaks:
            s.start()
        t0 = time.monotonic()
        until = t0 + args.minutes * 60
        threads = [threading.Thread(target=s.load, args=(until, args.chunk), daemon=True)
                   for s in soaks]
        for t in threads:
            t.start()
        while time.monotonic() < until:
            time.sleep(max(0.0, min(args.interval, until - time.monotonic())))
            line = []
            for s in soaks:
                smp = s.sample(t0)
                line.append(f"{s.name} {smp['rss_kb'] / 1024:.1f} MB {smp['records']:,} rec")
            print(f"soak {time.monotonic() - t0:7.0f}s  " + "   ".join(line), flush=True)
        for t in threads:
            t.join(args.chunk + 90)
        results = []
        for s in soaks:
            s.sample(t0)
            r = s.finish()
            r["growth"] = growth(r["samples"])
            r["verdict"] = verdict(r, args.max_growth_mb)
            results.append(r)
    finally:
        for s in soaks:
            s.close()
    res = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() - args.minutes * 60)),
           "kernel": os.uname().release, "minutes": args.minutes, "rate": args.rate,
           "interval_s": args.interval, "max_growth_mb": args.max_growth_mb, "configs": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    md = report_md(res)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print(md)
    ok = all(not r["verdict"] for r in results)
    print("soak: PASS" if ok else "soak: FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

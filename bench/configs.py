"""The benchmark's configurations, each started and stopped around one cell:

  A  no redtap
  B  redtap's programs attached, no consumer (bench/kernel_only.py)
  S  the same on the server pod's veth only (a diagnostic: B - S is what the
     programs cost on the client's veth, where every packet exits early)
  F  the reference floor of issue 16 (bench/floor.bpf.c), attached and drained as B
  C  the full agent (`python -m pyloader run --endpoint ...`, log to a file)
  D  the full agent with --metrics-addr and Kubernetes metadata from
     lab/fakeapi.py (served in the node namespace; pods named as in `make demo`)
  N  no redtap; nginx writes its own JSON access log (buffer=64k, same disk):
     what an SRE compares redtap with
  M  C with its log on tmpfs (/dev/shm): a diagnostic, C - M is what the log's
     disk (page cache writeback, the file system) costs the node

start() returns once tracing is on; stop() returns the final counters
({"kernel": {...}, "agent": {...}, ...} as in the agent's redtap.exit line).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from pyloader.lab.netnode import NODE_IP, Node

import loadgen
import probe

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")
METRICS_PORT = 9400
K8S_NODE = "node-a"


def _terminate(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=10)


class NoRedtap:
    name, label = "A", "no redtap"
    traced = False  # no redtap programs on the hooks
    pid = None
    log_path = None

    def start(self) -> None:
        pass

    def stop(self) -> dict:
        return {}


class NginxLog:
    """No redtap; the bench nginx reloaded with its own buffered JSON log."""
    name, label = "N", "no redtap, nginx's own JSON log (buffered)"
    traced = False
    pid = None
    log_path = None  # not redtap's: the cell measures no agent

    def __init__(self, node: Node, pod):
        self.node, self.pod = node, pod
        self.path = None

    def start(self) -> None:
        self.path = os.path.join(self.node.dir, f"nginx-access-{time.monotonic_ns()}.json")
        loadgen.reload_nginx(self.node, self.pod, self.path)

    def stop(self) -> dict:
        loadgen.reload_nginx(self.node, self.pod, None)  # the old worker flushes as it exits
        with open(self.path, "rb") as f:
            records = sum(1 for line in f if line.endswith(b"}\n"))
        os.unlink(self.path)
        return {"log_records": records}


class KernelOnly:
    name, label = "B", "programs attached, no consumer"
    log_path = None

    def __init__(self, node: Node, endpoint: str, ifaces: tuple = (), floor: bool = False):
        self.node, self.endpoint, self.ifaces, self.floor = node, endpoint, ifaces, floor
        self.proc = None
        self.pid = None
        if ifaces:
            self.name, self.label = "S", f"programs on {', '.join(ifaces)} only, no consumer"
        if floor:
            self.name, self.label = "F", "reference floor (bench/floor.bpf.c), attached as B"

    def start(self, timeout: float = 30.0) -> None:
        self.out = os.path.join(self.node.dir, f"kernel-only-{time.monotonic_ns()}.out")
        self.err = os.path.join(self.node.dir, "kernel-only.stderr")
        with open(self.out, "w") as o, open(self.err, "a") as e:
            self.proc = self.node.spawn(self.node.node_ns, sys.executable,
                                        os.path.join(HERE, "kernel_only.py"),
                                        "--endpoint", self.endpoint,
                                        *(a for i in self.ifaces for a in ("--iface", i)),
                                        *(("--floor",) if self.floor else ()),
                                        stdout=o, stderr=e)
        self.pid = self.proc.pid
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._lines():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"kernel_only.py did not start: {open(self.err).read()[-2000:]}")

    def _lines(self) -> list[dict]:
        with open(self.out) as f:
            return [json.loads(l) for l in f if l.strip()]

    def stop(self) -> dict:
        if self.proc is None:
            return {}
        rc = _terminate(self.proc)
        lines = self._lines()
        self.proc = None
        final = lines[-1] if lines and "kernel" in lines[-1] else {}
        if rc != 0 or not final:
            raise RuntimeError(f"kernel_only.py exited {rc}: {open(self.err).read()[-2000:]}")
        return {"kernel": final["kernel"], "agent": {"max_rss_kb": final["max_rss_kb"],
                                                      "cpu_s": final["cpu_s"]}}


class AgentRun:
    """`python -m pyloader run` in the node namespace, its log in a file."""
    name, label = "C", "full agent"

    def __init__(self, node: Node, endpoint: str, extra: tuple = (), log_dir: str | None = None):
        self.node, self.endpoint, self.extra = node, endpoint, extra
        self.log_dir = log_dir or node.dir
        self.proc = None
        self.pid = None
        self.log_path = None
        if log_dir:
            self.name, self.label = "M", f"full agent, log on {log_dir}"

    def args(self) -> list[str]:
        return ["--endpoint", self.endpoint, *self.extra]

    def start(self, timeout: float = 60.0) -> None:
        self.log_path = os.path.join(self.log_dir, f"agent-{self.name}-{time.monotonic_ns()}.log")
        self.err = os.path.join(self.node.dir, f"agent-{self.name}.stderr")
        with open(self.err, "a") as e:
            self.proc = self.node.spawn(self.node.node_ns, sys.executable, "-m", "pyloader",
                                        "run", "--log", self.log_path, *self.args(), stderr=e)
        self.pid = self.proc.pid  # `ip netns exec` execs: the agent keeps this pid
        self._wait(lambda ev: any(l.get("event") == "redtap.start" for l in ev), timeout)

    def _wait(self, cond, timeout: float) -> list[dict]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            _, ev = probe.count_log(self.log_path)
            if cond(ev):
                return ev
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}: {self.stderr()}")
            time.sleep(0.05)
        raise RuntimeError(f"agent {self.name}: not ready after {timeout}s: {self.stderr()}")

    def stderr(self) -> str:
        with open(self.err) as f:
            return f.read()[-3000:]

    def stop(self) -> dict:
        if self.proc is None:
            return {}
        rc = _terminate(self.proc)
        self.proc = None
        records, ev = probe.count_log(self.log_path)
        exits = [l for l in ev if l.get("event") == "redtap.exit"]
        if rc != 0 or not exits:
            raise RuntimeError(f"agent {self.name} exited {rc} without redtap.exit: "
                               f"{self.stderr()}")
        out = {k: v for k, v in exits[-1].items() if k not in ("event", "time")}
        out["log_records"] = records
        os.unlink(self.log_path)  # tens of MB per cell
        return out


class AgentFull(AgentRun):
    """C plus /metrics and Kubernetes names (fake API in the node namespace)."""
    name, label = "D", "agent + metrics + k8s names"

    def __init__(self, node: Node, endpoint: str, k8s: bool = True):
        super().__init__(node, endpoint)
        self.k8s = k8s
        self.api = None
        self.kubeconfig = None
        if k8s:
            from pyloader.lab.fakeobjs import demo_cluster  # the pods of `make demo` (pod0 web, pod2 client-a)
            self.api = demo_cluster(node, K8S_NODE)
            self.kubeconfig = self.api.kubeconfig(os.path.join(node.dir, "kubeconfig"))
        if not k8s:
            self.label = "agent + metrics"

    def args(self) -> list[str]:
        a = super().args() + ["--metrics-addr", f"{NODE_IP}:{METRICS_PORT}"]
        if self.k8s:
            a += ["--kubeconfig", self.kubeconfig, "--node-name", K8S_NODE]
        return a

    def start(self, timeout: float = 60.0) -> None:
        super().start(timeout)
        if self.k8s:  # the endpoints line comes once this node's pods and slices are listed
            self._wait(lambda ev: any(l.get("event") == "redtap.endpoints" for l in ev), timeout)

    def scrape(self) -> int:
        """One scrape of /metrics (bytes), to show it served."""
        cp = self.node.curl(self.node.node_ns, f"http://{NODE_IP}:{METRICS_PORT}/metrics")
        return len(cp.stdout) if cp.returncode == 0 else -1

    def close(self) -> None:
        if self.api:
            self.api.stop()
            self.api = None

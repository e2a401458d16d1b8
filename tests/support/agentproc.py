"""The agent as the end-to-end tests run it, and tc listings: helpers shared by tests."""
from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time

from pyloader.lab.netnode import Node


class AgentProc:
    """`redtap run` inside the node namespace, writing to its own log file."""

    def __init__(self, node: Node, *args: str, name: str = "agent"):
        self.node = node
        self.log = os.path.join(node.dir, f"{name}-{time.monotonic_ns()}.log")
        self.err = open(os.path.join(node.dir, f"{name}.stderr"), "w")
        self.proc = node.spawn(node.node_ns, sys.executable, "-m", "pyloader", "run",
                               "--log", self.log, *args, stderr=self.err)
        self.offset = 0

    def wait_started(self, timeout: float = 30.0) -> "AgentProc":
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(l.get("event") == "redtap.start" for l in self.lines()):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}: {self.stderr()}")
            time.sleep(0.05)
        raise RuntimeError(f"agent did not start in {timeout}s: {self.stderr()}")

    def stderr(self) -> str:
        self.err.flush()
        with open(self.err.name) as f:
            return f.read()

    def lines(self) -> list[dict]:
        if not os.path.exists(self.log):
            return []
        with open(self.log, "rb") as f:
            data = f.read()
        data = data[:data.rfind(b"\n") + 1]  # a line being written is not a line yet
        return [json.loads(l) for l in data.splitlines() if l.strip()]

    def records(self) -> list[dict]:
        """Access-log records (lines without an "event" key)."""
        return [l for l in self.lines() if "event" not in l]

    def mark(self) -> None:
        """Later new_records() return only records logged after this point."""
        self.offset = len(self.records())

    def new_records(self, expect: int, timeout: float = 10.0, settle: float = 0.3) -> list[dict]:
        """Wait until at least `expect` new records are there (then a little more,
        so that extra records would be seen too)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len(self.records()) - self.offset >= expect:
                break
            time.sleep(0.05)
        time.sleep(settle)
        recs = self.records()[self.offset:]
        self.offset += len(recs)
        return recs

    def counters(self) -> dict:
        stats = [l for l in self.lines() if l.get("event") in ("redtap.stats", "redtap.exit")]
        return stats[-1] if stats else {}

    def counters_now(self, timeout: float = 10.0) -> dict:
        """The first stats line written after this call (--stats-interval):
        its counters include everything counted before the call."""
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for l in self.lines():
                if l.get("event") in ("redtap.stats", "redtap.exit") and l["time"] > now:
                    return l
            assert self.proc.poll() is None, f"agent exited: {self.stderr()}"
            time.sleep(0.1)
        raise AssertionError(f"no stats line after {now} in {timeout} s")

    def kernel_since(self, before: dict) -> dict:
        """Kernel counters counted since @before (a counters_now() line), the
        ones that changed."""
        now, was = self.counters_now()["kernel"], before["kernel"]
        return {k: v - was.get(k, 0) for k, v in now.items() if v != was.get(k, 0)}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


def tc_filters(node: Node, dev: str) -> str:
    """`tc filter show` of both clsact hooks of a device in the node namespace."""
    out = ""
    for hook in ("ingress", "egress"):
        r = node.ns_exec(node.node_ns, "tc", "filter", "show", "dev", dev, hook, check=False)
        out += r.stdout
    return out


def tc_qdiscs(node: Node, dev: str) -> str:
    return node.ns_exec(node.node_ns, "tc", "qdisc", "show", "dev", dev, check=False).stdout


def client_lines(cp) -> list[dict]:
    """The JSON lines a pyloader.lab.trafficgen run printed."""
    return [json.loads(l) for l in cp.stdout.splitlines() if l.strip()]

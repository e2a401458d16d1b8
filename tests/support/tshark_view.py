"""tshark as a second opinion: capture on an interface of the test node,
then read the capture with the corpus' truth tool (../shared/corpus/tools/
tshark_truth.py, tshark's HTTP dissector) and compare with redtap's records."""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict

from support import SHARED

TRUTH_TOOL = os.path.join(SHARED, "corpus", "tools", "tshark_truth.py")
SAVE_DIR = os.environ.get("REDTAP_SAVE_CAPTURES")  # keep the captures (tests/captures/)


class Capture:
    """tshark writing a pcap of `filter` on `iface` of the node namespace."""

    def __init__(self, node, iface: str, path: str, bpf_filter: str = "tcp"):
        self.node, self.path = node, path
        self.err = path + ".err"
        self.proc = node.spawn(node.node_ns, "tshark", "-q", "-i", iface, "-f", bpf_filter,
                               "-w", path, stderr=open(self.err, "w"))

    def __enter__(self):
        deadline = time.monotonic() + 20
        while "Capturing on" not in open(self.err).read():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("tshark did not start: " + open(self.err).read())
            time.sleep(0.1)
        time.sleep(1.0)  # "Capturing on" comes a little before the socket sees packets
        return self

    def __exit__(self, *exc):
        time.sleep(0.3)
        os.killpg(self.proc.pid, signal.SIGINT)
        self.proc.wait(timeout=15)

    def save(self, name: str) -> None:
        if SAVE_DIR:
            os.makedirs(SAVE_DIR, exist_ok=True)
            shutil.copy(self.path, os.path.join(SAVE_DIR, name + ".pcap"))


def truth(pcap: str, http_ports=(80, 8080)) -> list[dict]:
    """tshark's transactions (in-order pairing view) of a capture."""
    prefix = pcap + ".truth"
    args = [sys.executable, TRUTH_TOOL, pcap, prefix]
    for p in http_ports:
        args += ["--decode-as", f"tcp.port=={p},http"]
    subprocess.run(args, check=True, capture_output=True, text=True)
    with open(prefix + ".fifo.jsonl") as f:
        return [json.loads(l) for l in f if l.strip()]


def _conn(cip, cport, sip, sport):
    return (str(ipaddress.ip_address(cip)), int(cport), str(ipaddress.ip_address(sip)), int(sport))


def compare(records: list[dict], rows: list[dict]) -> dict:
    """Per connection, in order: method, URI, status must agree; returns the
    mismatches and the timing differences (ms) of first and last bytes."""
    exp, obs = defaultdict(list), defaultdict(list)
    for t in rows:
        if t["kind"] == "response_only" or t.get("interim"):
            continue
        exp[_conn(t["client_ip"], t["client_port"], t["server_ip"], t["server_port"])].append(t)
    for r in records:
        obs[_conn(r["client.address"], r["client.port"], r["server.address"],
                  r["server.port"])].append(r)
    problems, first, last = [], [], []
    for key in set(exp) | set(obs):
        e = sorted(exp.get(key, []), key=lambda t: t["request_first_time_epoch"])
        o = obs.get(key, [])
        if len(e) != len(o):
            problems.append(f"{key}: tshark {len(e)}, redtap {len(o)}")
            continue
        for t, r in zip(e, o):
            uri = r["url.path"] + ("?" + r["url.query"] if "url.query" in r else "")
            status = r.get("http.response.status_code")
            want_status = t["status"] if t["kind"] == "pair" else None
            if (t["method"], t["uri"][:256], want_status) != (r["http.request.method"], uri, status):
                problems.append(f"{key}: tshark {(t['method'], t['uri'][:60], want_status)} "
                                f"redtap {(r['http.request.method'], uri[:60], status)}")
                continue
            if t["kind"] == "pair":
                first.append(abs(r["duration_ms"] - 1000 * (t["response_first_time_epoch"]
                                                            - t["request_first_time_epoch"])))
                if "response.duration_ms" in r:
                    last.append(abs(r["response.duration_ms"] - 1000 * (
                        t["response_time_epoch"] - t["request_first_time_epoch"])))
    return {"problems": problems, "first_ms": sorted(first), "last_ms": sorted(last),
            "pairs": sum(len(v) for v in exp.values())}


def p99(values: list[float]) -> float:
    return values[int(0.99 * (len(values) - 1))] if values else 0.0

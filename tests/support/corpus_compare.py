"""Compare `redtap replay` of a capture with the corpus' tshark truth."""
from __future__ import annotations

import ipaddress
import json
import os
from collections import defaultdict

from support import SHARED

from pyloader.tools.replay import replay

CORPUS = os.path.join(SHARED, "corpus")


def norm_ip(s: str) -> str:
    return str(ipaddress.ip_address(s))


def truth_of(pcap: str) -> list[dict]:
    with open(os.path.join(CORPUS, "truth", pcap + ".jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]


def conn_of(client_ip, client_port, server_ip, server_port):
    return (norm_ip(client_ip), int(client_port), norm_ip(server_ip), int(server_port))


def expected(truth: list[dict]) -> dict:
    """Per connection, in order: (method, uri, status or None, first-byte latency ms)."""
    out = defaultdict(list)
    for t in truth:
        if t["kind"] == "response_only" or t.get("interim"):
            continue
        lat = None
        if t["kind"] == "pair":
            lat = (t["response_first_time_epoch"] - t["request_first_time_epoch"]) * 1000
        key = conn_of(t["client_ip"], t["client_port"], t["server_ip"], t["server_port"])
        out[key].append((t["method"], t["uri"], t["status"] if t["kind"] == "pair" else None,
                         t["request_first_time_epoch"], lat))
    for v in out.values():
        v.sort(key=lambda x: x[3])
    return out


def observed(records: list[dict]) -> dict:
    out = defaultdict(list)
    for r in records:
        key = conn_of(r["client.address"], r["client.port"], r["server.address"], r["server.port"])
        uri = r["url.path"] + ("?" + r["url.query"] if "url.query" in r else "")
        method = r.get("http.request.method_original", r["http.request.method"])
        out[key].append((method, uri, r.get("http.response.status_code"),
                         r["time"], r["duration_ms"], r.get("url.truncated", False)))
    return out


def compare(pcap: str, log_path: str, endpoints=None) -> dict:
    """problems: (connection 4-tuple, request index on it or None for the
    whole connection, what differs); timing_err_ms: |redtap - tshark|
    first-byte latency of every agreeing pair."""
    counters = replay(os.path.join(CORPUS, "pcaps", pcap), endpoints, log_path)
    with open(log_path) as f:
        recs = [json.loads(l) for l in f if l.strip()]
    exp, obs = expected(truth_of(pcap)), observed(recs)
    agree = disagree = 0
    timing = []
    problems = []
    for key in sorted(set(exp) | set(obs), key=str):
        e, o = exp.get(key, []), obs.get(key, [])
        if len(e) != len(o):
            problems.append((key, None, f"tshark {len(e)} requests, redtap {len(o)}"))
        for i, (te, to) in enumerate(zip(e, o)):
            m, uri, status, _, lat = te
            om, ouri, ostatus, _, odur, trunc = to
            same_uri = ouri == uri or (trunc and uri.startswith(ouri))
            if (m, status) == (om, ostatus) and same_uri:
                agree += 1
                if lat is not None and ostatus is not None:
                    timing.append(abs(odur - lat))
            else:
                disagree += 1
                problems.append((key, i, f"tshark {(m, uri[:60], status)} "
                                         f"redtap {(om, ouri[:60], ostatus)}"))
    n_exp = sum(len(v) for v in exp.values())
    return {"pcap": pcap, "expected": n_exp, "logged": len(recs), "agree": agree,
            "disagree": disagree, "problems": problems, "timing_err_ms": timing,
            "counters": {k: v for k, v in counters.items() if v}}

"""llhttp's HTTP message vectors (../shared/corpus/vectors), each sent over
its own real TCP connection between two pods, traced on the veths. Every
vector's records, in order, are what llhttp parsed, except the known
differences below (each pinned to what redtap logs, and why)."""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

import pytest

from support import SHARED, llhttp_wire
from support.agentproc import AgentProc

VECTORS = os.path.join(SHARED, "corpus", "vectors", "llhttp_vectors.jsonl")
PORT = "9000"
USABLE = 96  # vectors of the file that make sense on the wire (llhttp_wire.usable)

# vector id -> (what redtap logs, why it differs from llhttp)
KNOWN_DIFFERENCES = {
    # Both open their connection with an empty line (RFC 9112 2.2: a server
    # should ignore one). redtap takes up a connection only at a segment that
    # starts with a method (src/bpf/redtap.bpf.c handle()), so that other text
    # on a traced port makes no state; empty lines are skipped only between
    # messages of a connection it follows.
    "request/sample.md:288": ([], "an empty line before the first request line"),
    "request/sample.md:478": ([], "an empty line before the first request line"),
}


def expected_of(v: dict) -> list[tuple]:
    if v["kind"] == "request":
        return [(m["method"], m["url"][:256], 200) for m in v["messages"]]
    return [(llhttp_wire.client_method(v), f"/v{i}", m["status"])
            for i, m in enumerate(llhttp_wire.finals(v))]


def test_llhttp_vectors_over_real_tcp(node):
    if not os.path.exists(VECTORS):
        pytest.fail(f"llhttp vectors not found at {VECTORS}")
    vectors = llhttp_wire.load(VECTORS)
    server, client = node.pods[1], node.pods[2]
    agent = AgentProc(node, "--endpoint", f"{server.ip}:{PORT}", "--stats-interval", "0.5",
                      name="llhttp-agent").wait_started()
    try:
        slog, clog = os.path.join(node.dir, "ll-server.log"), os.path.join(node.dir, "ll-client.log")
        node.spawn(server.ns, sys.executable, llhttp_wire.__file__, "server",
                   VECTORS, PORT, slog)
        node.ns_exec(client.ns, sys.executable, llhttp_wire.__file__, "client",
                     VECTORS, server.ip, PORT, clog, timeout=600)
        want = sum(len(KNOWN_DIFFERENCES[v["id"]][0]) if v["id"] in KNOWN_DIFFERENCES
                   else len(expected_of(v)) for v in vectors)
        recs = agent.new_records(want, timeout=30, settle=1)
    finally:
        assert agent.stop() == 0

    with open(clog) as f:
        port_of = {json.loads(l)["id"]: json.loads(l)["client_port"] for l in f}
    by_port = defaultdict(list)
    for r in recs:
        method = r.get("http.request.method_original", r["http.request.method"])
        uri = r["url.path"] + ("?" + r["url.query"] if "url.query" in r else "")
        by_port[r["client.port"]].append((method, uri, r.get("http.response.status_code")))

    assert len(vectors) == USABLE, f"{len(vectors)} usable vectors, expected {USABLE}"
    assert sorted(port_of) == sorted(v["id"] for v in vectors), "a vector was not sent"
    assert len(set(port_of.values())) == len(vectors), "two vectors on one client port"
    per_file = defaultdict(lambda: [0, 0])
    differ = {}
    for v in vectors:
        exp, got = expected_of(v), by_port.pop(port_of[v["id"]], [])
        per_file[v["file"]][1] += 1
        if got == exp:
            per_file[v["file"]][0] += 1
        else:
            differ[v["id"]] = (exp, got)
    assert not by_port, f"records on no vector's connection: {dict(by_port)}"
    print(f"\nllhttp vectors over TCP: {sum(a for a, _ in per_file.values())}/{len(vectors)} agree")
    for f, (a, t) in sorted(per_file.items()):
        print(f"  {f:40} {a:3}/{t}")
    unexplained = {i: d for i, d in differ.items()
                   if i not in KNOWN_DIFFERENCES or d[1] != KNOWN_DIFFERENCES[i][0]}
    assert not unexplained, f"(llhttp, redtap) per vector: {unexplained}"
    gone = sorted(set(KNOWN_DIFFERENCES) - set(differ))
    assert not gone, f"known differences that went away (update the list): {gone}"

"""Attaching and detaching on a real node: cleanup, foreign filters, kill -9,
bridge following, the --attach bridge blind spot, and TC chain transparency.

Access-log records are read after the agent has exited (it drains the ring
buffer at exit), so these tests check what was traced, not how soon.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import time

import pytest

from support.agentproc import AgentProc, tc_filters, tc_qdiscs
from pyloader.lab.netnode import EXT_IP

N = 20
SINK = "rtsink0"  # a veth pair in the node ns that mirrored copies are sent into


# -- helpers ---------------------------------------------------------------
def nx(node, *cmd, check=True):
    return node.ns_exec(node.node_ns, *cmd, check=check)


def ports(node) -> list[str]:
    """Names of the interfaces enslaved to the node's bridge, now."""
    out = nx(node, "ip", "-o", "link", "show", "master", node.bridge).stdout
    return [l.split(":")[1].strip().split("@")[0] for l in out.splitlines() if l.strip()]


def redtap_names(node, dev) -> list[str]:
    return re.findall(r"\b(redtap:\w+)", tc_filters(node, dev))


def prog_ids(node, dev) -> set[str]:
    return set(re.findall(r"redtap:\w+ .*? id (\d+)", tc_filters(node, dev)))


def has_clsact(node, dev) -> bool:
    return "clsact" in tc_qdiscs(node, dev)


def wait_for(pred, timeout=5.0, step=0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def get(node, ns, url) -> str:
    r = node.curl(ns, "-o", "/dev/null", "-w", "%{http_code}", url)
    return r.stdout.strip() + r.stderr


def keepalive(node, ns, ip, port, n, path):
    lines = [json.loads(l) for l in node.traffic(ns, "keepalive", ip, str(port), str(n),
                                                  path).stdout.splitlines() if l.strip()]
    assert [l["status"] for l in lines] == [200] * n, lines


def stop_ok(agent, sig=signal.SIGTERM) -> None:
    rc = agent.stop(sig)
    assert rc == 0, f"agent exited {rc}: {agent.stderr()}"


def add_counter(node, dev, hook, prio, match=("u32", "0", "0")) -> None:
    """A foreign u32 filter whose mirred action counts packets and lets the
    chain go on ("continue" = TC_ACT_UNSPEC), like redtap's own programs."""
    nx(node, "tc", "filter", "add", "dev", dev, hook, "prio", str(prio), "protocol",
       "ip" if match[0] != "u32" else "all", "u32", "match", *match,
       "action", "mirred", "egress", "mirror", "dev", SINK, "continue")


def counters(node, dev, hook) -> dict[int, int]:
    """prio -> packets counted by the actions of the foreign filters on a hook."""
    out = {}
    js = json.loads(nx(node, "tc", "-s", "-j", "filter", "show", "dev", dev, hook).stdout or "[]")
    for f in js:
        for a in f.get("options", {}).get("actions", []):
            out[f["pref"]] = out.get(f["pref"], 0) + a["stats"]["packets"]
    return out


@pytest.fixture
def sink(node):
    nx(node, "ip", "link", "add", SINK, "type", "veth", "peer", "name", "rtsink1")
    for d in (SINK, "rtsink1"):
        nx(node, "ip", "link", "set", d, "up")
    yield SINK
    nx(node, "ip", "link", "del", SINK, check=False)


@pytest.fixture(autouse=True)
def scrub(node):
    """Each test starts clean and, whatever it leaves (a failed assertion's
    residue), the next one does not inherit it."""
    for dev in ports(node) + [node.bridge, "uplink0"]:
        assert not has_clsact(node, dev), f"{dev} not clean before the test: {tc_qdiscs(node, dev)}"
    yield
    for dev in ports(node) + [node.bridge, "uplink0"]:
        nx(node, "tc", "qdisc", "del", "dev", dev, "clsact", check=False)


# -- 1 ---------------------------------------------------------------------
def test_sigterm_removes_filters_and_created_qdisc(node):
    veths = ports(node)
    assert len(veths) >= 4
    agent = AgentProc(node)
    try:
        agent.wait_started()
        for dev in veths:
            assert sorted(redtap_names(node, dev)) == ["redtap:req", "redtap:resp"], dev
            assert has_clsact(node, dev), dev
        stop_ok(agent)
    finally:
        agent.stop(signal.SIGKILL)
    assert agent.lines()[-1].get("event") == "redtap.exit"
    for dev in veths:
        assert redtap_names(node, dev) == [], f"{dev}: {tc_filters(node, dev)}"
        assert not has_clsact(node, dev), f"{dev}: {tc_qdiscs(node, dev)}"


# -- 2 ---------------------------------------------------------------------
def test_foreign_filter_and_qdisc_left_alone(node, sink):
    pod0, pod2 = node.pods[0], node.pods[2]
    nx(node, "tc", "qdisc", "add", "dev", "veth0", "clsact")
    for hook in ("ingress", "egress"):
        add_counter(node, "veth0", hook, 1)
    before = tc_filters(node, "veth0")
    agent = AgentProc(node, "--endpoint", f"{pod0.ip}:80")
    try:
        agent.wait_started()
        c0 = {h: counters(node, "veth0", h).get(1) for h in ("ingress", "egress")}
        assert c0["ingress"] is not None and c0["egress"] is not None, tc_filters(node, "veth0")
        assert sorted(redtap_names(node, "veth0")) == ["redtap:req", "redtap:resp"]
        keepalive(node, pod2.ns, pod0.ip, 80, N, "/status/foreign{i}")
        for h in ("ingress", "egress"):  # the foreign filter still sees every packet
            assert counters(node, "veth0", h)[1] >= c0[h] + N, h
        stop_ok(agent)
    finally:
        agent.stop(signal.SIGKILL)
    recs = [r for r in agent.records() if r["url.path"].startswith("/status/foreign")]
    assert len(recs) == N, f"{len(recs)} records for {N} requests"
    assert redtap_names(node, "veth0") == [], tc_filters(node, "veth0")
    assert has_clsact(node, "veth0"), "the agent deleted the clsact qdisc the test had created"
    after = tc_filters(node, "veth0")
    assert after.count("pref 1 u32") == before.count("pref 1 u32") >= 2, after
    assert all(len(counters(node, "veth0", h)) == 1 for h in ("ingress", "egress")), after
    nx(node, "tc", "qdisc", "del", "dev", "veth0", "clsact")


# -- 3 ---------------------------------------------------------------------
def test_kill9_leftovers_replaced_by_next_agent(node):
    pod0, pod2 = node.pods[0], node.pods[2]
    veths = ports(node)
    first = AgentProc(node, name="first")
    try:
        first.wait_started()
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    finally:
        first.stop(signal.SIGKILL)
    stale = {}
    for dev in veths:  # nothing cleaned up after a kill -9: that is the premise
        assert sorted(redtap_names(node, dev)) == ["redtap:req", "redtap:resp"], dev
        stale[dev] = prog_ids(node, dev)
        assert len(stale[dev]) == 2, tc_filters(node, dev)
    second = AgentProc(node, "--endpoint", f"{pod0.ip}:80", name="second")
    try:
        second.wait_started()
        for dev in veths:
            names = redtap_names(node, dev)
            assert sorted(names) == ["redtap:req", "redtap:resp"], f"{dev}: {tc_filters(node, dev)}"
            ids = prog_ids(node, dev)
            assert len(ids) == 2 and not ids & stale[dev], f"{dev}: stale programs kept: {ids}"
        keepalive(node, pod2.ns, pod0.ip, 80, N, "/status/second{i}")
        stop_ok(second)
    finally:
        second.stop(signal.SIGKILL)
    recs = [r for r in second.records() if r["url.path"].startswith("/status/second")]
    assert len(recs) == N, f"{len(recs)} records for {N} requests"
    for dev in veths:
        assert redtap_names(node, dev) == [], f"{dev}: {tc_filters(node, dev)}"


# -- 4 ---------------------------------------------------------------------
def test_bridge_follower_new_and_removed_pod(node):
    pod0, pod2 = node.pods[0], node.pods[2]
    agent = AgentProc(node, "--endpoint", "198.18.0.0/24")
    pod = None
    try:
        agent.wait_started()
        pod = node.add_pod()
        node.start_pyserver(pod)
        server = node.procs[-1]
        assert wait_for(lambda: sorted(redtap_names(node, pod.veth)) == ["redtap:req", "redtap:resp"]), \
            f"{pod.veth} not attached: {tc_filters(node, pod.veth)}"
        assert get(node, pod2.ns, f"http://{pod.ip}:8080/py/new-pod") == "200"
        # the pod goes away (its server first: it would keep the netns alive)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        node.remove_pod(pod)
        assert wait_for(lambda: pod.veth not in ports(node)), f"{pod.veth} still a port"
        time.sleep(1.0)
        assert agent.proc.poll() is None, f"agent died: {agent.stderr()}"
        assert get(node, pod2.ns, f"http://{pod0.ip}/status/after-remove") == "200"
        time.sleep(0.5)
        assert agent.proc.poll() is None, f"agent died: {agent.stderr()}"
        stop_ok(agent)
    finally:
        agent.stop(signal.SIGKILL)
        if pod is not None:
            node.remove_pod(pod)
    recs = agent.records()
    new = [r for r in recs if r["url.path"] == "/py/new-pod"]
    assert len(new) == 1 and new[0]["server.address"] == pod.ip, recs
    assert new[0]["http.response.status_code"] == 200
    after = [r for r in recs if r["url.path"] == "/status/after-remove"]
    assert len(after) == 1 and after[0]["server.address"] == pod0.ip, recs


# -- 5 ---------------------------------------------------------------------
def test_attach_bridge_misses_same_node_pod_to_pod(node):
    pod0, pod2 = node.pods[0], node.pods[2]
    agent = AgentProc(node, "--attach", "bridge", "--endpoint", f"{pod0.ip}:80")
    try:
        agent.wait_started()
        assert sorted(redtap_names(node, node.bridge)) == ["redtap:req", "redtap:resp"]
        for dev in ports(node):
            assert redtap_names(node, dev) == [], f"{dev}: {tc_filters(node, dev)}"
        keepalive(node, pod2.ns, pod0.ip, 80, N, "/status/pod2-{i}")
        keepalive(node, node.ext_ns, pod0.ip, 80, N, "/status/ext-{i}")
        stop_ok(agent)
    finally:
        agent.stop(signal.SIGKILL)
    recs = agent.records()
    from_pod2 = [r for r in recs if r["client.address"] == pod2.ip]
    from_ext = [r for r in recs if r["client.address"] == EXT_IP]
    msg = (f"--attach bridge: {len(from_pod2)}/{N} same-node pod-to-pod requests logged, "
           f"{len(from_ext)}/{N} requests from another node logged")
    assert len(from_pod2) == 0 and len(from_ext) == N, msg
    assert all(r["url.path"].startswith("/status/ext-") for r in from_ext), msg
    assert redtap_names(node, node.bridge) == [] and not has_clsact(node, node.bridge)


# -- 6 ---------------------------------------------------------------------
def test_later_tc_filter_sees_every_packet(node, sink):
    """Counters before (prio 1) and after (prio 60000) redtap's filter (21076)
    on both hooks of veth0, only for port-80 TCP: whatever reached redtap's
    program must reach the filter after it."""
    pod0, pod2 = node.pods[0], node.pods[2]
    n = 50
    nx(node, "tc", "qdisc", "add", "dev", "veth0", "clsact")
    port = {"egress": ("ip", "dport"), "ingress": ("ip", "sport")}
    for hook, (kw, field) in port.items():
        for prio in (1, 60000):
            add_counter(node, "veth0", hook, prio,
                        match=("ip", "protocol", "6", "0xff", "match", kw, field, "80", "0xffff"))

    def run(tag: str) -> dict[str, tuple[int, int]]:
        c0 = {h: counters(node, "veth0", h) for h in port}
        keepalive(node, pod2.ns, pod0.ip, 80, n, f"/status/{tag}{{i}}")
        time.sleep(0.5)  # the connection's FIN/ACKs
        c1 = {h: counters(node, "veth0", h) for h in port}
        return {h: (c1[h][1] - c0[h][1], c1[h][60000] - c0[h][60000]) for h in port}

    base = run("base")  # without redtap
    for h, (first, last) in base.items():
        assert first == last >= n, f"{h}: counters broken without redtap: {base}"
    agent = AgentProc(node, "--endpoint", f"{pod0.ip}:80")
    try:
        agent.wait_started()
        assert "pref 21076 bpf" in tc_filters(node, "veth0")
        traced = run("traced")
        stop_ok(agent)
    finally:
        agent.stop(signal.SIGKILL)
    msg = f"(before redtap, after redtap) packets: without redtap {base}, with redtap {traced}"
    for h, (first, last) in traced.items():
        assert first >= n, msg
        assert last == first, f"{h}: redtap stopped the TC chain: {msg}"
        assert last >= 0.9 * base[h][1], msg
    recs = [r for r in agent.records() if r["url.path"].startswith("/status/traced")]
    assert len(recs) == n, f"redtap did not trace the run it let through: {len(recs)}/{n}"
    assert len(counters(node, "veth0", "egress")) == 2  # both foreign filters survived
    nx(node, "tc", "qdisc", "del", "dev", "veth0", "clsact")


# -- 7 ---------------------------------------------------------------------
RESCANS = """
import gc, sys, threading
from pyloader.kernel.attach import BridgeFollower, TcAttacher
from pyloader.kernel.tracer import Tracer
from pyloader.memory import rss_kb
tracer = Tracer.load()
attacher = TcAttacher(tracer.prog_fds())
follower = BridgeFollower(attacher, sys.argv[1])
follower.reconcile()  # attaches, from the main thread, as the agent's start does
out = []
def rescans():  # then the follower's thread rescans, as it does every 2 s
    for _ in range(300):
        follower.reconcile()
    gc.collect()
    before = rss_kb()[0]
    for _ in range(int(sys.argv[2])):
        follower.reconcile()
    gc.collect()
    out.append(rss_kb()[0] - before)
    attacher.release_thread()
t = threading.Thread(target=rescans)
t.start()
t.join()
print(len(attacher.attached), out[0])
attacher.close()
tracer.close()
"""


def test_bridge_rescans_keep_memory_flat(node):
    """The follower's safety-net rescan (every 2 s, for days) must not grow the
    agent: 3,000 rescans (100 minutes' worth) from the follower's own thread
    after attaching from the main one. pyroute2 0.9 kept ~2 kB per link_lookup
    and part of each answer on an IPRoute shared by two threads (issue 14:
    the agent grew ~1 MB a minute); now under 1 MB for all 3,000."""
    cp = nx(node, sys.executable,
            "-c", RESCANS, node.bridge, "3000")
    ports_attached, growth_kb = map(int, cp.stdout.split())
    assert ports_attached == len(ports(node))
    assert growth_kb < 1024, f"RSS grew {growth_kb} kB over 3,000 rescans"

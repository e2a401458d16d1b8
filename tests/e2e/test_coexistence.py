"""Living with other TC programs and with crashes, on a real node.

* Real BPF programs (a counting sched_cls compiled here, attached with
  `tc filter ... bpf da obj`) before redtap on the same hooks, attached
  before the agent starts, and after redtap, attached while it runs: the
  later one counts exactly the packets the earlier one did, with the agent
  running and after it left (tests/e2e/test_attach.py does the same with u32
  filters and mirred actions).
* `kill -9` of the agent under load, restarts, again and again: a client
  loop sees zero failed requests, and at the end no filter, program or map
  of any of the runs is left.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from support.agentproc import AgentProc, tc_filters, tc_qdiscs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRIO_FIRST, PRIO_LAST = 1, 60000  # redtap's filters sit at 0x5254 = 21076

COUNTER_C = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* [0]: IPv4 TCP packets to or from port 80, [1]: their bytes */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} counts SEC(".maps");

SEC("tc")
int count80(struct __sk_buff *skb)
{
	struct iphdr ip;
	__u16 ports[2];
	__u32 k0 = 0, k1 = 1;
	__u64 *n, *b;

	if (skb->protocol != bpf_htons(0x0800) ||
	    bpf_skb_load_bytes(skb, 14, &ip, sizeof(ip)) < 0 || ip.protocol != 6 ||
	    bpf_skb_load_bytes(skb, 14 + ip.ihl * 4, ports, 4) < 0)
		return -1;
	if (ports[0] != bpf_htons(80) && ports[1] != bpf_htons(80))
		return -1;
	n = bpf_map_lookup_elem(&counts, &k0);
	b = bpf_map_lookup_elem(&counts, &k1);
	if (n && b) {
		__sync_fetch_and_add(n, 1);
		__sync_fetch_and_add(b, skb->len);
	}
	return -1; /* TC_ACT_UNSPEC: the next filter runs */
}

char LICENSE[] SEC("license") = "GPL";
"""

CLIENT_LOOP = r"""
import json, sys, time
from pyloader.lab.trafficgen import connect, read_response
import os
host, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ok, failed, errors, conns, done = 0, 0, [], 0, []
end = time.monotonic() + 600  # a bound; the test says when (its file @stop)
i = 0
while time.monotonic() < end and not os.path.exists(stop):
    try:
        s = connect(host, port)
        conns += 1
        f = s.makefile("rb")
        for _ in range(20):  # keep-alive requests on each connection
            t0 = time.monotonic()
            s.sendall(b"GET /status/loop%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            i += 1
            st = read_response(f)
            if st == 200:
                ok += 1
                done.append((i - 1, t0, time.monotonic()))  # sent, answered (monotonic)
            else:
                failed += 1
                errors.append(f"status {st}")
        s.close()
    except Exception as e:
        failed += 1
        errors.append(repr(e))
print(json.dumps({"ok": ok, "failed": failed, "connections": conns, "errors": errors[:10],
                  "done": done}))
"""


def nx(node, *cmd, check=True):
    return node.ns_exec(node.node_ns, *cmd, check=check)


def bridge_ports(node) -> list[str]:
    out = nx(node, "ip", "-o", "link", "show", "master", node.bridge).stdout
    return [l.split(":")[1].strip().split("@")[0] for l in out.splitlines() if l.strip()]


@pytest.fixture(scope="module")
def counter_obj(node) -> str:
    src, obj = os.path.join(node.dir, "count80.c"), os.path.join(node.dir, "count80.o")
    with open(src, "w") as f:
        f.write(COUNTER_C)
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-I", ROOT, "-c", src, "-o", obj],
                   check=True, capture_output=True, text=True)
    return obj


@pytest.fixture
def clean(node):
    """No clsact on any port before; whatever a failed test leaves is removed."""
    for dev in bridge_ports(node):
        assert "clsact" not in tc_qdiscs(node, dev), f"{dev} not clean: {tc_qdiscs(node, dev)}"
    yield
    for dev in bridge_ports(node):
        nx(node, "tc", "qdisc", "del", "dev", dev, "clsact", check=False)


def add_counter(node, obj, dev, hook, prio) -> None:
    nx(node, "tc", "filter", "add", "dev", dev, hook, "prio", str(prio), "handle", "1",
       "bpf", "da", "obj", obj, "sec", "tc")


def counter_map(node, dev, hook, prio) -> int:
    """The map id of the counting program at @prio on a hook."""
    js = json.loads(nx(node, "tc", "-j", "filter", "show", "dev", dev, hook).stdout or "[]")
    ids = [f["options"]["prog"]["id"] for f in js
           if f.get("pref") == prio and "prog" in f.get("options", {})]
    assert len(ids) == 1, f"no counting program at prio {prio} on {dev} {hook}: {js}"
    prog = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(ids[0])],
                                     check=True, capture_output=True, text=True).stdout)
    (map_id,) = prog["map_ids"]
    return map_id


def read_counts(map_id: int) -> tuple[int, int]:
    out = []
    for key in ("0", "1"):
        js = json.loads(subprocess.run(
            ["bpftool", "-j", "map", "lookup", "id", str(map_id), "key", key, "0", "0", "0"],
            check=True, capture_output=True, text=True).stdout)
        v = js.get("value", js.get("formatted", {}).get("value"))
        out.append(v if isinstance(v, int) else int.from_bytes(bytes(int(x, 16) for x in v), "little"))
    return out[0], out[1]


def keepalive(node, ns, ip, n, tag) -> None:
    cp = node.traffic(ns, "keepalive", ip, "80", str(n), f"/status/{tag}{{i}}")
    assert [json.loads(l)["status"] for l in cp.stdout.splitlines()] == [200] * n


def settle(maps: dict) -> dict:
    """Counter readings once no packet is in flight (two equal readings)."""
    prev = None
    for _ in range(50):
        now = {k: read_counts(m) for k, m in maps.items()}
        if now == prev:
            return now
        prev = now
        time.sleep(0.2)
    raise AssertionError(f"counters never settled: {prev}")


def test_bpf_programs_before_and_after_redtap_see_every_packet(node, clean, counter_obj):
    pod0, pod2 = node.pods[0], node.pods[2]
    dev, n = pod0.veth, 40
    nx(node, "tc", "qdisc", "add", "dev", dev, "clsact")
    for hook in ("ingress", "egress"):
        add_counter(node, counter_obj, dev, hook, PRIO_FIRST)
    agent = AgentProc(node, "--endpoint", f"{pod0.ip}:80", name="coexist")
    try:
        agent.wait_started()
        for hook in ("ingress", "egress"):  # attached while redtap runs, after it in the chain
            add_counter(node, counter_obj, dev, hook, PRIO_LAST)
        filters = tc_filters(node, dev)
        assert "redtap:req" in filters and "redtap:resp" in filters, filters
        maps = {(h, p): counter_map(node, dev, h, p)
                for h in ("ingress", "egress") for p in (PRIO_FIRST, PRIO_LAST)}
        c0 = settle(maps)
        keepalive(node, pod2.ns, pod0.ip, n, "coexist")
        for i in range(5):  # and new connections (SYN, FIN, ...)
            keepalive(node, pod2.ns, pod0.ip, 1, f"coexist-new{i}-")
        c1 = settle(maps)
        assert agent.stop() == 0, agent.stderr()
    finally:
        agent.stop(signal.SIGKILL)
    delta = {k: (c1[k][0] - c0[k][0], c1[k][1] - c0[k][1]) for k in maps}
    for hook in ("ingress", "egress"):
        first, last = delta[(hook, PRIO_FIRST)], delta[(hook, PRIO_LAST)]
        assert first[0] >= n, f"{hook}: the first program saw too little: {delta}"
        assert last == first, f"{hook}: packets/bytes lost between the programs: {delta}"
    recs = [r for r in agent.records() if r["url.path"].startswith("/status/coexist")]
    assert len(recs) == n + 5, f"redtap logged {len(recs)} of {n + 5} requests"
    # the agent is gone: its filters too, the foreign ones and the qdisc stay and still count
    filters = tc_filters(node, dev)
    assert "redtap:" not in filters, filters
    c2 = settle(maps)
    keepalive(node, pod2.ns, pod0.ip, 10, "after")
    c3 = settle(maps)
    for hook in ("ingress", "egress"):
        first = c3[(hook, PRIO_FIRST)][0] - c2[(hook, PRIO_FIRST)][0]
        last = c3[(hook, PRIO_LAST)][0] - c2[(hook, PRIO_LAST)][0]
        assert first == last >= 10, (hook, first, last)


def redtap_prog_ids(node) -> set[int]:
    ids = set()
    for dev in bridge_ports(node):
        ids |= {int(x) for x in re.findall(r"redtap:\w+ .*? id (\d+)", tc_filters(node, dev))}
    return ids


def map_ids(prog_id: int) -> set[int]:
    r = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)],
                       capture_output=True, text=True)
    return set(json.loads(r.stdout).get("map_ids", [])) if r.returncode == 0 else set()


def exists(kind: str, obj_id: int) -> bool:
    return subprocess.run(["bpftool", kind, "show", "id", str(obj_id)],
                          capture_output=True).returncode == 0


def test_kill9_under_load_and_restarts_never_break_a_request(node, clean):
    pod0, pod2 = node.pods[0], node.pods[2]
    kills = 3
    # thousands of connections closed by the client: their TIME_WAIT ports
    node.ns_exec(pod2.ns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535")
    out, stop = os.path.join(node.dir, "loop.out"), os.path.join(node.dir, "loop.stop")
    with open(out, "w") as f:  # until the last run has exited (however long starts take)
        loop = node.spawn(pod2.ns, sys.executable, "-c", CLIENT_LOOP, pod0.ip, "80", stop,
                          stdout=f)
    progs: set[int] = set()
    maps: set[int] = set()
    agents = []
    try:
        for i in range(kills + 1):
            spawned = time.monotonic()  # CLOCK_MONOTONIC: the client's clock too
            agent = AgentProc(node, "--endpoint", f"{pod0.ip}:80", name=f"run{i}")
            agents.append(agent)
            agent.wait_started()
            started = time.monotonic()  # attached by now
            ids = redtap_prog_ids(node)
            assert len(ids) == 2, f"run {i}: redtap programs attached: {ids}"
            progs |= ids
            for p in ids:
                maps |= map_ids(p)
            time.sleep(1.5)  # traced traffic
            if i < kills:
                assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
                assert redtap_prog_ids(node) == ids, "kill -9 left nothing attached?"
        stopping = time.monotonic()
        assert agents[-1].stop() == 0, agents[-1].stderr()
        exited = time.monotonic()  # detached by now
        time.sleep(0.5)  # requests after it
        open(stop, "w").close()
        assert loop.wait(timeout=120) == 0
    finally:
        for a in agents:
            a.stop(signal.SIGKILL)
        if loop.poll() is None:
            os.killpg(loop.pid, signal.SIGKILL)
    with open(out) as f:
        summary = json.loads(f.read())
    done = summary.pop("done")
    print("client loop:", summary)
    assert summary["failed"] == 0, summary
    assert summary["ok"] == len(done) > 100, summary
    # the last run logged every request made (sent and answered) while it
    # was surely attached, once each, in order; none made before it was
    # started or after it exited; those in between may or may not be there
    during = [f"/status/loop{n}" for n, t0, t1 in done if started < t0 and t1 < stopping]
    maybe = {f"/status/loop{n}" for n, t0, t1 in done if t1 > spawned and t0 < exited}
    logged = [r["url.path"] for r in agents[-1].records()]
    assert len(during) > 100, f"only {len(during)} requests while the last run ran"
    must = set(during)
    assert [p for p in logged if p in must] == during, \
        f"last run: {len(during)} requests made while it ran, {len(logged)} logged"
    assert len(set(logged)) == len(logged), "a request logged twice"
    assert set(logged) <= maybe, sorted(set(logged) - maybe)[:5]
    # the programs of every run are gone
    assert len(progs) == 2 * (kills + 1), progs
    assert len(maps) >= 4 * (kills + 1), maps  # conns, pending, events, stats, ... per run
    for dev in bridge_ports(node):
        assert "redtap:" not in tc_filters(node, dev), f"{dev}: {tc_filters(node, dev)}"
        assert "clsact" not in tc_qdiscs(node, dev), f"{dev}: {tc_qdiscs(node, dev)}"
    end = time.monotonic() + 15
    while time.monotonic() < end and any(exists("prog", p) for p in progs):
        time.sleep(0.2)
    left = [p for p in progs if exists("prog", p)]
    assert left == [], f"programs of earlier runs still loaded: {left}"
    left = [m for m in maps if exists("map", m)]
    assert left == [], f"maps of earlier runs still there: {left}"

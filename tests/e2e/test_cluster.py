"""End to end on a simulated Flannel VXLAN cluster (pyloader.lab.netcluster): two node
namespaces on an underlay, pods on each node's cni0, cross-node traffic through
flannel.1 (VXLAN), Services through kube-proxy-style DNAT, a hostNetwork server.
One agent per node, each told only --kubeconfig and --node-name by the test API
server (lab/fakeapi.py, served on the underlay). The cluster-wide log is the
union of the nodes' logs: every request the clients made must be in it exactly
once, recorded by the node hosting its server, with the right names."""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest

import conftest
from pyloader.lab.netcluster import (Cluster, default_scenarios, default_topology, pod_gateway,
                                 render, vtep_ip)

SCENARIOS = default_scenarios()


def sid(sc) -> str:
    return f"{sc.client}->{sc.target}"


REQUESTED: dict[str, list[str]] = {}  # scenario -> paths requested while the veths agents ran
# --attach bridge: requests of each scenario (4 each) that the bridge's hook sees.
# It sees what crosses the host stack; frames bridged between two ports of cni0
# never reach it: same-node pod to pod, also through a ClusterIP (br_netfilter
# DNATs them inside the bridge; see set_neighbours for when they are not bridged).
BRIDGE_SEES = {
    "client-0->web-0": 0, "client-0->web-1": 4, "client-1->api-0": 4,
    "client-0->svc/api": 0, "client-1->svc/api": 4,
    "client-0->svc/web": 2,  # the half DNATed to web-1 on the other node
    "node-0->web-0": 4, "node-0->web-1": 4, "node-1->svc/api": 4, "node-1->svc/web": 4,
    "client-0->metrics-1": 4, "client-1->metrics-1": 4, "node-1->metrics-1": 4,
    "node-0->metrics-1": 4,
}


class NodeAgent(conftest.AgentProc):
    """`redtap run` in one node's namespace, configured by the API only."""

    def __init__(self, cluster: Cluster, knode, api, attach: str = "veths", name: str = ""):
        self.knode = knode
        self.log = os.path.join(cluster.dir,
                                f"{knode.name}-{attach}{name}-{time.monotonic_ns()}.log")
        self.err = open(self.log + ".stderr", "w")
        self.proc = cluster.spawn(knode.ns, sys.executable, "-m", "pyloader", "run", "--log",
                                  self.log, "--stats-interval", "0.5", "--idle-timeout", "5",
                                  *cluster.agent_args(knode, api.kc, attach), stderr=self.err)
        self.offset = 0

    def start_time(self) -> float:
        (ev,) = [l for l in self.lines() if l.get("event") == "redtap.start"]
        return datetime.fromisoformat(ev["time"].replace("Z", "+00:00")).timestamp()

    def wait_ready(self, timeout: float = 60.0) -> "NodeAgent":
        """Started, tracing exactly its node's endpoints, every watch listed (the
        names of clients on other nodes come from the all-pods watch)."""
        self.wait_started()
        want = sorted(f"{p.ip}:{p.spec.port}" for p in self.knode.pods if p.spec.port)
        end, ev, w = time.monotonic() + timeout, [], {}
        while time.monotonic() < end:
            ev = [l for l in self.lines() if l.get("event") == "redtap.endpoints"]
            w = self.counters().get("k8s", {}).get("watch", {})
            if ev and ev[-1]["endpoints"] == want and w and \
                    all(x["synced"] and x["connected"] for x in w.values()):
                return self
            time.sleep(0.1)
        raise AssertionError(f"{self.knode.name}: not ready: {ev[-1:]} {w}\n{self.stderr()}")


def start_agents(cluster, api, attach="veths") -> list[NodeAgent]:
    agents = [NodeAgent(cluster, n, api, attach) for n in cluster.nodes]
    try:
        return [a.wait_ready() for a in agents]
    except BaseException:
        for a in agents:
            a.stop()
        raise


def stop_agents(agents) -> None:
    codes = [(a.knode.name, a.stop(), a.stderr()) for a in agents]
    assert all(c == 0 for _, c, _ in codes), codes


def collect(agents, expect: int, timeout: float = 20.0, settle: float = 0.5) -> list[tuple]:
    """(node name, record) of the records logged since mark(), once there are at
    least @expect of them across all agents (then a while more: extras would show)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if sum(len(a.records()) - a.offset for a in agents) >= expect:
            break
        time.sleep(0.05)
    time.sleep(settle)
    out = []
    for a in agents:
        recs = a.records()[a.offset:]
        a.offset += len(recs)
        out += [(a.knode.name, r) for r in recs]
    return out


def fresh_counters(a: NodeAgent) -> dict:
    """The first stats line written after every record logged so far."""
    end = time.monotonic() + 30
    while True:
        lines = a.lines()
        last = max((i for i, l in enumerate(lines) if "event" not in l), default=-1)
        stats = [l for l in lines[last + 1:] if l.get("event") in ("redtap.stats", "redtap.exit")]
        if stats:
            return stats[0]
        assert time.monotonic() < end, f"{a.knode.name}: no stats line after the records"
        time.sleep(0.1)


def key(r: dict) -> str:
    return r["url.path"] + (f"?{r['url.query']}" if "url.query" in r else "")


def names(r: dict) -> dict:
    return {k: v for k, v in r.items() if ".k8s." in k}


def server_of(cluster: Cluster, r: dict):
    (pod,) = [p for p in cluster.pods if (p.ip, p.spec.port) ==
              (r["server.address"], r["server.port"])]
    return pod


def server_names(cluster: Cluster, pod) -> dict:
    s = pod.spec
    out = {"server.k8s.pod.name": s.name, "server.k8s.namespace.name": s.namespace,
           "server.k8s.workload.name": s.app,
           "server.k8s.workload.kind": "DaemonSet" if s.host_network else "StatefulSet"}
    svcs = sorted(v.name for v in cluster.topo.services if pod in cluster.endpoints(v))
    if svcs:
        out["server.k8s.service.name"] = ",".join(svcs)
    return out


def client_expected(cluster: Cluster, sc, server) -> tuple[set, dict]:
    """(addresses the server may see, client names) for @sc's requests to @server."""
    if sc.client.startswith("node-"):  # the host: one of its addresses, never named
        k = int(sc.client[5:])
        return {cluster.nodes[k].ip, pod_gateway(k), vtep_ip(k)}, {}
    pod = cluster.pod(sc.client)
    if server.spec.host_network and server.spec.node != pod.spec.node:
        return {cluster.nodes[pod.spec.node].ip}, {}  # Flannel's ip-masq: the node's address
    return {pod.ip}, {"client.k8s.pod.name": pod.name, "client.k8s.namespace.name": "default"}


# -- fixtures ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("needs root for namespaces and bpf()")
    with Cluster() as c:
        yield c


@pytest.fixture(scope="module")
def api(cluster):
    a = cluster.start_api()
    yield a
    a.stop()


@pytest.fixture(scope="class")
def veths(cluster, api):
    agents = start_agents(cluster, api, "veths")
    yield agents
    stop_agents(agents)


# -- the topology itself -------------------------------------------------------------
def test_readme_shows_the_rendered_topology():
    readme = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
    with open(readme) as f:
        assert render(default_topology()) in f.read()


def test_cross_node_traffic_is_vxlan_on_the_underlay(cluster):
    def counters():
        out = {}
        for n in cluster.nodes:
            for dev in ("flannel.1", "eth0"):
                r = cluster.ns_exec(n.ns, "cat", f"/sys/class/net/{dev}/statistics/tx_packets")
                out[n.name, dev] = int(r.stdout)
        return out
    before = counters()
    paths, codes = cluster.run(default_scenarios()[1], "vxlan")  # client-0 -> web-1
    after = counters()
    assert codes == [200] * len(paths)
    assert after["node-0", "flannel.1"] > before["node-0", "flannel.1"]  # requests out
    assert after["node-1", "flannel.1"] > before["node-1", "flannel.1"]  # responses back
    assert after["node-0", "eth0"] - before["node-0", "eth0"] >= \
        after["node-0", "flannel.1"] - before["node-0", "flannel.1"]  # each one encapsulated
    rules = cluster.ns_exec(cluster.nodes[0].ns, "iptables", "-t", "nat", "-S").stdout
    assert "--mode nth" in rules and "DNAT --to-destination 198.18.1.10:80" in rules


# -- every path a request takes, with --attach veths (the default) ---------------------
class TestEveryRequestOnce:
    @pytest.mark.parametrize("sc", SCENARIOS, ids=sid)
    def test_recorded_once_by_the_servers_node_with_names(self, cluster, veths, sc):
        for a in veths:
            a.mark()
        paths, codes = cluster.run(sc, f"v-{SCENARIOS.index(sc)}")
        REQUESTED[sid(sc)] = paths
        assert codes == [200] * sc.requests
        got = collect(veths, len(paths))
        assert sorted(key(r) for _, r in got) == sorted(paths), got  # each once, nothing else
        for node, r in got:
            server = server_of(cluster, r)
            addrs, client = client_expected(cluster, sc, server)
            assert node == f"node-{server.spec.node}", r  # the node hosting the server
            assert r["http.response.status_code"] == 200
            assert r["client.address"] in addrs, r
            assert names(r) == {**client, **server_names(cluster, server)}, r
        if sc.target.startswith("svc/"):  # kube-proxy's nth spreading: round robin
            eps = cluster.endpoints(cluster.service(sc.target[4:]))
            per = collections.Counter(server_of(cluster, r).name for _, r in got)
            assert per == {p.name: sc.requests // len(eps) for p in eps}

    def test_the_union_of_the_logs_holds_each_request_once(self, cluster, veths):
        recs = [(a.knode.name, r) for a in veths for r in a.records()]
        want = [p for paths in REQUESTED.values() for p in paths]
        assert want and collections.Counter(key(r) for _, r in recs) == collections.Counter(want)
        for a in veths:
            k = fresh_counters(a)["kernel"]
            assert k["requests"] == k["responses"] == len(a.records()), (a.knode.name, k)


# -- the seed's mode: one hook on cni0 -----------------------------------------------------
def set_neighbours(cluster, state: str, pods=None) -> None:
    """The nodes' neighbour entries of their server pods, used once (so that the
    cached header is set up) and then put in @state. REACHABLE: a pod's request to
    a Service endpoint on its own node is DNATed inside the bridge and bridged
    (br_netfilter's "bridged DNAT"); otherwise it is sent through cni0's xmit."""
    for p in pods or [p for p in cluster.pods if p.veth and p.spec.port]:
        node = cluster.nodes[p.spec.node].ns
        cluster.wait_port(node, p.ip, p.spec.port)
        mac = cluster.ns_exec(p.ns, "cat", "/sys/class/net/eth0/address").stdout.strip()
        cluster.ns_exec(node, "ip", "neigh", "replace", p.ip, "lladdr", mac, "dev", "cni0",
                        "nud", state)


@pytest.fixture(scope="class")
def bridge(cluster, api):
    agents = start_agents(cluster, api, "bridge")
    yield agents
    stop_agents(agents)


class TestAttachBridge:
    def test_misses_same_node_pod_traffic_exactly(self, cluster, bridge):
        seen = {}
        for i, sc in enumerate(SCENARIOS):
            set_neighbours(cluster, "reachable")  # (the node talked to its pods lately)
            paths, codes = cluster.run(sc, f"b-{i}")
            assert codes == [200] * sc.requests
            seen[sid(sc)] = set(paths)
        got = collect(bridge, sum(BRIDGE_SEES.values()), settle=1.0)
        per = {s: sum(1 for _, r in got if key(r) in paths) for s, paths in seen.items()}
        assert per == BRIDGE_SEES
        assert (len(got), sum(s.requests for s in SCENARIOS)) == (46, 56)
        assert all(r["http.response.status_code"] == 200 for _, r in got)
        for a in bridge:  # the missing ones were not even half seen
            k = fresh_counters(a)
            assert (k["kernel"]["requests"], k["kernel"]["responses"],
                    k["agent"]["pending_requests"]) == (len(a.records()), len(a.records()), 0), k

    def test_half_sees_same_node_service_traffic_when_the_neighbour_is_stale(self, cluster,
                                                                              bridge):
        """Not bridged but sent through cni0: the request is seen, its response
        (bridged straight back to the client) is not: reported unanswered."""
        for a in bridge:
            a.mark()
        set_neighbours(cluster, "stale", [cluster.pod("api-0")])
        paths, codes = cluster.run(SCENARIOS[3], "stale")  # client-0 -> svc/api (api-0)
        assert codes == [200] * 4
        got = collect(bridge, 4, timeout=60)  # after --idle-timeout (5 s)
        assert sorted((n, key(r), r.get("error.type"), r.get("http.response.status_code"))
                      for n, r in got) == [("node-0", p, "no_response", None) for p in paths]


# -- one node's agent killed and restarted mid-run --------------------------------------------
PACED = r"""
import json, os, sys, time
from pyloader.lab.trafficgen import connect, read_response, request
host, port, path, pause, per_conn, most, stop = sys.argv[1:8]
port, pause, per_conn, most = int(port), float(pause), int(per_conn), int(most)
i = 0
while i < most and not os.path.exists(stop):
    s = connect(host, port)
    s.settimeout(60)
    f = s.makefile("rb")
    for _ in range(per_conn):
        if i >= most or os.path.exists(stop):
            break
        p = path.replace("{i}", str(i))
        t0 = time.time()
        s.sendall(request("GET", p, host))
        print(json.dumps({"sent": p, "t0": t0}), flush=True)
        status = read_response(f)
        print(json.dumps({"path": p, "t0": t0, "t1": time.time(), "status": status}), flush=True)
        i += 1
        time.sleep(pause)
    s.close()
"""


class Paced:
    """A keep-alive client in a pod (PACED), its lines read as they come."""

    def __init__(self, cluster, client, target, path, stop, pause=0.02, per_conn=25, most=10**6):
        p = cluster.pod(target)
        self.server_node = p.spec.node
        self.proc = cluster.spawn(cluster.pod(client).ns, sys.executable, "-c", PACED, p.ip,
                                  str(p.spec.port), path, str(pause), str(per_conn), str(most),
                                  stop, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.sent, self.done = [], []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            d = json.loads(line)
            (self.sent if "sent" in d else self.done).append(d)

    def finish(self) -> list[dict]:
        assert self.proc.wait(timeout=60) == 0, self.proc.stderr.read()
        self.reader.join(timeout=10)
        assert all(d["status"] == 200 for d in self.done) and len(self.done) == len(self.sent)
        return self.done


def wait_until(cond, what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting: {what}"
        time.sleep(0.05)


def test_agent_killed_and_restarted_loses_only_requests_in_flight(cluster, api):
    stop = os.path.join(cluster.dir, "stop-paced")
    agents = start_agents(cluster, api, "veths")
    old1, new1, clients, slow = agents[1], None, [], None
    try:
        clients = [Paced(cluster, "client-0", "web-0", "/status/rs-a{i}", stop),   # node-0
                   Paced(cluster, "client-1", "web-0", "/status/rs-b{i}", stop),   # node-0
                   Paced(cluster, "client-0", "web-1", "/status/rs-c{i}", stop),   # node-1
                   Paced(cluster, "client-1", "api-1", "/py/rs-d{i}", stop)]       # node-1
        wait_until(lambda: all(len(c.done) >= 20 for c in clients), "traffic flowing")
        # everything answered by now is in node-1's log before the kill
        mark = time.time()
        before = {d["path"] for c in clients if c.server_node == 1 for d in c.done
                  if d["t1"] < mark}
        wait_until(lambda: before <= {key(r) for r in old1.records()}, "old agent's records")
        # a request answered 12 s later: sent to the old agent, answered to the new one
        slow = Paced(cluster, "client-0", "api-1", "/py/slow?ms=12000&n=rs-e{i}", stop, most=1)
        wait_until(lambda: slow.sent, "slow request sent")
        old1.stop(signal.SIGKILL)
        new1 = NodeAgent(cluster, cluster.nodes[1], api, name="-restarted").wait_ready()
        started = new1.start_time()
        assert started < slow.sent[0]["t0"] + 12, "the restarted agent took longer than 12 s"
        wait_until(lambda: slow.done, "slow response", timeout=60)
        time.sleep(1.0)  # traffic after the restart
        open(stop, "w").close()
        done = {c: c.finish() for c in clients + [slow]}
        node0 = [d for c, ds in done.items() if c.server_node == 0 for d in ds]
        node1 = [d for c, ds in done.items() if c.server_node == 1 for d in ds]
        wait_until(lambda: len(agents[0].records()) >= len(node0), "node-0's records")
        after = {d["path"] for d in node1 if d["t0"] > started}
        wait_until(lambda: after <= {key(r) for r in new1.records()}, "restarted agent's records")
        time.sleep(0.5)
    finally:
        open(stop, "w").close()
        for c in clients + ([slow] if slow else []):
            c.proc.wait(timeout=60)
        old1.stop()  # (killed already unless a step before failed)
        stop_agents([agents[0]] + ([new1] if new1 else []))
    # the other node: every request, once, unaffected
    assert sorted(key(r) for r in agents[0].records()) == sorted(d["path"] for d in node0)
    # the restarted node: nothing twice, nothing invented, every loss in flight during the restart
    recorded = [key(r) for r in old1.records() + new1.records()]
    assert len(recorded) == len(set(recorded)) and set(recorded) <= {d["path"] for d in node1}
    lost = [d for d in node1 if d["path"] not in set(recorded)]
    in_flight = [d for d in node1 if d["t1"] >= mark and d["t0"] <= started]
    assert all(mark <= d["t1"] and d["t0"] <= started for d in lost), lost
    assert slow.done[0] in lost  # its request went to the killed agent's maps
    k = new1.counters()["kernel"]
    unpaired = k["unmatched_responses"] + k["early_responses"]
    assert 1 <= unpaired <= len(lost) <= len(in_flight), (unpaired, len(lost), len(in_flight))
    span = max(d["t1"] for d in node0 + node1) - min(d["t0"] for d in node0 + node1)
    print(f"\nrestart: {len(node0 + node1) / span:.0f} requests/s over {span:.1f}s; "
          f"node-0 {len(node0)}/{len(node0)} recorded; node-1 {len(recorded)}/"
          f"{len(node1)} recorded, {len(lost)} lost of {len(in_flight)} in flight, "
          f"{unpaired} reported unpaired by the restarted agent")

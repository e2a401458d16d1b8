"""End to end with Kubernetes metadata: the agent runs with only --kubeconfig and
--node-name (no --endpoint), talking HTTPS to lab/fakeapi.py served inside the
node namespace; real servers and clients in pods; the API changes underneath.
Every test checks the log against what the clients did and the API said."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

from urllib.parse import urlsplit

import pytest

import conftest
from support.agentproc import client_lines
from pyloader.lab.fakeapi import FakeApi
from pyloader.lab.fakeobjs import make_pod, make_replicaset, make_service, make_slice
from pyloader.lab.netnode import EXT_IP, NODE_IP, UPLINK_IP

NODE, API_PORT = "node-a", 6443
K8S_FIELDS = ("client.k8s.pod.name", "client.k8s.namespace.name", "server.k8s.pod.name",
              "server.k8s.namespace.name", "server.k8s.service.name",
              "server.k8s.workload.name", "server.k8s.workload.kind")


class AgentProc(conftest.AgentProc):
    def lines(self) -> list[dict]:
        """Complete lines only: a line being written is left for the next read."""
        try:
            with open(self.log, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        return [json.loads(l) for l in data[:data.rfind(b"\n") + 1].splitlines() if l.strip()]


def names(r: dict) -> dict:
    return {k[:-5] if k.endswith(".name") else k: r[k] for k in K8S_FIELDS if k in r}


@pytest.fixture(scope="module")
def api(node):
    a = FakeApi(NODE_IP, API_PORT, netns=node.node_ns).start()
    a.kc = a.kubeconfig(f"{node.dir}/kubeconfig")
    p0, p1, p2, p3 = node.pods[:4]
    a.put("replicasets", make_replicaset("web-5d8f7", "web", ns="shop"))
    a.put("pods", make_pod("web-5d8f7-x1", [p0.ip, p0.ip6], ns="shop", labels={"app": "web"},
                           owner=("ReplicaSet", "web-5d8f7")))
    a.put("services", make_service("web", {"app": "web"}, ((80, "http", "http"),), ns="shop"))
    a.put("pods", make_pod("api-0", [p1.ip], ns="shop", ports=((8080, "http"),),
                           labels={"app": "api"}, owner=("StatefulSet", "api")))
    a.put("services", make_service("api", {"app": "api"}, ((80, "http", "http"),), ns="shop",
                                   cluster_ip="198.18.200.2"))
    a.put("pods", make_pod("client-a", [p2.ip, p2.ip6], ports=()))
    a.put("pods", make_pod("client-b", [p3.ip], ns="tools", ports=(),
                           owner=("DaemonSet", "probe")))
    a.put("pods", make_pod("remote-client", [EXT_IP], node="node-b", ports=()))
    a.put("pods", make_pod("elsewhere", ["198.18.0.99"], node="node-b", labels={"app": "web"},
                           ns="shop"))
    yield a
    a.stop()


def pod_named_by_ip(api, ip) -> str:
    (name,) = [p["metadata"]["name"] for p in api.store.list("pods") if p["status"].get("podIP") == ip]
    return name


def endpoints_now(agent) -> list | None:
    ev = [l for l in agent.lines() if l.get("event") == "redtap.endpoints"]
    return ev[-1]["endpoints"] if ev else None


def wait_endpoints(agent, want, timeout=60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if endpoints_now(agent) == sorted(want):
            return
        time.sleep(0.1)
    raise AssertionError(f"endpoints {endpoints_now(agent)} != {sorted(want)}\n{agent.stderr()}")


def wait_synced(agent, timeout=60.0) -> None:
    """Until the agent's stats say every watch has listed (since it last restarted)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        w = agent.counters().get("k8s", {}).get("watch", {})
        if w and all(x["synced"] and x["connected"] for x in w.values()):
            return
        time.sleep(0.1)
    raise AssertionError(f"watches not synced: {agent.counters().get('k8s')}")


def code(node, ns, url) -> int:
    cp = node.curl(ns, "-o", "/dev/null", "-w", "%{http_code}", url)
    return int(cp.stdout or 0)


def until_named(node, agent, ns, url, field, want, timeout=60.0) -> dict:
    """Request @url until its record's @field is @want (the agent learnt it);
    returns that record."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        agent.mark()
        assert code(node, ns, url) in (200, 201)
        recs = [r for r in agent.new_records(1, timeout=5, settle=0.1)
                if r["url.path"] == urlsplit(url).path]
        if recs:
            last = recs[-1]
            if last.get(field) == want:
                return last
        time.sleep(0.2)
    raise AssertionError(f"{url}: {field} never became {want!r}; last record {last}")


def base_endpoints(node):
    p0, p1 = node.pods[0], node.pods[1]
    return {f"{p0.ip}:80", f"[{p0.ip6}]:80", f"{p1.ip}:8080"}


WEB = {"server.k8s.pod": "web-5d8f7-x1", "server.k8s.namespace": "shop",
       "server.k8s.service": "web", "server.k8s.workload": "web",
       "server.k8s.workload.kind": "Deployment"}
API = {"server.k8s.pod": "api-0", "server.k8s.namespace": "shop",
       "server.k8s.service": "api", "server.k8s.workload": "api",
       "server.k8s.workload.kind": "StatefulSet"}
CLIENT_A = {"client.k8s.pod": "client-a", "client.k8s.namespace": "default"}
CLIENT_B = {"client.k8s.pod": "client-b", "client.k8s.namespace": "tools"}
REMOTE = {"client.k8s.pod": "remote-client", "client.k8s.namespace": "default"}


@pytest.fixture(scope="class")
def agent(node, api):
    """One agent for the class (stopped at its end: the tests after it run their own)."""
    a = AgentProc(node, "--kubeconfig", api.kc, "--node-name", NODE,
                  "--stats-interval", "0.5", "--idle-timeout", "10").wait_started()
    wait_endpoints(a, base_endpoints(node))
    # the Deployment behind the ReplicaSet is fetched on demand
    until_named(node, a, node.pods[2].ns, f"http://{node.pods[0].ip}/",
                "server.k8s.workload.kind", "Deployment")
    a.warmed_up = len(a.records())  # before: names fill in as the API answers
    yield a
    assert a.stop() == 0, a.stderr()



class TestMetadataRun:
    """One agent driven only by the API, through churn and outages."""

    def test_map_holds_exactly_this_nodes_endpoints(self, node, api, fresh):
        assert endpoints_now(fresh) == sorted(base_endpoints(node))
        node.start_pyserver(node.pods[3], port=8081)  # a server the API knows nothing of
        assert code(node, node.pods[2].ns, f"http://{node.pods[3].ip}:8081/py/unknown") == 200
        assert code(node, node.pods[2].ns, f"http://{node.pods[1].ip}:8080/py/known") == 200
        recs = fresh.new_records(1, timeout=10, settle=1.0)
        assert [r["url.path"] for r in recs] == ["/py/known"]

    def test_every_record_carries_the_right_names(self, node, fresh):
        p0, p1, p2, p3 = node.pods[:4]
        plan = [(p2.ns, f"http://{p0.ip}/", {**CLIENT_A, **WEB}),
                (p2.ns, f"http://[{p0.ip6}]/", {**CLIENT_A, **WEB}),
                (p3.ns, f"http://{p1.ip}:8080/py/b", {**CLIENT_B, **API}),
                (node.ext_ns, f"http://{p0.ip}/status/ext", {**REMOTE, **WEB}),
                (node.node_ns, f"http://{p1.ip}:8080/py/host", API)]  # the host: no client name
        for ns, url, _ in plan:
            assert code(node, ns, url) == 200
        recs = fresh.new_records(len(plan), timeout=15)
        assert [names(r) for r in recs] == [want for _, _, want in plan]

    def test_pods_created_and_deleted_while_traffic_flows(self, node, api, fresh):
        p0, p2, p3 = node.pods[0], node.pods[2], node.pods[3]
        done, sent = threading.Event(), []

        def background():
            while not done.is_set():
                cp = node.traffic(p2.ns, "keepalive", p0.ip, "80", "100", "/status/bg{i}")
                sent.extend(client_lines(cp))
        bg = threading.Thread(target=background)
        bg.start()
        new = None
        try:
            new = node.add_pod()
            node.start_pyserver(new, port=8080)
            api.put("replicasets", make_replicaset("batch-6c9", "batch", ns="shop"))
            api.put("pods", make_pod("batch-6c9-q2", [new.ip], ns="shop", ports=((8080, "http"),),
                                     labels={"app": "api"}, owner=("ReplicaSet", "batch-6c9")))
            wait_endpoints(fresh, base_endpoints(node) | {f"{new.ip}:8080"})
            r = until_named(node, fresh, p3.ns, f"http://{new.ip}:8080/py/new",
                            "server.k8s.workload.kind", "Deployment")
            assert names(r) == {**CLIENT_B, "server.k8s.pod": "batch-6c9-q2",
                                "server.k8s.namespace": "shop", "server.k8s.service": "api",
                                "server.k8s.workload": "batch",
                                "server.k8s.workload.kind": "Deployment"}
            api.delete("pods", "shop", "batch-6c9-q2")
            wait_endpoints(fresh, base_endpoints(node))
            fresh.mark()
            assert code(node, p3.ns, f"http://{new.ip}:8080/py/gone") == 200
            time.sleep(2)
            assert [r for r in fresh.records() if r["url.path"] == "/py/gone"] == []  # untraced
        finally:
            api.delete("pods", "shop", "batch-6c9-q2")  # (gone already unless a step failed)
            if new:
                node.remove_pod(new)
            time.sleep(1.0)
            done.set()
            bg.join(timeout=120)
        bg_recs = [r for r in fresh.records() if r["url.path"].startswith("/status/bg")
                   and r["client.address"] == p2.ip]
        deadline = time.monotonic() + 20
        while len(bg_recs) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.2)
            bg_recs = [r for r in fresh.records() if r["url.path"].startswith("/status/bg")
                       and r["client.address"] == p2.ip]
        assert len(sent) >= 100 and len(bg_recs) == len(sent)  # none lost during the churn
        assert all(names(r) == {**CLIENT_A, **WEB} for r in bg_recs)

    def test_pod_ip_reuse_names_each_request_by_its_time(self, node, api, fresh):
        pod = node.add_pod()
        node.start_pyserver(pod, port=8080)
        url = f"http://{pod.ip}:8080"
        try:
            api.put("pods", make_pod("blue", [pod.ip], ports=((8080, "http"),)))
            wait_endpoints(fresh, base_endpoints(node) | {f"{pod.ip}:8080"})
            until_named(node, fresh, node.pods[2].ns, f"{url}/py/before", "server.k8s.pod.name",
                        "blue")
            fresh.mark()
            slow = subprocess.Popen(["ip", "netns", "exec", node.pods[2].ns, "curl", "-sS",
                                     "-o", "/dev/null", f"{url}/py/slow?ms=6000"])
            try:
                time.sleep(1.5)  # the request is on its way to "blue"
                api.delete("pods", "default", "blue")
                api.put("pods", make_pod("green", [pod.ip], ports=((8080, "http"),)))
                until_named(node, fresh, node.pods[3].ns, f"{url}/py/after",
                            "server.k8s.pod.name", "green")
            finally:
                slow.wait(timeout=60)
            deadline = time.monotonic() + 20
            while not (slow_recs := [r for r in fresh.records() if r["url.path"] == "/py/slow"]):
                assert time.monotonic() < deadline, "no record of the slow request"
                time.sleep(0.1)
            (r,) = slow_recs  # started while "blue" held the IP, answered after "green" came
            assert r.get("server.k8s.pod.name") == "blue" and r["http.response.status_code"] == 200
        finally:
            api.delete("pods", "default", "blue")
            api.delete("pods", "default", "green")
            node.remove_pod(pod)
        wait_endpoints(fresh, base_endpoints(node))

    def test_service_selector_change(self, node, api, fresh):
        p0, p1, p2 = node.pods[0], node.pods[1], node.pods[2]
        try:
            api.put("services", make_service("web", {"app": "api"}, ((80, "http", "http"),),
                                             ns="shop"))
            until_named(node, fresh, p2.ns, f"http://{p1.ip}:8080/py/sel", "server.k8s.service.name",
                        "api,web")
            fresh.mark()
            assert code(node, p2.ns, f"http://{p0.ip}/status/sel") == 200
            (r,) = fresh.new_records(1)
            assert "server.k8s.service.name" not in r and r["server.k8s.pod.name"] == "web-5d8f7-x1"
        finally:
            api.put("services", make_service("web", {"app": "web"}, ((80, "http", "http"),),
                                             ns="shop"))
        until_named(node, fresh, p2.ns, f"http://{p0.ip}/status/back", "server.k8s.service.name",
                    "web")

    def test_endpointslice_churn(self, node, api, fresh):
        p1, p2 = node.pods[1], node.pods[2]
        node.start_pyserver(p1, port=8081)  # not a containerPort: only the slice lists it
        api.put("services", make_service("legacy", None, ((81, 8081, "l"),), ns="shop",
                                         cluster_ip="198.18.200.3"))
        for i in range(30):
            eps = [(p1.ip, NODE, "api-0")] + ([("198.18.0.77", "node-b", None)] if i % 2 else [])
            api.put("endpointslices", make_slice("legacy-1", "legacy", eps, [(8081, "l")],
                                                 ns="shop"))
            api.put("endpointslices", make_slice(f"noise-{i}", "noise", [(f"198.18.0.{100 + i}",
                                                 "node-b", None)], [(80, "h")], ns="shop"))
            if i % 3 == 0:
                api.delete("endpointslices", "shop", f"noise-{i}")
        wait_endpoints(fresh, base_endpoints(node) | {f"{p1.ip}:8081"})
        r = until_named(node, fresh, p2.ns, f"http://{p1.ip}:8081/py/legacy",
                        "server.k8s.service.name", "legacy")
        assert names(r) == {**CLIENT_A, **API, "server.k8s.service": "legacy"}
        api.delete("endpointslices", "shop", "legacy-1")
        wait_endpoints(fresh, base_endpoints(node))
        fresh.mark()
        assert code(node, p2.ns, f"http://{p1.ip}:8081/py/unlisted") == 200
        assert fresh.new_records(1, timeout=2) == []

    def test_410_gone_is_recovered_by_a_fresh_list(self, node, api, fresh):
        p3 = node.pods[3]
        lists = api.lists("pods")
        api.stop()
        api.store.delete("pods", "tools", "client-b")
        api.store.put("pods", make_pod("client-c", [p3.ip], ns="tools", ports=()))
        api.compact()  # the agent's resourceVersions are now too old
        api.start()
        r = until_named(node, fresh, p3.ns, f"http://{node.pods[0].ip}/status/410",
                        "client.k8s.pod.name", "client-c")
        assert names(r) == {"client.k8s.pod": "client-c", "client.k8s.namespace": "tools", **WEB}
        assert api.lists("pods") >= lists + 2  # pods@node and all pods listed afresh
        assert any(q.get("resourceVersion") and int(q["resourceVersion"]) < api.store.compacted
                   for v, res, q in api.requests if v == "watch")

    def test_api_down_during_a_run_keeps_the_last_known_state(self, node, api, fresh):
        p0, p2 = node.pods[0], node.pods[2]
        api.stop()
        try:
            for i in range(5):
                assert code(node, p2.ns, f"http://{p0.ip}/status/down{i}") == 200
            recs = fresh.new_records(5)
            assert [names(r) for r in recs] == [{**CLIENT_A, **WEB}] * 5
            api.store.delete("pods", "default", "remote-client")
            api.store.put("pods", make_pod("remote-2", [EXT_IP], node="node-b", ports=()))
            time.sleep(2)
            assert fresh.counters()["k8s"]["watch"]["pods"]["errors"] >= 1
        finally:
            api.start()
        until_named(node, fresh, node.ext_ns, f"http://{p0.ip}/status/up", "client.k8s.pod.name",
                    "remote-2")

    def test_every_record_of_the_run_names_its_server(self, node, fresh):
        """Records to the stable pods, over all the churn above: always named."""
        p0, p1 = node.pods[0], node.pods[1]
        stable = [r for r in fresh.records()[fresh.warmed_up:]
                  if (r["server.address"], r["server.port"]) in
                  ((p0.ip, 80), (p0.ip6, 80), (p1.ip, 8080))]
        assert len(stable) > 100
        for r in stable:
            want = WEB if r["server.port"] == 80 else API
            got = names(r)
            assert {k: got.get(k) for k in ("server.k8s.pod", "server.k8s.namespace",
                                             "server.k8s.workload")} == \
                {k: want[k] for k in ("server.k8s.pod", "server.k8s.namespace",
                                      "server.k8s.workload")}, r
            if r["client.address"] == node.pods[2].ip:
                assert got["client.k8s.pod"] == "client-a"
        k = fresh.counters()["k8s"]
        assert k["bad_objects"] == 0 and k["watch"]["pods@node"]["synced"]


def test_api_down_at_start_traces_with_the_flags_then_narrows(node, api):
    p1, p2, p3 = node.pods[1], node.pods[2], node.pods[3]
    node.start_pyserver(p3, port=8081)  # (already there when the class above ran)
    api.stop()
    try:
        a = AgentProc(node, "--kubeconfig", api.kc, "--node-name", NODE, "--stats-interval", "0.5",
                      name="agent-nostart").wait_started()
        start = [l for l in a.lines() if l.get("event") == "redtap.start"][0]
        assert start["endpoints"] == ["*"]  # no flags: every server until the API answers
        a.mark()
        assert code(node, p2.ns, f"http://{p1.ip}:8080/py/early") == 200
        assert code(node, p2.ns, f"http://{p3.ip}:8081/py/early") == 200
        recs = a.new_records(2)
        assert [(r["url.path"], names(r)) for r in recs] == [("/py/early", {}), ("/py/early", {})], \
            (a.lines(), a.stderr())
    finally:
        api.start()
    try:
        wait_endpoints(a, base_endpoints(node))
        wait_synced(a)
        a.mark()
        assert code(node, p2.ns, f"http://{p3.ip}:8081/py/late") == 200  # no longer traced
        assert code(node, p2.ns, f"http://{p1.ip}:8080/py/late") == 200
        (r,) = a.new_records(1, settle=1.0)
        assert r["url.path"] == "/py/late" and names(r) == {**CLIENT_A, **API}
    finally:
        assert a.stop() == 0, a.stderr()


def test_host_network_server_over_lo_and_uplink(node, api):
    api.put("pods", make_pod("node-exporter-h7", [UPLINK_IP], ns="monitoring", host_network=True,
                             ports=((9100, "metrics"),), owner=("DaemonSet", "node-exporter"),
                             host_ip=UPLINK_IP))
    node.spawn(node.node_ns, sys.executable, "-m", "pyloader.lab.testserver", "--port", "9100")
    node.wait_port(node.node_ns, UPLINK_IP, 9100)
    a = AgentProc(node, "--kubeconfig", api.kc, "--node-name", NODE, "--host-iface", "lo",
                  "--host-iface", "uplink0", name="agent-hostnet").wait_started()
    try:
        wait_endpoints(a, base_endpoints(node) | {f"{UPLINK_IP}:9100"})
        a.mark()
        url = f"http://{UPLINK_IP}:9100"
        assert code(node, node.ext_ns, f"{url}/py/from-ext") == 200  # over uplink0
        assert code(node, node.node_ns, f"{url}/py/from-host") == 200  # over lo
        recs = a.new_records(2, settle=1.0)
        server = {"server.k8s.pod": "node-exporter-h7", "server.k8s.namespace": "monitoring",
                  "server.k8s.workload": "node-exporter", "server.k8s.workload.kind": "DaemonSet"}
        remote = {"client.k8s.pod": pod_named_by_ip(api, EXT_IP), "client.k8s.namespace": "default"}
        assert [(r["url.path"], names(r)) for r in recs] == [
            ("/py/from-ext", {**remote, **server}), ("/py/from-host", server)]  # once each
        assert recs[1]["client.address"] == UPLINK_IP  # the host: never named as a pod
    finally:
        assert a.stop() == 0, a.stderr()


"""Kubernetes metadata: time-aware naming, slices, this node's endpoints, and
list-then-watch with the real client against lab/fakeapi.py over loopback."""
from __future__ import annotations

import os
import threading
import time
import types

import pytest

from pyloader.lab.fakeapi import FakeApi
from pyloader.lab.fakeobjs import make_pod, make_replicaset, make_service, make_slice
from pyloader.output.accesslog import AccessLog
from pyloader.k8s.meta import K8sMeta, RecordTime
from pyloader.k8s.state import MetaState, PodIndex, parse_pod
from pyloader.k8s.watch import ListWatch, OwnerGetter, Timing, load_client

FAST = Timing(watch_timeout_s=5, connect_timeout_s=2, list_timeout_s=2, watch_slack_s=2,
              backoff_initial_s=0.05, backoff_max_s=0.4)
X = "198.18.0.13"


def pod(name, ips=(X,), uid=None, since=None, **kw):
    o = make_pod(name, ips, started=since, **kw)
    o["metadata"]["uid"] = uid or f"uid-{name}"
    if since is None:  # no timestamps: named from when it is seen
        o["status"]["conditions"] = []
        o["status"]["containerStatuses"] = []
    return o


def slice_(name, service, eps, ports, uid=None, **kw):
    o = make_slice(name, service, eps, ports, **kw)
    o["metadata"]["uid"] = uid or f"uid-{name}"
    return o


def wait_for(cond, timeout=20.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# -- time-aware pod IP history ----------------------------------------------------
def names(idx, ip, times):
    return [(p.name if p else None) for p in (idx.ips.at(ip, t) for t in times)]


def test_reused_ip_names_each_request_by_its_time():
    idx = PodIndex()
    idx.upsert(parse_pod(pod("old", since=90)), now=100)
    idx.remove("uid-old", now=200)
    # the new pod's network-ready stamp (1 s resolution) predates the old one's end
    idx.upsert(parse_pod(pod("new", since=199)), now=205)
    assert names(idx, X, [80, 95, 150, 199.9, 200, 204, 300]) == \
        [None, "old", "old", "old", "new", "new", "new"]


def test_new_holder_ends_an_old_holder_not_yet_seen_deleted():
    idx = PodIndex()
    idx.upsert(parse_pod(pod("old", since=90)), now=100)
    idx.upsert(parse_pod(pod("new", since=250)), now=260)
    idx.remove("uid-old", now=300)  # the late DELETED must not end the new holder
    assert names(idx, X, [249, 250, 255, 400]) == ["old", "new", "new", "new"]


def test_pod_seen_before_it_has_timestamps_is_named_from_then_on():
    idx = PodIndex()
    idx.upsert(parse_pod(pod("p", since=None)), now=100)
    assert names(idx, X, [99.9, 100, 101]) == [None, "p", "p"]


def test_terminal_pod_keeps_status_podip_but_not_the_ip():
    idx = PodIndex()
    idx.upsert(parse_pod(pod("job", since=90)), now=100)
    idx.upsert(parse_pod(pod("job", since=90, phase="Succeeded")), now=150)
    idx.upsert(parse_pod(pod("next", since=160)), now=170)
    assert names(idx, X, [120, 155, 165]) == ["job", None, "next"]


def test_status_updates_keep_one_interval():
    idx = PodIndex()
    idx.upsert(parse_pod(pod("p", since=90)), now=100)
    idx.upsert(parse_pod(pod("p", since=90, labels={"v": "2"})), now=120)
    assert names(idx, X, [95, 110, 130]) == ["p", "p", "p"]
    assert len(idx.ips.d[X]) == 1


def test_relist_drops_missing_pods_and_passes_reused_ips_on():
    idx = PodIndex()
    idx.upsert(parse_pod(pod("old", since=90)), now=100)
    idx.sync([parse_pod(pod("new", since=150))], now=200)  # during an outage: old went, new came
    assert names(idx, X, [120, 160, 250]) == ["old", "new", "new"]
    assert set(idx.pods) == {"uid-new"}


def test_prune_forgets_only_closed_history():
    idx = PodIndex()
    idx.upsert(parse_pod(pod("old", since=90)), now=100)
    idx.remove("uid-old", now=200)
    idx.upsert(parse_pod(pod("new", since=None)), now=300)
    idx.prune(before=250)
    assert names(idx, X, [150, 310]) == [None, "new"]


def test_host_network_pod_without_pod_ips_uses_the_node_ips():
    o = pod("hostnet", (), host_network=True, ports=((9100, "m"),), host_ip="198.18.1.1")
    p = parse_pod(o)
    assert p.ips == ("198.18.1.1",) and p.host_network
    st = MetaState("node-a")
    st.apply("pods@node", "SYNC", [o], 10.0)
    assert st.endpoints() == {"198.18.1.1:9100"}
    assert st.server("198.18.1.1", 9100, 11.0).name == "hostnet"
    assert st.client("198.18.1.1", 11.0) is None


def test_bad_objects_are_counted_and_dropped():
    st = MetaState("node-a")
    junk = [{}, {"metadata": {}}, "a string", None, 7]
    bad_pods = junk + [
        {"metadata": {"uid": "u", "name": "n"}, "status": {"podIPs": [{"ip": "not-an-ip"}]}},
        {"metadata": {"uid": "u2", "name": "n2"},
         "spec": {"containers": [{"ports": [{"containerPort": "eighty"}]}]}}]
    bad_slices = junk + [{"metadata": {"uid": "s"}, "addressType": "IPv4", "ports": [{"port": 80}],
                          "endpoints": [{"addresses": ["nope"]}]}]
    st.apply("pods@node", "SYNC", [pod("good"), *bad_pods], 100.0)
    assert set(st.node_pods.pods) == {"uid-good"} and st.bad_objects == len(bad_pods)
    for b in bad_pods:
        st.apply("pods@node", "ADDED", b, 101.0)
    for b in bad_slices:
        st.apply("endpointslices", "ADDED", b, 101.0)
    for b in junk:
        st.apply("services", "ADDED", b, 101.0)
    assert set(st.node_pods.pods) == {"uid-good"} and not st.slices.slices and not st.services
    assert st.bad_objects == 2 * len(bad_pods) + len(bad_slices) + len(junk)


# -- EndpointSlices and Services ----------------------------------------------------
def test_slices_name_services_and_follow_churn():
    st = MetaState("node-a")
    a = slice_("web-x", "web", [(X, "node-a", "p")], [(80, "http")])
    st.apply("endpointslices", "SYNC", [a], 10.0)
    assert st.slices.names.at((X, 80), 11) == "web"
    assert st.slices.names.at((X, 81), 11) is None
    st.apply("endpointslices", "ADDED", slice_("alias-y", "alias", [(X, "node-a", "p")],
                                               [(80, "http")]), 20.0)
    assert st.slices.names.at((X, 80), 21) == "alias,web"
    moved = slice_("web-x", "web", [("198.18.0.14", "node-a", "q")], [(80, "http")])
    st.apply("endpointslices", "MODIFIED", moved, 30.0)
    assert st.slices.names.at((X, 80), 31) == "alias"
    assert st.slices.names.at(("198.18.0.14", 80), 31) == "web"
    assert st.slices.names.at((X, 80), 25) == "alias,web"  # history: right for the time


def test_slice_names_its_service_only_while_the_service_exists():
    st = MetaState("node-a")
    st.apply("endpointslices", "SYNC", [slice_("web-x", "web", [(X, "node-a", "p")],
                                               [(80, "http")])], 10.0)
    st.apply("services", "SYNC", [make_service("web", {"app": "web"})], 11.0)
    assert st.slices.names.at((X, 80), 12) == "web"
    st.apply("services", "DELETED", make_service("web", {"app": "web"}), 20.0)
    assert st.slices.names.at((X, 80), 21) is None
    assert st.slices.names.at((X, 80), 15) == "web"


def test_endpoints_are_exactly_this_nodes():
    st = MetaState("node-a")
    pods = [pod("web", (X, "2001:db8::d"), ports=((80, "http"), (9090, "metrics"))),
            pod("done", ("198.18.0.20",), phase="Succeeded"),
            pod("hostnet", ("198.18.1.1",), host_network=True, ports=((10250, "kubelet"),)),
            pod("pending", ())]
    st.apply("pods@node", "SYNC", pods, 10.0)
    st.apply("endpointslices", "SYNC", [
        slice_("a", "web", [(X, "node-a", "web")], [(8080, "alt")]),
        slice_("b", "far", [("198.18.0.99", "node-b", "far")], [(80, "http")]),
        slice_("c", "manual", [(X, None, None), ("198.18.0.98", None, None)], [(7000, "m")])], 10.0)
    assert st.endpoints() == {f"{X}:80", f"{X}:9090", "[2001:db8::d]:80", "[2001:db8::d]:9090",
                              "198.18.1.1:10250", f"{X}:8080", f"{X}:7000"}


# -- enrichment -----------------------------------------------------------------------
def rec(client, server, port, t):
    frac = f"{t % 1:.6f}"[2:]
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(t))) + f".{frac}Z",
            "client.address": client, "client.port": 40000,
            "server.address": server, "server.port": port}


def test_record_time_parses_the_log_format():
    rt = RecordTime()
    assert rt("2024-05-01T12:00:00.250000Z") == pytest.approx(1714564800.25)
    assert rt(rec("a", "b", 1, 1714564801.5)["time"]) == pytest.approx(1714564801.5)


def test_records_name_both_ends_and_omit_unknown_ones():
    m = K8sMeta("node-a", api_client=None)
    now = time.time()
    st = m.state
    st.apply("pods@node", "SYNC", [
        pod("web-1", (X,), since=now - 100, ns="shop", owner=("StatefulSet", "web")),
        pod("hostsrv", ("198.18.1.1",), since=now - 100, host_network=True,
            ports=((9000, "h"),), ns="kube-system", owner=("DaemonSet", "agent"))], now - 50)
    st.apply("pods", "SYNC", [pod("client-b", ("198.18.0.50",), since=now - 100, node="node-b"),
                              pod("hostcli", ("198.18.1.1",), since=now - 100,
                                  host_network=True)], now - 50)
    st.apply("endpointslices", "SYNC", [slice_("web-x", "web", [(X, "node-a", "web-1")],
                                               [(80, "http")], ns="shop")], now - 50)
    r = rec("198.18.0.50", X, 80, now)
    m.process(r)
    assert {k: v for k, v in r.items() if ".k8s." in k} == {
        "client.k8s.pod.name": "client-b", "client.k8s.namespace.name": "default",
        "server.k8s.pod.name": "web-1", "server.k8s.namespace.name": "shop",
        "server.k8s.service.name": "web",
        "server.k8s.workload.name": "web", "server.k8s.workload.kind": "StatefulSet"}
    r = rec("198.18.1.1", "198.18.1.1", 9000, now)  # from the host to a hostNetwork server
    m.process(r)
    assert {k: v for k, v in r.items() if ".k8s." in k} == {
        "server.k8s.pod.name": "hostsrv", "server.k8s.namespace.name": "kube-system",
        "server.k8s.workload.name": "agent", "server.k8s.workload.kind": "DaemonSet"}
    r = rec("198.18.9.9", "198.18.1.1", 9001, now)  # nobody known
    m.process(r)
    assert not [k for k in r if ".k8s." in k]
    r = rec("198.18.0.50", X, 80, now - 200)  # before anyone held the IPs
    m.process(r)
    assert not [k for k in r if ".k8s." in k]


# -- the watch machinery against the fake API server ------------------------------------
@pytest.fixture
def api(tmp_path):
    a = FakeApi().start()
    a.bookmark_interval = 0.2
    a.kubeconfig(str(tmp_path / "kubeconfig"))
    a.kc = str(tmp_path / "kubeconfig")
    yield a
    a.stop()


class Sink:
    def __init__(self):
        self.events, self.lock = [], threading.Lock()

    def __call__(self, typ, payload, now):
        with self.lock:
            self.events.append((typ, payload))

    def names(self):
        """Current object names, replaying SYNC/ADDED/DELETED."""
        cur = set()
        with self.lock:
            for typ, p in self.events:
                if typ == "SYNC":
                    cur = {o["metadata"]["name"] for o in p}
                elif typ == "DELETED":
                    cur.discard(p["metadata"]["name"])
                else:
                    cur.add(p["metadata"]["name"])
        return cur

    def syncs(self):
        return sum(1 for t, _ in self.events if t == "SYNC")


@pytest.fixture
def watch(api):
    made = []

    def make(resource="pods", field_selector=None, timing=FAST):
        from kubernetes import client
        c = load_client(api.kc)
        call = {"pods": client.CoreV1Api(c).list_pod_for_all_namespaces,
                "services": client.CoreV1Api(c).list_service_for_all_namespaces}[resource]
        sink = Sink()
        w = ListWatch(resource, call, sink, field_selector, timing)
        w.sink_ = sink
        made.append(w)
        w.start()
        return w
    yield make
    for w in made:
        w.stop()


def test_list_then_watch_follows_every_change(api, watch):
    api.put("pods", make_pod("a", ["198.18.0.10"]))
    w = watch(field_selector="spec.nodeName=node-a")
    wait_for(lambda: w.synced and w.connected, what="sync")
    api.put("pods", make_pod("b", ["198.18.0.11"]))
    api.put("pods", make_pod("far", ["198.18.0.99"], node="node-b"))
    api.delete("pods", "default", "a")
    wait_for(lambda: w.sink_.names() == {"b"}, what="events")
    assert w.sink_.syncs() == 1 and api.lists("pods") == 1


def test_large_lists_come_in_pages(api, watch):
    for i in range(7):
        api.put("pods", make_pod(f"p{i}", [f"198.18.0.{20 + i}"]))
    w = watch(timing=Timing(**{**FAST.__dict__, "page_size": 3}))
    wait_for(lambda: w.synced, what="sync")
    assert w.sink_.names() == {f"p{i}" for i in range(7)}
    assert [q.get("limit") for v, r, q in api.requests if v == "list"] == ["3", "3", "3"]
    assert w.sink_.syncs() == 1


def test_dropped_connection_resumes_from_its_version_without_relisting(api, watch):
    w = watch()
    wait_for(lambda: w.connected, what="watch")
    rv = w.rv
    assert api.drop_connections() >= 1
    api.put("pods", make_pod("while-away", ["198.18.0.12"]))
    wait_for(lambda: "while-away" in w.sink_.names(), what="resume")
    assert api.lists("pods") == 1 and api.watches("pods") >= 2
    resumed = [q["resourceVersion"] for v, r, q in api.requests if v == "watch"][1]
    assert int(resumed) >= int(rv)


@pytest.mark.parametrize("as_status", [False, True], ids=["error-event", "http-status"])
def test_410_gone_lists_afresh(api, watch, as_status):
    api.gone_as_status = as_status
    api.put("pods", make_pod("a", ["198.18.0.10"]))
    w = watch()
    wait_for(lambda: w.connected, what="watch")
    api.stop()  # the API goes away; meanwhile history is compacted
    api.store.delete("pods", "default", "a")
    api.store.put("pods", make_pod("b", ["198.18.0.11"]))
    api.compact()
    api.start()
    wait_for(lambda: w.n["gone"] >= 1 and w.sink_.syncs() == 2, what="relist")
    assert w.sink_.names() == {"b"}


def test_bookmarks_keep_a_filtered_watch_resumable_after_compaction(api, watch):
    w = watch(field_selector="spec.nodeName=node-a")
    wait_for(lambda: w.connected, what="watch")
    for i in range(5):  # changes elsewhere advance the version; this watch sees none
        api.put("pods", make_pod(f"far{i}", [f"198.18.0.{90 + i}"], node="node-b"))
    target = api.store.rv
    wait_for(lambda: int(w.rv) >= target, what="a bookmark")
    assert w.n["bookmarks"] >= 1 and w.n["events"] == 0
    api.compact()
    api.drop_connections()
    wait_for(lambda: api.watches("pods") >= 2 and w.connected, what="resume")
    time.sleep(0.5)
    assert w.n["gone"] == 0 and api.lists("pods") == 1


def test_api_down_at_start_backs_off_then_lists(api, watch):
    api.stop()
    w = watch()
    wait_for(lambda: w.n["errors"] >= 3, what="failed attempts")
    assert not w.synced and ("errno" in w.last_error or "Connection" in w.last_error), w.last_error
    api.put("pods", make_pod("a", ["198.18.0.10"]))
    api.start()
    wait_for(lambda: w.synced and w.sink_.names() == {"a"}, what="sync after outage")


def test_slow_answers_time_out_and_are_retried(api, watch):
    api.delay = 3.0  # longer than the read timeout of a list
    w = watch(timing=Timing(**{**FAST.__dict__, "list_timeout_s": 0.5}))
    wait_for(lambda: w.n["errors"] >= 1, what="a timeout")
    assert "Timeout" in w.last_error or "timed out" in w.last_error
    api.delay = 0.0
    wait_for(lambda: w.synced, what="sync")


def test_http_errors_and_bad_tokens_are_retried(api, watch):
    api.fail["pods"] = 500
    w = watch()
    wait_for(lambda: w.n["errors"] >= 2, what="errors")
    assert w.last_error.startswith("HTTP 500")
    api.fail.clear()
    api.token = "rotated"
    wait_for(lambda: "HTTP 401" in w.last_error, what="401")
    api.token = "fakeapi-test-token"
    wait_for(lambda: w.synced, what="sync")


def test_replicasets_resolve_to_their_deployment(api):
    api.put("replicasets", make_replicaset("web-7d4", "web"))
    api.put("replicasets", make_replicaset("lonely-1", None))
    g = OwnerGetter(load_client(api.kc), FAST)
    g.start()
    try:
        for name in ("web-7d4", "lonely-1", "missing"):
            g.want("default", name)
        wait_for(lambda: len(g.results) == 3, what="gets")
        assert g.results == {("default", "web-7d4"): ("Deployment", "web"),
                             ("default", "lonely-1"): ("ReplicaSet", "lonely-1"),
                             ("default", "missing"): None}
    finally:
        g.stop()


def test_in_cluster_config_uses_the_service_account(api, tmp_path):
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text(api.token)
    (sa / "ca.crt").write_bytes(open(api.ca, "rb").read())
    env = {"KUBERNETES_SERVICE_HOST": api.host, "KUBERNETES_SERVICE_PORT": str(api.port)}
    from kubernetes import client
    c = load_client(None, env=env, sa_dir=str(sa))
    api.put("pods", make_pod("a", ["198.18.0.10"]))
    resp = client.CoreV1Api(c).list_pod_for_all_namespaces(_preload_content=False)
    assert b'"name": "a"' in resp.data


# -- the component: watches -> state -> the kernel's endpoint map -----------------------
def test_component_keeps_the_kernel_map_in_step(api, tracer, tmp_path):
    from pyloader.kernel.endpoints import parse_endpoint
    tracer.endpoints.set([parse_endpoint("*")])  # what the agent starts with (no flags)
    log = AccessLog(str(tmp_path / "log"))
    agent = types.SimpleNamespace(tracer=tracer, accesslog=log,
                                  cfg=types.SimpleNamespace(endpoints=[]))
    api.put("pods", make_pod("web", ["198.18.0.10"], ports=((80, "http"),)))
    api.put("pods", make_pod("far", ["198.18.0.99"], node="node-b"))
    m = K8sMeta("node-a", load_client(api.kc), timing=FAST)
    m.start(agent)
    in_map = lambda: {bytes(k) for k in tracer.obj.map("endpoints").keys()}  # noqa: E731
    key = lambda t: parse_endpoint(t).key()  # noqa: E731
    try:
        def synced_to(want):
            m.tick(time.monotonic())
            return in_map() == {key(t) for t in want}
        wait_for(lambda: synced_to({"198.18.0.10:80"}), what="first sync")
        api.put("pods", make_pod("new", ["198.18.0.12"], ports=((8080, "http"),)))
        wait_for(lambda: synced_to({"198.18.0.10:80", "198.18.0.12:8080"}), what="added pod")
        api.delete("pods", "default", "web")
        wait_for(lambda: synced_to({"198.18.0.12:8080"}), what="removed pod")
        api.stop()  # outage: the last known state stays
        time.sleep(0.5)
        assert synced_to({"198.18.0.12:8080"})
        assert m.counters()["k8s"]["watch"]["pods@node"]["errors"] >= 1
    finally:
        m.stop()
        log.close()
        tracer.endpoints.set([])
    events = [l for l in open(tmp_path / "log").read().splitlines() if "redtap.endpoints" in l]
    assert len(events) == 3


def test_rbac_grants_exactly_what_the_agent_requests(api, tmp_path):
    """deploy/kubernetes/rbac.yaml against the requests of a running component."""
    import yaml
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    docs = list(yaml.safe_load_all(open(os.path.join(root, "deploy/kubernetes/rbac.yaml"))))
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    api.put("replicasets", make_replicaset("web-1", "web"))
    api.put("pods", make_pod("web-1-a", ["198.18.0.10"], owner=("ReplicaSet", "web-1")))
    m = K8sMeta("node-a", load_client(api.kc), timing=FAST)
    table = types.SimpleNamespace(set=lambda eps: None, current={}, host_endpoints=[])
    log = AccessLog(str(tmp_path / "log"))
    m.start(types.SimpleNamespace(tracer=types.SimpleNamespace(endpoints=table), accesslog=log,
                                  cfg=types.SimpleNamespace(endpoints=[])))
    try:
        def all_done():
            m.tick(time.monotonic())
            return m.owners.results and all(w.connected for w in m.watchers)
        wait_for(all_done, what="every watch and the replicaset get")
    finally:
        m.stop()
        log.close()
    group = {"pods": "", "services": "", "endpointslices": "discovery.k8s.io",
             "replicasets": "apps"}
    used = {(group[r], r, v) for v, r, _ in api.requests}
    assert used == granted


@pytest.fixture
def tracer():
    if os.geteuid() != 0:
        pytest.skip("needs root for bpf()")
    from pyloader.kernel.tracer import Tracer
    t = Tracer.load()
    yield t
    t.close()


# -- the command line -----------------------------------------------------------------
def test_cli_needs_the_node_name_for_kubernetes(monkeypatch, tmp_path, capsys):
    from pyloader import cli
    monkeypatch.delenv("NODE_NAME", raising=False)
    kc = tmp_path / "kubeconfig"
    kc.write_text("{}")
    assert cli.main(["run", "--kubeconfig", str(kc)]) == 1
    assert "--node-name or NODE_NAME" in capsys.readouterr().err


def test_cli_reports_an_unreadable_kubeconfig(monkeypatch, tmp_path, capsys):
    from pyloader import cli
    monkeypatch.setenv("NODE_NAME", "node-a")
    missing = str(tmp_path / "nope")
    assert cli.main(["run", "--kubeconfig", missing]) == 1
    err = capsys.readouterr().err
    assert f"loading Kubernetes client config from {missing}" in err

"""Speed never changes meaning: the fast path (pipeline/fastpath.py with the C
helper src/native/recordfmt.c) writes the same bytes as the reference path
(record.py, the stages, orjson) for a fixed corpus of events, hostile ones
included, and moves the same counters and metrics.

Both paths get the same batches, with their own, identically built stages
(the route cap, names and counters are stateful); Kubernetes watch events are
applied between the same batches on both sides.
"""
from __future__ import annotations

import ctypes
import ipaddress
import json
import random

import pytest

from pyloader.agent import Agent, AgentConfig
from pyloader.k8s.meta import K8sMeta
from pyloader.kernel import abi
from pyloader.lab.fakeobjs import make_pod, make_service, make_slice
from pyloader.output.accesslog import AccessLog
from pyloader.output.metrics import NB, SUM, MetricsComponent
from pyloader.pipeline import fastpath
from pyloader.pipeline.component import overridden
from pyloader.pipeline.record import RecordBuilder
from pyloader.pipeline.redact import Redactor
from pyloader.pipeline.routes import RouteComponent, RouteTable

LIB = fastpath.load_helper()
pytestmark = pytest.mark.skipif(LIB is None, reason="record helper not built (make bpf)")
LIB.rf_sample.restype, LIB.rf_sample.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p,
                                                               ctypes.c_size_t]

V4 = b"\x00" * 10 + b"\xff\xff"
OFFSET_NS = 1_700_000_000 * 10**9  # wall = req_ns + offset: Nov 2023
T0 = 1_700_000_100.0               # "blue" gives 198.18.0.10 to "green" here (wall s)
NODE = "node-a"
HOSTILE = [b'"', b"\\", b"\n", b"\r\n", b"\x00", b"\x1b[31m", b"\xff\xfe", b"\xc3(",
           b"\xed\xa0\x80", b'","http.response.status_code":500,"x":"', b"}\n{", b"\\u0000",
           b"\\\"", b"\xe2\x80\xa8", b"%00" * 90, "ü€😀".encode(), b"\x7f", b"\t"]
PATHS = [b"/", b"/users/123/orders/9f1c2ab7e0", b"/api/v1/items/42", b"/status/ready",
         b"/cart;jsessionid=0A1B/items", b"/search", b"*", b"example.com:443",
         b"http://example.com/x/1234", b"/a%20b/%00", b"/" + b"x" * 300]
QUERIES = [b"", b"?q=1", b"?user=ann&access_token=abc&API_KEY=x", b"?", b"?a=&b",
           b"?x=1;sessionid=2", b"?%74oken=s"]


def v4(ip: str) -> bytes:
    return V4 + ipaddress.IPv4Address(ip).packed


def event(rnd: random.Random, i: int, conns: list, hostile: bool, start_ns: int) -> bytes:
    caddr, saddr, cport, sport = rnd.choice(conns)
    url = rnd.choice(PATHS) + rnd.choice(QUERIES)
    if hostile and rnd.random() < 0.3:
        url = b"/" + b"".join(rnd.choice(HOSTILE) for _ in range(rnd.randrange(1, 6)))
    url = url[:abi.MAX_URL_LEN]
    req = start_ns + i * 10**6 + rnd.randrange(10**6)
    d = int(10 ** rnd.uniform(3, 9.5))
    f = dict(zip(abi.EVENT_FIELDS, abi.EVENT_STRUCT.unpack(bytes(abi.EVENT_SIZE))))
    flags = rnd.choice([0, 0, 0, abi.EV_RESP_END, abi.EV_RESP_END | abi.EV_REQ_BODY |
                        abi.EV_RESP_BODY, abi.EV_UNANSWERED, abi.EV_URL_TRUNCATED])
    f.update(req_ns=req, resp_ns=req + d, resp_last_ns=req + d + rnd.randrange(10**7),
             req_body=rnd.randrange(10**6), resp_body=rnd.randrange(10**9),
             caddr=caddr, saddr=saddr, cport=cport, sport=sport,
             status=rnd.choice([200] * 10 + [201, 204, 304, 404, 500, 503]),
             url_len=len(url), method=rnd.choice([1] * 8 + [2, 3, 4, 5, 9, 10]), version=11,
             flags=flags, reason=rnd.choice([0, abi.R_LOST, abi.R_IDLE]),
             method_name=b"PROPFIND".ljust(16, b"\0"), url=url.ljust(abi.MAX_URL_LEN, b"\0"))
    if hostile:  # extreme numbers and odd fields, now and then
        for k, vals in (("req_ns", [0, 1, 2**64 - 1, 2**63]), ("resp_ns", [0, 2**64 - 1]),
                        ("resp_last_ns", [0, 2**64 - 1]), ("req_body", [2**64 - 1]),
                        ("resp_body", [2**64 - 1]), ("status", [0, 65535, 4296]),
                        ("url_len", [0, 257, 65535]), ("method", [0, 11, 255]),
                        ("version", [0, 10, 255]), ("flags", list(range(64)) + [255]),
                        ("reason", [255])):
            if rnd.random() < 0.08:
                f[k] = rnd.choice(vals)
    return abi.EVENT_STRUCT.pack(*(f[name] for name in abi.EVENT_FIELDS))


def corpus(n: int, seed: int, hostile: bool, start_ns: int = 100 * 10**9) -> list[bytes]:
    rnd = random.Random(seed)
    servers = [(v4(f"198.18.0.{10 + i}"), 80) for i in range(4)] + [(v4("198.18.0.13"), 8080)]
    servers.append((ipaddress.IPv6Address("2001:db8::a").packed, 80))
    clients = [v4(f"198.18.0.{20 + i}") for i in range(6)] + [v4("198.18.1.2"),
                                                              ipaddress.IPv6Address("2001:db8::14").packed]
    conns = [(c, s, 40000 + rnd.randrange(20), p) for s, p in servers for c in clients]
    return [event(rnd, i, conns, hostile, start_ns) for i in range(n)]


def k8s_stage() -> K8sMeta:
    """Names as the watches would give them; 198.18.0.10 changes hands at T0."""
    blue = make_pod("blue", ["198.18.0.10"], ns="shop", node=NODE, labels={"app": "web0"},
                    owner=("StatefulSet", "web0"), started=T0 - 1000)
    servers = [make_pod(f"web-{i}", [f"198.18.0.{10 + i}"], ns="shop", node=NODE,
                        labels={"app": f"web{i}"}, owner=("StatefulSet", f"web{i}"),
                        started=T0 - 1000) for i in range(1, 4)]
    clients = [make_pod(f"client-{i}", [f"198.18.0.{20 + i}"], node="node-b", ports=(),
                        started=T0 - 1000) for i in range(4)]
    services = [make_service(f"web{i}", {"app": f"web{i}"}, ns="shop") for i in range(3)]
    slices = [make_slice(f"web{i}-x", f"web{i}", [(f"198.18.0.{10 + i}", NODE, f"web-{i}")],
                         [(80, "http")], ns="shop") for i in range(3)]
    objs = [blue] + servers + clients + services + slices
    for i, obj in enumerate(objs):
        obj["metadata"].setdefault("uid", f"uid-{i}")
        obj["metadata"].setdefault("resourceVersion", str(i + 1))
    k = K8sMeta(NODE, api_client=None)
    now = T0 - 500
    k.state.apply("pods@node", "SYNC", [blue] + servers, now)
    k.state.apply("pods", "SYNC", [blue] + servers + clients, now)
    k.state.apply("services", "SYNC", services, now)
    k.state.apply("endpointslices", "SYNC", slices, now)
    return k


def watch_events() -> dict[int, list]:
    """Watch events by the batch before which they arrive."""
    green = make_pod("green", ["198.18.0.10"], ns="shop", node=NODE, labels={"app": "web0"},
                     started=T0)
    green["metadata"].update(uid="uid-green", resourceVersion="100")
    client5 = make_pod("client-5", ["198.18.0.25"], node="node-b", ports=(), started=T0 + 20)
    client5["metadata"].update(uid="uid-c5", resourceVersion="101")
    return {3: [("pods@node", "DELETED", {"metadata": {"uid": "uid-0"}}, T0),
                ("pods", "DELETED", {"metadata": {"uid": "uid-0"}}, T0),
                ("pods@node", "ADDED", green, T0), ("pods", "ADDED", green, T0)],
            6: [("pods", "ADDED", client5, T0 + 20)]}


def stages(kind: str) -> list:
    if kind == "none":
        return []
    table = RouteTable(["/api/v1/items/{id}"], max_routes=4)  # a small cap: folds happen
    comps = [Redactor(), RouteComponent(table)]
    if kind == "k8s":
        comps.insert(1, k8s_stage())
    if kind in ("k8s", "metrics"):
        comps.append(MetricsComponent("127.0.0.1:0", table))
    return comps


def agent_for(comps, path: str) -> Agent:
    a = Agent(AgentConfig(components=comps, max_batch=0))
    a.accesslog = AccessLog(path)
    a.builder = RecordBuilder()
    a.builder.clock.offset_ns = OFFSET_NS
    a.builder.clock.sync = lambda: None  # one fixed clock for both paths
    a.processors = overridden(comps, "process")
    a.observers = overridden(comps, "observe")
    a.tickers = overridden(comps, "tick")
    return a


def run(raws: list[bytes], batch: int, kind: str, path: str, fast: bool, events=None):
    comps = stages(kind)
    a = agent_for(comps, path)
    if fast:
        a.fast = fastpath.FastPath.create(a, LIB)
        assert a.fast is not None
    if events is None:
        events = watch_events() if kind == "k8s" else {}
    for b, i in enumerate(range(0, len(raws), batch)):
        for ev in events.get(b, []):
            comps[1].inbox.append(ev)
        chunk = raws[i:i + batch]
        if fast:
            for r in chunk:
                LIB.rf_sample(a.fast.ctx, r, len(r))
            a.handle_native()
        else:
            a.handle_batch(chunk)
        for c in comps:
            if isinstance(c, MetricsComponent):
                c.flush()  # its tick() without the agent's counters
    a.accesslog.close()
    with open(path, "rb") as f:
        data = f.read()
    counters = {}
    for c in comps:
        counters.update(c.counters())
    metrics = next((c.agg for c in comps if isinstance(c, MetricsComponent)), None)
    return data, counters, metrics, a


def same_metrics(ref, new) -> None:
    if ref is None:
        assert new is None
        return
    assert ref.unanswered == new.unanswered
    assert set(ref.hist) == set(new.hist)
    for key, h in ref.hist.items():
        g = new.hist[key]
        assert g[:NB] == h[:NB], key
        assert g[SUM] == pytest.approx(h[SUM], rel=1e-12), key


@pytest.mark.parametrize("kind", ["none", "redact+routes", "metrics", "k8s"])
@pytest.mark.parametrize("hostile", [False, True], ids=["plain", "hostile"])
@pytest.mark.parametrize("batch", [1, 7, 256])
def test_fast_path_writes_the_reference_bytes(tmp_path, kind, hostile, batch):
    raws = corpus(1500 if batch < 256 else 5000, seed=batch * 7 + hostile, hostile=hostile)
    ref, ref_counters, ref_metrics, _ = run(raws, batch, kind, str(tmp_path / "ref.log"), False)
    new, new_counters, new_metrics, a = run(raws, batch, kind, str(tmp_path / "new.log"), True)
    assert ref.count(b"\n") == len(raws)
    if new != ref:
        for i, (x, y) in enumerate(zip(ref.split(b"\n"), new.split(b"\n"))):
            assert y == x, f"line {i} differs"
    assert new == ref
    assert new_counters == ref_counters
    same_metrics(ref_metrics, new_metrics)
    # the helper did render most of them (else this test would prove nothing)
    assert a.fast.rendered > len(raws) // 4, (a.fast.rendered, a.fast.referenced)
    assert a.stats.events == len(raws)


def test_names_follow_a_reused_ip_through_the_cache(tmp_path):
    """198.18.0.10 is blue's before T0 and green's after: each record gets the
    name of its own time, also when its connection's names were cached."""
    raws = corpus(3000, seed=3, hostile=False, start_ns=99 * 10**9)  # T0 - 1 s .. T0 + 2 s
    ref, *_ = run(raws, 256, "k8s", str(tmp_path / "ref.log"), False, {0: watch_events()[3]})
    new, _, _, a = run(raws, 256, "k8s", str(tmp_path / "new.log"), True, {0: watch_events()[3]})
    assert new == ref and a.fast.rendered > 2000
    names = set()
    for line in new.splitlines():
        rec = json.loads(line)
        if rec["server.address"] == "198.18.0.10":
            names.add((rec["time"] < "2023-11-14T22:15:00", rec.get("server.k8s.pod.name")))
    assert names == {(True, "blue"), (False, "green")}


def test_short_records_are_counted_bad_not_rendered(tmp_path):
    comps = stages("redact+routes")
    a = agent_for(comps, str(tmp_path / "a.log"))
    a.fast = fastpath.FastPath.create(a, LIB)
    good = corpus(3, seed=1, hostile=False)
    for r in (good[0], good[1][:100], good[2] + b"extra"):
        LIB.rf_sample(a.fast.ctx, r, len(r))
    assert a.handle_native() == 2
    assert a.stats.bad_events == 1 and a.stats.events == 2
    a.accesslog.close()
    assert open(tmp_path / "a.log", "rb").read().count(b"\n") == 2


def test_unknown_stage_means_the_reference_path():
    class Tagger:  # a stage of someone else's: the helper cannot know its fields
        fast_role = None

        def process(self, rec):
            rec["x"] = 1
    a = Agent(AgentConfig(components=[Redactor(), Tagger()]))
    a.builder, a.accesslog = RecordBuilder(), None
    assert fastpath.FastPath.create(a, LIB) is None
    a = Agent(AgentConfig(components=[Redactor()], summary=True))
    assert fastpath.FastPath.create(a, LIB) is None

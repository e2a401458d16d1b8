"""The Prometheus exposition: validity (prometheus_client's parsers), names,
labels, bucket placement, counters, the HTTP endpoint, and the live view's
arithmetic on what it scrapes."""
from __future__ import annotations

import math
from decimal import Decimal

import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

from pyloader.kernel import abi

from pyloader.tools import top
from pyloader.agent import Agent, AgentConfig
from pyloader.errors import RedtapError
from pyloader.output.metrics import (DURATION, LE, UNANSWERED, MetricsComponent, parse_addr)
from pyloader.pipeline.routes import RouteComponent, RouteTable


def rec(path="/users/1", status=200, ms=1.0, method="GET", addr="198.18.0.10", port=80, **k8s):
    r = {"server.address": addr, "server.port": port, "http.request.method": method,
         "url.path": path, "duration_ms": ms}
    if status is not None:
        r["http.response.status_code"] = status
    r.update({f"server.k8s.{k}.name": v for k, v in k8s.items()})
    return r


def feed(records, table=None):
    table = table or RouteTable()
    routes, m = RouteComponent(table), MetricsComponent("127.0.0.1:0", table)
    for r in records:
        routes.process(r)
        m.observe(r)
    m.flush()
    return m


def samples(m, name):
    """{(sample name, frozenset(labels)): value} of one family, via the text parser."""
    out = {}
    for fam in parse_text(generate_latest(m.registry).decode()):
        if fam.name == name:
            for s in fam.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def series(m, **want):
    """bucket values by le, count, sum of the duration series whose labels include `want`."""
    buckets, count, total = {}, None, None
    for (name, labels), v in samples(m, DURATION).items():
        d = dict(labels)
        if any(d.get(k) != str(val) for k, val in want.items()):
            continue
        if name.endswith("_bucket"):
            buckets[d["le"]] = buckets.get(d["le"], 0) + v
        elif name.endswith("_count"):
            count = (count or 0) + v
        else:
            total = (total or 0) + v
    return buckets, count, total


MIXED = [rec("/users/1", 200, 0.1), rec("/users/2", 200, 0.101), rec("/users/3", 404, 7.5),
         rec("/", 500, 2500.0), rec("/slow", 200, 20000.0), rec("/users/9", None, 3.0),
         rec("/cart", 201, 1.0, method="POST", service="shop", namespace="prod", pod="shop-1"),
         rec("/weird\"\\\nname", 200, 1.0)]


def test_text_exposition_parses_and_histograms_are_consistent():
    m = feed([dict(r) for r in MIXED])
    fams = {f.name: f for f in parse_text(generate_latest(m.registry).decode())}
    assert fams[DURATION].type == "histogram"
    assert fams[UNANSWERED].type == "counter"
    groups = {}
    for s in fams[DURATION].samples:
        key = frozenset((k, v) for k, v in s.labels.items() if k != "le")
        groups.setdefault(key, []).append(s)
    assert len(groups) == 6  # 7 answered records, two share a series
    for group in groups.values():
        buckets = [(float(s.labels["le"]), s.value) for s in group if s.name.endswith("_bucket")]
        assert [le for le, _ in buckets] == sorted(float(x) for x in LE)
        assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
        count = next(s.value for s in group if s.name.endswith("_count"))
        assert buckets[-1] == (math.inf, count)


def test_openmetrics_exposition_passes_the_strict_parser():
    m = feed([dict(r) for r in MIXED])
    text = generate_openmetrics(m.registry).decode()
    names = {f.name for f in parse_om(text)}  # raises on any violation (order, +Inf, count)
    assert {"http_server_request_duration_seconds", "redtap_http_server_unanswered_requests",
            "process_cpu_seconds"} <= names


@pytest.mark.parametrize("ms,le", [(0.0, "0.0001"), (0.1, "0.0001"), (0.101, "0.00025"),
                                   (1.0, "0.001"), (1.001, "0.0025"), (999.999, "1.0"),
                                   (1000.0, "1.0"), (10000.0, "10.0"), (10000.001, "+Inf")])
def test_bucket_placement_at_the_boundaries(ms, le):
    m = feed([rec(ms=ms)])
    buckets, count, total = series(m)
    first = min((b for b, v in buckets.items() if v == 1), key=lambda b: float(b))
    assert first == le and count == 1
    assert total == pytest.approx(ms / 1000, abs=1e-12)


def test_bucket_counts_match_le_decimal_arithmetic():
    durations = [0.004, 0.1, 0.25, 0.2501, 3.3, 47.0, 99.999, 100.0, 2600.0, 12000.0]
    m = feed([rec(path="/d", ms=d) for d in durations])
    buckets, count, total = series(m, http_route="/d")
    for le, v in buckets.items():
        bound = Decimal("Infinity") if le == "+Inf" else Decimal(le) * 1000
        assert v == sum(1 for d in durations if Decimal(str(d)) <= bound), le
    assert count == len(durations)
    assert total == pytest.approx(sum(durations) / 1000, rel=1e-12)


def test_labels_follow_otel_names_and_use_routes():
    m = feed([rec("/users/42", 404)])
    (labels,) = {l for (n, l) in samples(m, DURATION) if n.endswith("_count")}
    assert dict(labels) == {"http_request_method": "GET", "http_response_status_code": "404",
                            "http_route": "/users/{id}", "server_address": "198.18.0.10",
                            "server_port": "80"}


def test_kubernetes_names_replace_the_address_and_only_known_ones_appear():
    m = feed([rec("/a", service="web", namespace="shop"), rec("/a", pod="web-7", namespace="shop")])
    sets = {l for (n, l) in samples(m, DURATION) if n.endswith("_count")}
    keys = sorted(sorted(k for k, _ in s if not k.startswith("http_")) for s in sets)
    assert keys == [["k8s_namespace_name", "k8s_pod_name"], ["k8s_namespace_name", "k8s_service_name"]]


def test_unanswered_are_counted_apart_without_a_status():
    m = feed([rec("/u/1", None), rec("/u/2", None), rec("/u/3", 200)])
    got = samples(m, UNANSWERED)
    assert list(got.values()) == [2.0]
    (name, labels), = got
    assert name == UNANSWERED + "_total" and "http_response_status_code" not in dict(labels)
    assert dict(labels)["http_route"] == "/u/{id}"
    assert series(m)[1] == 1


def test_odd_characters_in_routes_round_trip_escaped():
    m = feed([rec('/we"ird\\\nname')])
    routes = {dict(l)["http_route"] for (n, l) in samples(m, DURATION)}
    assert routes == {'/we"ird\\\nname'}


def test_records_without_a_route_are_templated_by_the_aggregate():
    m = MetricsComponent("127.0.0.1:0")
    m.observe(rec("/users/77"))
    m.flush()
    assert {dict(l)["http_route"] for (n, l) in samples(m, DURATION)} == {"/users/{id}"}


def test_observe_defers_work_to_the_batch_fold():
    m = MetricsComponent("127.0.0.1:0")
    r = rec("/users/1")
    r["http.route"] = "/users/{id}"
    m.observe(r)
    assert series(m)[1] is None
    m.tick(0.0)
    assert series(m)[1] == 1


def test_kernel_agent_and_route_counters_are_exposed_as_counters():
    m = feed([])
    m.collector.snapshot = {"kernel": {n: i for i, n in enumerate(abi.STATS)} | {"lru_evicted_pending": 3},
                            "agent": {"events": 10, "bad_events": 1, "idle_unanswered": 2,
                                      "pending_requests": 4, "max_rss_kb": 9, "rss_growth_kb": 7},
                            "extra": {"k8s": {"pods": 5, "bad": "x"}}, "route_overflow": 6}
    fams = {f.name: f for f in parse_text(generate_latest(m.registry).decode())}
    for i, n in enumerate(abi.STATS):
        f = fams[f"redtap_kernel_{n}"]
        assert f.type == "counter" and f.samples[0].value == i
    assert fams["redtap_kernel_lru_evicted_pending"].samples[0].value == 3
    assert fams["redtap_agent_events"].samples[0].value == 10
    assert fams["redtap_http_route_overflow"].samples[0].value == 6
    assert fams["redtap_agent_pending_requests"].type == "gauge"
    assert fams["redtap_agent_rss_growth_bytes"].samples[0].value == 7 * 1024
    assert fams["redtap_agent_peak_rss_bytes"].samples[0].value == 9 * 1024
    assert fams["redtap_k8s_pods"].samples[0].value == 5 and "redtap_k8s_bad" not in fams
    losses = {s.labels["counter"]: s.value for s in fams["redtap_kernel_losses"].samples}
    assert losses == {n: abi.STATS.index(n) for n in abi.LOSS_STATS} | {"lru_evicted_pending": 3}


def test_endpoint_serves_over_http_and_a_taken_port_is_a_clear_error():
    agent = Agent(AgentConfig())  # not started: no tracer, only the HTTP side runs
    m = feed([rec("/users/5", 503)])
    m.start(agent)
    try:
        text = top.fetch(f"http://127.0.0.1:{m.port}/metrics")
        assert 'http_route="/users/{id}"' in text
        other = MetricsComponent(f"127.0.0.1:{m.port}")
        with pytest.raises(RedtapError, match=r"cannot listen: \[Errno 98\]"):
            other.start(agent)
    finally:
        m.stop()


@pytest.mark.parametrize("text,want", [("198.18.0.1:9400", ("198.18.0.1", 9400)),
                                       ("[::1]:9400", ("::1", 9400)),
                                       ("localhost:0", ("localhost", 0))])
def test_parse_addr(text, want):
    assert parse_addr(text) == want


@pytest.mark.parametrize("bad", ["9400", ":9400", "::1:9400", "host:port", "h:70000"])
def test_parse_addr_rejects_bad_input(bad):
    with pytest.raises(RedtapError, match="metrics-addr"):
        parse_addr(bad)


# -- the live view's arithmetic on scraped pages ------------------------------
def scrape(records, t):
    return top.parse(generate_latest(feed(records).registry).decode(), t)


def test_top_rows_rates_errors_and_routes_from_deltas():
    before = [rec("/users/1", 200, 1.0)] * 10
    after = before + [rec("/users/2", 200, 3.0)] * 20 + [rec("/", 500, 3.0)] * 5 \
        + [rec("/x", None)] * 5 + [rec("/q", 404, 3.0)] * 10
    (row,) = top.rows(scrape(after, 12.0), scrape(before, 2.0))
    assert row.server == "198.18.0.10:80" and row.total == 50
    assert row.rate == pytest.approx(4.0)                     # 40 requests in 10 s
    assert row.red.error_pct() == pytest.approx(25.0)         # (5 + 5) / 40
    assert row.routes[0][0] == "/users/{id}" and row.routes[0][1] == pytest.approx(2.0)
    assert 0.0025 <= row.red.q(0.5) <= 0.005                  # all in the 2.5-5 ms bucket


def test_top_quantile_interpolates_like_histogram_quantile():
    b = [(0.001, 0.0), (0.002, 10.0), (math.inf, 10.0)]
    assert top.quantile(0.5, b) == pytest.approx(0.0015)
    assert top.quantile(0.99, [(0.001, 0.0), (math.inf, 4.0)]) == 0.001
    assert top.quantile(0.5, [(math.inf, 0.0)]) is None


def test_top_names_servers_by_kubernetes_service():
    s = scrape([rec("/a", service="web", namespace="shop")], 1.0)
    assert [r.server for r in top.rows(s, None)] == ["shop/web"]


def test_top_render_shows_servers_and_routes():
    s = scrape([rec("/users/1", 200, 1.0), rec("/users/2", 500, 2.0)], 1.0)
    text = top.render(top.rows(s, None), "title")
    assert "198.18.0.10:80" in text and "  /users/{id}" in text and "50.0" in text


def test_top_survives_an_unreachable_agent():
    view = top.LiveView("http://127.0.0.1:1/metrics")
    assert "cannot scrape" in view.frame()


def test_dashboard_queries_use_only_exposed_metric_names():
    import json
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "deploy", "grafana", "redtap-dashboard.json")) as f:
        dash = json.load(f)
    m = feed([dict(r) for r in MIXED])
    m.collector.snapshot = {"kernel": {n: 0 for n in abi.STATS}, "agent": {"events": 1,
                            "bad_events": 0, "idle_unanswered": 0, "pending_requests": 0}}
    exposed = {s.name for f in parse_text(generate_latest(m.registry).decode()) for s in f.samples}
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15 and len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    used = {n for e in exprs for n in re.findall(r"\b((?:http|redtap|process)_[a-z_]+)(?=[{[])", e)}
    assert used and used <= exposed, used - exposed


def test_idle_series_expire_and_busy_ones_stay():
    from pyloader.output.metrics import GEN_S, SERIES_TTL_S
    m = feed([rec("/gone", 200), rec("/gone", None), rec("/busy", 200)])
    for _ in range(int(SERIES_TTL_S // GEN_S) + 1):  # idle at least the TTL
        m.agg.next_generation()
        m.observe(dict(rec("/busy", 200), **{"http.route": "/busy"}))
        m.flush()
    routes = {dict(l)["http_route"] for (n, l) in samples(m, DURATION)}
    assert routes == {"/busy"} and samples(m, UNANSWERED) == {}
    assert m.agg.expired == 2 and series(m, http_route="/busy")[1] == 2 + SERIES_TTL_S // GEN_S


def test_series_idle_less_than_the_ttl_stay():
    from pyloader.output.metrics import GEN_S, SERIES_TTL_S
    m = feed([rec("/quiet", 200)])
    for _ in range(int(SERIES_TTL_S // GEN_S)):  # updated late in generation 0: not idle enough
        m.agg.next_generation()
    assert series(m, http_route="/quiet")[1] == 1 and m.agg.expired == 0

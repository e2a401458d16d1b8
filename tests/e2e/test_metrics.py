"""End to end: the agent's /metrics scraped over HTTP inside the node namespace
while real clients talk to real servers; counts, sums and buckets must equal
what the clients did and what the access log says. And `redtap top` in a
real terminal (tmux), read from the screen."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from decimal import Decimal

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

from pyloader.kernel import abi
from pyloader.lab.netnode import NODE_IP

from support.agentproc import AgentProc, client_lines

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NGINX, PY = 0, 1
URL = f"http://{NODE_IP}:9400/metrics"
DURATION = "http_server_request_duration_seconds"
UNANSWERED = "redtap_http_server_unanswered_requests"


@pytest.fixture(scope="module")
def agent(node):
    a = AgentProc(node, "--endpoint", f"{node.pods[NGINX].ip}:80",
                  "--endpoint", f"{node.pods[PY].ip}:8080",
                  "--metrics-addr", f"{NODE_IP}:9400", "--route", "/py/items/{item}",
                  "--stats-interval", "0.5", "--idle-timeout", "3", name="metrics").wait_started()
    yield a
    assert a.stop() == 0, a.stderr()



def scrape(node, *curl_args: str) -> str:
    cp = node.ns_exec(node.node_ns, "curl", "-sS", "--noproxy", "*", "-m", "10", "--fail",
                      *curl_args, URL)
    return cp.stdout


class Page:
    """One scrape: the duration histogram and the unanswered counter by labels."""

    def __init__(self, text: str):
        self.fams = {f.name: f for f in parse_text(text)}
        self.hist: dict[tuple, dict] = {}
        for s in self.fams[DURATION].samples:
            labels = {k: v for k, v in s.labels.items() if k != "le"}
            key = tuple(sorted(labels.items()))
            h = self.hist.setdefault(key, {"buckets": {}, "count": 0.0, "sum": 0.0})
            if s.name.endswith("_bucket"):
                h["buckets"][s.labels["le"]] = s.value
            elif s.name.endswith("_count"):
                h["count"] = s.value
            else:
                h["sum"] = s.value
        self.unanswered = {tuple(sorted(s.labels.items())): s.value
                           for s in self.fams[UNANSWERED].samples}

    def series(self, **want) -> dict:
        """Sum of the duration series whose labels include `want`."""
        out = {"buckets": {}, "count": 0.0, "sum": 0.0}
        for key, h in self.hist.items():
            d = dict(key)
            if all(d.get(k) == str(v) for k, v in want.items()):
                out["count"] += h["count"]
                out["sum"] += h["sum"]
                for le, v in h["buckets"].items():
                    out["buckets"][le] = out["buckets"].get(le, 0.0) + v
        return out

    def no_response(self, **want) -> float:
        return sum(v for key, v in self.unanswered.items()
                   if all(dict(key).get(k) == str(val) for k, val in want.items()))

    def value(self, family: str) -> float:
        return self.fams[family].samples[0].value


def wait_page(node, ok, timeout: float = 15.0) -> Page:
    """Scrape until ok(page) (the fold runs once per agent loop iteration)."""
    end = time.monotonic() + timeout
    while True:
        page = Page(scrape(node))
        if ok(page) or time.monotonic() > end:
            return page
        time.sleep(0.2)


def delta(after: dict, before: dict) -> dict:
    return {"count": after["count"] - before["count"], "sum": after["sum"] - before["sum"],
            "buckets": {le: v - before["buckets"].get(le, 0.0) for le, v in after["buckets"].items()}}


def placement(durations_ms: list[float]) -> dict:
    """Cumulative bucket counts the logged durations call for (exact decimal arithmetic)."""
    les = ["0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05",
           "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0"]
    out = {le: float(sum(1 for d in durations_ms if Decimal(str(d)) <= Decimal(le) * 1000))
           for le in les}
    out["+Inf"] = float(len(durations_ms))
    return out


def test_counts_sums_and_buckets_equal_what_the_clients_did(node, fresh):
    nginx = node.pods[NGINX].ip
    srv = {"server_address": nginx, "server_port": "80", "http_request_method": "GET"}
    before = Page(scrape(node))
    sent = client_lines(node.traffic(node.pods[2].ns, "keepalive", nginx, "80", "300", "/status/{i}"))
    urls = [f"http://{nginx}/error"] * 3 + [f"http://{nginx}/missing"] * 2
    args = [a for u in urls for a in ("-o", "/dev/null", u)]
    codes = node.curl(node.pods[3].ns, "-w", "%{http_code}\\n", *args).stdout.split()
    assert [s["status"] for s in sent] == [200] * 300 and codes == ["500"] * 3 + ["404"] * 2
    recs = fresh.new_records(305)
    assert len(recs) == 305
    after = wait_page(node, lambda p: delta(p.series(**srv), before.series(**srv))["count"] >= 305)
    groups = {("/status/{id}", 200): 300, ("/error", 500): 3, ("/missing", 404): 2}
    for (route, status), n in groups.items():
        logged = [r["duration_ms"] for r in recs
                  if r["http.route"] == route and r["http.response.status_code"] == status]
        d = delta(after.series(http_route=route, http_response_status_code=status, **srv),
                  before.series(http_route=route, http_response_status_code=status, **srv))
        assert d["count"] == n == len(logged), route
        assert d["sum"] == pytest.approx(sum(logged) / 1000, abs=1e-9), route
        assert d["buckets"] == placement(logged), route
    assert delta(after.series(**srv), before.series(**srv))["count"] == 305


def test_buckets_of_spread_durations_match_the_logged_durations(node, fresh):
    py = node.pods[PY].ip
    want = {"server_address": py, "server_port": "8080", "http_route": "/py/slow",
            "http_request_method": "GET", "http_response_status_code": "200"}
    before = Page(scrape(node)).series(**want)
    # the server sleeps i ms for request i: durations from ~0.2 ms to ~80 ms
    sent = client_lines(node.traffic(node.pods[2].ns, "keepalive", py, "8080", "80",
                                     "/py/slow?ms={i}"))
    assert [s["status"] for s in sent] == [200] * 80
    recs = fresh.new_records(80)
    logged = [r["duration_ms"] for r in recs]
    assert len(logged) == 80 and {r["http.route"] for r in recs} == {"/py/slow"}
    page = wait_page(node, lambda p: p.series(**want)["count"] - before["count"] >= 80)
    d = delta(page.series(**want), before)
    assert d["count"] == 80
    assert d["sum"] == pytest.approx(sum(logged) / 1000, abs=1e-9)
    assert d["buckets"] == placement(logged)
    assert len({v for v in d["buckets"].values()}) >= 6  # spread over many buckets


def test_records_keep_the_raw_path_and_gain_the_route(node, fresh):
    node.traffic(node.pods[2].ns, "keepalive", node.pods[NGINX].ip, "80", "3", "/status/9f1c2ab7e{i}")
    recs = fresh.new_records(3)
    assert [r["url.path"] for r in recs] == [f"/status/9f1c2ab7e{i}" for i in range(3)]
    assert {r["http.route"] for r in recs} == {"/status/{id}"}


def test_user_route_pattern_labels_the_series(node, fresh):
    py = node.pods[PY].ip
    want = {"http_route": "/py/items/{item}", "http_request_method": "POST",
            "http_response_status_code": "201", "server_address": py, "server_port": "8080"}
    before = Page(scrape(node)).series(**want)["count"]
    sent = client_lines(node.traffic(node.pods[2].ns, "post", py, "8080", "/py/items/blue-shirt", "1000"))
    assert [s["status"] for s in sent] == [201]
    (r,) = fresh.new_records(1)
    assert r["url.path"] == "/py/items/blue-shirt" and r["http.route"] == "/py/items/{item}"
    page = wait_page(node, lambda p: p.series(**want)["count"] > before)
    assert page.series(**want)["count"] == before + 1


def test_unanswered_request_is_counted_not_timed(node, fresh):
    py = node.pods[PY].ip
    want = {"http_route": "/py/slow", "http_request_method": "GET", "server_address": py,
            "server_port": "8080"}
    before = Page(scrape(node))
    node.traffic(node.pods[3].ns, "reset", py, "8080", "/py/slow?ms=300")
    (r,) = fresh.new_records(1)
    assert r["error.type"] == "no_response" and r["http.route"] == "/py/slow"
    after = wait_page(node, lambda p: p.no_response(**want) > before.no_response(**want))
    assert after.no_response(**want) == before.no_response(**want) + 1
    assert after.series(**want)["count"] == before.series(**want)["count"]


def test_kernel_and_agent_counters_match_the_stats_lines(node, agent):
    names = list(abi.STATS) + ["lru_evicted_pending"]
    page = Page(scrape(node))
    for n in names:
        assert page.fams[f"redtap_kernel_{n}"].type == "counter", n
    assert page.fams["process_cpu_seconds"].type == "counter"
    # traffic is quiet now: the scrape and a later stats line read the same values
    end = time.monotonic() + 20
    while True:
        time.sleep(1.2)  # kernel counters are published once a second
        page = Page(scrape(node))
        stats = agent.counters()
        got = {n: page.value(f"redtap_kernel_{n}") for n in abi.STATS}
        events = page.value("redtap_agent_events")
        if (got == {n: float(stats["kernel"][n]) for n in abi.STATS}
                and events == stats["agent"]["events"]) or time.monotonic() > end:
            break
    assert got == {n: float(stats["kernel"][n]) for n in abi.STATS}
    assert events == stats["agent"]["events"] > 0


def test_served_exposition_passes_promtool_and_both_parsers(node, agent):
    text = scrape(node)
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing (package prometheus): run scripts/install-deps.sh")
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert {f.name for f in parse_text(text)} >= {DURATION, UNANSWERED, "redtap_kernel_requests"}
    om = scrape(node, "-H", "Accept: application/openmetrics-text; version=1.0.0")
    assert om.rstrip().endswith("# EOF")
    fams = {f.name: f for f in parse_om(om)}  # strict: bucket order, +Inf == count, ...
    assert fams[DURATION].type == "histogram"


# -- the live view in a real terminal -------------------------------------------
class Tmux:
    def __init__(self, tag: str):
        if shutil.which("tmux") is None:
            pytest.fail("tmux is missing: run scripts/install-deps.sh")
        self.sock = f"redtap-{tag}"
        self.env = {**os.environ, "TERM": os.environ.get("TERM") or "xterm-256color"}

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.sock, *args], env=self.env, check=True,
                              capture_output=True, text=True, timeout=30).stdout

    def screen(self) -> list[str]:
        return self.run("capture-pane", "-p", "-t", "top").splitlines()

    def wait_screen(self, ok, timeout: float = 30.0) -> list[str]:
        end = time.monotonic() + timeout
        while True:
            lines = self.screen()
            if ok(lines) or time.monotonic() > end:
                return lines
            time.sleep(0.3)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], env=self.env,
                       capture_output=True, timeout=30)


def row(lines: list[str], name: str) -> list[str] | None:
    """The whitespace-split cells of the screen row starting with `name`."""
    for line in lines:
        cells = line.split()
        if cells and cells[0] == name:
            return cells
    return None


def test_top_shows_live_red_per_server_in_a_terminal(node, agent):
    nginx = node.pods[NGINX].ip
    tmux = Tmux(node.tag)
    cmd = (f"ip netns exec {node.node_ns} {sys.executable} -m pyloader top "
           f"--metrics-url {URL} --window 60 --routes 10; echo TOP-EXIT=$?; sleep 120")
    tmux.run("new-session", "-d", "-s", "top", "-x", "132", "-y", "50", cmd)
    try:
        tmux.wait_screen(lambda l: row(l, "SERVER") is not None)
        node.traffic(node.pods[2].ns, "keepalive", nginx, "80", "200", "/orders/{i}")
        urls = [a for _ in range(4) for a in ("-o", "/dev/null", f"http://{nginx}/error")]
        node.curl(node.pods[3].ns, *urls)
        srv = {"server_address": nginx, "server_port": "80"}

        def settled(lines):
            r = row(lines, f"{nginx}:80")
            page = Page(scrape(node))
            total = page.series(**srv)["count"] + page.no_response(**srv)
            return (r is not None and r[1] == str(int(total))
                    and row(lines, "/orders/{id}") and row(lines, "/error"))

        lines = tmux.wait_screen(settled)
        assert settled(lines), "\n".join(lines)
        orders, error = row(lines, "/orders/{id}"), row(lines, "/error")
        # route rows: name, req/s, err%, 4xx%, no-resp, p50, p95, p99
        assert float(orders[1]) > 0 and orders[2] == "0.0" and orders[4] == "0"
        assert all(re.fullmatch(r"\d+\.\d+", c) for c in orders[5:8]), orders
        assert error[2] == "100.0"
        stamp = lines[0].split()[2]
        again = tmux.wait_screen(lambda l: l and l[0].split()[2] != stamp, timeout=10)
        assert again[0].split()[2] != stamp, "the screen did not refresh"
        tmux.run("send-keys", "-t", "top", "C-c")
        done = tmux.wait_screen(lambda l: any("TOP-EXIT=" in x for x in l), timeout=15)
        assert any("TOP-EXIT=0" in x for x in done), "\n".join(done)
    finally:
        tmux.kill()


# -- the documented PromQL, evaluated by a real Prometheus ------------------------
def readme_queries() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```promql\n(.*?)```", f.read(), re.S)
    out = []
    for block in blocks:
        for chunk in re.split(r"\n\s*\n", block):
            q = "\n".join(l for l in chunk.splitlines() if not l.lstrip().startswith("#")).strip()
            if q:
                out.append(q)
    return out


def dashboard_queries() -> list[str]:
    with open(os.path.join(ROOT, "deploy", "grafana", "redtap-dashboard.json")) as f:
        dash = json.load(f)
    subst = {"$__rate_interval": "1m", "$namespace": ".*", "$service": ".*", "$route": ".*",
             "$job": ".*"}
    out = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            q = t["expr"]
            for k, v in subst.items():
                q = q.replace(k, v)
            assert "$" not in q, q
            out.append(q)
    return out


class Prometheus:
    """A real Prometheus in the node namespace scraping the agent every second."""

    def __init__(self, node):
        if shutil.which("prometheus") is None:
            pytest.fail("prometheus is missing: run scripts/install-deps.sh")
        self.node = node
        d = os.path.join(node.dir, "prometheus")
        os.makedirs(d, exist_ok=True)
        cfg = os.path.join(d, "prometheus.yml")
        with open(cfg, "w") as f:
            f.write("global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                    "scrape_configs:\n  - job_name: redtap\n"
                    f"    static_configs: [{{targets: ['{NODE_IP}:9400']}}]\n")
        self.err = open(os.path.join(d, "stderr"), "w")
        self.proc = node.spawn(node.node_ns, "prometheus", f"--config.file={cfg}",
                               f"--storage.tsdb.path={d}/data", "--web.listen-address=127.0.0.1:9090",
                               stderr=self.err)

    def query(self, q: str) -> dict:
        cp = self.node.ns_exec(self.node.node_ns, "curl", "-sS", "--noproxy", "*", "-m", "10", "-G",
                               "--data-urlencode", f"query={q}", "http://127.0.0.1:9090/api/v1/query",
                               check=False)
        try:
            return json.loads(cp.stdout)
        except ValueError:
            return {"status": "unreachable", "error": cp.stderr}

    def wait(self, q: str, ok, timeout: float = 40.0) -> dict:
        end = time.monotonic() + timeout
        while True:
            r = self.query(q)
            if (r.get("status") == "success" and ok(r["data"]["result"])) or time.monotonic() > end:
                return r
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.err.close()


def values(result: list) -> dict:
    return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in result}


def test_readme_and_dashboard_promql_evaluate_on_prometheus(node, agent):
    nginx, py = node.pods[NGINX].ip, node.pods[PY].ip
    prom = Prometheus(node)
    try:
        up = prom.wait('up{job="redtap"}', lambda res: any(r["value"][1] == "1" for r in res))
        assert values(up["data"]["result"]), up
        for _ in range(3):  # traffic over a few scrapes: non-zero rates, 4xx, 5xx, no response
            node.traffic(node.pods[2].ns, "keepalive", nginx, "80", "50", "/status/{i}")
            node.curl(node.pods[3].ns, "-o", "/dev/null", f"http://{nginx}/error",
                      "-o", "/dev/null", f"http://{nginx}/missing")
            node.traffic(node.pods[3].ns, "reset", py, "8080", "/py/slow?ms=300")
            time.sleep(1.5)
        readme = readme_queries()
        assert len(readme) >= 4
        r_q, e_q, d_q = readme[:3]
        srv = (("server_address", nginx), ("server_port", "80"))
        rate = values(prom.wait(r_q, lambda res: values(res).get(srv, 0) > 0)["data"]["result"])
        assert rate.get(srv, 0) > 0, rate
        errors = values(prom.wait(e_q, lambda res: srv in values(res))["data"]["result"])
        assert 0 < errors[srv] < 100, errors
        py_srv = (("server_address", py), ("server_port", "8080"))
        # only resets reached the python server meanwhile: all of its requests are errors
        assert errors.get(py_srv) == pytest.approx(100.0), errors
        p99 = values(prom.wait(d_q, lambda res: srv in values(res))["data"]["result"])
        assert 0 < p99[srv] <= 10, p99
        for q in readme[3:] + dashboard_queries():
            r = prom.query(q)
            assert r.get("status") == "success", (q, r)
            if 'k8s_service_name!=""' not in q:  # no Kubernetes names in this run
                assert r["data"]["result"], q
    finally:
        prom.stop()

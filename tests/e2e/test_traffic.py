"""End to end: real servers and clients in namespaces, the agent on the veths.
Every test compares the log with what the client actually sent and got."""
from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest

from pyloader.kernel import abi

from support.agentproc import AgentProc, client_lines

NGINX, PY = 0, 1


@pytest.fixture(scope="module")
def agent(node):
    a = AgentProc(node, "--endpoint", f"{node.pods[NGINX].ip}:80",
                  "--endpoint", f"[{node.pods[NGINX].ip6}]:80",
                  "--endpoint", f"{node.pods[PY].ip}:8080",
                  "--stats-interval", "0.5", "--idle-timeout", "3").wait_started()
    yield a
    assert a.stop() == 0, a.stderr()



def summary(recs):
    return [(r["http.request.method"], r["url.path"], r.get("http.response.status_code"))
            for r in recs]


def curl_codes(node, ns, urls, *extra):
    args = []
    for u in urls:
        args += ["-o", "/dev/null", u]
    cp = node.curl(ns, "-w", "%{http_code}\\n", *extra, *args)
    return [int(x) for x in cp.stdout.split()]


def test_pod_to_pod_same_node(node, fresh):
    ip = node.pods[NGINX].ip
    urls = [f"http://{ip}/", f"http://{ip}/error", f"http://{ip}/missing"]
    codes = curl_codes(node, node.pods[2].ns, urls)
    assert codes == [200, 500, 404]
    recs = fresh.new_records(3)
    assert summary(recs) == [("GET", "/", 200), ("GET", "/error", 500), ("GET", "/missing", 404)]
    r = recs[0]
    assert r["client.address"] == node.pods[2].ip and r["server.address"] == ip
    assert r["server.port"] == 80 and r["network.protocol.version"] == "1.1"
    assert 0 < r["duration_ms"] < 1000 and r["time"].endswith("Z")
    # curl reused one connection for the three
    assert len({x["client.port"] for x in recs}) == 1


def test_host_to_pod(node, fresh):
    codes = curl_codes(node, node.node_ns, [f"http://{node.pods[PY].ip}:8080/py/host"])
    assert codes == [200]
    (r,) = fresh.new_records(1)
    assert summary([r]) == [("GET", "/py/host", 200)]
    assert r["client.address"] == "198.18.0.1"


def test_other_node_to_pod(node, fresh):
    codes = curl_codes(node, node.ext_ns, [f"http://{node.pods[NGINX].ip}/status/ext"])
    assert codes == [200]
    (r,) = fresh.new_records(1)
    assert r["client.address"] == "198.18.1.2" and r["url.path"] == "/status/ext"


def test_keepalive_1000_sequential_requests(node, fresh):
    cp = node.traffic(node.pods[2].ns, "keepalive", node.pods[NGINX].ip, "80", "1000", "/status/{i}")
    sent = client_lines(cp)
    assert len(sent) == 1000 and all(s["status"] == 200 for s in sent)
    recs = fresh.new_records(1000, timeout=20)
    assert summary(recs) == [(s["method"], s["path"], s["status"]) for s in sent]
    assert len({r["client.port"] for r in recs}) == 1


def test_sixteen_pipelined_requests(node, fresh):
    cp = node.traffic(node.pods[3].ns, "pipeline", node.pods[NGINX].ip, "80", "16", "/status/p{i}")
    sent = client_lines(cp)
    recs = fresh.new_records(16)
    assert summary(recs) == [(s["method"], s["path"], s["status"]) for s in sent]
    assert [r["url.path"] for r in recs] == [f"/status/p{i}" for i in range(16)]


def test_head_and_404_and_500(node, fresh):
    ip = node.pods[NGINX].ip
    head = node.curl(node.pods[2].ns, "-I", "-o", "/dev/null", "-w", "%{http_code}", f"http://{ip}/")
    assert head.stdout == "200"
    codes = curl_codes(node, node.pods[2].ns, [f"http://{ip}/nothing-here", f"http://{ip}/error"])
    assert codes == [404, 500]
    recs = fresh.new_records(3)
    assert summary(recs) == [("HEAD", "/", 200), ("GET", "/nothing-here", 404), ("GET", "/error", 500)]


def test_post_with_100kb_body(node, fresh):
    cp = node.traffic(node.pods[2].ns, "post", node.pods[PY].ip, "8080", "/py/upload", "100000")
    assert client_lines(cp) == [{"method": "POST", "path": "/py/upload", "status": 201}]
    cp = node.traffic(node.pods[2].ns, "post", node.pods[NGINX].ip, "80", "/upload", "100000")
    assert client_lines(cp)[0]["status"] == 201
    recs = fresh.new_records(2)
    assert summary(recs) == [("POST", "/py/upload", 201), ("POST", "/upload", 201)]


def test_post_body_with_fake_request_lines_is_not_a_request(node, fresh):
    body = ("GET /fake HTTP/1.1\r\n\r\n" * 2000).encode()
    ip = node.pods[PY].ip
    code = node.ns_exec(node.pods[3].ns, "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                        "--data-binary", "@-", f"http://{ip}:8080/py/fake",
                        input=body.decode(), check=False).stdout
    assert code == "201"
    recs = fresh.new_records(1)
    assert summary(recs) == [("POST", "/py/fake", 201)]


def test_2000_byte_url_is_truncated_and_flagged(node, fresh):
    path = "/" + "u" * 1999
    codes = curl_codes(node, node.pods[2].ns, [f"http://{node.pods[NGINX].ip}{path}"])
    assert codes == [404]
    (r,) = fresh.new_records(1)
    assert r["url.path"] == path[:abi.MAX_URL_LEN] and r["url.truncated"] is True
    assert r["http.response.status_code"] == 404


def test_query_is_split_from_path(node, fresh):
    codes = curl_codes(node, node.pods[2].ns, [f"http://{node.pods[NGINX].ip}/status/q?a=1&b=two"])
    assert codes == [200]
    (r,) = fresh.new_records(1)
    assert r["url.path"] == "/status/q" and r["url.query"] == "a=1&b=two"
    assert "url.truncated" not in r


def test_ipv6(node, fresh):
    codes = curl_codes(node, node.pods[2].ns, [f"http://[{node.pods[NGINX].ip6}]/status/six"])
    assert codes == [200]
    (r,) = fresh.new_records(1)
    assert r["client.address"] == node.pods[2].ip6 and r["server.address"] == node.pods[NGINX].ip6
    assert r["url.path"] == "/status/six"


def test_client_reset_before_the_answer(node, fresh):
    cp = node.traffic(node.pods[2].ns, "reset", node.pods[PY].ip, "8080", "/py/slow?ms=300")
    assert client_lines(cp) == [{"method": "GET", "path": "/py/slow?ms=300", "status": None}]
    (r,) = fresh.new_records(1)
    assert r["url.path"] == "/py/slow" and r["error.type"] == "no_response"
    assert "http.response.status_code" not in r


def test_unlisted_endpoint_is_not_logged(node, fresh):
    # pod1's nginx-less port 80 is closed; its 8080 is listed, pod2 is not a server
    node.start_pyserver(node.pods[3], port=8081)
    codes = curl_codes(node, node.pods[2].ns, [f"http://{node.pods[3].ip}:8081/py/unlisted"])
    assert codes == [200]
    assert fresh.new_records(1, timeout=1.5) == []


def test_clean_scenarios_count_no_loss(node, agent):
    """After the scenarios above: every kernel loss counter reads zero."""
    time.sleep(1.2)  # one more stats line
    k = agent.counters()["kernel"]
    losses = {name: k[name] for name in abi.LOSS_STATS if k[name]}
    assert losses == {}, losses
    assert k["lru_evicted_pending"] == 0
    recs = agent.records()
    assert k["events"] == len(recs) - agent_idle(agent)
    assert Counter(r["server.port"] for r in recs)[80] > 1000


def agent_idle(agent) -> int:
    return agent.counters()["agent"]["idle_unanswered"]


def test_tshark_second_opinion(node, fresh, tmp_path):
    """tshark's HTTP dissector, capturing on the server pod's veth, sees the
    same requests (method, URI, status) as redtap, in the same order."""
    pcap = str(tmp_path / "cap.pcap")
    cap = node.spawn(node.node_ns, "tshark", "-q", "-i", node.pods[NGINX].veth, "-f",
                     "tcp port 80", "-w", pcap, stderr=open(tmp_path / "tshark.err", "w"))
    try:
        deadline = time.monotonic() + 15
        while "Capturing on" not in (tmp_path / "tshark.err").read_text():
            assert time.monotonic() < deadline and cap.poll() is None, "tshark did not start"
            time.sleep(0.1)
        ip = node.pods[NGINX].ip
        node.traffic(node.pods[2].ns, "pipeline", ip, "80", "8", "/status/t{i}")
        curl_codes(node, node.pods[3].ns, [f"http://{ip}/", f"http://{ip}/error", f"http://{ip}/x?y=1"])
        recs = fresh.new_records(11)
        time.sleep(0.5)
    finally:
        os.killpg(cap.pid, signal.SIGINT)
        cap.wait(timeout=10)
    out = node.ns_exec(node.node_ns, "tshark", "-r", pcap, "-Y", "http", "-T", "fields",
                       "-e", "tcp.srcport", "-e", "tcp.dstport", "-e", "http.request.method",
                       "-e", "http.request.uri", "-e", "http.response.code").stdout
    reqs, resps = {}, {}  # by the client's port, in capture order
    for line in out.splitlines():
        sport, dport, method, uri, code = (line.split("\t") + [""] * 5)[:5]
        for m, u in zip(method.split(","), uri.split(",")):
            if m:
                reqs.setdefault(int(sport), []).append((m, u))
        for c in code.split(","):
            if c:
                resps.setdefault(int(dport), []).append(int(c))
    truth = {port: [(m, u, c) for (m, u), c in zip(rs, resps.get(port, []))]
             for port, rs in reqs.items()}
    mine = {}
    for r in recs:
        uri = r["url.path"] + ("?" + r["url.query"] if "url.query" in r else "")
        mine.setdefault(r["client.port"], []).append(
            (r["http.request.method"], uri, r["http.response.status_code"]))
    assert sum(map(len, truth.values())) == 11 and mine == truth

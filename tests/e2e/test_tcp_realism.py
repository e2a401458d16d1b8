"""Real TCP against the tracer: loss and retransmissions, a small MTU with
big heads, chunked bodies, 100-continue uploads, a long download beside
other traffic. Each scenario is captured with tshark on the server's veth
and redtap's records are compared with tshark's HTTP dissector: the same
requests, paired the same, timed within 100 µs (p99: two clocks, the hook's
and the capture's, compared live). The agent runs for the whole module: each
test takes the kernel counters it caused as a difference (kernel_since)."""
from __future__ import annotations

import sys
import time
from datetime import datetime, timedelta

import pytest

from pyloader.kernel import abi

from support.agentproc import AgentProc, client_lines
from support.tshark_view import Capture, compare, p99, truth  # noqa: E402

NGINX, PY = 0, 1
SLACK_MS = 0.1


@pytest.fixture(scope="module")
def agent(node):
    a = AgentProc(node, "--endpoint", f"{node.pods[NGINX].ip}:80",
                  "--endpoint", f"{node.pods[PY].ip}:8080", "--stats-interval", "0.5",
                  name="tcp-agent").wait_started()
    yield a
    assert a.stop() == 0, a.stderr()



def check_against_tshark(cap: Capture, records: list[dict], name: str) -> dict:
    cap.save(name)
    res = compare(records, truth(cap.path))
    assert not res["problems"], res["problems"][:5]
    assert res["pairs"] == len([r for r in records if "http.response.status_code" in r])
    assert p99(res["first_ms"]) <= SLACK_MS, res["first_ms"][-5:]
    assert p99(res["last_ms"]) <= SLACK_MS, res["last_ms"][-5:]
    return res


def loss_rules(node, pod, action: str) -> None:
    for chain, flag in (("OUTPUT", "--dport"), ("INPUT", "--sport")):
        node.ns_exec(pod.ns, "iptables", action, chain, "-p", "tcp", flag, "80", "-m",
                     "statistic", "--mode", "random", "--probability", "0.05", "-j", "DROP")


def fast_rto(node, pod) -> None:
    """Retransmit after 5 ms instead of 200: the lossy test stays short."""
    node.ns_exec(pod.ns, "ip", "route", "replace", "198.18.0.0/24", "dev", "eth0", "proto",
                 "kernel", "scope", "link", "src", pod.ip, "rto_min", "5ms")
    node.ns_exec(pod.ns, "ip", "route", "replace", "default", "via", "198.18.0.1", "rto_min", "5ms")


def test_5_percent_loss_both_ways_2000_keepalive_requests(node, fresh, tmp_path):
    client, server = node.pods[2], node.pods[NGINX]
    fast_rto(node, client)
    fast_rto(node, server)
    loss_rules(node, client, "-A")
    before = fresh.counters_now()
    try:
        with Capture(node, server.veth, str(tmp_path / "loss.pcap"), "tcp port 80") as cap:
            cp = node.traffic(client.ns, "keepalive", server.ip, "80", "2000", "/status/l{i}",
                              timeout=300)
            recs = fresh.new_records(2000, timeout=60)
    finally:
        loss_rules(node, client, "-D")
    sent = client_lines(cp)
    assert len(sent) == 2000
    assert [(r["url.path"], r["http.response.status_code"]) for r in recs] == \
        [(s["path"], s["status"]) for s in sent]
    res = check_against_tshark(cap, recs, "loss-5pct-keepalive")
    k = fresh.kernel_since(before)
    assert k.get("retransmits", 0) > 0, f"no loss happened: the test proved nothing: {k}"
    assert k["events"] == 2000 and k["requests"] == 2000, k
    print(f"loss: {k['retransmits']} retransmitted segments ignored, "
          f"{res['pairs']} pairs agree with tshark")


def test_mtu_576_with_4kb_headers(node, fresh, tmp_path):
    client, server = node.pods[3], node.pods[PY]
    for ns, dev in ((client.ns, "eth0"), (node.node_ns, client.veth)):
        node.ns_exec(ns, "ip", "link", "set", dev, "mtu", "576")
    try:
        big = "X-Big: " + "b" * 4000
        long_path = "/py/" + "l" * 1500
        with Capture(node, server.veth, str(tmp_path / "mtu.pcap"), "tcp port 8080") as cap:
            cp = node.curl(client.ns, "-H", big, "-o", "/dev/null", "-w", "%{http_code}\\n",
                           f"http://{server.ip}:8080/py/a", "-o", "/dev/null",
                           f"http://{server.ip}:8080{long_path}", "-o", "/dev/null",
                           f"http://{server.ip}:8080/py/c")
            recs = fresh.new_records(3)
    finally:
        for ns, dev in ((client.ns, "eth0"), (node.node_ns, client.veth)):
            node.ns_exec(ns, "ip", "link", "set", dev, "mtu", "1500")
    assert cp.stdout.split() == ["200", "200", "200"]
    assert [r["url.path"] for r in recs] == ["/py/a", long_path[:256], "/py/c"]
    assert recs[1]["url.truncated"] is True and "url.truncated" not in recs[2]
    check_against_tshark(cap, recs, "mtu576-4k-headers")


def test_chunked_responses_from_a_real_server(node, fresh, tmp_path):
    client, server = node.pods[2], node.pods[PY]
    before = fresh.counters_now()
    with Capture(node, server.veth, str(tmp_path / "chunked.pcap"), "tcp port 8080") as cap:
        cp = node.traffic(client.ns, "keepalive", server.ip, "8080", "5",
                          "/py/chunked?n=20&size=700&i={i}")
        recs = fresh.new_records(5)
    assert [s["status"] for s in client_lines(cp)] == [200] * 5
    assert [r["http.response.body.size"] for r in recs] == [14000] * 5
    assert all(r["response.duration_ms"] >= 100 > r["duration_ms"] for r in recs)
    k = fresh.kernel_since(before)
    assert (k.get("chunked_bodies"), k.get("events")) == (5, 5), k
    assert not set(k) & set(abi.LOSS_STATS), k
    check_against_tshark(cap, recs, "chunked")


def test_expect_100_continue_upload(node, fresh, tmp_path):
    client, pod = node.pods[3], node.pods[PY]
    body = str(tmp_path / "body.bin")
    with open(body, "wb") as f:
        f.write(b"u" * 200_000)
    before = fresh.counters_now()
    with Capture(node, pod.veth, str(tmp_path / "expect.pcap"), "tcp port 8080") as cap:
        cp = node.curl(client.ns, "-H", "Expect: 100-continue", "--data-binary", "@" + body,
                       "-o", "/dev/null", "-w", "%{http_code}", f"http://{pod.ip}:8080/py/up")
        (rec,) = fresh.new_records(1)
    assert cp.stdout == "201"
    assert (rec["http.request.method"], rec["http.response.status_code"]) == ("POST", 201)
    assert rec["http.request.body.size"] == 200_000
    k = fresh.kernel_since(before)
    assert (k.get("interim_responses"), k.get("responses"), k.get("events")) == (1, 1, 1), k
    assert not set(k) & set(abi.LOSS_STATS), k
    check_against_tshark(cap, [rec], "expect-100-continue")


def test_early_final_answer_to_expect_100_continue(node, fresh, tmp_path):
    """nginx answers `return 201` without asking for the body: curl then
    never sends it. One record, and no request body size is claimed."""
    client, pod = node.pods[3], node.pods[NGINX]
    body = str(tmp_path / "body.bin")
    with open(body, "wb") as f:
        f.write(b"u" * 200_000)
    with Capture(node, pod.veth, str(tmp_path / "early.pcap"), "tcp port 80") as cap:
        cp = node.curl(client.ns, "-H", "Expect: 100-continue", "--data-binary", "@" + body,
                       "-o", "/dev/null", "-w", "%{http_code}", f"http://{pod.ip}/upload")
        (rec,) = fresh.new_records(1)
    assert cp.stdout == "201"
    assert (rec["http.request.method"], rec["http.response.status_code"]) == ("POST", 201)
    assert "http.request.body.size" not in rec
    check_against_tshark(cap, [rec], "expect-early-answer")


def test_long_download_while_other_requests_go_by(node, fresh, tmp_path):
    server = node.pods[NGINX]
    with Capture(node, server.veth, str(tmp_path / "download.pcap"), "tcp port 80") as cap:
        dl = node.spawn(node.pods[3].ns, sys.executable, "-m", "pyloader.lab.trafficgen", "download",
                        server.ip, "80", "/files/1m.bin", "500")
        time.sleep(0.5)  # the download is under way (it takes about 2 s)
        cp = node.traffic(node.pods[2].ns, "keepalive", server.ip, "80", "30", "/status/d{i}")
        assert dl.wait(timeout=30) == 0
        recs = fresh.new_records(31)
    assert len(client_lines(cp)) == 30
    download = [r for r in recs if r["url.path"] == "/files/1m.bin"]
    others = [r for r in recs if r["url.path"] != "/files/1m.bin"]
    assert len(download) == 1 and len(others) == 30
    d = download[0]
    assert d["http.response.body.size"] == 1 << 20
    assert d["response.duration_ms"] > 1000 > d["duration_ms"]
    # the short requests went by while the download was running
    start = datetime.fromisoformat(d["time"].rstrip("Z"))
    end = start + timedelta(milliseconds=d["response.duration_ms"])
    during = [o for o in others if start < datetime.fromisoformat(o["time"].rstrip("Z")) < end]
    assert len(during) == 30
    check_against_tshark(cap, recs, "long-download")

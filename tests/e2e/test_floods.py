"""Floods on a real node, each bounded in count and time: the agent stays
within its memory bound, keeps logging other traffic (every request of a
control client is in the log) and counts whatever it could not record.

* 50,000 concurrent connections each with a pending request, against a
  server that never answers, with the connection table at 16,384: LRU
  eviction, every lost request counted.
* slowloris: 300 connections dripping request heads that never end.
* a SYN flood on a traced port (spoofed sources from 198.19.0.0/16, raw
  socket), then SYNs carrying requests: state only for those, bounded.
* one client pipelining 10,000 requests without reading.

The clients and the holding server are tests/support/floodgen.py.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import resource
import signal
import sys
import threading
import time

import pytest

from support import floodgen, netcounters
from support.agentproc import AgentProc
from pyloader.kernel import abi

FLOODGEN = floodgen.__file__
with open(os.path.join(os.path.dirname(__file__), "..", "..", "src", "bpf", "redtap.h")) as _h:
    MAX_STEPS_PER_SEG = int(re.search(r"#define MAX_STEPS_PER_SEG\s+(\d+)", _h.read()).group(1))
RSS_BOUND_KB = 256 * 1024  # the agent's max RSS under every flood (measured 55-110 MB)
HOLD_PORT = 9000


# -- helpers -----------------------------------------------------------------
class Tool:
    """A floodgen.py command running in a namespace, its JSON lines in a file."""

    def __init__(self, node, ns: str, *args: str, cpu: int | None = None):
        self.out = os.path.join(node.dir, f"floodgen-{args[0]}-{time.monotonic_ns()}.out")
        err = os.path.join(node.dir, f"floodgen-{args[0]}.stderr")
        pin = ("taskset", "-c", str(cpu)) if cpu is not None else ()
        with open(self.out, "w") as f, open(err, "a") as e:
            self.proc = node.spawn(ns, *pin, sys.executable, FLOODGEN, *args, stdout=f, stderr=e)

    def lines(self) -> list[dict]:
        with open(self.out) as f:
            return [json.loads(l) for l in f if l.strip()]

    def wait_for(self, key: str, timeout: float = 60.0) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for l in self.lines():
                if key in l:
                    return l
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"floodgen never said {key!r}: {self.lines()} rc={self.proc.poll()}")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


class Control:
    """A well-behaved client that keeps making requests on new and kept-alive
    connections while a flood runs; every one of them must be logged."""

    def __init__(self, node, ns: str, ip: str, port: int, tag: str):
        self.node, self.ns, self.ip, self.port, self.tag = node, ns, ip, port, tag
        self.sent: list[tuple[str, int]] = []
        self.stop_ev = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.errors: list[str] = []

    def once(self, n: int = 20) -> None:
        i = len(self.sent)
        cp = self.node.traffic(self.ns, "keepalive", self.ip, str(self.port), str(n),
                               f"/status/{self.tag}-{i}-{{i}}")
        self.sent += [(l["path"], l["status"]) for l in map(json.loads, cp.stdout.splitlines())]

    def _run(self) -> None:
        while not self.stop_ev.is_set():
            try:
                self.once()
            except Exception as e:  # the test fails on it below
                self.errors.append(repr(e))
                return
            time.sleep(0.2)

    def __enter__(self):
        self.once()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_ev.set()
        self.thread.join(timeout=120)
        self.once()

    def check(self, records: list[dict]) -> None:
        assert not self.errors, self.errors
        assert self.sent and all(s == 200 for _, s in self.sent), self.sent[:5]
        logged = [(r["url.path"], r.get("http.response.status_code")) for r in records
                  if r["url.path"].startswith(f"/status/{self.tag}-")]
        assert sorted(logged) == sorted(self.sent), \
            f"control: {len(self.sent)} sent, {len(logged)} logged"


def stats_lines(agent) -> list[dict]:
    return [l for l in agent.lines() if l.get("event") in ("redtap.stats", "redtap.exit")]


def wait_kernel(agent, pred, timeout: float = 60.0) -> dict:
    """The latest stats line whose counters satisfy @pred (waiting for one)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for l in stats_lines(agent)[::-1]:
            if pred(l):
                return l
        assert agent.proc.poll() is None, f"agent died: {agent.stderr()}"
        time.sleep(0.3)
    raise AssertionError(f"counters never got there: {stats_lines(agent)[-1:]}")


def wait_fresh(agent) -> dict:
    """The first stats line written after now (counters include all sent so far)."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return wait_kernel(agent, lambda l: l["time"] > now)


def check_memory(agent) -> int:
    lines = stats_lines(agent)
    rss = max(l["agent"]["max_rss_kb"] for l in lines)
    for l in lines:  # now <= peak; now - growth is the RSS at start, the same in every line
        a = l["agent"]
        assert 0 < a["rss_kb"] <= a["max_rss_kb"], a
    starts = {l["agent"]["rss_kb"] - l["agent"]["rss_growth_kb"] for l in lines}
    assert len(starts) == 1 and 0 < starts.pop() <= rss, [l["agent"] for l in lines]
    assert rss <= RSS_BOUND_KB, f"agent max RSS {rss} kB > {RSS_BOUND_KB} kB"
    return rss


def check_accounting(k: dict, agent_stats: dict) -> None:
    """Every request seen is queued, dropped or counted; every queued one is
    popped, still pending, evicted with its connection, or swept idle; every
    popped one is an event or a counted loss."""
    assert k["requests"] == k["pending_pushed"] + k["fifo_overflow"] + k["pending_map_full"], k
    assert k["pending_pushed"] == (k["pending_popped"] + agent_stats["pending_requests"] +
                                   k["lru_evicted_pending"] + agent_stats["idle_unanswered"]), k
    assert k["pending_popped"] == k["events"] + k["ringbuf_full"] + k["requests_evicted"], k


def start_agent(node, *args, name: str) -> AgentProc:
    pods = node.pods
    return AgentProc(node, "--endpoint", f"{pods[0].ip}:80", "--endpoint", f"{pods[3].ip}:{HOLD_PORT}",
                     "--endpoint", f"{pods[3].ip}:{BIG_PORT}", "--stats-interval", "1",
                     "--idle-timeout", "600", *args, name=name).wait_started()


@contextlib.contextmanager
def nginx_on_cpu(node, pod, port: int, cpu: int | None):
    """nginx of @pod:@port (master and workers) on one CPU meanwhile."""
    if cpu is None:
        yield
        return
    with open(os.path.join(node.dir, f"nginx-{pod.index}-{port}", "nginx.pid")) as f:
        master = int(f.read())
    with open(f"/proc/{master}/task/{master}/children") as f:
        pids = [master] + [int(x) for x in f.read().split()]
    for pid in pids:
        os.sched_setaffinity(pid, {cpu})
    try:
        yield
    finally:
        for pid in pids:
            os.sched_setaffinity(pid, range(os.cpu_count()))


def client_ip(node, i: int) -> str:
    """Extra source addresses of the flooding pod (198.18.0.200 + i)."""
    ip = f"198.18.0.{200 + i}"
    node.ns_exec(node.pods[2].ns, "ip", "addr", "replace", f"{ip}/24", "dev", "eth0")
    return ip


@pytest.fixture(scope="module")
def flood_node(node):
    """The node, with room for many connections: the whole port range for
    clients, deep accept queues for servers, spoofed sources blackholed."""
    for pod in node.pods:
        node.ns_exec(pod.ns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535",
                     "net.core.somaxconn=65535", "net.ipv4.tcp_max_syn_backlog=65535")
    node.ns_exec(node.node_ns, "ip", "route", "add", "blackhole", "198.19.0.0/16")
    node.ns_exec(node.node_ns, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0",
                 "net.ipv4.conf.uplink0.rp_filter=0")
    www = node.start_nginx(node.pods[3], port=BIG_PORT)
    with open(os.path.join(www, "www", "files", "3k.txt"), "wb") as f:
        f.write(b"k" * 3000)
    return node


# -- 50,000 connections ----------------------------------------------------------
def test_50k_pending_connections_evicted_and_counted(flood_node):
    node = flood_node
    n, max_conns = 50_000, 16_384
    # one process holds at most its file limit of sockets: split both ends
    per = resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 2000
    k = -(-n // per)
    agent = start_agent(node, "--max-conns", str(max_conns), name="conns")
    holders = [Tool(node, node.pods[3].ns, "hold", str(HOLD_PORT)) for _ in range(k + 1)]
    floods = []
    try:
        for h in holders:
            h.wait_for("listening")
        with Control(node, node.ext_ns, node.pods[0].ip, 80, "c50k") as control:
            for i in range(k):  # each from its own source address: ports to spare
                share = n // k + (1 if i < n % k else 0)
                floods.append(Tool(node, node.pods[2].ns, "conns", node.pods[3].ip,
                                   str(HOLD_PORT), str(share), "/flood/", str(i * (n // k + 1)),
                                   client_ip(node, i)))
            sent = [f.wait_for("sent", timeout=120) for f in floods]
            assert sum(s["sent"] for s in sent) == n and not any(s["failed"] for s in sent), sent
            # "sent" is a local write: a burst that overflowed the veth backlog
            # reaches the hook only when TCP retransmits it (RTO backoff)
            peak = wait_kernel(agent, lambda l: l["kernel"]["requests"] >= n, timeout=90)
        for t in floods + holders:  # all FINs and RSTs: what is left is reported
            assert t.stop() == 0
        time.sleep(2)
        assert agent.stop() == 0, agent.stderr()
    finally:
        agent.stop(signal.SIGKILL)
        for t in floods + holders:
            if t.proc.poll() is None:
                os.killpg(t.proc.pid, signal.SIGKILL)
    recs = agent.records()
    control.check(recs)
    assert peak["agent"]["pending_requests"] <= max_conns, peak["agent"]
    final = stats_lines(agent)[-1]
    k = final["kernel"]
    check_accounting(k, final["agent"])
    flood_recs = [r for r in recs if r["url.path"].startswith("/flood/")]
    assert all(r.get("error.type") == "no_response" for r in flood_recs)
    assert len({r["url.path"] for r in flood_recs}) == len(flood_recs), "a request logged twice"
    lost = (k["lru_evicted_pending"] + k["requests_evicted"] + k["ringbuf_full"] +
            k["pending_map_full"] + k["fifo_overflow"] + k["conn_map_full"])
    live = final["agent"]["pending_requests"]  # still in the maps at exit (shown there)
    assert len(flood_recs) + lost + live == n, \
        f"{len(flood_recs)} logged + {lost} counted as lost + {live} pending != {n}: {k}"
    assert k["lru_evicted_pending"] >= n - max_conns - len(control.sent), k
    rss = check_memory(agent)
    print(f"50k: logged {len(flood_recs)}, lost {lost} ({k}), max RSS {rss} kB")


# -- slowloris -------------------------------------------------------------------
def test_slowloris_heads_that_never_end(flood_node):
    node = flood_node
    n = 300
    agent = start_agent(node, name="slowloris")
    try:
        with Control(node, node.ext_ns, node.pods[0].ip, 80, "cslow") as control:
            slow = Tool(node, node.pods[2].ns, "slowloris", node.pods[0].ip, "80", str(n), "8")
            slow.wait_for("open")
            during = wait_kernel(agent, lambda l: l["agent"]["pending_requests"] >= n)
            slow.wait_for("closed", timeout=60)
        time.sleep(2)  # nginx closes its side: the heads are reported unanswered
        assert agent.stop() == 0, agent.stderr()
    finally:
        agent.stop(signal.SIGKILL)
    recs = agent.records()
    control.check(recs)
    assert during["agent"]["pending_requests"] <= n + 100, during["agent"]  # bounded: one each
    slow_recs = sorted(r["url.path"] for r in recs if r["url.path"].startswith("/slowloris/"))
    assert slow_recs == sorted(f"/slowloris/{i}" for i in range(n))
    assert all(r.get("error.type") == "no_response"
               for r in recs if r["url.path"].startswith("/slowloris/"))
    final = stats_lines(agent)[-1]
    check_accounting(final["kernel"], final["agent"])
    check_memory(agent)


# -- SYN flood --------------------------------------------------------------------
def test_syn_flood_on_a_traced_port(flood_node):
    node = flood_node
    syns, with_data, max_conns = 100_000, 30_000, 4096
    agent = start_agent(node, "--max-conns", str(max_conns), name="synflood")
    try:
        with Control(node, node.pods[2].ns, node.pods[0].ip, 80, "csyn") as control:
            t = Tool(node, node.ext_ns, "synflood", node.pods[0].ip, "80", str(syns), "0")
            assert t.proc.wait(timeout=120) == 0
            plain = t.wait_for("sent")
            control.once()
            mid = wait_fresh(agent)
            mid_control = len(control.sent)
            t = Tool(node, node.ext_ns, "synflood", node.pods[0].ip, "80", str(with_data), "1")
            assert t.proc.wait(timeout=120) == 0
            data = t.wait_for("sent")
        time.sleep(1.5)
        assert agent.stop() == 0, agent.stderr()
    finally:
        agent.stop(signal.SIGKILL)
    recs = agent.records()
    control.check(recs)
    assert plain["sent"] >= 0.9 * syns and data["sent"] >= 0.9 * with_data, (plain, data)
    k = stats_lines(agent)[-1]["kernel"]
    # pure SYNs make no state: no request, no tracked segment beyond the control's
    assert mid["kernel"]["requests"] <= mid_control, mid["kernel"]
    # SYNs with a request each: every one parsed, state bounded by the LRU maps
    assert k["requests"] - len(control.sent) == data["sent"] - k["conn_map_full"], k
    final = stats_lines(agent)[-1]
    assert final["agent"]["pending_requests"] <= max_conns
    check_accounting(k, final["agent"])
    print(f"SYN flood: {plain}, with data {data}, kernel {k}, RSS {check_memory(agent)} kB")


# -- 10,000 pipelined requests -------------------------------------------------------
BIG_PORT = 8081  # a second nginx on pod3, serving a 3 kB file


def run_pipeline(node, n: int, tag: str, *, pad: int, port: int, ok: str, bad: str,
                 bad_status: int, cpu: int | None = None) -> dict:
    """One client pipelines n requests (request i to ok + i, every third to
    @bad + ?n=i) without reading for 3 s, then reads all; a control client
    runs meanwhile. Around it, the kernel's own counters of every namespace
    of the node (tests/support/netcounters.py): the independent witnesses of
    whatever redtap reports lost. @cpu: the client and the server on that
    CPU alone (then the connection's packets, sent from process or softirq
    context, all reach the hooks on it)."""
    server = node.pods[0] if port == 80 else node.pods[3]
    spaces = [node.node_ns, node.ext_ns] + [p.ns for p in node.pods]
    agent = start_agent(node, name=tag)
    try:
        with Control(node, node.ext_ns, node.pods[0].ip, 80, "c" + tag) as control:
            before = netcounters.snapshot(node, spaces)
            with nginx_on_cpu(node, server, port, cpu):
                t = Tool(node, node.pods[2].ns, "pipeline", server.ip, str(port), str(n), "3",
                         str(pad), ok, bad, cpu=cpu)
                assert t.proc.wait(timeout=120) == 0
            res = t.wait_for("sent")
            net = netcounters.delta(before, netcounters.snapshot(node, spaces))
        time.sleep(1)
        assert agent.stop() == 0, agent.stderr()
    finally:
        agent.stop(signal.SIGKILL)
    third = (n + 2) // 3
    assert res["statuses"] == {str(bad_status): third, "200": n - third}, res  # all answered
    recs = agent.records()
    control.check(recs)
    pipe = [r for r in recs if r["client.address"] == node.pods[2].ip]
    final = stats_lines(agent)[-1]
    k = final["kernel"]
    check_accounting(k, final["agent"])
    idx, wrong = number_records(pipe, n, ok, bad, bad_status)
    # independent causes of a segment missing at a hook: a drop on a device
    # of the node (a veth's backlog queue: before or after the hook; the
    # machine's backlog drops, /proc/net/softnet_stat, too), a receiver's
    # out-of-order queue (overtaken on the way), a sender's retransmit (a
    # drop anywhere), or a segment the kernel itself skipped
    # (concurrent_segments: the claim's bounded wait, its documented limit)
    drops = sum(c["rx_dropped"] + c["tx_dropped"]
                for devs in net["links"].values() for c in devs.values())
    ofo = sum(c["TCPOFOQueue"] for c in net["tcp"].values())
    retrans = sum(c["RetransSegs"] for c in net["tcp"].values())
    tcp = res["tcp"]
    causes = {"drops": drops, "backlog_drops": net["softnet_dropped"], "ofo": ofo,
              "retrans": retrans,
              "concurrent": k["concurrent_segments"],
              "client_retrans": tcp["total_retrans"], "client_reord": tcp["reord_seen"],
              "client_ooo": tcp["rcv_ooopack"]}
    p = {"pipe": pipe, "idx": idx, "k": k, "wrong": wrong, "res": res, "net": net,
         "causes": causes, "control": len(control.sent), "rss": check_memory(agent),
         "unanswered": sum("http.response.status_code" not in r for r in recs)}
    check_pipeline(p, n)
    return p


def number_records(pipe: list[dict], n: int, ok: str, bad: str,
                   bad_status: int) -> tuple[list, list]:
    """Each record's request number (in log order: the connection's FIFO
    order, so increasing), and those paired with another request's
    response. A request head split within its URL is logged with the part
    before the cut (url.truncated): its number is None, one of those
    between its neighbours, whose URL starts with what was logged."""
    def url_of(i: int) -> str:
        return f"{bad}?n={i}" if i % 3 == 0 else f"{ok}{i}"

    def status_of(i: int) -> int:
        return bad_status if i % 3 == 0 else 200

    idx = []
    for r in pipe:
        url = r["url.path"] + ("?" + r["url.query"] if "url.query" in r else "")
        m = re.fullmatch(re.escape(bad) + r"\?n=(\d+)|" + re.escape(ok) + r"(\d+)", url)
        if m and not r.get("url.truncated"):
            idx.append(int(m.group(1) or m.group(2)))
        else:
            assert r.get("url.truncated"), f"a record of a request never made: {r}"
            idx.append(None)
    known = [i for i in idx if i is not None]
    assert known == sorted(set(known)), "requests logged out of order, or twice"
    wrong = []
    for j, (i, r) in enumerate(zip(idx, pipe)):
        if i is not None:
            cands = [i]
        else:  # between the known neighbours
            lo = max([x for x in idx[:j] if x is not None], default=-1)
            hi = min([x for x in idx[j + 1:] if x is not None], default=n)
            url = r["url.path"] + ("?" + r["url.query"] if "url.query" in r else "")
            cands = [c for c in range(lo + 1, hi) if url_of(c).startswith(url)]
            assert cands, f"a truncated record of no request between {lo} and {hi}: {r}"
        st = r.get("http.response.status_code")  # lost: no status
        if st is not None and all(status_of(c) != st for c in cands):
            wrong.append((cands[0] if len(cands) == 1 else cands[:3], st))
    return idx, wrong


def runs(idx: list) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive request numbers, [(first, last,
    records of unknown number next to it), ...] (see number_records())."""
    out: list[list[int]] = []
    pending = 0  # unknown ones since the last known
    for i in idx:
        if i is None:
            pending += 1
            continue
        if out and i == out[-1][1] + 1 + pending:
            out[-1][1] = i  # (the unknown ones filled the hole)
        else:
            if out:
                out[-1][2] += pending
            out.append([i, i, pending])
        pending = 0
    if out:
        out[-1][2] += pending
    return [tuple(r) for r in out]


def first_logged(idx: list, m: int) -> bool:
    """Are requests 0 .. m-1 the first m records (number_records())?"""
    return len(idx) >= m and all(i is None or i == j for j, i in enumerate(idx[:m]))


def check_pipeline(p: dict, n: int) -> None:
    """What holds for a pipelining connection whatever was lost.

    The FIFO (MAX_PIPELINE) starts empty, so the first requests are queued;
    once it is full, requests are skipped (fifo_overflow) until their
    responses have gone by and it is empty again: the logged requests come
    in runs from request 0 on, each but the last at least MAX_PIPELINE
    long, the skipped ones in between counted. Every request the kernel
    counted is logged or counted as skipped (nothing silently dropped)."""
    k, idx, pipe = p["k"], p["idx"], p["pipe"]
    assert p["wrong"] == [], f"{len(p['wrong'])} records paired with another request's " \
                             f"response (request, status): {p['wrong'][:5]}"
    assert k["requests"] - p["control"] == len(pipe) + k["fifo_overflow"] + \
        k["pending_map_full"], (len(pipe), k)
    assert k["overflow_responses"] <= k["fifo_overflow"], k
    r = runs(idx)
    assert r and r[0][0] <= r[0][2], f"request 0 not logged: runs {r[:3]}"
    short = [x for x in r[:-1] if x[1] - x[0] + 1 + x[2] < abi.MAX_PIPELINE]
    assert not short, f"runs of logged requests shorter than the FIFO: {short[:5]} of {len(r)}"
    # the requests before the last one logged that are not: skipped, counted
    trailing = len(idx) - max(j for j, i in enumerate(idx) if i is not None) - 1
    skipped = r[-1][1] + 1 - (len(idx) - trailing)
    assert k["fifo_overflow"] >= skipped, (skipped, k)
    # loss signals and their independent causes
    assert k["header_too_long"] == 0 and k["unsupported_framing"] == 0, k  # none sent
    assert k["connections_given_up"] <= 1, k  # one pipelining connection
    assert k["connections_given_up"] <= k["gaps"] + k["parse_failed"], k  # each after a lost sync
    c = p["causes"]
    witnesses = c["drops"] + c["backlog_drops"] + c["ofo"] + c["concurrent"]
    assert k["gaps"] <= witnesses, f"gaps without a dropped, overtaken or skipped segment: " \
                                   f"{k['gaps']} > {c}"
    lost = [rec for rec in pipe if "http.response.status_code" not in rec]
    assert all(rec["error.type"] in ("response_not_seen", "no_response") for rec in lost)
    # each one an event the kernel counted as such (the agent's idle sweep is off)
    assert k["unanswered"] == p["unanswered"] == len(lost), (len(lost), k)
    rns = sum(rec["error.type"] == "response_not_seen" for rec in lost)
    assert rns <= k["resync_dropped"] <= rns + k["requests_evicted"] + k["ringbuf_full"], k
    if lost:  # reported when the stream lost its sync (or a skipped last segment left
        # requests pending when the server closed)
        assert k["gaps"] + k["parse_failed"] + c["concurrent"] >= 1, (len(lost), k)
    print(f"pipeline: logged {len(pipe)} ({len(lost)} lost) in {len(r)} runs, "
          f"fifo_overflow {k['fifo_overflow']}, gaps {k['gaps']}, parse_failed "
          f"{k['parse_failed']}, given up {k['connections_given_up']}, causes {p['causes']}, "
          f"clean {p['res']['clean_requests']}/{p['res']['clean_responses']}, RSS {p['rss']} kB")


@pytest.mark.parametrize("cpu", [0, None], ids=["one-cpu", "two-cpus"])
def test_pipelining_10k_without_reading(flood_node, cpu):
    """1 kB requests, 3 kB responses: fewer framing steps than
    MAX_STEPS_PER_SEG (a head, a body: 2 per response) even in a 64 kB GSO
    segment, heads far below the scan limit, Content-Length framing: no
    documented limit applies, so the kernel never fails to parse. The FIFO
    overflows: every request is logged or counted as skipped, the response
    of each skipped one skipped (counted), none mispaired.

    one-cpu: client and server on one CPU: nothing reaches a hook on two
    CPUs at once, nothing is overtaken. Unless a device of the node dropped
    a segment, the kernel follows the whole connection: exact counts.
    two-cpus: segments of one direction may reach the hooks on both CPUs
    at once; one waiting longer than the claim's bounded wait is skipped
    (concurrent_segments, its documented limit) and gives the connection up
    there, as does a segment lost or overtaken on the way (the node's own
    counters say so). Whatever the hook saw in sync before is logged."""
    node, n = flood_node, 10_000
    if cpu is not None and cpu not in os.sched_getaffinity(0):
        pytest.skip(f"CPU {cpu} not ours")
    p = run_pipeline(node, n, "pipeline", pad=1000, port=BIG_PORT,
                     ok="/files/3k.txt?n=", bad="/files/missing", bad_status=404, cpu=cpu)
    k, c, res = p["k"], p["causes"], p["res"]
    assert k["parse_failed"] == 0, k
    if cpu is not None:  # nothing runs beside the walk of a direction
        assert k["concurrent_segments"] == 0 and k["reordered_segments"] == 0, k
    # requests seen in sync: those the server acknowledged before this side
    # retransmitted or heard of reordering, and those whose responses came
    # in order (the server had read them: they had passed the hook), unless
    # the kernel skipped a segment (at a place no witness tells)
    seen = min(res["clean_requests"], res["clean_responses"])
    if not c["concurrent"]:
        assert len(p["pipe"]) + k["fifo_overflow"] >= seen, (len(p["pipe"]), seen, k)
        first = min(seen, abi.MAX_PIPELINE)  # the FIFO's room: none of them skipped
        assert first_logged(p["idx"], first), f"the first {first} requests not all logged"
    if not (c["drops"] or c["backlog_drops"] or c["ofo"] or c["concurrent"]):  # none missing
        assert k["gaps"] == 0 and k["connections_given_up"] == 0, k
        assert k["fifo_overflow"] > 0 and len(p["pipe"]) >= abi.MAX_PIPELINE, k
        assert len(p["pipe"]) + k["fifo_overflow"] == n, (len(p["pipe"]), k)
        assert k["overflow_responses"] == k["fifo_overflow"], k
        assert all("http.response.status_code" in r for r in p["pipe"])


def test_pipelining_10k_tiny_messages_losses_counted(flood_node):
    """Tiny requests and responses: a 64 kB segment holds hundreds, more
    than the kernel follows in one segment (MAX_STEPS_PER_SEG, its
    documented limit): it loses sync there, says so (parse_failed once,
    connections_given_up once) and never mispairs
    (tests/bpf/test_fuzz.py test_more_messages_in_a_segment_than_steps_never_mispair).
    Until then it follows: the first MAX_STEPS_PER_SEG / 2 requests (a
    response takes two steps) seen in sync are logged."""
    node, n = flood_node, 10_000
    p = run_pipeline(node, n, "tinypipe", pad=0, port=80, ok="/status/pipe", bad="/error",
                     bad_status=500)
    k, res = p["k"], p["res"]
    assert k["parse_failed"] <= 1, k  # the limit, once: then the connection is given up
    if k["parse_failed"]:  # a segment held more steps than followed: as many requests
        assert k["requests"] - p["control"] >= MAX_STEPS_PER_SEG // 2, k  # (or responses: 2 each)
    if len(p["pipe"]) + k["fifo_overflow"] < n:  # requests not followed: never silently
        assert k["connections_given_up"] == 1, k
    seen = min(res["clean_requests"], res["clean_responses"], MAX_STEPS_PER_SEG // 2)
    if not p["causes"]["concurrent"]:
        assert first_logged(p["idx"], seen), f"the first {seen} requests not all logged"
    c = p["causes"]
    if not (k["parse_failed"] or c["drops"] or c["backlog_drops"] or c["ofo"] or c["concurrent"]):
        assert len(p["pipe"]) + k["fifo_overflow"] == n, (len(p["pipe"]), k)

"""Log safety through the real kernel path: raw request bytes from a client
pod to nginx, traced on the veth, written by the agent.

Whatever bytes a client puts in the request-target or the method (quotes,
backslashes, control characters, NUL, invalid UTF-8, JSON fragments, line
ends, 8 kB of %00), each request yields exactly one valid JSON line whose
fields are the documented ones and whose url.path is the target as sent
(escaped); no client can forge a second record or a field. Secrets in
query strings and path parameters are redacted before anything is written.
"""
from __future__ import annotations

import json
import os
import signal
import sys

import pytest

from support.agentproc import AgentProc
from pyloader.kernel import abi
from pyloader.pipeline.record import _text

SCHEMA = {"time", "client.address", "client.port", "server.address", "server.port",
          "http.request.method", "http.request.method_original", "url.path", "url.query",
          "url.truncated", "network.protocol.version", "http.response.status_code",
          "duration_ms", "response.duration_ms", "http.request.body.size",
          "http.response.body.size", "error.type", "http.route"}

# (request-target bytes, what it tries)
TARGETS = [
    (b'/quote"inside', "a double quote"),
    (b"/back\\slash\\", "backslashes"),
    (b'/forge","http.response.status_code":200,"url.path":"/admin', "a forged field"),
    (b'/close"}\\n{"url.path":"/forged', "a forged record"),
    (b"/ctl\x01\x02\x1b[31m\x7f\x08\t", "control characters"),
    (b"/nul\x00byte", "a NUL byte"),
    (b"/cr\rinside", "a lone CR"),
    (b"/bad\xff\xfe\xc3(", "invalid UTF-8"),
    (b"/surrogate\xed\xa0\x80", "an encoded surrogate"),
    (b"/sep\xe2\x80\xa8\xe2\x80\xa9\xc2\x85", "Unicode line separators"),
    (b"/esc\\u0000\\n\\x41", "JSON escape sequences as text"),
    (b"/q?a=\"b\"&c=\\&d=\x00", "a hostile query"),
    (b"/" + b"%00" * 2730, "8 kB of %00"),
]

CLIENT = r"""
import json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
for hexreq in json.load(open(sys.argv[3])):
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(bytes.fromhex(hexreq))
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        pass
    s.close()
    line = data.split(b"\r\n", 1)[0].split()
    print(json.dumps({"status": int(line[1]) if len(line) > 1 else None}), flush=True)
"""


def send_raw(node, ns: str, ip: str, port: int, requests: list[bytes], tag: str) -> list:
    """Each request on its own connection, raw bytes; returns the status codes."""
    path = os.path.join(node.dir, f"raw-{tag}.json")
    with open(path, "w") as f:
        json.dump([r.hex() for r in requests], f)
    cp = node.ns_exec(ns, sys.executable, "-c", CLIENT, ip, str(port), path, timeout=120)
    return [json.loads(l)["status"] for l in cp.stdout.splitlines()]


def raw_log_lines(agent) -> list[bytes]:
    with open(agent.log, "rb") as f:
        data = f.read()
    assert data.endswith(b"\n")
    return data[:-1].split(b"\n")


def run_agent(node, *args, name: str):
    pod0 = node.pods[0]
    agent = AgentProc(node, "--endpoint", f"{pod0.ip}:80", "--idle-timeout", "2", *args,
                      name=name)
    try:
        agent.wait_started()
        yield agent
        assert agent.stop() == 0, agent.stderr()
    finally:
        agent.stop(signal.SIGKILL)


@pytest.fixture
def agent(node):
    yield from run_agent(node, name="safety")


def test_hostile_targets_one_json_line_each(node, agent):
    pod0, client = node.pods[0], node.pods[2]
    reqs = [b"GET " + t + b" HTTP/1.1\r\nHost: x\r\n\r\n" for t, _ in TARGETS]
    statuses = send_raw(node, client.ns, pod0.ip, 80, reqs, "targets")
    assert len(statuses) == len(reqs) and all(s for s in statuses), statuses
    assert agent.stop() == 0, agent.stderr()  # drained: everything is in the file
    lines = raw_log_lines(agent)
    recs = []
    for line in lines:  # every line, also the start/stats/exit ones, is one JSON object
        assert b"\r" not in line
        obj = json.loads(line)
        assert isinstance(obj, dict)
        if "event" not in obj:
            recs.append(obj)
    mine = [r for r in recs if r["client.address"] == client.ip]
    assert len(mine) == len(TARGETS), [r["url.path"] for r in mine]
    for (target, what), rec, status in zip(TARGETS, mine, statuses):
        assert set(rec) <= SCHEMA, (what, set(rec) - SCHEMA)
        kept = target[:abi.MAX_URL_LEN]
        path, _, query = kept.partition(b"?")
        assert rec["url.path"] == _text(path), what
        if b"?" in kept:
            assert rec["url.query"] == _text(query), what
        assert rec.get("url.truncated", False) == (len(target) > abi.MAX_URL_LEN), what
        assert rec["http.request.method"] == "GET", what
        assert rec["http.response.status_code"] == status, what
    assert not any(r["url.path"] in ("/admin", "/forged") for r in recs)


def test_hostile_extension_method_names(node, agent):
    """Extension methods keep their name in http.request.method_original; a
    token with other bytes is no request line at all (nothing logged)."""
    pod0, client = node.pods[0], node.pods[3]
    ok = [b"M-SEARCH", b"PROPFIND", b"X_Y-Z", b"ABCDEFGHIJKLMN"]
    bad = [b'GE"T', b"G\x00T", b"\xffGET", b"GET\\"]
    reqs = [m + b" /m HTTP/1.1\r\nHost: x\r\n\r\n" for m in ok + bad]
    send_raw(node, client.ns, pod0.ip, 80, reqs, "methods")
    assert agent.stop() == 0, agent.stderr()
    recs = [r for r in agent.records() if r["client.address"] == client.ip]
    assert [(r["http.request.method"], r["http.request.method_original"]) for r in recs] == \
        [("_OTHER", m.decode()) for m in ok]


def test_pipelined_line_ends_cannot_add_a_record(node, agent):
    """A newline ends the request line: what follows is a header to the server
    and to redtap, never a second request."""
    pod0, client = node.pods[0], node.pods[2]
    req = (b'GET /one\n{"url.path":"/forged","http.response.status_code":200} HTTP/1.1\r\n'
           b"Host: x\r\n\r\n")
    send_raw(node, client.ns, pod0.ip, 80, [req], "newline")
    assert agent.stop() == 0, agent.stderr()
    recs = [r for r in agent.records() if r["client.address"] == client.ip]
    assert [r["url.path"] for r in recs] == ["/one"]


SECRET_URL = b"/cart;jsessionid=S3SS10N/items?page=2&access_token=T0K3N&API_KEY=K3Y&sig=ok"


def test_secrets_redacted_by_default(node, agent):
    pod0, client = node.pods[0], node.pods[2]
    send_raw(node, client.ns, pod0.ip, 80,
             [b"GET " + SECRET_URL + b" HTTP/1.1\r\nHost: x\r\n\r\n"], "secret")
    assert agent.stop() == 0, agent.stderr()
    with open(agent.log, "rb") as f:
        data = f.read()
    for secret in (b"S3SS10N", b"T0K3N", b"K3Y"):
        assert secret not in data, f"{secret} written to the log"
    (rec,) = [r for r in agent.records() if r["client.address"] == client.ip]
    assert rec["url.path"] == "/cart;jsessionid=REDACTED/items"
    assert rec["url.query"] == "page=2&access_token=REDACTED&API_KEY=REDACTED&sig=ok"
    assert "S3SS10N" not in rec["http.route"]
    assert agent.counters()["redact"] == {"records": 1, "values": 3}


def test_no_redact_logs_urls_as_sent(node):
    pod0, client = node.pods[0], node.pods[2]
    for agent in run_agent(node, "--no-redact", name="noredact"):
        send_raw(node, client.ns, pod0.ip, 80,
                 [b"GET " + SECRET_URL + b" HTTP/1.1\r\nHost: x\r\n\r\n"], "noredact")
    (rec,) = [r for r in agent.records() if r["client.address"] == client.ip]
    path, _, query = SECRET_URL.partition(b"?")
    assert (rec["url.path"], rec["url.query"]) == (path.decode(), query.decode())
    assert "redact" not in agent.counters()


def test_redact_keys_configured(node):
    pod0, client = node.pods[0], node.pods[2]
    for agent in run_agent(node, "--redact-keys", "page,sig", name="redactkeys"):
        send_raw(node, client.ns, pod0.ip, 80,
                 [b"GET " + SECRET_URL + b" HTTP/1.1\r\nHost: x\r\n\r\n"], "redactkeys")
    (rec,) = [r for r in agent.records() if r["client.address"] == client.ip]
    assert rec["url.query"] == "page=REDACTED&access_token=T0K3N&API_KEY=K3Y&sig=REDACTED"

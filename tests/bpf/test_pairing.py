"""BPF_PROG_TEST_RUN on crafted packets: pairing of requests and responses.
One behaviour per test; every test also checks (in the harness) that the
program returned TC_ACT_UNSPEC and left the packet unchanged."""
from pyloader.kernel import abi

from support import packets as P

UNSPEC = 0xFFFFFFFF  # TC_ACT_UNSPEC (-1) as the u32 retval


def test_request_and_response_make_one_event(h):
    c = P.Conn()
    assert h.req(c.req(P.get("/hello?x=1"))) == UNSPEC
    assert h.resp(c.resp(P.response(200))) == UNSPEC
    (ev,) = h.events()
    assert ev["method"] == "GET" and ev["url"] == b"/hello?x=1"
    assert ev["status"] == 200 and ev["version"] == 11
    assert ev["flags"] == abi.EV_RESP_END | abi.EV_RESP_BODY | abi.EV_REQ_BODY
    assert ev["resp_body"] == 2 and ev["req_body"] == 0
    assert ev["cport"] == 40000 and ev["sport"] == 80
    assert ev["caddr"][-4:] == bytes([198, 18, 0, 20]) and ev["saddr"][-4:] == bytes([198, 18, 0, 10])
    assert ev["resp_ns"] > ev["req_ns"] > 0
    s = h.stats()
    assert s["requests"] == 1 and s["responses"] == 1 and s["events"] == 1
    assert not set(s) & set(abi.LOSS_STATS)


def test_every_method_is_recognised(h):
    methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]
    for i, m in enumerate(methods):
        c = P.Conn(client=("198.18.0.20", 41000 + i))
        target = "example:443" if m == "CONNECT" else f"/{m.lower()}"
        h.req(c.req(f"{m} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()))
        h.resp(c.resp(P.response(404 if m == "CONNECT" else 200)))
    evs = h.events()
    assert [e["method"] for e in evs] == methods
    assert evs[0]["url"] == b"/get" and evs[5]["url"] == b"example:443"


def test_http10_request_and_status_line(h):
    c = P.Conn()
    h.req(c.req(b"GET /old HTTP/1.0\r\n\r\n"))
    h.resp(c.resp(P.response(200, version="1.0")))
    (ev,) = h.events()
    assert ev["version"] == 10 and ev["status"] == 200


def test_sixteen_pipelined_requests_in_one_segment(h):
    c = P.Conn()
    h.req(c.req(b"".join(P.get(f"/p{i}") for i in range(16))))
    # 400..415: statuses that have a body (204 and 304 never do)
    h.resp(c.resp(b"".join(P.response(400 + i, body=b"x" * i) for i in range(16))))
    evs = h.events()
    assert [e["url"] for e in evs] == [f"/p{i}".encode() for i in range(16)]
    assert [e["status"] for e in evs] == [400 + i for i in range(16)]
    assert h.stats()["requests"] == 16


def test_pipelined_responses_split_over_two_segments(h):
    c = P.Conn()
    h.req(c.req(b"".join(P.get(f"/p{i}") for i in range(16))))
    blob = b"".join(P.response(200, body=f"body{i}".encode()) for i in range(16))
    h.resp(c.resp(blob[:len(blob) // 2 + 3]))
    h.resp(c.resp(blob[len(blob) // 2 + 3:]))
    evs = h.events()
    assert [e["url"] for e in evs] == [f"/p{i}".encode() for i in range(16)]
    assert "parse_failed" not in h.stats()


def test_ipv6(h):
    h.reset(endpoints=("[2001:db8::10]:8080",))
    c = P.Conn(client=("2001:db8::20", 40000), server=("2001:db8::10", 8080))
    h.req(c.req(P.get("/six")))
    h.resp(c.resp(P.response(201)))
    (ev,) = h.events()
    assert ev["url"] == b"/six" and ev["status"] == 201
    assert ev["saddr"] == bytes.fromhex("20010db8000000000000000000000010")


def test_non_http_payload_is_ignored(h):
    c = P.Conn()
    h.req(c.req(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200)))
    h.resp(c.resp(b"SSH-2.0-OpenSSH_9.2\r\n"))
    assert h.events() == []
    assert h.stats() == {}


def test_unlisted_endpoint_costs_nothing(h):
    c = P.Conn(server=("198.18.0.11", 80))
    h.req(c.req(P.get("/other")))
    h.resp(c.resp(P.response(200)))
    assert h.events() == [] and h.stats() == {}
    assert list(h.t.conns.keys()) == []


def test_endpoint_without_port_matches_any_port(h):
    h.reset(endpoints=("198.18.0.10",))
    c = P.Conn(server=("198.18.0.10", 9999))
    h.req(c.req(P.get("/any")))
    h.resp(c.resp(P.response(200)))
    assert len(h.events()) == 1


def test_endpoint_cidr(h):
    h.reset(endpoints=("198.18.0.0/24",))
    for i, host in enumerate(("198.18.0.10", "198.18.0.99", "198.18.1.10")):
        c = P.Conn(server=(host, 80), client=("198.18.2.1", 40000 + i))
        h.req(c.req(P.get("/")))
        h.resp(c.resp(P.response(200)))
    assert [e["saddr"][-1] for e in h.events()] == [10, 99]


def test_wildcard_traces_everything(h):
    h.reset(endpoints=("*",))
    c = P.Conn(server=("198.19.7.7", 1234))
    h.req(c.req(P.get("/w")))
    h.resp(c.resp(P.response(200)))
    assert len(h.events()) == 1


def test_long_url_is_truncated_and_flagged(h):
    c = P.Conn()
    url = "/" + "a" * 1999
    h.req(c.req(P.get(url)))
    h.resp(c.resp(P.response(200)))
    (ev,) = h.events()
    assert ev["url"] == url.encode()[:abi.MAX_URL_LEN]
    assert ev["flags"] & abi.EV_URL_TRUNCATED and ev["version"] == 11


def test_url_of_exactly_max_length_is_not_flagged(h):
    c = P.Conn()
    url = "/" + "b" * (abi.MAX_URL_LEN - 1)
    h.req(c.req(P.get(url)))
    h.resp(c.resp(P.response(200)))
    (ev,) = h.events()
    assert ev["url"] == url.encode() and not ev["flags"] & abi.EV_URL_TRUNCATED


def test_fifo_overflow_is_counted_and_pairing_kept(h):
    n = abi.MAX_PIPELINE
    c = P.Conn()
    burst = [P.get(f"/o{i}") for i in range(n + 4)]
    for i in range(0, len(burst), 16):  # 16 requests per segment
        h.req(c.req(b"".join(burst[i:i + 16])))
    for i in range(0, n, 16):  # BPF_PROG_TEST_RUN takes at most a page of data
        h.resp(c.resp(b"".join(P.response(200) for _ in range(16))))
    # responses to the 4 requests that did not fit must not pair with new ones
    h.req(c.req(P.get("/after")))
    h.resp(c.resp(b"".join(P.response(500 + i) for i in range(4))))
    h.resp(c.resp(P.response(299)))
    # while responses of dropped requests are due, new requests are dropped
    # too (counted): a later response can then never pair with the wrong one
    h.req(c.req(P.get("/later")))
    h.resp(c.resp(P.response(201)))
    evs = h.events()
    assert [(e["url"], e["status"]) for e in evs] == (
        [(f"/o{i}".encode(), 200) for i in range(n)] + [(b"/later", 201)])
    s = h.stats()
    assert s["fifo_overflow"] == 5 and s["overflow_responses"] == 5


def test_response_without_request_is_counted(h):
    c = P.Conn()
    h.resp(c.resp(P.response(200)))
    assert h.events() == []
    assert h.stats() == {"unmatched_responses": 1}


def test_reset_reports_pending_request_unanswered(h):
    c = P.Conn()
    h.req(c.req(P.get("/slow")))
    h.req(c.req(b"", flags=P.RST | P.ACK))
    (ev,) = h.events()
    assert ev["url"] == b"/slow" and ev["status"] == 0
    assert ev["flags"] & abi.EV_UNANSWERED and abi.REASONS[ev["reason"]] == "reset"
    assert h.stats()["unanswered"] == 1
    assert list(h.t.conns.keys()) == []


def test_server_fin_reports_pending_request_unanswered(h):
    c = P.Conn()
    h.req(c.req(P.get("/a")))
    h.req(c.req(P.get("/b")))
    h.resp(c.resp(P.response(200)))
    h.resp(c.resp(b"", flags=P.FIN | P.ACK))
    evs = h.events()
    assert [(e["url"], e["status"], abi.REASONS[e["reason"]]) for e in evs] == [
        (b"/a", 200, ""), (b"/b", 0, "server_closed")]


def test_client_fin_waits_for_the_response(h):
    c = P.Conn()
    h.req(c.req(P.get("/half"), flags=P.PSH | P.ACK | P.FIN))
    h.resp(c.resp(P.response(200)))
    (ev,) = h.events()
    assert ev["status"] == 200


def test_retransmitted_request_is_recorded_once(h):
    c = P.Conn()
    seq = c.cseq
    h.req(c.req(P.get("/r")))
    h.req(c.req(P.get("/r"), seq=seq))
    h.resp(c.resp(P.response(200)))
    (ev,) = h.events()
    assert ev["url"] == b"/r"
    assert h.stats()["retransmits"] == 1


def test_body_with_fake_request_line_is_skipped(h):
    c = P.Conn()
    body = b"GET /fake HTTP/1.1\r\n\r\n" * 10
    h.req(c.req(b"POST /upload HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)))
    h.req(c.req(body[:100]))
    h.req(c.req(body[100:]))
    h.resp(c.resp(P.response(200, body=b"HTTP/1.1 500 fake\r\n\r\n")))
    h.req(c.req(P.get("/next")))
    h.resp(c.resp(P.response(204, body=b"")))
    evs = h.events()
    assert [(e["method"], e["url"], e["status"]) for e in evs] == [
        ("POST", b"/upload", 200), ("GET", b"/next", 204)]
    assert h.stats()["requests"] == 2


def test_interim_100_continue_does_not_consume_the_request(h):
    c = P.Conn()
    h.req(c.req(b"POST /up HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"))
    h.resp(c.resp(b"HTTP/1.1 100 Continue\r\n\r\n"))
    h.req(c.req(b"hello"))
    h.resp(c.resp(P.response(201)))
    (ev,) = h.events()
    assert ev["status"] == 201
    assert h.stats()["interim_responses"] == 1


def test_head_response_has_no_body_despite_content_length(h):
    c = P.Conn()
    h.req(c.req(b"HEAD /h HTTP/1.1\r\n\r\n" + P.get("/g")))
    h.resp(c.resp(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + P.response(404)))
    evs = h.events()
    assert [(e["method"], e["status"]) for e in evs] == [("HEAD", 200), ("GET", 404)]


def test_request_head_split_across_segments(h):
    c = P.Conn()
    msg = b"POST /split HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody"
    h.req(c.req(msg[:25]))
    h.req(c.req(msg[25:]))
    h.req(c.req(P.get("/then")))
    h.resp(c.resp(P.response(200)))
    h.resp(c.resp(P.response(200)))
    evs = h.events()
    assert [e["url"] for e in evs] == [b"/split", b"/then"]
    assert not set(h.stats()) & set(abi.LOSS_STATS)


def test_garbage_after_a_message_counts_parse_failure(h):
    c = P.Conn()
    h.req(c.req(P.get("/ok") + b"\x00\x01garbage"))
    h.resp(c.resp(P.response(200)))
    assert len(h.events()) == 1
    assert h.stats()["parse_failed"] == 1


def test_gap_in_sequence_is_counted_and_stream_resyncs(h):
    c = P.Conn()
    h.req(c.req(P.get("/1")))
    h.resp(c.resp(P.response(200)))
    c.cseq += 500  # lost segment
    h.req(c.req(P.get("/2")))
    h.resp(c.resp(P.response(200)))
    assert [e["url"] for e in h.events()] == [b"/1", b"/2"]
    assert h.stats()["gaps"] == 1


def test_evicted_request_is_counted_and_pairing_kept(h):
    c = P.Conn()
    h.req(c.req(P.get("/gone") + P.get("/kept")))
    k = sorted(h.t.pending.keys(), key=lambda raw: abi.ReqKey.from_buffer_copy(raw).seq)[0]
    h.t.pending.delete(k)  # as if the LRU map had evicted it
    h.resp(c.resp(P.response(500) + P.response(200)))
    assert [(e["url"], e["status"]) for e in h.events()] == [(b"/kept", 200)]
    assert h.stats()["requests_evicted"] == 1


def test_full_ringbuf_is_counted(h):
    n = h.t.obj.max_entries("events") // (abi.EVENT_SIZE + 8) + 50
    for i in range(n):
        c = P.Conn(client=("198.18.0.20", 1024 + i))
        h.req(c.req(P.get("/f")))
        h.resp(c.resp(P.response(200)))
    s = h.stats()
    assert s["ringbuf_full"] >= 50
    assert s["events"] + s["ringbuf_full"] == n
    assert len(h.events()) == s["events"]


def test_status_line_split_across_segments(h):
    c = P.Conn()
    h.req(c.req(P.get("/a") + P.get("/b")))
    blob = P.response(200) + P.response(404)
    cut = len(P.response(200)) + 6  # "HTTP/1" | ".1 404 ..."
    h.resp(c.resp(blob[:cut]))
    h.resp(c.resp(blob[cut:]))
    assert [(e["url"], e["status"]) for e in h.events()] == [(b"/a", 200), (b"/b", 404)]
    assert not set(h.stats()) & set(abi.LOSS_STATS)


def test_method_split_across_segments(h):
    c = P.Conn()
    blob = P.get("/first") + P.get("/second")
    cut = len(P.get("/first")) + 6  # "GET /s" | "econd HTTP/1.1"
    h.req(c.req(blob[:cut]))
    h.req(c.req(blob[cut:]))
    h.resp(c.resp(P.response(200) + P.response(200)))
    evs = h.events()
    assert [e["url"] for e in evs] == [b"/first", b"/second"]
    assert evs[1]["version"] == 11 and not evs[1]["flags"] & abi.EV_URL_TRUNCATED


def test_extension_method_with_http_version(h):
    c = P.Conn()
    h.req(c.req(b"PROPFIND /dav/ HTTP/1.1\r\nDepth: 1\r\n\r\n"))
    h.resp(c.resp(P.response(207)))
    (ev,) = h.events()
    assert ev["method"] == "_OTHER" and ev["method_name"].rstrip(b"\0").startswith(b"PROPFIND ")
    assert ev["url"] == b"/dav/" and ev["status"] == 207


def test_unknown_token_without_version_is_not_a_request(h):
    c = P.Conn()
    h.req(c.req(b"HELLO world\r\n\r\n"))
    h.resp(c.resp(P.response(200)))
    assert h.events() == []


def test_request_line_without_version_ends_at_line_end(h):
    c = P.Conn()
    h.req(c.req(b"GET /HTTP/1.1\nHost: x\n\n"))
    h.resp(c.resp(P.response(403)))
    (ev,) = h.events()
    assert ev["url"] == b"/HTTP/1.1" and ev["version"] == 0 and ev["status"] == 403

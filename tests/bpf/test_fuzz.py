"""Fuzzing the kernel program through BPF_PROG_TEST_RUN (hypothesis).

Random and adversarial segment sequences on a few connections: random
bytes on HTTP ports, method-like prefixes, huge or negative Content-Length,
endless chunk sizes and extensions, heads that never end, the largest
frames the kernel will test-run, empty and truncated packets, IPv4
options, IPv6 extension headers, VLAN tags, odd TCP flags and sequence
numbers (retransmits, gaps, wraparound), through both programs.

After every packet: the program returned TC_ACT_UNSPEC and left the bytes
as they were (tests/conftest.py Harness checks the bytes). After every
sequence: the state is bounded and consistent, every counter adds up
(nothing lost without a count), every event decodes into a valid record,
and resetting the connections empties both maps.

Frame size: BPF_PROG_TEST_RUN builds a linear skb from the data and
refuses more than a page less headroom and skb_shared_info (3712 bytes
on x86-64; test_frame_size_limit measures it), so a 64 kB GSO segment
cannot be test-run. The fuzz goes up to that limit, with IP length
fields claiming 64 kB (tot_len 0 and 65535, as GSO packets carry); real
64 kB GSO segments over veths are in the e2e tests (long downloads,
tests/e2e/test_floods.py's pipelining).

REDTAP_FUZZ_EXAMPLES sets the number of sequences per property (default 300).
"""
from __future__ import annotations

import ipaddress
import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyloader.kernel import abi
from pyloader.pipeline.record import RecordBuilder
from pyloader.errors import BpfError

from support import packets as P
from fuzzgen import (CLIENTS, ENDPOINTS, SERVERS, U32, Conns, build, conversation, frame,
                     min_frame, segment)

UNSPEC = 0xFFFFFFFF  # TC_ACT_UNSPEC (-1) as the u32 retval
EXAMPLES = int(os.environ.get("REDTAP_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def run(prog, f: bytes) -> None:
    """Run one frame: TC_ACT_UNSPEC and unchanged bytes (Harness checks those),
    or, for a frame too short to be test-run at all, the kernel's EINVAL."""
    if len(f) < min_frame(f):
        with pytest.raises(BpfError, match="EINVAL"):
            prog(f)
        return
    assert prog(f) == UNSPEC


def max_frame(tracer) -> int:
    """The largest frame BPF_PROG_TEST_RUN accepts for an skb program (bisection)."""
    def ok(n: int) -> bool:
        try:
            tracer.req.test_run(frame("198.18.0.20", "198.18.0.10", 1, 80, b"x" * (n - 54),
                                      tot_len=0))
            return True
        except BpfError:
            return False
    lo, hi = 1514, 1 << 16
    assert ok(lo), "the kernel must test-run a full Ethernet frame"
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


@pytest.fixture(scope="module")
def limit(tracer) -> int:
    return max_frame(tracer)


# -- state checks ---------------------------------------------------------------
def check_state(h) -> None:
    """Bounded and consistent: FIFOs within MAX_PIPELINE, every pending request
    inside its connection's FIFO and every FIFO slot in the map, counters that
    add up (each request queued, dropped or counted; each dequeued one an
    event or a counted loss)."""
    t = h.t
    live = 0
    fifo = {}
    for key, c in t.connections():
        n = (c.tail - c.head) % U32
        assert n <= abi.MAX_PIPELINE, f"FIFO of {n} requests"
        for s in (c.req, c.resp):
            assert s.mode <= 8 and s.partial_len <= 11, (s.mode, s.partial_len)
        fifo[bytes(key)] = (c.head, n)
        live += n
    pend = [abi.ReqKey.from_buffer_copy(k) for k in t.pending.keys()]
    assert len(pend) == live, f"{len(pend)} pending requests stored, FIFOs hold {live}"
    for rk in pend:
        head, n = fifo[bytes(rk.conn)]
        assert (rk.seq - head) % U32 < n, "a pending request outside its FIFO"
    s = t.stats()
    assert s["requests"] == s["pending_pushed"] + s["fifo_overflow"] + s["pending_map_full"], s
    assert s["pending_pushed"] - s["pending_popped"] == live, s
    assert s["pending_popped"] == s["events"] + s["ringbuf_full"] + s["requests_evicted"], s
    # no map or ring buffer is anywhere near full here: nothing may be lost
    assert s["requests_evicted"] == s["ringbuf_full"] == s["pending_map_full"] == 0, s
    assert s["conn_map_full"] == 0, s


def check_events(h, builder: RecordBuilder) -> int:
    """Every event is a whole, valid request: a known method, a request-target
    of at most MAX_URL_LEN bytes that ends before its first space (the record
    gives it back byte for byte), a final status (101, 200-599) or an
    unanswered reason, never both, and times in order."""
    n = 0
    for raw in h.rb.consume():
        ev = abi.decode_event(raw)
        assert ev is not None, f"short event: {len(raw)} bytes"
        e = abi.Event(*ev)
        assert 1 <= e.method < len(abi.METHODS), e.method
        assert e.url_len <= abi.MAX_URL_LEN, e.url_len
        url = e.url[:e.url_len]
        assert b" " not in url, url
        if e.flags & abi.EV_UNANSWERED:
            assert e.status == 0 and 1 <= e.reason < len(abi.REASONS), (e.status, e.reason)
        else:
            assert e.reason == 0 and (e.status == 101 or 200 <= e.status <= 599), e.status
        assert e.resp_ns >= e.req_ns, (e.req_ns, e.resp_ns)
        if e.flags & abi.EV_RESP_END:
            assert e.resp_last_ns >= e.resp_ns, (e.resp_ns, e.resp_last_ns)
        rec = builder.build(ev)
        assert rec["http.request.method"] == abi.METHODS[e.method]
        back = rec["url.path"] + ("?" + rec["url.query"] if "url.query" in rec else "")
        if _utf8(url):  # (other bytes are escaped: pipeline/record.py _text)
            assert back.encode() == url, (back, url)
        assert rec["duration_ms"] == (e.resp_ns - e.req_ns) // 1000 / 1000
        n += 1
    return n


def _utf8(b: bytes) -> bool:
    try:
        b.decode()
        return True
    except UnicodeDecodeError:
        return False


def reset_all(h) -> int:
    """A client RST on every tracked connection: everything pending is
    reported, both maps end empty."""
    for key, _ in list(h.t.connections()):
        c, s = bytes(key.caddr), bytes(key.saddr)
        v4 = c[:12] == b"\0" * 10 + b"\xff\xff"
        cip = str(ipaddress.ip_address(c[12:] if v4 else c))
        sip = str(ipaddress.ip_address(s[12:] if v4 else s))
        assert h.req(frame(cip, sip, key.cport, key.sport, b"", 0, 0, P.RST)) == UNSPEC
    assert list(h.t.conns.keys()) == [], "connections left after RST"
    assert list(h.t.pending.keys()) == [], "pending requests left after RST"
    s = h.t.stats()
    return s["events"]


def finish(h) -> None:
    """The checks after a sequence: state, events, then a reset of every
    connection accounts for every request that was queued."""
    builder = RecordBuilder()
    for name, v in h.stats().items():  # what the examples reach (--hypothesis-show-statistics)
        event(name)
    check_state(h)
    got = check_events(h, builder)
    total = reset_all(h)
    got += check_events(h, builder)
    assert got == total, f"{got} events read, the kernel counted {total}"
    s = h.t.stats()
    assert s["pending_pushed"] == s["pending_popped"] == s["events"], s


def run_sequence(h, segs: list[dict]) -> None:
    conns = Conns()
    for seg in segs:
        run(h.req if seg["to_server"] else h.resp, build(seg, conns))
    finish(h)


# -- properties -------------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_fuzz_segments_both_programs(h, limit, data):
    h.reset(ENDPOINTS)
    segs = data.draw(st.lists(segment(limit), min_size=1, max_size=40))
    run_sequence(h, segs)


@FUZZ
@given(data=st.data())
def test_fuzz_one_connection_in_order(h, limit, data):
    """One connection, mostly in order: gets deep into framing states."""
    h.reset(ENDPOINTS)
    server, client = SERVERS[0], CLIENTS[4][0]
    segs = [dict(s, server=server, client=client, mutation=None,
                 mode="next" if s["mode"] != "retx" else "retx",
                 flags=P.PSH | P.ACK if s["flags"] & (P.RST | P.SYN) else s["flags"])
            for s in data.draw(st.lists(segment(limit), min_size=1, max_size=60))]
    run_sequence(h, segs)


@FUZZ
@given(data=st.data())
def test_fuzz_conversations(h, limit, data):
    """Pipelined exchanges with hostile heads and framing, cut at random
    places, with retransmits and gaps: deep into every framing state."""
    h.reset(ENDPOINTS)
    ends = {True: ("198.18.0.20", 40000), False: ("198.18.0.10", 80)}
    if data.draw(st.booleans()):
        ends = {True: ("2001:db8::20", 40000), False: ("2001:db8::10", 80)}
    seq = {True: data.draw(st.integers(0, U32 - 1)), False: data.draw(st.integers(0, U32 - 1))}
    last: dict = {}
    for to_server, chunk, mode in data.draw(conversation(limit)):
        prog = h.req if to_server else h.resp
        if mode == "gap":  # this segment is lost
            seq[to_server] += len(chunk)
            continue
        if mode == "retx" and to_server in last:
            run(prog, last[to_server])
        src, dst = ends[to_server], ends[not to_server]
        f = frame(src[0], dst[0], src[1], dst[1], chunk, seq[to_server], seq[not to_server])
        run(prog, f)
        last[to_server] = f
        seq[to_server] += len(chunk)
    finish(h)


@FUZZ
@given(data=st.data())
def test_fuzz_arbitrary_frames(h, limit, data):
    """Any bytes as a frame, from the smallest the kernel test-runs (an
    Ethernet header) to the largest, and real headers with random tails."""
    h.reset(ENDPOINTS)
    for _ in range(data.draw(st.integers(1, 20))):
        head = data.draw(st.sampled_from([
            b"", P.ETH + b"\x08\x00", P.ETH + b"\x86\xdd", P.ETH + b"\x81\x00",
            frame("198.18.0.20", "198.18.0.10", 40000, 80)[:34],
            frame("2001:db8::20", "2001:db8::10", 40000, 80)[:54],
            frame("198.18.0.20", "198.18.0.10", 40000, 80, b"GET / HTTP/1.1\r\n")]))
        tail = data.draw(st.binary(max_size=200))
        f = (head + tail)[:limit]
        if len(f) < 14:
            f = f.ljust(14, b"\0")
        run(h.req if data.draw(st.booleans()) else h.resp, f)
    check_state(h)
    check_events(h, RecordBuilder())


# -- frame sizes (deterministic) ----------------------------------------------------
def test_frame_size_limit(tracer, limit):
    """What BPF_PROG_TEST_RUN takes for an skb program: from ETH_HLEN (14)
    to a page less headroom and skb_shared_info. Smaller and larger frames are
    refused by the kernel (EINVAL) before the program runs."""
    assert 1514 <= limit < 4096
    for n in (0, 1, 13, limit + 1, 65536):
        with pytest.raises(BpfError, match="EINVAL"):
            tracer.req.test_run(bytes(n))
    ret, out, _ = tracer.req.test_run(bytes(14))
    assert ret == UNSPEC and out == bytes(14)


@pytest.mark.parametrize("tot_len", [None, 0, 65535])
@pytest.mark.parametrize("v6", [False, True])
def test_largest_frame_with_gso_lengths_traced(h, limit, tot_len, v6):
    """A request head in the largest frame, its IP length saying 64 kB (or 0,
    as GSO packets on veths do): traced, unchanged, paired."""
    h.reset(ENDPOINTS)
    cip, sip = ("2001:db8::20", "2001:db8::10") if v6 else ("198.18.0.20", "198.18.0.10")
    hdr = 14 + (40 if v6 else 20) + 20
    size = 65536  # the body: a 64 kB GSO segment's worth
    msg = b"POST /big HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size + b"b" * size
    seq, first = 1000, msg[:limit - hdr]
    f = frame(cip, sip, 40000, 80, first, seq, 1, tot_len=tot_len)
    assert len(f) == limit and h.req(f) == UNSPEC
    for off in range(len(first), len(msg), limit - hdr):  # the rest of the body
        part = msg[off:off + limit - hdr]
        assert h.req(frame(cip, sip, 40000, 80, part, seq + off, 1, tot_len=tot_len)) == UNSPEC
    assert h.resp(frame(sip, cip, 80, 40000, P.response(201), 1, seq + len(msg))) == UNSPEC
    evs = h.events()
    assert [(e["url"], e["status"], e["req_body"]) for e in evs] == [(b"/big", 201, size)]


def test_truncated_frames(h):
    """Cut anywhere: inside the IP or TCP header nothing is tracked; inside
    the payload the request start that is there is (the IP length is
    clamped to the frame), and the state stays consistent."""
    h.reset(ENDPOINTS)
    for src, dst in (("198.18.0.20", "198.18.0.10"), ("2001:db8::20", "2001:db8::10")):
        full = frame(src, dst, 40000, 80, b"GET /t HTTP/1.1\r\n\r\n", 1, 1)
        tcp_end = min_frame(full) + 20
        before = (list(h.t.conns.keys()), h.stats())
        for n in range(14, tcp_end):
            run(h.req, full[:n])
        assert (list(h.t.conns.keys()), h.stats()) == before
        for n in range(tcp_end, len(full) + 1):
            run(h.req, full[:n])
            check_state(h)
    assert h.stats()["requests"] == 2  # one per connection: the cut starts were retransmits
    reset_all(h)


@pytest.mark.parametrize("mut", [dict(vlan=[(0x8100, 5)]), dict(vlan=[(0x88A8, 1), (0x8100, 2)]),
                                 dict(frag_off=0x2000), dict(frag_off=0x0010)])
def test_vlan_tagged_and_fragments_pass_untraced(h, mut):
    """Tagged frames (skb->protocol is the VLAN ethertype) and IP fragments
    are not parsed: passed on, unchanged, no state."""
    h.reset(ENDPOINTS)
    c = ("198.18.0.20", "198.18.0.10", 40000, 80)
    assert h.req(frame(*c, P.get("/v"), 1, 1, **mut)) == UNSPEC
    assert list(h.t.conns.keys()) == []
    assert h.stats() == {}


def test_ipv4_options_are_skipped(h):
    h.reset(ENDPOINTS)
    opts = bytes([0x94, 4, 0, 0]) + bytes([1]) * 36  # router alert + NOPs: ihl 15
    get = P.get("/opts")
    req = frame("198.18.0.20", "198.18.0.10", 40000, 80, get, 1000, 1, ip_opts=opts)
    assert h.req(req) == UNSPEC
    resp = frame("198.18.0.10", "198.18.0.20", 80, 40000, P.response(200), 1, 1000 + len(get),
                 ip_opts=opts)
    assert h.resp(resp) == UNSPEC
    assert [(e["url"], e["status"]) for e in h.events()] == [(b"/opts", 200)]


@pytest.mark.parametrize("ext", [(0,), (60,), (43,), (0, 60), (44,)])
def test_ipv6_extension_headers_pass_untraced(h, ext):
    """IPv6 with extension headers is not followed (documented): passed on
    unchanged and leaves no state."""
    h.reset(ENDPOINTS)
    f = frame("2001:db8::20", "2001:db8::10", 40000, 80, P.get("/x"), 1, 1, v6_ext=ext)
    assert h.req(f) == UNSPEC
    assert list(h.t.conns.keys()) == [] and h.stats() == {}


# -- found by the floods (tests/e2e/test_floods.py) ----------------------------------
def test_more_messages_in_a_segment_than_steps_never_mispair(h):
    """More pipelined messages in one (GSO-sized) segment than the kernel
    follows (MAX_STEPS_PER_SEG): the stream loses sync there; what the
    server answers next must never be paired with a later request (the
    connection is given up, its pending requests reported as lost)."""
    c = P.Conn()
    reqs = [b"GET /r%d HTTP/1.1\r\n\r\n" % i for i in range(105)]
    h.req(c.req(b"".join(reqs[:100])))   # one segment, 100 requests
    h.req(c.req(b"".join(reqs[100:])))   # the next one starts at a message boundary
    for i in range(0, 105, 35):          # the server answers each, in order
        h.resp(c.resp(b"".join(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % (200 + j)
                               for j in range(i, min(i + 35, 105)))))
    # the first MAX_STEPS_PER_SEG requests are queued, in order; then the
    # segment is cut short (parse_failed), the pipelining connection given up:
    # the queued ones reported lost when the next response arrives, the rest
    # (and every response) not followed any more
    steps = 96  # MAX_STEPS_PER_SEG (src/bpf/redtap.h)
    evs = [(e["url"], e["status"], abi.REASONS[e["reason"]]) for e in h.events()]
    assert evs == [(b"/r%d" % i, 0, "lost") for i in range(steps)], evs[:4]
    assert h.stats() == {"traced_segments": 5, "requests": steps, "events": steps,
                         "pending_pushed": steps, "pending_popped": steps, "unanswered": steps,
                         "resync_dropped": steps, "parse_failed": 1,
                         "connections_given_up": 1}, h.stats()

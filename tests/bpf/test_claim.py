"""One CPU at a time walks a direction of a connection (claim() in
redtap.bpf.c). BPF_PROG_TEST_RUN runs on one CPU, so the other CPU's claim is
written into the map by hand: its segment must be skipped and counted, never
walked at the same time; the next segment then sees the gap."""
from pyloader.kernel import abi

from support import packets as P


def only_conn(h):
    ((k, v),) = h.t.conns.items()
    return k, abi.ConnState.from_buffer_copy(v)


def set_busy(h, side: str, value: int) -> None:
    k, st = only_conn(h)
    getattr(st, side).busy = value
    h.t.conns.update(k, bytes(st))


def test_a_segment_of_a_direction_another_cpu_walks_is_skipped_and_counted(h):
    c = P.Conn()
    h.req(c.req(P.get("/a")))
    set_busy(h, "resp", 1)
    before = only_conn(h)[1]
    h.resp(c.resp(P.response(200)))
    after = only_conn(h)[1]
    assert bytes(after) == bytes(before), "the response side was walked while busy"
    assert h.stats()["concurrent_segments"] == 1 and h.events() == []


def test_the_other_direction_is_not_held_up(h):
    c = P.Conn()
    h.req(c.req(P.get("/a")))
    set_busy(h, "resp", 1)
    h.req(c.req(P.get("/b")))  # the request side is free
    assert h.stats()["requests"] == 2 and "concurrent_segments" not in h.stats()


def test_after_the_claim_is_released_the_skipped_bytes_are_a_gap(h):
    c = P.Conn()
    h.req(c.req(P.get("/a")))
    h.resp(c.resp(P.response(200)))
    h.req(c.req(P.get("/b") + P.get("/c")))
    set_busy(h, "resp", 1)
    h.resp(c.resp(P.response(202)))   # /b's answer: skipped
    set_busy(h, "resp", 0)
    h.resp(c.resp(P.response(203)))   # /c's, after the hole
    evs = {e["url"]: e for e in h.events()}
    s = h.stats()
    assert s["concurrent_segments"] == 1 and s["gaps"] == 1
    assert evs[b"/a"]["status"] == 200
    assert evs[b"/b"]["flags"] & abi.EV_UNANSWERED and evs[b"/c"]["flags"] & abi.EV_UNANSWERED
    assert 203 not in (e["status"] for e in evs.values()), "paired across the hole"


def test_a_walk_leaves_the_claim_released(h):
    c = P.Conn()
    h.req(c.req(P.get("/a")))
    h.resp(c.resp(P.response(200, body=b"x" * 10)[:30]))  # a head in progress
    _, st = only_conn(h)
    assert st.req.busy == 0 and st.resp.busy == 0


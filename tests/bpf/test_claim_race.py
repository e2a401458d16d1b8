"""The claim (claim.bpf.h) under real concurrency: two threads, each pinned
to its own CPU, run BPF_PROG_TEST_RUN (ctypes releases the GIL during the
call) on two consecutive segments of one direction of one connection,
started together by a barrier, many rounds: one flow's packets reaching the
hook on two CPUs at once (tests/bpf/test_claim.py sets the busy flag by hand
instead). The thread the barrier lets go first (the last to arrive: the
other is woken, tens of microseconds later) takes the earlier segment, whose
walk (60 messages) lasts about as long: the later segment's CPU often comes
while it is walked.

One walk at a time, whatever the timing. Each round must end in one of the
correct outcomes, each checked exactly (counters and the full event list):
both segments walked in order (the later one's CPU spun on the claim, or, if
it came first, waited for the earlier segment: reordered_segments); the later
one skipped because the claim stayed busy longer than its CPU spins
(concurrent_segments); the wait for the earlier one timed out (a gap: the
pipelining connection given up, its requests reported lost). Two walks at
once would interleave the FIFO's pushes or pops: requests out of order or
paired with another's response."""
from __future__ import annotations

import os
import threading
from collections import Counter

import pytest

from pyloader.kernel import abi

from support import packets as P

CPUS = sorted(os.sched_getaffinity(0))[:2]
ROUNDS = 1000      # rounds at least, every one checked exactly
MAX_ROUNDS = 8000  # more while the scheduler has not yet run both CPUs at once
PER_SEG = 60  # messages per raced segment: 2 + 2 * 60 pending fit MAX_PIPELINE
UNSPEC = 0xFFFFFFFF

pytestmark = pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs")


def race(prog, frames: tuple[bytes, bytes]) -> None:
    """Two threads pinned to the two CPUs, released together: the one let go
    first runs frames[0], the other frames[1]."""
    barrier = threading.Barrier(2, timeout=30)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            os.sched_setaffinity(0, {CPUS[i]})  # this thread only
            assert os.sched_getaffinity(0) == {CPUS[i]}
            # 1: the last to arrive, which releases the other and runs on
            f = frames[0] if barrier.wait() == 1 else frames[1]
            ret, out, _ = prog.test_run(f)
            assert ret == UNSPEC and out == f, "the program changed the packet"
        except BaseException as e:  # noqa: BLE001 - raised in the test below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def status_of(i: int) -> int:
    return 200 + i  # the i-th request's answer: a response paired with another shows


def requests(paths: list[bytes]) -> bytes:
    return b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % p for p in paths)


def responses(first: int, n: int) -> bytes:
    return b"".join(P.response(status_of(i), body=b"") for i in range(first, first + n))


def events(h) -> list[tuple]:
    return [(e["url"], e["status"], abi.REASONS[e["reason"]]) for e in h.events()]


def raced(outcomes: Counter) -> int:
    """The kernel's own sign that both CPUs were in the program on this
    direction at once, in some rounds: a CPU skipped its segment because the
    other held the claim, or waited for the other's segment."""
    return outcomes["the later skipped"] + outcomes["both walked, the later first and waiting"]


def enough(r: int, outcomes: Counter) -> bool:
    return r + 1 >= ROUNDS and raced(outcomes) > 0


def assert_raced(outcomes: Counter) -> None:
    if not raced(outcomes):  # every round was exact, but none tested the claim
        pytest.skip(f"the scheduler never ran both CPUs at once in {MAX_ROUNDS} rounds: "
                    f"{dict(outcomes)}")


def test_one_request_stream_walked_on_two_cpus_at_once(h):
    outcomes = Counter()
    for r in range(MAX_ROUNDS):
        c = P.Conn(client=("198.18.0.30", 10000 + r))
        opening = [b"/r%d-o%d" % (r, i) for i in range(2)]
        h.req(c.req(requests(opening)))  # pipelining from the start
        raced = [[b"/r%d-%d-%d" % (r, s, j) for j in range(PER_SEG)] for s in range(2)]
        segs = (c.req(requests(raced[0])), c.req(requests(raced[1])))
        before = h.t.stats()
        race(h.t.req, segs)
        d = delta(h.t.stats(), before)
        paths = opening + raced[0] + raced[1]
        for i in range(0, len(paths), PER_SEG):  # the answers, one CPU
            h.resp(c.resp(responses(i, min(PER_SEG, len(paths) - i))))
        h.req(c.req(b"", flags=P.RST))
        evs = events(h)
        walked = {"traced_segments": 2, "requests": 2 * PER_SEG, "pending_pushed": 2 * PER_SEG}
        skipped = {"traced_segments": 2, "requests": PER_SEG, "pending_pushed": PER_SEG,
                   "concurrent_segments": 1}
        timed_out = {"traced_segments": 2, "gaps": 1, "connections_given_up": 1}
        answered = [(p, status_of(i), "") for i, p in enumerate(paths)]
        if d == walked:
            outcomes["both walked"] += 1
            assert evs == answered, (r, evs[:4])
        elif d == dict(walked, reordered_segments=1):
            outcomes["both walked, the later first and waiting"] += 1
            assert evs == answered, (r, evs[:4])
        elif d == skipped:
            outcomes["the later skipped"] += 1
            assert evs == answered[:2 + PER_SEG], (r, evs[:4])
        elif d in (dict(timed_out, retransmits=1), dict(timed_out, concurrent_segments=1)):
            outcomes["the wait timed out"] += 1
            assert evs == [(p, 0, "lost") for p in opening], (r, evs[:4])
        else:
            pytest.fail(f"round {r}: counters of the raced segments {d}; events {evs[:4]}...")
        if enough(r, outcomes):
            break
    print(f"\nrequest stream, {sum(outcomes.values())} rounds: {dict(outcomes)}")
    assert_raced(outcomes)


def test_one_response_stream_walked_on_two_cpus_at_once(h):
    outcomes = Counter()
    n = 2 + 2 * PER_SEG
    for r in range(MAX_ROUNDS):
        c = P.Conn(client=("198.18.0.31", 10000 + r))
        paths = [b"/r%d-%d" % (r, i) for i in range(n)]
        for i in range(0, n, PER_SEG):  # the requests, one CPU: pipelined
            h.req(c.req(requests(paths[i:i + PER_SEG])))
        half = n // 2
        segs = (c.resp(responses(0, half)), c.resp(responses(half, n - half)))
        before = h.t.stats()
        race(h.t.resp, segs)
        d = delta(h.t.stats(), before)
        h.req(c.req(b"", flags=P.RST))
        evs = events(h)
        walked = {"traced_segments": 2, "responses": n, "events": n, "pending_popped": n}
        skipped = {"traced_segments": 2, "responses": half, "events": half,
                   "pending_popped": half, "concurrent_segments": 1}
        timed_out = {"traced_segments": 2, "gaps": 1, "connections_given_up": 1, "events": n,
                     "unanswered": n, "pending_popped": n, "resync_dropped": n}
        answered = [(p, status_of(i), "") for i, p in enumerate(paths)]
        if d == walked:
            outcomes["both walked"] += 1
            assert evs == answered, (r, evs[:4])
        elif d == dict(walked, reordered_segments=1):
            outcomes["both walked, the later first and waiting"] += 1
            assert evs == answered, (r, evs[:4])
        elif d == skipped:
            outcomes["the later skipped"] += 1
            assert evs == answered[:half] + [(p, 0, "reset") for p in paths[half:]], (r, evs[:4])
        elif d in (dict(timed_out, retransmits=1), dict(timed_out, concurrent_segments=1)):
            outcomes["the wait timed out"] += 1
            assert evs == [(p, 0, "lost") for p in paths], (r, evs[:4])
        else:
            pytest.fail(f"round {r}: counters of the raced segments {d}; events {evs[:4]}...")
        if enough(r, outcomes):
            break
    print(f"\nresponse stream, {sum(outcomes.values())} rounds: {dict(outcomes)}")
    assert_raced(outcomes)

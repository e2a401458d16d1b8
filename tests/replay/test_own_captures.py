"""`redtap replay` of the project's own captures (tests/captures/, taken by
tests/e2e/test_tcp_realism.py with REDTAP_SAVE_CAPTURES=tests/captures)
against tshark's dissector: same requests and pairing, first and last byte
times of every request within 2 µs.

Replay takes each packet's time from the capture, so the only differences
from tshark's are roundings: tshark writes pcapng with nanosecond times,
replay rounds each to the microsecond (up to 0.5 µs at each end of a
duration), and the truth's epoch times are doubles (steps of 0.24 µs at
today's epoch). Measured: at most 1.5 µs. A record timed from another
segment is off by that segment's distance."""
from __future__ import annotations

import glob
import json
import os

import pytest

from pyloader.tools.replay import replay
from support.tshark_view import compare, truth

ROUNDING_MS = 0.002
CAPTURES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "captures", "*.pcap")))


@pytest.mark.parametrize("pcap", CAPTURES, ids=[os.path.basename(p) for p in CAPTURES])
def test_replay_of_own_capture_agrees_with_tshark(pcap, tmp_path):
    out = str(tmp_path / "replay.log")
    counters = replay(pcap, None, out)
    with open(out) as f:
        recs = [json.loads(l) for l in f if l.strip()]
    res = compare(recs, truth(pcap))
    assert not res["problems"], res["problems"][:5]
    assert res["pairs"] >= 1 and len(recs) == res["pairs"]
    assert len(res["first_ms"]) == res["pairs"], "a pair without a first-byte time"
    for end in ("first", "last"):
        off = [ms for ms in res[end + "_ms"] if ms > ROUNDING_MS]
        assert not off, f"{end} byte: {len(off)} requests off by more than rounding " \
                        f"(ms, worst last): {off[-5:]}"
    assert counters["requests"] == len(recs), counters


def test_own_captures_are_there():
    assert len(CAPTURES) >= 6, "regenerate: REDTAP_SAVE_CAPTURES=tests/captures make test-e2e"

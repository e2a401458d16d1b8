"""`redtap replay` of the project's own captures (tests/captures/, taken by
tests/e2e/test_tcp_realism.py with REDTAP_SAVE_CAPTURES=tests/captures)
against tshark's dissector: same requests and pairing, first and last byte
times within 100 µs (p99)."""
from __future__ import annotations

import glob
import json
import os

import pytest

from pyloader.tools.replay import replay
from support.tshark_view import compare, p99, truth

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
    assert p99(res["first_ms"]) <= 0.1 and p99(res["last_ms"]) <= 0.1
    assert counters["requests"] >= len(recs)


def test_own_captures_are_there():
    assert len(CAPTURES) >= 6, "regenerate: REDTAP_SAVE_CAPTURES=tests/captures make test-e2e"

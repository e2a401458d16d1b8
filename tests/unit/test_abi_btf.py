"""The ctypes mirror in pyloader/kernel/abi.py against the BTF of the built object:
same structures, sizes, field offsets and enum values (so C and Python
cannot drift)."""
from __future__ import annotations

import ctypes
import json
import subprocess

import pytest

from pyloader.kernel import abi
from pyloader.kernel.tracer import find_object


@pytest.fixture(scope="module")
def btf():
    out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", find_object()],
                         check=True, capture_output=True, text=True).stdout
    types = json.loads(out)["types"]
    return {(t["kind"], t.get("name")): t for t in types if t.get("name") not in (None, "(anon)")}


MIRRORS = {
    "http_event": abi.HttpEvent, "conn_key": abi.ConnKey, "conn_state": abi.ConnState,
    "stream_state": abi.StreamState, "pending_req": abi.PendingReq, "req_key": abi.ReqKey,
    "endpoint_key": abi.EndpointKey, "settings": abi.Settings,
}


@pytest.mark.parametrize("cname", sorted(MIRRORS))
def test_struct_layout_matches_btf(btf, cname):
    py = MIRRORS[cname]
    t = btf[("STRUCT", cname)]
    assert ctypes.sizeof(py) == t["size"], f"sizeof({cname})"
    c_fields = [(m["name"], m["bits_offset"] // 8) for m in t["members"]]
    py_fields = [(name, getattr(py, name).offset) for name, *_ in py._fields_]
    assert py_fields == c_fields


def test_stat_indices_match_btf(btf):
    values = {v["name"]: v["val"] for v in btf[("ENUM", "stat_idx")]["values"]}
    assert values.pop("S_NR") == len(abi.STAT_TABLE)
    assert {enum: i for i, (_, enum) in enumerate(abi.STAT_TABLE)} == values


def test_methods_match_btf(btf):
    values = {v["name"]: v["val"] for v in btf[("ENUM", "http_method")]["values"]}
    names = ["M_UNKNOWN"] + ["M_" + m for m in abi.METHODS[1:-1]] + ["M_OTHER"]
    assert values == {n: i for i, n in enumerate(names)}
    assert values["M_OTHER"] == abi.M_OTHER


def test_reasons_match_btf(btf):
    values = {v["name"]: v["val"] for v in btf[("ENUM", "unanswered_reason")]["values"]}
    assert values == {"R_NONE": 0, "R_RESET": 1, "R_SERVER_FIN": 2, "R_IDLE": abi.R_IDLE,
                      "R_LOST": abi.R_LOST}
    assert len(abi.REASONS) == len(values)


def test_fast_decoder_matches_ctypes_mirror():
    ev = abi.HttpEvent(req_ns=1, resp_ns=2, status=404, url_len=3, method=2, version=11,
                       flags=5, reason=1, ifindex=7, url=b"/ab")
    ev.conn.caddr[:] = bytes(range(16))
    ev.conn.saddr[:] = bytes(range(16, 32))
    ev.conn.cport, ev.conn.sport = 40000, 80
    got = dict(zip(abi.EVENT_FIELDS, abi.decode_event(bytes(ev))))
    assert got["req_ns"] == 1 and got["resp_ns"] == 2 and got["status"] == 404
    assert got["caddr"] == bytes(range(16)) and got["saddr"] == bytes(range(16, 32))
    assert (got["cport"], got["sport"]) == (40000, 80)
    assert (got["url_len"], got["method"], got["version"], got["flags"], got["reason"],
            got["ifindex"]) == (3, 2, 11, 5, 1, 7)
    assert got["url"][:3] == b"/ab"


def test_short_record_is_rejected_not_raised():
    assert abi.decode_event(b"\x00" * (abi.EVENT_SIZE - 1)) is None


def test_endpoint_flags_match_btf(btf):
    values = {v["name"]: v["val"] for v in btf[("ENUM", "endpoint_flags")]["values"]}
    assert values == {"EP_TRACED": abi.EP_TRACED, "EP_PORT": abi.EP_PORT, "EP_HOST": abi.EP_HOST}

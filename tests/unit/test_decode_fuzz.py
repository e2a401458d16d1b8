"""Fuzzing the Python side of an event: whatever bytes come out of the ring
buffer (or a map), decoding and record building never raise, and the log
gets exactly one valid JSON line per record with only documented fields.

The kernel fills events from packet bytes (url, method_name) and from its
own state (sizes, lengths, flags); a bug there, or a future ABI mismatch,
must give a counted bad event or an odd-looking record, never a dead agent.
"""
from __future__ import annotations

import json
import os
import re
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyloader.kernel import abi
from pyloader.output.accesslog import AccessLog
from pyloader.pipeline.record import RecordBuilder
from pyloader.output.metrics import RedAggregate, RedCollector
from pyloader.pipeline.redact import Redactor
from pyloader.pipeline.routes import RouteComponent, RouteTable

# every field a record may have (README "Access-log schema") and its type
SCHEMA = {
    "time": str, "client.address": str, "client.port": int, "server.address": str,
    "server.port": int, "http.request.method": str, "http.request.method_original": str,
    "url.path": str, "url.query": str, "url.truncated": bool,
    "network.protocol.version": str, "http.response.status_code": int,
    "duration_ms": float, "response.duration_ms": float, "http.request.body.size": int,
    "http.response.body.size": int, "error.type": str, "http.route": str,
}
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
FUZZ = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def check_record(rec: dict) -> None:
    assert set(rec) <= set(SCHEMA), set(rec) - set(SCHEMA)
    for k, v in rec.items():
        assert type(v) is SCHEMA[k], (k, v)
    assert TIME.match(rec["time"]), rec["time"]
    assert 0 <= rec["client.port"] < 65536 and 0 <= rec["server.port"] < 65536
    assert rec["http.request.method"] in abi.METHODS[1:]
    assert rec["duration_ms"] >= 0
    assert ("http.response.status_code" in rec) != ("error.type" in rec)


def render(tmp_path_factory, recs: list[dict]) -> list[bytes]:
    path = os.path.join(tmp_path_factory.mktemp("log"), "a.log")
    log = AccessLog(path)
    for r in recs:
        log.record(r)
    log.close()
    with open(path, "rb") as f:
        data = f.read()
    assert data.endswith(b"\n") or not recs
    return data.split(b"\n")[:-1]


# -- sizes -------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=2 * abi.EVENT_SIZE))
def test_decode_any_length_never_raises(raw):
    ev = abi.decode_event(raw)
    if len(raw) < abi.EVENT_SIZE:
        assert ev is None  # counted as bad_events by the agent
    else:
        assert len(ev) == len(abi.EVENT_FIELDS)


def test_decode_exact_boundary():
    assert abi.decode_event(bytes(abi.EVENT_SIZE - 1)) is None
    assert abi.decode_event(bytes(abi.EVENT_SIZE)) is not None
    assert abi.decode_event(b"") is None


# -- whole events of random bytes -------------------------------------------
@FUZZ
@given(st.binary(min_size=abi.EVENT_SIZE, max_size=abi.EVENT_SIZE))
def test_random_event_bytes_build_a_valid_record(tmp_path_factory, raw):
    rec = RecordBuilder().build(abi.decode_event(raw))
    check_record(rec)
    (line,) = render(tmp_path_factory, [dict(rec)])
    assert json.loads(line) == rec


# -- events with hostile strings and extreme numbers -------------------------
u64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63, 2**64 - 1]))
HOSTILE = [b'"', b"\\", b"\n", b"\r\n", b"\x00", b"\x1b[31m", b"\xff\xfe", b"\xc3(",
           b"\xed\xa0\x80", b'","http.response.status_code":500,"x":"', b"}\n{",
           b"\\u0000", b"\\\"", b"\xe2\x80\xa8", b"%00" * 90]
hostile = st.one_of(st.binary(max_size=300),
                    st.lists(st.sampled_from(HOSTILE), max_size=12).map(b"".join))


@st.composite
def events(draw):
    url = draw(hostile)[:abi.MAX_URL_LEN]
    name = draw(hostile)[:abi.METHOD_NAME_LEN]
    fields = dict(
        req_ns=draw(u64), resp_ns=draw(u64), resp_last_ns=draw(u64),
        req_body=draw(u64), resp_body=draw(u64),
        caddr=draw(st.binary(min_size=16, max_size=16)),
        saddr=draw(st.sampled_from([b"\x00" * 10 + b"\xff\xff" + bytes(4), bytes(16),
                                    b"\xff" * 16])),
        cport=draw(st.integers(0, 65535)), sport=draw(st.integers(0, 65535)),
        status=draw(st.integers(0, 65535)),
        url_len=draw(st.one_of(st.integers(0, 65535), st.just(len(url)))),
        method=draw(st.integers(0, 255)), version=draw(st.integers(0, 255)),
        flags=draw(st.integers(0, 255)), reason=draw(st.integers(0, 255)),
        ifindex=draw(st.integers(0, 2**32 - 1)),
        method_name=name.ljust(abi.METHOD_NAME_LEN, b"\0"),
        url=url.ljust(abi.MAX_URL_LEN, b"\0"))
    # through the wire format, as the ring buffer delivers it
    raw = abi.EVENT_STRUCT.pack(*(fields[f] for f in abi.EVENT_FIELDS))
    return raw, fields


@FUZZ
@given(st.lists(events(), min_size=1, max_size=5))
def test_hostile_events_one_json_line_each_nothing_forged(tmp_path_factory, evs):
    builder, redact, routes = RecordBuilder(), Redactor(), RouteComponent(RouteTable())
    recs = []
    for raw, fields in evs:
        rec = builder.build(abi.decode_event(raw))
        redact.process(rec)
        routes.process(rec)
        check_record(rec)
        kept = fields["url"][:min(fields["url_len"], abi.MAX_URL_LEN)]
        if b"?" not in kept:
            assert "url.query" not in rec
        recs.append(rec)
    lines = render(tmp_path_factory, [dict(r) for r in recs])
    assert len(lines) == len(recs)  # no record split, none merged, none added
    for line, rec in zip(lines, recs):
        assert b"\r" not in line
        assert json.loads(line) == rec  # every field as built: none forged by the URL


@FUZZ
@given(st.lists(events(), min_size=1, max_size=5))
def test_metrics_fold_and_collect_hostile_records(evs):
    agg = RedAggregate()
    builder = RecordBuilder()
    batch = []
    for raw, _ in evs:
        rec = builder.build(abi.decode_event(raw))
        RouteComponent(agg.routes).process(rec)
        batch.append(rec)
    agg.fold(batch)
    samples = [s for m in RedCollector(agg).collect() for s in m.samples]
    assert samples


def test_8k_of_percent00_is_cut_and_flagged():
    url = b"/" + b"%00" * 2730  # what a client sent; the kernel keeps 256 bytes
    fields = (1, 2, 3, 0, 0, bytes(16), bytes(16), 1, 80, 200, abi.MAX_URL_LEN, 1, 11,
              abi.EV_URL_TRUNCATED, 0, 0, b"\0" * 16, url[:abi.MAX_URL_LEN])
    rec = RecordBuilder().build(abi.decode_event(abi.EVENT_STRUCT.pack(*fields)))
    assert rec["url.truncated"] is True and rec["url.path"] == url[:abi.MAX_URL_LEN].decode()


def test_event_struct_little_endian_layout_is_what_decode_reads():
    # guard for the fuzzers above: they pack with the same struct the agent reads with
    raw = abi.EVENT_STRUCT.pack(*range(1, 6), bytes(16), bytes(16), 7, 8, 9, 10, 11, 12, 13,
                                14, 15, b"m" * 16, b"u" * 256)
    assert struct.unpack_from("<Q", raw, 0) == (1,)
    assert dict(zip(abi.EVENT_FIELDS, abi.decode_event(raw)))["url_len"] == 10

"""Access-log records from events: exact fields, and always one valid JSON line."""
import json
import os

from hypothesis import given, settings, strategies as st

from pyloader.kernel import abi
from pyloader.output.accesslog import AccessLog

from pyloader.pipeline.record import RecordBuilder

V4 = b"\x00" * 10 + b"\xff\xff"


def ev(url=b"/a?b=c", status=200, flags=0, reason=0, method=1, version=11,
       req_ns=1_000_000_000, resp_ns=1_002_500_000):
    return (req_ns, resp_ns, resp_ns + 500_000, 0, 2, V4 + bytes([198, 18, 0, 20]),
            V4 + bytes([198, 18, 0, 10]), 40000, 80, status, len(url), method, version, flags,
            reason, 3, b"", url.ljust(abi.MAX_URL_LEN, b"\x00"))


def test_answered_record_has_exactly_the_documented_fields():
    rec = RecordBuilder().build(ev())
    assert list(rec) == ["time", "client.address", "client.port", "server.address",
                         "server.port", "http.request.method", "url.path", "url.query",
                         "network.protocol.version", "http.response.status_code",
                         "duration_ms"]
    assert rec["client.address"] == "198.18.0.20" and rec["server.port"] == 80
    assert rec["url.path"] == "/a" and rec["url.query"] == "b=c"
    assert rec["duration_ms"] == 2.5 and rec["http.response.status_code"] == 200


def test_unanswered_record():
    rec = RecordBuilder().build(ev(status=0, flags=abi.EV_UNANSWERED, reason=1))
    assert rec["error.type"] == "no_response" and "http.response.status_code" not in rec


def test_last_byte_and_body_sizes_only_when_known():
    rec = RecordBuilder().build(ev())
    assert "response.duration_ms" not in rec and "http.response.body.size" not in rec
    rec = RecordBuilder().build(ev(flags=abi.EV_RESP_END | abi.EV_RESP_BODY | abi.EV_REQ_BODY))
    assert rec["response.duration_ms"] == 3.0 and rec["duration_ms"] == 2.5
    assert rec["http.response.body.size"] == 2 and rec["http.request.body.size"] == 0


def test_truncated_flag_only_when_true():
    assert "url.truncated" not in RecordBuilder().build(ev())
    assert RecordBuilder().build(ev(flags=abi.EV_URL_TRUNCATED))["url.truncated"] is True


def test_time_is_rfc3339_utc_microseconds():
    b = RecordBuilder()
    rec = b.build(ev(), wall_ns=1_764_000_000_123_456_789)
    assert rec["time"] == "2025-11-24T16:00:00.123456Z"


@settings(max_examples=300, deadline=None)
@given(url=st.binary(max_size=abi.MAX_URL_LEN), method=st.integers(0, 255),
       version=st.integers(0, 255), flags=st.integers(0, 255), reason=st.integers(0, 255),
       status=st.integers(0, 65535))
def test_any_bytes_give_one_valid_json_line(tmp_path_factory, url, method, version, flags,
                                            reason, status):
    path = os.path.join(tmp_path_factory.mktemp("log"), "a.log")
    log = AccessLog(path)
    log.record(RecordBuilder().build(ev(url=url, method=method, version=version, flags=flags,
                                        reason=reason, status=status)))
    log.close()
    data = open(path, "rb").read()
    assert data.count(b"\n") == 1 and data.endswith(b"\n")
    rec = json.loads(data)
    assert isinstance(rec["url.path"], str)

"""From decoded events to JSON access-log lines (structlog + orjson).

One record per request, fields exactly:
  time, client.address, client.port, server.address, server.port,
  http.request.method, url.path, url.query (when present),
  url.truncated (when true), network.protocol.version,
  http.response.status_code (absent when unanswered), duration_ms,
  error.type ("no_response" when unanswered).
Lines are collected per batch and written whole (one write per batch).
"""
from __future__ import annotations

import ipaddress
import os
import sys
import time

import orjson
import structlog

from . import abi

_V4_PREFIX = b"\x00" * 10 + b"\xff\xff"


class AddressCache:
    """16-byte (v4-mapped) address -> text, cached (few distinct addresses)."""

    def __init__(self, limit: int = 65536):
        self._d: dict[bytes, str] = {}
        self.limit = limit

    def __call__(self, raw: bytes) -> str:
        s = self._d.get(raw)
        if s is None:
            if raw[:12] == _V4_PREFIX:
                s = "%d.%d.%d.%d" % tuple(raw[12:16])
            else:
                s = str(ipaddress.IPv6Address(raw))
            if len(self._d) >= self.limit:
                self._d.clear()
            self._d[raw] = s
        return s


class Clock:
    """bpf_ktime_get_ns (CLOCK_MONOTONIC) -> RFC 3339 UTC with microseconds."""

    def __init__(self):
        self._sec = -1
        self._prefix = ""
        self.sync()

    def sync(self) -> None:
        self.offset_ns = time.time_ns() - time.monotonic_ns()

    def wall_ns(self, mono_ns: int) -> int:
        return mono_ns + self.offset_ns

    def rfc3339(self, wall_ns: int) -> str:
        sec, ns = divmod(wall_ns, 1_000_000_000)
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return "%s.%06dZ" % (self._prefix, ns // 1000)


def _text(b: bytes) -> str:
    """Bytes from the wire as text: valid UTF-8 kept, anything else escaped."""
    try:
        return b.decode()
    except UnicodeDecodeError:
        return b.decode("utf-8", "backslashreplace")


VERSIONS = {10: "1.0", 11: "1.1"}


class RecordBuilder:
    """Decoded event tuple -> access-log record (a dict)."""

    def __init__(self, clock: Clock | None = None):
        self.clock = clock or Clock()
        self.addr = AddressCache()

    def build(self, ev: tuple, wall_ns: int | None = None, resp_wall_ns: int | None = None) -> dict:
        (req_ns, resp_ns, resp_last_ns, req_body, resp_body, caddr, saddr, cport, sport,
         status, url_len, method, version, flags, reason, _ifindex, method_name, url) = ev
        if wall_ns is None:
            wall_ns = self.clock.wall_ns(req_ns)
        raw_url = url[:min(url_len, abi.MAX_URL_LEN)]
        path, sep, query = raw_url.partition(b"?")
        rec = {
            "time": self.clock.rfc3339(wall_ns),
            "client.address": self.addr(caddr),
            "client.port": cport,
            "server.address": self.addr(saddr),
            "server.port": sport,
            "http.request.method": abi.METHODS[method] if 0 < method < len(abi.METHODS) else "_OTHER",
            "url.path": _text(path),
        }
        if method == abi.M_OTHER:  # OpenTelemetry: the name as sent, beside "_OTHER"
            rec["http.request.method_original"] = _text(method_name.split(b" ", 1)[0].rstrip(b"\0"))
        if sep:
            rec["url.query"] = _text(query)
        if flags & abi.EV_URL_TRUNCATED:
            rec["url.truncated"] = True
        v = VERSIONS.get(version)
        if v:
            rec["network.protocol.version"] = v
        unanswered = flags & abi.EV_UNANSWERED
        if not unanswered:
            rec["http.response.status_code"] = status
        rec["duration_ms"] = round((resp_ns - req_ns) / 1e6, 3) if resp_ns >= req_ns else 0.0
        if flags & abi.EV_RESP_END and resp_last_ns >= req_ns:
            rec["response.duration_ms"] = round((resp_last_ns - req_ns) / 1e6, 3)
        if flags & abi.EV_REQ_BODY:
            rec["http.request.body.size"] = req_body
        if flags & abi.EV_RESP_BODY:
            rec["http.response.body.size"] = resp_body
        if unanswered:
            rec["error.type"] = "response_not_seen" if reason == abi.R_LOST else "no_response"
        return rec


class LineBuffer:
    """structlog logger: collects rendered lines; flush() writes them whole."""

    def __init__(self, fd: int):
        self.fd = fd
        self.lines: list[bytes] = []

    def msg(self, message: bytes) -> None:
        self.lines.append(message)

    info = log = msg

    def flush(self) -> int:
        if not self.lines:
            return 0
        data = b"\n".join(self.lines) + b"\n"
        n = len(self.lines)
        self.lines.clear()
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        return n


def _drop_none_event(_logger, _name, event_dict):
    if event_dict.get("event", 0) is None:
        del event_dict["event"]
    return event_dict


class AccessLog:
    """The structlog pipeline writing JSON lines to a file or stdout."""

    def __init__(self, path: str | None):
        if path and path != "-":
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
            self.owns_fd = True
        else:
            self.fd = sys.stdout.fileno()
            self.owns_fd = False
        self.sink = LineBuffer(self.fd)
        self.log = structlog.wrap_logger(
            self.sink,
            processors=[_drop_none_event, structlog.processors.JSONRenderer(serializer=orjson.dumps)],
            wrapper_class=structlog.BoundLogger,
            cache_logger_on_first_use=True,
        )

    def record(self, rec: dict) -> None:
        self.log.info(None, **rec)

    def event(self, name: str, **fields) -> None:
        """A non-access-log line (counters, lifecycle): has an "event" key."""
        self.log.info(name, time=Clock().rfc3339(time.time_ns()), **fields)

    def flush(self) -> int:
        return self.sink.flush()

    def close(self) -> None:
        self.flush()
        if self.owns_fd:
            os.close(self.fd)

"""From a decoded event to its access-log record (a dict), the pipeline's first stage.

One record per request, fields exactly:
  time, client.address, client.port, server.address, server.port,
  http.request.method, url.path, url.query (when present),
  url.truncated (when true), network.protocol.version,
  http.response.status_code (absent when unanswered), duration_ms,
  error.type ("no_response" when unanswered).
"""
from __future__ import annotations

import ipaddress
import time

from pyloader.kernel import abi

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


def url_parts(url: bytes) -> tuple[str, str | None]:
    """A request-target's path and query (None: no '?') as text."""
    path, sep, query = url.partition(b"?")
    try:
        path = path.decode()
    except UnicodeDecodeError:
        path = _text(path)
    return path, _text(query) if sep else None


VERSIONS = {10: "1.0", 11: "1.1"}
METHOD_NAMES = {i: m for i, m in enumerate(abi.METHODS) if m}
EV_URL_TRUNCATED, EV_UNANSWERED = abi.EV_URL_TRUNCATED, abi.EV_UNANSWERED
EV_RESP_END, EV_REQ_BODY, EV_RESP_BODY = abi.EV_RESP_END, abi.EV_REQ_BODY, abi.EV_RESP_BODY


class RecordBuilder:
    """Decoded event tuple -> access-log record (a dict)."""

    def __init__(self, clock: Clock | None = None):
        self.clock = clock or Clock()
        self.addr = AddressCache()

    def build(self, ev: tuple, wall_ns: int | None = None) -> dict:
        """The record of one event; wall_ns: the request's wall-clock time
        (default: its kernel timestamp converted). The per-event hot path:
        plain local operations, no per-field helper calls on the usual path."""
        (req_ns, resp_ns, resp_last_ns, req_body, resp_body, caddr, saddr, cport, sport,
         status, url_len, method, version, flags, reason, _ifindex, method_name, url) = ev
        if wall_ns is None:
            wall_ns = req_ns + self.clock.offset_ns
        addr = self.addr
        path, query = url_parts(url[:url_len])
        rec = {
            "time": self.clock.rfc3339(wall_ns),
            "client.address": addr(caddr),
            "client.port": cport,
            "server.address": addr(saddr),
            "server.port": sport,
            "http.request.method": METHOD_NAMES.get(method, "_OTHER"),
            "url.path": path,
        }
        if method == abi.M_OTHER:  # OpenTelemetry: the name as sent, beside "_OTHER"
            rec["http.request.method_original"] = _text(method_name.split(b" ", 1)[0].rstrip(b"\0"))
        if query is not None:
            rec["url.query"] = query
        if flags & EV_URL_TRUNCATED:
            rec["url.truncated"] = True
        v = VERSIONS.get(version)
        if v:
            rec["network.protocol.version"] = v
        unanswered = flags & EV_UNANSWERED
        if not unanswered:
            rec["http.response.status_code"] = status
        # microsecond precision: whole microseconds, as milliseconds
        rec["duration_ms"] = (resp_ns - req_ns) // 1000 / 1000 if resp_ns >= req_ns else 0.0
        if flags & EV_RESP_END and resp_last_ns >= req_ns:
            rec["response.duration_ms"] = (resp_last_ns - req_ns) // 1000 / 1000
        if flags & EV_REQ_BODY:
            rec["http.request.body.size"] = req_body
        if flags & EV_RESP_BODY:
            rec["http.response.body.size"] = resp_body
        if unanswered:
            rec["error.type"] = "response_not_seen" if reason == abi.R_LOST else "no_response"
        return rec

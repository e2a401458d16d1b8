"""Access-log records to JSON lines (structlog + orjson), handed per batch,
whole, to the writer thread (output/logwriter.py)."""
from __future__ import annotations

import time

import orjson
import structlog

from pyloader.output.logwriter import QUEUE_LINES, LogWriter
from pyloader.pipeline.record import Clock


class LineBuffer:
    """structlog logger: collects rendered lines; flush() hands them, whole,
    to the writer thread (pyloader.output.logwriter: the drain never waits on disk)."""

    def __init__(self, writer: LogWriter):
        self.writer = writer
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
        self.writer.submit(data, n)
        return n


def _drop_none_event(_logger, _name, event_dict):
    if event_dict.get("event", 0) is None:
        del event_dict["event"]
    return event_dict


class AccessLog:
    """The structlog pipeline writing JSON lines to a file or stdout (through a
    LogWriter: reopen on SIGHUP and after logrotate, size rotation, bounded queue)."""

    def __init__(self, path: str | None, max_bytes: int = 0, backups: int = 0,
                 queue_lines: int = QUEUE_LINES):
        self.writer = LogWriter(path, max_bytes=max_bytes, backups=backups,
                                queue_lines=queue_lines)
        self.sink = LineBuffer(self.writer)
        self._lines = self.sink.lines
        self._render = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        self.log = structlog.wrap_logger(
            self.sink,
            processors=[_drop_none_event, structlog.processors.JSONRenderer(serializer=orjson.dumps)],
            wrapper_class=structlog.BoundLogger,
            cache_logger_on_first_use=True,
        )

    def record(self, rec: dict) -> None:
        """One access-log line: structlog's JSON renderer (orjson), without a
        bound logger's per-call machinery (context copy, level dispatch):
        the per-event budget is a few microseconds."""
        self._lines.append(self._render(None, "info", rec))

    def event(self, name: str, **fields) -> None:
        """A non-access-log line (counters, lifecycle): has an "event" key."""
        self.log.info(name, time=Clock().rfc3339(time.time_ns()), **fields)

    def flush(self) -> int:
        return self.sink.flush()

    def reopen(self) -> None:
        """Reopen the file before the next write (SIGHUP, after log rotation)."""
        self.writer.reopen()

    def counters(self) -> dict:
        """The writer's counters (lines written, dropped, reopens, rotations...)."""
        return self.writer.counters()

    def close(self) -> None:
        self.flush()
        self.writer.close()

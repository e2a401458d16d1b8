"""The access-log writer: one thread owns the file, so the ring-buffer drain
never waits on disk I/O.

The agent hands it batches of whole lines (submit); what a tail-based shipper
(Fluent Bit `tail`, rsyslog `imfile`) needs is done here:

* whole lines only: each write() ends at a line end; space is reserved first
  (fallocate KEEP_SIZE), so a full disk fails before a byte is written, and a
  partial write that still slips through is cut back to its last line end;
* rotation by others: right before each write the path's inode is compared
  with the open file's (in one ctypes call, no GIL wait between: filecalls);
  `logrotate create` (rename, new file), a deleted file or SIGHUP (reopen())
  make it reopen. `copytruncate` shows as the file shrinking under
  us: the lines written after logrotate's copy was taken (found by comparing the
  copy's tail with the recent writes kept in a journal) are written again, so
  the copy plus the truncated file hold every line once;
* optional size rotation: path -> path.1 -> ... -> path.N (N = backups);
* a bounded queue (in lines): while the disk or the reader stalls, batches that
  do not fit are dropped and counted (dropped_lines); a failed write (ENOSPC,
  EIO, ...) stays at the head and is retried with backoff, so logging resumes
  by itself when space returns. Nothing here raises into the agent after start.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import re
import stat
import sys
import threading
import time

from pyloader.errors import ConfigError
from pyloader.output import filecalls

log = logging.getLogger("redtap.log")

QUEUE_LINES = 65536          # default bound of the queue
MAX_WRITE = 1 << 20          # bytes per write() (several batches joined)
JOURNAL_BYTES = 8 << 20      # recent writes kept to repair a copytruncate
RETRY_MAX_S = 1.0            # backoff cap between retries of a failed write


def parse_size(text: str) -> int:
    """'1048576', '512k', '100M', '2G' -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)[iI]?[bB]?\s*", str(text))
    if not m:
        raise ConfigError(f"bad size {text!r}: want a number of bytes, optionally with k, M or G")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


def _describe(e: OSError) -> str:
    return f"{os.strerror(e.errno)} ({errno.errorcode.get(e.errno, e.errno)})"


class LogWriter:
    """Create, submit(data, lines) from the agent's thread, close() at the end."""

    def __init__(self, path: str | None, max_bytes: int = 0, backups: int = 0,
                 queue_lines: int = QUEUE_LINES, mode: int = 0o640,
                 journal_bytes: int = JOURNAL_BYTES):
        if max_bytes < 0 or backups < 0 or queue_lines < 1:
            raise ConfigError("log sizes and counts must be positive")
        if max_bytes and backups < 1:
            raise ConfigError("size rotation (--log-max-bytes) needs --log-backups >= 1")
        self.path = path if path and path != "-" else None
        if max_bytes and not self.path:
            raise ConfigError("size rotation needs a log file (--log PATH)")
        self.max_bytes, self.backups, self.queue_lines = max_bytes, backups, queue_lines
        self.mode, self.journal_bytes = mode, journal_bytes
        self.n = dict(written_lines=0, dropped_lines=0, write_errors=0, reopens=0,
                      rotations=0, truncations=0, rewritten_lines=0, unmatched_truncations=0)
        self.last_error = ""
        self._failing = False
        self._q: collections.deque[bytes] = collections.deque()
        self._queued = 0            # lines submitted and not yet written
        self._cv = threading.Condition(threading.Lock())
        self._reopen = False
        self._closing = False
        self._deadline = 0.0
        self._journal: collections.deque[tuple[int, bytes]] = collections.deque()
        self._journal_size = 0
        self._redo = b""            # lines to write again after a copytruncate
        self._can_reserve = True
        self._rotate_after = 0.0    # a failed rotation is retried after this time
        self._cpath = os.fsencode(self.path) if self.path else b""
        if self.path:
            try:
                self.fd = self._open()
            except OSError as e:
                raise ConfigError(f"opening the access log {self.path}: {_describe(e)}") from None
            self.owns_fd = True
        else:
            self.fd, self.owns_fd = sys.stdout.fileno(), False
        st = os.fstat(self.fd)
        self.regular = stat.S_ISREG(st.st_mode)
        self.end = st.st_size if self.regular else 0
        self._thread = threading.Thread(target=self._run, name="redtap-log", daemon=True)
        self._thread.start()

    # -- the agent's side ------------------------------------------------------
    def submit(self, data: bytes, lines: int) -> bool:
        """Queue whole lines (data ends with a newline). Never blocks on I/O;
        False when the queue is full: the lines that do not fit (the last
        ones) are dropped and counted, those that fit are queued."""
        with self._cv:
            room = 0 if self._closing else self.queue_lines - self._queued
            if lines > room:
                kept, cut = 0, 0
                while kept < room:  # the first `room` lines, whole
                    nl = data.find(b"\n", cut)
                    if nl < 0:
                        break
                    cut, kept = nl + 1, kept + 1
                self.n["dropped_lines"] += lines - kept
                if kept:
                    self._q.append(data[:cut])
                    self._queued += kept
                    self._cv.notify()
                return False
            self._q.append(data)
            self._queued += lines
            self._cv.notify()
        return True

    def reopen(self) -> None:
        """Reopen the file before the next write (SIGHUP). Safe in a signal
        handler: sets a flag only (the writer looks at it at least every second)."""
        self._reopen = True

    def counters(self) -> dict:
        with self._cv:
            queued = self._queued
        return {**self.n, "queued_lines": queued, "last_error": self.last_error}

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (giving up after timeout if writes keep failing)."""
        with self._cv:
            self._closing = True
            self._deadline = time.monotonic() + timeout
            self._cv.notify()
        self._thread.join(timeout + 1)
        if self._thread.is_alive():  # blocked in write() on a stalled pipe
            log.warning("access log: %d lines not written at exit (writer blocked)", self._queued)
        elif self.owns_fd:
            os.close(self.fd)
            self.owns_fd = False

    # -- the writer thread -----------------------------------------------------
    def _run(self) -> None:
        pending = b""   # taken from the queue, not yet written: whole lines
        delay = 0.0
        while True:
            with self._cv:
                if not pending and not self._redo:
                    while not self._q and not self._closing and not self._reopen:
                        self._cv.wait(1.0)
                    pending = self._take()
                elif delay:  # backoff after a failed write (submit() does not cut it short)
                    until = time.monotonic() + delay
                    while time.monotonic() < until and not (
                            self._closing and time.monotonic() > self._deadline):
                        self._cv.wait(max(0.0, until - time.monotonic()))
                if self._closing and (not (pending or self._redo) or
                                      time.monotonic() > self._deadline):
                    if pending or self._redo:
                        log.warning("access log: %d lines not written at exit: %s",
                                    pending.count(b"\n"), self.last_error)
                    return
            if self._reopen:
                self._reopen = False
                if self.path:
                    self._reopen_file("reopening")
            if not pending and not self._redo:
                continue
            done = self._write(pending)
            if done:
                lines = pending.count(b"\n", 0, done)
                pending = pending[done:]
                self.n["written_lines"] += lines
                with self._cv:
                    self._queued -= lines
            delay = min(max(delay * 2, 0.05), RETRY_MAX_S) if (pending or self._redo) else 0.0

    def _take(self) -> bytes:
        parts, size = [], 0
        while self._q and (not parts or size + len(self._q[0]) <= MAX_WRITE):
            parts.append(self._q.popleft())
            size += len(parts[-1])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _write(self, data: bytes) -> int:
        """Write data (may be empty); returns how many bytes of it are in the file."""
        if self.path:
            self._follow(len(data))
        if self._redo:
            done = self._put(self._redo)
            self.n["rewritten_lines"] += self._redo.count(b"\n", 0, done)
            self._redo = self._redo[done:]
            if self._redo:
                return 0
        if self.max_bytes and self.end + len(data) > self.max_bytes:
            # what fits before the size limit (the rest after rotation); one line at least
            cut = data.rfind(b"\n", 0, max(self.max_bytes - self.end, 0)) + 1
            data = data[:cut or data.find(b"\n") + 1]
        return self._put(data) if data else 0

    def _put(self, data: bytes, moves: int = 0) -> int:
        """One write of whole lines at the end of the file: all of it, or a
        prefix ending at a line end (0 on failure; the error is counted)."""
        base, written = self.end, 0
        try:
            if self.regular and self._can_reserve:
                err = filecalls.reserve(self.fd, base, len(data))
                if err in filecalls.NO_RESERVE:
                    self._can_reserve = False
                elif err:
                    raise OSError(err, os.strerror(err))
            if self.path and self.regular and filecalls.append_if_current is not None:
                written = filecalls.append_if_current(self.fd, self._cpath, data)
                if written == filecalls.MOVED:    # renamed or deleted just now
                    if moves > 3 or not self._reopen_file("reopening (moved or deleted)"):
                        return 0
                    return self._put(data, moves + 1)
            view = memoryview(data)
            while written < len(data):
                written += os.write(self.fd, view[written:])
        except OSError as e:
            written = getattr(e, "written", written)
            self._error(e, "writing")
            keep = data.rfind(b"\n", 0, written) + 1
            if self.regular and written:
                self._cut_back(base, written, keep)
                self._after_write(data[:keep], base, check=False)
            return keep
        if self._failing:
            self._failing = False
            log.warning("access log: writing %s resumed", self.path or "stdout")
        if self.regular:
            self._after_write(data, base)
        return len(data)

    def _cut_back(self, base: int, written: int, keep: int) -> None:
        """A partial line was written: remove it (only if it is still our tail)."""
        try:
            if keep < written and os.fstat(self.fd).st_size == base + written:
                os.ftruncate(self.fd, base + keep)
        except OSError as e:
            self._error(e, "cutting a partial line from")

    def _after_write(self, data: bytes, base: int, check: bool = True) -> None:
        """Track the end; a position other than expected means someone
        truncated the file just before or during this write."""
        pos = base + len(data)
        if check and self.path:
            try:
                pos = os.lseek(self.fd, 0, os.SEEK_CUR)
            except OSError:
                pass
        if pos != base + len(data) and pos >= len(data):
            self.end = base
            self._truncated(pos - len(data))
            base = pos - len(data)
        self.end = base + len(data)
        self._journal.append((base, data))
        self._journal_size += len(data)
        while self._journal_size > self.journal_bytes and len(self._journal) > 1:
            self._journal_size -= len(self._journal.popleft()[1])

    # -- files changed by others, reopening, rotation -----------------------------
    def _follow(self, incoming: int) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            self._error(e, "looking at")
            return
        try:
            fst = os.fstat(self.fd)
        except OSError as e:
            self._error(e, "looking at the open file of")
            return
        if st is None or (st.st_dev, st.st_ino) != (fst.st_dev, fst.st_ino):
            self._reopen_file("reopening (moved or deleted)")
            return
        if fst.st_size < self.end:
            self._truncated(fst.st_size)
        elif fst.st_size > self.end:
            self.end = fst.st_size  # another writer appended: follow the end
        if (self.max_bytes and self.end > 0 and self.end + incoming > self.max_bytes
                and time.monotonic() >= self._rotate_after):
            self._rotate()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self.mode)

    def _reopen_file(self, doing: str) -> bool:
        try:
            fd = self._open()
        except OSError as e:
            self._error(e, doing)
            return False
        os.close(self.fd)
        self.fd = fd
        self.end = os.fstat(fd).st_size
        self._journal.clear()
        self._journal_size = 0
        self.n["reopens"] += 1
        return True

    def _rotate(self) -> None:
        try:
            for i in range(self.backups - 1, 0, -1):
                src = f"{self.path}.{i}"
                if os.path.lexists(src):
                    os.replace(src, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        except OSError as e:
            self._error(e, "rotating")
            self._rotate_after = time.monotonic() + 5.0
            return
        if self._reopen_file("opening after rotation"):
            self.n["rotations"] += 1

    def _truncated(self, size_now: int) -> None:
        """The file shrank under us (copytruncate): find what the copy misses."""
        self.n["truncations"] += 1
        copied = self._copied_size()
        old_end = self.end
        self.end = size_now
        if copied is None:
            self.n["unmatched_truncations"] += 1
        elif copied < old_end:
            self._redo = self._journal_from(copied) + self._redo
        self._journal.clear()
        self._journal_size = 0

    def _copied_size(self) -> int | None:
        """Size of the newest sibling file (path.1, path-DATE, ...) whose tail is
        what we wrote at that offset: logrotate's copy, taken at that size."""
        if not self._journal:
            return None
        start = self._journal[0][0]
        folder, base = os.path.split(self.path)
        cands = []
        try:
            names = os.listdir(folder or ".")
        except OSError:
            return None
        for name in names:
            if name == base or not name.startswith(base):
                continue
            p = os.path.join(folder, name)
            try:
                st = os.stat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and start < st.st_size <= self.end:
                cands.append((st.st_mtime_ns, st.st_size, p))
        for _, size, p in sorted(cands, reverse=True):
            k = min(size - start, 4096)
            try:
                with open(p, "rb") as f:
                    f.seek(size - k)
                    tail = f.read(k)
            except OSError:
                continue
            if tail == self._journal_bytes(size - k, size):
                return size
        return None

    def _journal_bytes(self, lo: int, hi: int) -> bytes:
        out = []
        for off, data in self._journal:
            a, b = max(lo, off), min(hi, off + len(data))
            if a < b:
                out.append(data[a - off:b - off])
        return b"".join(out)

    def _journal_from(self, offset: int) -> bytes:
        """Journal bytes from the start of the line that holds @offset."""
        start = self._journal[0][0]
        buf = self._journal_bytes(start, 1 << 62)
        i = offset - start
        i = buf.rfind(b"\n", 0, i) + 1 if i > 0 and buf[i - 1:i] != b"\n" else i
        return buf[i:]

    def _error(self, e: OSError, doing: str) -> None:
        self.n["write_errors"] += 1
        msg = f"{doing} {self.path or 'stdout'}: {_describe(e)}"
        if not self._failing or msg != self.last_error:
            log.warning("access log: %s; lines wait in the queue (at most %d), beyond that they "
                        "are dropped and counted (log.dropped_lines)", msg, self.queue_lines)
        self.last_error = msg
        self._failing = True

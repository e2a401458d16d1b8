"""A very thin BPF ring buffer reader: records come out as raw bytes.

The callback copies each record into a list; decoding is the caller's job
and happens outside the C callback, so nothing ever raises across the C
boundary and a batch is decoded in one Python loop.
"""
from __future__ import annotations

import ctypes
import errno

from pyloader.libbpf.binding import RING_BUFFER_SAMPLE_FN, lib, last_errno
from pyloader.errors import BpfError


# what the callback returns to end a round when the batch is full: libbpf
# stops there (that record is consumed and kept) and returns this value
BATCH_FULL = -1000


class RingBuffer:
    def __init__(self, map_fd: int, max_batch: int = 0, native: tuple | None = None):
        """max_batch: records per poll()/consume() at most (0: all there are).
        A bound keeps the memory of one batch (records, records, lines) small
        when the consumer falls behind a full ring.

        native: (address of a C ring_buffer_sample_fn, its ctx, a function
        returning how many records ctx holds): the records go to that C sink
        (no Python call per record) and poll()/consume() return that count;
        the sink applies its own batch limit (returning BATCH_FULL)."""
        self._batch: list[bytes] = []
        batch, string_at = self._batch, ctypes.string_at
        limit = max_batch or (1 << 62)

        def _sample(_ctx, data, size):
            batch.append(string_at(data, size))
            return BATCH_FULL if len(batch) >= limit else 0

        # keep the CFUNCTYPE object alive as long as the ring buffer
        if native is not None:
            fn, ctx, self._native_count = native
            self._cb = RING_BUFFER_SAMPLE_FN(fn)
        else:
            ctx, self._native_count = None, None
            self._cb = RING_BUFFER_SAMPLE_FN(_sample)
        self._rb = lib().ring_buffer__new(map_fd, self._cb, ctx, None)
        if not self._rb:
            raise BpfError(last_errno(), "creating the ring buffer reader (ring_buffer__new)")

    def poll(self, timeout_ms: int) -> list[bytes]:
        """Wait up to timeout_ms for a wakeup, then return what is there.
        The kernel side wakes us only for a large batch (BPF_RB_NO_WAKEUP
        otherwise), so records are also consumed when the wait times out."""
        ret = lib().ring_buffer__poll(self._rb, timeout_ms)
        if ret == BATCH_FULL:
            return self._take()
        if ret < 0 and last_errno(ret) != errno.EINTR:  # a signal: just return
            raise BpfError(last_errno(ret), "polling the ring buffer")
        return self.consume()

    def consume(self) -> list[bytes]:
        """Return the records available now (at most max_batch), without waiting."""
        ret = lib().ring_buffer__consume(self._rb)
        if ret < 0 and ret != BATCH_FULL:
            raise BpfError(last_errno(ret), "consuming the ring buffer")
        return self._take()

    def drain(self):
        """Every record available now, batch by batch."""
        while True:
            batch = self.consume()
            if not batch:
                return
            yield batch

    def _take(self):
        if self._native_count is not None:
            return self._native_count()
        out = self._batch[:]
        self._batch.clear()
        return out

    def close(self) -> None:
        if self._rb:
            lib().ring_buffer__free(self._rb)
            self._rb = None

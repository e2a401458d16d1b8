"""The ring buffer reader against the real map: bounded batches lose nothing."""
from pyloader.kernel import abi
from pyloader.libbpf.ringbuf import RingBuffer

from support import packets as P


def make_events(h, n: int) -> None:
    for i in range(n):
        c = P.Conn(client=("198.18.0.20", 42000 + i))
        h.req(c.req(P.get(f"/rb{i}")))
        h.resp(c.resp(P.response(200)))


def urls(batch) -> list[bytes]:
    out = []
    for raw in batch:
        ev = dict(zip(abi.EVENT_FIELDS, abi.decode_event(raw)))
        out.append(ev["url"][:ev["url_len"]])
    return out


def test_max_batch_splits_what_is_there_in_order(h):
    make_events(h, 10)
    rb = RingBuffer(h.t.events_fd, max_batch=3)
    try:
        sizes, got = [], []
        for batch in rb.drain():
            sizes.append(len(batch))
            got += urls(batch)
        assert sizes == [3, 3, 3, 1]
        assert got == [f"/rb{i}".encode() for i in range(10)]
        assert rb.consume() == []
    finally:
        rb.close()


def test_poll_returns_a_full_batch_and_keeps_the_rest(h):
    make_events(h, 5)
    rb = RingBuffer(h.t.events_fd, max_batch=4)
    try:
        assert urls(rb.poll(0)) == [f"/rb{i}".encode() for i in range(4)]
        assert urls(rb.poll(0)) == [b"/rb4"]
    finally:
        rb.close()


def test_unbounded_reader_takes_everything_at_once(h):
    make_events(h, 7)
    rb = RingBuffer(h.t.events_fd)
    try:
        assert len(rb.consume()) == 7
    finally:
        rb.close()

"""--ring-buffer-mb: the ring buffer the kernel gets, and records still flow."""
import os

import pytest

from pyloader.cli import build_parser
from pyloader.kernel.endpoints import parse_endpoint
from pyloader.kernel.tracer import Tracer
from pyloader.libbpf.ringbuf import RingBuffer
from support import packets as P


def test_the_ring_buffer_has_the_size_asked_for_and_carries_records():
    if os.geteuid() != 0:
        pytest.skip("needs root for bpf()")
    args = build_parser().parse_args(["run", "--ring-buffer-mb", "1"])
    t = Tracer.load(ring_bytes=args.ring_buffer_mb << 20)
    rb = RingBuffer(t.events_fd)
    try:
        assert t.obj.max_entries("events") == 1 << 20
        t.endpoints.host_addrs = lambda: set()
        t.endpoints.set([parse_endpoint("198.18.0.10:80")])
        c = P.Conn()
        t.req.test_run(c.req(P.get("/small-ring")))
        t.resp.test_run(c.resp(P.response(200)))
        (raw,) = rb.consume()
        assert b"/small-ring" in raw
    finally:
        rb.close()
        t.close()


@pytest.mark.parametrize("bad", ["0", "3", "2048", "x"])
def test_a_ring_size_that_is_not_a_power_of_two_is_refused(bad, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--ring-buffer-mb", bad])
    assert "power of two" in capsys.readouterr().err

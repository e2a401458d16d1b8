"""Shared fixtures: a loaded tracer whose maps are emptied before each test."""
from __future__ import annotations

import os

import pytest

from pyloader.kernel import abi
from pyloader.kernel.endpoints import parse_endpoint
from pyloader.libbpf.ringbuf import RingBuffer
from pyloader.kernel.tracer import Tracer


def _clear(m) -> None:
    for k in list(m.keys()):
        m.delete(k)


class Harness:
    """Runs crafted frames through the two programs and collects events."""

    def __init__(self, tracer: Tracer):
        self.t = tracer
        self.rb = RingBuffer(tracer.events_fd)

    def reset(self, endpoints=("198.18.0.10:80",), host_addrs=()):
        """Empty maps and counters; trace @endpoints, of which those at one of
        @host_addrs are the host stack's (EP_HOST)."""
        for name in ("conns", "pending", "endpoints"):
            _clear(self.t.obj.map(name))
        zero = bytes(self.t.stats_map.slot * self.t.stats_map.ncpus)
        for i in range(len(abi.STATS)):
            self.t.stats_map.update(i.to_bytes(4, "little"), zero)
        self.t.endpoints.current = {}
        host = {parse_endpoint(a).network.network_address for a in host_addrs}
        self.t.endpoints.host_addrs = lambda: host
        self.t.endpoints.set([parse_endpoint(e) for e in endpoints])
        self.rb.consume()

    @staticmethod
    def run(prog, frame: bytes) -> int:
        ret, out, _ = prog.test_run(frame)
        assert out == frame, "the program changed the packet"
        return ret

    def req(self, frame: bytes) -> int:
        """Through redtap_req (where packets go to servers)."""
        return self.run(self.t.req, frame)

    def resp(self, frame: bytes) -> int:
        """Through redtap_resp (where packets come from servers)."""
        return self.run(self.t.resp, frame)

    def pod_egress(self, frame: bytes) -> int:
        """Through redtap_pod_req (a pod veth's egress: toward the pod)."""
        return self.run(self.t.pod_req, frame)

    def pod_ingress(self, frame: bytes) -> int:
        """Through redtap_pod_resp (a pod veth's ingress: from the pod)."""
        return self.run(self.t.pod_resp, frame)

    def events(self) -> list[dict]:
        out = []
        for raw in self.rb.consume():
            ev = dict(zip(abi.EVENT_FIELDS, abi.decode_event(raw)))
            ev["url"] = ev["url"][:ev["url_len"]]
            ev["method"] = abi.METHODS[ev["method"]]
            out.append(ev)
        return out

    def stats(self) -> dict[str, int]:
        return {k: v for k, v in self.t.stats().items() if v}


@pytest.fixture(scope="session")
def tracer():
    if os.geteuid() != 0:
        pytest.skip("needs root for bpf()")
    t = Tracer.load()
    yield t
    t.close()


@pytest.fixture
def h(tracer):
    harness = Harness(tracer)
    harness.reset()
    yield harness
    harness.rb.close()

#!/usr/bin/env python3
"""Configuration B of the benchmark: redtap's programs attached, no consumer.

Run inside the node namespace:
    kernel_only.py --endpoint IP:PORT [--bridge cni0 | --iface NAME ...] [--no-drain] [--floor]
Loads the object (pyloader.kernel.tracer.Tracer) with a wakeup threshold no batch
reaches (the kernel never wakes a reader), attaches both programs to every port
of the bridge (pyloader.kernel.attach.TcAttacher, as the agent's default) or to the
--iface interfaces given, prints
{"ready": ...} and waits for SIGTERM/SIGINT; then detaches and prints
{"kernel": counters, "max_rss_kb": ...}.

--floor: the reference floor (bench/floor.bpf.c, configuration F) instead of
redtap's programs, attached and drained the same way (no counters).

Draining. Nobody decodes events. By default the ring buffer is emptied every
50 ms by libbpf with a C function as the sample callback (libc abs() of the NULL
context: returns 0, touches nothing), so the programs keep taking the same path
as under the agent (a successful reserve + submit). With --no-drain the buffer
fills after ~4 MB of events and every later event takes the cheaper
"ringbuf_full" path instead, which would flatter the kernel cost.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import resource
import signal
import sys
import time

from pyloader.libbpf.binding import RING_BUFFER_SAMPLE_FN, lib
from pyloader.kernel.attach import TcAttacher
from pyloader.kernel.endpoints import parse_endpoint
from pyloader.kernel.tracer import Tracer

NEVER_WAKE = 0xFFFFFFFF


class FloorObject:
    """The reference floor with the Tracer methods used here."""

    def __init__(self, endpoints):
        import floor
        self.obj = floor.load(None, endpoints)
        self.req, self.resp = floor.programs(self.obj)
        self.events_fd = self.obj.map("events").fd

    def prog_fds(self) -> dict:
        return {"pod": (self.req.fd, self.resp.fd)}

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        self.obj.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", action="append", default=[])
    ap.add_argument("--bridge", default="cni0")
    ap.add_argument("--iface", action="append", default=[], help="only these (pod side)")
    ap.add_argument("--no-drain", action="store_true")
    ap.add_argument("--floor", action="store_true", help="the reference floor instead")
    args = ap.parse_args()
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    tracer = FloorObject(args.endpoint) if args.floor else Tracer.load(wakeup_bytes=NEVER_WAKE)
    attacher = None
    rb = None
    try:
        if not args.floor:
            tracer.endpoints.set([parse_endpoint(e) for e in args.endpoint])
        attacher = TcAttacher(tracer.prog_fds())
        ports = ({attacher.ifindex(n): n for n in args.iface} if args.iface
                 else attacher.bridge_ports(args.bridge))
        for idx, name in sorted(ports.items()):
            attacher.attach(idx, name, "pod")
        if not args.no_drain:
            libc = ctypes.CDLL(None)
            noop = ctypes.cast(libc.abs, RING_BUFFER_SAMPLE_FN)
            rb = lib().ring_buffer__new(tracer.events_fd, noop, None, None)
            if not rb:
                raise OSError(ctypes.get_errno(), "ring_buffer__new")
        print(json.dumps({"ready": sorted(a.ifname for a in attacher.attached.values()),
                          "drain": not args.no_drain}), flush=True)
        while not stop:
            if rb:
                lib().ring_buffer__poll(rb, 50)  # never woken: returns on the timeout
                lib().ring_buffer__consume(rb)
            else:
                time.sleep(0.05)
    finally:
        if attacher:
            attacher.close()
        if rb:
            lib().ring_buffer__consume(rb)
            lib().ring_buffer__free(rb)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"kernel": tracer.stats(), "max_rss_kb": ru.ru_maxrss,
                          "cpu_s": round(ru.ru_utime + ru.ru_stime, 3)}), flush=True)
        tracer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

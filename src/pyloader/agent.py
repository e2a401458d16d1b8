"""`redtap run`: load, attach, drain the ring buffer, write access logs."""
from __future__ import annotations

import logging
import resource
import signal
import sys
import time
from dataclasses import dataclass, field

from pyloader.kernel import abi
from pyloader.output.accesslog import AccessLog
from pyloader.pipeline.record import RecordBuilder
from pyloader.kernel.attach import BridgeFollower, TcAttacher
from pyloader.pipeline.component import overridden
from pyloader.kernel.endpoints import WILDCARD, Endpoint, host_addresses
from pyloader.errors import RedtapError
from pyloader.libbpf.ringbuf import RingBuffer
from pyloader.output.summary import RedSummary
from pyloader.pipeline.fastpath import FastPath
from pyloader.memory import rss_kb
from pyloader.kernel.tracer import Tracer

log = logging.getLogger("redtap.agent")


@dataclass
class AgentConfig:
    endpoints: list[Endpoint] = field(default_factory=list)  # empty: trace everything
    attach: str = "veths"             # "veths": every port of the bridge; "bridge": the bridge
    bridge: str | None = "cni0"
    ifaces: list[str] = field(default_factory=list)       # pod-side interfaces
    host_ifaces: list[str] = field(default_factory=list)  # host-side interfaces
    log_path: str | None = None
    log_max_bytes: int = 0            # size rotation of the log (0: off; logrotate instead)
    log_backups: int = 5              # rotated files kept with log_max_bytes
    log_queue_lines: int = 65536      # lines waiting for the writer before drops (counted)
    max_batch: int = 4096             # ring buffer records handled per round at most
    bpf_object: str | None = None
    max_conns: int | None = None
    ring_bytes: int | None = None     # ring buffer size (None: the object's, 8 MB)
    poll_ms: int = 50
    idle_timeout_s: float = 60.0
    stats_interval_s: float = 60.0
    summary: bool = False             # print a R.E.D. table to stderr at exit
    fast_path: bool = True            # render with the C helper where it applies
    components: list = field(default_factory=list)  # pyloader.pipeline.component.Component


class UserStats:
    """Counters kept by the agent itself."""

    def __init__(self):
        self.events = 0
        self.bad_events = 0
        self.idle_unanswered = 0
        self.batches = 0
        self.start_rss_kb = 0  # once started (programs loaded, ring mapped, names listed)

    def memory(self) -> dict:
        """RSS now, peak, and growth since start (kB): the stats lines and /metrics."""
        rss, peak = rss_kb()
        return {"rss_kb": rss, "max_rss_kb": peak,
                "rss_growth_kb": rss - self.start_rss_kb if self.start_rss_kb else 0}


class Agent:
    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        self.stop_requested = False
        self.stats = UserStats()
        self.summary = RedSummary()
        self.tracer: Tracer | None = None
        self.attacher: TcAttacher | None = None
        self.follower: BridgeFollower | None = None
        self.fast: FastPath | None = None

    # -- setup -----------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        self.tracer = Tracer.load(cfg.bpf_object, max_conns=cfg.max_conns,
                                  ring_bytes=cfg.ring_bytes)
        self.tracer.endpoints.host_addrs = host_addresses
        self.tracer.endpoints.set(cfg.endpoints or [WILDCARD])
        self.accesslog = AccessLog(cfg.log_path, max_bytes=cfg.log_max_bytes,
                                   backups=cfg.log_backups if cfg.log_max_bytes else 0,
                                   queue_lines=cfg.log_queue_lines)
        self.builder = RecordBuilder()
        self.fast = FastPath.create(self) if cfg.fast_path else None
        native = (self.fast.sample_fn, self.fast.ctx, self.fast.count) if self.fast else None
        self.rb = RingBuffer(self.tracer.events_fd, max_batch=cfg.max_batch, native=native)
        self.attacher = TcAttacher(self.tracer.prog_fds())
        for name in cfg.ifaces:
            self.attacher.attach(self.attacher.ifindex(name), name, "pod")
        for name in cfg.host_ifaces:
            self.attacher.attach(self.attacher.ifindex(name), name, "host")
        if cfg.attach == "bridge":
            self.attacher.attach(self.attacher.ifindex(cfg.bridge), cfg.bridge, "pod")
        elif cfg.bridge and not cfg.ifaces:  # --host-iface adds to the pods' veths
            self.attacher.ifindex(cfg.bridge)  # fail early if it does not exist
            self.follower = BridgeFollower(self.attacher, cfg.bridge).start()
            if self.attacher.bridge_ports(cfg.bridge) and not self.attacher.attached:
                raise RedtapError(f"could not attach to any port of {cfg.bridge} (see the log)")
        self.processors = overridden(cfg.components, "process")
        self.observers = ([self.summary.add] if cfg.summary else []) + \
            overridden(cfg.components, "observe")
        self.tickers = overridden(cfg.components, "tick")
        for c in cfg.components:
            c.start(self)
        self.accesslog.event("redtap.start", endpoints=[str(e) for e in cfg.endpoints] or ["*"],
                             host_endpoints=[str(e) for e in self.tracer.endpoints.host_endpoints],
                             interfaces=sorted(a.ifname for a in self.attacher.attached.values()),
                             record_path="native" if self.fast else "python")
        self.accesslog.flush()
        self.stats.start_rss_kb = rss_kb()[0]

    def emit(self, rec: dict) -> None:
        """One record through the pipeline: processors, the log, observers."""
        for p in self.processors:
            p(rec)
        self.accesslog.record(rec)
        for o in self.observers:
            o(rec)

    # -- the loop ----------------------------------------------------------
    def handle_batch(self, batch: list[bytes]) -> int:
        if not batch:
            return 0
        build, record, decode = self.builder.build, self.accesslog.record, abi.decode_event
        processors, observers = self.processors, self.observers
        self.builder.clock.sync()
        n = 0
        for raw in batch:
            ev = decode(raw)
            if ev is None:
                self.stats.bad_events += 1
                continue
            rec = build(ev)
            for p in processors:
                p(rec)
            record(rec)
            for o in observers:
                o(rec)
            n += 1
        self.stats.events += n
        self.stats.batches += 1
        self.accesslog.flush()
        return n

    def handle_native(self) -> int:
        """The batch the C sink collected, through the fast path (pipeline/fastpath.py)."""
        self.builder.clock.sync()
        self.accesslog.flush()  # lines queued before this batch stay before it
        n, bad = self.fast.handle()
        self.stats.bad_events += bad
        if n or bad:
            self.stats.events += n
            self.stats.batches += 1
        return n

    def handle_round(self, got) -> int:
        """What one poll()/consume() returned: a count (native sink) or records."""
        return self.handle_native() if self.fast else self.handle_batch(got)

    def sweep_idle(self, now_ns: int | None = None) -> int:
        """Report requests pending on connections idle past the timeout as
        unanswered, and forget those connections. Returns requests reported."""
        now_ns = now_ns if now_ns is not None else time.monotonic_ns()
        limit = now_ns - int(self.cfg.idle_timeout_s * 1e9)
        evs = self.tracer.take_pending(now_ns, idle_before_ns=limit)
        for ev in evs:
            self.emit(self.builder.build(ev))
        self.stats.idle_unanswered += len(evs)
        if evs:
            self.accesslog.flush()
        return len(evs)

    def counters(self) -> dict:
        k = self.tracer.stats()
        live = sum(st.tail - st.head for _, st in self.tracer.connections())
        # requests that vanished with an LRU-evicted connection
        k["lru_evicted_pending"] = max(0, k["pending_pushed"] - k["pending_popped"] - live
                                       - self.stats.idle_unanswered)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        mem = self.stats.memory()
        extra = {}
        for c in self.cfg.components:
            extra.update(c.counters())
        return {**extra,
            "log": self.accesslog.counters(),
            "kernel": k,
            "agent": {"events": self.stats.events, "bad_events": self.stats.bad_events,
                      "idle_unanswered": self.stats.idle_unanswered,
                      "pending_requests": live,
                      "cpu_s": round(ru.ru_utime + ru.ru_stime, 3),
                      **mem, "max_rss_kb": mem["max_rss_kb"] or ru.ru_maxrss},
        }

    def log_counters(self, final: bool = False) -> None:
        self.accesslog.event("redtap.exit" if final else "redtap.stats", **self.counters())
        self.accesslog.flush()

    def run(self) -> int:
        # handlers first: a signal during start still detaches and reports
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hup)  # reopen the log (logrotate postrotate)
        try:
            self.start()
        except BaseException:
            self.shutdown()
            raise
        cfg = self.cfg
        next_sweep = time.monotonic() + max(cfg.idle_timeout_s / 4, 0.2)
        next_stats = time.monotonic() + cfg.stats_interval_s
        try:
            while not self.stop_requested:
                self.handle_round(self.rb.poll(cfg.poll_ms))
                now = time.monotonic()
                for t in self.tickers:
                    t(now)
                if now >= next_sweep:
                    self.sweep_idle()
                    next_sweep = now + max(cfg.idle_timeout_s / 4, 0.2)
                if now >= next_stats:
                    self.log_counters()
                    next_stats = now + cfg.stats_interval_s
        finally:
            self.shutdown()
        return 0

    def _on_signal(self, signum, _frame) -> None:
        self.stop_requested = True

    def _on_hup(self, signum, _frame) -> None:
        if getattr(self, "accesslog", None):
            self.accesslog.reopen()

    def shutdown(self) -> None:
        """Detach (no new events), drain what is left, flush, report."""
        if self.follower:
            self.follower.stop()
            self.follower = None
        if self.attacher:
            self.attacher.close()
            self.attacher = None
        if self.tracer:
            if getattr(self, "rb", None) and getattr(self, "accesslog", None):
                for batch in self.rb.drain():
                    self.handle_round(batch)
                for c in self.cfg.components:
                    try:
                        c.stop()
                    except Exception as e:  # one part failing must not lose the rest
                        log.warning("stopping %s: %s", c.name, e)
                self.log_counters(final=True)
                self.rb.close()
                if self.fast:
                    self.fast.close()
                if self.cfg.summary:
                    print(self.summary.table(), file=sys.stderr)
                self.accesslog.close()
            self.tracer.close()
            self.tracer = None

"""R.E.D. metrics in Prometheus exposition (`redtap run --metrics-addr HOST:PORT`).

Names follow the OpenTelemetry HTTP semantic conventions as Prometheus
spells them:

  http_server_request_duration_seconds          histogram, answered requests
      http_request_method, http_response_status_code, http_route, and either
      k8s_namespace_name / k8s_pod_name / k8s_service_name (those known, when
      the record carries server.k8s.* names) or server_address / server_port
  redtap_http_server_unanswered_requests_total  counter, same labels less the status
  redtap_kernel_<counter>_total                 every kernel counter (losses too)
  redtap_kernel_losses_total{counter=...}       the loss counters again, as one family
  redtap_agent_<counter>_total                  events processed, bad events, ...
  redtap_http_route_overflow_total              requests folded into the overflow route
  process_* / python_*                          the agent process itself

Hot path: observe() only appends the record; tick() (once per loop
iteration, i.e. per ring-buffer batch) folds the batch into plain per-series
bucket arrays under one lock. A scrape (HTTP server thread) copies them
under the same lock. Kernel and agent counters are read on the agent's
thread in tick() and published as a snapshot, so the scrape thread never
touches BPF maps or other components.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from bisect import bisect_left

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import Metric

from pyloader.kernel.abi import LOSS_STATS
from pyloader.pipeline.component import Component
from pyloader.errors import RedtapError
from pyloader.pipeline.routes import RouteTable, server_key

log = logging.getLogger("redtap.metrics")

# bucket upper bounds: (milliseconds for placement, `le` label in seconds)
BUCKETS = ((0.1, "0.0001"), (0.25, "0.00025"), (0.5, "0.0005"), (1.0, "0.001"),
           (2.5, "0.0025"), (5.0, "0.005"), (10.0, "0.01"), (25.0, "0.025"), (50.0, "0.05"),
           (100.0, "0.1"), (250.0, "0.25"), (500.0, "0.5"), (1000.0, "1.0"), (2500.0, "2.5"),
           (5000.0, "5.0"), (10000.0, "10.0"))
BOUNDS_MS = tuple(b for b, _ in BUCKETS)
LE = tuple(le for _, le in BUCKETS) + ("+Inf",)

DURATION = "http_server_request_duration_seconds"
UNANSWERED = "redtap_http_server_unanswered_requests"
K8S_LABELS = ("k8s_namespace_name", "k8s_pod_name", "k8s_service_name")
KERNEL_REFRESH_S = 1.0   # kernel counters (a few map lookups) this often
FULL_REFRESH_MIN_S = 5.0  # agent.counters() (scans pending connections) at least this far apart


def parse_addr(text: str) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise RedtapError(f"--metrics-addr {text!r}: expected HOST:PORT or [IPv6]:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise RedtapError(f"--metrics-addr {text!r}: put an IPv6 address in brackets: [::1]:9400")
    return host, int(port)


def series_key(rec: dict, route: str) -> tuple:
    """Labels of a record's series, less the status (a tagged tuple)."""
    g = rec.get
    ns, pod, svc = g("server.k8s.namespace.name"), g("server.k8s.pod.name"), g("server.k8s.service.name")
    if ns is None and pod is None and svc is None:
        return (rec["http.request.method"], route, rec["server.address"], rec["server.port"])
    return (rec["http.request.method"], route, ns, pod, svc)


def key_labels(key: tuple) -> dict:
    labels = {"http_request_method": key[0], "http_route": key[1]}
    if len(key) == 4:
        labels["server_address"] = key[2]
        labels["server_port"] = str(key[3])
    else:
        for name, value in zip(K8S_LABELS, key[2:]):
            if value is not None:
                labels[name] = value
    return labels


NB = len(BOUNDS_MS) + 1  # buckets per series, +Inf included
SUM, GEN = NB, NB + 1    # a series: [b0 .. b16, sum_ms, generation last updated]
SERIES_TTL_S = 900.0     # series idle this long are dropped (pods and IPs come and go)
GEN_S = 300.0            # one generation


class RedAggregate:
    """Per-series histogram arrays; fed per batch, copied per scrape.

    Series not updated for SERIES_TTL_S (give or take one generation) are
    dropped, so label sets of pods long gone do not pile up; a series that
    comes back starts from zero, which Prometheus' rate() reads as a reset.
    """

    def __init__(self, routes: RouteTable | None = None):
        self.routes = routes or RouteTable()
        self.lock = threading.Lock()
        self.hist: dict[tuple, list] = {}        # (key, status) -> series
        self.unanswered: dict[tuple, list] = {}  # key -> [count, generation]
        self.gen = 0
        self.expired = 0

    def fold(self, batch: list[dict]) -> None:
        hist, unanswered, bounds, gen = self.hist, self.unanswered, BOUNDS_MS, self.gen
        with self.lock:
            for rec in batch:
                route = rec.get("http.route")
                if route is None:
                    route = self.routes.route(server_key(rec), rec["url.path"])
                key = series_key(rec, route)
                status = rec.get("http.response.status_code")
                if status is None:
                    u = unanswered.get(key)
                    if u is None:
                        u = unanswered[key] = [0, gen]
                    u[0] += 1
                    u[1] = gen
                    continue
                ms = rec["duration_ms"]
                h = hist.get((key, status))
                if h is None:
                    h = hist[(key, status)] = [0] * NB + [0.0, gen]
                h[bisect_left(bounds, ms)] += 1
                h[SUM] += ms
                h[GEN] = gen

    def add_cells(self, cells) -> None:
        """(series key, status or None, bucket counts, sum of ms) per cell: the
        records of one batch counted by the fast path, as fold() counts them
        (the sum added per cell: its last bits may differ from a per-record sum)."""
        hist, unanswered, gen = self.hist, self.unanswered, self.gen
        with self.lock:
            for key, status, counts, sum_ms in cells:
                if status is None:
                    u = unanswered.get(key)
                    if u is None:
                        u = unanswered[key] = [0, gen]
                    u[0] += counts[0]
                    u[1] = gen
                    continue
                h = hist.get((key, status))
                if h is None:
                    h = hist[(key, status)] = [0] * NB + [0.0, gen]
                for b, c in enumerate(counts):
                    if c:
                        h[b] += c
                h[SUM] += sum_ms
                h[GEN] = gen

    def next_generation(self) -> int:
        """Start a generation; drop series idle for SERIES_TTL_S. Returns how many."""
        keep = int(SERIES_TTL_S // GEN_S)
        with self.lock:
            self.gen += 1
            old = self.gen - keep
            stale = [k for k, h in self.hist.items() if h[GEN] < old]
            for k in stale:
                del self.hist[k]
            stale_u = [k for k, u in self.unanswered.items() if u[1] < old]
            for k in stale_u:
                del self.unanswered[k]
        self.expired += len(stale) + len(stale_u)
        return len(stale) + len(stale_u)

    def copy(self) -> tuple[dict, dict]:
        with self.lock:
            return ({k: v[:GEN] for k, v in self.hist.items()},
                    {k: u[0] for k, u in self.unanswered.items()})


def _counter(name: str, doc: str, value: float, labels: dict | None = None) -> Metric:
    m = Metric(name, doc, "counter")
    m.add_sample(name + "_total", labels or {}, value)
    return m


def _gauge(name: str, doc: str, value: float) -> Metric:
    m = Metric(name, doc, "gauge")
    m.add_sample(name, {}, value)
    return m


LOSS_NAMES = tuple(LOSS_STATS) + ("lru_evicted_pending",)
_BAD_NAME = re.compile(r"[^a-zA-Z0-9_]")


class RedCollector:
    """prometheus_client custom collector over a RedAggregate and a counter snapshot."""

    def __init__(self, agg: RedAggregate):
        self.agg = agg
        self.snapshot: dict = {}  # replaced whole by the agent's thread

    def collect(self):
        hist, unanswered = self.agg.copy()
        m = Metric(DURATION, "Duration of HTTP server requests (first request byte to first "
                   "response byte), traced in the kernel", "histogram", unit="seconds")
        for (key, status), h in sorted(hist.items(), key=lambda kv: repr(kv[0])):
            labels = key_labels(key)
            labels["http_response_status_code"] = str(status)
            acc = 0
            for le, n in zip(LE, h[:NB]):
                acc += n
                m.add_sample(DURATION + "_bucket", {**labels, "le": le}, acc)
            m.add_sample(DURATION + "_count", labels, acc)
            m.add_sample(DURATION + "_sum", labels, h[SUM] / 1000.0)
        yield m
        u = Metric(UNANSWERED, "HTTP requests that got no response (reset, server closed, "
                   "idle timeout)", "counter")
        for key, n in sorted(unanswered.items(), key=lambda kv: repr(kv[0])):
            u.add_sample(UNANSWERED + "_total", key_labels(key), n)
        yield u
        yield _counter("redtap_http_route_overflow", "Requests whose route was folded into "
                       "the overflow route (per-server cap on distinct routes)",
                       self.snapshot.get("route_overflow", 0))
        yield from self._counters(self.snapshot)

    def _counters(self, snap: dict):
        kernel = snap.get("kernel", {})
        for name, v in sorted(kernel.items()):
            yield _counter(f"redtap_kernel_{name}", f"kernel counter {name} (summed over CPUs)", v)
        losses = Metric("redtap_kernel_losses", "Requests or responses lost or not understood, "
                        "by kernel counter (one family for dashboards and alerts)", "counter")
        for name in LOSS_NAMES:
            if name in kernel:
                losses.add_sample("redtap_kernel_losses_total", {"counter": name}, kernel[name])
        yield losses
        agent = snap.get("agent", {})
        for name in ("events", "bad_events", "idle_unanswered"):
            if name in agent:
                yield _counter(f"redtap_agent_{name}", f"agent counter {name}", agent[name])
        if "rss_growth_kb" in agent:  # with redtap_agent_events_total: growth per record
            yield _gauge("redtap_agent_rss_growth_bytes", "resident memory gained since the "
                         "agent started (programs loaded, ring mapped)", agent["rss_growth_kb"] << 10)
            yield _gauge("redtap_agent_peak_rss_bytes", "peak resident memory",
                         agent["max_rss_kb"] << 10)
        if "pending_requests" in agent:
            yield _gauge("redtap_agent_pending_requests", "requests waiting for a response "
                         "in the kernel's connection map", agent["pending_requests"])
        for section, values in sorted(snap.get("extra", {}).items()):
            if not isinstance(values, dict):
                continue
            for name, v in sorted(values.items()):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    metric = _BAD_NAME.sub("_", f"redtap_{section}_{name}")
                    yield _gauge(metric, f"{section} counter {name}", v)


class MetricsComponent(Component):
    """Serves /metrics; feeds the aggregate per batch; snapshots counters."""

    name = "metrics"
    fast_role = "metrics"

    def __init__(self, addr: str, routes: RouteTable | None = None):
        self.host, self.port = parse_addr(addr)
        self.routes = routes or RouteTable()
        self.agg = RedAggregate(self.routes)
        self.collector = RedCollector(self.agg)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.pending: list[dict] = []
        self.agent = None
        self.server = None
        self._last_full: dict = {}
        self._next_kernel = self._next_full = self._next_gen = 0.0
        self.refresh_errors = 0

    def start(self, agent) -> None:
        self.agent = agent
        now = time.monotonic()
        self.refresh(now)            # kernel counters now; the rest at the first tick
        self._next_full = now
        try:
            self.server, _thread = start_http_server(self.port, self.host, registry=self.registry)
        except OSError as e:
            raise RedtapError(f"--metrics-addr {self.host}:{self.port}: cannot listen: "
                              f"[Errno {e.errno}] {e.strerror}") from e
        self.port = self.server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    def observe(self, rec: dict) -> None:
        self.pending.append(rec)

    def add_cells(self, cells) -> None:
        """Series counts of records the fast path rendered (pipeline/fastpath.py)."""
        self.agg.add_cells(cells)

    def tick(self, now: float) -> None:
        if self.pending:
            self.flush()
        if now >= self._next_kernel:
            self.refresh(now, full=now >= self._next_full)
        if now >= self._next_gen:
            if self._next_gen:
                self.agg.next_generation()
            self._next_gen = now + GEN_S

    def flush(self) -> None:
        batch, self.pending = self.pending, []
        self.agg.fold(batch)

    def refresh(self, now: float, full: bool = False) -> None:
        """Read counters on the agent's thread and publish them for scrapes."""
        agent = self.agent
        if agent is None or agent.tracer is None:
            return
        if full:
            try:
                c = agent.counters()  # scans the pending requests: not every second
            except Exception as e:  # noqa: BLE001 - metrics must not stop the agent
                self.refresh_errors += 1
                log.warning("metrics: reading the agent's counters: %s", e)
                c = {"kernel": {}, "agent": {}}
            self._last_full = {"lru_evicted_pending": c["kernel"].get("lru_evicted_pending", 0),
                               "pending_requests": c["agent"].get("pending_requests", 0),
                               "extra": {k: v for k, v in c.items()
                                         if k not in ("kernel", "agent", "routes")}}
            interval = getattr(agent.cfg, "stats_interval_s", 60.0)
            self._next_full = now + max(FULL_REFRESH_MIN_S, min(interval, 60.0))
        kernel = agent.tracer.stats()
        kernel["lru_evicted_pending"] = self._last_full.get("lru_evicted_pending", 0)
        st = agent.stats
        self.collector.snapshot = {
            "kernel": kernel,
            "agent": {"events": st.events, "bad_events": st.bad_events,
                      "idle_unanswered": st.idle_unanswered,
                      "pending_requests": self._last_full.get("pending_requests", 0),
                      **st.memory()},
            "extra": self._last_full.get("extra", {}),
            "route_overflow": self.routes.overflowed,
        }
        self._next_kernel = now + KERNEL_REFRESH_S

    def counters(self) -> dict:
        return {"metrics": {"series": len(self.agg.hist) + len(self.agg.unanswered),
                            "series_expired": self.agg.expired,
                            "refresh_errors": self.refresh_errors}}

    def stop(self) -> None:
        self.flush()
        self.refresh(time.monotonic(), full=False)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

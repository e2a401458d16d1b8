"""`redtap top`: a live R.E.D. view for people, from the agent's /metrics.

It scrapes `--metrics-url` every `--interval` seconds and, from the deltas
of the counters and histogram buckets over the last `--window` seconds,
shows per server (Kubernetes service, or address:port when no names are
known): requests/s, error % (5xx and unanswered), 4xx %, p50/p95/p99
latency (interpolated in the histogram buckets like PromQL's
histogram_quantile) and the busiest routes. The same functions turn one
scrape into the summary at the end of `make demo`.
"""
from __future__ import annotations

import math
import shutil
import sys
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field


CLEAR = "\x1b[H\x1b[2J"


def server_name(labels: dict) -> str:
    """The service a series belongs to: ns/service, ns/pod, or address:port."""
    ns = labels.get("k8s_namespace_name")
    for key in ("k8s_service_name", "k8s_pod_name"):
        if labels.get(key):
            return f"{ns}/{labels[key]}" if ns else labels[key]
    addr, port = labels.get("server_address", "?"), labels.get("server_port", "?")
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@dataclass
class Series:
    buckets: list  # [(le, cumulative count)] sorted by le, +Inf last
    count: float = 0.0
    sum: float = 0.0


@dataclass
class Scrape:
    """One /metrics page reduced to what the view needs."""
    t: float
    hist: dict = field(default_factory=dict)        # (server, route, method, status) -> Series
    unanswered: dict = field(default_factory=dict)  # (server, route, method) -> count


def parse(text: str, t: float | None = None) -> Scrape:
    # imported here: `redtap run` builds this command's parser but needs neither
    from prometheus_client.parser import text_string_to_metric_families

    from pyloader.output.metrics import DURATION, UNANSWERED
    s = Scrape(time.monotonic() if t is None else t)
    for fam in text_string_to_metric_families(text):
        if fam.name == DURATION:
            for smp in fam.samples:
                labels = dict(smp.labels)
                le = labels.pop("le", None)
                key = (server_name(labels), labels.get("http_route", ""),
                       labels.get("http_request_method", ""),
                       int(labels.get("http_response_status_code", "0")))
                ser = s.hist.setdefault(key, Series([]))
                if smp.name.endswith("_bucket"):
                    ser.buckets.append((float(le), smp.value))
                elif smp.name.endswith("_count"):
                    ser.count = smp.value
                elif smp.name.endswith("_sum"):
                    ser.sum = smp.value
        elif fam.name == UNANSWERED:
            for smp in fam.samples:
                if smp.name.endswith("_total"):
                    key = (server_name(smp.labels), smp.labels.get("http_route", ""),
                           smp.labels.get("http_request_method", ""))
                    s.unanswered[key] = s.unanswered.get(key, 0) + smp.value
    for ser in s.hist.values():
        ser.buckets.sort()
    return s


def quantile(q: float, buckets: list) -> float | None:
    """histogram_quantile over cumulative [(le, count)]; None without data."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_n = 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if math.isinf(le):
                return prev_le  # the highest finite bound, as PromQL does
            if n == prev_n:
                return le
            return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
        prev_le, prev_n = le, n
    return prev_le


@dataclass
class Red:
    """Requests, errors and the duration histogram of one group in a window."""
    requests: float = 0.0
    errors_5xx: float = 0.0
    client_4xx: float = 0.0
    unanswered: float = 0.0
    buckets: dict = field(default_factory=dict)  # le -> cumulative count

    def add(self, status: int, ser: "Series", old: "Series | None") -> None:
        n = _delta(ser.count, old.count if old else 0.0)
        self.requests += n
        if status >= 500:
            self.errors_5xx += n
        elif status >= 400:
            self.client_4xx += n
        olds = dict(old.buckets) if old else {}
        reset = old is not None and ser.count < old.count
        for le, c in ser.buckets:
            self.buckets[le] = self.buckets.get(le, 0.0) + (c if reset else c - olds.get(le, 0.0))

    def error_pct(self) -> float | None:
        total = self.requests + self.unanswered
        return 100.0 * (self.errors_5xx + self.unanswered) / total if total else None

    def q(self, q: float) -> float | None:
        return quantile(q, sorted(self.buckets.items()))


def _delta(new: float, old: float) -> float:
    return new - old if new >= old else new  # a restarted agent starts from zero


@dataclass
class Row:
    server: str
    total: float          # requests since the agent started (answered + unanswered)
    rate: float | None    # requests/s in the window (None: no window yet)
    red: Red
    routes: list          # [(route, rate, Red)], busiest first


def rows(new: Scrape, old: Scrape | None, elapsed: float | None = None,
         top_routes: int = 3) -> list[Row]:
    """R.E.D. per server between two scrapes (old None: since the agent started)."""
    elapsed = elapsed if elapsed is not None else (new.t - old.t if old else None)
    per_server: dict[str, Red] = {}
    per_route: dict[tuple, Red] = {}
    totals: dict[str, float] = {}
    for key, ser in new.hist.items():
        server, route, _method, status = key
        prev = old.hist.get(key) if old else None
        for red in (per_server.setdefault(server, Red()), per_route.setdefault((server, route), Red())):
            red.add(status, ser, prev)
        totals[server] = totals.get(server, 0.0) + ser.count
    for key, n in new.unanswered.items():
        server, route, _method = key
        d = _delta(n, old.unanswered.get(key, 0.0) if old else 0.0)
        per_server.setdefault(server, Red()).unanswered += d
        per_route.setdefault((server, route), Red()).unanswered += d
        totals[server] = totals.get(server, 0.0) + n
    out = []
    for server, red in per_server.items():
        rate = (red.requests + red.unanswered) / elapsed if elapsed else None
        routes = [(r, (x.requests + x.unanswered) / elapsed if elapsed else None, x)
                  for (s, r), x in per_route.items() if s == server and x.requests + x.unanswered]
        routes.sort(key=lambda t: (-(t[2].requests + t[2].unanswered), t[0]))
        out.append(Row(server, totals.get(server, 0.0), rate, red, routes[:top_routes]))
    out.sort(key=lambda r: (-(r.red.requests + r.red.unanswered), r.server))
    return out


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.2f}" if v < 10 else f"{v * 1000:.0f}"


def _num(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


HEAD = (f"{'SERVER / route':<34}{'TOTAL':>8}{'REQ/S':>9}{'ERR%':>7}{'4XX%':>7}"
        f"{'NO-RESP':>8}{'P50 ms':>9}{'P95 ms':>9}{'P99 ms':>9}")


def _line(name: str, total: str, rate, red: Red) -> str:
    req = red.requests + red.unanswered
    p4 = 100.0 * red.client_4xx / req if req else None
    return (f"{name[:33]:<34}{total:>8}{_num(rate):>9}{_num(red.error_pct()):>7}{_num(p4):>7}"
            f"{int(red.unanswered):>8}{_ms(red.q(0.5)):>9}{_ms(red.q(0.95)):>9}{_ms(red.q(0.99)):>9}")


def render(table: list[Row], title: str) -> str:
    lines = [title, "", HEAD, "-" * len(HEAD)]
    if not table:
        lines.append("(no HTTP requests traced yet)")
    for r in table:
        lines.append(_line(r.server, str(int(r.total)), r.rate, r.red))
        for route, rate, red in r.routes:
            lines.append(_line("  " + route, "", rate, red))
    return "\n".join(lines)


def fetch(url: str, timeout: float = 2.0) -> str:
    """GET the metrics page (no proxies: the agent is local)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as resp:
        return resp.read().decode("utf-8", "replace")


class LiveView:
    """Scrapes every `interval` seconds and renders the last `window` seconds."""

    def __init__(self, url: str, interval: float = 1.0, window: float = 10.0, top_routes: int = 3):
        self.url, self.interval, self.window, self.top_routes = url, interval, window, top_routes
        self.history: deque[Scrape] = deque()

    def frame(self) -> str:
        now = time.monotonic()
        stamp = time.strftime("%H:%M:%S")
        try:
            s = parse(fetch(self.url), now)
        except Exception as e:  # noqa: BLE001 - shown on screen, retried next second
            return f"redtap top  {stamp}  {self.url}\n\ncannot scrape: {e}"
        self.history.append(s)
        while len(self.history) > 2 and self.history[1].t <= now - self.window:
            self.history.popleft()
        old = self.history[0] if len(self.history) > 1 else None
        span = f"last {now - old.t:.0f}s" if old else "since start (rates from the next refresh)"
        title = f"redtap top  {stamp}  {self.url}  {span}"
        return render(rows(s, old, top_routes=self.top_routes), title)

    def run(self, frames: int | None = None, out=None) -> int:
        out = out or sys.stdout
        tty = out.isatty()
        n = 0
        next_t = time.monotonic()
        while frames is None or n < frames:
            text = self.frame()
            if tty:
                width = shutil.get_terminal_size().columns
                text = "\n".join(l[:width] for l in text.splitlines())
                out.write(CLEAR + text + "\n")
            else:
                out.write(text + "\n\n")
            out.flush()
            n += 1
            if frames is not None and n >= frames:
                break
            next_t += self.interval
            time.sleep(max(0.0, next_t - time.monotonic()))
        return 0


def add_parser(sub) -> None:
    p = sub.add_parser("top", help="live R.E.D. view from an agent's /metrics",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--metrics-url", default="http://127.0.0.1:9400/metrics",
                   help="the agent's metrics (run --metrics-addr); default %(default)s")
    p.add_argument("--interval", type=float, default=1.0, help="refresh every SECONDS (default 1)")
    p.add_argument("--window", type=float, default=10.0,
                   help="rates and quantiles over the last SECONDS (default 10)")
    p.add_argument("--routes", type=int, default=3, help="busiest routes shown per server")
    p.add_argument("--frames", type=int, default=None, help="stop after N refreshes")
    p.set_defaults(func=main)


def main(args) -> int:
    if args.interval <= 0 or args.window <= 0:
        print("redtap top: --interval and --window must be positive", file=sys.stderr)
        return 2
    view = LiveView(args.metrics_url, args.interval, args.window, args.routes)
    try:
        return view.run(args.frames)
    except KeyboardInterrupt:
        return 0

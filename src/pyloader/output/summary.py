"""A small R.E.D. aggregation per server endpoint (rate, errors, duration)."""
from __future__ import annotations

import time
from collections import defaultdict


def percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return 0.0
    i = min(len(sorted_vals) - 1, max(0, int(round(q * (len(sorted_vals) - 1)))))
    return sorted_vals[i]


class RedSummary:
    """Requests, 5xx errors, unanswered and latencies per server endpoint."""

    def __init__(self, max_samples: int = 100_000, started: float | None = None):
        self.started = time.monotonic() if started is None else started
        self.max_samples = max_samples
        self.count = defaultdict(int)
        self.errors = defaultdict(int)
        self.unanswered = defaultdict(int)
        self.durations = defaultdict(list)

    def add(self, rec: dict) -> None:
        addr = rec["server.address"]
        key = f"[{addr}]:{rec['server.port']}" if ":" in addr else f"{addr}:{rec['server.port']}"
        self.count[key] += 1
        status = rec.get("http.response.status_code")
        if status is None:
            self.unanswered[key] += 1
            return
        if status >= 500:
            self.errors[key] += 1
        d = self.durations[key]
        if len(d) < self.max_samples:
            d.append(rec["duration_ms"])

    def rows(self, until: float | None = None) -> list[dict]:
        """One row per server endpoint; rates over started..until (default: now)."""
        elapsed = max((until or time.monotonic()) - self.started, 1e-9)
        out = []
        for key in sorted(self.count):
            d = sorted(self.durations[key])
            n = self.count[key]
            out.append({"server": key, "requests": n, "rate_per_s": round(n / elapsed, 2),
                        "errors_5xx": self.errors[key], "unanswered": self.unanswered[key],
                        "error_pct": round(100.0 * (self.errors[key] + self.unanswered[key]) / n, 1),
                        "p50_ms": round(percentile(d, 0.5), 3), "p99_ms": round(percentile(d, 0.99), 3)})
        return out

    def table(self, until: float | None = None) -> str:
        rows = self.rows(until)
        w = max([28] + [len(r["server"]) + 2 for r in rows])
        head = f"{'server':<{w}}{'requests':>9}{'req/s':>9}{'5xx':>6}{'no-resp':>8}{'err%':>7}{'p50 ms':>9}{'p99 ms':>9}"
        lines = [head, "-" * len(head)]
        for r in rows:
            lines.append(f"{r['server']:<{w}}{r['requests']:>9}{r['rate_per_s']:>9}{r['errors_5xx']:>6}"
                         f"{r['unanswered']:>8}{r['error_pct']:>7}{r['p50_ms']:>9}{r['p99_ms']:>9}")
        return "\n".join(lines)

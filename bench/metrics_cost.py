#!/usr/bin/env python3
"""What R.E.D. metrics cost per event on the agent's hot path (a measurement, not a test).

Runs synthetic ring-buffer records through the agent's real batch loop
(Agent.handle_batch: decode, build, processors, access log to /dev/null,
observers, then the tickers as Agent.run calls them) in three setups and
prints microseconds per event:

  baseline        the pipeline as without this feature
  + routes        RouteComponent (http.route in every record)
  + metrics       RouteComponent + MetricsComponent (per-batch fold)

and, for comparison, a naive prometheus_client Histogram updated per event
through .labels(...).observe(), plus the cost of one scrape.

    .venv/bin/python bench/metrics_cost.py [--events 200000] [--batch 256]
No root, no kernel: the loop is fed from memory.
"""
from __future__ import annotations

import argparse
import random
import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from pyloader.kernel import abi
from pyloader.output.accesslog import AccessLog
from pyloader.pipeline.record import RecordBuilder
from pyloader.agent import Agent, AgentConfig
from pyloader.pipeline.component import overridden
from pyloader.output.metrics import BOUNDS_MS, MetricsComponent
from pyloader.pipeline.routes import RouteComponent, RouteTable

V4 = b"\x00" * 10 + b"\xff\xff"


def make_events(n: int, seed: int = 1) -> list[bytes]:
    """Raw events: 4 servers, ids in paths, a status mix, log-uniform durations."""
    rnd = random.Random(seed)
    out = []
    paths = ["/users/{a}/orders/{b}", "/api/v1/items/{a}", "/status/ready", "/static/app.js",
             "/cart/{h}", "/search"]
    for i in range(n):
        d_ns = int(10 ** rnd.uniform(4.7, 9.3))  # 50 µs .. 2 s
        req = 1_000_000_000 + i * 1000
        path = rnd.choice(paths).format(a=rnd.randrange(10**6), b=rnd.randrange(10**4),
                                        h="%012x" % rnd.getrandbits(48))
        url = (path + ("?q=1" if i % 7 == 0 else "")).encode()
        f = dict(zip(abi.EVENT_FIELDS, abi.EVENT_STRUCT.unpack(bytes(abi.EVENT_SIZE))))
        f.update(req_ns=req, resp_ns=req + d_ns, caddr=V4 + bytes([198, 18, 0, 20 + i % 8]),
                 saddr=V4 + bytes([198, 18, 0, 10 + i % 4]), cport=40000 + i % 1000,
                 sport=80, status=rnd.choice((200,) * 16 + (201, 404, 500, 503)),
                 url_len=len(url), method=1 + (i % 5 == 0) * 2, version=11, url=url)
        if "resp_last_ns" in f:
            f["resp_last_ns"] = req + d_ns
        if i % 97 == 0:
            f["flags"] = abi.EV_UNANSWERED
        out.append(abi.EVENT_STRUCT.pack(*(f[name] for name in abi.EVENT_FIELDS)))
    return out


def pipeline(components) -> Agent:
    """The agent's record pipeline as Agent.start wires it, without BPF."""
    a = Agent(AgentConfig(components=components))
    a.accesslog = AccessLog("/dev/null")
    a.builder = RecordBuilder()
    a.processors = overridden(components, "process")
    a.observers = [a.summary.add] + overridden(components, "observe")
    a.tickers = overridden(components, "tick")
    return a


def run(events: list[bytes], batch: int, components) -> float:
    a = pipeline(components)
    batches = [events[i:i + batch] for i in range(0, len(events), batch)]
    t0 = time.perf_counter()
    for b in batches:
        a.handle_batch(b)
        now = time.monotonic()
        for t in a.tickers:
            t(now)
    dt = time.perf_counter() - t0
    a.accesslog.close()
    return dt / len(events) * 1e6


def naive(events: list[bytes]) -> float:
    """prometheus_client's own Histogram, one .labels().observe() per event."""
    reg = CollectorRegistry()
    h = Histogram("x_seconds", "x", ["m", "s", "r", "a", "p"], registry=reg,
                  buckets=[b / 1000 for b in BOUNDS_MS])
    recs = []
    rc = RouteComponent()
    b = RecordBuilder()
    for raw in events:
        r = b.build(abi.decode_event(raw))
        rc.process(r)
        recs.append(r)
    t0 = time.perf_counter()
    for r in recs:
        s = r.get("http.response.status_code")
        if s is None:
            continue
        h.labels(r["http.request.method"], str(s), r["http.route"], r["server.address"],
                 str(r["server.port"])).observe(r["duration_ms"] / 1000)
    return (time.perf_counter() - t0) / len(recs) * 1e6


def isolated(events: list[bytes], batch: int) -> tuple[float, float]:
    """µs/event of RouteComponent.process and of MetricsComponent observe + per-batch
    fold alone, on records built beforehand (less noisy than the whole pipeline)."""
    b = RecordBuilder()
    recs = [b.build(abi.decode_event(raw)) for raw in events]
    t = RouteTable()
    rc, m = RouteComponent(t), MetricsComponent("127.0.0.1:0", t)
    t0 = time.perf_counter()
    for r in recs:
        rc.process(r)
    t1 = time.perf_counter()
    for i in range(0, len(recs), batch):
        for r in recs[i:i + batch]:
            m.observe(r)
        m.tick(time.monotonic())
    t2 = time.perf_counter()
    return (t1 - t0) / len(recs) * 1e6, (t2 - t1) / len(recs) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    events = make_events(args.events)
    holder = {}

    def with_metrics():
        t = RouteTable()
        holder["m"] = MetricsComponent("127.0.0.1:0", t)
        return [RouteComponent(t), holder["m"]]

    setups = {"base": lambda: [], "routes": lambda: [RouteComponent()], "full": with_metrics}
    best = {k: float("inf") for k in setups}
    iso_r = iso_m = float("inf")
    for _ in range(args.repeat):  # interleaved: a busy machine slows all setups alike
        for k, make in setups.items():
            best[k] = min(best[k], run(events, args.batch, make()))
        r, m = isolated(events, args.batch)
        iso_r, iso_m = min(iso_r, r), min(iso_m, m)
    nv = min(naive(events) for _ in range(args.repeat))
    m = holder["m"]
    t0 = time.perf_counter()
    page = generate_latest(m.registry)
    scrape_ms = (time.perf_counter() - t0) * 1000
    series = len(m.agg.hist) + len(m.agg.unanswered)
    base, routes, full = best["base"], best["routes"], best["full"]
    print(f"{args.events} events, batches of {args.batch}, best of {args.repeat}")
    print("whole pipeline (Agent.handle_batch + tickers):")
    print(f"  baseline (decode, build, log, summary)     {base:6.2f} µs/event")
    print(f"  + routes                                   {routes:6.2f} µs/event")
    print(f"  + routes + metrics                         {full:6.2f} µs/event")
    print("components alone:")
    print(f"  RouteComponent.process                     {iso_r:6.2f} µs/event")
    print(f"  MetricsComponent observe + batch fold      {iso_m:6.2f} µs/event  "
          f"({100 * iso_m / full:.0f}% of the whole pipeline)")
    print(f"  naive Histogram.labels(...).observe()      {nv:6.2f} µs/event  (comparison)")
    print(f"one scrape of {series} series: {scrape_ms:.1f} ms, {len(page)} bytes")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The agent's user-space pipeline alone (no kernel): CPU µs per event by stage.

Synthetic ring-buffer records (bench/metrics_cost.make_events: 4 servers, ids
in paths, a status mix) go through the agent's own code, stage by stage, in
batches as the ring buffer hands them over:

  decode    abi.decode_event
  build     accesslog.RecordBuilder.build
  redact    redact.Redactor.process          (on by default in `redtap run`)
  enrich    k8s_meta.K8sMeta.process         (names from a prefilled state:
                                              server pods, services, clients)
  routes    routes.RouteComponent.process
  render    accesslog.AccessLog.record       (structlog's JSON renderer, orjson)
  metrics   metrics.MetricsComponent observe + tick per batch
  write     accesslog.AccessLog.flush to a file (the writer thread included)

then the whole thing as the agent runs it (Agent.handle_batch + tickers with
those components, log to a file): the reference path; and the same through the
fast path (pipeline/fastpath.py with the C helper: Agent.handle_native), for
these events (ids in paths: most URLs new) and for the same events with the
4 URLs of a typical service (the parts of a URL computed once). Feeding the
helper's sink (libbpf's C callback in the agent, a ctypes call per record
here) is outside the timing. Times are CPU time of the process
(time.process_time: all threads), best of --repeat.

    .venv/bin/python bench/consumer.py [--events 100000] [--batch 256] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

from pyloader.kernel import abi
from pyloader.output.accesslog import AccessLog
from pyloader.pipeline.record import RecordBuilder
from pyloader.pipeline.component import overridden
from pyloader.k8s.meta import K8sMeta
from pyloader.output.metrics import MetricsComponent
from pyloader.pipeline.redact import Redactor
from pyloader.pipeline.routes import RouteComponent, RouteTable

from metrics_cost import make_events, pipeline

NODE = "node-a"


def k8s_component() -> K8sMeta:
    """K8sMeta with its state filled as its watches would: the 4 server pods of
    make_events (198.18.0.10-13, port 80) behind one Service each, and the 8
    client pods (198.18.0.20-27). No API, no threads."""
    from pyloader.lab.fakeobjs import make_pod, make_service, make_slice
    servers = [make_pod(f"web-{i}", [f"198.18.0.{10 + i}"], ns="shop", node=NODE,
                        labels={"app": f"web{i}"}, owner=("StatefulSet", f"web{i}"), started=0)
               for i in range(4)]
    clients = [make_pod(f"client-{i}", [f"198.18.0.{20 + i}"], node="node-b", ports=(),
                        started=0) for i in range(8)]
    services = [make_service(f"web{i}", {"app": f"web{i}"}, ns="shop") for i in range(4)]
    slices = [make_slice(f"web{i}-x", f"web{i}", [(f"198.18.0.{10 + i}", NODE, f"web-{i}")],
                         [(80, "http")], ns="shop") for i in range(4)]
    for i, obj in enumerate(servers + clients + services + slices):
        obj["metadata"].setdefault("uid", f"uid-{i}")
        obj["metadata"].setdefault("resourceVersion", str(i + 1))
    k = K8sMeta(NODE, api_client=None)
    now = 0.0  # known since the epoch: the synthetic events are dated near boot time
    k.state.apply("pods@node", "SYNC", servers, now)
    k.state.apply("pods", "SYNC", servers + clients, now)
    k.state.apply("services", "SYNC", services, now)
    k.state.apply("endpointslices", "SYNC", slices, now)
    return k


def _cpu() -> float:
    return time.process_time()


def stages(raws: list[bytes], batch: int, log_path: str) -> tuple[dict, dict]:
    """CPU seconds of each stage over all events, run in the agent's order;
    and how many records each component touched (to show it did its work)."""
    t: dict[str, float] = {}
    c0 = _cpu()
    evs = [abi.decode_event(r) for r in raws]
    t["decode"] = _cpu() - c0
    b = RecordBuilder()
    c0 = _cpu()
    recs = [b.build(e) for e in evs]
    t["build"] = _cpu() - c0
    table = RouteTable()
    comps = {"redact": Redactor(), "enrich": k8s_component(), "routes": RouteComponent(table)}
    for name, comp in comps.items():
        proc = comp.process
        c0 = _cpu()
        for r in recs:
            proc(r)
        t[name] = _cpu() - c0
    log = AccessLog(log_path)
    record = log.record
    c0 = _cpu()
    for r in recs:
        record(r)
    t["render"] = _cpu() - c0
    lines = list(log._lines)
    log._lines.clear()
    m = MetricsComponent("127.0.0.1:0", table)
    observe = m.observe
    c0 = _cpu()
    for i in range(0, len(recs), batch):
        for r in recs[i:i + batch]:
            observe(r)
        m.tick(time.monotonic())
    t["metrics"] = _cpu() - c0
    c0 = _cpu()
    for i in range(0, len(lines), batch):
        log._lines.extend(lines[i:i + batch])
        log.flush()
    log.close()  # waits for the writer thread: its CPU time is in process_time
    t["write"] = _cpu() - c0
    named = comps["enrich"].named
    return t, {"k8s_named": dict(named), "redacted_records": comps["redact"].records,
               "series": len(m.agg.hist), "log_lines": sum(1 for _ in open(log_path, "rb"))}


def whole(raws: list[bytes], batch: int, log_path: str) -> float:
    """The agent's batch loop with the CLI's components (redact, k8s, routes,
    metrics) writing to a file: CPU seconds for all events."""
    table = RouteTable()
    comps = [Redactor(), k8s_component(), RouteComponent(table),
             MetricsComponent("127.0.0.1:0", table)]
    a = pipeline(comps)
    a.accesslog = AccessLog(log_path)
    a.observers = overridden(comps, "observe")  # as `redtap run` without --summary
    batches = [raws[i:i + batch] for i in range(0, len(raws), batch)]
    c0 = _cpu()
    for bt in batches:
        a.handle_batch(bt)
        now = time.monotonic()
        for tk in a.tickers:
            tk(now)
    a.accesslog.close()
    return _cpu() - c0


def few_urls(raws: list[bytes]) -> list[bytes]:
    """The same events with one of 4 fixed URLs each (a service's usual few)."""
    urls = [b"/", b"/index.html", b"/api/v1/items", b"/status/ready"]
    out = []
    for i, r in enumerate(raws):
        f = list(abi.EVENT_STRUCT.unpack(r))
        u = urls[i % 4]
        f[abi.EVENT_FIELDS.index("url_len")] = len(u)
        f[abi.EVENT_FIELDS.index("url")] = u.ljust(abi.MAX_URL_LEN, b"\0")
        out.append(abi.EVENT_STRUCT.pack(*f))
    return out


def whole_native(raws: list[bytes], batch: int, log_path: str) -> float | None:
    """whole() through the fast path: CPU seconds of Agent.handle_native and the
    tickers for all events (None: the helper is not built)."""
    import ctypes
    from pyloader.pipeline import fastpath
    lib = fastpath.load_helper()
    if lib is None:
        return None
    sample = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p,
                              ctypes.c_size_t)(ctypes.cast(lib.rf_sample, ctypes.c_void_p).value)
    table = RouteTable()
    comps = [Redactor(), k8s_component(), RouteComponent(table),
             MetricsComponent("127.0.0.1:0", table)]
    a = pipeline(comps)
    a.accesslog = AccessLog(log_path)
    a.observers = overridden(comps, "observe")
    a.fast = fastpath.FastPath.create(a, lib)
    cpu = 0.0
    for i in range(0, len(raws), batch):
        for r in raws[i:i + batch]:
            sample(a.fast.ctx, r, len(r))
        c0 = _cpu()
        a.handle_native()
        now = time.monotonic()
        for tk in a.tickers:
            tk(now)
        cpu += _cpu() - c0
    c0 = _cpu()
    a.accesslog.close()
    return cpu + _cpu() - c0


def run(events: int = 100_000, batch: int = 256, repeat: int = 3) -> dict:
    raws = make_events(events)
    few = few_urls(raws)
    best: dict[str, float] = {}
    best_whole = float("inf")
    native = {"ids in paths": float("inf"), "4 URLs": float("inf")}
    info: dict = {}
    with tempfile.TemporaryDirectory(prefix="redtap-consumer-") as d:
        path = os.path.join(d, "access.log")
        for _ in range(repeat):  # interleaved: a busy machine slows all stages alike
            t, info = stages(raws, batch, path)
            os.unlink(path)
            for k, v in t.items():
                best[k] = min(best.get(k, float("inf")), v)
            best_whole = min(best_whole, whole(raws, batch, path))
            os.unlink(path)
            for name, evs in (("ids in paths", raws), ("4 URLs", few)):
                t_native = whole_native(evs, batch, path)
                if t_native is not None:
                    native[name] = min(native[name], t_native)
                    os.unlink(path)
    us = {k: round(v / events * 1e6, 3) for k, v in best.items()}
    return {"events": events, "batch": batch, "repeat": repeat, "stages_us": us,
            "stages_sum_us": round(sum(us.values()), 3),
            "pipeline_us": round(best_whole / events * 1e6, 3), "check": info,
            "native_pipeline_us": {k: round(v / events * 1e6, 3) for k, v in native.items()
                                   if v != float("inf")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    res = run(args.events, args.batch, args.repeat)
    if args.json:
        print(json.dumps(res, indent=1))
        return
    print(f"{res['events']} events, batches of {res['batch']}, CPU time, best of {res['repeat']}")
    for k, v in res["stages_us"].items():
        print(f"  {k:<8} {v:7.3f} µs/event")
    print(f"  {'sum':<8} {res['stages_sum_us']:7.3f} µs/event")
    print(f"whole pipeline (Agent.handle_batch + tickers): {res['pipeline_us']:.3f} µs/event")
    for k, v in res["native_pipeline_us"].items():
        print(f"whole pipeline, fast path ({k}): {v:.3f} µs/event")
    print(f"check: {res['check']}")


if __name__ == "__main__":
    main()

"""One cell of the benchmark: one configuration under one round of load.

    start the configuration
    warm-up     wrk, 1 s
    saturation  wrk keep-alive (window: BPF run stats, agent CPU, log lines)
    open loop   hey at a fixed rate (latency)
    stop the configuration: its final counters
"""
from __future__ import annotations

import time

from pyloader.kernel import abi

import loadgen
import probe


def run_cell(node, cfg, server, client, opts, rate: float | None) -> dict:
    """opts: warmup, seconds, open_seconds, conns, settle, workers, rate_cap. rate:
    open-loop requests/s (None: half of this cell's saturation rate, at most rate_cap)."""
    res: dict = {"config": cfg.name}
    stopped = False
    cfg.start()
    try:
        ids = probe.attached_prog_ids(node) if getattr(cfg, "traced", True) else None
        if ids is not None and not all(ids.values()):
            raise RuntimeError(f"{cfg.name}: redtap programs not found on the node's TC hooks")
        res["prog_ids"] = {k: sorted(v) for k, v in ids.items()} if ids else None
        res["agent_rss_kb_start"] = probe.rss_kb(cfg.pid) if cfg.log_path else None
        warm = loadgen.wrk(node, client, server, opts.warmup, opts.conns)
        time.sleep(opts.settle)
        rec0 = probe.count_log(cfg.log_path)[0] if cfg.log_path else None
        bpf0 = probe.prog_stats(ids) if ids else None
        cpu0 = probe.cpu_ticks_s(cfg.pid) if cfg.pid else None
        t0 = time.monotonic()
        sat = loadgen.wrk(node, client, server, opts.seconds, opts.conns)
        time.sleep(opts.settle)  # the agent drains what the last poll left
        cpu1 = probe.cpu_ticks_s(cfg.pid) if cfg.pid else None
        window = time.monotonic() - t0
        bpf1 = probe.prog_stats(ids) if ids else None
        rss = probe.rss_kb(cfg.pid) if cfg.pid else None
        rec1 = probe.count_log(cfg.log_path)[0] if cfg.log_path else None
        if rate is None:
            rate = min(sat["rps"] / 2, opts.rate_cap or float("inf"))
        ol = loadgen.hey(node, client, server, opts.open_seconds, rate, opts.workers)
        if hasattr(cfg, "scrape"):
            res["metrics_scrape_bytes"] = cfg.scrape()
        final = cfg.stop()
        stopped = True
    finally:
        if not stopped:
            try:
                cfg.stop()
            except Exception:  # noqa: BLE001 - the first error is the one to see
                pass
    res.update(saturation=sat, open_loop=ol, warmup_requests=warm["requests"])
    res["rps"] = sat["rps"]
    res["p50_ms"], res["p99_ms"] = sat["p50_ms"], sat["p99_ms"]
    res["ol_rps"], res["ol_p50_ms"], res["ol_p99_ms"] = ol["rps"], ol["p50_ms"], ol["p99_ms"]
    res["requests_client"] = warm["requests"] + sat["requests"] + ol["requests"]
    if bpf0 is not None:
        res["bpf"] = probe.bpf_delta(bpf0, bpf1, sat["requests"])
    if rec0 is not None:
        events = rec1 - rec0
        res["window_events"] = events
        res["window_s"] = round(window, 3)
        res["events_per_s"] = round(events / sat["duration_s"], 1)
        res["agent_cpu_s"] = round(cpu1 - cpu0, 3)
        res["agent_cpu_us_per_event"] = round((cpu1 - cpu0) * 1e6 / events, 2) if events else None
        res["agent_cpu_pct"] = round(100 * (cpu1 - cpu0) / window, 1)
        res["agent_rss_kb_now"] = rss
    if final:
        k = final.get("kernel", {})
        res["kernel"] = k
        res["losses"] = {n: k.get(n, 0) for n in abi.LOSS_STATS}
        res["losses"]["lru_evicted_pending"] = k.get("lru_evicted_pending", 0)
        log = final.get("log", {})
        if log:
            res["losses"]["log_dropped_lines"] = log.get("dropped_lines", 0)
            res["losses"]["log_write_errors"] = log.get("write_errors", 0)
        agent = final.get("agent", {})
        if "bad_events" in agent:
            res["losses"]["agent_bad_events"] = agent["bad_events"]
        res["max_rss_kb"] = agent.get("max_rss_kb") if cfg.log_path else None  # B: no agent
        res["holder_max_rss_kb"] = None if cfg.log_path else agent.get("max_rss_kb")
        res["agent_events"] = agent.get("events")
        res["log_records"] = final.get("log_records")
        for extra in ("k8s", "metrics", "routes", "redact"):
            if extra in final:
                res[extra] = final[extra]
    res["open_loop_rate"] = rate
    res["ol_rate_kept"] = ol["rps"] >= 0.95 * rate  # else hey fell behind: latency is its queue
    return res

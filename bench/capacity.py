"""Capacity: the highest request (= event) rate the full agent sustains for
30 s with zero ring-buffer drops and one log record per request.

First the load at saturation (wrk, several keep-alive connections): if the
agent keeps up there, its capacity on this machine is at least that rate and
the load generator and nginx are the limit. Otherwise open-loop rates (hey -q)
below it, highest first, until one is clean. Each attempt is a fresh agent
(configurations C and D of configs.py), whose redtap.exit counters cover
exactly that attempt.
"""
from __future__ import annotations

import time

from pyloader.kernel import abi

import loadgen

FRACTIONS = (0.75, 0.5, 0.3)


def judge(final: dict, load: dict, slack: int) -> dict:
    """Zero ring-buffer drops and every other loss counter zero; the log holds
    every event; events match the requests the client counted (within the
    requests in flight when the client stopped: at most one per connection)."""
    k = final["kernel"]
    losses = {n: k.get(n, 0) for n in abi.LOSS_STATS if k.get(n, 0)}
    dropped = final.get("log", {}).get("dropped_lines", 0)
    records = final["log_records"]
    ok = (k.get("ringbuf_full", 0) == 0 and not losses and not dropped
          and records == k.get("events") and abs(records - load["requests"]) <= slack)
    return {"ok": ok, "rps": load["rps"], "requests_client": load["requests"],
            "kernel_requests": k.get("requests"), "kernel_events": k.get("events"),
            "log_records": records, "ringbuf_full": k.get("ringbuf_full", 0),
            "losses": losses, "log_dropped_lines": dropped,
            "agent_cpu_s": final["agent"].get("cpu_s"),
            "max_rss_kb": final["agent"].get("max_rss_kb"),
            "p99_ms": load.get("p99_ms")}


def attempt(agent, run_load, slack: int) -> dict:
    agent.start()
    try:
        load = run_load()
        time.sleep(1.0)
    finally:
        final = agent.stop()
    return judge(final, load, slack)


def capacity(node, server, client, agent, seconds: float, conns: int, workers: int,
             deadline: float) -> dict:
    """agent: a configs.AgentRun (started and stopped once per attempt)."""
    per_try = seconds + 8  # agent start and stop
    if time.monotonic() + per_try > deadline:
        return {"seconds": seconds, "sustained_rps": None, "limited_by": "not run: out of "
                "time budget", "attempts": []}
    tries = []
    sat = attempt(agent, lambda: loadgen.wrk(node, client, server, seconds, conns), conns)
    sat.update(load="wrk saturation", target_rps=None)
    tries.append(sat)
    if sat["ok"]:
        return {"seconds": seconds, "sustained_rps": sat["rps"], "limited_by":
                "the load: nginx + wrk saturate the machine before the agent drops",
                "attempts": tries}
    for frac in FRACTIONS:
        if time.monotonic() + per_try > deadline:
            tries.append({"skipped": f"{frac:.2f} x saturation: out of time budget"})
            break
        rate = sat["rps"] * frac
        t = attempt(agent, lambda: loadgen.hey(node, client, server, seconds, rate, workers),
                    workers)
        t.update(load="hey open loop", target_rps=round(rate))
        tries.append(t)
        if t["ok"]:
            why = "the agent: drops at the next higher rate tried"
            if t["rps"] < 0.95 * rate:
                why += (f" (hey, asked for {rate:,.0f} req/s, reached only {t['rps']:,.0f}: "
                        "the rate in between is untested)")
            return {"seconds": seconds, "sustained_rps": t["rps"], "limited_by": why,
                    "attempts": tries}
    return {"seconds": seconds, "sustained_rps": None,
            "limited_by": "no clean rate found among those tried", "attempts": tries}

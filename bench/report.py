"""Summaries of the benchmark's cells: medians per configuration, ratios to A
from adjacent pairs, the machine description and the Markdown table."""
from __future__ import annotations

import datetime
import os
import platform
import statistics

def targets(result: dict) -> list[dict]:
    """The targets of issues #15 (agent) and #16 (kernel) against this run's
    medians: (target, measured, met)."""
    med, rat = result["summary"]["median"], result["summary"]["ratios"]
    cap = result.get("capacity") or {}
    cons = result.get("consumer") or {}

    def row(what, value, limit, higher_is_better=False):
        met = None if value is None else (value >= limit if higher_is_better else value <= limit)
        return {"target": what, "measured": value, "met": met}

    out = []
    # issue #15: the agent's per-event path
    for n, lim in (("D", 2.0), ("C", 1.5)):
        if n in med:
            out.append(row(f"#15 agent CPU µs per event ({n}) <= {lim}",
                           med[n]["agent_cpu_us_per_event"], lim))
    for name, us in (cons.get("native_pipeline_us") or {}).items():
        out.append(row(f"#15 consumer alone, whole D pipeline ({name}) <= 1.5 µs", us, 1.5))
    for n, lim in (("C", 0.93), ("D", 0.90)):
        if f"{n}/B" in rat:
            out.append(row(f"#15 {n}/B req/s >= {lim}", rat[f"{n}/B"]["rps"], lim, True))
    if "D" in cap:
        sat = next((a for a in cap["D"].get("attempts", []) if a.get("load") == "wrk saturation"),
                   None)
        if sat is not None:
            out.append({"target": "#15 D: 30 s at wrk's saturation, zero drops",
                        "measured": f"{sat['rps']:,.0f} req/s, losses {sat['losses'] or 0}",
                        "met": bool(sat["ok"])})
    for n, lim in (("C", 64), ("D", 96)):
        if n in med and med[n].get("max_rss_kb"):
            out.append(row(f"#15 agent peak RSS MB ({n}) <= {lim}",
                           round(med[n]["max_rss_kb"] / 1024, 1), lim))
    # issue #16: the kernel programs
    if "B" in med:
        out.append(row("#16 BPF ns per request (B) <= 1,000", med["B"]["bpf.ns_per_request"], 1000))
    if "B" in med and "F" in med:
        b, f = med["B"]["bpf.ns_per_request"], med["F"]["bpf.ns_per_request"]
        out.append(row("#16 B ns/req ÷ F ns/req (reference floor) <= 2.5",
                       round(b / f, 2) if b and f else None, 2.5))
    if "B/A" in rat:
        out.append(row("#16 B/A req/s >= 0.93", rat["B/A"]["rps"], 0.93, True))
    if "S" in med:
        for side in ("req", "resp"):
            out.append(row(f"#16 S ns per payload run, {side} <= 450",
                           med["S"][f"bpf.redtap_{side}_ns_per_run"], 450))
    return out


def machine() -> dict:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg_at_start": os.getloadavg()}


def _get(cell: dict, path: str):
    v = cell
    for part in path.split("."):
        if not isinstance(v, dict) or part not in v:
            return None
        v = v[part]
    return v


def median_of(cells: list[dict], path: str):
    vals = [v for v in (_get(c, path) for c in cells) if isinstance(v, (int, float))]
    return round(statistics.median(vals), 3) if vals else None


SUMMARY_FIELDS = ("rps", "p50_ms", "p99_ms", "ol_rps", "ol_p50_ms", "ol_p99_ms",
                  "bpf.ns_per_request", "bpf.runs_per_request", "bpf.redtap_req_ns_per_run",
                  "bpf.redtap_resp_ns_per_run", "agent_cpu_us_per_event", "agent_cpu_pct",
                  "events_per_s", "max_rss_kb")


def summarize(rounds: list[dict[str, dict]]) -> dict:
    """rounds: [{"A": cell, "B": cell, ...}, ...] -> medians and ratios."""
    names = [n for n in rounds[0]]
    out: dict = {"median": {}, "ratios": {}}
    for n in names:
        cells = [r[n] for r in rounds if n in r]
        out["median"][n] = {f: median_of(cells, f) for f in SUMMARY_FIELDS}
        out["median"][n]["losses_total"] = sum(sum(c.get("losses", {}).values()) for c in cells)
        out["median"][n]["log_records"] = sum(c.get("log_records") or 0 for c in cells) or None
        out["median"][n]["requests_client"] = sum(c.get("requests_client", 0) for c in cells)
        kept = sum(bool(c.get("ol_rate_kept")) for c in cells)
        out["median"][n]["ol_rate_kept"] = f"{kept}/{len(cells)}"
        out["median"][n]["errors"] = [c["error"] for c in cells if "error" in c]
    for n in names[1:]:
        ratios = {}
        for f in ("rps", "p99_ms", "ol_rps", "ol_p50_ms", "ol_p99_ms"):
            # each cell against the A of its own round, which ran just before it
            vals = [r[n][f] / r["A"][f] for r in rounds
                    if n in r and "A" in r and r[n].get(f) and r["A"].get(f)]
            ratios[f] = round(statistics.median(vals), 3) if vals else None
            ratios[f + "_per_round"] = [round(v, 3) for v in vals]
        out["ratios"][f"{n}/A"] = ratios
    for n in names:  # the consumer's share: against B (programs, no consumer) of the round
        if n in ("A", "B") or "B" not in names:
            continue
        vals = [r[n]["rps"] / r["B"]["rps"] for r in rounds
                if n in r and "B" in r and r[n].get("rps") and r["B"].get("rps")]
        out["ratios"][f"{n}/B"] = {"rps": round(statistics.median(vals), 3) if vals else None,
                                   "rps_per_round": [round(v, 3) for v in vals]}
    return out


def _fmt(v, nd=1):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}"


def markdown(result: dict) -> str:
    m, s = result["machine"], result["summary"]
    labels = result["labels"]
    why_rate = ("set by --rate" if not result.get("hey_max_rps") else
                f"half of the first A's saturation, at most {100 * result['hey_share']:.0f} % of "
                f"the {result['hey_max_rps']:,.0f} req/s hey reaches alone")
    lines = [
        "# redtap benchmark (`make bench`)", "",
        f"{m['date']} · {m['nproc']} CPUs · {m['cpu_model']} · kernel {m['kernel']} · "
        f"Python {m['python']} · load average at start {m['loadavg_at_start'][0]:.2f}", "",
        f"{result['rounds']} interleaved rounds ({' '.join(labels)} …), medians; ratios: "
        "each cell against the A of its round. nginx 1 worker on CPU 0, wrk/hey on CPU 1, "
        f"wrk {result['options']['conns']} connections {result['options']['seconds']} s, "
        f"hey open loop at {result['open_loop_rate'] or 0:,.0f} req/s "
        f"{result['options']['open_seconds']} s ({why_rate}; hey reports latency in 0.1 ms "
        "steps, and a worker that falls behind skips ticks: 'rate kept' counts the cells where "
        "hey held 95 % of the rate).", "",
        "| config | req/s | p50 ms | p99 ms | open loop: p50 / p99 ms (req/s, rate kept) | "
        "BPF ns/req | runs/req | ns/run req, resp | agent µs CPU/event | agent CPU % | events/s | "
        "log records / requests | losses | RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, med in s["median"].items():
        rss = med["max_rss_kb"] / 1024 if med.get("max_rss_kb") else None
        lines.append(
            f"| {n}: {labels[n]} | {_fmt(med['rps'], 0)} | {_fmt(med['p50_ms'], 3)} | "
            f"{_fmt(med['p99_ms'], 2)} | {_fmt(med['ol_p50_ms'], 1)} / {_fmt(med['ol_p99_ms'], 1)} "
            f"({_fmt(med['ol_rps'], 0)}, {med['ol_rate_kept']}) | "
            f"{_fmt(med['bpf.ns_per_request'], 0)} | {_fmt(med['bpf.runs_per_request'], 2)} | "
            f"{_fmt(med['bpf.redtap_req_ns_per_run'], 0)}, "
            f"{_fmt(med['bpf.redtap_resp_ns_per_run'], 0)} | "
            f"{_fmt(med['agent_cpu_us_per_event'], 2)} | {_fmt(med['agent_cpu_pct'], 0)} | "
            f"{_fmt(med['events_per_s'], 0)} | "
            f"{_fmt(med['log_records'])} / {_fmt(med['requests_client'])} | "
            f"{med['losses_total'] if n != 'A' else '–'} | {_fmt(rss, 1)} |"
            + (f" **{len(med['errors'])} failed cell(s)**" if med["errors"] else ""))
    lines += ["", "| ratio | req/s | wrk p99 | open-loop p50 | open-loop p99 |",
              "|---|---|---|---|---|"]
    for k, r in s["ratios"].items():
        lines.append(f"| {k} | {_fmt(r['rps'], 3)} | {_fmt(r.get('p99_ms'), 2)} | "
                     f"{_fmt(r.get('ol_p50_ms'), 2)} | {_fmt(r.get('ol_p99_ms'), 2)} |")
    for name, cap in (result.get("capacity") or {}).items():
        lines += ["", f"**Capacity of {name}** ({labels.get(name, name)}; "
                  f"{cap.get('seconds', '?')} s per attempt, zero drops and one record per "
                  f"request): {_fmt(cap.get('sustained_rps'), 0)} req/s — limited by "
                  f"{cap.get('limited_by')}."]
        for a in cap.get("attempts", []):
            if "skipped" in a:
                lines.append(f"- skipped: {a['skipped']}")
                continue
            target = f" at {a['target_rps']:,}" if a.get("target_rps") else ""
            lines.append(f"- {a['load']}{target}: {a['rps']:,.0f} req/s, "
                         f"{'clean' if a['ok'] else 'NOT clean'} (ringbuf_full "
                         f"{a['ringbuf_full']}, records {a['log_records']:,} / kernel events "
                         f"{a['kernel_events']:,} / client {a['requests_client']:,}"
                         f"{', losses ' + str(a['losses']) if a['losses'] else ''}; agent "
                         f"{a['agent_cpu_s']} s CPU, max RSS {a['max_rss_kb'] / 1024:.0f} MB)")
    cons = result.get("consumer")
    if cons:
        lines += ["", f"**Consumer pipeline alone** (bench/consumer.py, {cons['events']:,} "
                  "synthetic events, CPU µs per event by stage, best of "
                  f"{cons['repeat']}):", "", "| stage | µs/event |", "|---|---|"]
        for stage, us in cons["stages_us"].items():
            lines.append(f"| {stage} | {us:.2f} |")
        lines.append(f"| **whole pipeline, reference path (Agent.handle_batch)** | "
                     f"**{cons['pipeline_us']:.2f}** |")
        for name, us in (cons.get("native_pipeline_us") or {}).items():
            lines.append(f"| **whole pipeline, fast path (Agent.handle_native), {name}** | "
                         f"**{us:.2f}** |")
    lines += ["", "**Targets of issues #15 and #16** (this run's medians):", "",
              "| target | measured | met |", "|---|---|---|"]
    for t in result.get("targets", []):
        lines.append(f"| {t['target']} | {_fmt(t['measured'], 2)} | "
                     f"{'untested' if t['met'] is None else 'yes' if t['met'] else '**no**'} |")
    lines += ["", f"Notes: {result.get('notes', '')}"]
    return "\n".join(lines) + "\n"

#!/usr/bin/env python3
"""`make bench`: what redtap costs the traffic it watches (issue #7).

Builds the namespace test node (pyloader.lab.netnode.Node: nginx, 1 worker,
access_log off, on CPU 0 in pod0; the load from pod2 on CPU 1) and measures in
one run, interleaved (A B C D A B C D ...), the configurations of configs.py:

  A  no redtap
  N  no redtap, nginx's own JSON access log (buffered, same disk as C's log)
  B  programs attached to every port of cni0, no consumer (kernel_only.py)
  S  the same on the server pod's veth only (diagnostic: the client veth's share)
  F  the reference floor of issue 16 (bench/floor.bpf.c: parse, one endpoint hash
     lookup, a per-connection entry, one 64-byte record), attached as B
  C  the full agent (`python -m pyloader run --endpoint ...`, log to a file)
  D  the full agent with --metrics-addr and Kubernetes names (lab/fakeapi.py)
  M  C with its log on tmpfs (diagnostic: C - M is the log's disk)

each under wrk (keep-alive, saturation) and hey (open loop at half of A's
saturation rate); BPF run statistics (kernel.bpf_stats_enabled, bpftool) and
the agent's CPU (/proc/PID/stat) over the saturation window. Then the capacity
test (capacity.py) and the consumer pipeline alone (consumer.py).

Results: bench/results/latest.json and latest.md (printed at the end).
Needs root. Takes about 6-7 minutes with the defaults (--quick: about 2).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))

from pyloader.lab.netnode import Node

import capacity
import consumer
import floor
import probe
import report
from cell import run_cell
from configs import AgentFull, AgentRun, KernelOnly, NginxLog, NoRedtap
from loadgen import hey_max, start_nginx

TMPFS_LOG_DIR = "/dev/shm"  # M: C with its log here
HEY_SHARE = 0.5  # the open-loop rate stays below this share of hey's own ceiling

RESULTS = os.path.join(HERE, "results")
SERVER_POD, CLIENT_POD = 0, 2  # the demo cluster's web pod and client-a

NOTES = ("B drains the ring buffer with a C no-op callback (kernel_only.py) so the "
         "programs take the same path as under the agent. F = the reference floor of issue 16 "
         "(bench/floor.bpf.c), attached and drained as B; B/F is redtap's cost over it. S = B on the server pod's veth only: "
         "B - S is what the runs on the client pod's veth (early exits) cost. BPF ns/req = run_time_ns of both "
         "programs over wrk's requests in the saturation window (bpf_stats itself adds two "
         "clock reads per run). Agent CPU = utime+stime of the agent process over the same "
         "window divided by the records it logged then. Log records / requests: every "
         "record vs every request the clients counted in the configuration's life (wrk "
         "does not count requests still in flight when it stops). RSS: the agent's max_rss_kb "
         "(redtap.exit). Numbers from a machine shared with other work vary between rounds.")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0, help="wrk saturation run")
    ap.add_argument("--open-seconds", type=float, default=5.0, help="hey open-loop run")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--conns", type=int, default=16, help="wrk connections")
    ap.add_argument("--workers", type=int, default=50, help="hey workers")
    ap.add_argument("--rate", type=float, default=None,
                    help="open-loop rate (default: half of the first A's saturation rate)")
    ap.add_argument("--settle", type=float, default=0.5)
    ap.add_argument("--capacity-seconds", type=float, default=30.0)
    ap.add_argument("--no-capacity", action="store_true")
    ap.add_argument("--no-k8s", action="store_true", help="D without Kubernetes names")
    ap.add_argument("--configs", default="ANBFSCD", help="which, in this order each round")
    ap.add_argument("--budget", type=float, default=570.0,
                    help="seconds; capacity attempts that would overrun it are skipped")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 1 round of 3 s, capacity 10 s")
    ap.add_argument("--out", default=RESULTS)
    a = ap.parse_args(argv)
    a.rate_cap = None
    if a.quick:
        a.rounds, a.seconds, a.open_seconds, a.capacity_seconds = 1, 3.0, 2.0, 10.0
    return a


def make_configs(node: Node, endpoint: str, which: str, k8s: bool) -> list:
    out = []
    for n in which:
        if n == "A":
            out.append(NoRedtap())
        elif n == "B":
            out.append(KernelOnly(node, endpoint))
        elif n == "F":
            out.append(KernelOnly(node, endpoint, floor=True))
        elif n == "S":
            out.append(KernelOnly(node, endpoint, ifaces=(node.pods[SERVER_POD].veth,)))
        elif n == "C":
            out.append(AgentRun(node, endpoint))
        elif n == "D":
            out.append(AgentFull(node, endpoint, k8s=k8s))
        elif n == "N":
            out.append(NginxLog(node, node.pods[SERVER_POD]))
        elif n == "M":
            out.append(AgentRun(node, endpoint, log_dir=TMPFS_LOG_DIR))
        else:
            raise SystemExit(f"unknown configuration {n!r} (A, N, B, F, S, C, M, D)")
    return out


def run_round(args, node: Node, cfgs: list, r: int, rate, rounds: list):
    """One round: every configuration once, in order. Returns the open-loop rate
    (fixed by the first cell that measured one)."""
    server, client = node.pods[SERVER_POD], node.pods[CLIENT_POD]
    cells = {}
    for cfg in cfgs:
        t = time.monotonic()
        try:
            cell = run_cell(node, cfg, server, client, args, rate)
        except Exception as e:  # noqa: BLE001 - keep the other cells' numbers
            traceback.print_exc()
            cells[cfg.name] = {"config": cfg.name, "round": r, "error": repr(e)}
            print(f"round {r + 1}/{args.rounds} {cfg.name}: FAILED: {e}", flush=True)
            continue
        rate = rate or cell["open_loop_rate"]
        cell["round"], cell["cell_s"] = r, round(time.monotonic() - t, 1)
        cells[cfg.name] = cell
        losses = sum(cell.get("losses", {}).values())
        print(f"round {r + 1}/{args.rounds} {cfg.name}: {cell['rps']:,.0f} req/s, "
              f"p99 {cell['p99_ms']} ms, open loop p99 {cell['ol_p99_ms']} ms "
              f"at {cell['ol_rps']:,.0f} req/s"
              + (f", BPF {cell['bpf']['ns_per_request']} ns/req" if "bpf" in cell else "")
              + (f", agent {cell['agent_cpu_us_per_event']} µs/event"
                 if cell.get("agent_cpu_us_per_event") else "")
              + (f", losses {losses}" if cfg.name != "A" else "")
              + f"  [{cell['cell_s']} s]", flush=True)
    rounds.append(cells)
    return rate


def measure(args, node: Node, t_start: float) -> dict:
    server, client = node.pods[SERVER_POD], node.pods[CLIENT_POD]
    start_nginx(node, server)
    endpoint = f"{server.ip}:80"
    if "F" in args.configs:
        floor.build()  # before the cells: F's starts load it
    cfgs = make_configs(node, endpoint, args.configs, not args.no_k8s)
    rate = args.rate
    calib = {}
    if rate is None:
        calib["hey_max_rps"] = hey_max(node, client, server, workers=args.workers)
        calib["hey_share"] = HEY_SHARE
        args.rate_cap = HEY_SHARE * calib["hey_max_rps"]
        print(f"hey alone reaches {calib['hey_max_rps']:,.0f} req/s: open-loop rate "
              f"= min(A's saturation / 2, {args.rate_cap:,.0f})", flush=True)
    rounds: list[dict] = []
    try:
        for r in range(args.rounds):
            rate = run_round(args, node, cfgs, r, rate, rounds)
        result = {"rounds": len(rounds), "cells": rounds, "open_loop_rate": rate, **calib,
                  "labels": {c.name: c.label for c in cfgs},
                  "summary": report.summarize(rounds), "capacity": {}}
        for cfg in cfgs:
            if cfg.name not in ("C", "D") or args.no_capacity:
                continue
            print(f"capacity of {cfg.name}: {args.capacity_seconds:g} s per attempt", flush=True)
            try:
                cap = capacity.capacity(node, server, client, cfg, args.capacity_seconds,
                                        args.conns, args.workers, t_start + args.budget)
            except Exception as e:  # noqa: BLE001 - keep what was measured
                traceback.print_exc()
                cap = {"sustained_rps": None, "limited_by": f"failed: {e!r}", "attempts": []}
            result["capacity"][cfg.name] = cap
            for a in cap["attempts"]:
                print(f"  {a}", flush=True)
    finally:
        for cfg in cfgs:
            if hasattr(cfg, "close"):
                cfg.close()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("make bench needs root (namespaces, bpf())", file=sys.stderr)
        return 1
    # SIGTERM (a timeout, make interrupted) unwinds like Ctrl-C: teardown runs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.monotonic()
    result: dict = {"machine": report.machine(), "options": {
        k: v for k, v in vars(args).items() if k not in ("out",)}, "notes": NOTES}
    switch = probe.BpfStatsSwitch()
    node = Node(pods=4)
    print(f"namespace node {node.node_ns} (pods {node.tag}-pod0..3)", flush=True)
    try:
        node.setup()
        result.update(measure(args, node, t_start))
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        node.teardown()
        switch.restore()
    print("consumer pipeline alone ...", flush=True)
    try:
        result["consumer"] = consumer.run(events=50_000 if args.quick else 100_000,
                                          repeat=1 if args.quick else 3)
    except Exception as e:  # noqa: BLE001 - the load results are still worth writing
        traceback.print_exc()
        result["consumer_error"] = repr(e)
    result["targets"] = report.targets(result)
    result["elapsed_s"] = round(time.monotonic() - t_start, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "latest.json"), "w") as f:
        json.dump(result, f, indent=1, sort_keys=False)
        f.write("\n")
    md = report.markdown(result)
    with open(os.path.join(args.out, "latest.md"), "w") as f:
        f.write(md)
    print()
    print(md)
    print(f"({result['elapsed_s']} s; written to {args.out}/latest.json and latest.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

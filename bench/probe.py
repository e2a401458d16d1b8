"""What the benchmark reads around a load window: BPF program run statistics
(kernel.bpf_stats_enabled, bpftool), a process's CPU time (/proc/PID/stat) and
the access-log lines written so far."""
from __future__ import annotations

import json
import os
import subprocess

from pyloader.lab.netnode import Node

BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"
PROGS = ("redtap_req", "redtap_resp")


class BpfStatsSwitch:
    """Turns kernel.bpf_stats_enabled on; restore() puts the old value back."""

    def __init__(self):
        with open(BPF_STATS) as f:
            self.old = f.read().strip()
        with open(BPF_STATS, "w") as f:
            f.write("1")

    def restore(self) -> None:
        with open(BPF_STATS, "w") as f:
            f.write(self.old)


def attached_prog_ids(node: Node) -> dict[str, set[int]]:
    """Ids of the redtap programs attached to TC hooks in the node namespace
    (those of the instance this benchmark started, not other runs on the machine)."""
    cp = node.ns_exec(node.node_ns, "bpftool", "-j", "net", "show", check=False, timeout=30)
    if cp.returncode != 0:
        raise RuntimeError(f"bpftool net show: {cp.stderr.strip()}")
    ids: dict[str, set[int]] = {p: set() for p in PROGS}
    for block in json.loads(cp.stdout or "[]"):
        for entry in block.get("tc", []):
            name = entry.get("name", "").replace(":", "_")  # the filter's name, "redtap:req"
            for p in PROGS:
                if name.startswith(p) and "id" in entry:
                    ids[p].add(int(entry["id"]))
    return ids


def prog_stats(ids: dict[str, set[int]]) -> dict[str, tuple[int, int]]:
    """(run_time_ns, run_cnt) per program name, summed over its ids."""
    out = {}
    for name, group in ids.items():
        rt = cnt = 0
        for i in group:
            cp = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(i)],
                                capture_output=True, text=True, timeout=30)
            if cp.returncode != 0:
                raise RuntimeError(f"bpftool prog show id {i}: {cp.stderr.strip()}")
            info = json.loads(cp.stdout)
            rt += int(info.get("run_time_ns", 0))
            cnt += int(info.get("run_cnt", 0))
        out[name] = (rt, cnt)
    return out


def bpf_delta(before: dict, after: dict, requests: int) -> dict:
    """ns per run of each program, runs per request, BPF ns per request."""
    res: dict = {"requests": requests}
    total_rt = total_cnt = 0
    for name in before:
        rt = after[name][0] - before[name][0]
        cnt = after[name][1] - before[name][1]
        total_rt, total_cnt = total_rt + rt, total_cnt + cnt
        res[f"{name}_runs"] = cnt
        res[f"{name}_ns_per_run"] = round(rt / cnt, 1) if cnt else None
    res["runs_per_request"] = round(total_cnt / requests, 2) if requests else None
    res["ns_per_request"] = round(total_rt / requests, 1) if requests else None
    return res


def cpu_ticks_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields after "comm)": state is [0], utime is field 14 of the line -> [11]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def count_log(path: str) -> tuple[int, list[dict]]:
    """(access-log records, the event lines parsed) of a log file so far.
    Records are the lines without an "event" key."""
    records, events = 0, []
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return 0, []
    with f:
        for line in f:
            if b'"event":"redtap.' in line:
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass  # a line cut by the writer in progress
            elif line.endswith(b"\n"):
                records += 1
    return records, events

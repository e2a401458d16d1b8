#!/usr/bin/env python3
"""What each stage of redtap's TC program costs, on the bench's real packets.

    stages.py [--pairs N] [--passes P] [--json FILE]      (root)

Builds bench-only variants of the object (src/bpf/stagecut.bpf.h: -DSTAGE_CUT=n
returns at a cut point, -DSTAGE_NO_<stage> removes a stage) and the reference
floor (bench/floor.bpf.c), loads each, and runs keep-alive request/response pairs
of bench/packets.json (16 connections, round robin) through the programs of the
server pod's veth (redtap_pod_req, redtap_pod_resp) with BPF_PROG_TEST_RUN, one
run per call. A stage's ns: the difference of two variants' medians (cut points:
the one before; removals: the full program minus the variant). Variants are
measured in interleaved passes; the ring buffer is emptied between batches.

"test_run entry" is what BPF_PROG_TEST_RUN itself adds to a run (cut at the
program's entry); "program" excludes it.

--baseline REV also builds the object of git revision REV (e.g. main) and
measures its full run in the same passes: a before/after from one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILD = os.path.join(ROOT, "build", "stages")

from packets import Frames

NEVER_WAKE = 0xFFFFFFFF

VARIANTS = {  # name -> clang -D flags
    "full": [],
    "cut1": ["-DSTAGE_CUT=1"],
    "cut2": ["-DSTAGE_CUT=2"],
    "cut3": ["-DSTAGE_CUT=3"],
    "cut4": ["-DSTAGE_CUT=4"],
    "no_claim": ["-DSTAGE_NO_CLAIM=1"],
    "no_scan": ["-DSTAGE_NO_SCAN=1"],
    "no_pending": ["-DSTAGE_NO_PENDING=1"],
    "no_ringbuf": ["-DSTAGE_NO_RINGBUF=1"],
    "no_stats": ["-DSTAGE_NO_STATS=1"],
}

# (row, how): ("cut", a, b) = b - a; ("removed", v) = full - v
ROWS = [
    ("test_run entry (not the program)", ("abs", "cut1")),
    ("parse Eth/IP/TCP", ("cut", "cut1", "cut2")),
    ("endpoint lookup", ("cut", "cut2", "cut3")),
    ("conn key + clock + conn lookup", ("cut", "cut3", "cut4")),
    ("claim + release", ("removed", "no_claim")),
    ("head scan (byte loop, windows)", ("removed", "no_scan")),
    ("pending push / lookup / pop", ("removed", "no_pending")),
    ("ringbuf reserve + fill + submit", ("removed", "no_ringbuf")),
    ("counters (stats map)", ("removed", "no_stats")),
]


def cflags() -> list[str]:
    return subprocess.run(["sh", "src/bpf/cflags.sh"], cwd=ROOT, check=True, text=True,
                          capture_output=True).stdout.split()


def build_baseline(rev: str) -> str:
    """The object of git revision @rev (its src/bpf and vmlinux.h)."""
    src = os.path.join(BUILD, "baseline-src")
    subprocess.run(["rm", "-rf", src], check=True)
    os.makedirs(src)
    tar = subprocess.run(["git", "archive", rev, "src/bpf", "vmlinux.h"], cwd=ROOT, check=True,
                         capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", src], input=tar, check=True)
    path = os.path.join(BUILD, "baseline.bpf.o")
    subprocess.run([os.environ.get("CLANG", "clang"), *cflags(), "-c", "src/bpf/redtap.bpf.c",
                    "-o", path], cwd=src, check=True)
    return path


def load_baseline(path: str, endpoint: str):
    """A baseline object with only what every revision has: the LPM endpoint map
    (an IP:PORT entry), the pod-side programs, the ring buffer."""
    from pyloader.kernel import abi
    from pyloader.kernel.endpoints import parse_endpoint
    from pyloader.libbpf.object import BpfObject
    obj = BpfObject.open(path)
    obj.set_rodata("wakeup_bytes", NEVER_WAKE.to_bytes(4, "little"))
    obj.load()
    obj.map("endpoints").update(parse_endpoint(endpoint).key(),
                                bytes([abi.EP_TRACED | abi.EP_PORT]))
    return obj, obj.program("redtap_pod_req"), obj.program("redtap_pod_resp")


def build(names) -> dict[str, str]:
    os.makedirs(BUILD, exist_ok=True)
    out = {}
    for name in names:
        path = os.path.join(BUILD, f"{name}.bpf.o")
        subprocess.run([os.environ.get("CLANG", "clang"), *cflags(), *VARIANTS[name], "-c",
                        "src/bpf/redtap.bpf.c", "-o", path], cwd=ROOT, check=True)
        out[name] = path
    import floor
    out["floor"] = floor.build()
    return out


class Subject:
    """One loaded variant: its two programs, a ring buffer reader, the frames."""

    def __init__(self, name: str, path: str, frames: Frames):
        from pyloader.libbpf.ringbuf import RingBuffer
        self.name, self.frames = name, frames
        self.req_ns: list[int] = []
        self.resp_ns: list[int] = []
        if name == "baseline":
            self.obj, self.req, self.resp = load_baseline(path, frames.endpoint)
            events_fd = self.obj.map("events").fd
            self.close_obj = self.obj.close
        elif name == "floor":
            import floor
            self.obj = floor.load(path, [frames.endpoint])
            self.req, self.resp = floor.programs(self.obj)
            events_fd = self.obj.map("events").fd
            self.close_obj = self.obj.close
        else:
            from pyloader.kernel.endpoints import parse_endpoint
            from pyloader.kernel.tracer import Tracer
            t = Tracer.load(path, wakeup_bytes=NEVER_WAKE)
            t.endpoints.set([parse_endpoint(frames.endpoint)])
            self.req, self.resp, events_fd = t.pod_req, t.pod_resp, t.events_fd
            self.close_obj = t.close
        self.rb = RingBuffer(events_fd)

    def run(self, pairs: int, keep: bool = True) -> None:
        for i in range(pairs):
            q, r = self.frames.next_pair()
            _, _, dq = self.req.test_run(q)
            _, _, dr = self.resp.test_run(r)
            if keep:
                self.req_ns.append(dq)
                self.resp_ns.append(dr)
            if i % 1000 == 999:
                self.rb.consume()
        self.rb.consume()

    def close(self) -> None:
        self.rb.close()
        self.close_obj()


def measure(objs: dict[str, str], pairs: int, passes: int) -> dict:
    subjects = {n: Subject(n, p, Frames()) for n, p in objs.items()}
    try:
        for s in subjects.values():
            s.run(200, keep=False)  # connections tracked, caches warm
        for _ in range(passes):
            for s in subjects.values():
                s.run(pairs)
        return {n: {"req": statistics.median(s.req_ns), "resp": statistics.median(s.resp_ns),
                    "runs": len(s.req_ns)} for n, s in subjects.items()}
    finally:
        for s in subjects.values():
            s.close()


def table(med: dict) -> list[dict]:
    rows = []
    for label, how in ROWS:
        if how[0] == "abs":
            v = {side: med[how[1]][side] for side in ("req", "resp")}
        elif how[0] == "cut":
            v = {side: med[how[2]][side] - med[how[1]][side] for side in ("req", "resp")}
        else:
            v = {side: med["full"][side] - med[how[1]][side] for side in ("req", "resp")}
        rows.append({"stage": label, **v})
    named = sum(r["req"] for r in rows[1:]), sum(r["resp"] for r in rows[1:])
    prog = {side: med["full"][side] - med["cut1"][side] for side in ("req", "resp")}
    rows.append({"stage": "rest (walk, framing, state writes)", "req": prog["req"] - named[0],
                 "resp": prog["resp"] - named[1]})
    rows.append({"stage": "**program (full - entry)**", **prog})
    rows.append({"stage": "full run as measured", "req": med["full"]["req"],
                 "resp": med["full"]["resp"]})
    if "baseline" in med:
        rows.append({"stage": f"baseline ({med['baseline']['rev']}), full run",
                     "req": med["baseline"]["req"], "resp": med["baseline"]["resp"]})
    if "floor" in med:
        rows.append({"stage": "reference floor (bench/floor.bpf.c), full run",
                     "req": med["floor"]["req"], "resp": med["floor"]["resp"]})
        rows.append({"stage": "reference floor, program (- entry)",
                     "req": med["floor"]["req"] - med["cut1"]["req"],
                     "resp": med["floor"]["resp"] - med["cut1"]["resp"]})
    for r in rows:
        r["pair"] = r["req"] + r["resp"]
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Per-stage cost (bench/stages.py; {meta['date']}, load average "
             f"{meta['loadavg'][0]:.2f}; median ns per run over {meta['runs']:,} runs of each "
             f"program; BPF_PROG_TEST_RUN on the bench's packets, server veth programs)", "",
             "| stage | request run | response run | pair |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['req']:.0f} | {r['resp']:.0f} | {r['pair']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=500, help="pairs per variant per pass")
    ap.add_argument("--passes", type=int, default=20)
    ap.add_argument("--baseline", metavar="REV", help="also measure revision REV's full run")
    ap.add_argument("--json", help="also write the table here (JSON)")
    ap.add_argument("--md", help="and here (Markdown)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("stages.py needs root (bpf())", file=sys.stderr)
        return 1
    objs = build(VARIANTS)
    if a.baseline:
        objs["baseline"] = build_baseline(a.baseline)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "loadavg": os.getloadavg(), "runs": a.pairs * a.passes}
    med = measure(objs, a.pairs, a.passes)
    if a.baseline:
        med["baseline"]["rev"] = a.baseline
    rows = table(med)
    md = markdown(rows, meta)
    print(md)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "medians": med, "rows": rows}, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

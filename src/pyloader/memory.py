"""The agent's own memory, as the kernel counts it."""
from __future__ import annotations


def rss_kb() -> tuple[int, int]:
    """(RSS now, peak RSS) of this process image in kB (VmRSS, VmHWM). Not
    ru_maxrss: that survives exec, so it would report the parent's size at
    fork (e.g. a big test runner)."""
    now = peak = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    now = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return now, peak

"""Optional parts plugged into the agent (metadata, metrics, live view, ...).

A component overrides only what it needs; the agent calls:
  start(agent)    after the BPF object is loaded and attached
  process(rec)    for every access-log record, before it is written
                  (enrichment, redaction, route templates: mutate rec in place)
  observe(rec)    for every record after it is written (metrics, summaries)
  tick(now)       once per loop iteration (now = time.monotonic()); keep it cheap
  counters()      extra counters for the redtap.stats / redtap.exit lines
  stop()          at shutdown, after the last batch
"""
from __future__ import annotations


class Component:
    name = "component"
    # which of the stages pipeline/fastpath.py knows this is (None: none of them;
    # the agent then renders every record the reference way)
    fast_role: str | None = None

    def start(self, agent) -> None:
        pass

    def process(self, rec: dict) -> None:
        pass

    def observe(self, rec: dict) -> None:
        pass

    def tick(self, now: float) -> None:
        pass

    def counters(self) -> dict:
        return {}

    def stop(self) -> None:
        pass


def overridden(components, method: str) -> list:
    """Bound methods of the components that override @method (hot-path lists)."""
    return [getattr(c, method) for c in components
            if getattr(type(c), method) is not getattr(Component, method)]

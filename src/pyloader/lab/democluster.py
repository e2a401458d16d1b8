"""redtap on a simulated Flannel VXLAN cluster: one agent per node.

Run as root:  python -m pyloader.lab.democluster   (or `make demo-cluster`)

It builds pyloader.lab.netcluster's default topology (two nodes on an underlay,
pods on each node's cni0, VXLAN between the nodes, kube-proxy DNAT for two
ClusterIP Services, a hostNetwork server), serves the test Kubernetes API
(lab/fakeapi.py) on the underlay and starts one agent per node namespace with
only --kubeconfig and --node-name. It drives every path a request can take
(netcluster.default_scenarios(), then keep-alive bursts across nodes), prints
the records of all agents merged as they arrive, tagged with the node that
recorded them, and checks the union: every request the clients made exactly
once. Then the same traffic with --attach bridge (one hook on cni0), and a
table of what each mode recorded. Everything is torn down at the end, also on
Ctrl-C or SIGTERM. Exit status 1 if the veths run is not exact.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import time

from pyloader.lab.demo import (PollingTail, find_event, format_record, read_lines, records,
                               run_torn_down)
from pyloader.lab.netcluster import Cluster, default_scenarios, render

START_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 15.0


def log(msg: str = "") -> None:
    print(msg, flush=True)


def key(r: dict) -> str:
    return r["url.path"] + (f"?{r['url.query']}" if "url.query" in r else "")


class Agents:
    """One `redtap run` per node namespace, each configured by the API only."""

    def __init__(self, cluster: Cluster, api, attach: str):
        self.logs, self.procs = {}, {}
        for n in cluster.nodes:
            path = os.path.join(cluster.dir, f"{n.name}-{attach}.log")
            with open(path + ".stderr", "wb") as err:
                self.procs[n.name] = cluster.spawn(
                    n.ns, sys.executable, "-m", "pyloader", "run", "--log", path,
                    "--stats-interval", "0.5", "--idle-timeout", "5",
                    *cluster.agent_args(n, api.kc, attach), stderr=err)
            self.logs[n.name] = path

    def wait_ready(self) -> None:
        """Until every agent traces its node's endpoints and has listed every watch."""
        end = time.monotonic() + START_TIMEOUT_S
        waiting = set(self.logs)
        while waiting and time.monotonic() < end:
            for name in sorted(waiting):
                lines = read_lines(self.logs[name])
                eps, stats = find_event(lines, "redtap.endpoints"), find_event(lines, "redtap.stats")
                watch = (stats or {}).get("k8s", {}).get("watch", {})
                if eps and watch and all(w["synced"] for w in watch.values()):
                    log(f"  {name}: agent pid {self.procs[name].pid} traces "
                        f"{', '.join(eps['endpoints'])}")
                    waiting.discard(name)
                elif self.procs[name].poll() is not None:
                    with open(self.logs[name] + ".stderr", errors="replace") as f:
                        raise RuntimeError(f"{name}: the agent exited:\n{f.read()}")
            time.sleep(0.1)
        if waiting:
            raise RuntimeError(f"agents not ready after {START_TIMEOUT_S}s: {sorted(waiting)}")

    def records(self) -> dict[str, list[dict]]:
        return {name: records(read_lines(path)) for name, path in self.logs.items()}

    def settle(self, want: int) -> dict[str, list[dict]]:
        """The records, once there are @want of them or they stop coming."""
        end, last, since = time.monotonic() + SETTLE_TIMEOUT_S, -1, time.monotonic()
        while time.monotonic() < end:
            n = sum(len(r) for r in self.records().values())
            if n >= want:
                time.sleep(0.5)  # extras would show up too
                break
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since > 7:  # past the idle timeout: nothing more comes
                break
            time.sleep(0.1)
        return self.records()

    def stop(self) -> dict[str, int]:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        return {name: p.wait(timeout=30) for name, p in self.procs.items()}


class MergedTail(PollingTail):
    """Prints the new records of every node's log as they come, tagged with the node."""

    def __init__(self, logs: dict[str, str]):
        super().__init__("merged-tail")
        self.logs, self.done = logs, {name: 0 for name in logs}

    def drain(self) -> None:
        new = []
        for name, path in self.logs.items():
            lines = read_lines(path)
            new += [(r["time"], name, r) for r in records(lines)[self.done[name]:]]
            self.done[name] = len(records(lines))
        for _, name, r in sorted(new, key=lambda x: x[0]):
            log(f"  [{name}]{format_record(r)}")


def drive(cluster: Cluster, tag: str, show: bool) -> dict[str, list[str]]:
    """Every scenario, then keep-alive bursts: scenario -> the paths requested."""
    out: dict[str, list[str]] = {}
    for i, sc in enumerate(default_scenarios()):
        if show:
            log(f"> {sc.what}: {sc.client} -> {sc.target} ({cluster.url(sc.target, '')}), "
                f"{sc.requests} requests")
        paths, codes = cluster.run(sc, f"{tag}{i}")
        if codes != [200] * sc.requests:
            raise RuntimeError(f"{sc.what}: status codes {codes}")
        out[f"{sc.what}: {sc.client} -> {sc.target}"] = paths
        time.sleep(0.3 if show else 0)
    for client, target in (("client-1", "web-0"), ("client-0", "web-1")):
        p = cluster.pod(target)
        if show:
            log(f"> keep-alive across nodes: {client} -> {target}, 10 requests on one connection")
        cp = cluster.traffic(cluster.client_ns(client), "keepalive", p.ip, str(p.spec.port), "10",
                             f"/status/{tag}-ka-{client}-{{i}}")
        out[f"keep-alive across nodes: {client} -> {target}"] = [
            json.loads(line)["path"] for line in cp.stdout.splitlines() if line.strip()]
        time.sleep(0.3 if show else 0)
    return out


def run_mode(cluster: Cluster, api, attach: str, show: bool):
    """One agent per node in @attach mode, the traffic: (requested, records by node)."""
    log(f"\n== --attach {attach}: one agent per node ==")
    agents = Agents(cluster, api, attach)
    tail = None
    try:
        agents.wait_ready()
        if show:
            tail = MergedTail(agents.logs)
            tail.start()
        requested = drive(cluster, attach[0], show)
        recs = agents.settle(sum(len(p) for p in requested.values()))
    finally:
        if tail:
            tail.stop()
        codes = agents.stop()
    if any(codes.values()):
        raise RuntimeError(f"agents exited with {codes}")
    return requested, recs


def check(requested: dict[str, list[str]], recs: dict[str, list[dict]]) -> bool:
    made = collections.Counter(p for ps in requested.values() for p in ps)
    got = collections.Counter(key(r) for rs in recs.values() for r in rs)
    per_node = ", ".join(f"{name} {len(rs)}" for name, rs in recs.items())
    log(f"\nclients made {sum(made.values())} requests; records: {per_node}; "
        f"{sum(1 for p in made if got[p] == 1)} requests recorded once, "
        f"{sum(1 for p in made if got[p] > 1)} more than once, "
        f"{sum(1 for p in made if not got[p])} not at all")
    return got == made


def table(runs: dict[str, tuple]) -> None:
    log("\nanswered requests recorded per scenario, by attach mode:")
    first = next(iter(runs.values()))[0]
    log(f"  {'scenario':<72} {'requests':>8} " + " ".join(f"{m:>8}" for m in runs))
    totals, unanswered = collections.Counter(), []
    for i, name in enumerate(first):
        row = []
        for mode, (requested, recs) in runs.items():
            paths = set(list(requested.values())[i])
            mine = [r for rs in recs.values() for r in rs if key(r) in paths]
            row.append(sum(1 for r in mine if "http.response.status_code" in r))
            totals[mode] += row[-1]
            if len(mine) > row[-1]:
                unanswered.append(f"{mode}: {name}: {len(mine) - row[-1]}")
        log(f"  {name:<72} {len(first[name]):>8} " + " ".join(f"{n:>8}" for n in row))
    total = sum(len(p) for p in first.values())
    log(f"  {'total':<72} {total:>8} " + " ".join(f"{totals[m]:>8}" for m in runs))
    for u in unanswered:  # seen half: the request, not its response (see README)
        log(f"  logged as unanswered (the response was not seen) in {u}")


def run(cluster: Cluster, compare: bool) -> int:
    log(render(cluster.topo, cluster.tag) + "\n")
    cluster.setup()
    api = cluster.start_api()
    log(f"Kubernetes API (lab/fakeapi.py) on {api.url}, reachable from every node")
    try:
        runs = {"veths": run_mode(cluster, api, "veths", show=True)}
        ok = check(*runs["veths"])
        log("each request exactly once, by the node hosting its server: " +
            ("OK" if ok else "MISMATCH"))
        if compare:
            runs["bridge"] = run_mode(cluster, api, "bridge", show=False)
            table(runs)
            log("--attach bridge misses what is bridged between two ports of cni0: "
                "same-node pod-to-pod, also through a ClusterIP (see README)")
    finally:
        api.stop()
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyloader.lab.democluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-compare", dest="compare", action="store_false",
                    help="skip the second run with --attach bridge")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("redtap cluster demo: must run as root (network namespaces, BPF); "
              "try: sudo make demo-cluster", file=sys.stderr)
        return 1
    return run_torn_down(Cluster, lambda cluster: run(cluster, args.compare))


if __name__ == "__main__":
    sys.exit(main())

"""Kubernetes metadata: this node's endpoints in the kernel map, and the names
of both ends of every record, right for the time of the request.

Watches (k8s_watch.ListWatch, one thread each):
  pods@node        fieldSelector spec.nodeName=<node>: the pods whose
                   IP:containerPort the kernel traces, and the server names.
                   Small, and the map depends on nothing else.
  pods             every pod of the cluster (--no-k8s-all-pods: off): names of
                   clients on other nodes. The heavy one; the map never waits for it.
  endpointslices   discovery.k8s.io/v1: server IP:port -> Service name (the
                   slice's kubernetes.io/service-name), and ports of this
                   node's endpoints that no containerPort declares.
  services         a slice names its Service only while that Service exists
                   (slices outlive a deleted Service until garbage collection).
ReplicaSets are fetched on demand (GET) to name a pod's Deployment.

Time-aware lookups: every IP (and, for hostNetwork pods, node-IP:port) keeps a
history of holders with validity intervals; a record is named by the holder at
its own time, so a reused pod IP never lends the old pod's name to the new
pod's requests, nor the new name to old requests reported late. A holder's
interval starts when its network was ready (PodReadyToStartContainers, else its
first container start; never after we saw it) and ends when we see it deleted
or terminal (Succeeded/Failed pods keep status.podIP but no longer hold it),
or when another pod claims the IP, whichever is first.

hostNetwork pods share the node's IPs: as servers they are named by
node-IP:containerPort; as clients they are indistinguishable from the host, so
never named. Unknown ends get no fields: nothing is guessed.

The API is never needed to trace: until the node's pods and the slices have
been listed the map keeps what the flags gave (none: every server), and is
then the flags plus this node's endpoints; during an outage the last
known state stays. Events are applied on the agent's thread (tick/process), so
lookups and map writes need no locks.
"""
from __future__ import annotations

import calendar
import collections
import time

from pyloader.pipeline.component import Component
from pyloader.kernel.endpoints import parse_endpoint
from pyloader.k8s.state import MetaState, PodInfo
from pyloader.k8s.watch import ListWatch, OwnerGetter, Timing


class RecordTime:
    """rec["time"] ('2024-05-01T12:00:00.123456Z') -> epoch seconds, cached per second."""

    def __init__(self):
        self.cache: dict[str, int] = {}

    def __call__(self, s: str) -> float:
        sec = self.cache.get(s[:19])
        if sec is None:
            if len(self.cache) > 64:
                self.cache.clear()
            sec = self.cache[s[:19]] = calendar.timegm(time.strptime(s[:19], "%Y-%m-%dT%H:%M:%S"))
        return sec + int(s[20:26] or 0) / 1e6


class K8sMeta(Component):
    name = "k8s"
    fast_role = "k8s"

    def __init__(self, node: str, api_client, all_pods: bool = True,
                 timing: Timing | None = None, retention_s: float = 900.0):
        self.state = MetaState(node)
        self.api, self.all_pods, self.timing = api_client, all_pods, timing or Timing()
        self.retention_s = retention_s
        self.inbox: collections.deque = collections.deque()
        self.rec_time = RecordTime()
        self.watchers: list[ListWatch] = []
        self.owners: OwnerGetter | None = None
        self.table = None
        self.logged: set | None = None
        self.next_prune = 0.0
        self.named = {"client": 0, "server": 0, "service": 0}
        self.changes = 0  # state changes applied (names may differ since)

    def start(self, agent) -> None:
        from kubernetes import client
        self.table, self.static = agent.tracer.endpoints, set(agent.cfg.endpoints)
        self.accesslog = agent.accesslog
        core, disc = client.CoreV1Api(self.api), client.DiscoveryV1Api(self.api)
        specs = [("pods@node", core.list_pod_for_all_namespaces, f"spec.nodeName={self.state.node}"),
                 ("endpointslices", disc.list_endpoint_slice_for_all_namespaces, None),
                 ("services", core.list_service_for_all_namespaces, None)]
        if self.all_pods:
            specs.append(("pods", core.list_pod_for_all_namespaces, None))
        for src, call, fs in specs:
            sink = (lambda s: lambda typ, payload, now: self.inbox.append((s, typ, payload, now)))(src)
            self.watchers.append(ListWatch(src, call, sink, fs, self.timing))
        self.owners = OwnerGetter(self.api, self.timing)
        for th in [*self.watchers, self.owners]:
            th.start()

    def drain(self) -> None:
        apply, inbox = self.state.apply, self.inbox
        while inbox:
            apply(*inbox.popleft())
            self.changes += 1

    def generation(self) -> tuple:
        """Changes when any name a record may get can have changed (watch events
        applied, history pruned, a workload resolved): names cached by the
        pipeline's fast path are dropped then."""
        return self.changes, len(self.owners.results) if self.owners else 0

    def names_span(self, rec: dict) -> tuple[float, float]:
        """The record times around this record's for which its connection's
        names stay what they are (with generation() unchanged)."""
        return self.state.names_span(rec["client.address"], rec["server.address"],
                                     rec["server.port"], self.rec_time(rec["time"]))

    def tick(self, now: float) -> None:
        if self.inbox:
            self.drain()
        # the map needs both sources listed once: this node's pods and the slices
        if self.state.dirty and self.watchers and self.watchers[0].synced \
                and self.watchers[1].synced:
            self.sync_endpoints()
        if now >= self.next_prune:
            self.next_prune = now + 30
            self.state.prune(time.time() - self.retention_s)
            self.changes += 1

    def sync_endpoints(self) -> None:
        """The kernel map := flags + this node's endpoints (keys added and removed
        in place: nothing is detached, in-flight requests stay paired)."""
        self.state.dirty = False
        texts = self.state.endpoints()
        self.table.set(self.static | {parse_endpoint(t) for t in texts})
        for p in self.state.node_pods.pods.values():
            if p.owner and p.owner[0] == "ReplicaSet" and p.live:
                self.owners.want(p.namespace, p.owner[1])
        if texts != self.logged:
            self.logged = texts
            self.accesslog.event("redtap.endpoints", source="k8s", node=self.state.node,
                                 endpoints=sorted(str(e) for e in self.table.current),
                                 host_endpoints=[str(e) for e in self.table.host_endpoints])
            self.accesslog.flush()

    def workload(self, p: PodInfo) -> tuple | None:
        if p.owner and p.owner[0] == "ReplicaSet":
            return self.owners.results.get((p.namespace, p.owner[1])) if self.owners else None
        return p.owner

    def process(self, rec: dict) -> None:
        if self.inbox:
            self.drain()
        st = self.state
        t = self.rec_time(rec["time"])
        c = st.client(rec["client.address"], t)
        if c is not None:
            rec["client.k8s.pod.name"] = c.name
            rec["client.k8s.namespace.name"] = c.namespace
            self.named["client"] += 1
        addr, port = rec["server.address"], rec["server.port"]
        s = st.server(addr, port, t)
        if s is not None:
            rec["server.k8s.pod.name"] = s.name
            rec["server.k8s.namespace.name"] = s.namespace
            self.named["server"] += 1
        svc = st.slices.names.at((addr, port), t)
        if svc:
            rec["server.k8s.service.name"] = svc
            self.named["service"] += 1
        if s is not None:
            wl = self.workload(s)
            if wl:
                rec["server.k8s.workload.name"] = wl[1]
                rec["server.k8s.workload.kind"] = wl[0]

    def counters(self) -> dict:
        st = self.state
        return {"k8s": {
            "node": st.node, "node_pods": len(st.node_pods.pods),
            "cluster_pods": len(st.all_pods.pods), "slices": len(st.slices.slices),
            "services": len(st.services), "bad_objects": st.bad_objects,
            "endpoints": len(self.logged or ()), "named": dict(self.named),
            "owner_errors": self.owners.errors if self.owners else 0,
            "watch": {w.what: w.counters() for w in self.watchers}}}

    def stop(self) -> None:
        for th in [*self.watchers, *([self.owners] if self.owners else [])]:
            th.stop()

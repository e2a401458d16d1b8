"""What the Kubernetes watches told, kept for time-aware lookups (single-threaded).

Timeline     key -> value over time, intervals that never overlap
PodIndex     one pod watch's pods; ip -> pod and (hostNetwork) node-ip:port -> pod
SliceIndex   EndpointSlices; (ip, port) -> Service names, gated by existing Services
MetaState    all of it, fed by (source, type, payload, time) from the watches;
             bad objects are counted and dropped
See k8s_meta.py for the rules (interval starts and ends, hostNetwork pods).
"""
from __future__ import annotations

import collections
import ipaddress
import logging
from dataclasses import dataclass
from datetime import datetime

log = logging.getLogger("redtap.k8s")

TERMINAL = ("Succeeded", "Failed")
INF = float("inf")
SERVICE_LABEL = "kubernetes.io/service-name"


class BadObject(ValueError):
    pass


def _ip(text) -> str:
    return str(ipaddress.ip_address(str(text)))


def api_time(text) -> float | None:
    """metav1.Time ('2024-05-01T12:00:00Z') -> epoch seconds."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class PodInfo:
    uid: str
    name: str
    namespace: str
    node: str
    ips: tuple
    host_network: bool
    ports: tuple              # TCP container ports
    owner: tuple | None       # (kind, name) of the controller
    live: bool                # holds its IPs (not Succeeded/Failed)
    since: float | None       # network ready (epoch s)


def parse_pod(obj) -> PodInfo:
    try:
        md, spec, st = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        ips = tuple(_ip(p["ip"]) for p in st.get("podIPs") or [])
        if not ips and st.get("podIP"):
            ips = (_ip(st["podIP"]),)
        if not ips and spec.get("hostNetwork"):  # its IPs are the node's
            ips = tuple(_ip(p["ip"]) for p in st.get("hostIPs") or []) or \
                ((_ip(st["hostIP"]),) if st.get("hostIP") else ())
        ports = tuple(sorted({int(p["containerPort"]) for c in spec.get("containers") or []
                              for p in c.get("ports") or []
                              if (p.get("protocol") or "TCP") == "TCP"}))
        owner = next(((str(r["kind"]), str(r["name"])) for r in md.get("ownerReferences") or []
                      if r.get("controller")), None)
        since = next((api_time(c.get("lastTransitionTime")) for c in st.get("conditions") or []
                      if c.get("type") == "PodReadyToStartContainers"
                      and c.get("status") == "True"), None)
        if since is None:
            started = [api_time(s.get("startedAt")) for cs in st.get("containerStatuses") or []
                       for s in (cs.get("state") or {}).values() if isinstance(s, dict)]
            since = min((t for t in started if t), default=None)
        return PodInfo(str(md["uid"]), str(md["name"]), str(md.get("namespace") or ""),
                       str(spec.get("nodeName") or ""), ips, bool(spec.get("hostNetwork")),
                       ports, owner, st.get("phase") not in TERMINAL, since)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadObject(f"pod: {type(e).__name__}: {e}") from None


class Timeline:
    """key -> value over time: at(key, t) is the value whose interval holds t.
    Intervals of one key never overlap; same(a, b) says two values are one
    holder (its value is then updated in place)."""

    def __init__(self, same=lambda a, b: a == b):
        self.d: dict = {}
        self.same = same

    def set(self, key, value, start: float) -> None:
        h = self.d.setdefault(key, [])
        if h:
            last = h[-1]
            if last[1] is None:
                if self.same(last[2], value):
                    last[2] = value
                    return
                start = max(start, last[0])
                last[1] = start
            else:
                start = max(start, last[1])
        h.append([start, None, value])

    def clear(self, key, at: float, holder=None) -> None:
        """Close the open interval (only if it is @holder's, when given)."""
        h = self.d.get(key)
        if h and h[-1][1] is None and (holder is None or self.same(h[-1][2], holder)):
            h[-1][1] = max(at, h[-1][0])

    def at(self, key, t: float):
        for start, end, value in reversed(self.d.get(key, ())):
            if start <= t:
                return value if end is None or t < end else None
        return None

    def span(self, key, t: float) -> tuple:
        """(at(key, t), lo, hi): at(key, u) is that same value for every u in [lo, hi)."""
        h = self.d.get(key, ())
        nxt = INF
        for start, end, value in reversed(h):
            if start <= t:
                if end is None or t < end:
                    return value, start, INF if end is None else end
                return None, end, nxt
            nxt = start
        return None, -INF, nxt

    def prune(self, before: float) -> None:
        for key in list(self.d):
            h = [iv for iv in self.d[key] if iv[1] is None or iv[1] >= before]
            if h:
                self.d[key] = h
            else:
                del self.d[key]


def _same_pod(a, b) -> bool:
    return a.uid == b.uid


class PodIndex:
    """The pods one watch reports, and who held which IP when."""

    def __init__(self):
        self.pods: dict[str, PodInfo] = {}
        self.ips = Timeline(_same_pod)     # ip -> PodInfo (not hostNetwork)
        self.host = Timeline(_same_pod)    # (node ip, port) -> PodInfo (hostNetwork)
        self.gone: dict[str, float] = {}   # uid -> when deleted (late events ignored)

    @staticmethod
    def keys(p: PodInfo | None):
        if p is None or not p.live:
            return set(), set()
        if p.host_network:
            return set(), {(ip, port) for ip in p.ips for port in p.ports}
        return set(p.ips), set()

    def upsert(self, p: PodInfo, now: float) -> None:
        if p.uid in self.gone:
            return
        old_ips, old_host = self.keys(self.pods.get(p.uid))
        ips, host = self.keys(p)
        start = now if p.since is None else min(now, p.since)
        for k in old_ips - ips:
            self.ips.clear(k, now, p)
        for k in old_host - host:
            self.host.clear(k, now, p)
        for k in ips:
            self.ips.set(k, p, start)
        for k in host:
            self.host.set(k, p, start)
        self.pods[p.uid] = p

    def remove(self, uid: str, now: float) -> None:
        p = self.pods.pop(uid, None)
        self.gone[uid] = now
        ips, host = self.keys(p)
        for k in ips:
            self.ips.clear(k, now, p)
        for k in host:
            self.host.clear(k, now, p)

    def sync(self, pods: list[PodInfo], now: float) -> None:
        for p in pods:  # claims first: a reused IP passes to its new holder at its start
            self.gone.pop(p.uid, None)
            self.upsert(p, now)
        for uid in set(self.pods) - {p.uid for p in pods}:
            self.remove(uid, now)

    def prune(self, before: float) -> None:
        self.ips.prune(before)
        self.host.prune(before)
        self.gone = {u: t for u, t in self.gone.items() if t >= before}


@dataclass(frozen=True)
class SliceInfo:
    uid: str
    namespace: str
    service: str
    eps: tuple  # (addr, port, nodeName)


def parse_slice(obj) -> SliceInfo:
    try:
        md = obj["metadata"]
        if obj.get("addressType") not in ("IPv4", "IPv6"):
            return SliceInfo(str(md["uid"]), str(md.get("namespace") or ""), "", ())
        ports = [int(p["port"]) for p in obj.get("ports") or []
                 if p.get("port") is not None and (p.get("protocol") or "TCP") == "TCP"]
        eps = tuple((_ip(a), port, str(ep.get("nodeName") or ""))
                    for ep in obj.get("endpoints") or [] for a in ep.get("addresses") or []
                    for port in ports)
        svc = str((md.get("labels") or {}).get(SERVICE_LABEL) or "")
        return SliceInfo(str(md["uid"]), str(md.get("namespace") or ""), svc, eps)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadObject(f"endpointslice: {type(e).__name__}: {e}") from None


class SliceIndex:
    """(addr, port) -> names of the Services whose slices list it, over time."""

    def __init__(self):
        self.slices: dict[str, SliceInfo] = {}
        self.by_key: dict[tuple, set] = collections.defaultdict(set)
        self.services: set | None = None  # existing (ns, name); None: not listed yet
        self.names = Timeline()

    def _recompute(self, keys, now: float) -> None:
        for key in keys:
            names = set()
            for uid in self.by_key.get(key, ()):
                s = self.slices[uid]
                if s.service and (self.services is None
                                  or (s.namespace, s.service) in self.services):
                    names.add(s.service)
            if names:
                self.names.set(key, ",".join(sorted(names)), now)
            else:
                self.names.clear(key, now)
            if not self.by_key.get(key):
                self.by_key.pop(key, None)

    def put(self, s: SliceInfo | None, uid: str, now: float) -> None:
        old = self.slices.pop(uid, None)
        affected = {(a, p) for a, p, _ in old.eps} if old else set()
        for key in affected:
            self.by_key[key].discard(uid)
        if s is not None:
            self.slices[uid] = s
            for a, p, _ in s.eps:
                self.by_key[(a, p)].add(uid)
                affected.add((a, p))
        self._recompute(affected, now)

    def sync(self, slices: list[SliceInfo], now: float) -> None:
        keep = {s.uid for s in slices}
        for uid in set(self.slices) - keep:
            self.put(None, uid, now)
        for s in slices:
            self.put(s, s.uid, now)

    def set_services(self, services: set, now: float) -> None:
        changed = services ^ (self.services or set()) if self.services is not None else None
        self.services = services
        self._recompute([(a, p) for s in self.slices.values()
                         if changed is None or (s.namespace, s.service) in changed
                         for a, p, _ in s.eps], now)


def _svc_key(obj) -> tuple[str, str]:
    md = obj["metadata"]
    return (str(md.get("namespace") or ""), str(md["name"]))


class MetaState:
    """Everything the watches told, and the lookups. Single-threaded."""

    def __init__(self, node: str):
        self.node = node
        self.node_pods = PodIndex()
        self.all_pods = PodIndex()
        self.slices = SliceIndex()
        self.services: set = set()
        self.bad_objects = 0
        self.dirty = False  # this node's endpoints may have changed

    def _parse_all(self, objects, parse) -> list:
        """The objects of a list that parse; the others are counted (bad_objects)."""
        good = []
        for o in objects:
            try:
                good.append(parse(o))
            except BadObject:
                self.bad_objects += 1
        return good

    def apply(self, source: str, typ: str, payload, now: float) -> None:
        try:
            if source in ("pods@node", "pods"):
                idx = self.node_pods if source == "pods@node" else self.all_pods
                if typ == "SYNC":
                    idx.sync(self._parse_all(payload, parse_pod), now)
                elif typ == "DELETED":
                    idx.remove(str(payload["metadata"]["uid"]), now)
                else:
                    idx.upsert(parse_pod(payload), now)
                self.dirty |= idx is self.node_pods
            elif source == "endpointslices":
                if typ == "SYNC":
                    self.slices.sync(self._parse_all(payload, parse_slice), now)
                else:
                    s = parse_slice(payload)
                    self.slices.put(None if typ == "DELETED" else s, s.uid, now)
                self.dirty = True
            elif source == "services":
                if typ == "SYNC":
                    self.services = {_svc_key(o) for o in payload
                                     if isinstance(o, dict) and "metadata" in o}
                elif typ == "DELETED":
                    self.services.discard(_svc_key(payload))
                else:
                    self.services.add(_svc_key(payload))
                self.slices.set_services(set(self.services), now)
        except (BadObject, KeyError, TypeError) as e:
            self.bad_objects += 1
            log.info("k8s %s %s: dropped a bad object: %s", source, typ, e)

    def endpoints(self) -> set[str]:
        """IP:port text of every endpoint on this node (pods and slices)."""
        out, local_ips = set(), set()
        for p in self.node_pods.pods.values():
            if p.live and p.node == self.node:
                out.update(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
                           for ip in p.ips for port in p.ports)
                if not p.host_network:
                    local_ips.update(p.ips)
        for s in self.slices.slices.values():
            for addr, port, node in s.eps:
                if node == self.node or (not node and addr in local_ips):
                    out.add(f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}")
        return out

    def server(self, addr: str, port: int, t: float) -> PodInfo | None:
        return (self.node_pods.host.at((addr, port), t) or self.node_pods.ips.at(addr, t)
                or self.all_pods.host.at((addr, port), t) or self.all_pods.ips.at(addr, t))

    def client(self, addr: str, t: float) -> PodInfo | None:
        return self.all_pods.ips.at(addr, t) or self.node_pods.ips.at(addr, t)

    def _server_lookups(self, addr: str, port: int):
        return ((self.node_pods.host, (addr, port)), (self.node_pods.ips, addr),
                (self.all_pods.host, (addr, port)), (self.all_pods.ips, addr))

    def names_span(self, caddr: str, saddr: str, sport: int, t: float) -> tuple[float, float]:
        """[lo, hi) around t in which client(), server() and the slices' service
        names of this connection give what they give at t (the lookups as made)."""
        lo, hi = -INF, INF
        for lookups in (((self.all_pods.ips, caddr), (self.node_pods.ips, caddr)),
                        self._server_lookups(saddr, sport),
                        ((self.slices.names, (saddr, sport)),)):
            for timeline, key in lookups:  # as `a or b or ...` evaluates them
                value, a, b = timeline.span(key, t)
                lo, hi = max(lo, a), min(hi, b)
                if value:
                    break
        return lo, hi

    def prune(self, before: float) -> None:
        self.node_pods.prune(before)
        self.all_pods.prune(before)
        self.slices.names.prune(before)

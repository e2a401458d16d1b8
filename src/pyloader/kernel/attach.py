"""Attaching the two TC programs with pyroute2 (clsact, direct-action).

Direction rule. On a pod-side interface (a pod's host-side veth, or the
bridge) egress carries packets TOWARD the pod, ingress packets FROM it:
    egress  <- redtap_req  (requests to the pod's servers)
    ingress <- redtap_resp (the pod's responses)
On a host interface (uplink, lo: mode "host") it is the other way round.
Each request to a local server is then parsed exactly once, wherever its
client is.

Only our own filters are touched: they carry the name prefix "redtap:".
The clsact qdisc is created only where missing and deleted on exit only if
we created it and nothing else hangs on it. Filters named "redtap:" found
at start (left by a killed run) are replaced.
"""
from __future__ import annotations

import logging
import select
import socket
import threading
import time
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pyloader.errors import RedtapError
from pyloader.kernel.links import ports_of

log = logging.getLogger("redtap.attach")

INGRESS, EGRESS = 0xFFFFFFF2, 0xFFFFFFF3
PRIO = 0x5254  # "RT": our filters' priority on the hook
HANDLE = 1
NAME_PREFIX = "redtap:"
ETH_P_ALL = 0x0003
ENOENT, EEXIST, ENODEV, EINVAL = 2, 17, 19, 22
RESCAN_S = 2.0  # BridgeFollower: full reconcile at least this often


@dataclass
class Attachment:
    ifindex: int
    ifname: str
    mode: str
    created_qdisc: bool
    hooks: list = field(default_factory=list)  # parents we added a filter to


def _filter_name(msg) -> str | None:
    opts = msg.get_attr("TCA_OPTIONS")
    if opts is None:
        return None
    try:
        return opts.get_attr("TCA_BPF_NAME")
    except Exception:
        return None


class TcAttacher:
    """Adds and removes redtap's filters; thread-safe."""

    def __init__(self, progs: dict[str, tuple[int, int]]):
        """@progs: mode ("pod", "host") -> (requests fd, responses fd)."""
        self.progs = progs
        self.lock = threading.RLock()
        self.attached: dict[int, Attachment] = {}
        self._local = threading.local()
        self._sockets: list[IPRoute] = []  # every thread's, for close()

    @property
    def ipr(self) -> IPRoute:
        """The calling thread's netlink socket. pyroute2 keeps per-thread
        state (event loop, message queue) in an IPRoute; one used by two
        threads kept part of every answer the second thread got (the agent's
        memory grew with each bridge rescan: issue 14)."""
        ipr = getattr(self._local, "ipr", None)
        if ipr is None:
            ipr = self._local.ipr = IPRoute()
            with self.lock:
                self._sockets.append(ipr)
        return ipr

    def release_thread(self) -> None:
        """Close the calling thread's socket (a thread that is ending)."""
        ipr = getattr(self._local, "ipr", None)
        if ipr is not None:
            self._local.ipr = None
            with self.lock:
                self._sockets.remove(ipr)
            ipr.close()

    # -- queries ---------------------------------------------------------
    @staticmethod
    def ifindex(name: str) -> int:
        """By libc (if_nametoindex), not pyroute2's link_lookup: in pyroute2
        0.9 every lookup kept ~2 kB, and the bridge rescan looks the bridge
        up every 2 s (issue 14)."""
        try:
            return socket.if_nametoindex(name)
        except (OSError, ValueError):  # no such interface; a NUL in the name
            raise RedtapError(f"interface {name} not found") from None

    def bridge_ports(self, bridge: str) -> dict[int, str]:
        """ifindex -> name of every interface enslaved to @bridge."""
        return ports_of(self.ifindex(bridge))  # a dump of our own (kernel/links.py)

    def our_filters(self, ifindex: int) -> list[tuple[int, int, int, int, str]]:
        """(parent, prio, protocol, handle, name) of redtap filters on both hooks."""
        out = []
        for parent in (INGRESS, EGRESS):
            try:
                msgs = self.ipr.get_filters(index=ifindex, parent=parent)
            except NetlinkError as e:
                if e.code in (EINVAL, ENOENT, ENODEV):  # no clsact / no such link
                    continue
                raise
            for m in msgs:
                name = _filter_name(m)
                if name and name.startswith(NAME_PREFIX) and m["handle"]:
                    info = m["info"]  # prio << 16 | protocol (network byte order)
                    out.append((parent, info >> 16, socket.ntohs(info & 0xFFFF), m["handle"], name))
        return out

    def _has_clsact(self, ifindex: int) -> bool:
        return any(m.get_attr("TCA_KIND") == "clsact" for m in self.ipr.get_qdiscs(index=ifindex))

    # -- changes ---------------------------------------------------------
    def _del_filter(self, ifindex, parent, prio, proto, handle):
        try:
            self.ipr.tc("del-filter", "bpf", ifindex, handle, parent=parent, prio=prio,
                        protocol=proto)
        except NetlinkError as e:
            if e.code not in (ENOENT, ENODEV):
                raise

    def attach(self, ifindex: int, ifname: str, mode: str = "pod") -> None:
        """Attach both programs to one interface (replacing stale redtap filters)."""
        with self.lock:
            if ifindex in self.attached:
                return
            try:
                created = False
                if not self._has_clsact(ifindex):
                    try:
                        self.ipr.tc("add", "clsact", ifindex)
                        created = True
                    except NetlinkError as e:
                        if e.code != EEXIST:
                            raise
                stale = self.our_filters(ifindex)
                for parent, prio, proto, handle, name in stale:
                    log.info("replacing stale filter %s on %s", name, ifname)
                    self._del_filter(ifindex, parent, prio, proto, handle)
                if stale and not self._other_filters(ifindex):
                    created = True  # only a killed run of ours used it: ours to remove
                req_fd, resp_fd = self.progs[mode]
                if mode == "pod":
                    plan = ((EGRESS, req_fd, "req"), (INGRESS, resp_fd, "resp"))
                else:
                    plan = ((INGRESS, req_fd, "req"), (EGRESS, resp_fd, "resp"))
                att = Attachment(ifindex, ifname, mode, created)
                self.attached[ifindex] = att
                for parent, fd, what in plan:
                    self.ipr.tc("add-filter", "bpf", ifindex, HANDLE, fd=fd,
                                name=f"{NAME_PREFIX}{what}", parent=parent, classid=1,
                                direct_action=True, prio=PRIO, protocol=ETH_P_ALL)
                    att.hooks.append(parent)
            except NetlinkError as e:
                self.detach(ifindex)
                raise RedtapError(f"attaching to {ifname} (ifindex {ifindex}): "
                                  f"netlink errno {e.code} ({e})") from None

    def detach(self, ifindex: int) -> None:
        """Remove exactly our filters (and the clsact qdisc if we made it and it is empty)."""
        with self.lock:
            att = self.attached.pop(ifindex, None)
            if att is None:
                return
            try:
                for parent in att.hooks:
                    self._del_filter(ifindex, parent, PRIO, ETH_P_ALL, HANDLE)
                if att.created_qdisc and not self._other_filters(ifindex):
                    try:
                        self.ipr.tc("del", "clsact", ifindex)
                    except NetlinkError as e:
                        if e.code not in (ENOENT, ENODEV, EINVAL):
                            raise
            except NetlinkError as e:
                if e.code != ENODEV:  # the interface went away: nothing left to remove
                    log.warning("detaching from %s: netlink errno %s", att.ifname, e.code)

    def _other_filters(self, ifindex: int) -> bool:
        for parent in (INGRESS, EGRESS):
            try:
                if any(m["handle"] for m in self.ipr.get_filters(index=ifindex, parent=parent)):
                    return True
            except NetlinkError:
                pass
        return False

    def detach_all(self) -> None:
        with self.lock:
            for ifindex in list(self.attached):
                self.detach(ifindex)

    def close(self) -> None:
        self.detach_all()
        with self.lock:
            sockets, self._sockets = self._sockets, []
        for ipr in sockets:
            ipr.close()


class BridgeFollower:
    """Keeps the programs attached to every port of a bridge, following
    netlink link events (veths of new pods appear, old ones go)."""

    def __init__(self, attacher: TcAttacher, bridge: str, on_change=None):
        self.attacher, self.bridge = attacher, bridge
        self.on_change = on_change
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="redtap-bridge", daemon=True)

    def reconcile(self) -> None:
        with self.attacher.lock:
            try:
                ports = self.attacher.bridge_ports(self.bridge)
            except RedtapError:
                ports = {}  # the bridge is gone (or not there yet)
            for idx in set(self.attacher.attached) - set(ports):
                if self.attacher.attached[idx].mode == "pod":
                    log.info("port %s left %s", self.attacher.attached[idx].ifname, self.bridge)
                    self.attacher.detach(idx)
            for idx, name in ports.items():
                if idx not in self.attacher.attached:
                    try:
                        self.attacher.attach(idx, name, "pod")
                        log.info("attached to %s (port of %s)", name, self.bridge)
                    except RedtapError as e:  # e.g. the veth vanished meanwhile
                        log.warning("%s", e)
        if self.on_change:
            self.on_change()

    def start(self) -> "BridgeFollower":
        """Subscribe to link events (in the follower's thread: pyroute2
        sockets must be used by the thread that made them), then attach to
        the current ports, so no port that appears in between is missed."""
        self.thread.start()
        self._ready.wait(timeout=10)
        self.reconcile()
        return self

    def _run(self) -> None:
        mon = IPRoute()
        try:
            mon.bind()
            self._ready.set()
            fd = mon.fileno()
            last = time.monotonic()
            while not self._stop.is_set():
                try:
                    r, _, _ = select.select([fd], [], [], 0.5)
                    if not r:
                        # a safety net: an event lost to a full socket buffer
                        # (ENOBUFS) must not leave a veth untraced for long
                        if time.monotonic() - last > RESCAN_S:
                            self.reconcile()
                            last = time.monotonic()
                        continue
                    msgs = mon.get()
                    if any(m.get("event") in ("RTM_NEWLINK", "RTM_DELLINK") for m in msgs):
                        self.reconcile()
                        last = time.monotonic()
                except Exception as e:  # a netlink hiccup must not stop following
                    log.warning("following bridge %s: %s", self.bridge, e)
        finally:
            self._ready.set()
            mon.close()
            self.attacher.release_thread()

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=2)

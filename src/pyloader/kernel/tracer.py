"""The loaded redtap BPF object: programs, maps, counters, pending state."""
from __future__ import annotations

import os
from pathlib import Path

from pyloader.kernel import abi
from pyloader.libbpf.object import BpfObject
from pyloader.kernel.endpoints import EndpointTable
from pyloader.errors import RedtapError

PKG_OBJECT = Path(__file__).parent.parent / "data" / "redtap.bpf.o"


def find_object(explicit: str | None = None) -> str:
    """The BPF object: --bpf-object, $REDTAP_BPF_OBJECT, or the package's."""
    for cand in (explicit, os.environ.get("REDTAP_BPF_OBJECT"), str(PKG_OBJECT)):
        if cand and Path(cand).is_file():
            return cand
    raise RedtapError(f"BPF object not found (looked at {PKG_OBJECT}); build it with `make bpf`")


class PendingRequests:
    """Every pending request, keyed as in `pending` (struct req_key): those in
    that map and those in a connection's inline slot (conn_state.inline_req).
    keys(), lookup() and delete() as a map's. Deleting an inline one writes its
    connection back: for a quiet kernel side (tests, offline replay)."""

    def __init__(self, pending_map, conns_map):
        self.map, self.conns = pending_map, conns_map

    def _inline(self, key) -> tuple[bytes, abi.ConnState] | None:
        rk = abi.ReqKey.from_buffer_copy(bytes(key))
        raw = self.conns.lookup(bytes(rk.conn))
        st = abi.ConnState.from_buffer_copy(raw) if raw is not None else None
        if st is None or st.inline_used != abi.INLINE_HELD or st.inline_seq != rk.seq:
            return None
        return bytes(rk.conn), st

    def keys(self):
        yield from self.map.keys()
        for ck, raw in self.conns.items():
            st = abi.ConnState.from_buffer_copy(raw)
            if st.inline_used == abi.INLINE_HELD:
                yield bytes(abi.ReqKey(conn=abi.ConnKey.from_buffer_copy(ck), seq=st.inline_seq))

    def lookup(self, key) -> bytes | None:
        raw = self.map.lookup(key)
        if raw is None and (found := self._inline(key)):
            raw = bytes(found[1].inline_req)
        return raw

    def delete(self, key) -> bool:
        if self.map.delete(key):
            return True
        found = self._inline(key)
        if found:
            found[1].inline_used = 0
            self.conns.update(found[0], bytes(found[1]))
        return found is not None


class Tracer:
    REQ_PROG, RESP_PROG = "redtap_req", "redtap_resp"
    POD_REQ_PROG, POD_RESP_PROG = "redtap_pod_req", "redtap_pod_resp"

    def __init__(self, obj: BpfObject):
        self.obj = obj
        self.req = obj.program(self.REQ_PROG)
        self.resp = obj.program(self.RESP_PROG)
        self.pod_req = obj.program(self.POD_REQ_PROG)
        self.pod_resp = obj.program(self.POD_RESP_PROG)
        self.endpoints = EndpointTable(obj.map("endpoints"), obj.map("settings"),
                                       exact_map=obj.map("endpoint_ports"))
        self.conns = obj.map("conns")      # 4-tuple -> connection state (FIFO head/tail)
        # (4-tuple, number) -> a request waiting for its answer (inline or in `pending`)
        self.pending = PendingRequests(obj.map("pending"), self.conns)
        self.stats_map = obj.map("stats", percpu=True)
        self.events_fd = obj.map("events").fd

    @classmethod
    def load(cls, path: str | None = None, max_conns: int | None = None,
             wakeup_bytes: int | None = None, clock_from_skb: bool = False,
             ring_bytes: int | None = None) -> "Tracer":
        """Open and load the object. clock_from_skb: take packet times from
        skb->tstamp (offline replay through BPF_PROG_TEST_RUN). ring_bytes: the
        ring buffer's size (a power of two, at least a page)."""
        obj = BpfObject.open(find_object(path))
        try:
            if max_conns:
                obj.set_max_entries("conns", max_conns)
                obj.set_max_entries("pending", max_conns)
            if ring_bytes:
                obj.set_max_entries("events", ring_bytes)
            if wakeup_bytes is not None:
                obj.set_rodata("wakeup_bytes", int(wakeup_bytes).to_bytes(4, "little"))
            if clock_from_skb:
                obj.set_rodata("clock_from_skb", b"\x01")
            obj.load()
            return cls(obj)
        except BaseException:
            obj.close()
            raise

    def prog_fds(self) -> dict[str, tuple[int, int]]:
        """(requests, responses) program fds per attach mode (TcAttacher)."""
        return {"host": (self.req.fd, self.resp.fd), "pod": (self.pod_req.fd, self.pod_resp.fd)}

    def stats(self) -> dict[str, int]:
        """Kernel counters, summed over CPUs."""
        out = {}
        for i, name in enumerate(abi.STATS):
            out[name] = sum(self.stats_map.percpu_u64(i.to_bytes(4, "little")))
        return out

    def connections(self):
        """(ConnKey, ConnState) of every tracked connection (a snapshot)."""
        for k, v in self.conns.items():
            yield abi.ConnKey.from_buffer_copy(k), abi.ConnState.from_buffer_copy(v)

    def take_request(self, key: abi.ConnKey, seq: int) -> abi.PendingReq | None:
        """Remove and return pending request number @seq of a connection."""
        rk = abi.ReqKey(conn=key, seq=seq)
        raw = self.pending.lookup(rk)
        if raw is None:
            return None
        self.pending.delete(rk)
        return abi.PendingReq.from_buffer_copy(raw)

    def take_pending(self, now_ns: int, idle_before_ns: int | None = None) -> list[abi.Event]:
        """Remove connections (all, or those idle since before idle_before_ns)
        and return their pending requests as events:
        unanswered (R_IDLE), or answered without an end when their response
        had started."""
        out = []
        for key, st in list(self.connections()):
            if idle_before_ns is not None and st.last_ns > idle_before_ns:
                continue
            if not self.conns.delete(bytes(key)):
                continue  # the kernel removed it meanwhile (FIN/RST)
            for seq in range(st.head, (st.head + min(st.tail - st.head, abi.MAX_PIPELINE))):
                seq &= 0xFFFFFFFF
                if st.inline_used == abi.INLINE_HELD and st.inline_seq == seq:
                    r = st.inline_req  # (its connection is gone already)
                else:
                    r = self.take_request(key, seq)
                if r is None:
                    continue  # evicted from the LRU map: the agent counts lru_evicted_pending
                flags = r.flags
                if seq == st.head and st.resp_status:
                    status, resp_ns, reason = st.resp_status, st.resp_first_ns, 0
                else:
                    status, resp_ns, reason = 0, now_ns, abi.R_IDLE
                    flags |= abi.EV_UNANSWERED
                url = bytes(r.url)[:min(r.url_len, abi.MAX_URL_LEN)]
                out.append(abi.Event(
                    req_ns=r.ts_ns, resp_ns=resp_ns, resp_last_ns=0, req_body=r.req_body,
                    resp_body=0, caddr=bytes(key.caddr), saddr=bytes(key.saddr),
                    cport=key.cport, sport=key.sport, status=status, url_len=len(url),
                    method=r.method, version=r.version, flags=flags, reason=reason, ifindex=0,
                    method_name=bytes(r.method_name), url=url))
        return out

    def close(self) -> None:
        self.obj.close()

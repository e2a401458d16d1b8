"""The loaded redtap BPF object: programs, maps, counters, pending state."""
from __future__ import annotations

import os
from pathlib import Path

from . import abi
from .bpfobject import BpfObject
from .endpoints import EndpointTable
from .errors import RedtapError

PKG_OBJECT = Path(__file__).parent / "data" / "redtap.bpf.o"


def find_object(explicit: str | None = None) -> str:
    """The BPF object: --bpf-object, $REDTAP_BPF_OBJECT, or the package's."""
    for cand in (explicit, os.environ.get("REDTAP_BPF_OBJECT"), str(PKG_OBJECT)):
        if cand and Path(cand).is_file():
            return cand
    raise RedtapError(f"BPF object not found (looked at {PKG_OBJECT}); build it with `make bpf`")


class Tracer:
    REQ_PROG, RESP_PROG = "redtap_req", "redtap_resp"
    POD_REQ_PROG, POD_RESP_PROG = "redtap_pod_req", "redtap_pod_resp"

    def __init__(self, obj: BpfObject):
        self.obj = obj
        self.req = obj.program(self.REQ_PROG)
        self.resp = obj.program(self.RESP_PROG)
        self.pod_req = obj.program(self.POD_REQ_PROG)
        self.pod_resp = obj.program(self.POD_RESP_PROG)
        self.endpoints = EndpointTable(obj.map("endpoints"), obj.map("settings"))
        self.conns = obj.map("conns")
        self.requests = obj.map("pending")
        self.stats_map = obj.map("stats")
        self.events_fd = obj.map("events").fd
        self.evicted = 0  # pending requests found evicted by take_pending()

    @classmethod
    def load(cls, path: str | None = None, max_conns: int | None = None,
             wakeup_bytes: int | None = None, clock_from_skb: bool = False) -> "Tracer":
        """Open and load the object. clock_from_skb: take packet times from
        skb->tstamp (offline replay through BPF_PROG_TEST_RUN)."""
        obj = BpfObject.open(find_object(path))
        try:
            if max_conns:
                obj.set_max_entries("conns", max_conns)
                obj.set_max_entries("pending", max_conns)
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

    def pending(self):
        """(ConnKey, ConnState) of every tracked connection (a snapshot)."""
        for k, v in self.conns.items():
            yield abi.ConnKey.from_buffer_copy(k), abi.ConnState.from_buffer_copy(v)

    def take_request(self, key: abi.ConnKey, seq: int) -> abi.PendingReq | None:
        """Remove and return pending request number @seq of a connection."""
        rk = abi.ReqKey(conn=key, seq=seq)
        raw = self.requests.lookup(rk)
        if raw is None:
            return None
        self.requests.delete(rk)
        return abi.PendingReq.from_buffer_copy(raw)

    def take_pending(self, now_ns: int, idle_before_ns: int | None = None) -> list[tuple]:
        """Remove connections (all, or those idle since before idle_before_ns)
        and return their pending requests as event tuples (abi.EVENT_FIELDS):
        unanswered (R_IDLE), or answered without an end when their response
        had started."""
        out = []
        for key, st in list(self.pending()):
            if idle_before_ns is not None and st.last_ns > idle_before_ns:
                continue
            if not self.conns.delete(bytes(key)):
                continue  # the kernel removed it meanwhile (FIN/RST)
            for seq in range(st.head, (st.head + min(st.tail - st.head, abi.MAX_PIPELINE))):
                seq &= 0xFFFFFFFF
                r = self.take_request(key, seq)
                if r is None:
                    self.evicted += 1  # lost from the LRU map: counted, not reported
                    continue
                flags = r.flags
                if seq == st.head and st.resp_status:
                    status, resp_ns, reason = st.resp_status, st.resp_first_ns, 0
                else:
                    status, resp_ns, reason = 0, now_ns, abi.R_IDLE
                    flags |= abi.EV_UNANSWERED
                url = bytes(r.url)[:min(r.url_len, abi.MAX_URL_LEN)]
                out.append((r.ts_ns, resp_ns, 0, r.req_body, 0, bytes(key.caddr),
                            bytes(key.saddr), key.cport, key.sport, status, len(url),
                            r.method, r.version, flags, reason, 0, bytes(r.method_name), url))
        return out

    def close(self) -> None:
        self.obj.close()

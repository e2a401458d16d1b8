"""The loaded redtap BPF object: programs, maps, counters, pending state."""
from __future__ import annotations

import ctypes
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

    def __init__(self, obj: BpfObject):
        self.obj = obj
        self.req = obj.program(self.REQ_PROG)
        self.resp = obj.program(self.RESP_PROG)
        self.endpoints = EndpointTable(obj.map("endpoints"))
        self.conns = obj.map("conns")
        self.urls = obj.map("pending_urls")
        self.stats_map = obj.map("stats")
        self.events_fd = obj.map("events").fd

    @classmethod
    def load(cls, path: str | None = None, max_conns: int | None = None,
             wakeup_bytes: int | None = None) -> "Tracer":
        obj = BpfObject.open(find_object(path))
        try:
            if max_conns:
                obj.set_max_entries("conns", max_conns)
                obj.set_max_entries("pending_urls", max_conns)
            if wakeup_bytes is not None:
                ro = obj.rodata()
                ctypes.memmove(ctypes.addressof(ro), int(wakeup_bytes).to_bytes(4, "little"), 4)
            obj.load()
            return cls(obj)
        except BaseException:
            obj.close()
            raise

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

    def take_url(self, key: abi.ConnKey, seq: int) -> bytes | None:
        """Remove and return the pending request-target of (connection, seq)."""
        uk = abi.UrlKey(conn=key, seq=seq)
        raw = self.urls.lookup(uk)
        if raw is None:
            return None
        self.urls.delete(uk)
        val = abi.UrlVal.from_buffer_copy(raw)
        return bytes(val.url)[:min(val.len, abi.MAX_URL_LEN)]

    def close(self) -> None:
        self.obj.close()

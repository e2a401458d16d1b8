"""The pipeline's per-record work in C (src/native/recordfmt.c), Python deciding.

Most of a record is the same for every request between the same peers
(addresses, server port, both ends' names) and for every request of one URL
on one server (url.path and url.query after redaction, http.route). Python
computes those parts once, with the stages' own code, and the helper writes
the next records from them: time, client port, method, status, durations,
sizes and flags are the only per-record fields it writes.

  * unknown peers (or names that may have changed since): the record takes
    the reference path (record.py, the stages of stages.py, orjson) in place,
    and its line's parts go to the helper;
  * known peers, unknown URL: Python puts the URL's parts (redaction and
    route by the stages' code) and the helper writes the line;
  * extension methods and extreme values: the reference path.

The helper also counts each record it writes in its metric cell and adds up
the counters a record moves (names found, values redacted, routes folded),
so the stages' counters and metrics are those of the reference path.
Used only with the stages it knows (Component.fast_role); anything else, or
no helper built, and the agent uses the reference path for every record.
tests/unit/test_fastpath.py holds both paths to the same bytes.
"""
from __future__ import annotations

import ctypes
import logging
import re
import struct
from pathlib import Path

import orjson

from pyloader.kernel import abi
from pyloader.pipeline.record import url_parts
from pyloader.pipeline.routes import server_key

log = logging.getLogger("redtap.fastpath")

LIB_PATH = Path(__file__).parent.parent / "data" / "librecordfmt.so"
LINE, PEERS, FALLBACK, URL = 0, 1, 2, 3   # enum rf_kind
NB = 17
ROLES = ("redact", "k8s", "routes", "metrics")
ADDR_KEYS = ("client.address", "client.port", "server.address", "server.port")
URL_KEYS = ("url.path", "url.query")
# per-record fields the helper renders, in record order (pipeline/record.py)
VAR_KEYS = ("url.truncated", "network.protocol.version", "http.response.status_code",
            "duration_ms", "response.duration_ms", "http.request.body.size",
            "http.response.body.size", "error.type")
K8S_KEYS = ("client.k8s.pod.name", "client.k8s.namespace.name", "server.k8s.pod.name",
            "server.k8s.namespace.name", "server.k8s.service.name", "server.k8s.workload.name",
            "server.k8s.workload.kind")
ROUTE_KEY = "http.route"
MAX_SERIES, MAX_ROUTES = 1 << 23, 1 << 20   # id widths of a metric cell (recordfmt.c)
MAX_SERVERS = 1 << 32
URL_OFF, URL_LEN_OFF = abi.HttpEvent.url.offset, abi.HttpEvent.url_len.offset
_URL_LEN = struct.Struct("<H")
_URL_ENTRY = struct.Struct("<9I")  # struct rf_url_entry
INF = float("inf")

_u8p, _u32p, _u64p = (ctypes.POINTER(t) for t in (ctypes.c_uint8, ctypes.c_uint32,
                                                  ctypes.c_uint64))
_SIGNATURES = {
    "rf_new": (ctypes.c_void_p, [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32]),
    "rf_free": (None, [ctypes.c_void_p]),
    "rf_records": (ctypes.c_void_p, [ctypes.c_void_p]),
    "rf_kinds": (ctypes.c_void_p, [ctypes.c_void_p]),
    "rf_servers": (_u32p, [ctypes.c_void_p]),
    "rf_count": (ctypes.c_uint32, [ctypes.c_void_p]),
    "rf_take_bad": (ctypes.c_uint32, [ctypes.c_void_p]),
    "rf_bad_pending": (ctypes.c_uint32, [ctypes.c_void_p]),
    "rf_lines": (ctypes.c_void_p, [ctypes.c_void_p]),
    "rf_line_ends": (_u32p, [ctypes.c_void_p]),
    "rf_weights": (_u64p, [ctypes.c_void_p]),
    "rf_reset": (None, [ctypes.c_void_p]),
    "rf_forget_conns": (None, [ctypes.c_void_p]),
    "rf_forget_urls": (None, [ctypes.c_void_p]),
    "rf_set_metrics": (None, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_double), ctypes.c_int]),
    "rf_set_offset": (None, [ctypes.c_void_p, ctypes.c_int64]),
    "rf_put_peers": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_double,
                                    ctypes.c_double, ctypes.c_char_p, ctypes.c_uint32,
                                    ctypes.c_char_p, ctypes.c_uint32, ctypes.c_char_p,
                                    ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, _u32p]),
    "rf_put_url": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32,
                                  ctypes.c_char_p, ctypes.c_uint32, ctypes.c_char_p,
                                  ctypes.c_uint32, ctypes.c_uint32, _u32p]),
    "rf_put_urls": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]),
    "rf_render": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
    "rf_cells": (ctypes.c_uint32, [ctypes.c_void_p, _u64p, _u32p,
                                   ctypes.POINTER(ctypes.c_double), ctypes.c_uint32]),
}


def load_helper(path: Path = LIB_PATH) -> ctypes.CDLL | None:
    """The helper library, or None when it was not built (the reference path then)."""
    if not path.is_file():
        return None
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _item(key: str, value) -> bytes:
    return orjson.dumps(key) + b":" + orjson.dumps(value)


class Ids:
    """Small integer ids for hashable values (servers, label sets, routes)."""

    def __init__(self):
        self.ids: dict = {}
        self.values: list = []

    def __call__(self, value) -> int:
        i = self.ids.get(value)
        if i is None:
            i = self.ids[value] = len(self.values)
            self.values.append(value)
        return i


class FastPath:
    """Renders the records of a ring-buffer batch (see the module's text)."""

    def __init__(self, lib: ctypes.CDLL, builder, stages: dict, accesslog, max_batch: int):
        self.lib, self.builder, self.accesslog = lib, builder, accesslog
        self.redact, self.k8s = stages.get("redact"), stages.get("k8s")
        self.routes, self.metrics = stages.get("routes"), stages.get("metrics")
        self.processors = [c.process for c in (self.redact, self.k8s, self.routes) if c]
        self.ctx = lib.rf_new(max_batch, 16, 16)
        if not self.ctx:
            raise MemoryError("recordfmt: rf_new")
        if self.metrics is not None:  # (output.metrics imports prometheus_client: only then)
            from pyloader.output.metrics import BOUNDS_MS
            lib.rf_set_metrics(self.ctx, (ctypes.c_double * (NB - 1))(*BOUNDS_MS), 1)
        self.sample_fn = ctypes.cast(lib.rf_sample, ctypes.c_void_p).value
        self.servers, self.series, self.route_ids = Ids(), Ids(), Ids()
        self.generation = None
        self.renew_ids = False
        self.rendered = self.referenced = 0  # records by the helper, by the reference path
        self._render = accesslog._render

    @classmethod
    def create(cls, agent, lib: ctypes.CDLL | None = None) -> "FastPath | None":
        """The fast path for this agent's stages, or None (reference path only)."""
        lib = lib or load_helper()
        if lib is None or agent.cfg.summary:
            return None
        stages = {}
        for c in agent.cfg.components:
            role = getattr(c, "fast_role", None)
            if role not in ROLES or role in stages:
                return None
            stages[role] = c
        if "metrics" in stages and "routes" not in stages:
            return None  # metrics then template routes themselves
        order = [r for r in ("redact", "k8s", "routes") if r in stages]
        if [c.fast_role for c in agent.cfg.components if c.fast_role != "metrics"] != order:
            return None  # the stages' order of stages.py is what the fragments assume
        return cls(lib, agent.builder, stages, agent.accesslog, agent.cfg.max_batch)

    def count(self) -> int:
        """Records the sink holds (the ring buffer's poll()/consume() result)."""
        return self.lib.rf_count(self.ctx) + self.lib.rf_bad_pending(self.ctx)

    def close(self) -> None:
        if self.ctx:
            self.lib.rf_free(self.ctx)
            self.ctx = None

    # -- one batch -------------------------------------------------------------
    def handle(self) -> tuple[int, int]:
        """Render the batch the ring buffer collected and queue its lines for
        the writer: (records, bad records)."""
        lib, ctx = self.lib, self.ctx
        n, bad = lib.rf_count(ctx), lib.rf_take_bad(ctx)
        if not n:
            return 0, bad
        k8s = self.k8s
        if k8s is not None:
            if k8s.inbox:
                k8s.drain()
            gen = k8s.generation()
            if gen != self.generation:
                self.generation = gen
                lib.rf_forget_conns(ctx)
        lib.rf_set_offset(ctx, self.builder.clock.offset_ns)
        left = lib.rf_render(ctx, 0)
        if left == 0:
            data, by_python = ctypes.string_at(lib.rf_lines(ctx), lib.rf_line_ends(ctx)[n - 1]), 0
        else:
            data, by_python = self._with_python(n, left)
        self.rendered += n - by_python
        self.referenced += by_python
        self._add_counters()
        lib.rf_reset(ctx)
        if self.renew_ids:
            self.renew_ids = False
            self._forget_ids()
        self.accesslog.writer.submit(data, n)
        return n, bad

    _NOT_LINE = re.compile(rb"[^\x00]")  # records without a line of the helper's

    def _with_python(self, n: int, left: int) -> tuple[bytes, int]:
        """The batch when some records need Python: their parts (or whole lines)
        in record order, then the helper's lines around them; and how many
        lines Python wrote."""
        lib, ctx, size = self.lib, self.ctx, abi.EVENT_SIZE
        raw = ctypes.string_at(lib.rf_records(ctx), n * size)
        if left < 0:  # the helper ran out of memory: all of it the reference way
            return b"".join(self.reference(raw[i * size:(i + 1) * size], None)
                            for i in range(n)), n
        kinds = ctypes.string_at(lib.rf_kinds(ctx), n)
        servers = lib.rf_servers(ctx)
        own: dict[int, bytes] = {}   # record -> its line, rendered here
        urls: set = set()
        entries: list[bytes] = []    # rf_put_urls' input
        server_keys, url_len = self.servers.values, _URL_LEN.unpack_from
        for m in self._NOT_LINE.finditer(kinds):  # in record order: the route cap's order
            i = m.start()
            base = i * size
            if kinds[i] == URL:
                ulen = min(url_len(raw, base + URL_LEN_OFF)[0], abi.MAX_URL_LEN)
                key = (servers[i], raw[base + URL_OFF:base + URL_OFF + ulen])
                if key not in urls:
                    urls.add(key)
                    entry = self._url_entry(i, key[0], server_keys[key[0]], key[1])
                    if entry is not None:
                        entries.append(entry)
            else:
                own[i] = self.reference(raw[base:base + size], i if kinds[i] == PEERS else None)
        if entries:
            lib.rf_put_urls(ctx, b"".join(entries), sum(map(len, entries)))
            lib.rf_render(ctx, 1)
            kinds = ctypes.string_at(lib.rf_kinds(ctx), n)
        ends = lib.rf_line_ends(ctx)
        lines = ctypes.string_at(lib.rf_lines(ctx), ends[n - 1])
        parts, start = [], 0
        for m in self._NOT_LINE.finditer(kinds):
            i = m.start()
            end = ends[i]
            if end > start:
                parts.append(lines[start:end])
            start = end
            line = own.get(i)
            parts.append(line if line is not None
                         else self.reference(raw[i * size:(i + 1) * size], None))
        parts.append(lines[start:])
        return b"".join(parts), n - kinds.count(LINE)

    def reference(self, raw: bytes, learn: int | None) -> bytes:
        """One record the reference way (its line); learn: its index in the
        batch, to hand its parts to the helper."""
        ev = abi.decode_event(raw)
        before = self._counts()
        rec = self.builder.build(ev)
        for p in self.processors:
            p(rec)
        line = self._render(None, "info", rec) + b"\n"
        if self.metrics is not None:
            self.metrics.observe(rec)
        if learn is not None:
            self._learn(learn, rec, [a - b for a, b in zip(self._counts(), before)])
        return line

    def _counts(self) -> list[int]:
        """The stage counters one record moves (the helper's weights, in its order)."""
        k, r, t = self.k8s, self.redact, self.routes
        return [k.named["client"] if k else 0, k.named["server"] if k else 0,
                k.named["service"] if k else 0, 0,
                r.values if r else 0, r.records if r else 0,
                t.table.overflowed if t else 0, 0]

    def _add_counters(self) -> None:
        w = self.lib.rf_weights(self.ctx)
        if self.k8s is not None:
            named = self.k8s.named
            named["client"] += w[0]
            named["server"] += w[1]
            named["service"] += w[2]
        if self.redact is not None:
            self.redact.values += w[4]
            self.redact.records += w[5]
        if self.routes is not None:
            self.routes.table.overflowed += w[6]
        if self.metrics is not None:
            self._fold_cells()

    # -- teaching the helper --------------------------------------------------
    def _learn(self, i: int, rec: dict, deltas: list[int]) -> None:
        """Record @i's parts, cut from its reference record, to the helper."""
        keys = list(rec)
        if keys[:7] != ["time", *ADDR_KEYS, "http.request.method", "url.path"]:
            return
        j = 7 + (keys[7:8] == ["url.query"])
        rest = keys[j:]
        var = [k for k in rest if k in VAR_KEYS]
        names = [k for k in rest if k in K8S_KEYS]
        route = [k for k in rest if k == ROUTE_KEY]
        if rest != var + names + route or var != [k for k in VAR_KEYS if k in var]:
            return  # a field the helper does not know: the reference path for these
        server_id = self.servers(server_key(rec))
        series_id = self.series(self._series_labels(rec)) if self.metrics is not None else 0
        route_id = self.route_ids(rec[ROUTE_KEY]) if route else 0
        if series_id >= MAX_SERIES or route_id >= MAX_ROUTES or server_id >= MAX_SERVERS:
            self.renew_ids = True  # after this batch (its metric cells use the ids)
            return
        client = _item("client.address", rec["client.address"]) + b',"client.port":'
        server = b"," + _item("server.address", rec["server.address"]) + b"," + \
            _item("server.port", rec["server.port"]) + b","
        tail = b"".join(b"," + _item(k, rec[k]) for k in names)
        lo, hi = self.k8s.names_span(rec) if self.k8s is not None else (-INF, INF)
        self.lib.rf_put_peers(self.ctx, i, lo, hi, client, len(client), server, len(server),
                              tail, len(tail), server_id, series_id,
                              (ctypes.c_uint32 * 4)(*deltas[:4]))
        frag = b",".join(_item(k, rec[k]) for k in keys[6:j])
        rt = b"," + _item(ROUTE_KEY, rec[ROUTE_KEY]) if route else b""
        self.lib.rf_put_url(self.ctx, i, server_id, frag, len(frag), rt, len(rt), route_id,
                            (ctypes.c_uint32 * 4)(*deltas[4:]))

    def _url_entry(self, i: int, server_id: int, server_key, url: bytes) -> bytes | None:
        """Record @i's URL parts on a known server, by the stages' own code, as
        an rf_put_urls() entry."""
        path, query = url_parts(url)
        values = 0
        if self.redact is not None:
            path, query, values = self.redact.redact_url(path, query)
        frag = _item("url.path", path)
        if query is not None:
            frag += b',"url.query":' + orjson.dumps(query)
        rt, route_id, folded = b"", 0, 0
        if self.routes is not None:
            table = self.routes.table
            before = table.overflowed
            route = table.route(server_key, path)
            folded, table.overflowed = table.overflowed - before, before  # the helper counts
            route_id = self.route_ids(route)
            if route_id >= MAX_ROUTES:  # ids renewed after this batch; the reference path now
                self.renew_ids = True
                return None
            rt = b',"http.route":' + orjson.dumps(route)
        pad = b"\0" * (-(len(frag) + len(rt)) % 4)
        return _URL_ENTRY.pack(i, server_id, len(frag), len(rt), route_id, values,
                               1 if values else 0, folded, 0) + frag + rt + pad

    def _forget_ids(self) -> None:
        self.servers, self.series, self.route_ids = Ids(), Ids(), Ids()
        self.lib.rf_forget_conns(self.ctx)
        self.lib.rf_forget_urls(self.ctx)

    @staticmethod
    def _series_labels(rec: dict) -> tuple:
        """The server part of a metric series' labels (output/metrics.py series_key)."""
        from pyloader.output.metrics import series_key
        return series_key(rec, "")[2:]

    def _fold_cells(self) -> None:
        cap = 4096
        keys = (ctypes.c_uint64 * cap)()
        counts = (ctypes.c_uint32 * (cap * NB))()
        sums = (ctypes.c_double * cap)()
        n = self.lib.rf_cells(self.ctx, keys, counts, sums, cap)
        if not n:
            return
        cells = []
        for i in range(n):
            k = keys[i]
            status = None if (k >> 16) & 1 else k & 0xFFFF
            method = abi.METHODS[(k >> 17) & 0xF] or "_OTHER"
            labels = (method, self.route_ids.values[(k >> 21) & 0xFFFFF] if self.routes else "",
                      *self.series.values[k >> 41])
            cells.append((labels, status, counts[i * NB:(i + 1) * NB], sums[i]))
        self.metrics.add_cells(cells)

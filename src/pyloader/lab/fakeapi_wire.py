"""The wire protocol of lab/fakeapi.py: the object store with its event history,
field selectors, and the HTTP handler (list with resourceVersion and
limit/continue, chunked watch streams, get, Status errors)."""
from __future__ import annotations

import base64
import bisect
import copy
import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

# resource -> (group, version, kind)
RESOURCES = {
    "pods": ("", "v1", "Pod"),
    "services": ("", "v1", "Service"),
    "endpointslices": ("discovery.k8s.io", "v1", "EndpointSlice"),
    "replicasets": ("apps", "v1", "ReplicaSet"),
}
def api_version(res: str) -> str:
    g, v, _ = RESOURCES[res]
    return f"{g}/{v}" if g else v


def rfc3339(t: float | None = None) -> str:
    """API timestamps: seconds resolution, UTC (as metav1.Time serialises)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


def status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


# -- the object store ----------------------------------------------------------
class Store:
    """Objects by resource and (namespace, name), one global resourceVersion,
    and the event history that watches replay (until compact())."""

    def __init__(self):
        self.rv = 1
        self.compacted = 1  # watches from a resourceVersion below this get 410
        self.objs: dict[str, dict] = {r: {} for r in RESOURCES}
        self.log: list[tuple] = []  # (rv, resource, type, obj, old)
        self.cond = threading.Condition()

    def _event(self, res, typ, obj, old):
        self.log.append((self.rv, res, typ, obj, old))
        self.cond.notify_all()

    def put(self, res: str, obj: dict) -> dict:
        """Create or replace (metadata.name, metadata.namespace); returns the stored copy."""
        with self.cond:
            obj = copy.deepcopy(obj)
            md = obj.setdefault("metadata", {})
            key = (md.get("namespace", ""), md["name"])
            old = self.objs[res].get(key)
            self.rv += 1
            md["resourceVersion"] = str(self.rv)
            if old is None:
                md.setdefault("uid", str(uuid.uuid4()))
                md.setdefault("creationTimestamp", rfc3339())
            else:
                md["uid"] = old["metadata"]["uid"]
                md["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            obj["apiVersion"], obj["kind"] = api_version(res), RESOURCES[res][2]
            self.objs[res][key] = obj
            self._event(res, "MODIFIED" if old else "ADDED", obj, old)
            return copy.deepcopy(obj)

    def delete(self, res: str, ns: str, name: str) -> dict | None:
        with self.cond:
            old = self.objs[res].pop((ns, name), None)
            if old is None:
                return None
            self.rv += 1
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self.rv)
            self._event(res, "DELETED", gone, old)
            return gone

    def get(self, res: str, ns: str, name: str) -> dict | None:
        with self.cond:
            o = self.objs[res].get((ns, name))
            return copy.deepcopy(o) if o else None

    def list(self, res: str) -> list[dict]:
        with self.cond:
            return [copy.deepcopy(o) for _, o in sorted(self.objs[res].items())]

    def compact(self) -> None:
        """Forget the history: resuming a watch from an older version gets 410 Gone."""
        with self.cond:
            self.log.clear()
            self.compacted = self.rv

    def events_after(self, rv: int) -> list[tuple]:
        with self.cond:
            return self.log[bisect.bisect_right(self.log, rv, key=lambda e: e[0]):]


# -- selectors -----------------------------------------------------------------
def parse_field_selector(text: str):
    """spec.nodeName=X, metadata.name=X, metadata.namespace=X (comma: and)."""
    terms = []
    for part in filter(None, (text or "").split(",")):
        k, eq, v = part.partition("=")
        k = k.rstrip("!")
        neg = part[len(k):].startswith("!=")
        v = v.lstrip("=")
        if not eq or k not in ("spec.nodeName", "metadata.name", "metadata.namespace"):
            raise ValueError(f'field label not supported: "{k}"')
        terms.append((k.split("."), v, neg))

    def match(obj: dict | None) -> bool:
        if obj is None:
            return False
        for path, v, neg in terms:
            cur = obj
            for p in path:
                cur = (cur or {}).get(p)
            if ((cur or "") == v) == neg:
                return False
        return True
    return match


# -- HTTP ------------------------------------------------------------------------
def route(path: str):
    """'/api/v1/namespaces/ns/pods/name' -> ('pods', 'ns', 'name'); None if unknown."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        rest, gv = parts[2:], ("", "v1")
    elif len(parts) >= 3 and parts[0] == "apis":
        rest, gv = parts[3:], (parts[1], parts[2])
    else:
        return None
    ns = None
    if len(rest) >= 2 and rest[0] == "namespaces":
        ns, rest = rest[1], rest[2:]
    if not 1 <= len(rest) <= 2 or rest[0] not in RESOURCES or RESOURCES[rest[0]][:2] != gv:
        return None
    return rest[0], ns, rest[1] if len(rest) == 2 else None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fakeapi"

    def log_message(self, *a):
        pass

    def setup(self):
        api = self.server.api
        self.request.settimeout(10)
        if api.tls:
            self.request = api.tls.wrap_socket(self.request, server_side=True)
        self.request.settimeout(None)
        api.track(self.request, True)
        super().setup()

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.api.track(self.request, False)

    def send_json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        api = self.server.api
        u = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        r = route(u.path)
        watch = q.get("watch") in ("true", "1")
        api.requests.append(("watch" if watch else "get" if r and r[2] else "list",
                             r[0] if r else u.path, q))
        if api.delay:
            time.sleep(api.delay)
        scheme, _, cred = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or cred.strip() != api.token:  # schemes: any case
            return self.send_json(401, status(401, "Unauthorized", "Unauthorized"))
        if r is None:
            return self.send_json(404, status(404, "NotFound", f"no route {u.path}"))
        res, ns, name = r
        if api.fail.get(res):
            code = api.fail[res]
            return self.send_json(code, status(code, "InternalError", "injected failure"))
        if name:
            obj = api.store.get(res, ns or "", name)
            if obj is None:
                return self.send_json(404, status(404, "NotFound", f'{res} "{name}" not found'))
            return self.send_json(200, obj)
        try:
            match = parse_field_selector(q.get("fieldSelector", ""))
        except ValueError as e:
            return self.send_json(400, status(400, "BadRequest", str(e)))
        if ns:
            inner = match
            match = lambda o: inner(o) and (o or {}).get("metadata", {}).get("namespace") == ns  # noqa: E731
        if watch:
            return self.watch(res, match, q)
        return self.list(res, match, q)

    def list(self, res, match, q):
        api = self.server.api
        token = q.get("continue")
        if token:
            snap = api.snapshots.pop(token, None)
            if snap is None:
                return self.send_json(410, status(410, "Expired", "continue token too old"))
            rv, items = snap
        else:
            with api.store.cond:
                rv, items = api.store.rv, [o for o in api.store.list(res) if match(o)]
        limit = int(q.get("limit") or 0)
        md = {"resourceVersion": str(rv)}
        if limit and len(items) > limit:
            nxt = base64.urlsafe_b64encode(os.urandom(9)).decode()
            api.snapshots[nxt] = (rv, items[limit:])
            items, md["continue"] = items[:limit], nxt
            md["remainingItemCount"] = len(api.snapshots[nxt][1])
        for o in items:  # list items carry no kind/apiVersion
            o.pop("kind", None)
            o.pop("apiVersion", None)
        self.send_json(200, {"kind": RESOURCES[res][2] + "List", "apiVersion": api_version(res),
                             "metadata": md, "items": items})

    def chunk(self, event: dict) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def watch(self, res, match, q):
        api, store = self.server.api, self.server.api.store
        kind = RESOURCES[res][2]
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        end = time.monotonic() + float(q.get("timeoutSeconds") or 1800)
        rv_text = q.get("resourceVersion", "")
        with store.cond:
            start_rv = store.rv
            initial = [] if rv_text not in ("", "0") else [o for o in store.list(res) if match(o)]
        last = int(rv_text) if rv_text not in ("", "0") else start_rv
        if last < store.compacted and api.gone_as_status:
            return self.send_json(410, status(410, "Expired", f"too old resource version: {last}"))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            if last < store.compacted:
                msg = f"too old resource version: {last} ({store.compacted})"
                self.chunk({"type": "ERROR", "object": status(410, "Expired", msg)})
                return self._end()
            for o in initial:
                self.chunk({"type": "ADDED", "object": o})
            next_bookmark = time.monotonic() + api.bookmark_interval
            while not api.stopping and time.monotonic() < end:
                for erv, eres, typ, obj, old in store.events_after(last):
                    last = erv
                    if eres != res:
                        continue
                    typ = translate(typ, match(obj), match(old))
                    if typ:
                        self.chunk({"type": typ, "object": obj})
                now = time.monotonic()
                if bookmarks and now >= next_bookmark:
                    with store.cond:
                        if not store.events_after(last):
                            last = store.rv
                    self.chunk({"type": "BOOKMARK", "object": {
                        "kind": kind, "apiVersion": api_version(res),
                        "metadata": {"resourceVersion": str(last)}}})
                    next_bookmark = now + api.bookmark_interval
                with store.cond:
                    if not store.events_after(last):
                        store.cond.wait(min(0.2, max(0.0, end - now)))
            if not api.stopping:
                self._end()
        except OSError:  # the client went away, or drop_connections()
            self.close_connection = True

    def _end(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def translate(typ: str, now_matches: bool, before_matched: bool) -> str | None:
    """An event as a selector-filtered watch reports it."""
    if typ == "ADDED":
        return "ADDED" if now_matches else None
    if typ == "DELETED":
        return "DELETED" if before_matched else None
    if now_matches and before_matched:
        return "MODIFIED"
    return "ADDED" if now_matches else "DELETED" if before_matched else None

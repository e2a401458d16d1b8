"""Route templates: raw URL paths -> low-cardinality `http.route` values.

    /users/123/orders/9f1c2ab7e0   ->  /users/{id}/orders/{id}

Order of precedence:
  1. user patterns (`--route '/api/v1/items/{id}'`), first match in the
     order given; `{name}` matches exactly one non-empty path segment and
     the route is the pattern itself;
  2. default heuristics, per path segment (see looks_like_id);
  3. a hard cap of distinct routes per server (service when Kubernetes
     names are known, else address:port): routes past the cap are folded
     into OVERFLOW_ROUTE and counted. Routes from user patterns are never
     folded (the user bounded them).

The access log keeps the raw `url.path`; RouteComponent adds `http.route`.
"""
from __future__ import annotations

import re

from pyloader.pipeline.component import Component
from pyloader.errors import RedtapError

ID = "{id}"
OVERFLOW_ROUTE = "/{overflow}"   # the one route of the rest once a server hit the cap
OTHER_TARGET = "{other}"        # authority-form (CONNECT) and other odd targets

_UUID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")
_HEX = re.compile(r"(?:0x)?[0-9a-fA-F]+")
_B64 = re.compile(r"[A-Za-z0-9_\-+=.~%]+")
_NO_DIGITS = str.maketrans("", "", "0123456789")
_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/]*")

LONG_TOKEN = 40       # a segment this long is an id whatever it looks like
HEX_MIN = 8           # hex ids/hashes: at least this long and with a digit
B64_MIN = 16          # base64-ish tokens: at least this long, with a digit or mixed case
MANY_DIGITS = 4       # a segment with this many digits (order-12345, 2024-01-02)


def _random_case(seg: str) -> bool:
    """Mixed case as in random tokens (not CamelCaseWords): both cases >= 1/4."""
    upper = sum(1 for c in seg if c.isupper())
    lower = sum(1 for c in seg if c.islower())
    return 4 * upper >= len(seg) and 4 * lower >= len(seg)


def looks_like_id(seg: str) -> bool:
    """The default heuristics: is this path segment an identifier?"""
    n = len(seg)
    if n == 0:
        return False
    if seg.isdigit() or n >= LONG_TOKEN:
        return True
    if seg.isalpha():  # words; random letters only when long and of random case
        return n >= B64_MIN and _random_case(seg)
    digits = n - len(seg.translate(_NO_DIGITS))
    if n >= 32 and _UUID.fullmatch(seg):
        return True
    if n >= HEX_MIN and digits and _HEX.fullmatch(seg):
        return True
    if n >= B64_MIN and _B64.fullmatch(seg) and (digits or _random_case(seg)):
        return True
    return digits >= MANY_DIGITS


_WORDS: dict[str, bool] = {}  # segments known not to be ids (bounded; ids are not kept)


def _is_id(seg: str) -> bool:
    if seg in _WORDS:
        return False
    if looks_like_id(seg):
        return True
    if len(_WORDS) >= 4096:
        _WORDS.clear()
    _WORDS[seg] = False
    return False


def template_path(path: str) -> str:
    """Default heuristics on a whole path (origin-form, absolute-form or other)."""
    if not path.startswith("/"):
        m = _ABSOLUTE.match(path)
        if m:  # absolute-form (proxies): template its path
            path = path[m.end():] or "/"
        elif path == "*":
            return "*"
        else:
            return OTHER_TARGET
    segs = path.split("/")
    changed = False
    for i, seg in enumerate(segs):
        if seg and _is_id(seg):
            segs[i] = ID
            changed = True
    return "/".join(segs) if changed else path


class RoutePattern:
    """A user pattern like /api/v1/items/{id}: literal segments and {name} holes."""

    def __init__(self, text: str):
        if not text.startswith("/"):
            raise RedtapError(f"route pattern {text!r}: must start with '/'")
        self.text = text
        self.parts: list[str | None] = []  # None: one non-empty segment
        for seg in text.split("/"):
            if seg.startswith("{") and seg.endswith("}") and len(seg) > 2:
                name = seg[1:-1]
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                    raise RedtapError(f"route pattern {text!r}: bad placeholder {seg!r}")
                self.parts.append(None)
            elif "{" in seg or "}" in seg:
                raise RedtapError(f"route pattern {text!r}: a placeholder must be a whole "
                                  f"segment like {{id}}, not {seg!r}")
            else:
                self.parts.append(seg)

    def match(self, segs: list[str]) -> bool:
        if len(segs) != len(self.parts):
            return False
        for want, got in zip(self.parts, segs):
            if want is None:
                if not got:
                    return False
            elif want != got:
                return False
        return True

    def __repr__(self) -> str:
        return f"RoutePattern({self.text!r})"


class RouteTable:
    """path -> route with user patterns first, heuristics second, a per-server cap.

    Templating a path is a pure function, so it is cached per path (bounded);
    the cap is per server key.
    """

    def __init__(self, patterns=(), max_routes: int = 100, cache_size: int = 65536):
        if max_routes < 1:
            raise RedtapError(f"--max-routes must be at least 1 (got {max_routes})")
        self.patterns = [p if isinstance(p, RoutePattern) else RoutePattern(p) for p in patterns]
        self.max_routes = max_routes
        self.cache_size = cache_size
        self._cache: dict[str, tuple[str, bool]] = {}
        self._routes: dict[object, set] = {}  # server key -> routes seen
        self.overflowed = 0                   # requests folded into OVERFLOW_ROUTE

    def template(self, path: str) -> tuple[str, bool]:
        """(route, from a user pattern) for a raw path, before the cap."""
        hit = self._cache.get(path)
        if hit is not None:
            return hit
        res = None
        if self.patterns:
            p = path
            if not p.startswith("/"):
                m = _ABSOLUTE.match(p)
                p = (p[m.end():] or "/") if m else ""
            segs = p.split("/")
            for pat in self.patterns:
                if pat.match(segs):
                    res = (pat.text, True)
                    break
        if res is None:
            res = (template_path(path), False)
        if len(self._cache) >= self.cache_size:
            self._cache.clear()
        self._cache[path] = res
        return res

    def route(self, server, path: str) -> str:
        """The route of `path` on `server` (any hashable key), cap applied."""
        route, pinned = self.template(path)
        if pinned:
            return route
        seen = self._routes.get(server)
        if seen is None:
            seen = self._routes[server] = set()
        if route in seen:
            return route
        if len(seen) >= self.max_routes:
            self.overflowed += 1
            return OVERFLOW_ROUTE
        seen.add(route)
        return route

    def distinct(self) -> int:
        return sum(len(s) for s in self._routes.values())


def server_key(rec: dict):
    """The unit of the route cap: the Kubernetes service when known, else address:port."""
    svc = rec.get("server.k8s.service.name")
    if svc is not None:
        return (rec.get("server.k8s.namespace.name"), svc)
    return (rec["server.address"], rec["server.port"])


class RouteComponent(Component):
    """Adds `http.route` to every access-log record (the raw `url.path` stays)."""

    name = "routes"
    fast_role = "routes"

    def __init__(self, table: RouteTable | None = None):
        self.table = table or RouteTable()

    def process(self, rec: dict) -> None:
        rec["http.route"] = self.table.route(server_key(rec), rec["url.path"])

    def counters(self) -> dict:
        return {"routes": {"distinct": self.table.distinct(), "overflowed": self.table.overflowed}}

"""Secrets in URLs: redact the query values of sensitive keys.

    ?user=ann&access_token=abc&API_KEY=x  ->  ?user=ann&access_token=REDACTED&API_KEY=REDACTED

A query parameter is sensitive when its key, percent-decoded (repeatedly:
double-encoding does not hide it) and lower-cased, CONTAINS one of the
configured words: with the default words, `access_token`, `api_key`,
`X-Amz-Signature`, `client_secret`, `sessionid`, `Authorization` all are.
Containment errs on the side of hiding (`monkey=1` is hidden too): a lost
harmless value is cheap, a leaked token is not.

Only the value is replaced (by REDACTED); key, separators (`&` and `;`) and
everything else stay byte for byte, so the query keeps its shape. A key
without `=`, or with an empty value, has nothing to hide. A truncated query
(url.truncated) is treated the same: what was kept of a sensitive value is hidden.
Path parameters (`/cart;jsessionid=0A1B/items`) get the same treatment in
`url.path`. Other secrets in the path (/reset/<token>) are not recognised.

A Component: the agent calls process() on every record before it is
written and before the route and metrics components see it.
"""
from __future__ import annotations

import re
from urllib.parse import unquote_plus

from pyloader.pipeline.component import Component
from pyloader.errors import ConfigError

DEFAULT_KEYS = ("token", "password", "secret", "key", "auth", "signature", "session")
MASK = "REDACTED"
_PAIR = re.compile(r"([^&;=]*)=([^&;]*)")
_PATH_PARAM = re.compile(r";([^;/=]*)=([^;/]*)")
_WORD = re.compile(r"^[^\s&;=]+$")


def parse_keys(text: str) -> tuple[str, ...]:
    """'token, api-key,PASS' -> ('token', 'api-key', 'pass'); a clear error
    for an empty list or a word that could never match a key."""
    words = [w.strip().lower() for w in text.split(",")]
    words = [w for w in words if w]
    if not words:
        raise ConfigError("--redact-keys: give at least one key word (or use --no-redact)")
    for w in words:
        if not _WORD.match(w):
            raise ConfigError(f"--redact-keys: {w!r} cannot be part of a query key "
                              "(no spaces, '&', ';' or '=')")
    return tuple(dict.fromkeys(words))


def _decoded(key: str) -> str:
    for _ in range(4):  # %2574oken -> %74oken -> token
        dec = unquote_plus(key)
        if dec == key:
            break
        key = dec
    return key.lower()


class Redactor(Component):
    """Replaces the values of sensitive query parameters in `url.query`."""

    name = "redact"
    fast_role = "redact"

    def __init__(self, keys=DEFAULT_KEYS, mask: str = MASK):
        self.keys = tuple(k.lower() for k in keys)
        if not self.keys:
            raise ConfigError("redaction needs at least one key word")
        self.mask = mask
        self._sensitive = re.compile("|".join(re.escape(k) for k in self.keys))
        self.values = 0    # values replaced
        self.records = 0   # records with at least one

    def sensitive(self, key: str) -> bool:
        return self._sensitive.search(_decoded(key)) is not None

    def _redact(self, pattern: re.Pattern, text: str, lead: str) -> tuple[str, int]:
        n = 0

        def sub(m: re.Match) -> str:
            nonlocal n
            if m.group(2) in ("", self.mask) or not self.sensitive(m.group(1)):
                return m.group(0)
            n += 1
            return f"{lead}{m.group(1)}={self.mask}"

        return pattern.sub(sub, text), n

    def redact_query(self, query: str) -> tuple[str, int]:
        """(the query with sensitive values masked, how many were)."""
        return self._redact(_PAIR, query, "")

    def redact_path(self, path: str) -> tuple[str, int]:
        """(the path with sensitive ;key=value parameters masked, how many were)."""
        return self._redact(_PATH_PARAM, path, ";")

    def redact_url(self, path: str | None, query: str | None) -> tuple:
        """(path, query, values masked) of a request-target; counts nothing."""
        n = 0
        if query and "=" in query:
            query, n = self.redact_query(query)
        if path and ";" in path:
            path, m = self.redact_path(path)
            n += m
        return path, query, n

    def process(self, rec: dict) -> None:
        path, query, n = self.redact_url(rec.get("url.path"), rec.get("url.query"))
        if n:
            if path is not None:
                rec["url.path"] = path
            if query is not None:
                rec["url.query"] = query
            self.values += n
            self.records += 1

    def counters(self) -> dict:
        return {"redact": {"records": self.records, "values": self.values}}

"""Errors that carry the errno and what was being done."""
from __future__ import annotations

import errno as _errno
import os


class RedtapError(Exception):
    """A failure the user can act on; the CLI prints it without a traceback."""


class BpfError(RedtapError):
    """A libbpf / bpf() failure: errno plus the operation that failed."""

    def __init__(self, err: int, doing: str, detail: str = ""):
        self.errno = err
        self.doing = doing
        name = _errno.errorcode.get(err, str(err))
        msg = f"{doing}: {os.strerror(err)} ({name})"
        if detail:
            msg += f"\n{detail}"
        super().__init__(msg)


class ConfigError(RedtapError):
    """Bad command-line or configuration input."""

"""The two system calls the access-log writer makes through ctypes.

* reserve(): fallocate(FALLOC_FL_KEEP_SIZE), so a full disk fails before a
  byte of a batch is written;
* append_if_current(): one append made only while the log's path still names
  the open file, checked and written in the agent's helper
  (src/native/appendlog.c). Python could stat() and then write(), but between
  the two the writer thread waits for the GIL, for milliseconds on a busy
  node: a rename by logrotate (`create`) in that gap sent a whole batch into
  the rotated file after rsyslog's imfile had read it to its end and closed it
  (575 lines lost in CI). ctypes holds no GIL during the call. None where the
  helper is not built; the writer then falls back to its own check.
"""
from __future__ import annotations

import ctypes
import errno
import os

FALLOC_FL_KEEP_SIZE = 1
NO_RESERVE = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV, errno.ESPIPE}
MOVED = -1                  # al_append_current(): the path names another file or none

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def reserve(fd: int, offset: int, length: int) -> int:
    """Reserve length bytes at offset without changing the size: 0 or the errno."""
    if _fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        return ctypes.get_errno()
    return 0


def _load_helper():
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "librecordfmt.so")
    try:
        fn = ctypes.CDLL(path).al_append_current
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                   ctypes.POINTER(ctypes.c_size_t)]
    fn.restype = ctypes.c_int
    return fn


_al_append_current = _load_helper()


def _append_if_current(fd: int, path: bytes, data: bytes) -> int:
    """Append data at fd while path still names fd's file: len(data), or MOVED
    if it does not (nothing written). An error raises OSError whose `written`
    is the number of bytes of data already in the file."""
    done = ctypes.c_size_t(0)
    err = _al_append_current(fd, path, data, len(data), ctypes.byref(done))
    if err == MOVED:
        return MOVED
    if err:
        e = OSError(err, f"appending to {os.fsdecode(path)}: {os.strerror(err)}")
        e.written = done.value
        raise e
    return len(data)


append_if_current = _append_if_current if _al_append_current is not None else None

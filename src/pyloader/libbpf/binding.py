"""ctypes declarations for the system libbpf (libbpf.so.1): nothing else.

Every function redtap calls is declared once here with its argtypes and
restype. libbpf >= 1.0 returns NULL / a negative errno and sets errno; the
callers in bpfobject.py and ringbuf.py turn that into BpfError.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

from pyloader.errors import BpfError

c_int, c_uint, c_size_t, c_void_p, c_char_p = (
    ctypes.c_int, ctypes.c_uint, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_char_p)
c_u32, c_u64 = ctypes.c_uint32, ctypes.c_uint64

LIBBPF_NAME = os.environ.get("REDTAP_LIBBPF", "libbpf.so.1")


class BpfTestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf/bpf.h)."""
    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_u32),
        ("data_size_out", c_u32),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_u32),
        ("ctx_size_out", c_u32),
        ("retval", c_u32),
        ("repeat", c_int),
        ("duration", c_u32),
        ("flags", c_u32),
        ("cpu", c_u32),
        ("batch_size", c_u32),
    ]


# int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size)
RING_BUFFER_SAMPLE_FN = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)
# int (*libbpf_print_fn_t)(enum libbpf_print_level, const char *fmt, va_list)
PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)

_SIGNATURES = {
    # object
    "bpf_object__open_file": (c_void_p, [c_char_p, c_void_p]),
    "bpf_object__load": (c_int, [c_void_p]),
    "bpf_object__close": (None, [c_void_p]),
    "bpf_object__find_map_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_object__find_program_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_object__next_map": (c_void_p, [c_void_p, c_void_p]),
    "bpf_map__name": (c_char_p, [c_void_p]),
    "bpf_map__fd": (c_int, [c_void_p]),
    "bpf_map__set_max_entries": (c_int, [c_void_p, c_u32]),
    "bpf_map__max_entries": (c_u32, [c_void_p]),
    "bpf_map__initial_value": (c_void_p, [c_void_p, ctypes.POINTER(c_size_t)]),
    "bpf_map__key_size": (c_u32, [c_void_p]),
    "bpf_map__value_size": (c_u32, [c_void_p]),
    "bpf_program__fd": (c_int, [c_void_p]),
    # maps by fd
    "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, c_u64]),
    "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
    "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
    # programs by fd
    "bpf_prog_test_run_opts": (c_int, [c_int, ctypes.POINTER(BpfTestRunOpts)]),
    # ring buffer
    "ring_buffer__new": (c_void_p, [c_int, RING_BUFFER_SAMPLE_FN, c_void_p, c_void_p]),
    "ring_buffer__poll": (c_int, [c_void_p, c_int]),
    "ring_buffer__consume": (c_int, [c_void_p]),
    "ring_buffer__free": (None, [c_void_p]),
    # BTF (to find .rodata variables)
    "bpf_object__btf": (c_void_p, [c_void_p]),
    "btf__find_by_name_kind": (c_int, [c_void_p, c_char_p, c_u32]),
    "btf__type_by_id": (c_void_p, [c_void_p, c_u32]),
    "btf__name_by_offset": (c_char_p, [c_void_p, c_u32]),
    # misc
    "libbpf_num_possible_cpus": (c_int, []),
    "libbpf_set_print": (c_void_p, [c_void_p]),
}

_lib = None


def lib() -> ctypes.CDLL:
    """The loaded libbpf, with every signature declared (loaded once)."""
    global _lib
    if _lib is None:
        try:
            handle = ctypes.CDLL(LIBBPF_NAME, use_errno=True)
        except OSError as e:
            raise BpfError(2, f"loading {LIBBPF_NAME} (install libbpf1 / libbpf 1.x)") from e
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(handle, name)
            fn.restype = restype
            fn.argtypes = argtypes
        _lib = handle
    return _lib


def last_errno(ret: int | None = None) -> int:
    """errno of the last libbpf call (its negative return value if given)."""
    if ret is not None and ret < 0:
        return -ret
    return ctypes.get_errno() or 22

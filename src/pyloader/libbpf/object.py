"""A thin wrapper over libbpf objects, maps and programs.

    obj = BpfObject.open(path); obj.load()
    obj.map("conns").lookup(key)           # bytes in, bytes out
    obj.program("redtap_req").fd
"""
from __future__ import annotations

import ctypes
import errno
import threading
from typing import Iterator

from pyloader.libbpf import binding
from pyloader.libbpf.binding import BpfTestRunOpts, PRINT_FN, lib, last_errno
from pyloader.errors import BpfError

BPF_ANY = 0  # bpf_map_update_elem flags: create or replace

_log_lock = threading.Lock()
_log_lines: list[str] = []
_libc = ctypes.CDLL(None, use_errno=True)
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]


@PRINT_FN
def _print_cb(level, fmt, va):  # pragma: no cover - called from C
    if level >= 2:  # LIBBPF_DEBUG: not kept
        return 0
    try:
        # the verifier's log comes as one message: room for its end (the error)
        buf = ctypes.create_string_buffer(1 << 20)
        _libc.vsnprintf(buf, len(buf), fmt, va)
        with _log_lock:
            _log_lines.append(buf.value.decode(errors="replace"))
            del _log_lines[:-400]
    except Exception:
        pass
    return 0


def _take_log() -> str:
    with _log_lock:
        text = "".join(_log_lines)
        _log_lines.clear()
    return text


class Map:
    """A BPF map by fd. Keys and values are bytes (or ctypes objects)."""

    def __init__(self, name: str, fd: int, key_size: int, value_size: int, percpu: bool = False):
        self.name, self.fd = name, fd
        self.key_size, self.value_size = key_size, value_size
        self.percpu = percpu
        self.ncpus = lib().libbpf_num_possible_cpus() if percpu else 1
        # per-CPU values come as one 8-byte-aligned slot per possible CPU
        self.slot = (value_size + 7) & ~7 if percpu else value_size
        self._key = ctypes.create_string_buffer(key_size)
        self._val = ctypes.create_string_buffer(self.slot * self.ncpus)

    def _keybuf(self, key) -> ctypes.Array:
        data = bytes(key)
        if len(data) != self.key_size:
            raise ValueError(f"map {self.name}: key is {len(data)} bytes, want {self.key_size}")
        ctypes.memmove(self._key, data, self.key_size)
        return self._key

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        data = bytes(value)
        if len(data) != self.slot * self.ncpus and len(data) != self.value_size:
            raise ValueError(f"map {self.name}: value is {len(data)} bytes, want {self.value_size}")
        val = ctypes.create_string_buffer(data, max(len(data), 1))
        ret = lib().bpf_map_update_elem(self.fd, self._keybuf(key), val, flags)
        if ret < 0:
            raise BpfError(last_errno(ret), f"updating an element of map {self.name}")

    def lookup(self, key) -> bytes | None:
        """The value (all CPUs' slots concatenated for per-CPU maps), or None."""
        ret = lib().bpf_map_lookup_elem(self.fd, self._keybuf(key), self._val)
        if ret < 0:
            err = last_errno(ret)
            if err == errno.ENOENT:
                return None
            raise BpfError(err, f"looking up an element of map {self.name}")
        return self._val.raw

    def delete(self, key) -> bool:
        ret = lib().bpf_map_delete_elem(self.fd, self._keybuf(key))
        if ret < 0:
            err = last_errno(ret)
            if err == errno.ENOENT:
                return False
            raise BpfError(err, f"deleting an element of map {self.name}")
        return True

    def keys(self) -> Iterator[bytes]:
        """All keys (a snapshot taken as it goes: the kernel may change the map)."""
        prev, nxt = None, ctypes.create_string_buffer(self.key_size)
        while True:
            ret = lib().bpf_map_get_next_key(self.fd, prev, nxt)
            if ret < 0:
                err = last_errno(ret)
                if err == errno.ENOENT:
                    return
                raise BpfError(err, f"iterating map {self.name}")
            key = nxt.raw
            yield key
            prev = ctypes.create_string_buffer(key, self.key_size)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for key in list(self.keys()):
            val = self.lookup(key)
            if val is not None:
                yield key, val

    def percpu_u64(self, key) -> list[int]:
        """For a per-CPU map of u64: the value on each possible CPU."""
        raw = self.lookup(key)
        if raw is None:
            return []
        return [int.from_bytes(raw[i * self.slot:i * self.slot + 8], "little")
                for i in range(self.ncpus)]


class Program:
    def __init__(self, name: str, fd: int):
        self.name, self.fd = name, fd

    def test_run(self, data: bytes, ctx: bytes | None = None, repeat: int = 1):
        """BPF_PROG_TEST_RUN: returns (retval, data_out, duration_ns)."""
        din = ctypes.create_string_buffer(data, len(data))
        dout = ctypes.create_string_buffer(len(data) + 256)
        opts = BpfTestRunOpts(sz=ctypes.sizeof(BpfTestRunOpts))
        opts.data_in = ctypes.cast(din, ctypes.c_void_p)
        opts.data_size_in = len(data)
        opts.data_out = ctypes.cast(dout, ctypes.c_void_p)
        opts.data_size_out = len(dout)
        opts.repeat = repeat
        if ctx is not None:
            cin = ctypes.create_string_buffer(ctx, len(ctx))
            opts.ctx_in = ctypes.cast(cin, ctypes.c_void_p)
            opts.ctx_size_in = len(ctx)
        ret = lib().bpf_prog_test_run_opts(self.fd, ctypes.byref(opts))
        if ret < 0:
            raise BpfError(last_errno(ret), f"BPF_PROG_TEST_RUN of program {self.name}")
        return opts.retval, dout.raw[:opts.data_size_out], opts.duration


class BpfObject:
    """An opened (then loaded) BPF ELF object."""

    def __init__(self, path: str, ptr: int):
        self.path, self._ptr = path, ptr
        self.loaded = False
        self._maps: dict[str, Map] = {}

    @classmethod
    def open(cls, path: str) -> "BpfObject":
        L = lib()
        L.libbpf_set_print(ctypes.cast(_print_cb, ctypes.c_void_p))
        ptr = L.bpf_object__open_file(path.encode(), None)
        if not ptr:
            raise BpfError(last_errno(), f"opening BPF object {path}", _take_log())
        return cls(path, ptr)

    def _map_ptr(self, name: str) -> int:
        ptr = lib().bpf_object__find_map_by_name(self._ptr, name.encode())
        if not ptr:
            raise BpfError(2, f"finding map {name} in {self.path}")
        return ptr

    def max_entries(self, name: str) -> int:
        return lib().bpf_map__max_entries(self._map_ptr(name))

    def set_max_entries(self, name: str, n: int) -> None:
        ret = lib().bpf_map__set_max_entries(self._map_ptr(name), n)
        if ret < 0:
            raise BpfError(last_errno(ret), f"setting max_entries of map {name} to {n}")

    def set_rodata(self, var: str, value: bytes) -> None:
        """Set a `const volatile` global (before load), found by name in the
        .rodata section's BTF (libbpf has fixed its offsets at open)."""
        L = lib()
        btf = L.bpf_object__btf(self._ptr)
        sec = L.btf__find_by_name_kind(btf, b".rodata", 15) if btf else -1  # BTF_KIND_DATASEC
        if sec < 0:
            raise BpfError(2, f"finding the .rodata BTF of {self.path}")
        hdr = ctypes.cast(L.btf__type_by_id(btf, sec), ctypes.POINTER(ctypes.c_uint32))
        vlen = hdr[1] & 0xFFFF
        for i in range(vlen):  # struct btf_var_secinfo { type, offset, size } after the header
            vtype, off, size = hdr[3 + 3 * i], hdr[4 + 3 * i], hdr[5 + 3 * i]
            vhdr = ctypes.cast(L.btf__type_by_id(btf, vtype), ctypes.POINTER(ctypes.c_uint32))
            if L.btf__name_by_offset(btf, vhdr[0]) == var.encode():
                if len(value) != size:
                    raise ValueError(f"{var} is {size} bytes, got {len(value)}")
                data = self.rodata()
                ctypes.memmove(ctypes.addressof(data) + off, value, size)
                return
        raise BpfError(2, f"finding the .rodata variable {var} in {self.path}")

    def rodata(self) -> ctypes.Array:
        """The object's .rodata (const volatile globals), writable before load."""
        m = lib().bpf_object__next_map(self._ptr, None)
        while m:
            if lib().bpf_map__name(m).decode().endswith(".rodata"):
                size = ctypes.c_size_t()
                ptr = lib().bpf_map__initial_value(m, ctypes.byref(size))
                return (ctypes.c_char * size.value).from_address(ptr)
            m = lib().bpf_object__next_map(self._ptr, m)
        raise BpfError(2, f"finding .rodata in {self.path}")

    def load(self) -> None:
        _take_log()
        ret = lib().bpf_object__load(self._ptr)
        if ret < 0:
            raise BpfError(last_errno(ret), f"loading BPF object {self.path} into the kernel",
                           _take_log()[-4000:])
        self.loaded = True

    def map(self, name: str, percpu: bool = False) -> Map:
        """Map @name of the loaded object; percpu: its values are per CPU (the
        caller knows: bpf_map__type is not in every libbpf 1.x)."""
        if name not in self._maps:
            L, ptr = lib(), self._map_ptr(name)
            fd = L.bpf_map__fd(ptr)
            if fd < 0:
                raise BpfError(last_errno(fd), f"getting the fd of map {name} (object not loaded?)")
            self._maps[name] = Map(name, fd, L.bpf_map__key_size(ptr), L.bpf_map__value_size(ptr),
                                   percpu)
        return self._maps[name]

    def program(self, name: str) -> Program:
        ptr = lib().bpf_object__find_program_by_name(self._ptr, name.encode())
        if not ptr:
            raise BpfError(2, f"finding program {name} in {self.path}")
        fd = lib().bpf_program__fd(ptr)
        if fd < 0:
            raise BpfError(last_errno(fd), f"getting the fd of program {name} (object not loaded?)")
        return Program(name, fd)

    def close(self) -> None:
        if self._ptr:
            lib().bpf_object__close(self._ptr)
            self._ptr = None
            self._maps.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

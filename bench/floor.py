"""The reference floor of issue 16 (bench/floor.bpf.c): build, load, endpoints.

The benchmark's configuration F attaches it like B (bench/kernel_only.py --floor)
and bench/stages.py measures it beside redtap's stages."""
from __future__ import annotations

import ipaddress
import os
import subprocess

from pyloader.libbpf.object import BpfObject

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SOURCE = os.path.join(HERE, "floor.bpf.c")
OBJECT = os.path.join(ROOT, "build", "floor.bpf.o")


def build() -> str:
    """Compile floor.bpf.c with the flags of redtap's object; returns its path."""
    flags = subprocess.run(["sh", "src/bpf/cflags.sh"], cwd=ROOT, check=True, text=True,
                           capture_output=True).stdout.split()
    os.makedirs(os.path.dirname(OBJECT), exist_ok=True)
    subprocess.run([os.environ.get("CLANG", "clang"), *flags, "-c", SOURCE, "-o", OBJECT],
                   cwd=ROOT, check=True)
    return OBJECT


def endpoint_key(text: str) -> bytes:
    """'IP:PORT' or '[IP6]:PORT' -> struct floor_ep (v4-mapped address, port in
    network byte order)."""
    host, _, port = text.rpartition(":")
    ip = ipaddress.ip_address(host.strip("[]"))
    if ip.version == 4:
        ip = ipaddress.IPv6Address("::ffff:" + str(ip))
    return ip.packed + int(port).to_bytes(2, "big") + b"\0\0"


def load(path: str | None, endpoints) -> BpfObject:
    if path is None:
        fresh = (os.path.exists(OBJECT) and
                 os.path.getmtime(OBJECT) >= os.path.getmtime(SOURCE))
        path = OBJECT if fresh else build()
    obj = BpfObject.open(path)
    try:
        obj.load()
        m = obj.map("endpoints")
        for e in endpoints:
            m.update(endpoint_key(e), b"\x01")
        return obj
    except BaseException:
        obj.close()
        raise


def programs(obj: BpfObject):
    """(requests, responses) programs."""
    return obj.program("floor_req"), obj.program("floor_resp")

"""Build the initramfs that runs redtap's BPF tests on another kernel.

    python tests/kernel61/initramfs.py OUT.cpio.gz [OBJECT]

The image holds, at the same absolute paths as on this machine: the
project's Python interpreter (the venv and its base install: stdlib,
lib-dynload), the site-packages the BPF tests import, the repository's
src/ and tests/, the built BPF object, libbpf.so.1 and every shared
library all of that links to, a static busybox for /bin/sh, and /init
(tests/kernel61/init.sh), and bpftool for the verifier's log when the
object is refused. Run by this interpreter (the venv's python).
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SKIP_STDLIB = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
               "pydoc_data", "site-packages", "__pycache__"}
LIBBPF = "libbpf.so.1"


class Cpio:
    """A gzip'd newc cpio archive (what the kernel unpacks as initramfs)."""

    def __init__(self, path: str):
        self.f = gzip.open(path, "wb", compresslevel=6)
        self.ino = 1
        self.seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        name = name.lstrip("/")
        if name in self.seen:
            return
        self.seen.add(name)
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.f.write(hdr + name.encode() + b"\0")
        self.f.write(b"\0" * ((4 - (len(hdr) + len(name) + 1) % 4) % 4))
        self.f.write(data)
        self.f.write(b"\0" * ((4 - len(data) % 4) % 4))
        self.ino += 1

    def dirs(self, path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | 0o755)

    def add(self, path: str, arcname: str | None = None, mode: int | None = None) -> None:
        """A file, directory or symlink from the host (following nothing)."""
        arc = (arcname or path).lstrip("/")
        self.dirs("/" + arc)
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(path)
            self._entry(arc, stat.S_IFLNK | 0o777, target.encode())
            if not os.path.isabs(target):
                target = os.path.join(os.path.dirname(path), target)
            self.add(os.path.normpath(target))  # and what it points to
        elif stat.S_ISDIR(st.st_mode):
            self._entry(arc, stat.S_IFDIR | 0o755)
        else:
            with open(path, "rb") as f:
                self._entry(arc, stat.S_IFREG | (mode or (st.st_mode & 0o777)), f.read())

    def tree(self, top: str, skip=frozenset()) -> None:
        for root, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if d not in skip and d != "__pycache__"]
            self.add(root)
            for name in files:
                if not name.endswith((".pyc", ".pyo")):
                    self.add(os.path.join(root, name))

    def data(self, arcname: str, data: bytes, mode: int = 0o644) -> None:
        self.dirs("/" + arcname.lstrip("/"))
        self._entry(arcname, stat.S_IFREG | mode, data)

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)
        self.f.close()


def shared_libs(paths: list[str]) -> set[str]:
    """Every shared library (and its symlinks) the given ELF files need."""
    out = set()
    for p in paths:
        r = subprocess.run(["ldd", p], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            parts = line.split()
            for tok in parts:
                if tok.startswith("/") and os.path.exists(tok):
                    out.add(tok)
    return out


def modules_for_tests() -> list[str]:
    """Files of every module the BPF tests import (pytest collection, in a
    child interpreter), to pick the site-packages to ship."""
    code = ("import sys, json, pytest; pytest.main(['--collect-only', '-q', '-p', "
            "'no:cacheprovider', 'tests/bpf']); import pyloader.output.accesslog, pyloader.kernel.tracer; "
            "print('@@' + json.dumps([getattr(m, '__file__', None) for m in list(sys.modules.values())]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    line = [l for l in r.stdout.splitlines() if l.startswith("@@")]
    if not line:
        raise SystemExit(f"collecting the BPF tests failed:\n{r.stdout}\n{r.stderr}")
    return [f for f in json.loads(line[0][2:]) if f]


def main(out: str, obj: str | None = None) -> None:
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        raise SystemExit("busybox not found: install busybox-static (make deps-kernel61)")
    cp = Cpio(out)
    for d in ("proc", "sys", "dev", "tmp", "bin", "sbin", "run"):
        cp._entry(d, stat.S_IFDIR | 0o755)
    cp.add(busybox, "/bin/busybox", 0o755)
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"  # the full verifier log on failure
    cp.add(bpftool, "/bin/bpftool", 0o755)
    cp.add(os.path.join(HERE, "init.sh"), "/init", 0o755)

    # the interpreter: the venv (symlinks to the base install) and the base install
    venv_py = os.path.join(REPO, ".venv", "bin", "python")
    real_py = os.path.realpath(venv_py)
    cp.add(venv_py)
    cp.add(os.path.join(REPO, ".venv", "pyvenv.cfg"))
    stdlib = sysconfig.get_paths()["stdlib"]
    cp.tree(stdlib, SKIP_STDLIB)
    dynload = os.path.join(stdlib, "lib-dynload")
    elves = [busybox, bpftool, real_py, *(os.path.join(dynload, f) for f in os.listdir(dynload))]

    # site-packages: the packages the tests import, their metadata and .pth files
    site = sysconfig.get_paths()["purelib"]
    tops = set()
    for f in modules_for_tests():
        if f.startswith(site + "/"):
            tops.add(f[len(site) + 1:].split("/")[0])
    for name in sorted(os.listdir(site)):
        base = name.split("-")[0].lower().replace("_", "")
        if name.endswith(".pth") or (name.endswith(".dist-info") and
                                     any(t.lower().replace("_", "").startswith(base) for t in tops)):
            tops.add(name)
    for t in sorted(tops):
        p = os.path.join(site, t)
        cp.tree(p) if os.path.isdir(p) else cp.add(p)
        if os.path.isdir(p):
            elves += [os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs if ".so" in f]

    # the project: package, BPF object, tests, config
    cp.tree(os.path.join(REPO, "src", "pyloader"))
    cp.tree(os.path.join(REPO, "tests"), {"e2e", "captures", "replay", "kernel61"})
    for f in ("setup.cfg",):
        cp.add(os.path.join(REPO, f))

    # libbpf (found by name: LD_LIBRARY_PATH in init) and every library linked
    libbpf = subprocess.run(["sh", "-c", f"ldconfig -p | grep -m1 '{LIBBPF} ' | sed 's/.*=> //'"],
                            capture_output=True, text=True).stdout.strip()
    if not libbpf:
        raise SystemExit(f"{LIBBPF} not found: install libbpf1 (scripts/install-deps.sh)")
    elves.append(libbpf)
    cp.add(libbpf)
    for lib in sorted(shared_libs(elves)):
        cp.add(lib)
    env = f"REPO={REPO}\nPYTHON={venv_py}\n"
    if obj:  # another object than the package's (REDTAP_BPF_OBJECT for the loader)
        cp.add(os.path.abspath(obj), "/obj/redtap.bpf.o")
        env += "REDTAP_BPF_OBJECT=/obj/redtap.bpf.o\nexport REDTAP_BPF_OBJECT\n"
    cp.data("/etc/redtap-kernel61.env", env.encode())
    cp.close()


if __name__ == "__main__":
    main(sys.argv[1], *(sys.argv[2:3]))

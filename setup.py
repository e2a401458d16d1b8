"""Build hook: `pip install .` compiles the BPF object into the package data.

build_py compiles src/bpf/redtap.bpf.c with clang (src/bpf/cflags.sh, as the Makefile)
into pyloader/data/redtap.bpf.o of the build, so an installed `redtap` finds
its object without the source tree. Without clang (or with REDTAP_PREBUILT_BPF=1)
it takes the prebuilt src/pyloader/data/redtap.bpf.o shipped in the package
data (`make bpf` makes one); with neither it stops with a clear message.
It also compiles the agent's record helper (src/native/*.c, plain C
called through ctypes) into pyloader/data/librecordfmt.so when a C compiler
is there. Everything else is declared in setup.cfg.
"""
import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
BPF_SRC = os.path.join("src", "bpf", "redtap.bpf.c")
PREBUILT = os.path.join("src", "pyloader", "data", "redtap.bpf.o")
CFLAGS_SH = os.path.join("src", "bpf", "cflags.sh")
NATIVE_DIR = os.path.join("src", "native")
NATIVE_FLAGS = os.path.join("src", "native", "cflags.sh")


def bpf_cflags():
    """The flags of src/bpf/cflags.sh (the Makefile reads the same script)."""
    return subprocess.run(["sh", CFLAGS_SH], check=True, cwd=HERE, capture_output=True,
                          text=True).stdout.split()


class BuildPyWithBpf(build_py):
    def run(self):
        super().run()
        if self.editable_mode if hasattr(self, "editable_mode") else False:
            return  # editable installs use src/pyloader/data (make bpf)
        target = os.path.join(self.build_lib, "pyloader", "data", "redtap.bpf.o")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        clang = shutil.which(os.environ.get("CLANG", "clang"))
        want_prebuilt = os.environ.get("REDTAP_PREBUILT_BPF") == "1"
        if clang and not want_prebuilt and os.path.exists(os.path.join(HERE, BPF_SRC)):
            cmd = [clang, *bpf_cflags(), "-c", BPF_SRC, "-o", target]
            self.announce("compiling the BPF object: " + " ".join(cmd), level=2)
            subprocess.run(cmd, check=True, cwd=HERE)
        elif os.path.exists(os.path.join(HERE, PREBUILT)):
            self.copy_file(os.path.join(HERE, PREBUILT), target)
        else:
            raise SystemExit(
                "redtap: cannot build the BPF object: clang not found "
                f"(CLANG={os.environ.get('CLANG', 'clang')}) and no prebuilt {PREBUILT}. "
                "Install clang and libbpf-dev, or run `make bpf` first.")
        self.build_native(os.path.join(self.build_lib, "pyloader", "data", "librecordfmt.so"))

    def build_native(self, target):
        """The agent's record helper (src/native): without a C compiler the agent
        renders every record in Python (same bytes, more CPU)."""
        cc = next((shutil.which(c) for c in (os.environ.get("CC", ""), "cc", "gcc", "clang")
                   if c and shutil.which(c)), None)
        where = os.path.join(HERE, NATIVE_DIR)
        sources = sorted(os.path.join(NATIVE_DIR, f) for f in os.listdir(where)
                         if f.endswith(".c")) if os.path.isdir(where) else []
        if not cc or not sources:
            self.announce("no C compiler: the record helper is not built", level=3)
            return
        flags = subprocess.run(["sh", NATIVE_FLAGS], check=True, cwd=HERE, capture_output=True,
                               text=True).stdout.split()
        cmd = [cc, *flags, "-o", target, *sources]
        self.announce("compiling the record helper: " + " ".join(cmd), level=2)
        if subprocess.run(cmd, cwd=HERE).returncode:  # the agent works without it
            self.announce("the record helper did not build: records rendered in Python", level=3)


setup(cmdclass={"build_py": BuildPyWithBpf})

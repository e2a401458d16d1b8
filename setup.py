"""Build hook: `pip install .` compiles the BPF object into the package data.

build_py compiles src/bpf/redtap.bpf.c with clang (the flags of the Makefile)
into pyloader/data/redtap.bpf.o of the build, so an installed `redtap` finds
its object without the source tree. Without clang (or with REDTAP_PREBUILT_BPF=1)
it takes the prebuilt src/pyloader/data/redtap.bpf.o shipped in the package
data (`make bpf` makes one); with neither it stops with a clear message.
Everything else is declared in setup.cfg.
"""
import os
import platform
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
BPF_SRC = os.path.join("src", "bpf", "redtap.bpf.c")
PREBUILT = os.path.join("src", "pyloader", "data", "redtap.bpf.o")
ARCH = {"x86_64": "x86", "amd64": "x86", "aarch64": "arm64", "arm64": "arm64",
        "ppc64le": "powerpc", "s390x": "s390", "riscv64": "riscv"}


def bpf_cflags():
    arch = ARCH.get(platform.machine().lower(), "x86")
    return ["-target", "bpf", "-g", "-O2", "-Wall", f"-D__TARGET_ARCH_{arch}",
            "-I.", "-Isrc/bpf", "-mcpu=v3"]


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


setup(cmdclass={"build_py": BuildPyWithBpf})

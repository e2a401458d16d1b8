"""Checks before `redtap run` loads anything: libbpf, the kernel's BTF and ring
buffer, and our capabilities. Each problem is one sentence saying what is
missing and what to do, printed without a traceback.

Least privilege: redtap needs exactly
  CAP_BPF        create its maps, load its programs, read maps and counters
  CAP_NET_ADMIN  load TC (sched_cls) programs and attach them with netlink
  CAP_PERFMON    the verifier accepts redtap's programs only for perfmon-capable
                 loaders (pointer arithmetic on packet and map data; without it
                 loading fails)
  CAP_SYS_RESOURCE  only on kernels before 5.11, which charge BPF memory to
                 RLIMIT_MEMLOCK (libbpf raises it), and only when that limit is
                 not already unlimited (systemd LimitMEMLOCK=infinity does it).
Before 5.8 (no CAP_BPF/CAP_PERFMON) CAP_SYS_ADMIN stands in for both.
"""
from __future__ import annotations

import errno
import os
import resource

from pyloader.errors import BpfError, RedtapError

CAPS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24,
        "CAP_PERFMON": 38, "CAP_BPF": 39}
WHY = {
    "CAP_BPF": "to create BPF maps and load programs",
    "CAP_NET_ADMIN": "to load TC programs and attach them to interfaces",
    "CAP_PERFMON": "the kernel's verifier accepts redtap's programs only with it",
    "CAP_SYS_ADMIN": "this kernel (before 5.8) has no CAP_BPF: bpf() needs CAP_SYS_ADMIN",
    "CAP_SYS_RESOURCE": "this kernel (before 5.11) charges BPF maps to RLIMIT_MEMLOCK, which "
                        "is limited: raise it (LimitMEMLOCK=infinity, ulimit -l unlimited) or "
                        "grant CAP_SYS_RESOURCE",
}
NEEDED = ("CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON")
HOW = ("run as root, or grant exactly CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (systemd: "
       "AmbientCapabilities=, see deploy/systemd/redtap.service; podman/docker: --cap-add; "
       "Kubernetes: securityContext.capabilities.add)")
EPERM_HINT = "bpf() refused (EPERM): " + HOW
BTF_PATHS = ("/sys/kernel/btf/vmlinux", "/boot/vmlinux-{r}", "/lib/modules/{r}/vmlinux-{r}",
             "/lib/modules/{r}/build/vmlinux", "/usr/lib/debug/boot/vmlinux-{r}")
BPF_MAP_TYPE_RINGBUF = 27


class PreflightError(RedtapError):
    """One or more things redtap needs are missing (one line each)."""


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """'6.1.0-18-amd64' -> (6, 1)."""
    release = release or os.uname().release
    parts = (release.split("-")[0].split(".") + ["0"])[:2]
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except ValueError:
        return (0, 0)


def effective_caps(status_path: str = "/proc/self/status") -> int:
    """The CapEff bit mask of this process."""
    with open(status_path) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    raise RedtapError(f"reading capabilities: no CapEff line in {status_path}")


def has_cap(mask: int, name: str) -> bool:
    return bool(mask >> CAPS[name] & 1)


def missing_caps(mask: int, kernel: tuple[int, int], memlock_limited: bool) -> list[str]:
    """Capabilities redtap needs and does not have, in the order of NEEDED."""
    admin = has_cap(mask, "CAP_SYS_ADMIN")
    if kernel < (5, 8):
        need = ["CAP_SYS_ADMIN", "CAP_NET_ADMIN"]
    else:
        need = [c for c in NEEDED if not (admin and c in ("CAP_BPF", "CAP_PERFMON"))]
    if kernel < (5, 11) and memlock_limited:
        need.append("CAP_SYS_RESOURCE")
    return [c for c in need if not has_cap(mask, c)]


def caps_problem(missing: list[str]) -> str | None:
    if not missing:
        return None
    why = "; ".join(f"{c}: {WHY[c]}" for c in missing)
    return f"missing capabilit{'y' if len(missing) == 1 else 'ies'} {', '.join(missing)} ({why}): {HOW}"


def btf_problem(paths=BTF_PATHS, release: str | None = None) -> str | None:
    release = release or os.uname().release
    if any(os.path.exists(p.format(r=release)) for p in paths):
        return None
    return (f"the kernel exposes no BTF ({paths[0]} is missing): redtap's CO-RE programs need a "
            "kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian >= 11, Ubuntu >= 20.10, RHEL >= "
            "8.2 ship one); in a container, mount /sys/kernel/btf from the host")


def libbpf_problem() -> str | None:
    from pyloader.libbpf import binding
    try:
        binding.lib()
    except BpfError as e:
        cause = f" ({e.__cause__})" if e.__cause__ else ""
        return (f"libbpf could not be loaded: {binding.LIBBPF_NAME}{cause}: install libbpf 1.x "
                "(Debian/Ubuntu: apt install libbpf1; Fedora/RHEL: dnf install libbpf)")
    except AttributeError as e:  # a libbpf older than 1.0 lacks functions we declare
        return f"the installed libbpf is too old ({e}): install libbpf 1.x"
    return None


def create_ringbuf() -> int:
    """Create (and close) a small ring buffer map: 0, or the errno of bpf()."""
    import ctypes
    from pyloader.libbpf.binding import lib
    fn = lib().bpf_map_create
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32,
                   ctypes.c_uint32, ctypes.c_void_p]
    fd = fn(BPF_MAP_TYPE_RINGBUF, b"redtap_probe", 0, 0, os.sysconf("SC_PAGE_SIZE"), None)
    if fd < 0:
        return -fd
    os.close(fd)
    return 0


def ringbuf_problem(kernel: tuple[int, int], probe=create_ringbuf) -> str | None:
    """Ask the kernel for a ring buffer: EINVAL means it has none; EPERM although
    the capabilities are there means seccomp (a container runtime's default
    profile allows bpf() only with CAP_SYS_ADMIN) or an LSM refuses bpf()."""
    release = ".".join(map(str, kernel))
    err = errno.EINVAL if kernel < (5, 8) else probe()
    if err == errno.EINVAL:
        return (f"the kernel ({release}) has no BPF ring buffer (BPF_MAP_TYPE_RINGBUF, Linux >= "
                "5.8), which redtap uses for its events: run it on a newer kernel")
    if err == errno.EPERM:
        return ("bpf() is refused (EPERM) although the capabilities are there: a seccomp "
                "profile or an LSM blocks it. Container runtimes' default seccomp profiles "
                "allow bpf() only with CAP_SYS_ADMIN: use deploy/container/seccomp.json "
                "(podman/docker --security-opt seccomp=...; Kubernetes: seccompProfile)")
    if err:
        return f"creating a BPF ring buffer failed: {os.strerror(err)} ({errno.errorcode.get(err)})"
    return None


def memlock_limited() -> bool:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return soft != resource.RLIM_INFINITY


def check() -> None:
    """Raise PreflightError listing every problem found (nothing loaded yet)."""
    kernel = kernel_version()
    problems = [p for p in (libbpf_problem(), btf_problem()) if p]
    missing = missing_caps(effective_caps(), kernel, memlock_limited())
    if missing:
        problems.append(caps_problem(missing))
    if not problems:  # probing creates a map: needs libbpf and the capabilities
        p = ringbuf_problem(kernel)
        if p:
            problems.append(p)
    if problems:
        raise PreflightError("cannot trace:\n  - " + "\n  - ".join(problems))

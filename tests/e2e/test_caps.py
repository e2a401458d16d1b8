"""Least privilege: the agent traces as an unprivileged user holding exactly
CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (setpriv, ambient capabilities, as the
systemd unit runs it), and says which capability is missing when one is. Also the
other clear start-up failures: no BTF, no libbpf (no traceback in any of them)."""
import json
import os
import subprocess
import sys
import time

import pytest

from pyloader.kernel import preflight
from pyloader.lab.netnode import pod_ip

CAPS = ["bpf", "net_admin", "perfmon"]
NOBODY = 65534


def setpriv(caps):
    c = ",".join(["-all"] + [f"+{x}" for x in caps])
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            f"--inh-caps={c}", f"--ambient-caps={c}", f"--bounding-set={c}"]


@pytest.fixture
def logdir(node):
    d = os.path.join(node.dir, f"caps-{time.monotonic_ns()}")
    os.mkdir(d)
    os.chown(d, NOBODY, NOBODY)
    os.chmod(node.dir, 0o755)
    return d


def run_agent(node, caps, logdir, *args):
    err = open(os.path.join(logdir, "stderr"), "w")
    log = os.path.join(logdir, "access.log")
    p = node.spawn(node.node_ns, *setpriv(caps), sys.executable, "-m", "pyloader", "run",
                   "--log", log, "--endpoint", f"{pod_ip(0)}:80", *args, stderr=err)
    return p, log, err.name


def read_lines(log):
    if not os.path.exists(log):
        return []
    data = open(log, "rb").read()
    return [json.loads(l) for l in data[:data.rfind(b"\n") + 1].splitlines()]


def wait_for(cond, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def cap_mask(pid) -> int:
    with open(f"/proc/{pid}/status") as f:
        return {l.split(":")[0]: l.split()[1] for l in f if l.startswith("Cap")}


def test_agent_traces_as_nobody_with_exactly_the_three_capabilities(node, logdir):
    p, log, err = run_agent(node, CAPS, logdir)
    try:
        wait_for(lambda: any(l.get("event") == "redtap.start" for l in read_lines(log))
                 or p.poll() is not None, 60, "the agent to start")
        assert p.poll() is None, open(err).read()
        want = sum(1 << preflight.CAPS[c] for c in preflight.NEEDED)
        caps = cap_mask(p.pid)             # ip netns exec and setpriv exec: the agent's pid
        assert int(caps["CapEff"], 16) == want and int(caps["CapBnd"], 16) == want
        with open(f"/proc/{p.pid}/status") as f:
            assert any(l.startswith("Uid:") and l.split()[1:3] == [str(NOBODY)] * 2 for l in f)
        for i in range(5):
            r = node.curl(node.pods[2].ns, f"http://{pod_ip(0)}/caps/{i}")
            assert r.returncode == 0, r.stderr
        wait_for(lambda: len([l for l in read_lines(log) if "url.path" in l]) >= 5, 30,
                 "the requests in the log")
    finally:
        p.terminate()
        assert p.wait(timeout=30) == 0, open(err).read()
    paths = sorted(l["url.path"] for l in read_lines(log) if "url.path" in l)
    assert paths == [f"/caps/{i}" for i in range(5)]
    assert "Traceback" not in open(err).read()


@pytest.mark.parametrize("missing", CAPS)
def test_each_missing_capability_is_named_without_a_traceback(node, logdir, missing):
    p, log, err = run_agent(node, [c for c in CAPS if c != missing], logdir)
    assert p.wait(timeout=60) == 1
    text = open(err).read()
    name = "CAP_" + missing.upper()
    assert f"missing capability {name} " in text and "Traceback" not in text
    assert [c for c in preflight.NEEDED if c in text.split("):")[0]] == [name]
    assert not read_lines(log)             # nothing was loaded or written


def test_kernel_without_btf_is_a_clear_message(tmp_path):
    """A mount namespace where /sys/kernel/btf is an empty tmpfs: the kernel's BTF
    cannot be found, as on a kernel built without CONFIG_DEBUG_INFO_BTF."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a mount namespace")
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs none /sys/kernel/btf && exec "$@"', "sh",
         sys.executable, "-m", "pyloader", "run", "--log", str(tmp_path / "log")],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "the kernel exposes no BTF" in r.stderr and "CONFIG_DEBUG_INFO_BTF" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_libbpf_is_a_clear_message(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pyloader", "run", "--log", str(tmp_path / "log")],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "REDTAP_LIBBPF": "libbpf.so.99"})
    assert r.returncode == 1
    assert "libbpf could not be loaded: libbpf.so.99" in r.stderr and "apt install libbpf1" \
        in r.stderr
    assert "Traceback" not in r.stderr


def test_kernel_without_ring_buffer_is_a_clear_message():
    assert "no BPF ring buffer" in preflight.ringbuf_problem((5, 4))
    assert "no BPF ring buffer" in preflight.ringbuf_problem((5, 10), probe=lambda: 22)
    assert preflight.ringbuf_problem((6, 1)) is None      # this kernel has one: asked for real


def test_seccomp_blocking_bpf_is_a_clear_message():
    """What a container runtime's default seccomp profile does (bpf() -> EPERM)."""
    assert "seccomp" in preflight.ringbuf_problem((6, 1), probe=lambda: 1)


def test_old_kernels_need_sys_admin_or_sys_resource_only_when_memlock_is_limited():
    admin = 1 << preflight.CAPS["CAP_SYS_ADMIN"] | 1 << preflight.CAPS["CAP_NET_ADMIN"]
    assert preflight.missing_caps(admin, (5, 4), memlock_limited=False) == []
    assert preflight.missing_caps(admin, (5, 4), memlock_limited=True) == ["CAP_SYS_RESOURCE"]
    three = sum(1 << preflight.CAPS[c] for c in preflight.NEEDED)
    assert preflight.missing_caps(three, (6, 1), memlock_limited=True) == []

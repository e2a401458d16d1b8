"""The container image as shipped: a Debian base made with debootstrap and imported
with `podman import` (no registry is reachable), the image built from
deploy/container/Containerfile with `podman build`, run with --network host in the
namespace node's network namespace, exactly three capabilities and
deploy/container/seccomp.json, tracing real nginx.

Minutes, not seconds (debootstrap, apt and pip in the build; cached afterwards):
`make test-container` runs it (REDTAP_CONTAINER_TEST=1); `make test` skips it.
Podman here: runc (crun fails on this machine's hybrid cgroups), and
/etc/containers/containers.conf [containers] default_ulimits = [] and
pids_limit = 0, which ensure_containers_conf() sets (idempotent)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import tomllib

import pytest

from pyloader import __version__

from pyloader.kernel import preflight
from pyloader.lab.netnode import pod_ip

pytestmark = pytest.mark.skipif(os.environ.get("REDTAP_CONTAINER_TEST") != "1",
                                reason="container test: `make test-container`")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = "localhost/redtap-base:bookworm"
IMAGE = f"localhost/redtap:{__version__}-test"
CACHE = "/var/cache/redtap"
ROOTFS_TAR = os.path.join(CACHE, "debootstrap-bookworm-minbase.tar")
MIRROR = "http://deb.debian.org/debian"
CONTAINERS_CONF = "/etc/containers/containers.conf"
WANT = {"default_ulimits": "[]", "pids_limit": "0"}
SECCOMP = os.path.join(ROOT, "deploy", "container", "seccomp.json")
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"


def podman(*args, timeout=900, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(["podman", "--runtime", "runc", *args], capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])}: {r.returncode}\n{r.stderr[-4000:]}")
    return r


def ensure_containers_conf(path: str = CONTAINERS_CONF) -> bool:
    """Set WANT under [containers], keeping everything else. True if it changed."""
    text = open(path).read() if os.path.exists(path) else ""
    cur = tomllib.loads(text).get("containers", {})
    missing = {k: v for k, v in WANT.items() if cur.get(k) != tomllib.loads(f"x = {v}")["x"]}
    if not missing:
        return False
    out, section, skipping = [], None, False
    for line in text.splitlines():
        if skipping:                       # the rest of a multi-line value we replace
            skipping = "]" not in line
            continue
        m = re.match(r"\s*\[([^\]]+)\]\s*$", line)
        if m:
            section = m.group(1).strip()
        k = re.match(r"\s*(\w+)\s*=\s*(.*)", line)
        if section == "containers" and k and k.group(1) in missing:
            skipping = k.group(2).startswith("[") and "]" not in k.group(2)
            continue
        out.append(line)
    if "[containers]" not in [l.strip() for l in out]:
        out += ["[containers]"]
    at = [l.strip() for l in out].index("[containers]") + 1
    out[at:at] = [f"{k} = {v}" for k, v in missing.items()]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(out) + "\n")
    os.replace(path + ".tmp", path)
    return True


def test_containers_conf_setup_is_idempotent_and_keeps_other_settings(tmp_path):
    p = str(tmp_path / "containers.conf")
    with open(p, "w") as f:
        f.write('[containers]\nlog_size_max = 100\ndefault_ulimits = [\n  "nofile=1:2",\n]\n'
                '[engine]\nruntime = "runc"\n')
    assert ensure_containers_conf(p) is True
    conf = tomllib.loads(open(p).read())
    assert conf["containers"] == {"log_size_max": 100, "default_ulimits": [], "pids_limit": 0}
    assert conf["engine"] == {"runtime": "runc"}
    assert ensure_containers_conf(p) is False


def base_image() -> None:
    """Debian 12 minbase from debootstrap (the tar cached in /var/cache/redtap),
    imported as BASE unless podman has it already."""
    if podman("image", "exists", BASE, check=False).returncode == 0:
        return
    os.makedirs(CACHE, exist_ok=True)
    if not os.path.exists(ROOTFS_TAR):
        work = tempfile.mkdtemp(prefix="redtap-rootfs-")
        try:
            r = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", work + "/root",
                                MIRROR], capture_output=True, text=True, timeout=1200)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            subprocess.run(["tar", "-C", work + "/root", "-cf", ROOTFS_TAR + ".tmp", "."],
                           check=True, timeout=600)
            os.replace(ROOTFS_TAR + ".tmp", ROOTFS_TAR)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    podman("import", ROOTFS_TAR, BASE)


@pytest.fixture(scope="module")
def image():
    for tool in ("podman", "runc", "debootstrap", "nsenter"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: run `make deps` (scripts/install-deps.sh)")
    ensure_containers_conf()
    base_image()
    ca = ["-v", f"{HOST_CA}:/run/host-ca.crt:ro", "--build-arg", "PIP_CERT=/run/host-ca.crt"] \
        if os.path.exists(HOST_CA) else []   # a TLS-intercepting proxy's CA, if the host has one
    podman("build", "--network", "host", "--build-arg", f"BASE={BASE}", *ca,
           "-f", os.path.join(ROOT, "deploy", "container", "Containerfile"), "-t", IMAGE, ROOT,
           timeout=1500)
    return IMAGE


class Container:
    """`podman run --network host` in the node's network namespace (nsenter --net:
    unlike `ip netns exec` it leaves /sys, and so the cgroup mounts, alone)."""

    def __init__(self, node, *opts, args=()):
        self.name = f"redtap-test-{node.tag}-{time.monotonic_ns()}"
        self.logdir = tempfile.mkdtemp(prefix="redtap-ctr-")
        self.log = os.path.join(self.logdir, "access.log")
        self.err = open(os.path.join(self.logdir, "podman.out"), "w")
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{node.node_ns}", "podman", "--runtime", "runc",
             "run", "--rm", "--name", self.name, "--network", "host", "--cap-drop", "all",
             *opts, "-v", f"{self.logdir}:/var/log/redtap", IMAGE, "run",
             "--log", "/var/log/redtap/access.log", "--endpoint", f"{pod_ip(0)}:80", *args],
            stdout=self.err, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        self.err.flush()
        return open(self.err.name).read()

    def lines(self) -> list[dict]:
        if not os.path.exists(self.log):
            return []
        data = open(self.log, "rb").read()
        return [json.loads(l) for l in data[:data.rfind(b"\n") + 1].splitlines()]

    def close(self) -> None:
        podman("rm", "-f", self.name, check=False, timeout=120)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.logdir, ignore_errors=True)


@pytest.fixture
def container(node, image):
    made = []

    def make(*opts, args=()):
        made.append(Container(node, *opts, args=args))
        return made[-1]
    yield make
    for c in made:
        c.close()


THREE = ["--cap-add", "CAP_BPF,CAP_NET_ADMIN,CAP_PERFMON"]


def wait_for(cond, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_image_runs_redtap_version(image):
    r = podman("run", "--rm", image, "--version", timeout=120)
    assert r.stdout.strip() == f"redtap {__version__}"


def test_container_traces_the_node_with_exactly_three_capabilities(node, container):
    c = container(*THREE, "--security-opt", f"seccomp={SECCOMP}", args=("--stats-interval", "1"))
    wait_for(lambda: any(l.get("event") == "redtap.start" for l in c.lines())
             or c.proc.poll() is not None, 120, "the containerised agent to start")
    assert c.proc.poll() is None, c.output()
    status = podman("exec", c.name, "cat", "/proc/1/status", timeout=60).stdout
    caps = {l.split(":")[0]: int(l.split()[1], 16) for l in status.splitlines()
            if l.startswith("Cap")}
    want = sum(1 << preflight.CAPS[n] for n in preflight.NEEDED)
    assert caps["CapEff"] == want and caps["CapBnd"] == want
    node.traffic(node.pods[2].ns, "keepalive", pod_ip(0), "80", "500", "/ctr/{i}")
    wait_for(lambda: len([l for l in c.lines() if "url.path" in l]) >= 500, 60,
             "500 records")
    podman("stop", "-t", "30", c.name, timeout=120)
    assert c.proc.wait(timeout=60) == 0, c.output()
    lines = c.lines()
    paths = sorted(l["url.path"] for l in lines if "url.path" in l)
    assert paths == sorted(f"/ctr/{i}" for i in range(500))
    assert lines[-1]["event"] == "redtap.exit" and lines[-1]["kernel"]["ringbuf_full"] == 0


def test_container_with_the_default_seccomp_profile_says_bpf_is_blocked(node, container):
    c = container(*THREE)
    assert c.proc.wait(timeout=120) == 1
    out = c.output()
    assert "seccomp" in out and "deploy/container/seccomp.json" in out and "Traceback" not in out


def test_container_without_cap_perfmon_names_it(node, container):
    c = container("--cap-add", "CAP_BPF,CAP_NET_ADMIN", "--security-opt", f"seccomp={SECCOMP}")
    assert c.proc.wait(timeout=120) == 1
    out = c.output()
    assert "missing capability CAP_PERFMON" in out and "Traceback" not in out

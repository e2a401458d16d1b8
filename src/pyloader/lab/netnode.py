"""A Kubernetes-like node built from network namespaces (tests and demo).

    <tag>-node    the "host": bridge cni0 198.18.0.1/24 + 2001:db8::1/64,
                  uplink0 198.18.1.1/24 toward <tag>-ext, IP forwarding on
    <tag>-podN    a pod: eth0 198.18.0.(10+N)/24, 2001:db8::(10+N)/64,
                  its host side vethN enslaved to cni0 in <tag>-node
    <tag>-ext     a client on "another node": 198.18.1.2/24 via uplink0

All addresses are in 198.18.0.0/15 and 2001:db8::/32, inside namespaces
this module creates; teardown() deletes them (also on failure).
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

NODE_IP, NODE_IP6 = "198.18.0.1", "2001:db8::1"
EXT_IP, UPLINK_IP = "198.18.1.2", "198.18.1.1"


def pod_ip(i: int) -> str:
    return f"198.18.0.{10 + i}"


def pod_ip6(i: int) -> str:
    return f"2001:db8::{10 + i:x}"


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, **kw)


@dataclass
class Pod:
    index: int
    ns: str
    veth: str  # host-side name in the node namespace

    @property
    def ip(self) -> str:
        return pod_ip(self.index)

    @property
    def ip6(self) -> str:
        return pod_ip6(self.index)


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {access_log};
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 64m;
    keepalive_requests 100000;
    server {{
        listen {port} reuseport;
        listen [::]:{port} reuseport;
        root {dir}/www;
        location = / {{ return 200 "hello\\n"; }}
        location /status/ {{ return 200 "ok\\n"; }}
        location = /error {{ return 500 "boom\\n"; }}
        location = /unavailable {{ return 503 "later\\n"; }}
        location = /upload {{ return 201 "stored\\n"; }}
        location /files/ {{ }}
    }}
}}
"""


class Node:
    """Create with Node(pods=3).setup(); always call teardown()."""

    def __init__(self, pods: int = 3, tag: str | None = None):
        self.tag = tag or "rt" + secrets.token_hex(3)
        self.node_ns = f"{self.tag}-node"
        self.ext_ns = f"{self.tag}-ext"
        self.pods = [Pod(i, f"{self.tag}-pod{i}", f"veth{i}") for i in range(pods)]
        self.procs: list[subprocess.Popen] = []
        self.dir = tempfile.mkdtemp(prefix=f"redtap-{self.tag}-")
        self.bridge = "cni0"

    # -- topology ----------------------------------------------------------
    def ns_exec(self, ns: str, *cmd: str, check: bool = True, **kw):
        return sh("ip", "netns", "exec", ns, *cmd, check=check, **kw)

    def setup(self) -> "Node":
        try:
            self._setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def _setup(self) -> None:
        n = self.node_ns
        for ns in [n, self.ext_ns] + [p.ns for p in self.pods]:
            sh("ip", "netns", "add", ns)
            self.ns_exec(ns, "ip", "link", "set", "lo", "up")
            self.ns_exec(ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
                         "net.ipv6.conf.default.accept_dad=0")
        self.ns_exec(n, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        self.ns_exec(n, "ip", "link", "add", self.bridge, "type", "bridge")
        self.ns_exec(n, "ip", "addr", "add", f"{NODE_IP}/24", "dev", self.bridge)
        self.ns_exec(n, "ip", "-6", "addr", "add", f"{NODE_IP6}/64", "dev", self.bridge, "nodad")
        self.ns_exec(n, "ip", "link", "set", self.bridge, "up")
        for pod in self.pods:
            self.add_pod_links(pod)
        # the "other node": a client behind the uplink
        self.ns_exec(n, "ip", "link", "add", "uplink0", "type", "veth", "peer", "name", "eth0",
                     "netns", self.ext_ns)
        self.ns_exec(n, "ip", "addr", "add", f"{UPLINK_IP}/24", "dev", "uplink0")
        self.ns_exec(n, "ip", "link", "set", "uplink0", "up")
        self.ns_exec(self.ext_ns, "ip", "addr", "add", f"{EXT_IP}/24", "dev", "eth0")
        self.ns_exec(self.ext_ns, "ip", "link", "set", "eth0", "up")
        self.ns_exec(self.ext_ns, "ip", "route", "add", "default", "via", UPLINK_IP)

    def add_pod_links(self, pod: Pod) -> None:
        n = self.node_ns
        self.ns_exec(n, "ip", "link", "add", pod.veth, "type", "veth", "peer", "name", "eth0",
                     "netns", pod.ns)
        self.ns_exec(n, "ip", "link", "set", pod.veth, "master", self.bridge, "up")
        self.ns_exec(pod.ns, "ip", "addr", "add", f"{pod.ip}/24", "dev", "eth0")
        self.ns_exec(pod.ns, "ip", "-6", "addr", "add", f"{pod.ip6}/64", "dev", "eth0", "nodad")
        self.ns_exec(pod.ns, "ip", "link", "set", "eth0", "up")
        self.ns_exec(pod.ns, "ip", "route", "add", "default", "via", NODE_IP)

    def add_pod(self) -> Pod:
        """A new pod while things run (its veth appears on the bridge)."""
        pod = Pod(len(self.pods), f"{self.tag}-pod{len(self.pods)}", f"veth{len(self.pods)}")
        sh("ip", "netns", "add", pod.ns)
        self.ns_exec(pod.ns, "ip", "link", "set", "lo", "up")
        self.ns_exec(pod.ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
                     "net.ipv6.conf.default.accept_dad=0")
        self.pods.append(pod)
        self.add_pod_links(pod)
        return pod

    def remove_pod(self, pod: Pod) -> None:
        """Delete a pod as the kubelet would: its processes, its veth, its netns
        (a process left in the namespace would keep the veth alive)."""
        pids = sh("ip", "netns", "pids", pod.ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        self.ns_exec(self.node_ns, "ip", "link", "del", pod.veth, check=False)
        sh("ip", "netns", "del", pod.ns, check=False)

    # -- servers -----------------------------------------------------------
    def start_nginx(self, pod: Pod, port: int = 80, access_log: str = "off") -> str:
        d = os.path.join(self.dir, f"nginx-{pod.index}-{port}")
        os.makedirs(os.path.join(d, "www", "files"), exist_ok=True)
        with open(os.path.join(d, "www", "files", "1m.bin"), "wb") as f:
            f.write(b"x" * (1 << 20))
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(dir=d, port=port, access_log=access_log))
        self.spawn(pod.ns, "nginx", "-c", conf, "-e", os.path.join(d, "error.log"))
        self.wait_port(pod.ns, pod.ip, port)
        return d

    def start_pyserver(self, pod: Pod, port: int = 8080) -> None:
        self.spawn(pod.ns, sys.executable, "-m", "pyloader.lab.testserver", "--port", str(port))
        self.wait_port(pod.ns, pod.ip, port)

    def spawn(self, ns: str, *cmd: str, **kw) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdin=subprocess.DEVNULL,
                             stdout=kw.pop("stdout", subprocess.DEVNULL),
                             stderr=kw.pop("stderr", subprocess.DEVNULL), start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def wait_port(self, ns: str, ip: str, port: int, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r = self.ns_exec(ns, "bash", "-c", f"exec 3<>/dev/tcp/{ip}/{port}", check=False)
            if r.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"nothing listens on {ip}:{port} in {ns} after {timeout}s")

    # -- clients -----------------------------------------------------------
    def curl(self, ns: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return self.ns_exec(ns, "curl", "-sS", "--noproxy", "*", *args, check=False, timeout=timeout)

    def traffic(self, ns: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run pyloader.lab.trafficgen in a namespace."""
        return self.ns_exec(ns, sys.executable, "-m", "pyloader.lab.trafficgen", *args,
                            check=True, timeout=timeout)

    # -- teardown ------------------------------------------------------------
    def stop_procs(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        self.procs.clear()

    def teardown(self) -> None:
        self.stop_procs()
        for ns in [p.ns for p in self.pods] + [self.ext_ns, self.node_ns]:
            sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.setup()

    def __exit__(self, *exc):
        self.teardown()

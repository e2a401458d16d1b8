"""A simulated Flannel VXLAN cluster in network namespaces (tests, demo, benchmark).

An underlay namespace <tag>-ul with a switch bridge (the test Kubernetes API
listens on it); per node K a namespace <tag>-nK: eth0 198.19.0.(10+K) on the
switch, cni0 198.18.K.1/24 with the pods' veths (pods: <tag>-nK-<name>),
flannel.1 (VXLAN) with the routes, neighbours and FDB entries flanneld installs
for every other node, iptables nat as kube-proxy (ClusterIP DNAT) and Flannel's
ip-masq set it. MTU 1450 on the overlay, as Flannel sets it. hostNetwork pods
run in the node namespace on eth0's address. render() draws it (see README).
All addresses are in 198.18.0.0/15, inside namespaces this module creates;
teardown() deletes them (also when setup fails).
"""
from __future__ import annotations

import os
import secrets
import shutil
import ssl
import subprocess
import sys
from dataclasses import dataclass, field

from pyloader.lab.netnode import Node, sh

SWITCH_IP, API_PORT = "198.19.0.254", 6443
CLUSTER_CIDR, SERVICE_CIDR = "198.18.0.0/16", "198.19.100.0/24"
VXLAN_ID, VXLAN_PORT, MTU = 1, 8472, 1450


def node_ip(k: int) -> str:
    return f"198.19.0.{10 + k}"


def pod_gateway(k: int) -> str:
    return f"198.18.{k}.1"


def vtep_ip(k: int) -> str:
    return f"198.18.{k}.0"


def vtep_mac(k: int) -> str:
    return f"0e:72:74:00:00:{k:02x}"  # locally administered, fixed: peers know it up front


# -- the definition --------------------------------------------------------------
@dataclass
class PodSpec:
    name: str
    node: int
    server: str | None = None      # "nginx" or "python" (a client when None)
    port: int | None = None        # the server's containerPort
    app: str | None = None         # label app=<app>: what Services select
    namespace: str = "default"
    host_network: bool = False     # served on the node's eth0 address


@dataclass
class ServiceSpec:
    name: str
    vip: str                       # ClusterIP, in SERVICE_CIDR
    port: int
    app: str                       # selector app=<app>
    namespace: str = "default"


@dataclass
class Topology:
    nodes: int
    pods: list[PodSpec]
    services: list[ServiceSpec]
    spread: str = "nth"            # kube-proxy's endpoint choice: "nth" (round robin) or "random"


def default_topology(nodes: int = 2) -> Topology:
    """Per node K: web-K (nginx :80), api-K (Python :8080) and client-K; node-1 also
    hosts the hostNetwork server metrics-1 (:9100). Services web (every web-K) and
    api (api-0 only: same node for client-0, another node for the others)."""
    pods = []
    for k in range(nodes):
        pods += [PodSpec(f"web-{k}", k, "nginx", 80, "web", "shop"),
                 PodSpec(f"api-{k}", k, "python", 8080, "api" if k == 0 else "api-spare", "shop"),
                 PodSpec(f"client-{k}", k)]
    pods.append(PodSpec("metrics-1", min(1, nodes - 1), "python", 9100, "metrics", "monitoring",
                        host_network=True))
    return Topology(nodes, pods, [ServiceSpec("web", "198.19.100.10", 80, "web", "shop"),
                                  ServiceSpec("api", "198.19.100.11", 80, "api", "shop")])


# -- the running cluster -------------------------------------------------------------
@dataclass
class Pod:
    """A pod of the running cluster (the attributes netnode.Node's server helpers use)."""
    index: int                     # unique in the cluster
    spec: PodSpec
    name: str
    ns: str                        # its namespace (hostNetwork: the node's)
    ip: str
    veth: str | None               # host side on cni0 (None: hostNetwork)


@dataclass
class ClusterNode:
    index: int
    name: str                      # node-K
    ns: str
    ip: str                        # eth0, on the underlay
    pods: list[Pod] = field(default_factory=list)


@dataclass
class Scenario:
    what: str
    client: str                    # a pod ("client-0") or a node's host ("node-0")
    target: str                    # a pod's server ("web-1") or a Service ("svc/web")
    requests: int = 4


# every path a request takes in default_topology(): what | client | target
SCENARIO_TABLE = """\
pod to pod, same node                         | client-0 | web-0
pod to pod, across nodes                      | client-0 | web-1
pod to pod, across nodes                      | client-1 | api-0
pod to ClusterIP, endpoint on the same node   | client-0 | svc/api
pod to ClusterIP, endpoint on another node    | client-1 | svc/api
pod to ClusterIP, endpoints on both nodes     | client-0 | svc/web
host to pod, same node                        | node-0   | web-0
host to pod, across nodes                     | node-0   | web-1
host to ClusterIP, endpoint on another node   | node-1   | svc/api
host to ClusterIP, endpoints on both nodes    | node-1   | svc/web
hostNetwork server from a pod on another node | client-0 | metrics-1
hostNetwork server from a pod on its node     | client-1 | metrics-1
hostNetwork server from its own host          | node-1   | metrics-1
hostNetwork server from another host          | node-0   | metrics-1
"""


def default_scenarios() -> list[Scenario]:
    """Every path a request takes in default_topology()."""
    return [Scenario(*(cell.strip() for cell in row.split("|")))
            for row in SCENARIO_TABLE.splitlines()]


class Cluster(Node):
    """Cluster(default_topology()).setup(), always teardown() (or use `with`).
    Inherits netnode.Node's helpers: spawn, ns_exec, curl, traffic, start_nginx,
    start_pyserver, wait_port, stop_procs."""

    def __init__(self, topology: Topology | None = None, tag: str | None = None):
        super().__init__(pods=0, tag=tag or "rc" + secrets.token_hex(3))
        self.topo = topology or default_topology()
        self.node_ns = self.ext_ns = None  # (netnode.Node's single-node names: unused)
        self.ul_ns = f"{self.tag}-ul"
        self.nodes = [ClusterNode(k, f"node-{k}", f"{self.tag}-n{k}", node_ip(k))
                      for k in range(self.topo.nodes)]
        per_node = [0] * self.topo.nodes
        for i, s in enumerate(self.topo.pods):
            node = self.nodes[s.node]
            if s.host_network:
                pod = Pod(i, s, s.name, node.ns, node.ip, None)
            else:
                j = per_node[s.node]
                per_node[s.node] += 1
                pod = Pod(i, s, s.name, f"{node.ns}-{s.name}", f"198.18.{s.node}.{10 + j}",
                          f"veth{j}")
            node.pods.append(pod)
            self.pods.append(pod)

    # -- lookups ------------------------------------------------------------------
    def pod(self, name: str) -> Pod:
        return next(p for p in self.pods if p.name == name)

    def service(self, name: str) -> ServiceSpec:
        return next(s for s in self.topo.services if s.name == name)

    def endpoints(self, svc: ServiceSpec) -> list[Pod]:
        return [p for p in self.pods if p.spec.app == svc.app and p.spec.namespace == svc.namespace]

    def namespaces(self) -> list[str]:
        pods = [p.ns for p in self.pods if not p.spec.host_network]
        return pods + [n.ns for n in self.nodes] + [self.ul_ns]

    # -- building -----------------------------------------------------------------
    def build(self, ns: str, *cmd: str, **kw):
        """A setup step in @ns: what failed and why in the error."""
        try:
            return self.ns_exec(ns, *cmd, **kw)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"building the cluster: `{' '.join(cmd)}` in netns {ns} "
                               f"exited {e.returncode}: {(e.stderr or '').strip()}") from None

    def _setup(self) -> None:
        for ns in self.namespaces():
            r = sh("ip", "netns", "add", ns, check=False)
            if r.returncode:
                raise RuntimeError(f"building the cluster: ip netns add {ns}: {r.stderr.strip()}")
            self.build(ns, "ip", "link", "set", "lo", "up")
        self.build(self.ul_ns, "ip", "link", "add", "sw0", "type", "bridge")
        self.build(self.ul_ns, "ip", "addr", "add", f"{SWITCH_IP}/24", "dev", "sw0")
        self.build(self.ul_ns, "ip", "link", "set", "sw0", "up")
        for node in self.nodes:
            self._node(node)
        for node in self.nodes:
            for peer in self.nodes:
                if peer is not node:
                    self._flannel_peer(node, peer.index)
            self.build(node.ns, "iptables-restore", input=self.iptables_rules(node))
        for pod in self.pods:
            if pod.spec.server == "nginx":
                self.start_nginx(pod, pod.spec.port)
            elif pod.spec.server == "python":
                self.start_pyserver(pod, pod.spec.port)

    def _node(self, node: ClusterNode) -> None:
        k, n = node.index, node.ns
        self.build(n, "sysctl", "-qw", "net.ipv4.ip_forward=1",
                   "net.bridge.bridge-nf-call-iptables=1")  # kubelet's prerequisites
        self.build(self.ul_ns, "ip", "link", "add", f"ul{k}", "type", "veth", "peer", "name",
                   "eth0", "netns", n)
        self.build(self.ul_ns, "ip", "link", "set", f"ul{k}", "master", "sw0", "up")
        self.build(n, "ip", "addr", "add", f"{node.ip}/24", "dev", "eth0")
        self.build(n, "ip", "link", "set", "eth0", "up")
        # ClusterIPs are routed like the node's default route would (then DNATed)
        self.build(n, "ip", "route", "add", SERVICE_CIDR, "dev", "eth0")
        self.build(n, "ip", "link", "add", "cni0", "mtu", str(MTU), "type", "bridge")
        self.build(n, "ip", "addr", "add", f"{pod_gateway(k)}/24", "dev", "cni0")
        self.build(n, "ip", "link", "set", "cni0", "up")
        self.build(n, "ip", "link", "add", "flannel.1", "mtu", str(MTU), "address", vtep_mac(k),
                   "type", "vxlan", "id", str(VXLAN_ID), "dstport", str(VXLAN_PORT),
                   "local", node.ip, "dev", "eth0", "nolearning")
        self.build(n, "ip", "addr", "add", f"{vtep_ip(k)}/32", "dev", "flannel.1")
        self.build(n, "ip", "link", "set", "flannel.1", "up")
        for pod in node.pods:
            if pod.veth:
                self._pod_links(node, pod)

    def _pod_links(self, node: ClusterNode, pod: Pod) -> None:
        self.build(node.ns, "ip", "link", "add", pod.veth, "mtu", str(MTU), "type", "veth",
                   "peer", "name", "eth0", "netns", pod.ns)
        self.build(node.ns, "ip", "link", "set", pod.veth, "master", "cni0", "up")
        self.build(pod.ns, "ip", "addr", "add", f"{pod.ip}/24", "dev", "eth0")
        self.build(pod.ns, "ip", "link", "set", "eth0", "up")
        self.build(pod.ns, "ip", "route", "add", "default", "via", pod_gateway(node.index))

    def _flannel_peer(self, node: ClusterNode, m: int) -> None:
        """What flanneld installs on @node for remote node @m (from its lease)."""
        n = node.ns
        self.build(n, "ip", "route", "add", f"198.18.{m}.0/24", "via", vtep_ip(m),
                   "dev", "flannel.1", "onlink")
        self.build(n, "ip", "neigh", "replace", vtep_ip(m), "lladdr", vtep_mac(m),
                   "dev", "flannel.1", "nud", "permanent")
        self.build(n, "bridge", "fdb", "append", vtep_mac(m), "dev", "flannel.1",
                   "dst", node_ip(m))

    def iptables_rules(self, node: ClusterNode) -> str:
        """iptables-restore input: kube-proxy's Service DNAT, Flannel's ip-masq."""
        k, chains, rules = node.index, [], []
        for s in self.topo.services:
            svc = f"KUBE-SVC-{s.name.upper()}"[:28]
            chains.append(svc)
            rules.append(f"-A KUBE-SERVICES -d {s.vip}/32 -p tcp -m tcp --dport {s.port} "
                         f"-m comment --comment \"{s.namespace}/{s.name}\" -j {svc}")
            eps = self.endpoints(s)
            for i, ep in enumerate(eps):
                sep = f"KUBE-SEP-{s.name.upper()}-{i}"[:28]
                chains.append(sep)
                left = len(eps) - i
                if left == 1:
                    pick = ""
                elif self.topo.spread == "nth":
                    pick = f"-m statistic --mode nth --every {left} --packet 0 "
                else:
                    pick = f"-m statistic --mode random --probability {1 / left:.11f} "
                rules.append(f"-A {svc} {pick}-j {sep}")
                rules.append(f"-A {sep} -p tcp -m tcp -j DNAT --to-destination "
                             f"{ep.ip}:{ep.spec.port}")
        chains.append("FLANNEL-POSTRTG")
        rules += ["-A PREROUTING -j KUBE-SERVICES", "-A OUTPUT -j KUBE-SERVICES",
                  "-A POSTROUTING -j FLANNEL-POSTRTG",
                  f"-A FLANNEL-POSTRTG -s {CLUSTER_CIDR} -d {CLUSTER_CIDR} -j RETURN",
                  f"-A FLANNEL-POSTRTG -s {CLUSTER_CIDR} ! -d 224.0.0.0/4 -j MASQUERADE",
                  f"-A FLANNEL-POSTRTG ! -s {CLUSTER_CIDR} -d 198.18.{k}.0/24 -j RETURN",
                  f"-A FLANNEL-POSTRTG ! -s {CLUSTER_CIDR} -d {CLUSTER_CIDR} -j MASQUERADE"]
        return "\n".join(["*nat", ":KUBE-SERVICES - [0:0]"] + [f":{c} - [0:0]" for c in chains]
                         + rules + ["COMMIT", ""])

    def teardown(self) -> None:
        self.stop_procs()
        for ns in self.namespaces():
            sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- clients --------------------------------------------------------------------
    def url(self, target: str, path: str) -> str:
        """http URL of a pod's server ("web-1") or a Service's ClusterIP ("svc/web")."""
        if target.startswith("svc/"):
            s = self.service(target[4:])
            return f"http://{s.vip}:{s.port}{path}"
        p = self.pod(target)
        return f"http://{p.ip}:{p.spec.port}{path}"

    def client_ns(self, client: str) -> str:
        """A pod's namespace ("client-0") or a node's host namespace ("node-0")."""
        if client.startswith("node-"):
            return self.nodes[int(client[5:])].ns
        return self.pod(client).ns

    def path_prefix(self, target: str) -> str:
        """A path every server of @target answers 200: nginx /status/..., Python /py/..."""
        pods = self.endpoints(self.service(target[4:])) if target.startswith("svc/") \
            else [self.pod(target)]
        (kind,) = {p.spec.server for p in pods}
        return "/status" if kind == "nginx" else "/py"

    def run(self, sc: Scenario, tag: str) -> tuple[list[str], list[int]]:
        """@sc's requests, one curl each (a connection each: Services spread connections):
        the URL paths requested (unique: .../<tag>/<i>) and the status codes got."""
        paths = [f"{self.path_prefix(sc.target)}/{tag}/{i}" for i in range(sc.requests)]
        loop = 'for u; do curl -sS --noproxy "*" -o /dev/null -w "%{http_code}\\n" "$u"; done'
        cp = self.ns_exec(self.client_ns(sc.client), "sh", "-c", loop, "sh",
                          *(self.url(sc.target, p) for p in paths), check=False, timeout=60)
        return paths, [int(c) for c in cp.stdout.split()]

    # -- the Kubernetes API and the agents -----------------------------------------
    def start_api(self):
        """lab/fakeapi.py on the switch, SWITCH_IP:6443, holding the topology's
        pods and Services; its EndpointSlice controller derives the slices.
        Returns the FakeApi (stop() it); .kc is a kubeconfig for it."""
        from pyloader.lab.fakeapi import FakeApi, tls_files
        from pyloader.lab.fakeobjs import make_pod, make_service
        api = FakeApi(SWITCH_IP, API_PORT, netns=self.ul_ns)
        api.ca, crt, key = tls_files((SWITCH_IP,))  # a certificate for this address
        api.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        api.tls.load_cert_chain(crt, key)
        for p in self.pods:
            s, node = p.spec, self.nodes[p.spec.node]
            kind = "DaemonSet" if s.host_network else "StatefulSet"
            api.put("pods", make_pod(s.name, [p.ip], ns=s.namespace, node=node.name,
                                     ports=((s.port, "http"),) if s.port else (),
                                     labels={"app": s.app} if s.app else {},
                                     owner=(kind, s.app) if s.app else None,
                                     host_network=s.host_network, host_ip=node.ip))
        for s in self.topo.services:
            api.put("services", make_service(s.name, {"app": s.app}, ((s.port, "http", "http"),),
                                             ns=s.namespace, cluster_ip=s.vip))
        api.start()
        api.kc = api.kubeconfig(os.path.join(self.dir, "kubeconfig"))
        return api

    def agent_args(self, node: ClusterNode, kubeconfig: str, attach: str = "veths") -> list[str]:
        """`redtap run` arguments for @node's agent: its name, the API, and for a node
        with hostNetwork servers its host interfaces (eth0: other nodes; lo: itself).
        (A pod's request to its own node's address crosses neither: the pod-side
        programs on its veth take it.)"""
        args = ["--kubeconfig", kubeconfig, "--node-name", node.name, "--attach", attach]
        if any(p.spec.host_network for p in node.pods):
            args += ["--host-iface", "eth0", "--host-iface", "lo"]
        return args


# -- the picture -----------------------------------------------------------------------
def render(topo: Topology, tag: str = "<tag>") -> str:
    """A text diagram of @topo: the underlay, each node's devices, Flannel's entries,
    the pods on cni0, hostNetwork servers, and the Services' DNAT."""
    c = Cluster(topo, tag=tag)  # its naming rules; nothing is created but a temp dir
    shutil.rmtree(c.dir, ignore_errors=True)
    out = [f"underlay {c.ul_ns}: switch bridge sw0 {SWITCH_IP}/24 "
           f"(Kubernetes API https://{SWITCH_IP}:{API_PORT})"]
    for node in c.nodes:
        last = node is c.nodes[-1]
        bar, k = " " if last else "│", node.index
        out.append(f"{'└' if last else '├'}── eth0 {node.ip}  {node.name} (netns {node.ns})")
        out.append(f"{bar}     flannel.1 {vtep_ip(k)}/32  VXLAN id {VXLAN_ID} dstport {VXLAN_PORT} "
                   f"local {node.ip} nolearning, MAC {vtep_mac(k)}")
        for m in range(topo.nodes):
            if m != k:
                out.append(f"{bar}       route 198.18.{m}.0/24 via {vtep_ip(m)} onlink | neigh "
                           f"{vtep_ip(m)} {vtep_mac(m)} | fdb {vtep_mac(m)} dst {node_ip(m)}")
        out.append(f"{bar}     cni0 {pod_gateway(k)}/24")
        pods = [p for p in node.pods if p.veth]
        for p in pods:
            what = f"{p.spec.server} :{p.spec.port}" if p.spec.server else "client"
            out.append(f"{bar}       {'└' if p is pods[-1] else '├'}── {p.veth:<6} {p.name:<10} "
                       f"{p.ip:<13} {what}")
        for p in node.pods:
            if p.spec.host_network:
                out.append(f"{bar}     hostNetwork {p.name} {p.spec.server} on {p.ip}:{p.spec.port}")
    out.append(f"Services (kube-proxy DNAT on every node, nat PREROUTING + OUTPUT, "
               f"{topo.spread} spreading):")
    for s in topo.services:
        eps = ", ".join(f"{p.ip}:{p.spec.port} ({p.name}, node-{p.spec.node})"
                        for p in c.endpoints(s))
        out.append(f"  {s.name} {s.vip}:{s.port} -> {eps}")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(default_topology()))

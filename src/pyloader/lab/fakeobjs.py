"""Objects shaped like the real API's, and the EndpointSlice controller of
lab/fakeapi.py (one slice per Service and address family, endpoints =
the pods its selector matches, ports = its targetPorts resolved per pod)."""
from __future__ import annotations

import hashlib
import time
import uuid


def _ts(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


def owner_ref(kind: str, name: str, uid: str | None = None) -> dict:
    group = "batch/v1" if kind in ("Job", "CronJob") else "v1" if kind == "ReplicationController" \
        else "apps/v1"
    return {"apiVersion": group, "kind": kind, "name": name, "uid": uid or str(uuid.uuid4()),
            "controller": True, "blockOwnerDeletion": True}


def make_pod(name: str, ips=(), ns: str = "default", node: str = "node-a",
             ports=((80, "http"),), labels: dict | None = None, owner: tuple | None = None,
             host_network: bool = False, phase: str = "Running", host_ip: str = "198.18.1.1",
             started: float | None = None) -> dict:
    """A scheduled pod. ips: its podIPs (for hostNetwork pods: the node's IPs).
    owner: (kind, name) of its controller."""
    ts = _ts(started)
    ready = "True" if phase == "Running" else "False"
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": dict(labels or {}),
                     "annotations": {"kubernetes.io/psp": "fake"}},
        "spec": {"nodeName": node, "hostNetwork": host_network,
                 "restartPolicy": "Always", "serviceAccountName": "default",
                 "containers": [{"name": "main", "image": "registry.test/app:1",
                                 "imagePullPolicy": "IfNotPresent",
                                 "ports": [{"containerPort": p, "name": n, "protocol": "TCP"}
                                           for p, n in ports]}]},
        "status": {"phase": phase, "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
                   "qosClass": "BestEffort", "startTime": ts,
                   "conditions": [
                       {"type": "PodReadyToStartContainers", "status": "True",
                        "lastTransitionTime": ts, "lastProbeTime": None},
                       {"type": "Initialized", "status": "True", "lastTransitionTime": ts},
                       {"type": "Ready", "status": ready, "lastTransitionTime": ts},
                       {"type": "PodScheduled", "status": "True", "lastTransitionTime": ts}],
                   "containerStatuses": [{"name": "main", "ready": ready == "True",
                                          "restartCount": 0, "image": "registry.test/app:1",
                                          "state": {"running": {"startedAt": ts}}}]},
    }
    if ips:
        pod["status"]["podIP"] = ips[0]
        pod["status"]["podIPs"] = [{"ip": ip} for ip in ips]
    if owner:
        pod["metadata"]["ownerReferences"] = [owner_ref(*owner)]
    if phase in ("Succeeded", "Failed"):
        pod["status"]["containerStatuses"][0]["state"] = {
            "terminated": {"exitCode": 0, "reason": "Completed", "startedAt": ts,
                           "finishedAt": _ts()}}
    return pod


def make_service(name: str, selector: dict | None, ports=((80, 80, "http"),),
                 ns: str = "default", cluster_ip: str = "198.18.200.1") -> dict:
    """ports: (port, targetPort (int or container port name), name)."""
    spec = {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "sessionAffinity": "None",
            "ports": [{"name": n, "port": p, "targetPort": t, "protocol": "TCP"}
                      for p, t, n in ports]}
    if selector is not None:
        spec["selector"] = dict(selector)
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns}, "spec": spec, "status": {}}


def make_slice(name: str, service: str, endpoints, ports, ns: str = "default",
               family: str = "IPv4", managed_by: str = "staff") -> dict:
    """endpoints: (ip, nodeName or None, pod name or None); ports: (port, name)."""
    eps = []
    for ip, node, pod in endpoints:
        ep = {"addresses": [ip], "conditions": {"ready": True, "serving": True,
                                                "terminating": False}}
        if node:
            ep["nodeName"] = node
        if pod:
            ep["targetRef"] = {"kind": "Pod", "namespace": ns, "name": pod}
        eps.append(ep)
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service,
                                    "endpointslice.kubernetes.io/managed-by": managed_by}},
            "addressType": family, "endpoints": eps,
            "ports": [{"port": p, "name": n, "protocol": "TCP"} for p, n in ports]}


def make_replicaset(name: str, deployment: str | None, ns: str = "default") -> dict:
    rs = {"apiVersion": "apps/v1", "kind": "ReplicaSet",
          "metadata": {"name": name, "namespace": ns, "labels": {}},
          "spec": {"replicas": 1, "selector": {"matchLabels": {}}},
          "status": {"replicas": 1}}
    if deployment:
        rs["metadata"]["ownerReferences"] = [owner_ref("Deployment", deployment)]
    return rs


# -- the EndpointSlice controller -------------------------------------------------
CONTROLLER = "endpointslice-controller.k8s.io"


def _target_port(pod: dict, target) -> int | None:
    if isinstance(target, int):
        return target
    for c in pod["spec"].get("containers", []):
        for p in c.get("ports") or []:
            if p.get("name") == target:
                return p["containerPort"]
    return None


def _slice_name(svc: str, family: str) -> str:
    return f"{svc}-{hashlib.sha256((svc + family).encode()).hexdigest()[:5]}"


def desired_slices(store) -> dict:
    """(ns, name) -> slice, for every Service with a selector."""
    out = {}
    pods = store.list("pods")
    for svc in store.list("services"):
        sel = svc["spec"].get("selector")
        if not sel:
            continue
        ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
        for family in ("IPv4", "IPv6"):
            eps, ports = [], None
            for pod in pods:
                md, st = pod["metadata"], pod["status"]
                labels = md.get("labels") or {}
                if md["namespace"] != ns or any(labels.get(k) != v for k, v in sel.items()):
                    continue
                if st.get("phase") in ("Succeeded", "Failed"):
                    continue
                ips = [p["ip"] for p in st.get("podIPs") or []
                       if (":" in p["ip"]) == (family == "IPv6")]
                resolved = [(_target_port(pod, p.get("targetPort", p["port"])), p.get("name", ""))
                            for p in svc["spec"]["ports"]]
                if not ips or any(p is None for p, _ in resolved):
                    continue
                ports = resolved
                ready = any(c["type"] == "Ready" and c["status"] == "True"
                            for c in st.get("conditions", []))
                for ip in ips:
                    eps.append({"addresses": [ip],
                                "conditions": {"ready": ready, "serving": ready,
                                               "terminating": False},
                                "nodeName": pod["spec"].get("nodeName"),
                                "targetRef": {"kind": "Pod", "namespace": ns,
                                              "name": md["name"], "uid": md["uid"]}})
            if family == "IPv6" and not eps:
                continue
            sl = make_slice(_slice_name(name, family), name, [], ports or [], ns, family,
                            managed_by=CONTROLLER)
            sl["endpoints"] = eps
            sl["metadata"]["ownerReferences"] = [
                {"apiVersion": "v1", "kind": "Service", "name": name,
                 "uid": svc["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
            out[(ns, sl["metadata"]["name"])] = sl
    return out


def reconcile_slices(store) -> None:
    """Bring the controller-managed slices in line with Services and Pods."""
    want = desired_slices(store)
    for sl in store.list("endpointslices"):
        md = sl["metadata"]
        if md.get("labels", {}).get("endpointslice.kubernetes.io/managed-by") != CONTROLLER:
            continue
        key = (md["namespace"], md["name"])
        new = want.pop(key, None)
        if new is None:
            store.delete("endpointslices", *key)
        elif (new["endpoints"], new["ports"]) != (sl["endpoints"], sl["ports"]):
            store.put("endpointslices", new)
    for sl in want.values():
        store.put("endpointslices", sl)


def demo_cluster(node, node_name: str = "node-a") :
    """The API of `make demo`: served in @node's namespace on its bridge IP, with
    the objects of the demo's pods (pyloader.lab.netnode: nginx on pod0, Python on pod1,
    clients on pod2/pod3 and on the "other node" ext namespace)."""
    from pyloader.lab.fakeapi import FakeApi
    from pyloader.lab.netnode import EXT_IP, NODE_IP
    api = FakeApi(NODE_IP, 6443, netns=node.node_ns).start()
    p0, p1, p2, p3 = node.pods[:4]
    api.put("replicasets", make_replicaset("web-5d8f7", "web", ns="shop"))
    api.put("pods", make_pod("web-5d8f7-x1", [p0.ip, p0.ip6], ns="shop", labels={"app": "web"},
                             owner=("ReplicaSet", "web-5d8f7"), node=node_name))
    api.put("services", make_service("web", {"app": "web"}, ((80, "http", "http"),), ns="shop"))
    api.put("pods", make_pod("api-0", [p1.ip], ns="shop", ports=((8080, "http"),),
                             labels={"app": "api"}, owner=("StatefulSet", "api"), node=node_name))
    api.put("services", make_service("api", {"app": "api"}, ((80, "http", "http"),), ns="shop",
                                     cluster_ip="198.18.200.2"))
    api.put("pods", make_pod("client-a", [p2.ip, p2.ip6], ports=(), node=node_name))
    api.put("pods", make_pod("client-b", [p3.ip], ns="tools", ports=(), node=node_name,
                             owner=("DaemonSet", "probe")))
    api.put("pods", make_pod("remote-client", [EXT_IP], node="node-b", ports=()))
    return api

"""deploy/: Kubernetes manifests against the Kubernetes schemas (kubernetes-validate,
offline), the DaemonSet's wiring, the Fluent Bit config, the systemd unit's privileges."""
import configparser
import datetime
import os
import re

import pytest
import yaml

from pyloader.kernel import preflight
from pyloader.pipeline.record import Clock
from pyloader.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K8S = os.path.join(ROOT, "deploy", "kubernetes")
FLUENT = os.path.join(ROOT, "deploy", "fluent-bit")
MANIFESTS = sorted(f for f in os.listdir(K8S) if f.endswith(".yaml") and f != "kustomization.yaml")
K8S_VERSIONS = ["1.28.0", "1.33.0"]


def docs(name):
    with open(os.path.join(K8S, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def all_docs():
    return [d for f in MANIFESTS for d in docs(f)]


def one(kind, name=None):
    found = [d for d in all_docs() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def daemonset_container(name):
    (c,) = [c for c in one("DaemonSet")["spec"]["template"]["spec"]["containers"]
            if c["name"] == name]
    return c


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("fname", MANIFESTS)
def test_manifest_is_valid_against_the_kubernetes_schema(fname, version):
    import kubernetes_validate
    for d in docs(fname):
        kubernetes_validate.validate(d, version, strict=True)


def test_kustomization_lists_every_manifest():
    with open(os.path.join(K8S, "kustomization.yaml")) as f:
        k = yaml.safe_load(f)
    assert sorted(k["resources"]) == MANIFESTS


def test_manifests_cover_the_kinds_a_node_install_needs():
    kinds = sorted(d["kind"] for d in all_docs())
    assert kinds == sorted(["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                            "ConfigMap", "ConfigMap", "DaemonSet"])
    ns = one("Namespace")["metadata"]["name"]
    assert all(d["metadata"].get("namespace", ns) == ns for d in all_docs())


def test_daemonset_runs_as_the_service_account_bound_to_the_read_only_role():
    sa = one("ServiceAccount")["metadata"]["name"]
    assert one("DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == sa
    binding = one("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == one("ClusterRole")["metadata"]["name"]
    assert {"kind": "ServiceAccount", "name": sa, "namespace": "redtap"} in binding["subjects"]
    verbs = {v for r in one("ClusterRole")["rules"] for v in r["verbs"]}
    assert verbs <= {"get", "list", "watch"}


def test_redtap_container_has_exactly_the_three_capabilities_and_host_network():
    pod = one("DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    sc = daemonset_container("redtap")["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted("CAP_" + c for c in sc["capabilities"]["add"]) == sorted(preflight.NEEDED)
    assert not sc.get("privileged")


def test_redtap_container_mounts_bpffs_and_btf_from_the_host():
    pod = one("DaemonSet")["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in daemonset_container("redtap")["volumeMounts"]}
    for path in ("/sys/fs/bpf", "/sys/kernel/btf"):
        assert vols[mounts[path]["name"]]["hostPath"]["path"] == path


def expanded_args(container):
    """The container's args with $(VAR) from its env and ConfigMap, as the kubelet does."""
    env = {}
    for src in container.get("envFrom", []):
        env.update(one("ConfigMap", src["configMapRef"]["name"])["data"])
    out = []
    for a in container["args"]:
        for var in re.findall(r"\$\((\w+)\)", a):
            assert var in env, f"{var} is not defined for {a}"
            a = a.replace(f"$({var})", env[var])
        out.append(a)
    return out


def test_redtap_args_are_accepted_by_the_real_command_line():
    c = daemonset_container("redtap")
    args = build_parser().parse_args(expanded_args(c))
    assert args.cmd == "run" and args.log == "/var/log/redtap/access.log"
    assert args.log_max_bytes == 100 << 20 and args.log_backups >= 1
    port = int(args.metrics_addr.rsplit(":", 1)[1])
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in c["ports"]


def test_node_name_comes_from_the_downward_api():
    env = {e["name"]: e for e in daemonset_container("redtap")["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_fluent_bit_sidecar_reads_the_volume_redtap_writes():
    log_mount = {m["mountPath"]: m["name"] for m in daemonset_container("redtap")["volumeMounts"]}
    fb = daemonset_container("fluent-bit")
    fb_mounts = {m["mountPath"]: m for m in fb["volumeMounts"]}
    tail = fluent_sections(read(FLUENT, "fluent-bit.conf"))["INPUT"]
    folder = os.path.dirname(tail["Path"])
    assert log_mount[folder] == fb_mounts[folder]["name"] == "log"
    db_folder = os.path.dirname(tail["DB"])
    assert db_folder in fb_mounts and not fb_mounts[db_folder].get("readOnly")
    assert fb_mounts["/fluent-bit/etc/"]["name"] == "fluent-bit-config"


def read(*p):
    with open(os.path.join(*p)) as f:
        return f.read()


def test_fluent_bit_configmap_is_the_deploy_fluent_bit_config():
    data = one("ConfigMap", "redtap-fluent-bit")["data"]
    assert data == {"fluent-bit.conf": read(FLUENT, "fluent-bit.conf"),
                    "parsers.conf": read(FLUENT, "parsers.conf")}


def fluent_sections(text):
    """Fluent Bit's classic format: [SECTION] then `Key Value` lines (one of each here)."""
    out, cur = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"\[(\w+)\]", line)
        if m:
            cur = out.setdefault(m.group(1), {})
            continue
        key, _, value = line.partition(" ")
        cur[key] = value.strip()
    return out


def test_fluent_bit_tails_the_log_with_db_offsets_and_the_json_parser():
    conf = fluent_sections(read(FLUENT, "fluent-bit.conf"))
    tail = conf["INPUT"]
    assert tail["Name"] == "tail" and tail["Path"] == "/var/log/redtap/access.log"
    assert tail["DB"] and tail["Parser"] == "json"
    assert conf["SERVICE"]["Parsers_File"] == "parsers.conf"
    parser = fluent_sections(read(FLUENT, "parsers.conf"))["PARSER"]
    assert parser["Name"] == tail["Parser"] and parser["Format"] == "json"


def test_fluent_bit_time_format_parses_the_time_field_redtap_writes():
    parser = fluent_sections(read(FLUENT, "parsers.conf"))["PARSER"]
    assert parser["Time_Key"] == "time"
    # Fluent Bit's %L is the fraction of a second; Python's %f reads it too
    fmt = parser["Time_Format"].replace("%L", "%f")
    wall_ns = 1_764_000_000_123_456_789
    text = Clock().rfc3339(wall_ns)
    t = datetime.datetime.strptime(text, fmt).replace(tzinfo=datetime.timezone.utc)
    assert int(t.timestamp() * 1e6) == wall_ns // 1000


def unit():
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(os.path.join(ROOT, "deploy", "systemd", "redtap.service"))
    return cp


def test_systemd_unit_grants_exactly_the_needed_capabilities_without_root():
    svc = unit()["Service"]
    assert sorted(svc["AmbientCapabilities"].split()) == sorted(preflight.NEEDED)
    assert sorted(svc["CapabilityBoundingSet"].split()) == sorted(preflight.NEEDED)
    assert svc["DynamicUser"] == "yes" and svc["NoNewPrivileges"] == "yes"
    assert svc["ProtectSystem"] == "strict" and svc["Restart"] == "on-failure"
    assert svc["EnvironmentFile"].lstrip("-") == "/etc/default/redtap"


def test_systemd_unit_logs_where_it_may_write():
    svc = unit()["Service"]
    log = svc["Environment"].split("=", 1)[1]
    assert os.path.dirname(log) == "/var/log/" + svc["LogsDirectory"]
    assert "--log ${REDTAP_LOG}" in svc["ExecStart"]

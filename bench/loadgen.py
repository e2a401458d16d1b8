"""Load for the benchmark: nginx pinned to one CPU, wrk (closed loop, saturation)
and hey (open loop, fixed rate) pinned to the other, with their outputs parsed.

Everything runs inside the namespaces of a pyloader.lab.netnode.Node; traffic goes
only to the node's pod addresses (198.18.0.0/15).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

from pyloader.lab.netnode import NGINX_CONF, Node, Pod

SERVER_CPU, CLIENT_CPU = "0", "1"

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


# nginx's own JSON access log, buffered, with redtap's fields (configuration N):
# what an SRE compares redtap with.
JSON_LOG_FORMAT = (
    "    log_format redtap_json escape=json '{{\"time\":\"$time_iso8601\",'\n"
    "        '\"client.address\":\"$remote_addr\",\"client.port\":$remote_port,'\n"
    "        '\"server.address\":\"$server_addr\",\"server.port\":$server_port,'\n"
    "        '\"http.request.method\":\"$request_method\",\"url.path\":\"$uri\",'\n"
    "        '\"url.query\":\"$args\",\"http.response.status_code\":$status,'\n"
    "        '\"http.server.request.duration\":$request_time,'\n"
    "        '\"http.response.body.size\":$body_bytes_sent}}';\n")


def nginx_conf(d: str, port: int, json_log: str | None = None) -> str:
    """The netnode template (1 worker); access_log off, or nginx's own JSON log
    to json_log with a 64 kB buffer flushed every second."""
    tmpl = NGINX_CONF.replace("    access_log {access_log};\n",
                              JSON_LOG_FORMAT + "    access_log {access_log};\n")
    log = f"{json_log} redtap_json buffer=64k flush=1s" if json_log else "off"
    return tmpl.format(dir=d, port=port, access_log=log)


def nginx_dir(node: Node, pod: Pod) -> str:
    return os.path.join(node.dir, f"bench-nginx-{pod.index}")


def start_nginx(node: Node, pod: Pod, port: int = 80) -> subprocess.Popen:
    """nginx_conf() without a log, master and worker pinned to SERVER_CPU with
    taskset."""
    d = nginx_dir(node, pod)
    os.makedirs(os.path.join(d, "www", "files"), exist_ok=True)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(nginx_conf(d, port))
    p = node.spawn(pod.ns, "taskset", "-c", SERVER_CPU, "nginx", "-c", conf,
                   "-e", os.path.join(d, "error.log"))
    node.wait_port(pod.ns, pod.ip, port)
    return p


def reload_nginx(node: Node, pod: Pod, json_log: str | None, port: int = 80,
                 timeout: float = 10.0) -> None:
    """Rewrite the bench nginx's configuration (with or without its JSON log) and
    reload it; returns once the old worker has gone and a new one serves."""
    d = nginx_dir(node, pod)
    with open(os.path.join(d, "nginx.conf"), "w") as f:
        f.write(nginx_conf(d, port, json_log))
    master = int(open(os.path.join(d, "nginx.pid")).read())

    def workers() -> set[int]:
        with open(f"/proc/{master}/task/{master}/children") as f:
            return set(map(int, f.read().split()))
    before = workers()
    os.kill(master, signal.SIGHUP)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        now = workers()
        if now and not now & before:
            node.wait_port(pod.ns, pod.ip, port)
            return
        time.sleep(0.02)
    raise RuntimeError(f"nginx did not reload in {timeout}s: {open(os.path.join(d, 'error.log')).read()[-1000:]}")


def _ms(num: str, unit: str) -> float:
    return float(num) * _UNITS[unit]


def parse_wrk(out: str) -> dict:
    """wrk --latency output -> requests, duration, rps, p50/p90/p99 in ms, errors."""
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if not m:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    res = {"requests": int(m.group(1)), "duration_s": _ms(m.group(2), m.group(3)) / 1e3}
    res["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        res[f"p{pct}_ms"] = _ms(m.group(1), m.group(2)) if m else None
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(map(int, errs.groups())) if errs else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    return res


def parse_hey(out: str) -> dict:
    """hey's summary -> requests (answered), rps, p50/p90/p99 in ms (hey prints
    seconds with 4 decimals: 0.1 ms resolution), errors."""
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"unexpected hey output:\n{out}")
    res = {"rps": float(m.group(1))}
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out)}
    res["requests"] = sum(codes.values())
    res["non_2xx"] = sum(n for c, n in codes.items() if not 200 <= c < 400)
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}% in ([\d.]+) secs", out, re.M)
        res[f"p{pct}_ms"] = round(float(m.group(1)) * 1e3, 3) if m else None
    m = re.search(r"Total:\s+([\d.]+) secs", out)
    res["duration_s"] = float(m.group(1)) if m else None
    m = re.search(r"Error distribution:\n((?:\s+\[\d+\].*\n?)+)", out)
    res["errors"] = sum(int(n) for n in re.findall(r"\[(\d+)\]", m.group(1))) if m else 0
    return res


def wrk(node: Node, pod: Pod, server: Pod, seconds: float, conns: int = 16,
        path: str = "/") -> dict:
    """Closed loop, keep-alive, one thread pinned to CLIENT_CPU."""
    cmd = ("taskset", "-c", CLIENT_CPU, "wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s",
           "--latency", "--timeout", "5s", f"http://{server.ip}{path}")
    cp = node.ns_exec(pod.ns, *cmd, check=False, timeout=seconds + 60)
    if cp.returncode != 0:
        raise RuntimeError(f"wrk exited {cp.returncode}: {cp.stderr or cp.stdout}")
    res = parse_wrk(cp.stdout)
    res["connections"] = conns
    return res


def hey(node: Node, pod: Pod, server: Pod, seconds: float, rate: float, workers: int = 50,
        path: str = "/") -> dict:
    """Open loop at about @rate requests/s in total (hey -q is per worker),
    keep-alive, pinned to CLIENT_CPU."""
    q = rate / workers
    cmd = ("taskset", "-c", CLIENT_CPU, "hey", "-z", f"{seconds:g}s", "-c", str(workers),
           "-q", f"{q:.3f}", "-t", "5", f"http://{server.ip}{path}")
    cp = node.ns_exec(pod.ns, *cmd, check=False, timeout=seconds + 60)
    if cp.returncode != 0:
        raise RuntimeError(f"hey exited {cp.returncode}: {cp.stderr or cp.stdout}")
    res = parse_hey(cp.stdout)
    res.update(target_rps=rate, workers=workers)
    return res


def hey_max(node: Node, pod: Pod, server: Pod, seconds: float = 3.0, workers: int = 50) -> float:
    """hey's own ceiling here (no rate limit): an open-loop rate near it would
    measure hey's queueing, not the server's latency."""
    cmd = ("taskset", "-c", CLIENT_CPU, "hey", "-z", f"{seconds:g}s", "-c", str(workers),
           "-t", "5", f"http://{server.ip}/")
    cp = node.ns_exec(pod.ns, *cmd, check=False, timeout=seconds + 60)
    if cp.returncode != 0:
        raise RuntimeError(f"hey exited {cp.returncode}: {cp.stderr or cp.stdout}")
    return parse_hey(cp.stdout)["rps"]

"""The `redtap` command line."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from pyloader import __version__
from pyloader.errors import ConfigError, RedtapError
from pyloader.kernel.endpoints import parse_endpoint
from pyloader.tools import replay, top

RUN_HELP = """\
Trace HTTP/1.x on this node's pod interfaces and write one JSON line per request.

Where to attach:
  default          every veth enslaved to --bridge (cni0), following pods that
                   come and go. Sees all traffic of local pods, including
                   pod-to-pod traffic on the same node.
  --attach bridge  one attachment on the bridge itself (the seed's mode). A TC
                   hook on a bridge does NOT see frames bridged between two of
                   its ports: same-node pod-to-pod requests are missed; only
                   traffic to or from the host stack (other nodes, the host) is seen.
  --iface NAME     explicit pod-side interfaces (host side of a pod's veth).
  --host-iface NAME  host-side interfaces (uplink, lo) for hostNetwork servers:
                   the direction rule is reversed there.
"""


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="trace and write access logs", description=RUN_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", action="append", default=[], metavar="IP[:PORT]|CIDR",
                   help="server endpoint to trace (repeatable; IPv4/IPv6, [v6]:port, CIDR). "
                        "None given: trace every server.")
    p.add_argument("--bridge", default="cni0", help="bridge whose ports to follow (default cni0)")
    p.add_argument("--attach", choices=("veths", "bridge"), default="veths",
                   help="veths: every port of --bridge (default); bridge: the bridge only "
                        "(misses same-node pod-to-pod traffic)")
    p.add_argument("--iface", action="append", default=[], metavar="NAME",
                   help="pod-side interface to attach to (repeatable; replaces --bridge)")
    p.add_argument("--host-iface", action="append", default=[], metavar="NAME",
                   help="host-side interface for hostNetwork servers (repeatable)")
    p.add_argument("--log", default=None, metavar="PATH", help="access log file (default stdout)")
    p.add_argument("--log-max-bytes", type=_size, default=0, metavar="SIZE",
                   help="rotate the log at this size (e.g. 100M): PATH -> PATH.1 ... (default 0: "
                        "never; the log is reopened after logrotate and on SIGHUP anyway)")
    p.add_argument("--log-backups", type=int, default=5, metavar="N",
                   help="rotated files kept with --log-max-bytes (default 5)")
    p.add_argument("--log-queue", type=int, default=65536, metavar="LINES",
                   help="lines waiting for the log writer before new ones are dropped (counted "
                        "in the stats lines as log.dropped_lines; default 65536)")
    p.add_argument("--idle-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="report a request unanswered after its connection is idle this long")
    p.add_argument("--stats-interval", type=float, default=60.0, metavar="SECONDS",
                   help="log the loss/anomaly counters this often (and at exit)")
    p.add_argument("--poll-ms", type=int, default=50, help="ring buffer poll interval")
    p.add_argument("--max-batch", type=int, default=4096, metavar="N",
                   help="ring buffer records handled per round at most, to bound the memory "
                        "of a round when the agent falls behind (0: all there are; default 4096)")
    p.add_argument("--max-conns", type=int, default=None,
                   help="tracked connections (default 65536)")
    p.add_argument("--ring-buffer-mb", type=_ring_mb, default=None, metavar="MB",
                   help="the kernel's ring buffer of records, a power of two (default 8: about "
                        "22,000 records of burst; user space maps it twice, so it counts twice "
                        "in the agent's RSS)")
    p.add_argument("--bpf-object", default=None, help="BPF object to load (default: the package's)")
    p.add_argument("--record-path", choices=("auto", "python"), default="auto",
                   help="auto: records written by the package's C helper where it applies "
                        "(the same bytes, a fraction of the CPU); python: every record "
                        "through the Python stages (default auto)")
    p.add_argument("--summary", action="store_true",
                   help="print a R.E.D. table per server endpoint to stderr at exit")
    p.add_argument("--metrics-addr", default=None, metavar="HOST:PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics ([v6]:PORT for IPv6)")
    p.add_argument("--route", action="append", default=[], metavar="PATTERN",
                   help="route template like '/api/v1/items/{id}' (repeatable; wins over the "
                        "default id heuristics)")
    p.add_argument("--max-routes", type=int, default=100, metavar="N",
                   help="distinct routes per server before the rest fold into /{overflow} "
                        "(default 100)")
    p.add_argument("--redact", action=argparse.BooleanOptionalAction, default=True,
                   help="replace the query values of sensitive keys by REDACTED (default on; "
                        "--no-redact logs URLs as sent)")
    p.add_argument("--redact-keys", default=None, metavar="WORD,...",
                   help="a query key is sensitive when it contains one of these words, any case "
                        "(default token,password,secret,key,auth,signature,session)")
    k = p.add_argument_group("Kubernetes metadata (which endpoints to trace, names of both ends)")
    k.add_argument("--k8s", action=argparse.BooleanOptionalAction, default=None,
                   help="watch the Kubernetes API (default: on when --kubeconfig is given or "
                        "when running in a pod with a service account)")
    k.add_argument("--kubeconfig", default=None, metavar="PATH",
                   help="kubeconfig to use (default: in-cluster service account)")
    k.add_argument("--node-name", default=os.environ.get("NODE_NAME"), metavar="NAME",
                   help="this node's name (default $NODE_NAME, from the downward API)")
    k.add_argument("--k8s-all-pods", action=argparse.BooleanOptionalAction, default=True,
                   help="watch every pod of the cluster to name clients on other nodes "
                        "(default on; off: only this node's pods are named)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=run)


def _size(text: str) -> int:
    from pyloader.output.logwriter import parse_size
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ring_mb(text: str) -> int:
    try:
        mb = int(text)
    except ValueError:
        mb = 0
    if mb < 1 or mb > 1024 or mb & (mb - 1):
        raise argparse.ArgumentTypeError(f"{text!r}: a power of two from 1 to 1024")
    return mb


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="redtap", description="HTTP/1.x tracing with eBPF")
    ap.add_argument("--version", action="version", version=f"redtap {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _run_parser(sub)
    for tool in (top, replay):
        tool.add_parser(sub)
    return ap


def run(args) -> int:
    """`redtap run`: preflight, then the agent with the pipeline's stages."""
    from pyloader.kernel.preflight import check as preflight
    preflight()  # BTF, ring buffer, libbpf, capabilities: one clear message each
    from pyloader.agent import Agent, AgentConfig
    from pyloader.pipeline.stages import stages
    cfg = AgentConfig(
        endpoints=[parse_endpoint(e) for e in args.endpoint],
        attach=args.attach, bridge=args.bridge, ifaces=args.iface,
        host_ifaces=args.host_iface, log_path=args.log, bpf_object=args.bpf_object,
        max_conns=args.max_conns, poll_ms=args.poll_ms,
        idle_timeout_s=args.idle_timeout, stats_interval_s=args.stats_interval,
        summary=args.summary, log_max_bytes=args.log_max_bytes, log_backups=args.log_backups,
        log_queue_lines=args.log_queue, max_batch=args.max_batch,
        fast_path=args.record_path == "auto",
        ring_bytes=args.ring_buffer_mb << 20 if args.ring_buffer_mb else None,
        components=stages(args))
    return Agent(cfg).run()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        stream=sys.stderr, format="redtap: %(message)s")
    try:
        return args.func(args)
    except RedtapError as e:
        print(f"redtap: {e}", file=sys.stderr)
        if getattr(e, "errno", None) == errno.EPERM:  # from bpf(): say what would help
            from pyloader.kernel.preflight import EPERM_HINT
            print(f"redtap: {EPERM_HINT}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The agent's pipeline, in order. This is the one place that orders it.

For every ring-buffer record (agent.py, per batch):

  1. decode       kernel/abi.py       the record's bytes -> an event tuple
  2. record       pipeline/record.py  event -> an access-log record (a dict)
  3. process      the stages below, in this order, each mutating the record:
       redaction    pipeline/redact.py  first: no later stage ever sees a secret
       names        k8s/meta.py         client.k8s.*, server.k8s.* (with metadata)
       routes       pipeline/routes.py  http.route (uses the server's names)
  4. write        output/accesslog.py one JSON line (the writer thread writes it)
  5. observe      output/metrics.py   R.E.D. metrics (with --metrics-addr),
                  output/summary.py   the exit summary (--summary)

Each stage is a pipeline.component.Component built from the `redtap run`
options; optional stages import their dependencies only when enabled.
"""
from __future__ import annotations

from pyloader.errors import ConfigError
from pyloader.pipeline.component import Component


def redaction(args) -> list[Component]:
    """Secrets in URLs, on by default (--no-redact, --redact-keys)."""
    if not args.redact:
        return []
    from pyloader.pipeline.redact import DEFAULT_KEYS, Redactor, parse_keys
    keys = DEFAULT_KEYS if args.redact_keys is None else parse_keys(args.redact_keys)
    return [Redactor(keys)]


def kubernetes_names(args) -> list[Component]:
    """The metadata stage, when enabled (explicitly, or by --kubeconfig / in-cluster)."""
    from pyloader.k8s.watch import in_cluster
    on = args.k8s if args.k8s is not None else bool(args.kubeconfig) or in_cluster()
    if not on:
        return []
    if not args.node_name:
        raise ConfigError("Kubernetes metadata needs this node's name: --node-name or NODE_NAME")
    from pyloader.k8s.meta import K8sMeta
    from pyloader.k8s.watch import load_client
    return [K8sMeta(args.node_name, load_client(args.kubeconfig), all_pods=args.k8s_all_pods)]


def routes_and_metrics(args) -> list[Component]:
    """Route templates (always: the log gets http.route) and, with --metrics-addr,
    the Prometheus endpoint, which shares the route table."""
    from pyloader.pipeline.routes import RouteComponent, RouteTable
    table = RouteTable(args.route, max_routes=args.max_routes)
    comps: list[Component] = [RouteComponent(table)]
    if args.metrics_addr:
        from pyloader.output.metrics import MetricsComponent
        comps.append(MetricsComponent(args.metrics_addr, table))
    return comps


def stages(args) -> list[Component]:
    """Every stage `redtap run` uses, in pipeline order."""
    return [*redaction(args), *kubernetes_names(args), *routes_and_metrics(args)]

"""The kernel's own network counters, read around a test: independent
witnesses of the losses redtap reports (a segment dropped on a veth, a TCP
sender's retransmit, a receiver's out-of-order queue).

    before = snapshot(node, [ns, ...])
    ... traffic ...
    d = delta(before, snapshot(node, [ns, ...]))
    d["links"][ns][ifname] -> {"rx_dropped": .., "tx_dropped": ..}
    d["tcp"][ns]           -> {"RetransSegs": .., "TCPOFOQueue": .., ...}
    d["softnet_dropped"]   -> packets dropped by the per-CPU backlog queues
                              (netdev_max_backlog; the whole machine)
"""
from __future__ import annotations

import json

SNMP = ("RetransSegs",)
NETSTAT = ("TCPOFOQueue", "TCPOFODrop", "TCPRcvQDrop", "TCPBacklogDrop", "TCPLossProbes",
           "TCPSACKReorder", "TCPTSReorder", "TCPRenoReorder", "TCPTimeouts")


def _table(text: str, prefix: str) -> dict[str, int]:
    rows = [l.split() for l in text.splitlines() if l.startswith(prefix)]
    out: dict[str, int] = {}
    for names, values in zip(rows[0::2], rows[1::2]):
        out.update(zip(names[1:], map(int, values[1:])))
    return out


def softnet_dropped() -> int:
    """/proc/net/softnet_stat, second column (hex), summed over the CPUs."""
    with open("/proc/net/softnet_stat") as f:
        return sum(int(l.split()[1], 16) for l in f if l.strip())


def snapshot(node, namespaces: list[str]) -> dict:
    links, tcp = {}, {}
    for ns in namespaces:
        out = node.ns_exec(ns, "sh", "-c", "ip -j -s link show; echo '#'; "
                           "cat /proc/net/snmp /proc/net/netstat").stdout
        j, _, rest = out.partition("\n#\n")
        links[ns] = {l["ifname"]: {"rx_dropped": l["stats64"]["rx"]["dropped"],
                                   "tx_dropped": l["stats64"]["tx"]["dropped"]}
                     for l in json.loads(j)}
        snmp, netstat = _table(rest, "Tcp:"), _table(rest, "TcpExt:")
        tcp[ns] = {**{k: snmp[k] for k in SNMP}, **{k: netstat.get(k, 0) for k in NETSTAT}}
    return {"links": links, "tcp": tcp, "softnet_dropped": softnet_dropped()}


def delta(a: dict, b: dict) -> dict:
    return {
        "links": {ns: {dev: {k: v - a["links"][ns].get(dev, {}).get(k, 0) for k, v in c.items()}
                       for dev, c in devs.items()} for ns, devs in b["links"].items()},
        "tcp": {ns: {k: v - a["tcp"][ns][k] for k, v in c.items()} for ns, c in b["tcp"].items()},
        "softnet_dropped": b["softnet_dropped"] - a["softnet_dropped"],
    }

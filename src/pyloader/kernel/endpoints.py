"""Server endpoints to trace: parsing the flags and writing the kernel's maps.

One LPM trie lookup in the kernel matches, longest prefix first:
    IP:PORT  -> prefixlen 144 (128 address bits, 16 port bits)
    IP       -> 128
    CIDR     -> 96 + n for IPv4 (v4-mapped), n for IPv6
    wildcard -> 0 (trace everything)
The IP:PORT entries are also in an exact hash (`endpoint_ports`), which the
kernel looks up first: the trie only while entries without a port exist
(settings.trie_only), so the usual lookup is one hash lookup.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from pyloader.kernel import abi
from pyloader.kernel.abi import EndpointKey
from pyloader.errors import ConfigError


@dataclass(frozen=True)
class Endpoint:
    network: ipaddress.IPv6Network  # v4 stored v4-mapped
    port: int | None  # None: any port

    @property
    def prefixlen(self) -> int:
        if self.port is not None:
            return 144
        return self.network.prefixlen

    def key(self) -> bytes:
        k = EndpointKey()
        k.prefixlen = self.prefixlen
        k.addr[:] = self.network.network_address.packed
        port = self.port or 0
        k.port = int.from_bytes(port.to_bytes(2, "big"), "little")  # network order
        return bytes(k)

    def __str__(self) -> str:
        net = self.network
        if net.network_address.ipv4_mapped is not None:
            addr = str(net.network_address.ipv4_mapped)
            plen = net.prefixlen - 96
            host = plen == 32
        else:
            addr, plen, host = str(net.network_address), net.prefixlen, net.prefixlen == 128
        if self.port is not None:
            return f"[{addr}]:{self.port}" if ":" in addr else f"{addr}:{self.port}"
        if net.prefixlen == 0:
            return "*"
        return addr if host else f"{addr}/{plen}"


WILDCARD = Endpoint(ipaddress.IPv6Network("::/0"), None)


def _mapped(ip: ipaddress._BaseAddress) -> ipaddress.IPv6Address:
    if ip.version == 4:
        return ipaddress.IPv6Address("::ffff:" + str(ip))
    return ip


def parse_endpoint(text: str) -> Endpoint:
    """'198.18.0.10', '198.18.0.10:80', '198.18.0.0/24', '2001:db8::10',
    '[2001:db8::10]:80', '2001:db8::/64', '*'."""
    s = text.strip()
    if s in ("*", "all", "any"):
        return WILDCARD
    port = None
    try:
        if s.startswith("["):
            addr, close, rest = s[1:].partition("]")
            if not close:
                raise ValueError("missing ]")
            if rest:
                if not rest.startswith(":"):
                    raise ValueError("expected ]:PORT")
                port = int(rest[1:])
            s = addr
        elif s.count(":") == 1:
            s, p = s.split(":")
            port = int(p)
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port {port} out of range")
        if "/" in s:
            if port is not None:
                raise ValueError("a CIDR range takes no port (one LPM lookup matches address, then port)")
            net = ipaddress.ip_network(s, strict=False)
            base = _mapped(net.network_address)
            plen = net.prefixlen + (96 if net.version == 4 else 0)
            return Endpoint(ipaddress.IPv6Network(f"{base}/{plen}"), None)
        ip = _mapped(ipaddress.ip_address(s))
        return Endpoint(ipaddress.IPv6Network(f"{ip}/128"), port)
    except ValueError as e:
        raise ConfigError(f"bad endpoint {text!r}: {e}") from None


def host_addresses() -> set[ipaddress.IPv6Address]:
    """The addresses of this network namespace's interfaces (v4-mapped)."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        return {_mapped(ipaddress.ip_address(m.get_attr("IFA_ADDRESS")))
                for m in ipr.get_addr() if m.get_attr("IFA_ADDRESS")}


class EndpointTable:
    """The kernel's endpoint map, kept equal to a set of Endpoints.

    Each entry's value is a set of flags (enum endpoint_flags): EP_PORT when
    it names a port, EP_HOST when its address is one of @host_addrs (the
    node's own: a hostNetwork server, which pods reach through their veth the
    other way round). The settings map counts the EP_HOST entries and those
    without a port (only in the trie). @exact_map, the hash of the IP:PORT
    entries, is made equal to them too; while nothing is known to be set
    (current empty), whatever it holds is removed first."""

    def __init__(self, bpf_map, settings_map=None, host_addrs=lambda: set(), exact_map=None):
        self.map, self.settings, self.exact = bpf_map, settings_map, exact_map
        self.host_addrs = host_addrs  # () -> set of v4-mapped IPv6Address
        self.current: dict[Endpoint, int] = {}

    def flags(self, ep: Endpoint, host: set) -> int:
        f = abi.EP_TRACED | (abi.EP_PORT if ep.port is not None else 0)
        if ep.network.prefixlen == 128 and ep.network.network_address in host:
            f |= abi.EP_HOST
        return f

    @property
    def host_endpoints(self) -> list[Endpoint]:
        return sorted((ep for ep, f in self.current.items() if f & abi.EP_HOST), key=str)

    def set(self, endpoints) -> None:
        host = self.host_addrs() if endpoints else set()
        want = {ep: self.flags(ep, host) for ep in endpoints}
        trie_only = sum(1 for ep in want if ep.port is None)
        if trie_only > sum(1 for ep in self.current if ep.port is None):
            self._write_settings(want, trie_only)  # the trie is looked at before it fills
        if self.exact is not None and not self.current:
            for k in list(self.exact.keys()):
                self.exact.delete(k)
        # new entries reach the trie before the hash, old ones leave the hash
        # first: a lookup never finds the hash ahead of the trie's answer
        for ep, f in want.items():
            if self.current.get(ep) != f:
                self.map.update(ep.key(), bytes([f]))
                if self.exact is not None and ep.port is not None:
                    self.exact.update(ep.key(), bytes([f]))
        for ep in self.current.keys() - want.keys():
            if self.exact is not None and ep.port is not None:
                self.exact.delete(ep.key())
            self.map.delete(ep.key())
        self.current = want
        self._write_settings(want, trie_only)

    def _write_settings(self, want: dict, trie_only: int) -> None:
        if self.settings is not None:
            n = sum(1 for f in want.values() if f & abi.EP_HOST)
            self.settings.update((0).to_bytes(4, "little"),
                                 bytes(abi.Settings(host_endpoints=n, trie_only=trie_only)))

    def add(self, ep: Endpoint) -> None:
        self.set(self.current.keys() | {ep})

    def remove(self, ep: Endpoint) -> None:
        self.set(self.current.keys() - {ep})

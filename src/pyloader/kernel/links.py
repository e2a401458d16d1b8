"""The links of this network namespace and their masters, by one rtnetlink
dump on a socket of our own.

The bridge follower lists the bridge's ports every few seconds, for as long
as the agent runs. Through pyroute2 (0.9) every listing left some of its
decoded messages behind (issue 14: the agent's memory grew with time); this
reads the two attributes it needs from the raw dump and keeps nothing.
"""
from __future__ import annotations

import errno
import os
import socket
import struct

from pyloader.errors import RedtapError

RTM_NEWLINK, RTM_GETLINK = 16, 18
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFLA_IFNAME, IFLA_MASTER = 3, 10
NLMSG_HDR = struct.Struct("=IHHII")     # length, type, flags, seq, port id
IFINFOMSG = struct.Struct("=BxHiII")    # family, type, index, flags, change
RTA_HDR = struct.Struct("=HH")          # length, type
_U32 = struct.Struct("=I")


def _align(n: int) -> int:
    return (n + 3) & ~3


def parse_links(data: bytes, out: dict[int, tuple[str, int]]) -> bool:
    """Add the RTM_NEWLINK messages of one datagram to @out (ifindex -> (name,
    master ifindex or 0)); True once the dump's end is in it. A malformed
    message is an error, not a guess."""
    off = 0
    while off + NLMSG_HDR.size <= len(data):
        length, kind, _flags, _seq, _pid = NLMSG_HDR.unpack_from(data, off)
        if length < NLMSG_HDR.size or off + length > len(data):
            raise RedtapError(f"listing links: malformed netlink message (length {length})")
        body = off + NLMSG_HDR.size
        if kind == NLMSG_DONE:
            return True
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", data, body)[0]
            if code:
                raise RedtapError(f"listing links: [Errno {code}] {os.strerror(code)}")
        elif kind == RTM_NEWLINK and length >= NLMSG_HDR.size + IFINFOMSG.size:
            index = IFINFOMSG.unpack_from(data, body)[2]
            name, master = "", 0
            a, end = body + IFINFOMSG.size, off + length
            while a + RTA_HDR.size <= end:
                alen, atype = RTA_HDR.unpack_from(data, a)
                if alen < RTA_HDR.size or a + alen > end:
                    break  # a cut attribute: the rest of this message is unusable
                value = data[a + RTA_HDR.size:a + alen]
                if atype == IFLA_IFNAME:
                    name = value.split(b"\0", 1)[0].decode("utf-8", "replace")
                elif atype == IFLA_MASTER and len(value) >= 4:
                    master = _U32.unpack_from(value)[0]
                a += _align(alen)
            out[index] = (name, master)
        off += _align(length)
    return False


def links() -> dict[int, tuple[str, int]]:
    """ifindex -> (name, master ifindex or 0) of every link, now."""
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                           socket.NETLINK_ROUTE) as s:
            s.bind((0, 0))
            seq = 1
            s.send(NLMSG_HDR.pack(NLMSG_HDR.size + IFINFOMSG.size, RTM_GETLINK,
                                  NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
                   + IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0))
            out: dict[int, tuple[str, int]] = {}
            while not parse_links(s.recv(1 << 16), out):
                pass
            return out
    except OSError as e:
        code = e.errno or errno.EIO
        raise RedtapError(f"listing links: [Errno {code}] {os.strerror(code)}") from None


def ports_of(bridge_index: int) -> dict[int, str]:
    """ifindex -> name of the links enslaved to @bridge_index."""
    return {i: name for i, (name, master) in links().items() if master == bridge_index}

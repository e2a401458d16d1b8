"""kernel/links.py: the rtnetlink link dump the bridge follower rescans with."""
from __future__ import annotations

import json
import struct
import subprocess

import pytest

from pyloader.errors import RedtapError
from pyloader.kernel import links as L


def msg(kind: int, body: bytes) -> bytes:
    raw = L.NLMSG_HDR.pack(L.NLMSG_HDR.size + len(body), kind, 2, 1, 0) + body
    return raw + b"\0" * (-len(raw) % 4)


def attr(kind: int, value: bytes) -> bytes:
    raw = L.RTA_HDR.pack(L.RTA_HDR.size + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def link(index: int, name: bytes, master: int | None = None, extra: bytes = b"") -> bytes:
    body = L.IFINFOMSG.pack(0, 1, index, 0, 0) + attr(L.IFLA_IFNAME, name + b"\0") + extra
    if master is not None:
        body += attr(L.IFLA_MASTER, struct.pack("=I", master))
    return msg(L.RTM_NEWLINK, body)


DONE = msg(L.NLMSG_DONE, b"\0\0\0\0")


def test_the_dump_is_what_ip_link_shows():
    shown = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True,
                                      text=True, check=True).stdout)
    names = {l["ifindex"]: l["ifname"] for l in shown}
    got = L.links()
    assert {i: n for i, (n, _) in got.items()} == names
    masters = {l["ifindex"]: l.get("master") for l in shown}
    assert {i: (names.get(m) if m else None) for i, (_, m) in got.items()} == masters


def test_names_masters_other_attributes_and_the_end():
    out = {}
    data = link(1, b"lo") + link(7, b"veth0", 5, extra=attr(4, b"\x00" * 6)) + DONE
    assert L.parse_links(data, out) is True
    assert out == {1: ("lo", 0), 7: ("veth0", 5)}


def test_a_datagram_without_the_end_asks_for_more():
    out = {}
    assert L.parse_links(link(3, b"cni0"), out) is False and out == {3: ("cni0", 0)}


def test_a_kernel_error_carries_its_errno():
    with pytest.raises(RedtapError, match=r"\[Errno 1\] Operation not permitted"):
        L.parse_links(msg(L.NLMSG_ERROR, struct.pack("=i", -1) + b"\0" * 16), {})


@pytest.mark.parametrize("cut", [1, 5, 17, 20, 30])
def test_a_message_cut_short_is_an_error_and_adds_nothing(cut):
    out = {}
    with pytest.raises(RedtapError, match="malformed netlink message"):
        L.parse_links(link(9, b"veth9", 2)[:-cut], out)  # its length runs past the data
    assert out == {}


def test_an_attribute_running_past_its_message_ends_the_message():
    lying = bytearray(link(9, b"veth9", 2))
    struct.pack_into("=H", lying, L.NLMSG_HDR.size + L.IFINFOMSG.size, 200)  # the name's length
    out = {}
    assert L.parse_links(bytes(lying) + link(4, b"eth0") + DONE, out) is True
    assert out == {9: ("", 0), 4: ("eth0", 0)}  # the next message still read

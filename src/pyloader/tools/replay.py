"""`redtap replay FILE`: a capture through the same kernel program, offline.

Every packet goes through BPF_PROG_TEST_RUN of redtap_req (client ->
server) or redtap_resp (server -> client) with the capture's timestamp in
skb->tstamp (the object is loaded with clock_from_skb), so `time` and the
durations come from the capture. The same JSON lines as `redtap run`.
Servers: --endpoint, or by default every (address, port) that sent a status
line. Ethernet (with VLAN/QinQ tags), Linux cooked (SLL, SLL2), raw IP and
BSD loopback captures; pcap and pcapng.
"""
from __future__ import annotations

import ctypes
import ipaddress
import struct
import sys

from pyloader.kernel import abi
from pyloader.output.accesslog import AccessLog
from pyloader.pipeline.record import Clock, RecordBuilder
from pyloader.kernel.endpoints import Endpoint, parse_endpoint
from pyloader.errors import RedtapError
from pyloader.libbpf.ringbuf import RingBuffer
from pyloader.kernel.tracer import Tracer

ETH_IP, ETH_IP6 = 0x0800, 0x86DD
VLAN_TYPES = (0x8100, 0x88A8, 0x9100)
METHODS = tuple(m.encode() + b" " for m in abi.METHODS if m)


class SkBuff(ctypes.Structure):
    """struct __sk_buff (UAPI), as BPF_PROG_TEST_RUN takes it for its ctx."""
    u32 = ctypes.c_uint32
    _fields_ = [("len", u32), ("pkt_type", u32), ("mark", u32), ("queue_mapping", u32),
                ("protocol", u32), ("vlan_present", u32), ("vlan_tci", u32), ("vlan_proto", u32),
                ("priority", u32), ("ingress_ifindex", u32), ("ifindex", u32), ("tc_index", u32),
                ("cb", u32 * 5), ("hash", u32), ("tc_classid", u32), ("data", u32),
                ("data_end", u32), ("napi_id", u32), ("family", u32), ("remote_ip4", u32),
                ("local_ip4", u32), ("remote_ip6", u32 * 4), ("local_ip6", u32 * 4),
                ("remote_port", u32), ("local_port", u32), ("data_meta", u32),
                ("flow_keys", ctypes.c_uint64), ("tstamp", ctypes.c_uint64), ("wire_len", u32),
                ("gso_segs", u32), ("sk", ctypes.c_uint64), ("gso_size", u32),
                ("tstamp_type", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3),
                ("hwtstamp", ctypes.c_uint64)]


def _l3(linktype: int, buf: bytes) -> tuple[int, bytes] | None:
    """(ethertype, IP packet) of one captured frame, or None."""
    import dpkt  # here: `redtap run` builds this command's parser, needs no dpkt
    if linktype == dpkt.pcap.DLT_EN10MB:
        if len(buf) < 14:
            return None
        etype, off = struct.unpack_from("!H", buf, 12)[0], 14
        while etype in VLAN_TYPES and len(buf) >= off + 4:
            etype, off = struct.unpack_from("!H", buf, off + 2)[0], off + 4
        return etype, buf[off:]
    if linktype == dpkt.pcap.DLT_LINUX_SLL:
        return (struct.unpack_from("!H", buf, 14)[0], buf[16:]) if len(buf) >= 16 else None
    if linktype == 276:  # LINUX_SLL2
        return (struct.unpack_from("!H", buf, 0)[0], buf[20:]) if len(buf) >= 20 else None
    if linktype in (dpkt.pcap.DLT_RAW, 12, 14, 101):
        if not buf:
            return None
        return (ETH_IP if buf[0] >> 4 == 4 else ETH_IP6), buf
    if linktype in (dpkt.pcap.DLT_NULL, dpkt.pcap.DLT_LOOP):
        if len(buf) < 4:
            return None
        fam = struct.unpack_from("<I" if linktype == dpkt.pcap.DLT_NULL else "!I", buf)[0]
        return (ETH_IP if fam == 2 else ETH_IP6), buf[4:]
    return None


def read_capture(path: str):
    """Yield (timestamp_ns, ethernet_frame) for every IP frame of a capture."""
    import dpkt  # here: `redtap run` builds this command's parser, needs no dpkt
    try:
        f = open(path, "rb")
    except OSError as e:
        raise RedtapError(f"reading {path}: {e.strerror}") from None
    with f:
        try:
            magic = f.read(4)
            f.seek(0)
            reader = dpkt.pcapng.Reader(f) if magic == b"\x0a\x0d\x0d\x0a" else dpkt.pcap.Reader(f)
            linktype = reader.datalink()
            for ts, buf in reader:
                l3 = _l3(linktype, bytes(buf))
                if l3 is None or l3[0] not in (ETH_IP, ETH_IP6):
                    continue
                frame = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01" + struct.pack("!H", l3[0]) + l3[1]
                # pcap times are microseconds (or ns, but dpkt gives a float):
                # round to the microsecond, what the float holds exactly
                yield int(round(float(ts) * 1e6)) * 1000, frame
        except (ValueError, dpkt.dpkt.NeedData, dpkt.dpkt.UnpackError) as e:
            raise RedtapError(f"reading {path}: not a readable pcap/pcapng capture ({e})") from None


def _tcp(frame: bytes):
    """(src, dst, sport, dport, payload) of a TCP frame, or None."""
    import dpkt  # here: `redtap run` builds this command's parser, needs no dpkt
    try:
        eth = dpkt.ethernet.Ethernet(frame)
        ip = eth.data
        if not isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)) or not isinstance(ip.data, dpkt.tcp.TCP):
            return None
        return (ipaddress.ip_address(ip.src), ipaddress.ip_address(ip.dst), ip.data.sport,
                ip.data.dport, bytes(ip.data.data))
    except (dpkt.dpkt.UnpackError, dpkt.dpkt.NeedData, ValueError, AttributeError):
        return None


MAX_FRAME = 3000  # BPF_PROG_TEST_RUN takes about a page of packet data
SEG_PAYLOAD = 1400


def resegment(frame: bytes) -> list[bytes]:
    """A frame too big for BPF_PROG_TEST_RUN (a capture taken with TSO/GRO)
    as the TCP segments it stands for: same bytes, consecutive sequence
    numbers, FIN/PSH only on the last."""
    if len(frame) <= MAX_FRAME:
        return [frame]
    etype = struct.unpack_from("!H", frame, 12)[0]
    if etype == ETH_IP:
        ihl = (frame[14] & 0x0F) * 4
        l4 = 14 + ihl
        if frame[23] != 6:
            return []
    elif etype == ETH_IP6 and frame[20] == 6:
        l4 = 14 + 40
    else:
        return []
    doff = (frame[l4 + 12] >> 4) * 4
    head, payload = bytearray(frame[:l4 + doff]), frame[l4 + doff:]
    seq0, flags = struct.unpack_from("!I", frame, l4 + 4)[0], frame[l4 + 13]
    out = []
    for off in range(0, len(payload), SEG_PAYLOAD):
        chunk = payload[off:off + SEG_PAYLOAD]
        h = bytearray(head)
        struct.pack_into("!I", h, l4 + 4, (seq0 + off) & 0xFFFFFFFF)
        last = off + SEG_PAYLOAD >= len(payload)
        h[l4 + 13] = flags if last else flags & ~0x09  # FIN, PSH on the last only
        if etype == ETH_IP:
            struct.pack_into("!H", h, 16, ihl + doff + len(chunk))
        else:
            struct.pack_into("!H", h, 18, doff + len(chunk))
        out.append(bytes(h) + chunk)
    return out


def guess_servers(packets) -> set[tuple]:
    """The (address, port) ends that sent status lines; if none, the ends
    that received request lines."""
    senders, receivers = set(), set()
    for _, frame in packets:
        t = _tcp(frame)
        if t is None:
            continue
        src, dst, sport, dport, payload = t
        if payload.startswith(b"HTTP/1."):
            senders.add((src, sport))
        elif payload.startswith(METHODS):
            receivers.add((dst, dport))
    return senders or receivers


def _matches(eps: list[Endpoint], addr, port: int) -> bool:
    a = ipaddress.IPv6Address("::ffff:" + str(addr)) if addr.version == 4 else addr
    return any(a in e.network and (e.port is None or e.port == port) for e in eps)


def replay(path: str, endpoints: list[Endpoint] | None, log_path: str | None,
           bpf_object: str | None = None) -> dict:
    """Replay a capture; returns the kernel counters."""
    packets = list(read_capture(path))
    if not endpoints:
        endpoints = [parse_endpoint(f"[{a}]:{p}" if a.version == 6 else f"{a}:{p}")
                     for a, p in sorted(guess_servers(packets), key=str)]
    tracer = Tracer.load(bpf_object, clock_from_skb=True, wakeup_bytes=1 << 30)
    rb = RingBuffer(tracer.events_fd)
    out = AccessLog(log_path)
    clock = Clock()
    clock.offset_ns = 0  # event times are the capture's (epoch) times
    clock.sync = lambda: None
    builder = RecordBuilder(clock)
    ctx = SkBuff()
    try:
        tracer.endpoints.set(endpoints)
        last_ts = 0
        for ts, frame in packets:
            t = _tcp(frame)
            if t is None:
                continue
            src, dst, sport, dport, _ = t
            if _matches(endpoints, dst, dport):
                prog = tracer.req
            elif _matches(endpoints, src, sport):
                prog = tracer.resp
            else:
                continue
            ctx.tstamp = ts
            for seg in resegment(frame):
                prog.test_run(seg, bytes(ctx))
            last_ts = max(last_ts, ts)
            for raw in rb.consume():
                out.record(builder.build(abi.decode_event(raw)))
        for raw in rb.consume():
            out.record(builder.build(abi.decode_event(raw)))
        # requests still pending when the capture ends: unanswered
        for ev in sorted(tracer.take_pending(last_ts), key=lambda e: e[0]):
            out.record(builder.build(ev))
        out.flush()
        return tracer.stats()
    finally:
        rb.close()
        out.close()
        tracer.close()


def main(args) -> int:
    eps = [parse_endpoint(e) for e in args.endpoint]
    counters = replay(args.file, eps, args.log, args.bpf_object)
    losses = {k: v for k, v in counters.items() if k in abi.LOSS_STATS and v}
    if losses:
        print(f"redtap replay: {losses}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("replay", help="run a pcap/pcapng capture through the kernel program",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("file", help="capture file (pcap or pcapng)")
    p.add_argument("--endpoint", action="append", default=[], metavar="IP[:PORT]|CIDR",
                   help="server endpoint (repeatable); default: the ends that sent status lines")
    p.add_argument("--log", default=None, metavar="PATH", help="output file (default stdout)")
    p.add_argument("--bpf-object", default=None, help="BPF object to load")
    p.set_defaults(func=main)

"""The Python mirror of src/bpf/redtap.h (event, keys, connection state).

redtap.h is the single source of truth; tests/unit/test_abi_btf.py checks
every structure, field offset and enum value here against the BTF of the
built object, so the two cannot drift.
"""
from __future__ import annotations

import ctypes
import struct
from collections import namedtuple

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

MAX_URL_LEN = 256
MAX_PIPELINE = 128
MAX_CONNS = 65536
MAX_PENDING = 65536
MAX_ENDPOINTS = 16384

METHODS = ("", "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
           "_OTHER")
M_OTHER = 10
METHOD_NAME_LEN = 16

EV_URL_TRUNCATED, EV_UNANSWERED = 1, 2
EV_RESP_END, EV_REQ_BODY, EV_RESP_BODY = 8, 16, 32
REASONS = ("", "reset", "server_closed", "idle", "lost")
R_IDLE, R_LOST = 3, 4

# enum stat_idx, in order: (name in the stats lines, C enumerator; checked against BTF)
STAT_TABLE = (
    ("traced_segments", "S_TRACED_SEGMENTS"), ("requests", "S_REQUESTS"),
    ("responses", "S_RESPONSES"), ("interim_responses", "S_INTERIM"), ("events", "S_EVENTS"),
    ("ringbuf_full", "S_RINGBUF_FULL"), ("fifo_overflow", "S_FIFO_OVERFLOW"),
    ("overflow_responses", "S_OVERFLOW_RESPONSES"),
    ("unmatched_responses", "S_UNMATCHED_RESPONSE"), ("parse_failed", "S_PARSE_FAILED"),
    ("retransmits", "S_RETRANSMIT"), ("gaps", "S_GAP"), ("conn_map_full", "S_CONN_MAP_FULL"),
    ("pending_map_full", "S_PENDING_MAP_FULL"), ("requests_evicted", "S_REQ_EVICTED"),
    ("unanswered", "S_UNANSWERED"), ("pending_pushed", "S_PENDING_PUSHED"),
    ("pending_popped", "S_PENDING_POPPED"), ("header_too_long", "S_HEADER_TOO_LONG"),
    ("unsupported_framing", "S_UNSUPPORTED_FRAMING"), ("resync_dropped", "S_RESYNC_DROPPED"),
    ("early_responses", "S_EARLY_RESPONSE"), ("chunked_bodies", "S_CHUNKED"),
    ("connections_given_up", "S_GIVEN_UP"), ("concurrent_segments", "S_CONCURRENT"),
    ("reordered_segments", "S_REORDERED"),
)
STATS = tuple(name for name, _ in STAT_TABLE)
# counters that mean something was lost or not understood
LOSS_STATS = ("ringbuf_full", "fifo_overflow", "overflow_responses", "unmatched_responses",
              "parse_failed", "gaps", "conn_map_full", "pending_map_full", "requests_evicted",
              "header_too_long", "unsupported_framing", "resync_dropped", "early_responses",
              "connections_given_up", "concurrent_segments")


class EndpointKey(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("prefixlen", u32), ("addr", u8 * 16), ("port", u16)]


# enum endpoint_flags: the endpoint map's values
EP_TRACED, EP_PORT, EP_HOST = 1, 2, 4


class Settings(ctypes.Structure):
    _fields_ = [("host_endpoints", u32), ("trie_only", u32)]


class ConnKey(ctypes.Structure):
    _fields_ = [("caddr", u8 * 16), ("saddr", u8 * 16), ("cport", u16), ("sport", u16),
                ("pad", u32)]


class StreamState(ctypes.Structure):
    _fields_ = [("body_left", u64), ("hdr_cl", u64), ("body_seen", u64), ("last_data_ns", u64),
                ("hdr_w0", u64), ("hdr_w1", u64), ("next_seq", u32), ("line_len", u32),
                ("mode", u8), ("seq_valid", u8), ("hdr_flags", u8), ("partial_len", u8),
                ("partial", u8 * 11), ("body_gap", u8), ("busy", u32), ("pad", u32)]


class ReqKey(ctypes.Structure):
    _fields_ = [("conn", ConnKey), ("seq", u32), ("pad", u32)]


class PendingReq(ctypes.Structure):
    _fields_ = [("ts_ns", u64), ("req_body", u32), ("url_len", u16), ("method", u8),
                ("version", u8), ("flags", u8), ("pad", u8 * 7),
                ("method_name", ctypes.c_char * METHOD_NAME_LEN),
                ("url", ctypes.c_char * MAX_URL_LEN)]


class ConnState(ctypes.Structure):
    _fields_ = [("req", StreamState), ("resp", StreamState), ("last_ns", u64),
                ("resp_first_ns", u64), ("head", u32), ("tail", u32), ("overflow", u32),
                ("check_idx", u32), ("check_seq", u32), ("resp_status", u16),
                ("resp_method", u8), ("req_pushed", u8), ("check_on", u8), ("pipelined", u8),
                ("lost_pending", u8), ("pad", u8), ("lost_until", u32),
                ("inline_seq", u32), ("inline_used", u32), ("inline_req", PendingReq)]


INLINE_HELD = 1  # enum inline_slot: conn_state.inline_req holds request inline_seq


class HttpEvent(ctypes.Structure):
    _fields_ = [("req_ns", u64), ("resp_ns", u64), ("resp_last_ns", u64), ("req_body", u64),
                ("resp_body", u64), ("conn", ConnKey), ("status", u16),
                ("url_len", u16), ("method", u8), ("version", u8), ("flags", u8),
                ("reason", u8), ("ifindex", u32), ("pad", u32),
                ("method_name", ctypes.c_char * METHOD_NAME_LEN),
                ("url", ctypes.c_char * MAX_URL_LEN)]


# Fast decoding of a ringbuf record: one struct.unpack_from per event.
# Field order follows HttpEvent (checked by tests against ctypes and BTF).
EVENT_STRUCT = struct.Struct("<QQQQQ16s16sHH4xHHBBBBI4x16s256s")
EVENT_FIELDS = ("req_ns", "resp_ns", "resp_last_ns", "req_body", "resp_body", "caddr", "saddr",
                "cport", "sport", "status", "url_len", "method", "version", "flags", "reason",
                "ifindex", "method_name", "url")
# an event as the pipeline sees it (decode_event gives plain tuples in this order)
Event = namedtuple("Event", EVENT_FIELDS)
EVENT_SIZE = EVENT_STRUCT.size
assert EVENT_SIZE == ctypes.sizeof(HttpEvent)


def decode_event(raw: bytes) -> tuple | None:
    """The event's fields as a tuple in EVENT_FIELDS order; None if the
    record is not a whole event (counted by the caller)."""
    if len(raw) < EVENT_SIZE:
        return None
    return EVENT_STRUCT.unpack_from(raw)

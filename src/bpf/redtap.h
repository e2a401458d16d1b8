/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* redtap.h: the ABI shared by the TC program and the Python agent.
 *
 * This header is the single source of truth for the event layout, the
 * counter indices and the map keys. src/pyloader/abi.py mirrors it with
 * ctypes and tests/unit/test_abi_btf.py checks that mirror against the
 * BTF of the built object, so the two cannot drift.
 * Only fixed-width __u* types here (usable from vmlinux.h and linux/types.h).
 */
#ifndef __REDTAP_H
#define __REDTAP_H

#define MAX_URL_LEN      256   /* request-target bytes kept per request      */
#define MAX_PIPELINE     128   /* pending (pipelined) requests per connection */
#define MAX_CONNS        65536 /* tracked TCP connections (LRU)               */
#define MAX_PENDING      65536 /* requests waiting for a response, all connections */
#define MAX_ENDPOINTS    16384 /* endpoint filter entries                     */
#define SCAN_WINDOW      512   /* bytes of a message scanned per window       */
#define MAX_WINDOWS      8     /* windows per message head: 4 kB headers      */
#define MAX_STEPS_PER_SEG 96   /* framing steps (heads, bodies, chunks) per segment */

/* HTTP methods (RFC 9110 section 9 plus PATCH). 0 = unknown. */
enum http_method {
	M_UNKNOWN = 0,
	M_GET,
	M_HEAD,
	M_POST,
	M_PUT,
	M_DELETE,
	M_CONNECT,
	M_OPTIONS,
	M_TRACE,
	M_PATCH,
	M_OTHER,   /* an extension method: its name in method_name */
};

#define METHOD_NAME_LEN 16

/* event.flags */
#define EV_URL_TRUNCATED (1 << 0) /* request-target longer than MAX_URL_LEN or split */
#define EV_UNANSWERED    (1 << 1) /* no response: see event.reason                  */
#define EV_RESP_END      (1 << 3) /* resp_last_ns holds the last response byte's time */
#define EV_REQ_BODY      (1 << 4) /* req_body is known                               */
#define EV_RESP_BODY     (1 << 5) /* resp_body is known                              */

/* event.reason, for EV_UNANSWERED events */
enum unanswered_reason {
	R_NONE = 0,
	R_RESET,       /* RST on the connection                  */
	R_SERVER_FIN,  /* server closed without answering        */
	R_IDLE,        /* idle past the agent's timeout (user space) */
	R_LOST,        /* the response was not seen: data missing from the stream */
};

/* Per-CPU counters: index into the `stats` map. Every kernel-side loss or
 * anomaly has one; user space sums the CPUs and reports them. */
enum stat_idx {
	S_TRACED_SEGMENTS = 0,    /* TCP segments with payload of traced endpoints */
	S_REQUESTS,           /* request lines recognised                     */
	S_RESPONSES,          /* final status lines recognised                */
	S_INTERIM,            /* 1xx interim responses (never pop a request)  */
	S_EVENTS,             /* events submitted to the ringbuf              */
	S_RINGBUF_FULL,       /* events lost: ringbuf reserve failed          */
	S_FIFO_OVERFLOW,      /* requests dropped: MAX_PIPELINE pending already */
	S_OVERFLOW_RESPONSES, /* responses of dropped requests (skipped)      */
	S_UNMATCHED_RESPONSE, /* status line with no pending request          */
	S_PARSE_FAILED,       /* in-sync stream where no HTTP message started */
	S_RETRANSMIT,         /* segments whose data was already seen         */
	S_GAP,                /* segments after missing data (stream resync)  */
	S_CONN_MAP_FULL,      /* connection state could not be created        */
	S_PENDING_MAP_FULL,   /* a pending request could not be stored        */
	S_REQ_EVICTED,        /* pending request evicted (LRU) before its
			       * response: not reported                       */
	S_UNANSWERED,         /* requests reported without response (kernel)  */
	S_PENDING_PUSHED,     /* requests queued   (pushed - popped - live =   */
	S_PENDING_POPPED,     /* requests dequeued  pending lost to eviction)  */
	S_HEADER_TOO_LONG,    /* message head longer than the scan limit       */
	S_UNSUPPORTED_FRAMING,/* body framing not followed (resync on next msg)*/
	S_RESYNC_DROPPED,     /* pending requests given up when the response
			       * stream lost sync (reported, reason R_LOST)    */
	S_EARLY_RESPONSE,     /* response sent before its server had received the
			       * request it would pair with: skipped           */
	S_CHUNKED,            /* chunked bodies followed to their end          */
	S_GIVEN_UP,           /* pipelining connections that lost sync: no longer
			       * followed (their pending requests: R_LOST)     */
	S_CONCURRENT,         /* segments skipped: another CPU was walking the
			       * same direction of the connection too long     */
	S_REORDERED,          /* segments that overtook an earlier one on the
			       * way to the hook and waited for it (not lost)  */
	S_NR,
};

/* Endpoint filter: LPM trie key (also the key of the exact IP:PORT hash,
 * prefixlen 144 there). Address first, then port, so that one
 * lookup with the full key matches, longest first:
 *   IP:PORT -> prefixlen 144, IP -> 128, CIDR -> 96+n (v4) or n (v6),
 *   everything (wildcard) -> 0.
 * IPv4 is stored v4-mapped (::ffff:a.b.c.d). Port in network byte order. */
struct endpoint_key {
	__u32 prefixlen;
	__u8 addr[16];
	__u16 port;
} __attribute__((packed));

/* Endpoint map values: flags written by user space. */
enum endpoint_flags {
	EP_TRACED = 1, /* every entry                                       */
	EP_PORT   = 2, /* the entry names a port: an exact server match      */
	EP_HOST   = 4, /* the address is the node's own: a server of the host
			* stack (hostNetwork), reached by pods through their veth
			* the other way round (see redtap.bpf.c)              */
};

/* Settings written by user space: array map, one entry. */
struct settings {
	__u32 host_endpoints; /* entries with EP_HOST (0: pod-side hooks skip
			       * the second lookup)                            */
	__u32 trie_only;      /* entries without a port (IP, CIDR, wildcard):
			       * only in the trie (0: a miss in the exact hash
			       * of IP:PORT entries is final)                   */
};

/* Connection key: the TCP 4-tuple, always client -> server. */
struct conn_key {
	__u8 caddr[16];  /* client address (v4-mapped for IPv4) */
	__u8 saddr[16];  /* server address                      */
	__u16 cport;     /* host byte order                     */
	__u16 sport;
	__u32 pad;
};

/* Per-direction stream state inside a connection. */
enum stream_mode {
	SM_HEAD = 0,    /* next byte starts a message                         */
	SM_HEADERS,     /* inside a message head that continues in the next segment */
	SM_BODY,        /* body bytes still to skip: body_left                */
	SM_UNTIL_CLOSE, /* close-delimited body: everything until FIN         */
	SM_UNSYNC,      /* lost track: look for a message at segment starts   */
	SM_TUNNEL,      /* after 101 / CONNECT 2xx: not HTTP any more         */
	SM_PARTIAL,     /* the segment ended within a message's first bytes:
			 * they wait in partial[] for the next segment        */
	SM_CHUNK_SIZE,  /* chunked body: reading a chunk-size line            */
	SM_CHUNK_DATA,  /* chunked body: body_left bytes of chunk data + CRLF */
};

/* stream_state.hdr_flags in SM_HEADERS: the facts a head scan found so far
 * (also head_scan.flags: the first three), and how to go on with a head
 * parked at a segment's end. */
#define HF_CONTENT_LENGTH (1 << 0)
#define HF_CHUNKED        (1 << 1)
#define HF_BAD_LENGTH     (1 << 2)  /* unparseable or conflicting Content-Length  */
#define HF_TRAILER        (1 << 3)  /* parked head: the trailer section of a chunked body */
#define HF_IN_CL          (1 << 4)  /* parked head: inside a Content-Length value */
#define HF_IN_TE          (1 << 5)  /* parked head: on a Transfer-Encoding line   */
#define HF_IN_START       (1 << 6)  /* parked head: still on the start line       */
#define HF_NO_BODY        (1 << 7)  /* parked head of a message without body      */

/* stream_state.hdr_flags in SM_CHUNK_SIZE, while reading a chunk-size line */
#define CF_DIGIT  (1 << 0)  /* a hex digit was read          */
#define CF_EXT    (1 << 1)  /* in a chunk extension (;...)   */

/* stream_state.line_len in SM_HEADERS: bytes of the current line so far,
 * or'ed with LINE_COLON; or LINE_UNKNOWN, not known (a head parked on its
 * start line; head_scan.line_start uses it the same way). */
#define LINE_UNKNOWN 0x80000000u
#define LINE_COLON   0x40000000u /* the line's ':' was seen */

struct stream_state {
	__u64 body_left;   /* SM_BODY, SM_CHUNK_DATA: bytes still to skip;
			    * SM_PARTIAL: time of the message's first byte    */
	__u64 hdr_cl;      /* SM_HEADERS: Content-Length seen so far;
			    * SM_CHUNK_SIZE: the chunk size read so far        */
	__u64 body_seen;   /* body bytes of the current message so far        */
	__u64 last_data_ns;/* last segment with new data in this direction    */
	__u64 hdr_w0;      /* SM_HEADERS: the head scan's last 16 bytes ...   */
	__u64 hdr_w1;
	__u32 next_seq;    /* TCP sequence number after the last byte seen    */
	__u32 line_len;    /* SM_HEADERS: bytes of the current line so far    */
	__u8 mode;         /* enum stream_mode                                */
	__u8 seq_valid;    /* next_seq holds a value                          */
	__u8 hdr_flags;    /* SM_HEADERS: HF_*; SM_CHUNK_SIZE: CF_*           */
	__u8 partial_len;  /* SM_PARTIAL: bytes in partial[]                  */
	__u8 partial[11];  /* SM_PARTIAL: a message's first bytes             */
	__u8 body_gap;     /* bytes of the current body were not seen         */
	__u32 busy;        /* a CPU is walking this direction (claim())       */
	__u32 pad;
};

/* A connection's FIFO of pending requests: the numbers head..tail-1 in
 * its conn_state; each request waits in the connection's inline slot
 * (conn_state.inline_req: the usual one in flight) or, when that holds
 * another, in the `pending` LRU map, keyed by (connection, number). */
struct req_key {
	struct conn_key conn;
	__u32 seq;         /* request number on the connection */
	__u32 pad;
};

struct pending_req {
	__u64 ts_ns;       /* first request byte (bpf_ktime_get_ns)      */
	__u32 req_body;    /* request body bytes (saturated at 2^32-1)   */
	__u16 url_len;     /* bytes of url used                          */
	__u8 method;
	__u8 version;
	__u8 flags;        /* EV_URL_TRUNCATED, EV_REQ_BODY              */
	__u8 pad[7];
	char method_name[METHOD_NAME_LEN]; /* M_OTHER only               */
	char url[MAX_URL_LEN];
};

/* Value of the `conns` LRU map, keyed by the 4-tuple. */
struct conn_state {
	struct stream_state req;   /* client -> server */
	struct stream_state resp;  /* server -> client */
	__u64 last_ns;             /* last segment with payload                   */
	__u64 resp_first_ns;       /* the response in progress (to request head): */
	__u32 head;                /* FIFO: requests head..tail-1 are pending     */
	__u32 tail;
	__u32 overflow;            /* dropped requests whose responses are still to come */
	__u32 check_idx;           /* request number whose response is checked    */
	__u32 check_seq;           /* TCP sequence of that request's first byte   */
	__u16 resp_status;         /*   its status; 0 = none in progress          */
	__u8 resp_method;          /*   and the method of the request it answers  */
	__u8 req_pushed;           /* the request whose body is being read is queued */
	__u8 check_on;             /* 1: check check_idx by ACK; 2: the next one  */
	__u8 pipelined;            /* a request was sent before the previous one's answer */
	__u8 lost_pending;         /* requests before lost_until: answers lost, to report */
	__u8 pad;
	__u32 lost_until;          /*   (by the response side: the only one that pops)   */
	__u32 inline_seq;          /* the request number in inline_req            */
	__u32 inline_used;         /* INLINE_*: what inline_req holds             */
	struct pending_req inline_req; /* a pending request kept in the connection */
};

/* conn_state.inline_used: the request side takes a free slot (FREE ->
 * FILLING), fills it and publishes it (-> HELD); the side that pops frees it. */
enum inline_slot { INLINE_FREE = 0, INLINE_HELD = 1, INLINE_FILLING = 2 };

struct http_event {
	__u64 req_ns;        /* CLOCK_MONOTONIC (bpf_ktime_get_ns) of the first request byte */
	__u64 resp_ns;       /* first response byte; when unanswered: when it was given up    */
	__u64 resp_last_ns;  /* last response byte (EV_RESP_END)                              */
	__u64 req_body;      /* request body bytes (EV_REQ_BODY)                              */
	__u64 resp_body;     /* response body bytes (EV_RESP_BODY)                            */
	struct conn_key conn;
	__u16 status;        /* response status code; 0 when unanswered */
	__u16 url_len;       /* bytes of url used                        */
	__u8 method;         /* enum http_method                         */
	__u8 version;        /* 10 or 11 (HTTP/1.0, HTTP/1.1); 0 unknown */
	__u8 flags;          /* EV_*                                     */
	__u8 reason;         /* enum unanswered_reason                   */
	__u32 ifindex;       /* interface the response (or reset) was seen on */
	__u32 pad;
	char method_name[METHOD_NAME_LEN]; /* M_OTHER only: the method as sent */
	char url[MAX_URL_LEN];
};

#endif /* __REDTAP_H */

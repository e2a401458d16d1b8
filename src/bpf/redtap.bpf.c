// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* redtap.bpf.c: HTTP/1.x request/response pairing at the TC hook.
 *
 * Two programs share the maps:
 *   redtap_req  parses requests  (client -> server): attach where packets go
 *               TO local servers (egress of a pod's host-side veth);
 *   redtap_resp parses responses (server -> client): attach where packets
 *               come FROM local servers (ingress of a pod's host-side veth).
 * So each request to a local server is seen exactly once, wherever the
 * client is. Both always return TC_ACT_UNSPEC: packets are never changed
 * or dropped, and the next filter on the hook still runs.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "redtap.h"
#include "parse.bpf.h"
#include "http.bpf.h"

#define TC_ACT_UNSPEC_ (-1)

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Wake the consumer only when this much data waits; it also polls on a
 * timer, so small amounts are picked up within its poll interval. */
const volatile __u32 wakeup_bytes = 256 * 1024;

/* Keep every ABI type in the object's BTF: tests/unit/test_abi_btf.py
 * checks the Python mirror (src/pyloader/abi.py) against it. */
struct http_event *abi_http_event __attribute__((unused));
enum stat_idx abi_stat_idx __attribute__((unused));
enum http_method abi_http_method __attribute__((unused));
enum unanswered_reason abi_reason __attribute__((unused));
enum stream_mode abi_stream_mode __attribute__((unused));

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_ENDPOINTS);
	__type(key, struct endpoint_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_CONNS);
	__type(key, struct conn_key);
	__type(value, struct conn_state);
} conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_PENDING_URLS);
	__type(key, struct url_key);
	__type(value, struct url_val);
} pending_urls SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 * 1024 * 1024);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, S_NR);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* per-CPU scratch space: too big for the 512-byte stack */
struct scratch {
	__u8 hdr[32];          /* first bytes of a message */
	struct head_scan scan;
	struct url_key ukey;
	struct url_val url;
	struct conn_state conn;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch_map SEC(".maps");

static __always_inline void stat_add(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);

	if (v)
		*v += n;
}
#define stat_inc(idx) stat_add(idx, 1)

/* Send one request (answered or not) to user space. The request-target
 * waiting in pending_urls is moved into the event. */
#define WHERE(reason, ifindex) ((__u64)(reason) << 32 | (__u32)(ifindex))
/* @where: WHERE(enum unanswered_reason, ifindex of the interface) */
__noinline int emit(struct conn_key *key, struct pending_req *r, __u16 status,
		    __u64 resp_ns, __u64 where)
{
	__u8 reason = where >> 32;
	struct url_key uk = {};
	struct http_event *e;
	struct url_val *u;

	if (!key || !r)
		return 0;
	uk.conn = *key;
	uk.seq = r->seq;
	u = bpf_map_lookup_elem(&pending_urls, &uk);

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		stat_inc(S_RINGBUF_FULL);
		goto out;
	}
	e->req_ns = r->ts_ns;
	e->resp_ns = resp_ns;
	e->conn = *key;
	e->status = status;
	e->method = r->method;
	e->version = r->version;
	e->flags = r->flags;
	e->reason = reason;
	e->ifindex = (__u32)where;
	e->pad = 0;
	if (reason)
		e->flags |= EV_UNANSWERED;
	if (u) {
		e->url_len = u->len > MAX_URL_LEN ? MAX_URL_LEN : u->len;
		__builtin_memcpy(e->url, u->url, MAX_URL_LEN);
	} else {
		e->url_len = 0;
		e->flags |= EV_URL_LOST;
		stat_inc(S_URL_LOST);
	}
	/* reserve -> fill -> submit; wake the reader only for a batch */
	__u64 avail = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	bpf_ringbuf_submit(e, avail >= wakeup_bytes ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
	stat_inc(S_EVENTS);
	if (reason)
		stat_inc(S_UNANSWERED);
out:
	if (u)
		bpf_map_delete_elem(&pending_urls, &uk);
	return 0;
}

/* Report every pending request of a closing connection as unanswered;
 * resp_ns of such an event is the time it was given up. */
static __always_inline void flush_pending(struct conn_key *key, struct conn_state *c,
					  __u8 reason, __u32 ifindex, __u64 now)
{
	for (int i = 0; i < FIFO_DEPTH; i++) {
		if (c->head == c->tail)
			break;
		emit(key, &c->fifo[c->head % FIFO_DEPTH], 0, now, WHERE(reason, ifindex));
		c->head++;
		stat_inc(S_PENDING_POPPED);
	}
}

/* Where the new data of this segment starts, after TCP sequence checks.
 * Returns the payload offset to parse from, or -1 to skip the segment. */
static __always_inline int seg_start(struct stream_state *st, struct pkt *p)
{
	__s32 d, end_d;
	int start = 0;

	if (st->seq_valid) {
		d = (__s32)(p->seq - st->next_seq);
		end_d = d + (__s32)p->payload_len;
		if (end_d <= 0) {
			stat_inc(S_RETRANSMIT);
			return -1;
		}
		if (d < 0) {
			start = -d; /* overlap: parse only the new bytes */
		} else if (d > 0) {
			/* bytes missing: harmless inside a body of known length */
			if (st->mode == SM_BODY && st->body_left >= (__u64)d) {
				st->body_left -= d;
			} else if (st->mode != SM_UNTIL_CLOSE && st->mode != SM_TUNNEL) {
				st->mode = SM_UNSYNC;
				stat_inc(S_GAP);
			}
		}
	}
	st->next_seq = p->seq + p->payload_len;
	st->seq_valid = 1;
	return start;
}

/* After a complete head: how the body is framed. */
static __always_inline void frame_body(struct stream_state *st, __u8 flags, __u64 cl,
				       int has_body, int close_delimited)
{
	if (!has_body) {
		st->mode = SM_HEAD;
	} else if (flags & HF_BAD_LENGTH) {
		st->mode = SM_UNSYNC;
		stat_inc(S_UNSUPPORTED_FRAMING);
	} else if (flags & HF_CHUNKED) {
		st->mode = SM_UNSYNC; /* chunk framing: resync at the next message */
		stat_inc(S_UNSUPPORTED_FRAMING);
	} else if (flags & HF_CONTENT_LENGTH) {
		st->body_left = cl;
		st->mode = cl ? SM_BODY : SM_HEAD;
	} else {
		st->mode = close_delimited ? SM_UNTIL_CLOSE : SM_HEAD;
	}
}

/* Has the body of the response to @r (status @status)? RFC 9112 6.3 */
static __always_inline int response_has_body(__u8 method, __u16 status)
{
	if (method == M_HEAD || status < 200 || status == 204 || status == 304)
		return 0;
	return 1;
}

/* What one step of walking a segment needs (global functions take at
 * most 5 arguments and no pointers inside structs). */
struct walk_args {
	struct conn_key key;
	__u64 now;
	__u32 payload_off;
	__u32 payload_len;
	__u32 off;        /* payload offset of the next unparsed byte */
	__u32 ifindex;
	__u32 is_req;
	__u32 pad;
};

#define ST(c, a) ((a)->is_req ? &(c)->req : &(c)->resp)

/* Continue a head that began in an earlier segment. Returns bytes used,
 * or -1 when the segment ends still inside it. */
static __always_inline int continue_head(struct __sk_buff *skb, struct conn_state *c,
					 struct walk_args *a, __u32 off,
					 struct scratch *sc)
{
	struct stream_state *st = ST(c, a);
	int is_req = a->is_req;
	struct head_scan *s = &sc->scan;
	int r;

	s->line_start = LINE_UNKNOWN;
	s->w0 = st->last4;
	s->cl = st->hdr_cl;
	s->flags = st->hdr_flags & (HF_CONTENT_LENGTH | HF_CHUNKED | HF_BAD_LENGTH);
	s->in_start = !!(st->hdr_flags & HF_IN_START);
	r = scan_head(skb, a->payload_off + off, a->payload_len - off, s);
	if (r == SCAN_MORE) {
		st->last4 = (__u32)s->w0;
		st->hdr_cl = s->cl;
		st->hdr_flags = (st->hdr_flags & ~(HF_CONTENT_LENGTH | HF_CHUNKED | HF_BAD_LENGTH)) | s->flags;
		return -1;
	}
	if (r == SCAN_TOO_LONG) {
		stat_inc(S_HEADER_TOO_LONG);
		st->mode = SM_UNSYNC;
		return -1;
	}
	frame_body(st, s->flags, s->cl, !(st->hdr_flags & HF_NO_BODY), !is_req);
	return s->hdr_end;
}

/* A head is cut by the end of the segment: keep what the scan knows. */
static __always_inline void park_head(struct stream_state *st, struct head_scan *s, int no_body)
{
	st->mode = SM_HEADERS;
	st->last4 = (__u32)s->w0;
	st->hdr_cl = s->cl;
	st->hdr_flags = s->flags | (no_body ? HF_NO_BODY : 0) | (s->in_start ? HF_IN_START : 0);
}

/* The first bytes of a message: a start kept from the end of the previous
 * segment (SM_PARTIAL, plen bytes) followed by this segment's bytes, in
 * sc->hdr. Returns plen. */
static __always_inline __u32 message_start(struct __sk_buff *skb, struct stream_state *st,
					   struct walk_args *a, __u32 off, __u32 avail,
					   struct scratch *sc)
{
	__u32 plen = st->mode == SM_PARTIAL ? st->partial_len : 0;
	__u32 n = avail < 16 ? avail : 16;

	if (plen > 11)
		plen = 11;
	__builtin_memcpy(sc->hdr, st->partial, sizeof(st->partial));
	if (n > 0)
		bpf_skb_load_bytes(skb, a->payload_off + off, sc->hdr + plen, n);
	return plen;
}

/* Too few bytes left in the segment to tell what starts here: keep them
 * (with what was kept before) for the next segment. */
static __always_inline void park_partial(struct stream_state *st, __u32 plen, __u32 avail,
					 struct walk_args *a, struct scratch *sc)
{
	if (st->mode != SM_PARTIAL)
		st->body_left = a->now; /* time of the message's first byte */
	__builtin_memcpy(st->partial, sc->hdr, sizeof(st->partial));
	st->partial_len = plen + avail;
	st->mode = SM_PARTIAL;
}

/* Parse one request at payload offset @off. Returns bytes used, 0 if no
 * request starts here, -1 if the segment is used up. */
static __always_inline int parse_request(struct __sk_buff *skb, struct conn_state *c,
					 struct walk_args *a, __u32 off, struct scratch *sc)
{
	struct stream_state *st = &c->req;
	struct head_scan *s = &sc->scan;
	struct url_val *u = &sc->url;
	__u32 avail = a->payload_len - off;
	__u32 mlen = 0, plen, u0, k = 0, useg, ulen;
	__u8 method, version = 0, flags = 0, url_done = 0;
	__u64 first, ts = a->now;
	int r;

	plen = message_start(skb, st, a, off, avail, sc);
	if (plen + avail < 8) {
		park_partial(st, plen, avail, a, sc);
		return -1;
	}
	__builtin_memcpy(&first, sc->hdr, 8);
	method = match_method(first, &mlen);
	if (method == M_UNKNOWN)
		return 0;
	stat_inc(S_REQUESTS);
	if (st->mode == SM_PARTIAL)
		ts = st->body_left;

	/* request-target bytes already in the kept start (at most 3) */
	if (plen > mlen + 1) {
		for (int i = 0; i < 8; i++) {
			__u32 j = mlen + 1 + i;

			if (j >= plen || j >= 16)
				break;
			if (sc->hdr[j & 15] == ' ') {
				url_done = 1;
				break;
			}
			u->url[i & 7] = sc->hdr[j & 15];
			k++;
		}
		u0 = 0;
	} else {
		u0 = mlen + 1 - plen; /* where the target starts in this segment */
	}
	if (u0 > avail)
		u0 = avail;

	/* scan from the request-target: its first space ends it */
	s->in_start = 1;
	s->line_start = LINE_UNKNOWN;
	r = scan_head(skb, a->payload_off + off + u0, avail - u0, s);
	if (url_done) {
		useg = 0;
	} else if (s->sp1) {
		useg = s->sp1;
		if (u0 + s->sp1 + 9 <= avail) {
			__u64 ver = 0;

			bpf_skb_load_bytes(skb, a->payload_off + off + u0 + s->sp1 + 1, &ver, 8);
			version = match_version(ver);
		}
	} else {
		useg = avail - u0; /* the line goes on in the next segment */
		flags |= EV_URL_TRUNCATED;
	}
	ulen = k + useg;
	if (ulen > MAX_URL_LEN) {
		ulen = MAX_URL_LEN;
		flags |= EV_URL_TRUNCATED;
	}

	if (c->overflow || c->tail - c->head >= FIFO_DEPTH) {
		/* no room: its response will be skipped, keeping the pairing */
		c->overflow++;
		stat_inc(S_FIFO_OVERFLOW);
	} else {
		struct pending_req *slot = &c->fifo[c->tail % FIFO_DEPTH];
		struct url_key *uk = &sc->ukey;

		slot->ts_ns = ts;
		slot->seq = c->tail;
		slot->method = method;
		slot->version = version;
		slot->flags = flags;
		u->len = ulen;
		useg = ulen - k;
		if (k < 8 && useg > 0 && useg <= MAX_URL_LEN - k)
			bpf_skb_load_bytes(skb, a->payload_off + off + u0, u->url + k, useg);
		uk->conn = a->key;
		uk->seq = c->tail;
		uk->pad = 0;
		if (bpf_map_update_elem(&pending_urls, uk, u, BPF_ANY))
			stat_inc(S_URL_MAP_FULL);
		c->tail++;
		stat_inc(S_PENDING_PUSHED);
	}

	st->partial_len = 0;
	if (r == SCAN_MORE) {
		park_head(st, s, 0);
		return -1;
	}
	if (r == SCAN_TOO_LONG) {
		stat_inc(S_HEADER_TOO_LONG);
		st->mode = SM_UNSYNC;
		return -1;
	}
	frame_body(st, s->flags, s->cl, 1, 0);
	if (method == M_CONNECT)
		st->mode = SM_TUNNEL; /* what follows is not HTTP (if accepted) */
	return u0 + s->hdr_end;
}

/* Parse one response at payload offset @off (see parse_request). */
static __always_inline int parse_response(struct __sk_buff *skb, struct conn_state *c,
					  struct walk_args *a, __u32 off, struct scratch *sc)
{
	struct stream_state *st = &c->resp;
	struct head_scan *s = &sc->scan;
	__u32 avail = a->payload_len - off, plen;
	__u8 version, method = M_UNKNOWN;
	__u16 status;
	int r, has_body;

	plen = message_start(skb, st, a, off, avail, sc);
	if (plen + avail < 12) {
		park_partial(st, plen, avail, a, sc);
		return -1;
	}
	status = match_status(sc->hdr, &version);
	if (!status)
		return 0;

	if (status < 200 && status != 101) {
		stat_inc(S_INTERIM); /* 100 Continue, 103 Early Hints: not final */
	} else {
		__u64 ts = st->mode == SM_PARTIAL ? st->body_left : a->now;

		stat_inc(S_RESPONSES);
		if (c->head != c->tail) {
			struct pending_req *r0 = &c->fifo[c->head % FIFO_DEPTH];

			method = r0->method;
			emit(&a->key, r0, status, ts, WHERE(R_NONE, a->ifindex));
			c->head++;
			stat_inc(S_PENDING_POPPED);
		} else if (c->overflow) {
			c->overflow--;
			stat_inc(S_OVERFLOW_RESPONSES);
		} else {
			stat_inc(S_UNMATCHED_RESPONSE);
		}
	}
	st->partial_len = 0;

	has_body = response_has_body(method, status);
	s->in_start = 1;
	s->line_start = LINE_UNKNOWN;
	r = scan_head(skb, a->payload_off + off, avail, s);
	if (status == 101 || (method == M_CONNECT && status >= 200 && status < 300)) {
		c->req.mode = SM_TUNNEL;
		st->mode = SM_TUNNEL;
		return -1;
	}
	if (method == M_CONNECT && c->req.mode == SM_TUNNEL)
		c->req.mode = SM_HEAD; /* CONNECT refused: HTTP goes on */
	if (r == SCAN_MORE) {
		park_head(st, s, !has_body);
		return -1;
	}
	if (r == SCAN_TOO_LONG) {
		stat_inc(S_HEADER_TOO_LONG);
		st->mode = SM_UNSYNC;
		return -1;
	}
	frame_body(st, s->flags, s->cl, has_body, 1);
	return s->hdr_end;
}

/* Take one step through a segment's new bytes: skip body bytes, or
 * parse one message head. Returns 1 to go on, 0 when done. A global
 * function: verified once, called up to MAX_MSGS_PER_SEG times. */
__noinline int walk_step(struct __sk_buff *skb, struct conn_state *c, struct walk_args *a)
{
	struct stream_state *st;
	struct scratch *sc;
	__u32 off, len, zero = 0;
	int used;

	if (!c || !a)
		return 0;
	sc = bpf_map_lookup_elem(&scratch_map, &zero);
	if (!sc)
		return 0;
	__builtin_memset(&sc->scan, 0, sizeof(sc->scan));
	st = ST(c, a);
	off = a->off;
	len = a->payload_len;
	if (off >= len)
		return 0;
	switch (st->mode) {
	case SM_BODY: {
		__u64 n = len - off;

		if (n > st->body_left)
			n = st->body_left;
		st->body_left -= n;
		a->off = off + n;
		if (!st->body_left)
			st->mode = SM_HEAD;
		return 1;
	}
	case SM_HEADERS:
		used = continue_head(skb, c, a, off, sc);
		break;
	case SM_UNSYNC:
		if (off != 0)
			return 0; /* look for a message only at a segment start */
		/* fall through */
	case SM_HEAD:
	case SM_PARTIAL:
		used = a->is_req ? parse_request(skb, c, a, off, sc) :
				   parse_response(skb, c, a, off, sc);
		if (used == 0) {
			if (st->mode == SM_HEAD || st->mode == SM_PARTIAL) {
				stat_inc(S_PARSE_FAILED);
				st->mode = SM_UNSYNC;
			}
			return 0;
		}
		break;
	default: /* SM_UNTIL_CLOSE, SM_TUNNEL */
		return 0;
	}
	if (used < 0)
		return 0;
	a->off = off + used;
	return 1;
}

static __always_inline int handle(struct __sk_buff *skb, int is_req)
{
	struct endpoint_key ek = {};
	struct conn_key key = {};
	struct conn_state *c;
	struct pkt p;
	__u32 zero = 0;

	if (parse_tcp_packet(skb, &p) < 0)
		return TC_ACT_UNSPEC_;
	if (p.payload_len == 0 && !(p.tcp_flags & (TCPF_FIN | TCPF_RST)))
		return TC_ACT_UNSPEC_; /* pure ACK / SYN: nothing to parse */

	/* the server end: destination of requests, source of responses */
	if (is_req) {
		__builtin_memcpy(key.caddr, p.src, 16);
		__builtin_memcpy(key.saddr, p.dst, 16);
		key.cport = p.sport;
		key.sport = p.dport;
	} else {
		__builtin_memcpy(key.caddr, p.dst, 16);
		__builtin_memcpy(key.saddr, p.src, 16);
		key.cport = p.dport;
		key.sport = p.sport;
	}
	ek.prefixlen = 144;
	__builtin_memcpy(ek.addr, key.saddr, 16);
	ek.port = bpf_htons(key.sport);
	if (!bpf_map_lookup_elem(&endpoints, &ek))
		return TC_ACT_UNSPEC_;

	__u64 now = bpf_ktime_get_ns();
	c = bpf_map_lookup_elem(&conns, &key);
	if (p.tcp_flags & TCPF_RST) {
		if (c) {
			flush_pending(&key, c, R_RESET, skb->ifindex, now);
			bpf_map_delete_elem(&conns, &key);
		}
		return TC_ACT_UNSPEC_;
	}

	struct scratch *sc = bpf_map_lookup_elem(&scratch_map, &zero);
	if (!sc)
		return TC_ACT_UNSPEC_;

	if (!c && p.payload_len) {
		__u64 first = 0;
		__u32 mlen;

		/* a connection is tracked from its first request */
		if (!is_req || p.payload_len < 4)
			goto no_conn;
		bpf_skb_load_bytes(skb, p.payload_off, &first, p.payload_len < 8 ? 4 : 8);
		if (match_method(first, &mlen) == M_UNKNOWN)
			goto no_conn;
		__builtin_memset(&sc->conn, 0, sizeof(sc->conn));
		sc->conn.req.next_seq = p.seq;
		sc->conn.req.seq_valid = 1;
		if (bpf_map_update_elem(&conns, &key, &sc->conn, BPF_NOEXIST) &&
		    !bpf_map_lookup_elem(&conns, &key)) {
			stat_inc(S_CONN_MAP_FULL);
			return TC_ACT_UNSPEC_;
		}
		c = bpf_map_lookup_elem(&conns, &key);
	}
	if (!c)
		goto no_conn;

	stat_inc(S_TRACED_SEGMENTS);
	c->last_ns = now;
	if (p.payload_len) {
		struct walk_args a = {
			.key = key, .now = now, .payload_off = p.payload_off,
			.payload_len = p.payload_len, .ifindex = skb->ifindex, .is_req = is_req,
		};
		struct stream_state *st = is_req ? &c->req : &c->resp;
		int start = seg_start(st, &p);
		int m;

		if (start >= 0) {
			a.off = start;
			for (m = 0; m < MAX_MSGS_PER_SEG; m++)
				if (!walk_step(skb, c, &a))
					break;
			if (m == MAX_MSGS_PER_SEG && a.off < p.payload_len) {
				stat_inc(S_PARSE_FAILED); /* more messages than we follow */
				st->mode = SM_UNSYNC;
			}
		}
	}
	if ((p.tcp_flags & TCPF_FIN) && !is_req) {
		/* the server closed: nothing pending can be answered now */
		flush_pending(&key, c, R_SERVER_FIN, skb->ifindex, now);
		bpf_map_delete_elem(&conns, &key);
	}
	return TC_ACT_UNSPEC_;

no_conn:
	if (!is_req && p.payload_len >= 12) {
		__u8 b[12];
		__u8 v;

		if (!bpf_skb_load_bytes(skb, p.payload_off, b, 12) && match_status(b, &v))
			stat_inc(S_UNMATCHED_RESPONSE);
	}
	return TC_ACT_UNSPEC_;
}

SEC("tc")
int redtap_req(struct __sk_buff *skb)
{
	return handle(skb, 1);
}

SEC("tc")
int redtap_resp(struct __sk_buff *skb)
{
	return handle(skb, 0);
}

// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* redtap.bpf.c: HTTP/1.x request/response pairing at the TC hook.
 *
 * Two programs share the maps:
 *   redtap_req  parses requests  (client -> server): attach where packets go
 *               TO local servers (egress of a pod's host-side veth);
 *   redtap_resp parses responses (server -> client): attach where packets
 *               come FROM local servers (ingress of a pod's host-side veth).
 * So each request to a local server is seen exactly once, wherever the
 * client is.
 *
 * On pod-side hooks (a pod's veth, the bridge) the attacher uses their
 * variants redtap_pod_req / redtap_pod_resp, which also catch a pod's own
 * request to a server of the node's host stack (a hostNetwork pod, an
 * endpoint flagged EP_HOST): it goes from the pod's veth (ingress) straight
 * into local input, crossing no hook that parses requests, and its response
 * comes back on the pod's veth (egress). They take such packets the other way
 * round. This costs a second endpoint lookup on pod-side hooks, only while
 * EP_HOST entries exist (settings.host_endpoints).
 *
 * All always return TC_ACT_UNSPEC: packets are never changed or dropped,
 * and the next filter on the hook still runs.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "redtap.h"
#include "parse.bpf.h"
#include "http.bpf.h"
#include "stream.bpf.h"
#include "claim.bpf.h"

#define TC_ACT_UNSPEC_ (-1)

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Wake the consumer only when this much data waits; it also polls on a
 * timer, so small amounts are picked up within its poll interval. */
const volatile __u32 wakeup_bytes = 256 * 1024;
/* Offline replay (BPF_PROG_TEST_RUN of a capture): take the time from
 * skb->tstamp, set from the capture, instead of the clock. */
const volatile __u8 clock_from_skb = 0;

/* Keep every ABI type in the object's BTF: tests/unit/test_abi_btf.py
 * checks the Python mirror (src/pyloader/abi.py) against it. */
struct http_event *abi_http_event __attribute__((unused));
enum stat_idx abi_stat_idx __attribute__((unused));
enum http_method abi_http_method __attribute__((unused));
enum unanswered_reason abi_reason __attribute__((unused));
enum stream_mode abi_stream_mode __attribute__((unused));
enum endpoint_flags abi_endpoint_flags __attribute__((unused));
struct settings *abi_settings __attribute__((unused));

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_ENDPOINTS);
	__type(key, struct endpoint_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct settings);
} settings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_CONNS);
	__type(key, struct conn_key);
	__type(value, struct conn_state);
} conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_PENDING);
	__type(key, struct req_key);
	__type(value, struct pending_req);
} pending SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 * 1024 * 1024); /* ~22k events of burst */
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, S_NR);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* What one step of walking a segment needs (global functions take at
 * most 5 arguments and no pointers inside structs). */
struct walk_args {
	struct conn_key key;
	__u64 now;
	__u32 payload_off;
	__u32 payload_len;
	__u32 off;        /* payload offset of the next unparsed byte */
	__u32 ifindex;
	__u32 seq;        /* TCP sequence number of the payload's first byte */
	__u32 ack;        /* TCP acknowledgement number of the segment */
	__u32 is_req;
	__u32 pad;
};

/* What an event carries besides the pending request. */
struct emit_args {
	__u64 resp_ns;      /* first response byte, or when given up */
	__u64 last_ns;      /* last response byte (EV_RESP_END)      */
	__u64 resp_body;    /* EV_RESP_BODY                          */
	__u32 ifindex;
	__u16 status;       /* 0: unanswered                         */
	__u8 reason;        /* enum unanswered_reason                */
	__u8 flags;         /* extra EV_* flags                      */
};

/* per-CPU scratch space: too big for the 512-byte stack */
struct scratch {
	struct pkt pkt;        /* handle()                */
	struct endpoint_key ek;
	struct walk_args wa;   /* handle() -> walk_step() */
	struct emit_args ea;   /* finish_response(), flush_pending() -> emit() */
	struct req_key ekey;   /* emit()                  */
	__u8 hdr[32];          /* first bytes of a message */
	struct head_scan scan;
	struct req_key rkey;
	struct pending_req req;
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

/* Send request number @seq of a connection (answered or not) to user
 * space, and forget it. A request evicted from `pending` is counted. */
__noinline int emit(struct conn_key *key, __u32 seq, struct emit_args *ea)
{
	struct pending_req *r;
	struct http_event *e;
	struct req_key *k;
	struct scratch *sc;
	__u32 zero = 0;

	sc = bpf_map_lookup_elem(&scratch_map, &zero);
	if (!key || !ea || !sc)
		return 0;
	k = &sc->ekey;
	k->conn = *key;
	k->seq = seq;
	k->pad = 0;
	r = bpf_map_lookup_elem(&pending, k);
	if (!r) {
		stat_inc(S_REQ_EVICTED);
		return 0;
	}
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		stat_inc(S_RINGBUF_FULL);
		goto out;
	}
	/* reserve -> fill -> submit; wake the reader only for a batch */
	e->req_ns = r->ts_ns;
	e->resp_ns = ea->resp_ns;
	e->resp_last_ns = ea->last_ns;
	e->req_body = r->req_body;
	e->resp_body = ea->resp_body;
	e->conn = *key;
	e->status = ea->status;
	e->url_len = r->url_len > MAX_URL_LEN ? MAX_URL_LEN : r->url_len;
	e->method = r->method;
	e->version = r->version;
	e->flags = r->flags | ea->flags | (ea->reason ? EV_UNANSWERED : 0);
	e->reason = ea->reason;
	e->ifindex = ea->ifindex;
	e->pad = 0;
	__builtin_memcpy(e->method_name, r->method_name, METHOD_NAME_LEN);
	__builtin_memcpy(e->url, r->url, MAX_URL_LEN);
	__u64 avail = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	bpf_ringbuf_submit(e, avail >= wakeup_bytes ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
	stat_inc(S_EVENTS);
	if (ea->reason)
		stat_inc(S_UNANSWERED);
out:
	bpf_map_delete_elem(&pending, k);
	return 0;
}

/* The response to the FIFO head is complete (or will not be followed
 * further): send it and pop the head. @end_flags: EV_RESP_END|EV_RESP_BODY
 * when the last byte and the body size are known. */
#define FLAGS_IF(flags, ifindex) ((__u64)(flags) << 32 | (__u32)(ifindex))
/* @flags_if: FLAGS_IF(end_flags, ifindex). A global function (verified once). */
__noinline int finish_response(struct conn_key *key, struct conn_state *c, __u64 flags_if,
			       __u64 last_ns)
{
	__u8 end_flags = flags_if >> 32;
	__u32 ifindex = (__u32)flags_if, zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&scratch_map, &zero);
	struct emit_args *ea;

	if (!key || !c || !sc || !c->resp_status)
		return 0;
	if (c->head != c->tail) {
		ea = &sc->ea;
		ea->resp_ns = c->resp_first_ns;
		ea->last_ns = (end_flags & EV_RESP_END) ? last_ns : 0;
		ea->resp_body = c->resp.body_seen;
		ea->ifindex = ifindex;
		ea->status = c->resp_status;
		ea->reason = R_NONE;
		ea->flags = end_flags;
		emit(key, c->head, ea);
		c->head++;
		stat_inc(S_PENDING_POPPED);
	}
	c->resp_status = 0;
	return 0;
}

/* Report every pending request as unanswered (@reason); resp_ns of such
 * an event is the time it was given up. */
/* @reason_if: FLAGS_IF(reason, ifindex). A global function (verified once). */
__noinline int flush_pending(struct conn_key *key, struct conn_state *c, __u64 reason_if,
			     __u64 now, __u32 until)
{
	__u8 reason = reason_if >> 32;
	__u32 ifindex = (__u32)reason_if, zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&scratch_map, &zero);
	struct emit_args *ea;

	if (!key || !c || !sc)
		return 0;
	ea = &sc->ea;
	__builtin_memset(ea, 0, sizeof(*ea));
	ea->resp_ns = now;
	ea->ifindex = ifindex;
	ea->reason = reason;
	for (int i = 0; i < MAX_PIPELINE; i++) {
		if (c->head == c->tail || c->head == until)
			break;
		emit(key, c->head, ea);
		c->head++;
		stat_inc(S_PENDING_POPPED);
		if (reason == R_LOST)
			stat_inc(S_RESYNC_DROPPED);
	}
	return 0;
}

#define ST(c, a) ((a)->is_req ? &(c)->req : &(c)->resp)

/* Requests queued so far will get no answer we can pair: the response
 * side reports them (R_LOST) before it looks at its next segment. Only the
 * response side pops the FIFO, so two CPUs never pop the same request. */
static __always_inline void mark_lost(struct conn_state *c)
{
	c->lost_until = c->tail;
	c->lost_pending = 1;
}

/* A stream lost track of message boundaries (gap, garbage, bad framing,
 * more messages in a segment than it follows).
 * A pipelining client: how many requests were missed, or which response
 * answers which, cannot be known any more, so the connection is given up
 * (counted) and its pending requests reported (R_LOST), never mispaired.
 * Otherwise each request waits for its answer, and the TCP ACK of the next
 * response tells whether it can answer the next request
 * (check_early_response). Responses lost: the pending requests are
 * reported (R_LOST). */
static __always_inline void lost_sync(struct conn_state *c, struct walk_args *a)
{
	if (!a->is_req) {
		finish_response(&a->key, c, FLAGS_IF(0, a->ifindex), 0);
		flush_pending(&a->key, c, FLAGS_IF(R_LOST, a->ifindex), a->now, c->tail);
	} else if (c->pipelined) {
		mark_lost(c); /* the response side reports them: it alone pops */
	}
	if (c->pipelined) {
		c->req.mode = SM_TUNNEL;
		c->resp.mode = SM_TUNNEL;
		stat_inc(S_GIVEN_UP);
	}
	c->check_on = 2;
}

/* A message body ended (@size bytes). */
static __always_inline void message_done(struct conn_state *c, struct walk_args *a,
					 __u64 size)
{
	if (a->is_req) {
		__u32 zero = 0;
		struct scratch *sc = bpf_map_lookup_elem(&scratch_map, &zero);

		if (sc && c->req_pushed && c->tail != c->head) {
			struct pending_req *r;

			sc->rkey.conn = a->key;
			sc->rkey.seq = c->tail - 1;
			sc->rkey.pad = 0;
			r = bpf_map_lookup_elem(&pending, &sc->rkey);
			if (r) {
				r->req_body = size > 0xffffffffULL ? 0xffffffff : size;
				r->flags |= EV_REQ_BODY;
			}
		}
		c->req_pushed = 0;
	} else {
		/* a body with unseen bytes ended at an unknown time */
		__u8 end = c->resp.body_gap ? EV_RESP_BODY : EV_RESP_END | EV_RESP_BODY;

		finish_response(&a->key, c, FLAGS_IF(end, a->ifindex), a->now);
	}
}

/* After a complete head (frame_body's result @fr): finish or wait. */
static __always_inline void after_head(struct conn_state *c, struct walk_args *a, int fr)
{
	if (fr > 0) {
		message_done(c, a, 0);
	} else if (fr < 0) {
		stat_inc(S_UNSUPPORTED_FRAMING);
		lost_sync(c, a);
	}
}

/* A head is cut by the end of the segment after @scanned bytes of it:
 * keep all the scan knows, so that the next segment continues it exactly
 * (a header name or value may be split too). @keep: HF_NO_BODY, HF_TRAILER. */
static __always_inline void park_head(struct stream_state *st, struct head_scan *s,
				      __u32 scanned, __u8 keep)
{
	st->mode = SM_HEADERS;
	st->hdr_w0 = s->w0;
	st->hdr_w1 = s->w1;
	st->hdr_cl = s->cl;
	if (s->line_start == LINE_UNKNOWN)
		st->line_len = LINE_UNKNOWN;
	else
		st->line_len = (scanned - s->line_start) | (s->colon ? LINE_COLON : 0);
	st->hdr_flags = keep | s->flags | (s->in_start ? HF_IN_START : 0) |
			(s->in_cl ? HF_IN_CL : 0) | (s->in_te ? HF_IN_TE : 0);
}

/* Continue a head (or a chunked trailer) that began in an earlier
 * segment. Returns bytes used, or -1 when the segment ends inside it. */
static __always_inline int continue_head(struct __sk_buff *skb, struct conn_state *c,
					 struct walk_args *a, __u32 off, struct scratch *sc)
{
	struct stream_state *st = ST(c, a);
	struct head_scan *s = &sc->scan;
	__u8 keep = st->hdr_flags & (HF_NO_BODY | HF_TRAILER);
	int r;

	s->w0 = st->hdr_w0;
	s->w1 = st->hdr_w1;
	s->cl = st->hdr_cl;
	s->flags = st->hdr_flags & (HF_CONTENT_LENGTH | HF_CHUNKED | HF_BAD_LENGTH);
	s->in_start = !!(st->hdr_flags & HF_IN_START);
	s->in_cl = !!(st->hdr_flags & HF_IN_CL);
	s->in_te = !!(st->hdr_flags & HF_IN_TE);
	if (st->line_len == LINE_UNKNOWN) {
		s->line_start = LINE_UNKNOWN;
	} else { /* the line began line_len bytes before this segment */
		s->line_start = 0 - (st->line_len & ~LINE_COLON);
		s->colon = !!(st->line_len & LINE_COLON);
	}
	r = scan_head(skb, a->payload_off + off, a->payload_len - off, s);
	if (r == SCAN_MORE) {
		park_head(st, s, a->payload_len - off, keep);
		return -1;
	}
	if (r == SCAN_TOO_LONG) {
		stat_inc(S_HEADER_TOO_LONG);
		st->mode = SM_UNSYNC;
		lost_sync(c, a);
		return -1;
	}
	if (keep & HF_TRAILER) { /* end of a chunked body */
		st->mode = SM_HEAD;
		stat_inc(S_CHUNKED);
		message_done(c, a, st->body_seen);
	} else {
		after_head(c, a, frame_body(st, s->flags, s->cl, !(keep & HF_NO_BODY), !a->is_req));
	}
	return s->hdr_end;
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
	__builtin_memset(sc->hdr, 0, sizeof(sc->hdr));
	__builtin_memcpy(sc->hdr, st->partial, sizeof(st->partial));
	if (n > 0)
		bpf_skb_load_bytes(skb, a->payload_off + off, sc->hdr + plen, ((n - 1) & 15) + 1);
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
	struct pending_req *u = &sc->req;
	__u32 avail = a->payload_len - off;
	__u32 mlen = 0, plen, u0, k = 0, useg, ulen;
	__u8 method, version = 0, flags = 0, url_done = 0, pushed = 0;
	__u64 first, ts = a->now;
	int r;

	plen = message_start(skb, st, a, off, avail, sc);
	if (!plen && (sc->hdr[0] == '\r' || sc->hdr[0] == '\n'))
		return 1; /* an empty line before a message (RFC 9112 2.2): skip it */
	if (plen + avail < 8) {
		park_partial(st, plen, avail, a, sc);
		return -1;
	}
	__builtin_memcpy(&first, sc->hdr, 8);
	method = match_method(first, &mlen);
	if (method == M_UNKNOWN) {
		mlen = match_token_method(sc->hdr);
		if (!mlen)
			return 0;
		method = M_OTHER;
	}
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
	} else if (s->sp1 && (!s->eol1 || s->sp1 < s->eol1)) {
		useg = s->sp1 - 1;
		if (u0 + useg + 9 <= avail) {
			__u64 ver = 0;

			bpf_skb_load_bytes(skb, a->payload_off + off + u0 + useg + 1, &ver, 8);
			version = match_version(ver);
		}
	} else if (s->eol1) { /* no version: "GET /x\r\n" (HTTP/0.9 style) */
		useg = s->eol1 - 1 - s->cr1;
	} else {
		useg = avail - u0; /* the line goes on in the next segment */
		flags |= EV_URL_TRUNCATED;
	}
	if (method == M_OTHER && !version)
		return 0; /* an unknown token is a method only in a whole request line */
	stat_inc(S_REQUESTS);
	ulen = k + useg;
	if (ulen > MAX_URL_LEN) {
		ulen = MAX_URL_LEN;
		flags |= EV_URL_TRUNCATED;
	}

	if (c->tail != c->head && !c->overflow) {
		/* a request while others are pending: pipelining, or their answers
		 * were lost before we saw them? The client's ACK tells: if it has
		 * received response bytes we have not seen, answers were lost. */
		if (c->resp.seq_valid && (__s32)(a->ack - c->resp.next_seq) > 0) {
			stat_inc(S_GAP);
			mark_lost(c);
			c->resp.mode = SM_UNSYNC;
			c->resp.next_seq = a->ack; /* received by the client, unseen by us */
			c->check_on = 2;
		} else {
			c->pipelined = 1;
		}
	}
	if (c->overflow || c->tail - c->head >= MAX_PIPELINE) {
		/* no room: its response will be skipped, keeping the pairing */
		/* atomic: the response side decrements it on another CPU */
		__sync_fetch_and_add(&c->overflow, 1);
		stat_inc(S_FIFO_OVERFLOW);
	} else {
		struct req_key *rk = &sc->rkey;

		if (c->check_on == 2) { /* see check_early_response */
			c->check_on = 1;
			c->check_idx = c->tail;
			c->check_seq = a->seq + off;
		}
		u->ts_ns = ts;
		u->req_body = 0;
		__builtin_memset(u->method_name, 0, METHOD_NAME_LEN);
		if (method == M_OTHER)
			__builtin_memcpy(u->method_name, sc->hdr, METHOD_NAME_LEN - 1);
		u->method = method;
		u->version = version;
		u->flags = flags;
		u->url_len = ulen;
		useg = ulen - k;
		if (k < 8 && useg > 0 && useg <= MAX_URL_LEN - k)
			bpf_skb_load_bytes(skb, a->payload_off + off + u0, u->url + k,
					   ((useg - 1) & 0xff) + 1);
		rk->conn = a->key;
		rk->seq = c->tail;
		rk->pad = 0;
		if (bpf_map_update_elem(&pending, rk, u, BPF_ANY)) {
			stat_inc(S_PENDING_MAP_FULL);
			__sync_fetch_and_add(&c->overflow, 1); /* its response must not pair with the next one */
			goto framing;
		}
		pushed = 1;
		c->tail++;
		stat_inc(S_PENDING_PUSHED);
	}
framing:
	st->partial_len = 0;
	c->req_pushed = pushed;
	if (r == SCAN_MORE) {
		park_head(st, s, avail - u0, 0);
		return -1;
	}
	if (r == SCAN_TOO_LONG) {
		stat_inc(S_HEADER_TOO_LONG);
		st->mode = SM_UNSYNC;
		lost_sync(c, a);
		return -1;
	}
	after_head(c, a, frame_body(st, s->flags, s->cl, 1, 0));
	if (method == M_CONNECT)
		st->mode = SM_TUNNEL; /* what follows is not HTTP (if accepted) */
	return u0 + s->hdr_end;
}

/* The first response after a (re)start of tracking must not be paired
 * with a request its server had not received when it answered: such a
 * response answers an earlier request that was not seen (the agent started
 * mid-connection, or request data was lost). Its ACK tells. */
static __always_inline int check_early_response(struct conn_state *c, struct walk_args *a)
{
	if (c->check_on != 1 || c->head != c->check_idx)
		return 0;
	if ((__s32)(a->ack - c->check_seq) <= 0)
		return 1;
	c->check_on = 0;
	return 0;
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
	if (!plen && (sc->hdr[0] == '\r' || sc->hdr[0] == '\n'))
		return 1; /* stray line end after a body: skip it */
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
		finish_response(&a->key, c, FLAGS_IF(0, a->ifindex), 0); /* one still open: framing lost */
		if (c->head != c->tail) {
			if (check_early_response(c, a)) {
				stat_inc(S_EARLY_RESPONSE);
			} else {
				struct pending_req *r0;

				sc->rkey.conn = a->key;
				sc->rkey.seq = c->head;
				sc->rkey.pad = 0;
				r0 = bpf_map_lookup_elem(&pending, &sc->rkey);
				method = r0 ? r0->method : M_UNKNOWN;
				c->resp_method = method;
				c->resp_status = status;
				c->resp_first_ns = ts;
			}
		} else if (c->overflow) {
			/* the only decrement (under the response side's claim):
			 * a concurrent increment cannot make it go below 0 */
			__sync_fetch_and_sub(&c->overflow, 1);
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
		finish_response(&a->key, c, FLAGS_IF(EV_RESP_END | EV_RESP_BODY, a->ifindex), a->now);
		c->req.mode = SM_TUNNEL;
		st->mode = SM_TUNNEL;
		return -1;
	}
	if (method == M_CONNECT && c->req.mode == SM_TUNNEL)
		c->req.mode = SM_HEAD; /* CONNECT refused: HTTP goes on */
	if (r == SCAN_MORE) {
		park_head(st, s, avail, has_body ? 0 : HF_NO_BODY);
		return -1;
	}
	if (r == SCAN_TOO_LONG) {
		stat_inc(S_HEADER_TOO_LONG);
		st->mode = SM_UNSYNC;
		lost_sync(c, a);
		return -1;
	}
	after_head(c, a, frame_body(st, s->flags, s->cl, has_body, 1));
	return s->hdr_end;
}

/* Take one step through a segment's new bytes: skip body bytes, read a
 * chunk-size line, or parse one message head. Returns 1 to go on, 0 when
 * done. A global function: verified once, called up to MAX_STEPS_PER_SEG
 * times. */
__noinline int walk_step(struct __sk_buff *skb, struct conn_state *c, struct walk_args *a)
{
	struct stream_state *st;
	struct scratch *sc;
	__u32 off, len, zero = 0, used = 0;
	int r;

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
	case SM_BODY:
	case SM_CHUNK_DATA: {
		__u64 n = len - off;

		if (n > st->body_left)
			n = st->body_left;
		st->body_left -= n;
		a->off = off + n;
		if (st->mode == SM_BODY)
			st->body_seen += n;
		if (st->body_left)
			return 1;
		if (st->mode == SM_BODY) {
			st->mode = SM_HEAD;
			message_done(c, a, st->body_seen);
		} else {
			st->mode = SM_CHUNK_SIZE;
			st->hdr_cl = 0;
			st->hdr_flags = 0;
		}
		return 1;
	}
	case SM_CHUNK_SIZE: {
		__u32 n = len - off;

		if (n > 16)
			n = 16;
		n &= 31;
		if (!n || bpf_skb_load_bytes(skb, a->payload_off + off, sc->hdr, ((n - 1) & 15) + 1) < 0)
			return 0;
		r = chunk_size_line(st, sc->hdr, n, &used);
		a->off = off + used;
		if (r == CL_BAD) {
			stat_inc(S_UNSUPPORTED_FRAMING);
			st->mode = SM_UNSYNC;
			lost_sync(c, a);
			return 0;
		}
		if (r == CL_DONE) {
			if (st->hdr_cl == 0) { /* last chunk: trailer section follows */
				st->mode = SM_HEADERS;
				st->hdr_flags = HF_TRAILER;
				st->hdr_w0 = 0x0d0a; /* a line just ended */
				st->hdr_w1 = 0;
				st->line_len = 0;
				st->hdr_cl = 0;
			} else {
				st->mode = SM_CHUNK_DATA;
				st->body_left = st->hdr_cl + 2; /* data + CRLF */
				st->body_seen += st->hdr_cl;
			}
		}
		return 1;
	}
	case SM_HEADERS:
		r = continue_head(skb, c, a, off, sc);
		break;
	case SM_UNSYNC:
		if (off != 0)
			return 0; /* look for a message only at a segment start */
		/* fall through */
	case SM_HEAD:
	case SM_PARTIAL:
		r = a->is_req ? parse_request(skb, c, a, off, sc) : parse_response(skb, c, a, off, sc);
		if (r == 0) {
			if (st->mode == SM_HEAD || st->mode == SM_PARTIAL) {
				stat_inc(S_PARSE_FAILED);
				st->mode = SM_UNSYNC;
				lost_sync(c, a);
			}
			return 0;
		}
		break;
	case SM_UNTIL_CLOSE:
		st->body_seen += len - off;
		return 0;
	default: /* SM_TUNNEL */
		return 0;
	}
	if (r < 0)
		return 0;
	a->off = off + r;
	return 1;
}

/* Is the packet one of a traced server's? Sets *is_req to which side it is. */
static __always_inline int traced(struct scratch *sc, struct pkt *pp, int *is_req, int pod_side)
{
	struct endpoint_key *ek = &sc->ek;
	struct settings *set;
	__u32 zero = 0;
	__u8 *ep, *rev;

	/* the server end: destination of requests, source of responses */
	ek->prefixlen = 144;
	__builtin_memcpy(ek->addr, *is_req ? pp->dst : pp->src, 16);
	ek->port = bpf_htons(*is_req ? pp->dport : pp->sport);
	ep = bpf_map_lookup_elem(&endpoints, ek);
	if (!pod_side || (ep && (*ep & EP_PORT)))
		return ep != 0;
	set = bpf_map_lookup_elem(&settings, &zero);
	if (!set || !set->host_endpoints)
		return ep != 0;
	/* a pod talking to a server of the node's host stack? */
	__builtin_memcpy(ek->addr, *is_req ? pp->src : pp->dst, 16);
	ek->port = bpf_htons(*is_req ? pp->sport : pp->dport);
	rev = bpf_map_lookup_elem(&endpoints, ek);
	if (rev && (*rev & EP_HOST)) {
		*is_req = !*is_req;
		return 1;
	}
	return ep != 0;
}

static __always_inline int handle(struct __sk_buff *skb, int is_req, int pod_side)
{
	struct stream_state *st;
	struct conn_state *c;
	struct scratch *sc;
	struct walk_args *a;
	struct pkt *pp;
	__u32 zero = 0;
	/* ctx fields read once, up front: the verifier wants fixed offsets */
	__u32 ifindex = skb->ifindex;
	__u64 tstamp = skb->tstamp;

	sc = bpf_map_lookup_elem(&scratch_map, &zero);
	if (!sc)
		return TC_ACT_UNSPEC_;
	pp = &sc->pkt;
	if (parse_tcp_packet(skb, pp) < 0)
		return TC_ACT_UNSPEC_;
	if (pp->payload_len == 0 && !(pp->tcp_flags & (TCPF_FIN | TCPF_RST)))
		return TC_ACT_UNSPEC_; /* pure ACK / SYN: nothing to parse */

	if (!traced(sc, pp, &is_req, pod_side))
		return TC_ACT_UNSPEC_;

	a = &sc->wa;
	__builtin_memset(a, 0, sizeof(*a));
	if (is_req) {
		__builtin_memcpy(a->key.caddr, pp->src, 16);
		__builtin_memcpy(a->key.saddr, pp->dst, 16);
		a->key.cport = pp->sport;
		a->key.sport = pp->dport;
	} else {
		__builtin_memcpy(a->key.caddr, pp->dst, 16);
		__builtin_memcpy(a->key.saddr, pp->src, 16);
		a->key.cport = pp->dport;
		a->key.sport = pp->sport;
	}

	__u64 now = clock_from_skb ? tstamp : bpf_ktime_get_ns();
	c = bpf_map_lookup_elem(&conns, &a->key);
	if (pp->tcp_flags & TCPF_RST) {
		if (c) {
			finish_response(&a->key, c, FLAGS_IF(0, ifindex), 0);
			flush_pending(&a->key, c, FLAGS_IF(R_RESET, ifindex), now, c->tail);
			bpf_map_delete_elem(&conns, &a->key);
		}
		return TC_ACT_UNSPEC_;
	}

	if (!c && pp->payload_len) {
		__u64 first = 0;
		__u32 mlen;

		/* a connection is tracked from its first request */
		if (!is_req)
			goto no_conn;
		if (pp->payload_len < 8) {
			/* a start too short to tell: keep it if it may be a method */
			__u32 n = ((pp->payload_len - 1) & 7) + 1; /* 1..7, visibly to the verifier */

			if (bpf_skb_load_bytes(skb, pp->payload_off, &first, n) < 0 ||
			    !maybe_method_start(first, n))
				goto no_conn;
		} else {
			bpf_skb_load_bytes(skb, pp->payload_off, &first, 8);
			if (match_method(first, &mlen) == M_UNKNOWN) {
				__u32 n = pp->payload_len < 16 ? 8 : 16;

				if (bpf_skb_load_bytes(skb, pp->payload_off, sc->hdr, n) < 0 ||
				    (n == 16 && !match_token_method(sc->hdr)) || n < 16)
					goto no_conn;
			}
		}
		__builtin_memset(&sc->conn, 0, sizeof(sc->conn));
		sc->conn.req.next_seq = pp->seq;
		sc->conn.req.seq_valid = 1;
		if (pp->tcp_flags & TCPF_ACK) {
			/* the answer starts where the client's ACK points: a
			 * first response lost (or overtaken) is then a gap,
			 * not a later one paired with the first request */
			sc->conn.resp.next_seq = pp->ack;
			sc->conn.resp.seq_valid = 1;
		}
		sc->conn.check_on = 2; /* its first response is checked by ACK */
		if (bpf_map_update_elem(&conns, &a->key, &sc->conn, BPF_NOEXIST) &&
		    !bpf_map_lookup_elem(&conns, &a->key)) {
			stat_inc(S_CONN_MAP_FULL);
			return TC_ACT_UNSPEC_;
		}
		c = bpf_map_lookup_elem(&conns, &a->key);
	}
	if (!c)
		goto no_conn;

	stat_inc(S_TRACED_SEGMENTS);
	st = is_req ? &c->req : &c->resp;
	if (!claim(&st->busy)) {
		stat_inc(S_CONCURRENT); /* its bytes: a gap to the next segment */
		return TC_ACT_UNSPEC_;
	}
	if (pp->payload_len && gap_loses_sync(st, pp->seq)) {
		struct seq_wait_ctx w = { .st = st, .seq = pp->seq, .ok = 0 };

		release(&st->busy);
		bpf_loop(REORDER_WAIT_TRIES, seq_wait_try, &w, 0);
		/* the connection may have ended meanwhile (FIN, RST on another CPU) */
		c = bpf_map_lookup_elem(&conns, &a->key);
		if (!c)
			return TC_ACT_UNSPEC_;
		st = is_req ? &c->req : &c->resp;
		if (!claim(&st->busy)) {
			stat_inc(S_CONCURRENT);
			return TC_ACT_UNSPEC_;
		}
		if (w.ok)
			stat_inc(S_REORDERED);
	}
	if (!is_req && c->lost_pending) { /* marked by the request side */
		c->lost_pending = 0;
		finish_response(&a->key, c, FLAGS_IF(0, ifindex), 0);
		flush_pending(&a->key, c, FLAGS_IF(R_LOST, ifindex), now, c->lost_until);
	}
	if (pp->payload_len) {
		int lost, m, start = seg_start(st, pp->seq, pp->payload_len, &lost);

		a->now = now;
		a->payload_off = pp->payload_off;
		a->payload_len = pp->payload_len;
		a->ifindex = ifindex;
		a->seq = pp->seq;
		a->ack = pp->ack;
		a->is_req = is_req;
		if (start == SEG_SKIP) {
			stat_inc(S_RETRANSMIT);
		} else {
			if (lost) {
				stat_inc(S_GAP);
				lost_sync(c, a);
			}
			c->last_ns = now;
			st->last_data_ns = now;
			a->off = start;
			for (m = 0; m < MAX_STEPS_PER_SEG; m++)
				if (!walk_step(skb, c, a))
					break;
			if (m == MAX_STEPS_PER_SEG && a->off < pp->payload_len) {
				stat_inc(S_PARSE_FAILED); /* more than we follow in one segment */
				st->mode = SM_UNSYNC;
				lost_sync(c, a);
			}
		}
	}
	if ((pp->tcp_flags & TCPF_FIN) && !is_req) {
		/* the server closed: a close-delimited body ends here, and
		 * nothing else pending can be answered now */
		if (c->resp.mode == SM_UNTIL_CLOSE)
			finish_response(&a->key, c,
					FLAGS_IF(c->resp.body_gap ? EV_RESP_BODY :
						 EV_RESP_END | EV_RESP_BODY, ifindex),
					c->resp.last_data_ns);
		else
			finish_response(&a->key, c, FLAGS_IF(0, ifindex), 0);
		flush_pending(&a->key, c, FLAGS_IF(R_SERVER_FIN, ifindex), now, c->tail);
		release(&st->busy);
		bpf_map_delete_elem(&conns, &a->key);
		return TC_ACT_UNSPEC_;
	}
	release(&st->busy);
	return TC_ACT_UNSPEC_;

no_conn:
	if (!is_req && pp->payload_len >= 12) {
		__u8 b[12];
		__u8 v;

		if (!bpf_skb_load_bytes(skb, pp->payload_off, b, 12) && match_status(b, &v))
			stat_inc(S_UNMATCHED_RESPONSE);
	}
	return TC_ACT_UNSPEC_;
}

SEC("tc")
int redtap_req(struct __sk_buff *skb)
{
	return handle(skb, 1, 0);
}

SEC("tc")
int redtap_resp(struct __sk_buff *skb)
{
	return handle(skb, 0, 0);
}

SEC("tc")
int redtap_pod_req(struct __sk_buff *skb)
{
	return handle(skb, 1, 1);
}

SEC("tc")
int redtap_pod_resp(struct __sk_buff *skb)
{
	return handle(skb, 0, 1);
}

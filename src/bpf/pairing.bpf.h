/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* pairing.bpf.h: pairing */
#ifndef __REDTAP_PAIRING_BPF_H
#define __REDTAP_PAIRING_BPF_H

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

#endif /* __REDTAP_PAIRING_BPF_H */

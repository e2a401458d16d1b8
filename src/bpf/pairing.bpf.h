/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* pairing.bpf.h: requests and their responses.
 *
 * Each connection keeps a FIFO of its pending requests (conn_state head..
 * tail-1; the requests themselves in the connection's inline slot, the
 * usual one in flight, or in the `pending` map while the slot holds
 * another): the request side pushes, the response side pops, pairing the
 * n-th final response with the n-th request. Whatever cannot be paired for sure (lost data,
 * pipelining across a gap, a reset) is reported unanswered with a reason,
 * never mispaired. Events leave through the `events` ring buffer (emit()).
 *
 * Reads wakeup_bytes, a .rodata tunable of redtap.bpf.c. */
#ifndef __REDTAP_PAIRING_BPF_H
#define __REDTAP_PAIRING_BPF_H

#include "redtap.h"
#include "maps.bpf.h"

/* Fill @dst (a struct req_key) with the `pending` key of request number
 * @number of connection @key (a struct conn_key); yields &@dst. A
 * macro: the 40-byte key is copied with the alignment its place is known
 * to have (a function's pointer argument would forget it, and copy 4 bytes
 * at a time). */
#define PENDING_KEY(dst, key, number) ({		\
	(dst).conn = (key);			\
	(dst).seq = (number);			\
	(dst).pad = 0;				\
	&(dst);					\
})

/* Copy a request-target of @len (<= MAX_URL_LEN) bytes from @src, in
 * 64-byte blocks: the bytes after @len to the block's end come along (and
 * mean nothing: readers take url_len bytes). */
static __always_inline void url_copy(char *dst, const char *src, __u32 len)
{
#pragma unroll
	for (int b = 0; b < MAX_URL_LEN / 64; b++)
		if (len > b * 64)
			__builtin_memcpy(dst + b * 64, src + b * 64, 64);
}

/* Does @conn's inline slot hold request number @seq? (An atomic read:
 * the slot's bytes are read after it.) */
static __always_inline int inline_holds(struct conn_state *conn, __u32 seq)
{
	return __sync_fetch_and_add(&conn->inline_used, 0) == INLINE_HELD &&
	       conn->inline_seq == seq;
}

/* Pending request number @rkey->seq of @conn (@rkey: its `pending` key):
 * in the inline slot or in `pending`; NULL if neither (evicted). */
static __always_inline struct pending_req *pending_find(struct conn_state *conn,
							 struct req_key *rkey,
							 struct scratch *scratch)
{
	if (STAGE_NO_PENDING)
		return &scratch->req;
	if (inline_holds(conn, rkey->seq))
		return &conn->inline_req;
	return bpf_map_lookup_elem(&pending, rkey);
}

/* Send request number @seq of connection @key (@conn) to user space with
 * its @outcome (answered or not), and forget it. A request evicted from
 * `pending` is counted instead. Returns 0. A global function (verified once). */
__noinline int emit(struct conn_key *key, struct conn_state *conn, __u32 seq,
		    struct emit_args *outcome)
{
	struct scratch *scratch = get_scratch();
	struct http_event *event;
	struct pending_req *req;
	struct req_key *rkey;

	if (!key || !conn || !outcome || !scratch)
		return 0;
	rkey = PENDING_KEY(scratch->ekey, *key, seq);
	req = pending_find(conn, rkey, scratch);
	if (!req) {
		stat_inc(S_REQ_EVICTED);
		return 0;
	}
	if (STAGE_NO_RINGBUF) {
		stat_inc(S_EVENTS);
		goto out;
	}
	event = bpf_ringbuf_reserve(&events, sizeof(*event), 0);
	if (!event) {
		stat_inc(S_RINGBUF_FULL);
		goto out;
	}
	/* reserve -> fill -> submit; wake the reader only for a batch */
	event->req_ns = req->ts_ns;
	event->resp_ns = outcome->resp_ns;
	event->resp_last_ns = outcome->last_ns;
	event->req_body = req->req_body;
	event->resp_body = outcome->resp_body;
	event->conn = *key;
	event->status = outcome->status;
	event->url_len = req->url_len > MAX_URL_LEN ? MAX_URL_LEN : req->url_len;
	event->method = req->method;
	event->version = req->version;
	event->flags = req->flags | outcome->flags | (outcome->reason ? EV_UNANSWERED : 0);
	event->reason = outcome->reason;
	event->ifindex = outcome->ifindex;
	event->pad = 0;
	__builtin_memcpy(event->method_name, req->method_name, METHOD_NAME_LEN);
	url_copy(event->url, req->url, event->url_len);
	__u64 avail = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	bpf_ringbuf_submit(event, avail >= wakeup_bytes ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
	stat_inc(S_EVENTS);
	if (outcome->reason)
		stat_inc(S_UNANSWERED);
out:
	if (STAGE_NO_PENDING)
		return 0;
	if (req == &conn->inline_req) /* after its last read (an atomic exchange) */
		__sync_lock_test_and_set(&conn->inline_used, INLINE_FREE);
	else
		bpf_map_delete_elem(&pending, rkey);
	return 0;
}

/* Pop the FIFO's head (there is one): send it with @outcome. */
static __always_inline void fifo_pop(struct conn_key *key, struct conn_state *conn,
				     struct emit_args *outcome)
{
	emit(key, conn, conn->head, outcome);
	conn->head++;
	stat_inc(S_PENDING_POPPED);
}

/* No room for another request: the FIFO is full, or requests were
 * skipped already (their responses come first: the next one must follow). */
static __always_inline int fifo_full(const struct conn_state *conn)
{
	return conn->overflow || conn->tail - conn->head >= MAX_PIPELINE;
}

/* A request is not queued: its response will be skipped (counted in
 * conn->overflow), so that it pairs with no other request. */
static __always_inline void fifo_skip(struct conn_state *conn)
{
	/* atomic: the response side decrements it on another CPU */
	__sync_fetch_and_add(&conn->overflow, 1);
}

/* Queue scratch->req as request number conn->tail of @args' connection:
 * in its inline slot if free, else in `pending`. Returns 1, or 0 when it
 * could not be stored (counted, and skipped: fifo_skip()). */
static __always_inline int fifo_push(struct conn_state *conn, const struct walk_args *args,
				     struct scratch *scratch)
{
	if (STAGE_NO_PENDING) {
	} else if (__sync_val_compare_and_swap(&conn->inline_used, INLINE_FREE,
					       INLINE_FILLING) == INLINE_FREE) {
		/* fill, then publish (an atomic exchange orders the writes) */
		__builtin_memcpy(&conn->inline_req, &scratch->req,
				 __builtin_offsetof(struct pending_req, url));
		url_copy(conn->inline_req.url, scratch->req.url, scratch->req.url_len);
		conn->inline_seq = conn->tail;
		__sync_lock_test_and_set(&conn->inline_used, INLINE_HELD);
	} else if (bpf_map_update_elem(&pending, PENDING_KEY(scratch->rkey, args->key, conn->tail),
				       &scratch->req, BPF_ANY)) {
		stat_inc(S_PENDING_MAP_FULL);
		fifo_skip(conn);
		return 0;
	}
	conn->tail++;
	stat_inc(S_PENDING_PUSHED);
	return 1;
}

/* Two __u32 arguments in one, for global functions (at most 5 arguments). */
#define FLAGS_IF(flags, ifindex) ((__u64)(flags) << 32 | (__u32)(ifindex))

/* The response to the FIFO head is complete (or will not be followed
 * further): send it and pop the head. @flags_if: FLAGS_IF(end_flags,
 * ifindex), @end_flags EV_RESP_END|EV_RESP_BODY when the last byte
 * (@last_ns) and the body size are known. No response in progress: nothing
 * to do. Returns 0. A global function (verified once). */
__noinline int finish_response(struct conn_key *key, struct conn_state *conn, __u64 flags_if,
			       __u64 last_ns)
{
	__u8 end_flags = flags_if >> 32;
	__u32 ifindex = (__u32)flags_if;
	struct scratch *scratch = get_scratch();
	struct emit_args *outcome;

	if (!key || !conn || !scratch || !conn->resp_status)
		return 0;
	if (conn->head != conn->tail) {
		outcome = &scratch->ea;
		outcome->resp_ns = conn->resp_first_ns;
		outcome->last_ns = (end_flags & EV_RESP_END) ? last_ns : 0;
		outcome->resp_body = conn->resp.body_seen;
		outcome->ifindex = ifindex;
		outcome->status = conn->resp_status;
		outcome->reason = R_NONE;
		outcome->flags = end_flags;
		fifo_pop(key, conn, outcome);
	}
	conn->resp_status = 0;
	return 0;
}

/* finish_response()'s end flags for a body that ended with @stream's
 * last byte: a body with unseen bytes ended at an unknown time. */
static __always_inline __u8 body_end_flags(const struct stream_state *stream)
{
	return stream->body_gap ? EV_RESP_BODY : EV_RESP_END | EV_RESP_BODY;
}

/* Report every pending request before number @until as unanswered
 * (@reason_if: FLAGS_IF(reason, ifindex)); resp_ns of such an event is
 * @now, when it was given up. Returns 0. A global function (verified once). */
__noinline int flush_pending(struct conn_key *key, struct conn_state *conn, __u64 reason_if,
			     __u64 now, __u32 until)
{
	__u8 reason = reason_if >> 32;
	__u32 ifindex = (__u32)reason_if;
	struct scratch *scratch = get_scratch();
	struct emit_args *outcome;

	if (!key || !conn || !scratch)
		return 0;
	outcome = &scratch->ea;
	__builtin_memset(outcome, 0, sizeof(*outcome));
	outcome->resp_ns = now;
	outcome->ifindex = ifindex;
	outcome->reason = reason;
	for (int i = 0; i < MAX_PIPELINE; i++) {
		if (conn->head == conn->tail || conn->head == until)
			break;
		fifo_pop(key, conn, outcome);
		if (reason == R_LOST)
			stat_inc(S_RESYNC_DROPPED);
	}
	return 0;
}

/* The response in progress ends unfinished (its framing is lost) and the
 * pending requests before number @until are reported unanswered (@reason). */
static __always_inline void report_unanswered(struct conn_key *key, struct conn_state *conn,
					      __u8 reason, __u32 ifindex, __u64 now, __u32 until)
{
	finish_response(key, conn, FLAGS_IF(0, ifindex), 0);
	flush_pending(key, conn, FLAGS_IF(reason, ifindex), now, until);
}

/* The server closed (FIN, seen at @now): a close-delimited body ends
 * here, and nothing else pending can be answered now (R_SERVER_FIN). */
static __always_inline void server_closed(struct conn_key *key, struct conn_state *conn,
					  __u32 ifindex, __u64 now)
{
	if (conn->resp.mode == SM_UNTIL_CLOSE)
		finish_response(key, conn, FLAGS_IF(body_end_flags(&conn->resp), ifindex),
				conn->resp.last_data_ns);
	else
		finish_response(key, conn, FLAGS_IF(0, ifindex), 0);
	flush_pending(key, conn, FLAGS_IF(R_SERVER_FIN, ifindex), now, conn->tail);
}

/* Requests queued so far will get no answer we can pair: the response
 * side reports them (R_LOST, report_marked_lost()) before it looks at its
 * next segment. Only the response side pops the FIFO, so two CPUs never
 * pop the same request. */
static __always_inline void mark_lost(struct conn_state *conn)
{
	conn->lost_until = conn->tail;
	conn->lost_pending = 1;
}

/* On the response side: report what the request side marked lost. */
static __always_inline void report_marked_lost(struct conn_key *key, struct conn_state *conn,
					       __u32 ifindex, __u64 now)
{
	if (!conn->lost_pending)
		return;
	conn->lost_pending = 0;
	report_unanswered(key, conn, R_LOST, ifindex, now, conn->lost_until);
}

/* A request (number conn->tail) arrives while others are pending:
 * pipelining, or were their answers lost before we saw them? The client's
 * ACK (@ack) tells: if it has received response bytes we have not seen,
 * answers were lost. */
static __always_inline void request_behind_pending(struct conn_state *conn, __u32 ack)
{
	if (conn->tail == conn->head || conn->overflow)
		return;
	if (conn->resp.seq_valid && (__s32)(ack - conn->resp.next_seq) > 0) {
		stat_inc(S_GAP);
		mark_lost(conn);
		conn->resp.mode = SM_UNSYNC;
		conn->resp.next_seq = ack; /* received by the client, unseen by us */
		conn->check_on = 2;
	} else {
		conn->pipelined = 1;
	}
}

/* A stream (@stream, of @args' direction) lost track of message boundaries
 * (gap, garbage, bad framing, more messages in a segment than it follows):
 * count it (@why, enum stat_idx) and look for a message start again.
 * A pipelining client: how many requests were missed, or which response
 * answers which, cannot be known any more, so the connection is given up
 * (counted) and its pending requests reported (R_LOST), never mispaired.
 * Otherwise each request waits for its answer, and the TCP ACK of the next
 * response tells whether it can answer the next request
 * (check_early_response). Responses lost: the pending requests are
 * reported (R_LOST). */
static __always_inline void lose_sync(struct conn_state *conn, struct walk_args *args,
				      struct stream_state *stream, __u32 why)
{
	stat_inc(why);
	stream->mode = SM_UNSYNC;
	if (!args->is_req) {
		/* report_unanswered(), spelled out: reading args after the calls
		 * leaves fewer values to keep across them */
		finish_response(&args->key, conn, FLAGS_IF(0, args->ifindex), 0);
		flush_pending(&args->key, conn, FLAGS_IF(R_LOST, args->ifindex), args->now,
			      conn->tail);
	} else if (conn->pipelined) {
		mark_lost(conn); /* the response side reports them: it alone pops */
	}
	if (conn->pipelined) {
		conn->req.mode = SM_TUNNEL;
		conn->resp.mode = SM_TUNNEL;
		stat_inc(S_GIVEN_UP);
	}
	conn->check_on = 2;
}

/* A message of @args' direction ended, with @size body bytes: a request's
 * body size goes to its pending entry (if it was queued), a response is
 * sent. */
static __always_inline void message_done(struct conn_state *conn, struct walk_args *args,
					 __u64 size)
{
	if (args->is_req) {
		struct scratch *scratch = get_scratch();

		if (scratch && conn->req_pushed && conn->tail != conn->head) {
			struct req_key *rkey;
			struct pending_req *req;

			rkey = PENDING_KEY(scratch->rkey, args->key, conn->tail - 1);
			req = pending_find(conn, rkey, scratch);
			if (req) {
				req->req_body = size > 0xffffffffULL ? 0xffffffff : size;
				req->flags |= EV_REQ_BODY;
			}
		}
		conn->req_pushed = 0;
	} else {
		__u8 end_flags = body_end_flags(&conn->resp);

		finish_response(&args->key, conn, FLAGS_IF(end_flags, args->ifindex), args->now);
	}
}

#endif /* __REDTAP_PAIRING_BPF_H */

/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* message.bpf.h: message heads. A request head is parsed into a pending
 * request and queued; a response head is matched with the FIFO's head.
 * Heads may begin with bytes kept from the previous segment (SM_PARTIAL)
 * and may continue in the next one (parked: SM_HEADERS); once complete,
 * the head's framing tells how the walk goes on (stream.bpf.h:
 * frame_body()).
 *
 * The parsers' results, for walk.bpf.h: bytes of the segment used, 0 if
 * no message starts at the offset, -1 if the segment is used up. */
#ifndef __REDTAP_MESSAGE_BPF_H
#define __REDTAP_MESSAGE_BPF_H

#include "redtap.h"
#include "http.bpf.h"
#include "stream.bpf.h"
#include "maps.bpf.h"
#include "pairing.bpf.h"

/* After a complete head of @stream (frame_body()'s result @framing): the
 * message is done, its body follows, or the stream lost sync. */
static __always_inline void after_head(struct conn_state *conn, struct walk_args *args,
				       struct stream_state *stream, int framing)
{
	if (framing > 0)
		message_done(conn, args, 0);
	else if (framing < 0)
		lose_sync(conn, args, stream, S_UNSUPPORTED_FRAMING);
}

/* A head is cut by the end of the segment after @scanned bytes of it:
 * keep all the scan knows, so that the next segment continues it exactly
 * (a header name or value may be split too). @keep: HF_NO_BODY, HF_TRAILER. */
static __always_inline void park_head(struct stream_state *stream, struct head_scan *scan,
				      __u32 scanned, __u8 keep)
{
	stream->mode = SM_HEADERS;
	stream->hdr_w0 = scan->w0;
	stream->hdr_w1 = scan->w1;
	stream->hdr_cl = scan->cl;
	if (scan->line_start == LINE_UNKNOWN)
		stream->line_len = LINE_UNKNOWN;
	else
		stream->line_len = (scanned - scan->line_start) | (scan->colon ? LINE_COLON : 0);
	stream->hdr_flags = keep | scan->flags | (scan->in_start ? HF_IN_START : 0) |
			    (scan->in_cl ? HF_IN_CL : 0) | (scan->in_te ? HF_IN_TE : 0);
}

/* A head scan's @result when the head did not end in this segment: park
 * it (SCAN_MORE, after @scanned bytes; @keep: see park_head()) or give up
 * (SCAN_TOO_LONG). Returns 1 then: the segment is used up; 0: the head is
 * complete. */
static __always_inline int head_unfinished(struct conn_state *conn, struct walk_args *args,
					   struct stream_state *stream, struct head_scan *scan,
					   int result, __u32 scanned, __u8 keep)
{
	if (result == SCAN_MORE) {
		park_head(stream, scan, scanned, keep);
		return 1;
	}
	if (result == SCAN_TOO_LONG) {
		lose_sync(conn, args, stream, S_HEADER_TOO_LONG);
		return 1;
	}
	return 0;
}

/* Continue a head (or a chunked trailer) that began in an earlier segment,
 * at payload offset @off. Returns bytes used, or -1 when the segment ends
 * inside it. */
static __always_inline int continue_head(struct __sk_buff *skb, struct conn_state *conn,
					 struct walk_args *args, __u32 off, struct scratch *scratch)
{
	struct stream_state *stream = walk_stream(conn, args);
	struct head_scan *scan = &scratch->scan;
	__u8 keep = stream->hdr_flags & (HF_NO_BODY | HF_TRAILER);
	int result;

	scan->w0 = stream->hdr_w0;
	scan->w1 = stream->hdr_w1;
	scan->cl = stream->hdr_cl;
	scan->flags = stream->hdr_flags & (HF_CONTENT_LENGTH | HF_CHUNKED | HF_BAD_LENGTH);
	scan->in_start = !!(stream->hdr_flags & HF_IN_START);
	scan->in_cl = !!(stream->hdr_flags & HF_IN_CL);
	scan->in_te = !!(stream->hdr_flags & HF_IN_TE);
	if (stream->line_len == LINE_UNKNOWN) {
		scan->line_start = LINE_UNKNOWN;
	} else { /* the line began line_len bytes before this segment */
		scan->line_start = 0 - (stream->line_len & ~LINE_COLON);
		scan->colon = !!(stream->line_len & LINE_COLON);
	}
	result = scan_head(skb, args->payload_off + off, args->payload_len - off, scan);
	if (head_unfinished(conn, args, stream, scan, result, args->payload_len - off, keep))
		return -1;
	if (keep & HF_TRAILER) { /* end of a chunked body */
		stream->mode = SM_HEAD;
		stat_inc(S_CHUNKED);
		message_done(conn, args, stream->body_seen);
	} else {
		int has_body = !(keep & HF_NO_BODY);

		after_head(conn, args, stream,
			   frame_body(stream, scan->flags, scan->cl, has_body, !args->is_req));
	}
	return scan->hdr_end;
}

/* The first bytes of a message at payload offset @off (@avail bytes of the
 * segment from there), in scratch->hdr: those kept from the end of the
 * previous segment (SM_PARTIAL: *kept_len bytes), then this segment's.
 * Returns 0 when there are @need bytes at least; 1 for a line end to skip
 * (before a request: RFC 9112 2.2; after a response body); -1 when there
 * are fewer: they are kept (with those kept before) for the next segment. */
static __always_inline int message_start(struct __sk_buff *skb, struct stream_state *stream,
					 struct walk_args *args, __u32 off, __u32 avail,
					 struct scratch *scratch, __u32 need, __u32 *kept_len)
{
	__u32 kept = stream->mode == SM_PARTIAL ? stream->partial_len : 0;
	__u32 count = avail < 16 ? avail : 16;

	if (kept > 11)
		kept = 11;
	__builtin_memset(scratch->hdr, 0, sizeof(scratch->hdr));
	__builtin_memcpy(scratch->hdr, stream->partial, sizeof(stream->partial));
	if (count > 0)
		bpf_skb_load_bytes(skb, args->payload_off + off, scratch->hdr + kept,
				   ((count - 1) & 15) + 1);
	*kept_len = kept;
	if (!kept && (scratch->hdr[0] == '\r' || scratch->hdr[0] == '\n'))
		return 1;
	if (kept + avail < need) {
		if (stream->mode != SM_PARTIAL)
			stream->body_left = args->now; /* time of the message's first byte */
		__builtin_memcpy(stream->partial, scratch->hdr, sizeof(stream->partial));
		stream->partial_len = kept + avail;
		stream->mode = SM_PARTIAL;
		return -1;
	}
	return 0;
}

/* Parse one request at payload offset @off and queue it. Returns bytes
 * used, 0 if no request starts here, -1 if the segment is used up. */
static __always_inline int parse_request(struct __sk_buff *skb, struct conn_state *conn,
					 struct walk_args *args, __u32 off, struct scratch *scratch)
{
	struct stream_state *stream = &conn->req;
	struct head_scan *scan = &scratch->scan;
	struct pending_req *req = &scratch->req;
	__u32 avail = args->payload_len - off;
	__u32 method_len = 0, kept_len, target_off, target_kept = 0, target_seg, url_len;
	__u8 method, version = 0, flags = 0, target_done = 0, pushed = 0;
	__u64 first8, start_ns = args->now;
	int result;

	result = message_start(skb, stream, args, off, avail, scratch, 8, &kept_len);
	if (result)
		return result;
	__builtin_memcpy(&first8, scratch->hdr, 8);
	method = match_method(first8, &method_len);
	if (method == M_UNKNOWN) {
		method_len = match_token_method(scratch->hdr);
		if (!method_len)
			return 0;
		method = M_OTHER;
	}
	if (stream->mode == SM_PARTIAL)
		start_ns = stream->body_left;

	/* request-target bytes already in the kept start (at most 3) */
	if (kept_len > method_len + 1) {
		for (int i = 0; i < 8; i++) {
			__u32 j = method_len + 1 + i;

			if (j >= kept_len || j >= 16)
				break;
			if (scratch->hdr[j & 15] == ' ') {
				target_done = 1;
				break;
			}
			req->url[i & 7] = scratch->hdr[j & 15];
			target_kept++;
		}
		target_off = 0;
	} else {
		/* where the target starts in this segment */
		target_off = method_len + 1 - kept_len;
	}
	if (target_off > avail)
		target_off = avail;

	/* scan from the request-target: its first space ends it */
	scan->in_start = 1;
	scan->line_start = LINE_UNKNOWN;
	result = scan_head(skb, args->payload_off + off + target_off, avail - target_off, scan);
	if (target_done) {
		target_seg = 0;
	} else if (scan->sp1 && (!scan->eol1 || scan->sp1 < scan->eol1)) {
		target_seg = scan->sp1 - 1;
		if (target_off + target_seg + 9 <= avail) {
			__u64 version8 = 0;

			bpf_skb_load_bytes(skb, args->payload_off + off + target_off + target_seg + 1,
					   &version8, 8);
			version = match_version(version8);
		}
	} else if (scan->eol1) { /* no version: "GET /x\r\n" (HTTP/0.9 style) */
		target_seg = scan->eol1 - 1 - scan->cr1;
	} else {
		target_seg = avail - target_off; /* the line goes on in the next segment */
		flags |= EV_URL_TRUNCATED;
	}
	if (method == M_OTHER && !version)
		return 0; /* an unknown token is a method only in a whole request line */
	stat_inc(S_REQUESTS);
	url_len = target_kept + target_seg;
	if (url_len > MAX_URL_LEN) {
		url_len = MAX_URL_LEN;
		flags |= EV_URL_TRUNCATED;
	}

	request_behind_pending(conn, args->ack);
	if (fifo_full(conn)) {
		fifo_skip(conn); /* its response will be skipped, keeping the pairing */
		stat_inc(S_FIFO_OVERFLOW);
	} else {
		if (conn->check_on == 2) { /* see check_early_response */
			conn->check_on = 1;
			conn->check_idx = conn->tail;
			conn->check_seq = args->seq + off;
		}
		req->ts_ns = start_ns;
		req->req_body = 0;
		__builtin_memset(req->method_name, 0, METHOD_NAME_LEN);
		if (method == M_OTHER)
			__builtin_memcpy(req->method_name, scratch->hdr, METHOD_NAME_LEN - 1);
		req->method = method;
		req->version = version;
		req->flags = flags;
		req->url_len = url_len;
		target_seg = url_len - target_kept;
		if (target_kept < 8 && target_seg > 0 && target_seg <= MAX_URL_LEN - target_kept)
			bpf_skb_load_bytes(skb, args->payload_off + off + target_off,
					   req->url + target_kept, ((target_seg - 1) & 0xff) + 1);
		pushed = fifo_push(conn, args, scratch);
	}
	stream->partial_len = 0;
	conn->req_pushed = pushed;
	if (head_unfinished(conn, args, stream, scan, result, avail - target_off, 0))
		return -1;
	after_head(conn, args, stream, frame_body(stream, scan->flags, scan->cl, 1, 0));
	if (method == M_CONNECT)
		stream->mode = SM_TUNNEL; /* what follows is not HTTP (if accepted) */
	return target_off + scan->hdr_end;
}

/* The first response after a (re)start of tracking must not be paired
 * with a request its server had not received when it answered: such a
 * response answers an earlier request that was not seen (the agent started
 * mid-connection, or request data was lost). Its ACK tells. Returns 1 for
 * such a response. */
static __always_inline int check_early_response(struct conn_state *conn, struct walk_args *args)
{
	if (conn->check_on != 1 || conn->head != conn->check_idx)
		return 0;
	if ((__s32)(args->ack - conn->check_seq) <= 0)
		return 1;
	conn->check_on = 0;
	return 0;
}

/* Parse one response at payload offset @off and pair it with the FIFO's
 * head (see parse_request). */
static __always_inline int parse_response(struct __sk_buff *skb, struct conn_state *conn,
					  struct walk_args *args, __u32 off, struct scratch *scratch)
{
	struct stream_state *stream = &conn->resp;
	struct head_scan *scan = &scratch->scan;
	__u32 avail = args->payload_len - off, kept_len;
	__u8 version, method = M_UNKNOWN;
	__u16 status;
	int result, has_body;

	result = message_start(skb, stream, args, off, avail, scratch, 12, &kept_len);
	if (result)
		return result;
	status = match_status(scratch->hdr, &version);
	if (!status)
		return 0;

	if (status < 200 && status != 101) {
		stat_inc(S_INTERIM); /* 100 Continue, 103 Early Hints: not final */
	} else {
		__u64 start_ns = stream->mode == SM_PARTIAL ? stream->body_left : args->now;

		stat_inc(S_RESPONSES);
		/* one still open: its framing was lost */
		finish_response(&args->key, conn, FLAGS_IF(0, args->ifindex), 0);
		if (conn->head != conn->tail) {
			if (check_early_response(conn, args)) {
				stat_inc(S_EARLY_RESPONSE);
			} else {
				struct req_key *rkey;
				struct pending_req *req;

				rkey = PENDING_KEY(scratch->rkey, args->key, conn->head);
				req = pending_find(conn, rkey, scratch);
				method = req ? req->method : M_UNKNOWN;
				conn->resp_method = method;
				conn->resp_status = status;
				conn->resp_first_ns = start_ns;
			}
		} else if (conn->overflow) {
			/* the only decrement (under the response side's claim):
			 * a concurrent increment cannot make it go below 0 */
			__sync_fetch_and_sub(&conn->overflow, 1);
			stat_inc(S_OVERFLOW_RESPONSES);
		} else {
			stat_inc(S_UNMATCHED_RESPONSE);
		}
	}
	stream->partial_len = 0;

	has_body = response_has_body(method, status);
	scan->in_start = 1;
	scan->line_start = LINE_UNKNOWN;
	result = scan_head(skb, args->payload_off + off, avail, scan);
	if (status == 101 || (method == M_CONNECT && status >= 200 && status < 300)) {
		finish_response(&args->key, conn, FLAGS_IF(EV_RESP_END | EV_RESP_BODY, args->ifindex),
				args->now);
		conn->req.mode = SM_TUNNEL;
		stream->mode = SM_TUNNEL;
		return -1;
	}
	if (method == M_CONNECT && conn->req.mode == SM_TUNNEL)
		conn->req.mode = SM_HEAD; /* CONNECT refused: HTTP goes on */
	if (head_unfinished(conn, args, stream, scan, result, avail, has_body ? 0 : HF_NO_BODY))
		return -1;
	after_head(conn, args, stream, frame_body(stream, scan->flags, scan->cl, has_body, 1));
	return scan->hdr_end;
}

#endif /* __REDTAP_MESSAGE_BPF_H */

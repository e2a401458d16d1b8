/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* walk.bpf.h: the walk through a segment's new bytes, one step at a time
 * (walk_step(): skip body bytes, read a chunk-size line, parse a message
 * head), from where the stream stands (stream_state.mode). */
#ifndef __REDTAP_WALK_BPF_H
#define __REDTAP_WALK_BPF_H

#include "redtap.h"
#include "stream.bpf.h"
#include "maps.bpf.h"
#include "pairing.bpf.h"
#include "message.bpf.h"

/* SM_BODY, SM_CHUNK_DATA: skip what is left of the body (or chunk) in the
 * segment's @avail bytes from @off; at its end, the message is done (or
 * the next chunk-size line follows). */
static __always_inline void walk_body(struct conn_state *conn, struct walk_args *args,
				      struct stream_state *stream, __u32 off, __u64 avail)
{
	__u64 skipped = avail;

	if (skipped > stream->body_left)
		skipped = stream->body_left;
	stream->body_left -= skipped;
	args->off = off + skipped;
	if (stream->mode == SM_BODY)
		stream->body_seen += skipped;
	if (stream->body_left)
		return;
	if (stream->mode == SM_BODY) {
		stream->mode = SM_HEAD;
		message_done(conn, args, stream->body_seen);
	} else {
		stream->mode = SM_CHUNK_SIZE;
		stream->hdr_cl = 0;
		stream->hdr_flags = 0;
	}
}

/* SM_CHUNK_SIZE: read (part of) a chunk-size line at @off (@avail bytes
 * of the segment from there). Returns 1 to go on, 0 when done. */
static __always_inline int walk_chunk_size(struct __sk_buff *skb, struct conn_state *conn,
					   struct walk_args *args, struct stream_state *stream,
					   __u32 off, __u32 avail, struct scratch *scratch)
{
	__u32 count = avail, used = 0;
	int result;

	if (count > 16)
		count = 16;
	count &= 31;
	if (!count || bpf_skb_load_bytes(skb, args->payload_off + off, scratch->hdr,
					 ((count - 1) & 15) + 1) < 0)
		return 0;
	result = chunk_size_line(stream, scratch->hdr, count, &used);
	args->off = off + used;
	if (result == CL_BAD) {
		lose_sync(conn, args, stream, S_UNSUPPORTED_FRAMING);
		return 0;
	}
	if (result == CL_DONE) {
		if (stream->hdr_cl == 0) { /* last chunk: trailer section follows */
			stream->mode = SM_HEADERS;
			stream->hdr_flags = HF_TRAILER;
			stream->hdr_w0 = 0x0d0a; /* a line just ended */
			stream->hdr_w1 = 0;
			stream->line_len = 0;
			stream->hdr_cl = 0;
		} else {
			stream->mode = SM_CHUNK_DATA;
			stream->body_left = stream->hdr_cl + 2; /* data + CRLF */
			stream->body_seen += stream->hdr_cl;
		}
	}
	return 1;
}

/* Take one step through a segment's new bytes, from args->off (advanced
 * past what the step used). Returns 1 to go on, 0 when done. A global
 * function: verified once, called up to MAX_STEPS_PER_SEG times. */
__noinline int walk_step(struct __sk_buff *skb, struct conn_state *conn, struct walk_args *args)
{
	struct stream_state *stream;
	struct scratch *scratch;
	__u32 off, len;
	int used;

	if (!conn || !args)
		return 0;
	off = args->off;
	len = args->payload_len;
	if (off >= len)
		return 0; /* the segment is done (the usual last call) */
	scratch = get_scratch();
	if (!scratch)
		return 0;
	__builtin_memset(&scratch->scan, 0, sizeof(scratch->scan));
	stream = walk_stream(conn, args);
	switch (stream->mode) {
	case SM_BODY:
	case SM_CHUNK_DATA:
		walk_body(conn, args, stream, off, len - off);
		return 1;
	case SM_CHUNK_SIZE:
		return walk_chunk_size(skb, conn, args, stream, off, len - off, scratch);
	case SM_HEADERS:
		used = continue_head(skb, conn, args, off, scratch);
		break;
	case SM_UNSYNC:
		if (off != 0)
			return 0; /* look for a message only at a segment start */
		/* fall through */
	case SM_HEAD:
	case SM_PARTIAL:
		used = args->is_req ? parse_request(skb, conn, args, off, scratch) :
				      parse_response(skb, conn, args, off, scratch);
		if (used == 0) {
			if (stream->mode == SM_HEAD || stream->mode == SM_PARTIAL)
				lose_sync(conn, args, stream, S_PARSE_FAILED);
			return 0;
		}
		break;
	case SM_UNTIL_CLOSE:
		stream->body_seen += len - off;
		return 0;
	default: /* SM_TUNNEL */
		return 0;
	}
	if (used < 0)
		return 0;
	args->off = off + used;
	return 1;
}

/* Walk a segment of @stream (the direction of @args, which describes the
 * segment) through its new bytes: at most MAX_STEPS_PER_SEG steps, more
 * lose the stream's sync. A retransmission is only counted; bytes missing
 * before it may lose the sync (seg_start()). */
static __always_inline void walk_segment(struct __sk_buff *skb, struct conn_state *conn,
					 struct walk_args *args, struct stream_state *stream)
{
	int lost, step, start = seg_start(stream, args->seq, args->payload_len, &lost);

	if (start == SEG_SKIP) {
		stat_inc(S_RETRANSMIT);
		return;
	}
	if (lost)
		lose_sync(conn, args, stream, S_GAP);
	conn->last_ns = args->now;
	stream->last_data_ns = args->now;
	args->off = start;
	for (step = 0; step < MAX_STEPS_PER_SEG; step++)
		if (!walk_step(skb, conn, args))
			break;
	/* more messages than we follow in one segment */
	if (step == MAX_STEPS_PER_SEG && args->off < args->payload_len)
		lose_sync(conn, args, stream, S_PARSE_FAILED);
}

#endif /* __REDTAP_WALK_BPF_H */

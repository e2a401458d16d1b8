/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* stream.bpf.h: one direction of a TCP connection as a stream of HTTP
 * messages: sequence tracking, body framing (Content-Length, chunked,
 * close-delimited), chunk-size lines. */
#ifndef __REDTAP_STREAM_BPF_H
#define __REDTAP_STREAM_BPF_H

#include "redtap.h"

/* seg_start() results besides the start offset */
#define SEG_SKIP  (-1)      /* nothing new in this segment      */

/* Can @missing (> 0) bytes be missing at the stream's current position
 * without losing a message boundary? Yes inside a body of known length
 * that holds them, in a close-delimited body, in a tunnel. The one rule
 * for seg_start() (which then skips them) and gap_loses_sync() (which
 * waits for them otherwise). */
static __always_inline int gap_is_harmless(const struct stream_state *st, __u32 missing)
{
	if (st->mode == SM_BODY || st->mode == SM_CHUNK_DATA)
		return st->body_left >= (__u64)missing;
	return st->mode == SM_UNTIL_CLOSE || st->mode == SM_TUNNEL;
}

/* Where the new data of this segment starts, after TCP sequence checks.
 * Returns the payload offset to parse from, or SEG_SKIP. Sets *lost when
 * bytes are missing where a message boundary may have been (resync). */
static __always_inline int seg_start(struct stream_state *st, __u32 seq, __u32 len, int *lost)
{
	__s32 d, end_d;
	int start = 0;

	*lost = 0;
	if (st->seq_valid) {
		d = (__s32)(seq - st->next_seq);
		end_d = d + (__s32)len;
		if (end_d <= 0)
			return SEG_SKIP; /* retransmission or a duplicate */
		if (d < 0) {
			start = -d; /* overlap: parse only the new bytes */
		} else if (d > 0) {
			if (!gap_is_harmless(st, d)) {
				st->mode = SM_UNSYNC;
				*lost = 1;
			} else if (st->mode != SM_TUNNEL) { /* a body: its bytes go unseen */
				if (st->mode != SM_UNTIL_CLOSE)
					st->body_left -= d; /* may now be 0: the walk ends it */
				st->body_seen += d;
				st->body_gap = 1;
			}
		}
	}
	st->next_seq = seq + len;
	st->seq_valid = 1;
	return start;
}

/* Would bytes missing before @seq lose the stream's sync? (Not when it is
 * lost already: SM_UNSYNC.) */
static __always_inline int gap_loses_sync(const struct stream_state *st, __u32 seq)
{
	__s32 d = (__s32)(seq - st->next_seq);

	if (!st->seq_valid || d <= 0 || st->mode == SM_UNSYNC)
		return 0;
	return !gap_is_harmless(st, d);
}

/* Has the response to a @method request with @status a body? RFC 9112 6.3 */
static __always_inline int response_has_body(__u8 method, __u16 status)
{
	if (method == M_HEAD || status < 200 || status == 204 || status == 304)
		return 0;
	return 1;
}

/* After a complete head: set up the body. Returns 1 if the message is
 * already complete (no body), 0 if a body follows, -1 if its framing
 * cannot be followed (the stream is then out of sync). */
static __always_inline int frame_body(struct stream_state *st, __u8 flags, __u64 cl,
				      int has_body, int close_delimited)
{
	st->body_seen = 0;
	st->body_gap = 0;
	if (!has_body) {
		st->mode = SM_HEAD;
		return 1;
	}
	if (flags & HF_BAD_LENGTH) {
		st->mode = SM_UNSYNC;
		return -1;
	}
	if (flags & HF_CHUNKED) { /* chunked wins over Content-Length (RFC 9112 6.3) */
		st->mode = SM_CHUNK_SIZE;
		st->hdr_cl = 0;
		st->hdr_flags = 0;
		return 0;
	}
	if (flags & HF_CONTENT_LENGTH) {
		st->body_left = cl;
		st->mode = cl ? SM_BODY : SM_HEAD;
		return cl ? 0 : 1;
	}
	if (close_delimited) {
		st->mode = SM_UNTIL_CLOSE;
		return 0;
	}
	st->mode = SM_HEAD;
	return 1;
}

static __always_inline int hexval(__u8 c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	c |= 0x20;
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

enum chunk_line { CL_MORE = 0, CL_DONE, CL_BAD };

/* Read (part of) a chunk-size line from @b (@n <= 16 bytes); the size
 * accumulates in st->hdr_cl. Sets *used; returns enum chunk_line. */
static __always_inline int chunk_size_line(struct stream_state *st, const __u8 *b, __u32 n,
					   __u32 *used)
{
#pragma unroll
	for (int i = 0; i < 16; i++) {
		__u8 c;
		int v;

		if (i >= n) {
			*used = n;
			return CL_MORE;
		}
		c = b[i];
		if (c == '\n') {
			*used = i + 1;
			return (st->hdr_flags & CF_DIGIT) ? CL_DONE : CL_BAD;
		}
		if (st->hdr_flags & CF_EXT)
			continue;
		v = hexval(c);
		if (v >= 0) {
			st->hdr_cl = st->hdr_cl * 16 + v;
			st->hdr_flags |= CF_DIGIT;
			if (st->hdr_cl > (1ULL << 40)) {
				*used = i + 1;
				return CL_BAD;
			}
		} else if (c == ';' || c == ' ' || c == '\t') {
			st->hdr_flags |= CF_EXT;
		} else if (c != '\r') {
			*used = i + 1;
			return CL_BAD;
		}
	}
	*used = 16;
	return CL_MORE;
}

#endif /* __REDTAP_STREAM_BPF_H */

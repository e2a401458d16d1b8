/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* walk.bpf.h: walk */
#ifndef __REDTAP_WALK_BPF_H
#define __REDTAP_WALK_BPF_H

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

#endif /* __REDTAP_WALK_BPF_H */

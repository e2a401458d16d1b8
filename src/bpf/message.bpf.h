/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* message.bpf.h: message */
#ifndef __REDTAP_MESSAGE_BPF_H
#define __REDTAP_MESSAGE_BPF_H

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

#endif /* __REDTAP_MESSAGE_BPF_H */

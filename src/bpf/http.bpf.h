/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* http.bpf.h: HTTP/1.x start lines and message heads, read from an skb.
 *
 * A message head is scanned in windows of SCAN_WINDOW bytes copied into a
 * per-CPU buffer; one bpf_loop pass per window walks the bytes with a small
 * state machine (head_scan) that finds the start line's spaces, the blank
 * line ending the head, Content-Length and Transfer-Encoding: chunked.
 * A step takes 8 bytes at once when none of them is one the state machine
 * acts on (a line end; the start line's first space; a header line's
 * first ':'), else the bytes up to that one, then it byte by byte.
 * bpf_loop keeps the verifier's work independent of the window size. */
#ifndef __REDTAP_HTTP_BPF_H
#define __REDTAP_HTTP_BPF_H

#include "redtap.h"

/* 8 characters as a little-endian u64, for one-load comparisons */
#define STR8(a, b, c, d, e, f, g, h)                                             \
	((__u64)(a) | (__u64)(b) << 8 | (__u64)(c) << 16 | (__u64)(d) << 24 |    \
	 (__u64)(e) << 32 | (__u64)(f) << 40 | (__u64)(g) << 48 | (__u64)(h) << 56)
#define LOWER8 0x2020202020202020ULL

/* Big-endian packing: the byte order of the shift registers below */
#define BE8(a, b, c, d, e, f, g, h) STR8(h, g, f, e, d, c, b, a)

struct head_scan {
	__u64 w0;          /* the last 8 bytes, newest in the low byte       */
	__u64 w1;          /* the 8 bytes before those                       */
	__u64 cl;          /* Content-Length value                           */
	__u32 len;         /* valid bytes in the current window              */
	__u32 base;        /* offset (from the scan origin) of the window    */
	__u32 sp1;         /* 1 + offset of the start line's 1st space (0: none) */
	__u32 eol1;        /* 1 + offset of the start line's '\n' (0: not yet)  */
	__u32 hdr_end;     /* offset just past the blank line (0: not yet)   */
	__u32 line_start;  /* offset of the current header line, or LINE_UNKNOWN */
	__u8 flags;        /* HF_*                                           */
	__u8 in_start;     /* still on the start line                        */
	__u8 in_cl;        /* reading a Content-Length value                 */
	__u8 in_te;        /* on a Transfer-Encoding line                    */
	__u8 colon;        /* the current line's ':' was seen                */
	__u8 cr1;          /* the start line ended with "\r\n"               */
	__u8 pad[2];
};

/* per-CPU scan space for scan_head: the scan state, the position in the
 * window, the window (SCAN_WINDOW bytes + slack for 8-byte loads). Kept in
 * a map, not on the stack, where the verifier would follow their exact
 * values through every bpf_loop step (and not converge). */
struct scan_window {
	struct head_scan h;
	__u32 at;          /* the next byte's offset in buf */
	__u32 pad;
	__u8 buf[SCAN_WINDOW + 8];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scan_window);
} scan_buf SEC(".maps");

/* bpf_loop context (on the stack, as bpf_loop wants): the scan space. */
struct scan_cb {
	struct scan_window *win;
};

/* A ':' ends the header name starting at s->line_start: note the names
 * that frame the body. The name is in the shift registers, so nothing is
 * indexed by a data-dependent offset (which keeps verification cheap). */
static __always_inline void header_name(struct head_scan *s, __u32 pos)
{
	__u32 n;

	s->colon = 1;
	if (s->line_start == LINE_UNKNOWN)
		return; /* name began in an earlier segment */
	n = pos - s->line_start;
	if (n == 14) {
		/* the ':' is already in w0 */
		if ((s->w0 | LOWER8) != BE8('-', 'l', 'e', 'n', 'g', 't', 'h', ':') ||
		    ((s->w1 | LOWER8) & 0xffffffffffffffULL) != BE8(0, 'c', 'o', 'n', 't', 'e', 'n', 't'))
			return;
		if (s->flags & HF_CONTENT_LENGTH)
			s->flags |= HF_BAD_LENGTH; /* repeated: refuse to guess */
		s->flags |= HF_CONTENT_LENGTH;
		s->in_cl = 1;
		s->cl = 0;
	} else if (n == 17) {
		if ((s->w0 | LOWER8) == BE8('n', 'c', 'o', 'd', 'i', 'n', 'g', ':') &&
		    (s->w1 | LOWER8) == BE8('a', 'n', 's', 'f', 'e', 'r', '-', 'e'))
			s->in_te = 1;
	}
}

/* End of a Transfer-Encoding line (its '\n' is in w0): is chunked last? */
static __always_inline void te_line_end(struct head_scan *s)
{
	__u64 v = s->w0 | LOWER8;

	/* "chunked\r\n" ('\r'|0x20 = '-', '\n'|0x20 = '*') or "chunked\n" */
	if ((v == BE8('h', 'u', 'n', 'k', 'e', 'd', '-', '*') && ((s->w1 | 0x20) & 0xff) == 'c') ||
	    v == BE8('c', 'h', 'u', 'n', 'k', 'e', 'd', '*'))
		s->flags |= HF_CHUNKED;
}

#define ONES8 0x0101010101010101ULL
#define HIGH8 0x8080808080808080ULL

/* The high bit of each byte of @v equal to @c: exact up to the first one
 * (a borrow may mark bytes after it), none if there is none. */
static __always_inline __u64 bytes_equal(__u64 v, __u8 c)
{
	__u64 x = v ^ (ONES8 * c);

	return (x - ONES8) & ~x & HIGH8;
}

/* One byte @c of the head at @pos (its offset from the scan origin), after
 * it entered the shift registers. Returns 1 to stop: the head ended. */
static __always_inline long scan_one(struct head_scan *s, __u8 c, __u32 pos)
{
	if (c == '\n') {
		if (s->in_start) {
			s->in_start = 0;
			s->eol1 = pos + 1;
			s->cr1 = ((s->w0 >> 8) & 0xff) == '\r';
		} else {
			if ((__u32)s->w0 == 0x0d0a0d0a || (s->w0 & 0xffff) == 0x0a0a) {
				s->hdr_end = pos + 1;
				return 1;
			}
			if (s->in_te)
				te_line_end(s);
		}
		s->line_start = pos + 1;
		s->colon = 0;
		s->in_cl = 0;
		s->in_te = 0;
		return 0;
	}
	if (s->in_start) {
		if (c == ' ' && !s->sp1)
			s->sp1 = pos + 1;
		return 0;
	}
	if (s->in_cl) {
		if (c >= '0' && c <= '9') {
			s->cl = s->cl * 10 + (c - '0');
			if (s->cl > (1ULL << 48))
				s->flags |= HF_BAD_LENGTH;
		} else if (c != ' ' && c != '\t' && c != '\r') {
			s->flags |= HF_BAD_LENGTH;
		}
		return 0;
	}
	if (c == ':' && !s->colon)
		header_name(s, pos);
	return 0;
}

/* The bytes up to the next one that matters, and that one (a byte at a
 * time inside a Content-Length value and within the last 8 bytes of the
 * window). Returns 1 to stop. */
static __always_inline long scan_advance(struct scan_window *win)
{
	struct head_scan *s = &win->h;
	__u32 at = win->at;
	__u8 c;

	if (at >= s->len)
		return 1;
	if (!s->in_cl && at + 8 <= s->len) {
		__u64 v, m;
		__u32 k;

		v = *(__u64 *)(win->buf + (at & (SCAN_WINDOW - 1))); /* unaligned: fine */
		m = bytes_equal(v, '\n');
		if (s->in_start) {
			if (!s->sp1)
				m |= bytes_equal(v, ' ');
		} else if (!s->colon) {
			m |= bytes_equal(v, ':');
		}
		if (!m) { /* 8 bytes that change nothing but the registers */
			s->w1 = s->w0;
			s->w0 = __builtin_bswap64(v);
			win->at = at + 8;
			return 0;
		}
		/* k bytes before the first that matters (the lowest marked) */
		k = (((m & -m) >> 7) * 0x0001020304050607ULL) >> 56;
		if (k) {
			s->w1 = (s->w1 << (8 * k)) | (s->w0 >> (64 - 8 * k));
			s->w0 = (s->w0 << (8 * k)) | (__builtin_bswap64(v) >> (64 - 8 * k));
			at += k;
		}
	}
	c = win->buf[at & (SCAN_WINDOW - 1)];
	win->at = at + 1;
	s->w1 = (s->w1 << 8) | (s->w0 >> 56);
	s->w0 = (s->w0 << 8) | c;
	return scan_one(s, c, s->base + at);
}

#define SCAN_ADVANCES 8 /* per bpf_loop step: fewer callback calls */

/* bpf_loop callback: SCAN_ADVANCES advances. Returns 1 to stop. */
static long scan_step(__u32 i, void *ctx)
{
	struct scan_window *win = ((struct scan_cb *)ctx)->win;

#pragma unroll
	for (int j = 0; j < SCAN_ADVANCES; j++)
		if (scan_advance(win))
			return 1;
	return 0;
}

enum head_scan_result {
	SCAN_DONE = 0,     /* hdr_end found                         */
	SCAN_MORE,         /* the segment ended inside the head     */
	SCAN_TOO_LONG,     /* MAX_WINDOWS passed without progress   */
};

/* Scan a message head starting at skb offset @off with @avail bytes of
 * segment left. Offsets in @out are relative to @off; @out carries the
 * state in and out (for heads continued from an earlier segment).
 * A global function: the verifier checks it once, not at every call. */
__noinline int scan_head(struct __sk_buff *skb, __u32 off, __u32 avail, struct head_scan *out)
{
	struct scan_cb cb;
	__u32 wpos = 0, zero = 0;
	int ret = SCAN_TOO_LONG;

	if (!out)
		return SCAN_TOO_LONG;
	cb.win = bpf_map_lookup_elem(&scan_buf, &zero);
	if (!cb.win)
		return SCAN_TOO_LONG;
	__builtin_memcpy(&cb.win->h, out, sizeof(cb.win->h));
	if (STAGE_NO_SCAN && skb->len) { /* the bench's packets: "GET / ..." or a status line */
		out->sp1 = 2;
		out->hdr_end = avail;
		out->flags = HF_CONTENT_LENGTH;
		out->cl = 0;
		return SCAN_DONE;
	}
	for (int w = 0; w < MAX_WINDOWS; w++) {
		__u32 n = avail - wpos;

		if (wpos >= avail) {
			ret = SCAN_MORE;
			break;
		}
		if (n > SCAN_WINDOW)
			n = SCAN_WINDOW;
		/* sizes as ((n - 1) & mask) + 1: provably non-zero, also to 6.1's verifier */
		if (n == 0 ||
		    bpf_skb_load_bytes(skb, off + wpos, cb.win->buf, ((n - 1) & (SCAN_WINDOW - 1)) + 1) < 0) {
			ret = SCAN_MORE;
			break;
		}
		cb.win->h.base = wpos;
		cb.win->h.len = n;
		cb.win->at = 0;
		bpf_loop(SCAN_WINDOW, scan_step, &cb, 0);
		if (cb.win->h.hdr_end) {
			ret = SCAN_DONE;
			break;
		}
		if (n < SCAN_WINDOW) {
			ret = SCAN_MORE;
			break;
		}
		wpos += n;
	}
	__builtin_memcpy(out, &cb.win->h, sizeof(cb.win->h));
	return ret;
}

/* Request method at the start of a message: returns enum http_method and
 * sets *len to the method's length (the request-target starts after the
 * space that follows it). */
static __always_inline __u8 match_method(__u64 v, __u32 *len)
{
	__u32 v4 = (__u32)v;

	if (v4 == STR8('G', 'E', 'T', ' ', 0, 0, 0, 0)) { *len = 3; return M_GET; }
	if (v4 == STR8('P', 'U', 'T', ' ', 0, 0, 0, 0)) { *len = 3; return M_PUT; }
	__u64 v5 = v & 0xffffffffffULL, v6 = v & 0xffffffffffffULL;
	if (v5 == STR8('P', 'O', 'S', 'T', ' ', 0, 0, 0)) { *len = 4; return M_POST; }
	if (v5 == STR8('H', 'E', 'A', 'D', ' ', 0, 0, 0)) { *len = 4; return M_HEAD; }
	if (v6 == STR8('P', 'A', 'T', 'C', 'H', ' ', 0, 0)) { *len = 5; return M_PATCH; }
	if (v6 == STR8('T', 'R', 'A', 'C', 'E', ' ', 0, 0)) { *len = 5; return M_TRACE; }
	if ((v & 0xffffffffffffffULL) == STR8('D', 'E', 'L', 'E', 'T', 'E', ' ', 0)) { *len = 6; return M_DELETE; }
	if (v == STR8('O', 'P', 'T', 'I', 'O', 'N', 'S', ' ')) { *len = 7; return M_OPTIONS; }
	if (v == STR8('C', 'O', 'N', 'N', 'E', 'C', 'T', ' ')) { *len = 7; return M_CONNECT; }
	return M_UNKNOWN;
}

/* Can the @n (< 8) bytes in @v start a request line? Upper-case letters,
 * a space (after at least 3), then visible characters. */
static __always_inline int maybe_method_start(__u64 v, __u32 n)
{
	int ok = 1, sp = 0;

#pragma unroll
	for (int i = 0; i < 7; i++) {
		__u8 c = v >> (8 * i);
		int good;

		if (sp)
			good = c > ' ' && c < 0x7f;
		else if (c == ' ')
			good = i >= 3;
		else
			good = c >= 'A' && c <= 'Z';
		if (i < n) {
			ok &= good;
			sp |= c == ' ';
		}
	}
	return ok;
}

/* An extension method (RFC 9110 9.1: a token; WebDAV's PROPFIND, ...):
 * 3..15 characters of A-Z, '_', '-' and a space, at the start of @b (16
 * bytes). Returns its length, 0 if none. Accepted only with a valid
 * HTTP/1.x version at the end of the line (checked by the caller). */
static __always_inline __u32 match_token_method(const __u8 *b)
{
	__u32 len = 0;
	int ok = 1;

#pragma unroll
	for (int i = 0; i < 16; i++) {
		__u8 c = b[i];
		int tchar = (c >= 'A' && c <= 'Z') || c == '_' || c == '-';

		if (!len && ok) {
			if (c == ' ' && i >= 3)
				len = i;
			else if (!tchar)
				ok = 0;
		}
	}
	return ok ? len : 0;
}

/* "HTTP/1.x" -> 10 or 11; 0 if not an HTTP/1.x version. */
static __always_inline __u8 match_version(__u64 v)
{
	if (v == STR8('H', 'T', 'T', 'P', '/', '1', '.', '1'))
		return 11;
	if (v == STR8('H', 'T', 'T', 'P', '/', '1', '.', '0'))
		return 10;
	return 0;
}

/* Status line "HTTP/1.x DDD": 12 bytes -> status code, 0 if not one. */
static __always_inline __u16 match_status(const __u8 *b, __u8 *version)
{
	__u64 v;

	__builtin_memcpy(&v, b, 8);
	*version = match_version(v);
	if (!*version || b[8] != ' ')
		return 0;
	if (b[9] < '1' || b[9] > '5' || b[10] < '0' || b[10] > '9' || b[11] < '0' || b[11] > '9')
		return 0;
	return (b[9] - '0') * 100 + (b[10] - '0') * 10 + (b[11] - '0');
}

#endif /* __REDTAP_HTTP_BPF_H */

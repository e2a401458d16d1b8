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

#include "maps.bpf.h"
#include "pairing.bpf.h"
#include "message.bpf.h"
#include "walk.bpf.h"

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

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
 *
 * One compilation unit: this file keeps the tunables, the entry points and
 * handle(); the workers are static inline (or global, verified once)
 * functions in the headers, each using only those included before it:
 *   parse.bpf.h    Ethernet / IPv4 / IPv6 / TCP headers of a packet
 *   http.bpf.h     HTTP/1.x start lines and the head scan
 *   stream.bpf.h   one direction: sequence tracking, body framing, chunks
 *   claim.bpf.h    one CPU at a time per direction; overtaken segments
 *   maps.bpf.h     the maps, the per-CPU scratch space, the counters
 *   pairing.bpf.h  the FIFO of pending requests, events, unanswered ones
 *   message.bpf.h  request and response heads
 *   walk.bpf.h     the walk through a segment's new bytes
 * A segment goes the other way: handle() -> walk -> message -> pairing.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "redtap.h"

#define TC_ACT_UNSPEC_ (-1)

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Tunables (.rodata, set by the loader before load; read by the headers
 * below too). */

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

#include "stagecut.bpf.h"
#include "parse.bpf.h"
#include "http.bpf.h"
#include "stream.bpf.h"
#include "claim.bpf.h"
#include "maps.bpf.h"
#include "pairing.bpf.h"
#include "message.bpf.h"
#include "walk.bpf.h"

/* Is the packet (@pkt) one of a traced server's? Sets *is_req to which
 * side it is (given: the hook's side; pod-side hooks, @pod_side, may turn
 * it round for a server of the host stack). Returns 1 if traced. */
static __always_inline int traced(struct scratch *scratch, struct pkt *pkt, int *is_req,
				  int pod_side)
{
	struct endpoint_key *ek = &scratch->ek;
	struct settings *set;
	__u32 zero = 0;
	__u8 *ep, *rev;

	set = bpf_map_lookup_elem(&settings, &zero);
	if (!set)
		return 0;
	/* the server end: destination of requests, source of responses */
	ek->prefixlen = 144;
	__builtin_memcpy(ek->addr, *is_req ? pkt->dst : pkt->src, 16);
	ek->port = bpf_htons(*is_req ? pkt->dport : pkt->sport);
	ep = endpoint_lookup(ek, set);
	if (!pod_side || (ep && (*ep & EP_PORT)) || !set->host_endpoints)
		return ep != 0;
	/* a pod talking to a server of the node's host stack? */
	__builtin_memcpy(ek->addr, *is_req ? pkt->src : pkt->dst, 16);
	ek->port = bpf_htons(*is_req ? pkt->sport : pkt->dport);
	rev = endpoint_lookup(ek, set);
	if (rev && (*rev & EP_HOST)) {
		*is_req = !*is_req;
		return 1;
	}
	return ep != 0;
}

/* A connection is tracked from its first request: does the client's
 * segment @pkt start one? Then the connection @key is created. Returns its
 * state, or NULL (no request start; `conns` full: counted). */
static __always_inline struct conn_state *track_conn(struct __sk_buff *skb,
						     struct scratch *scratch, struct pkt *pkt,
						     struct conn_key *key)
{
	struct conn_state *initial = &scratch->conn;
	__u64 first8 = 0;
	__u32 method_len;

	if (pkt->payload_len < 8) {
		/* a start too short to tell: keep it if it may be a method */
		__u32 n = ((pkt->payload_len - 1) & 7) + 1; /* 1..7, visibly to the verifier */

		if (bpf_skb_load_bytes(skb, pkt->payload_off, &first8, n) < 0 ||
		    !maybe_method_start(first8, n))
			return NULL;
	} else {
		bpf_skb_load_bytes(skb, pkt->payload_off, &first8, 8);
		if (match_method(first8, &method_len) == M_UNKNOWN) {
			__u32 n = pkt->payload_len < 16 ? 8 : 16;

			if (bpf_skb_load_bytes(skb, pkt->payload_off, scratch->hdr, n) < 0 ||
			    (n == 16 && !match_token_method(scratch->hdr)) || n < 16)
				return NULL;
		}
	}
	__builtin_memset(initial, 0, sizeof(*initial));
	initial->req.next_seq = pkt->seq;
	initial->req.seq_valid = 1;
	if (pkt->tcp_flags & TCPF_ACK) {
		/* the answer starts where the client's ACK points: a first
		 * response lost (or overtaken) is then a gap, not a later one
		 * paired with the first request */
		initial->resp.next_seq = pkt->ack;
		initial->resp.seq_valid = 1;
	}
	initial->check_on = 2; /* its first response is checked by ACK */
	if (bpf_map_update_elem(&conns, key, initial, BPF_NOEXIST) &&
	    !bpf_map_lookup_elem(&conns, key)) {
		stat_inc(S_CONN_MAP_FULL);
		return NULL;
	}
	return bpf_map_lookup_elem(&conns, key);
}

/* One packet at a hook parsing @is_req's side (@pod_side: see the top).
 * Its program returns TC_ACT_UNSPEC_ whatever happens here. */
static __always_inline void handle(struct __sk_buff *skb, int is_req, int pod_side)
{
	struct stream_state *stream;
	struct conn_state *conn;
	struct scratch *scratch;
	struct walk_args *args;
	struct pkt *pkt;
	/* ctx fields read once, up front: the verifier wants fixed offsets */
	__u32 ifindex = skb->ifindex;
	__u64 tstamp = skb->tstamp;

	if (STAGE_CUT_AT(1))
		return;
	scratch = get_scratch();
	if (!scratch)
		return;
	pkt = &scratch->pkt;
	if (parse_tcp_packet(skb, pkt) < 0)
		return;
	if (pkt->payload_len == 0 && !(pkt->tcp_flags & (TCPF_FIN | TCPF_RST)))
		return; /* pure ACK / SYN: nothing to parse */
	if (STAGE_CUT_AT(2))
		return;

	if (!traced(scratch, pkt, &is_req, pod_side))
		return;
	if (STAGE_CUT_AT(3))
		return;

	args = &scratch->wa;
	__builtin_memset(args, 0, sizeof(*args));
	if (is_req) {
		__builtin_memcpy(args->key.caddr, pkt->src, 16);
		__builtin_memcpy(args->key.saddr, pkt->dst, 16);
		args->key.cport = pkt->sport;
		args->key.sport = pkt->dport;
	} else {
		__builtin_memcpy(args->key.caddr, pkt->dst, 16);
		__builtin_memcpy(args->key.saddr, pkt->src, 16);
		args->key.cport = pkt->dport;
		args->key.sport = pkt->sport;
	}

	__u64 now = clock_from_skb ? tstamp : bpf_ktime_get_ns();
	conn = bpf_map_lookup_elem(&conns, &args->key);
	if (pkt->tcp_flags & TCPF_RST) {
		if (conn) {
			report_unanswered(&args->key, conn, R_RESET, ifindex, now, conn->tail);
			bpf_map_delete_elem(&conns, &args->key);
		}
		return;
	}
	if (!conn && pkt->payload_len) {
		if (!is_req)
			goto no_conn; /* a connection is tracked from its first request */
		conn = track_conn(skb, scratch, pkt, &args->key);
		if (!conn)
			return;
	}
	if (!conn)
		goto no_conn;
	if (STAGE_CUT_AT(4))
		return;

	stat_inc(S_TRACED_SEGMENTS);
	stream = is_req ? &conn->req : &conn->resp;
	if (!claim(&stream->busy)) {
		stat_inc(S_CONCURRENT); /* its bytes: a gap to the next segment */
		return;
	}
	if (pkt->payload_len && gap_loses_sync(stream, pkt->seq)) {
		int caught_up = wait_for_seq(stream, pkt->seq);

		/* the connection may have ended meanwhile (FIN, RST on another CPU) */
		conn = bpf_map_lookup_elem(&conns, &args->key);
		if (!conn)
			return;
		stream = is_req ? &conn->req : &conn->resp;
		if (!claim(&stream->busy)) {
			stat_inc(S_CONCURRENT);
			return;
		}
		if (caught_up)
			stat_inc(S_REORDERED);
	}
	if (!is_req) /* what the request side marked lost */
		report_marked_lost(&args->key, conn, ifindex, now);
	if (pkt->payload_len) {
		args->now = now;
		args->payload_off = pkt->payload_off;
		args->payload_len = pkt->payload_len;
		args->ifindex = ifindex;
		args->seq = pkt->seq;
		args->ack = pkt->ack;
		args->is_req = is_req;
		walk_segment(skb, conn, args, stream);
	}
	if ((pkt->tcp_flags & TCPF_FIN) && !is_req) {
		server_closed(&args->key, conn, ifindex, now);
		release(&stream->busy);
		bpf_map_delete_elem(&conns, &args->key);
		return;
	}
	release(&stream->busy);
	return;

no_conn:
	if (!is_req && pkt->payload_len >= 12) {
		__u8 start[12];
		__u8 version;

		if (!bpf_skb_load_bytes(skb, pkt->payload_off, start, 12) &&
		    match_status(start, &version))
			stat_inc(S_UNMATCHED_RESPONSE);
	}
}

/* The programs: which side each parses, and whether its hook is pod-side. */
SEC("tc") int redtap_req(struct __sk_buff *skb)      { handle(skb, 1, 0); return TC_ACT_UNSPEC_; }
SEC("tc") int redtap_resp(struct __sk_buff *skb)     { handle(skb, 0, 0); return TC_ACT_UNSPEC_; }
SEC("tc") int redtap_pod_req(struct __sk_buff *skb)  { handle(skb, 1, 1); return TC_ACT_UNSPEC_; }
SEC("tc") int redtap_pod_resp(struct __sk_buff *skb) { handle(skb, 0, 1); return TC_ACT_UNSPEC_; }

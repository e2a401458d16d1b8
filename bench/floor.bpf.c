// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* floor.bpf.c: the benchmark's reference floor (issue 16), never shipped.
 *
 * What any in-kernel request/response pairer must do, and nothing more:
 * parse Ethernet/IP/TCP, one hash lookup of the server endpoint; a request
 * segment: read its first 64 payload bytes and write the connection's entry
 * with a timestamp; a response segment: look the entry up, send one 64-byte
 * ring buffer record, delete the entry. No framing, no sequence tracking.
 * Attached as redtap's pod-side programs are (bench/floor.py): floor_req where
 * packets go to the pod's servers, floor_resp where they come from them.
 * Headers are parsed with redtap's own parse.bpf.h. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "parse.bpf.h" /* redtap's header parser: the same cost as redtap's */

#define TC_ACT_UNSPEC_ (-1)
#define HEAD_LEN 64

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct floor_ep {
	__u8 addr[16]; /* v4-mapped for IPv4 */
	__u16 port;    /* network byte order */
	__u16 pad;
};

struct floor_conn {
	__u8 caddr[16];
	__u8 saddr[16];
	__u16 cport;
	__u16 sport;
	__u32 pad;
};

struct floor_entry {
	__u64 ts_ns;
	__u8 head[HEAD_LEN]; /* the request's first bytes */
};

struct floor_record { /* 64 bytes */
	__u64 req_ns;
	__u64 resp_ns;
	__u16 cport;
	__u16 sport;
	__u32 pad;
	__u8 head[40];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct floor_ep);
	__type(value, __u8);
} endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct floor_conn);
	__type(value, struct floor_entry);
} conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 * 1024 * 1024);
} events SEC(".maps");

/* Parse; then is it a payload segment of a traced server (the destination of
 * requests, @is_req, or the source of responses)? Fills @key. */
static __always_inline int traced(struct __sk_buff *skb, struct pkt *p, struct floor_conn *key,
				  int is_req)
{
	struct floor_ep ek = {};

	if (parse_tcp_packet(skb, p) < 0 || !p->payload_len)
		return 0;
	__builtin_memcpy(ek.addr, is_req ? p->dst : p->src, 16);
	ek.port = bpf_htons(is_req ? p->dport : p->sport);
	if (!bpf_map_lookup_elem(&endpoints, &ek))
		return 0;
	__builtin_memcpy(key->caddr, is_req ? p->src : p->dst, 16);
	__builtin_memcpy(key->saddr, is_req ? p->dst : p->src, 16);
	key->cport = is_req ? p->sport : p->dport;
	key->sport = is_req ? p->dport : p->sport;
	key->pad = 0;
	return 1;
}

SEC("tc") int floor_req(struct __sk_buff *skb)
{
	struct floor_conn key;
	struct floor_entry r = {};
	struct pkt p;
	__u32 n;

	if (!traced(skb, &p, &key, 1))
		return TC_ACT_UNSPEC_;
	n = p.payload_len < HEAD_LEN ? p.payload_len : HEAD_LEN;
	/* read the first bytes, then write the entry with the time */
	if (bpf_skb_load_bytes(skb, p.payload_off, r.head, ((n - 1) & (HEAD_LEN - 1)) + 1) < 0)
		return TC_ACT_UNSPEC_;
	r.ts_ns = bpf_ktime_get_ns();
	bpf_map_update_elem(&conns, &key, &r, BPF_ANY);
	return TC_ACT_UNSPEC_;
}

SEC("tc") int floor_resp(struct __sk_buff *skb)
{
	struct floor_conn key;
	struct floor_record *rec;
	struct floor_entry *r;
	struct pkt p;

	if (!traced(skb, &p, &key, 0))
		return TC_ACT_UNSPEC_;
	r = bpf_map_lookup_elem(&conns, &key);
	if (!r)
		return TC_ACT_UNSPEC_;
	/* reserve -> fill -> submit (no wakeup: the reader polls), then forget */
	rec = bpf_ringbuf_reserve(&events, sizeof(*rec), 0);
	if (rec) {
		rec->req_ns = r->ts_ns;
		rec->resp_ns = bpf_ktime_get_ns();
		rec->cport = key.cport;
		rec->sport = key.sport;
		rec->pad = 0;
		__builtin_memcpy(rec->head, r->head, sizeof(rec->head));
		bpf_ringbuf_submit(rec, BPF_RB_NO_WAKEUP);
	}
	bpf_map_delete_elem(&conns, &key);
	return TC_ACT_UNSPEC_;
}

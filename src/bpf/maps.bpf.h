/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* maps.bpf.h: the maps shared with user space, the per-CPU scratch space
 * and the counters (stat_add).
 *
 * Map names, key and value types are ABI: the agent opens the maps by
 * name and src/pyloader/abi.py mirrors their types. */
#ifndef __REDTAP_MAPS_BPF_H
#define __REDTAP_MAPS_BPF_H

#include "redtap.h"
#include "parse.bpf.h"
#include "http.bpf.h"

/* Traced servers (written by user space): struct endpoint_key -> EP_* */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_ENDPOINTS);
	__type(key, struct endpoint_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} endpoints SEC(".maps");

/* The IP:PORT entries of `endpoints` again, in a hash (written by user
 * space): struct endpoint_key (prefixlen 144) -> EP_*. Looked up first:
 * an exact hit is the trie's longest match too. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ENDPOINTS);
	__type(key, struct endpoint_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} endpoint_ports SEC(".maps");

/* Settings written by user space: one struct settings */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct settings);
} settings SEC(".maps");

/* Tracked connections: the 4-tuple (client -> server) -> both streams and the FIFO */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_CONNS);
	__type(key, struct conn_key);
	__type(value, struct conn_state);
} conns SEC(".maps");

/* Requests waiting for their response: (connection, request number) -> request */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_PENDING);
	__type(key, struct req_key);
	__type(value, struct pending_req);
} pending SEC(".maps");

/* struct http_event records to user space (pairing.bpf.h: emit()) */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 * 1024 * 1024); /* ~22k events of burst */
} events SEC(".maps");

/* Per-CPU counters, indexed by enum stat_idx: stat_add() */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, S_NR);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* What one step of walking a segment needs (global functions take at
 * most 5 arguments and no pointers inside structs). */
struct walk_args {
	struct conn_key key;
	__u64 now;
	__u32 payload_off;
	__u32 payload_len;
	__u32 off;        /* payload offset of the next unparsed byte */
	__u32 ifindex;
	__u32 seq;        /* TCP sequence number of the payload's first byte */
	__u32 ack;        /* TCP acknowledgement number of the segment */
	__u32 is_req;
	__u32 pad;
};

/* The stream a walk goes through: requests or responses of @conn. */
static __always_inline struct stream_state *walk_stream(struct conn_state *conn,
							 const struct walk_args *args)
{
	return args->is_req ? &conn->req : &conn->resp;
}

/* What an event carries besides the pending request: the request's
 * outcome (answered, or why not). */
struct emit_args {
	__u64 resp_ns;      /* first response byte, or when given up */
	__u64 last_ns;      /* last response byte (EV_RESP_END)      */
	__u64 resp_body;    /* EV_RESP_BODY                          */
	__u32 ifindex;
	__u16 status;       /* 0: unanswered                         */
	__u8 reason;        /* enum unanswered_reason                */
	__u8 flags;         /* extra EV_* flags                      */
};

/* per-CPU scratch space: too big for the 512-byte stack */
struct scratch {
	struct pkt pkt;         /* handle()                                  */
	struct endpoint_key ek; /* traced()                                  */
	struct walk_args wa;    /* handle() -> walk_segment(), walk_step()   */
	struct emit_args ea;    /* finish_response(), flush_pending() -> emit() */
	struct req_key ekey;    /* emit()                                    */
	__u8 hdr[32];           /* first bytes of a message, a chunk-size line */
	struct head_scan scan;  /* a step's head scan (walk_step() clears it) */
	struct req_key rkey;    /* `pending` keys outside emit()             */
	struct pending_req req; /* parse_request() -> fifo_push()            */
	struct conn_state conn; /* track_conn(): a new connection            */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch_map SEC(".maps");

/* The endpoint entry (EP_* flags) for the server end in @ek (prefixlen
 * 144), or NULL: the exact hash, then the trie only while entries without
 * a port exist (@set: the settings). */
static __always_inline __u8 *endpoint_lookup(struct endpoint_key *ek, const struct settings *set)
{
	__u8 *ep = bpf_map_lookup_elem(&endpoint_ports, ek);

	if (ep || !set->trie_only)
		return ep;
	return bpf_map_lookup_elem(&endpoints, ek);
}

/* This CPU's scratch space (NULL only to satisfy the verifier). */
static __always_inline struct scratch *get_scratch(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&scratch_map, &zero);
}

/* Add @n to counter @idx (enum stat_idx) of this CPU. */
static __always_inline void stat_add(__u32 idx, __u64 n)
{
	__u64 *v;

	if (STAGE_NO_STATS)
		return;
	v = bpf_map_lookup_elem(&stats, &idx);
	if (v)
		*v += n;
}
#define stat_inc(idx) stat_add(idx, 1)

#endif /* __REDTAP_MAPS_BPF_H */

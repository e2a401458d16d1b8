/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* claim.bpf.h: one CPU at a time per direction of a connection, and a
 * bounded wait for segments that overtook earlier ones on their way to the
 * hook. */
#ifndef __REDTAP_CLAIM_BPF_H
#define __REDTAP_CLAIM_BPF_H

#include "redtap.h"

/* One CPU at a time walks a direction of a connection: packets of one flow
 * can reach the hook on two CPUs at once (a veth queues received packets per
 * CPU; a TCP sender transmits from process and softirq context), and two
 * walks of one stream would corrupt its framing state. A walk takes about a
 * microsecond (a 64 kB segment's head scans at most a few hundred): the other
 * CPU spins on a bounded number of tries, then skips its segment (counted;
 * the next segment sees a gap there and resynchronises). */
#define CLAIM_TRIES 8192

struct claim_ctx {
	__u32 *busy;
	int ok;
};

static long claim_try(__u32 i, void *ctx)
{
	struct claim_ctx *cc = ctx;

	if (*(volatile __u32 *)cc->busy)
		return 0;
	if (__sync_val_compare_and_swap(cc->busy, 0, 1) == 0) {
		cc->ok = 1;
		return 1;
	}
	return 0;
}

static __always_inline int claim(__u32 *busy)
{
	struct claim_ctx cc = { .busy = busy, .ok = 0 };

	if (STAGE_NO_CLAIM)
		return 1;
	if (__sync_val_compare_and_swap(busy, 0, 1) == 0)
		return 1; /* the usual case: nobody else */
	bpf_loop(CLAIM_TRIES, claim_try, &cc, 0);
	return cc.ok;
}

static __always_inline void release(__u32 *busy)
{
	if (STAGE_NO_CLAIM)
		return;
	__sync_lock_test_and_set(busy, 0); /* an atomic exchange: orders the walk's writes */
}

/* A segment that overtook earlier ones on the way to the hook (they wait in
 * another CPU's backlog queue) would lose the stream's sync: wait a bounded
 * time, without the claim, for the other CPU to walk them. A segment lost
 * before the hook costs the whole wait (tens of microseconds), then a gap. */
#define REORDER_WAIT_TRIES 8192

struct seq_wait_ctx {
	struct stream_state *st;
	__u32 seq;
	int ok;
};

static long seq_wait_try(__u32 i, void *ctx)
{
	struct seq_wait_ctx *w = ctx;

	if ((__s32)(w->seq - *(volatile __u32 *)&w->st->next_seq) <= 0) {
		w->ok = 1;
		return 1;
	}
	return 0;
}

/* Wait for @st (claimed by this CPU: the claim is released) to reach
 * @seq. Returns 1 if it did. The caller re-reads the connection and claims
 * it again. */
static __always_inline int wait_for_seq(struct stream_state *st, __u32 seq)
{
	struct seq_wait_ctx w = { .st = st, .seq = seq, .ok = 0 };

	release(&st->busy);
	bpf_loop(REORDER_WAIT_TRIES, seq_wait_try, &w, 0);
	return w.ok;
}

#endif /* __REDTAP_CLAIM_BPF_H */

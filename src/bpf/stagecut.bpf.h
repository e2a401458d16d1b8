/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* stagecut.bpf.h: short circuits for the per-stage cost table of
 * bench/stages.py, which builds bench-only variants of the object with
 * -DSTAGE_CUT=n or -DSTAGE_NO_<stage>. The shipped build defines none:
 * every macro below is then a constant 0 and the compiler drops what it
 * guards. A variant is measured, never shipped (its records are wrong). */
#ifndef __REDTAP_STAGECUT_BPF_H
#define __REDTAP_STAGECUT_BPF_H

/* handle() returns at cut point n: 1 entry, 2 after the headers are
 * parsed, 3 after the endpoint lookup, 4 after the connection lookup */
#ifndef STAGE_CUT
#define STAGE_CUT 0
#endif
#define STAGE_CUT_AT(n) (STAGE_CUT == (n))

/* removed stages: the claim, the head scan's byte loop (a stub frames the
 * bench's packets: the whole segment is a head without body), the
 * `pending` map, the ring buffer record, the counters */
#ifndef STAGE_NO_CLAIM
#define STAGE_NO_CLAIM 0
#endif
#ifndef STAGE_NO_SCAN
#define STAGE_NO_SCAN 0
#endif
#ifndef STAGE_NO_PENDING
#define STAGE_NO_PENDING 0
#endif
#ifndef STAGE_NO_RINGBUF
#define STAGE_NO_RINGBUF 0
#endif
#ifndef STAGE_NO_STATS
#define STAGE_NO_STATS 0
#endif

#endif /* __REDTAP_STAGECUT_BPF_H */

/* SPDX-License-Identifier: Apache-2.0 */
/* recordfmt.h: the record helper's state, shared by its two files:
 * recordfmt.c (the batch: sink, rendering, metric cells) and parts.c (the
 * tables of line parts Python puts: per peers, per URL). */
#ifndef __RECORDFMT_H
#define __RECORDFMT_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <linux/types.h>

#include "redtap.h"

#define RF_BATCH_FULL (-1000)  /* what rf_sample returns once the batch is full */
#define RF_NB 17               /* histogram buckets, +Inf included            */

/* what rf_render made of a record */
enum rf_kind {
	RF_LINE = 0,      /* its line is in the batch's lines                    */
	RF_PEERS = 1,     /* unknown peers: Python renders it and learns from it  */
	RF_FALLBACK = 2,  /* a field the helper does not write: Python renders it */
	RF_URL = 3,       /* known peers (server: rf_servers()[i]), unknown URL   */
};

/* What a cached line part is keyed by: the peers, not the client port. */
struct rf_peers_key {
	uint8_t caddr[16], saddr[16];
	uint16_t sport;
};

struct rf_span { uint32_t off, len; };

struct rf_conn {
	struct rf_peers_key key;
	uint32_t gen;              /* 1: in use; 0: empty */
	double t_lo, t_hi;         /* the fragments hold for record times in [t_lo, t_hi) */
	struct rf_span client, server, names;
	uint32_t server_id;        /* the route cap's server, the URL table's key */
	uint32_t series_id;        /* the server's metric labels */
	uint32_t weight[4];        /* counters one record of this connection adds */
};

struct rf_url {
	uint64_t hash;
	uint32_t used, server_id;
	struct rf_span key;        /* the request-target bytes */
	struct rf_span frag, route;
	uint32_t route_id;
	uint32_t weight[4];
};

struct rf_cell {               /* one metric series cell of a batch */
	uint64_t key;              /* series, route, method, status, answered: packed */
	uint32_t used;
	uint32_t counts[RF_NB];
	double sum_ms;
};

struct rf_arena { uint8_t *p; size_t len, cap; };

struct rf_ctx {
	/* the batch */
	uint8_t *in; uint32_t n, max_n, cap_n, bad;
	uint8_t *kind;             /* enum rf_kind per record */
	uint32_t *server;          /* RF_URL records: their server id */
	/* the lines of RF_LINE records, in order; line_end[i]: end of record i's line */
	struct rf_arena out;
	uint32_t *line_end;
	/* fragments */
	struct rf_conn *conns; uint32_t conn_mask, conn_used, gen;
	struct rf_url *urls; uint32_t url_mask, url_used;
	struct rf_arena conn_bytes, url_bytes;
	/* metrics: cells touched by this batch */
	struct rf_cell *cells; uint32_t cell_mask, cell_used;
	double bounds[RF_NB - 1];
	int metrics;
	/* counters the rendered records add (weights summed) */
	uint64_t weight_sum[8];
	/* clock: wall = req_ns + offset_ns; the date of one second cached */
	int64_t offset_ns; int64_t sec_cached; char date[32];
};

#define EV_SIZE ((uint32_t)sizeof(struct http_event))

static inline uint64_t rf_hash(const uint8_t *p, size_t n, uint64_t h)
{
	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * 0x100000001b3ULL;  /* FNV-1a */
	return h ^ (h >> 29);
}

static inline int rf_reserve(struct rf_arena *a, size_t more)
{
	if (a->len + more <= a->cap)
		return 0;
	size_t cap = a->cap ? a->cap : 4096;
	while (cap < a->len + more)
		cap *= 2;
	uint8_t *p = realloc(a->p, cap);
	if (!p)
		return -1;
	a->p = p, a->cap = cap;
	return 0;
}

static inline int rf_store(struct rf_arena *a, const void *src, uint32_t n, struct rf_span *s)
{
	if (rf_reserve(a, n))
		return -1;
	memcpy(a->p + a->len, src, n);
	s->off = (uint32_t)a->len, s->len = n;
	a->len += n;
	return 0;
}

/* parts.c */
struct rf_conn *rf_conn_slot(struct rf_ctx *c, const struct rf_peers_key *key, int insert);
struct rf_url *rf_url_slot(struct rf_ctx *c, uint32_t server_id, const uint8_t *url,
			   uint32_t len, uint64_t h, int insert);
uint64_t rf_url_hash(uint32_t server_id, const uint8_t *url, uint32_t len);
void rf_peers_of(const struct http_event *e, struct rf_peers_key *k);

#endif /* __RECORDFMT_H */

/* SPDX-License-Identifier: Apache-2.0 */
/* recordfmt.c: the agent's per-record hot path, in C, called through ctypes.
 *
 * Python stays the agent: it decides every field of a record. This helper
 * only repeats, for the records of a batch, what Python already decided
 * once per connection and once per URL:
 *
 *   rf_sample()  a libbpf ring_buffer sample callback: appends each record
 *                to the batch (no Python call per record);
 *   rf_render()  one pass over the batch: a record whose peers' and URL
 *                fragments are known (and still valid at its time) becomes a
 *                JSON line from those fragments plus its own fields (time,
 *                client port, method, status, durations, sizes, flags). A
 *                record of unknown peers (client address, server address and
 *                port) is left to Python, which renders it the reference way
 *                and hands the fragments back (rf_put_peers, rf_put_url); for
 *                a record of known peers and an unknown URL Python only puts
 *                the URL's fragments, and a second rf_render writes its line;
 *   metrics      each rendered record is counted in its series cell
 *                (histogram bucket, sum), read back per batch.
 *
 * A line is
 *   {"time":"<T>",<peers.client><cport><peers.server>"http.request.method":"<M>",<url.frag>
 *   <fields><peers.names><url.route>}
 * No CPython API; no allocation on the per-record path once warm.
 */
#include <stdio.h>

#include "recordfmt.h"

void rf_free(struct rf_ctx *c)
{
	if (!c)
		return;
	free(c->in), free(c->kind), free(c->server), free(c->out.p), free(c->line_end);
	free(c->conns), free(c->urls), free(c->conn_bytes.p), free(c->url_bytes.p), free(c->cells);
	free(c);
}

/* A context for batches of at most max_n records; tables of 2^bits slots. */
struct rf_ctx *rf_new(uint32_t max_n, uint32_t conn_bits, uint32_t url_bits)
{
	struct rf_ctx *c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	c->max_n = max_n, c->cap_n = max_n ? max_n : 4096;
	c->conn_mask = (1u << conn_bits) - 1, c->url_mask = (1u << url_bits) - 1;
	c->cell_mask = 4095;
	c->in = malloc((size_t)c->cap_n * EV_SIZE);
	c->kind = malloc(c->cap_n);
	c->server = malloc(sizeof(uint32_t) * c->cap_n);
	c->line_end = malloc(sizeof(uint32_t) * c->cap_n);
	c->conns = calloc(c->conn_mask + 1, sizeof(struct rf_conn));
	c->urls = calloc(c->url_mask + 1, sizeof(struct rf_url));
	c->cells = calloc(c->cell_mask + 1, sizeof(struct rf_cell));
	c->sec_cached = -1;
	if (!c->in || !c->kind || !c->server || !c->line_end || !c->conns || !c->urls || !c->cells) {
		rf_free(c);
		return NULL;
	}
	return c;
}

/* libbpf ring_buffer_sample_fn: the record joins the batch (shorter ones are
 * counted bad, longer ones cut to the event). Without a batch limit the
 * buffers grow; with one, a full batch ends the round. */
int rf_sample(void *ctx, void *data, size_t size)
{
	struct rf_ctx *c = ctx;
	if (size < EV_SIZE) {
		c->bad++;
		return 0;
	}
	if (c->n == c->cap_n) {
		uint32_t cap = c->cap_n * 2;
		uint8_t *in = realloc(c->in, (size_t)cap * EV_SIZE);
		if (in)
			c->in = in;
		uint8_t *kind = in ? realloc(c->kind, cap) : NULL;
		if (kind)
			c->kind = kind;
		uint32_t *ends = kind ? realloc(c->line_end, sizeof(uint32_t) * cap) : NULL;
		if (ends)
			c->line_end = ends;
		uint32_t *server = ends ? realloc(c->server, sizeof(uint32_t) * cap) : NULL;
		if (!server)
			return -12;  /* -ENOMEM: the record stays in the ring */
		c->server = server, c->cap_n = cap;
	}
	memcpy(c->in + (size_t)c->n * EV_SIZE, data, EV_SIZE);
	c->n++;
	return c->max_n && c->n >= c->max_n ? RF_BATCH_FULL : 0;
}

/* Python's view of the batch. */
uint8_t *rf_records(struct rf_ctx *c) { return c->in; }
uint8_t *rf_kinds(struct rf_ctx *c) { return c->kind; }
uint32_t *rf_servers(struct rf_ctx *c) { return c->server; }
uint32_t rf_count(struct rf_ctx *c) { return c->n; }
uint32_t rf_take_bad(struct rf_ctx *c) { uint32_t b = c->bad; c->bad = 0; return b; }
uint32_t rf_bad_pending(struct rf_ctx *c) { return c->bad; }
uint8_t *rf_lines(struct rf_ctx *c) { return c->out.p; }
uint32_t *rf_line_ends(struct rf_ctx *c) { return c->line_end; }
uint64_t *rf_weights(struct rf_ctx *c) { return c->weight_sum; }

/* Forget the batch (after Python took its lines); the fragments stay. */
void rf_reset(struct rf_ctx *c)
{
	c->n = 0, c->out.len = 0;
}

/* Histogram bounds (ms, ascending) and whether to count metric cells. */
void rf_set_metrics(struct rf_ctx *c, const double *bounds, int on)
{
	memcpy(c->bounds, bounds, sizeof(c->bounds));
	c->metrics = on;
}

void rf_set_offset(struct rf_ctx *c, int64_t offset_ns) { c->offset_ns = offset_ns; }

/* ---- formatting ---------------------------------------------------------- */
static char *put(char *o, const void *s, size_t n) { memcpy(o, s, n); return o + n; }
#define PUTS(o, lit) put(o, lit, sizeof(lit) - 1)

static char *put_u64(char *o, uint64_t v)
{
	char tmp[20];
	int n = 0;
	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		*o++ = tmp[--n];
	return o;
}

/* us/1000 as Python's repr(float) writes it (exact below 2^33 ms). */
static char *put_ms(char *o, uint64_t us)
{
	o = put_u64(o, us / 1000);
	*o++ = '.';
	uint32_t r = (uint32_t)(us % 1000);
	if (!r) {
		*o++ = '0';
		return o;
	}
	char d[3] = { (char)('0' + r / 100), (char)('0' + r / 10 % 10), (char)('0' + r % 10) };
	int n = d[2] != '0' ? 3 : d[1] != '0' ? 2 : 1;
	return put(o, d, n);
}

/* "YYYY-MM-DDTHH:MM:SS" of a second (UTC), as time.strftime writes it */
static void rf_date(struct rf_ctx *c, int64_t sec)
{
	int64_t days = sec / 86400, s = sec % 86400;
	/* civil_from_days (H. Hinnant) */
	int64_t z = days + 719468, era = z / 146097;
	int64_t doe = z - era * 146097;
	int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
	int64_t y = yoe + era * 400, doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
	int64_t mp = (5 * doy + 2) / 153, d = doy - (153 * mp + 2) / 5 + 1;
	int64_t m = mp < 10 ? mp + 3 : mp - 9;
	y += m <= 2;
	snprintf(c->date, sizeof(c->date), "%04d-%02d-%02dT%02d:%02d:%02d", (int)y, (int)m, (int)d,
		 (int)(s / 3600), (int)(s / 60 % 60), (int)(s % 60));
	c->sec_cached = sec;
}

static const char *const METHODS[] = { "_OTHER", "GET", "HEAD", "POST", "PUT", "DELETE",
				       "CONNECT", "OPTIONS", "TRACE", "PATCH" };

/* A metric cell: series (23 bits) | route (20) | method (4) | unanswered (1) | status (16).
 * Python keeps the ids below those widths. */
static uint64_t rf_cell_key(uint32_t series, uint32_t route, uint32_t method, uint32_t status,
			    int answered)
{
	return (uint64_t)series << 41 | (uint64_t)route << 21 | (uint64_t)method << 17 |
	       (uint64_t)!answered << 16 | (answered ? status : 0);
}

static void rf_count_cell(struct rf_ctx *c, uint64_t key, int bucket, double ms, int answered)
{
	uint32_t i = (uint32_t)(key ^ (key >> 31)) * 2654435761u & c->cell_mask;
	for (;; i = (i + 1) & c->cell_mask) {
		struct rf_cell *s = &c->cells[i];
		if (!s->used) {
			s->used = 1, s->key = key;
			c->cell_used++;
		}
		if (s->key == key) {
			s->counts[answered ? bucket : 0]++;
			if (answered)
				s->sum_ms += ms;
			return;
		}
	}
}

/* The cells counted in this batch: up to max of them into keys/counts/sums. */
uint32_t rf_cells(struct rf_ctx *c, uint64_t *keys, uint32_t *counts, double *sums, uint32_t max)
{
	uint32_t n = 0;
	for (uint32_t i = 0; i <= c->cell_mask && n < max; i++) {
		struct rf_cell *s = &c->cells[i];
		if (!s->used)
			continue;
		keys[n] = s->key, sums[n] = s->sum_ms;
		memcpy(counts + (size_t)n * RF_NB, s->counts, sizeof(s->counts));
		n++;
	}
	return n;
}

#define MS_MAX_US (8589934592ULL * 1000)  /* 2^33 ms: put_ms is exact below */
#define LINE_MAX 1536                     /* fixed part of a line, fragments aside */

/* One pass over the batch: lines for the records whose fragments are known;
 * kind[i] says which records Python must render. again: a second pass after
 * Python put the URLs of the RF_URL records (records Python renders itself
 * keep their kind). Returns the records left to Python, or -1 when out of
 * memory (then Python renders every record). */
int rf_render(struct rf_ctx *c, int again)
{
	int misses = 0;
	c->out.len = 0;
	memset(c->weight_sum, 0, sizeof(c->weight_sum));
	if (c->cell_used) {
		memset(c->cells, 0, sizeof(struct rf_cell) * (c->cell_mask + 1));
		c->cell_used = 0;
	}
	for (uint32_t i = 0; i < c->n; i++) {
		const struct http_event *e = (const void *)(c->in + (size_t)i * EV_SIZE);
		c->line_end[i] = (uint32_t)c->out.len;
		misses++;
		if (again && (c->kind[i] == RF_PEERS || c->kind[i] == RF_FALLBACK))
			continue;
		c->kind[i] = RF_PEERS;
		uint64_t us = e->resp_ns >= e->req_ns ? (e->resp_ns - e->req_ns) / 1000 : 0;
		uint64_t last_us = (e->resp_last_ns - e->req_ns) / 1000;
		int last = (e->flags & EV_RESP_END) && e->resp_last_ns >= e->req_ns;
		uint64_t wall = e->req_ns + (uint64_t)c->offset_ns;  /* (wrap: fallback) */
		int64_t sec = (int64_t)(wall / 1000000000ULL);
		if (e->method == M_OTHER || e->method > M_PATCH || us >= MS_MAX_US || wall < e->req_ns ||
		    (last && last_us >= MS_MAX_US) || sec > 253402300799LL) {
			c->kind[i] = RF_FALLBACK;
			continue;
		}
		uint32_t usec = (uint32_t)(wall / 1000 % 1000000);
		double t = (double)sec + (double)usec / 1e6;
		struct rf_peers_key peers;
		rf_peers_of(e, &peers);
		struct rf_conn *cn = rf_conn_slot(c, &peers, 0);
		if (!cn || t < cn->t_lo || t >= cn->t_hi)
			continue;
		uint32_t ulen = e->url_len < MAX_URL_LEN ? e->url_len : MAX_URL_LEN;
		const uint8_t *url = (const uint8_t *)e->url;
		struct rf_url *u = rf_url_slot(c, cn->server_id, url, ulen,
					       rf_url_hash(cn->server_id, url, ulen), 0);
		if (!u) {
			c->kind[i] = RF_URL;
			c->server[i] = cn->server_id;
			continue;
		}
		if (c->metrics && c->cell_used * 2 >= c->cell_mask)
			continue;  /* (a full cell table: Python renders and counts it) */
		if (rf_reserve(&c->out, LINE_MAX + cn->client.len + cn->server.len + cn->names.len +
					u->frag.len + u->route.len))
			return -1;
		if (sec != c->sec_cached)
			rf_date(c, sec);
		char *o = (char *)c->out.p + c->out.len;
		o = PUTS(o, "{\"time\":\"");
		o = put(o, c->date, 19);
		*o++ = '.';
		for (uint32_t d = 100000, v = usec; d; d /= 10)
			*o++ = (char)('0' + v / d % 10);
		o = PUTS(o, "Z\",");
		o = put(o, c->conn_bytes.p + cn->client.off, cn->client.len);
		o = put_u64(o, e->conn.cport);
		o = put(o, c->conn_bytes.p + cn->server.off, cn->server.len);
		o = PUTS(o, "\"http.request.method\":\"");
		o = put(o, METHODS[e->method], strlen(METHODS[e->method]));
		o = PUTS(o, "\",");
		o = put(o, c->url_bytes.p + u->frag.off, u->frag.len);
		if (e->flags & EV_URL_TRUNCATED)
			o = PUTS(o, ",\"url.truncated\":true");
		if (e->version == 10 || e->version == 11)
			o = e->version == 10 ? PUTS(o, ",\"network.protocol.version\":\"1.0\"")
					     : PUTS(o, ",\"network.protocol.version\":\"1.1\"");
		int answered = !(e->flags & EV_UNANSWERED);
		if (answered) {
			o = PUTS(o, ",\"http.response.status_code\":");
			o = put_u64(o, e->status);
		}
		o = PUTS(o, ",\"duration_ms\":");
		o = put_ms(o, us);
		if (last) {
			o = PUTS(o, ",\"response.duration_ms\":");
			o = put_ms(o, last_us);
		}
		if (e->flags & EV_REQ_BODY) {
			o = PUTS(o, ",\"http.request.body.size\":");
			o = put_u64(o, e->req_body);
		}
		if (e->flags & EV_RESP_BODY) {
			o = PUTS(o, ",\"http.response.body.size\":");
			o = put_u64(o, e->resp_body);
		}
		if (!answered)
			o = e->reason == R_LOST ? PUTS(o, ",\"error.type\":\"response_not_seen\"")
						: PUTS(o, ",\"error.type\":\"no_response\"");
		o = put(o, c->conn_bytes.p + cn->names.off, cn->names.len);
		o = put(o, c->url_bytes.p + u->route.off, u->route.len);
		*o++ = '}';
		*o++ = '\n';
		c->out.len = (size_t)(o - (char *)c->out.p);
		c->line_end[i] = (uint32_t)c->out.len;
		c->kind[i] = RF_LINE;
		misses--;
		for (int w = 0; w < 4; w++) {
			c->weight_sum[w] += cn->weight[w];
			c->weight_sum[4 + w] += u->weight[w];
		}
		if (c->metrics) {
			double ms = (double)us / 1000.0;
			int b = 0;
			while (b < RF_NB - 1 && c->bounds[b] < ms)  /* bisect_left */
				b++;
			rf_count_cell(c, rf_cell_key(cn->series_id, u->route_id, e->method, e->status,
						     answered), b, ms, answered);
		}
	}
	return misses;
}

/* SPDX-License-Identifier: Apache-2.0 */
/* parts.c: the tables of line parts Python computed once and puts here:
 * per peers (client address, server address and port: addresses, ports and
 * names, valid for a span of record times) and per URL on a server (url.path,
 * url.query, http.route). Open addressing; a table half full is emptied
 * (Python puts the parts again when records miss them). */
#include "recordfmt.h"

/* Every connection's fragments are stale (Kubernetes names changed). */
void rf_forget_conns(struct rf_ctx *c)
{
	memset(c->conns, 0, sizeof(struct rf_conn) * (c->conn_mask + 1));
	c->conn_used = 0, c->conn_bytes.len = 0;
}

void rf_forget_urls(struct rf_ctx *c)
{
	memset(c->urls, 0, sizeof(struct rf_url) * (c->url_mask + 1));
	c->url_used = 0, c->url_bytes.len = 0;
}

struct rf_conn *rf_conn_slot(struct rf_ctx *c, const struct rf_peers_key *key, int insert)
{
	uint32_t i = (uint32_t)rf_hash((const uint8_t *)key, sizeof(*key), 0xcbf29ce484222325ULL) &
		     c->conn_mask;
	for (uint32_t probe = 0; probe <= c->conn_mask; probe++, i = (i + 1) & c->conn_mask) {
		struct rf_conn *s = &c->conns[i];
		if (!s->gen)
			return insert ? s : NULL;
		if (!memcmp(&s->key, key, sizeof(s->key)))
			return s;
	}
	return NULL;
}

void rf_peers_of(const struct http_event *e, struct rf_peers_key *k)
{
	memset(k, 0, sizeof(*k));
	memcpy(k->caddr, e->conn.caddr, 16), memcpy(k->saddr, e->conn.saddr, 16);
	k->sport = e->conn.sport;
}

/* The fragments of record @i's peers, valid for record times in [t_lo, t_hi):
 * '"client.address":"..","client.port":', ',"server.address":"..","server.port":N,'
 * and the names (',"client.k8s.pod.name":".."...'). */
int rf_put_peers(struct rf_ctx *c, uint32_t i, double t_lo, double t_hi,
		 const char *client, uint32_t client_len, const char *server, uint32_t server_len,
		 const char *names, uint32_t names_len, uint32_t server_id, uint32_t series_id,
		 const uint32_t *weight)
{
	if (i >= c->n)
		return -1;
	struct rf_peers_key key;
	rf_peers_of((const void *)(c->in + (size_t)i * EV_SIZE), &key);
	if (c->conn_used * 2 >= c->conn_mask + 1)
		rf_forget_conns(c);
	struct rf_conn *s = rf_conn_slot(c, &key, 1);
	if (!s)
		return -1;
	if (!s->gen)
		c->conn_used++;
	s->key = key;
	s->gen = 1, s->t_lo = t_lo, s->t_hi = t_hi;
	s->server_id = server_id, s->series_id = series_id;
	memcpy(s->weight, weight, sizeof(s->weight));
	if (rf_store(&c->conn_bytes, client, client_len, &s->client) ||
	    rf_store(&c->conn_bytes, server, server_len, &s->server) ||
	    rf_store(&c->conn_bytes, names, names_len, &s->names)) {
		s->gen = 0;
		return -1;
	}
	return 0;
}

struct rf_url *rf_url_slot(struct rf_ctx *c, uint32_t server_id, const uint8_t *url,
			   uint32_t len, uint64_t h, int insert)
{
	uint32_t i = (uint32_t)h & c->url_mask;
	for (uint32_t probe = 0; probe <= c->url_mask; probe++, i = (i + 1) & c->url_mask) {
		struct rf_url *s = &c->urls[i];
		if (!s->used)
			return insert ? s : NULL;
		if (s->hash == h && s->server_id == server_id && s->key.len == len &&
		    !memcmp(c->url_bytes.p + s->key.off, url, len))
			return s;
	}
	return NULL;
}

uint64_t rf_url_hash(uint32_t server_id, const uint8_t *url, uint32_t len)
{
	return rf_hash(url, len, 0xcbf29ce484222325ULL ^ ((uint64_t)server_id * 0x9e3779b97f4a7c15ULL));
}

/* The fragments of record @i's URL on server @server_id (the route cap's
 * unit): '"url.path":".."[,"url.query":".."]' and ',"http.route":".."'. */
int rf_put_url(struct rf_ctx *c, uint32_t i, uint32_t server_id,
	       const char *frag, uint32_t frag_len, const char *route, uint32_t route_len,
	       uint32_t route_id, const uint32_t *weight)
{
	if (i >= c->n)
		return -1;
	const struct http_event *e = (const void *)(c->in + (size_t)i * EV_SIZE);
	uint32_t len = e->url_len < MAX_URL_LEN ? e->url_len : MAX_URL_LEN;
	const uint8_t *url = (const uint8_t *)e->url;
	if (c->url_used * 2 >= c->url_mask + 1)
		rf_forget_urls(c);
	uint64_t h = rf_url_hash(server_id, url, len);
	struct rf_url *s = rf_url_slot(c, server_id, url, len, h, 1);
	if (!s)
		return -1;
	if (!s->used)
		c->url_used++;
	s->used = 1, s->hash = h, s->server_id = server_id, s->route_id = route_id;
	memcpy(s->weight, weight, sizeof(s->weight));
	if (rf_store(&c->url_bytes, url, len, &s->key) ||
	    rf_store(&c->url_bytes, frag, frag_len, &s->frag) ||
	    rf_store(&c->url_bytes, route, route_len, &s->route)) {
		s->used = 0;
		return -1;
	}
	return 0;
}

/* Many rf_put_url()s in one call: each entry is a struct rf_url_entry, then
 * frag_len + route_len bytes, padded to 4. Returns the entries taken. */
struct rf_url_entry {
	uint32_t index, server_id, frag_len, route_len, route_id, weight[4];
};

int rf_put_urls(struct rf_ctx *c, const uint8_t *buf, uint32_t len)
{
	uint32_t off = 0;
	int n = 0;
	while (off + sizeof(struct rf_url_entry) <= len) {
		struct rf_url_entry e;
		memcpy(&e, buf + off, sizeof(e));
		off += sizeof(e);
		if (off + e.frag_len + e.route_len > len)
			return n;
		const char *frag = (const char *)buf + off;
		if (rf_put_url(c, e.index, e.server_id, frag, e.frag_len, frag + e.frag_len,
			       e.route_len, e.route_id, e.weight))
			return n;
		off += (e.frag_len + e.route_len + 3) & ~3u;
		n++;
	}
	return n;
}


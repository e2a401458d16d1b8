/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* parse.bpf.h: Ethernet / IPv4 / IPv6 / TCP header parsing for TC programs.
 * Everything is read with bpf_skb_load_bytes: on veths the data may sit in
 * skb frags, where direct packet access sees nothing. */
#ifndef __REDTAP_PARSE_BPF_H
#define __REDTAP_PARSE_BPF_H

#define ETH_P_IP_BE   bpf_htons(0x0800)
#define ETH_P_IPV6_BE bpf_htons(0x86DD)
#define ETH_HLEN_     14

#define TCPF_FIN 0x01
#define TCPF_RST 0x04
#define TCPF_ACK 0x10

/* The parts of a TCP/IP packet the tracer needs. */
struct pkt {
	__u8 src[16];      /* v4-mapped for IPv4 */
	__u8 dst[16];
	__u16 sport;       /* host byte order */
	__u16 dport;
	__u32 seq;         /* host byte order */
	__u32 ack;         /* host byte order */
	__u32 payload_off; /* offset of the TCP payload in the skb */
	__u32 payload_len;
	__u8 tcp_flags;
};

static __always_inline void v4_mapped(__u8 *dst16, __u32 addr_be)
{
	__builtin_memset(dst16, 0, 10);
	dst16[10] = 0xff;
	dst16[11] = 0xff;
	__builtin_memcpy(dst16 + 12, &addr_be, 4);
}

/* Fill @p from @skb. Returns 0 for a TCP packet over IPv4/IPv6 (no IPv6
 * extension headers), -1 for anything else (the caller lets it pass). */
static __always_inline int parse_tcp_packet(struct __sk_buff *skb, struct pkt *p)
{
	__u32 l4_off, ip_end;
	__u16 proto = skb->protocol;
	struct tcphdr th;
	int have_th = 0;

	if (proto == ETH_P_IP_BE) {
		/* IPv4 and TCP headers in one load (no IP options: the usual case) */
		struct {
			struct iphdr ip;
			struct tcphdr th;
		} h;
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, ETH_HLEN_, &h, sizeof(h)) == 0) {
			ip = h.ip;
			have_th = ip.ihl == 5;
			th = h.th;
		} else if (bpf_skb_load_bytes(skb, ETH_HLEN_, &ip, sizeof(ip)) < 0) {
			return -1;
		}
		if (ip.protocol != IPPROTO_TCP || ip.ihl < 5)
			return -1;
		if (ip.frag_off & bpf_htons(0x3fff)) /* fragment: not followed */
			return -1;
		v4_mapped(p->src, ip.saddr);
		v4_mapped(p->dst, ip.daddr);
		l4_off = ETH_HLEN_ + ip.ihl * 4;
		ip_end = ETH_HLEN_ + bpf_ntohs(ip.tot_len);
		/* GSO super-packets on veth may carry tot_len 0 */
		if (ip.tot_len == 0)
			ip_end = skb->len;
	} else if (proto == ETH_P_IPV6_BE) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, ETH_HLEN_, &ip6, sizeof(ip6)) < 0)
			return -1;
		if (ip6.nexthdr != IPPROTO_TCP)
			return -1;
		__builtin_memcpy(p->src, &ip6.saddr, 16);
		__builtin_memcpy(p->dst, &ip6.daddr, 16);
		l4_off = ETH_HLEN_ + sizeof(ip6);
		ip_end = l4_off + bpf_ntohs(ip6.payload_len);
		if (ip6.payload_len == 0)
			ip_end = skb->len;
	} else {
		return -1;
	}

	if (!have_th && bpf_skb_load_bytes(skb, l4_off, &th, sizeof(th)) < 0)
		return -1;
	if (th.doff < 5)
		return -1;
	p->sport = bpf_ntohs(th.source);
	p->dport = bpf_ntohs(th.dest);
	p->seq = bpf_ntohl(th.seq);
	p->ack = bpf_ntohl(th.ack_seq);
	p->tcp_flags = ((__u8 *)&th)[13];
	p->payload_off = l4_off + th.doff * 4;
	if (ip_end > skb->len)
		ip_end = skb->len; /* truncated packet: use what is there */
	p->payload_len = ip_end > p->payload_off ? ip_end - p->payload_off : 0;
	return 0;
}

#endif /* __REDTAP_PARSE_BPF_H */

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * IPv6 capture, included by capture.bpf.c (it uses that file's settings, zt_pod, zt_stats,
 * zt_drop and zt_assign). The same decisions as the IPv4 path, on:
 *   - the fixed IPv6 header followed directly by TCP or UDP. Pods' TCP and DNS do not use
 *     extension headers (hop-by-hop, routing, fragment, ...), and walking a chain of unknown
 *     length is not worth its verifier cost; but leaving such packets untouched would let a
 *     pod that writes raw packets put one in front of its TCP and bypass the mesh. So a
 *     unicast packet with an extension header from or to an enrolled pod is dropped (and
 *     counted, ZT_STAT_IPV6_EXT); multicast (MLD reports carry a hop-by-hop header) and
 *     packets of other pods are untouched;
 *   - `zt_enrolled6`, keyed by the 16-byte address as it sits in the packet, with the same
 *     value as `zt_enrolled` (flags, ifindex of the pod's node-side interface);
 *   - socket lookups with the IPv6 tuple; the daemon's IPv6 listeners are [::1]:<port> (and
 *     [::]:<hbone>, which a lookup for [::1]:<hbone> finds).
 */

struct zt_ip6 {
	__u32 a[4];
};

/* Enrolled pods' IPv6 addresses (a dual-stack pod is in both maps). Written by the daemon;
 * pinned like zt_enrolled. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct zt_ip6);
	__type(value, struct zt_pod);
} zt_enrolled6 SEC(".maps");

struct zt_flow6 {
	struct zt_ip6 saddr;
	struct zt_ip6 daddr;
	__be16 sport;
	__be16 dport;
	__u8 tcp_flags;
	__u8 proto;
};

/* Ethernet + fixed IPv6 header + TCP: all a packet we handle needs in the linear area. */
#define MAX_HDR_LEN6 (ETH_HLEN + sizeof(struct ipv6hdr) + sizeof(struct tcphdr))

/* Whether an IPv6 next-header value is an extension header (RFC 8200 section 4, and the
 * ones registered since: mobility, HIP, shim6, experimental). */
static __always_inline int zt_ipv6_ext(__u8 nexthdr)
{
	switch (nexthdr) {
	case 0:   /* hop-by-hop options */
	case 43:  /* routing */
	case 44:  /* fragment */
	case 50:  /* ESP */
	case 51:  /* AH */
	case 60:  /* destination options */
	case 135: /* mobility */
	case 139: /* HIP */
	case 140: /* shim6 */
	case 253: /* experimental */
	case 254: /* experimental */
		return 1;
	}
	return 0;
}

/* Reads the IPv6 TCP or UDP tuple. PARSE_EXT: an extension header follows the fixed header
 * (only the addresses are filled in). PARSE_SKIP: another next header. PARSE_SHORT: headers
 * not (all) in the linear area. */
static __always_inline int zt_parse6(struct __sk_buff *skb, struct zt_flow6 *f)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + ETH_HLEN;

	if ((void *)(ip6 + 1) > data_end)
		return PARSE_SHORT;
	__builtin_memcpy(&f->saddr, &ip6->saddr, sizeof(f->saddr));
	__builtin_memcpy(&f->daddr, &ip6->daddr, sizeof(f->daddr));
	if (zt_ipv6_ext(ip6->nexthdr))
		return PARSE_EXT;
	if (ip6->nexthdr != IPPROTO_TCP && ip6->nexthdr != IPPROTO_UDP)
		return PARSE_SKIP;
	if (ip6->nexthdr == IPPROTO_UDP) {
		struct udphdr *uh = (void *)(ip6 + 1);
		if ((void *)(uh + 1) > data_end)
			return PARSE_SHORT;
		f->sport = uh->source;
		f->dport = uh->dest;
		f->tcp_flags = 0;
		f->proto = IPPROTO_UDP;
		return PARSE_OK;
	}
	struct tcphdr *th = (void *)(ip6 + 1);
	if ((void *)(th + 1) > data_end)
		return PARSE_SHORT;
	f->sport = th->source;
	f->dport = th->dest;
	f->tcp_flags = ((__u8 *)th)[TCP_FLAG_BYTE];
	f->proto = IPPROTO_TCP;
	return PARSE_OK;
}

/* Points the tuple's destination at the daemon's [::1]:<port>. */
static __always_inline void zt_to_daemon6(struct bpf_sock_tuple *t, __u16 port)
{
	t->ipv6.daddr[0] = 0;
	t->ipv6.daddr[1] = 0;
	t->ipv6.daddr[2] = 0;
	t->ipv6.daddr[3] = bpf_htonl(1);
	t->ipv6.dport = port;
}

/* A unicast packet with an extension header: dropped if it comes from or goes to an
 * enrolled pod (it could carry TCP past the daemon), untouched otherwise. */
static __always_inline int zt_ext6(struct zt_flow6 *f)
{
	/* ff00::/8: multicast (the first byte of the address). */
	if ((f->daddr.a[0] & bpf_htonl(0xff000000)) == bpf_htonl(0xff000000))
		return TC_ACT_UNSPEC;
	struct zt_ip6 key = f->saddr;
	struct zt_pod *v = bpf_map_lookup_elem(&zt_enrolled6, &key);
	if (v && (v->flags & ZT_POD_ENROLLED))
		return zt_drop(ZT_STAT_IPV6_EXT);
	key = f->daddr;
	v = bpf_map_lookup_elem(&zt_enrolled6, &key);
	if (v && (v->flags & ZT_POD_ENROLLED))
		return zt_drop(ZT_STAT_IPV6_EXT);
	return TC_ACT_UNSPEC;
}

/* zt_host_redirect's IPv6 test: whether a packet leaving a pod veth towards its pod is TCP
 * (or hides what it carries behind an extension header) to an enrolled pod's IPv6 address,
 * so it must take the detour through lo's ingress to be captured. */
static __always_inline int zt_host_redirect6(struct __sk_buff *skb)
{
	struct zt_flow6 f;
	int rc = zt_parse6(skb, &f);
	if (rc == PARSE_SHORT) {
		__u32 len = skb->len < MAX_HDR_LEN6 ? skb->len : MAX_HDR_LEN6;
		if (bpf_skb_pull_data(skb, len) != 0)
			return 0;
		rc = zt_parse6(skb, &f);
	}
	if (!(rc == PARSE_EXT || (rc == PARSE_OK && f.proto == IPPROTO_TCP)))
		return 0;
	struct zt_ip6 key = f.daddr;
	struct zt_pod *v = bpf_map_lookup_elem(&zt_enrolled6, &key);
	return v && (v->flags & ZT_POD_ENROLLED);
}

/* The IPv6 counterpart of zt_capture's body: same steps, same verdicts. */
static __always_inline int zt_capture6(struct __sk_buff *skb)
{
	struct zt_flow6 f;
	int rc;

	if (skb->mark & zt_daemon_mark)
		return TC_ACT_UNSPEC;
	rc = zt_parse6(skb, &f);
	if (rc == PARSE_SHORT) {
		__u32 len = skb->len < MAX_HDR_LEN6 ? skb->len : MAX_HDR_LEN6;
		if (bpf_skb_pull_data(skb, len) != 0)
			return TC_ACT_UNSPEC;
		rc = zt_parse6(skb, &f);
	}
	if (rc == PARSE_EXT)
		return zt_ext6(&f);
	if (rc != PARSE_OK)
		return TC_ACT_UNSPEC;

	struct zt_ip6 key = f.saddr;
	struct zt_pod *v = bpf_map_lookup_elem(&zt_enrolled6, &key);
	__u32 src_flags = 0;
	if (v) {
		if (v->ifindex != skb->ifindex)
			return zt_drop(ZT_STAT_SPOOFED);
		src_flags = v->flags;
	}
	__u32 src_enrolled = src_flags & ZT_POD_ENROLLED;
	__u32 src_dns = zt_dns_port != 0 && src_enrolled && (src_flags & ZT_POD_DNS) &&
			f.dport == bpf_htons(DNS_PORT);

	struct bpf_sock_tuple t = {};
	__builtin_memcpy(t.ipv6.saddr, &f.saddr, sizeof(t.ipv6.saddr));
	__builtin_memcpy(t.ipv6.daddr, &f.daddr, sizeof(t.ipv6.daddr));
	t.ipv6.sport = f.sport;
	t.ipv6.dport = f.dport;
	struct bpf_sock *sk;

	if (f.proto == IPPROTO_UDP) {
		if (!src_dns)
			return TC_ACT_UNSPEC;
		/* [::1]:<dns port>, transparent, IPV6_RECVORIGDSTADDR. */
		zt_to_daemon6(&t, zt_dns_port);
		sk = bpf_sk_lookup_udp(skb, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0);
		if (!sk)
			return zt_drop(ZT_STAT_NO_DAEMON);
		rc = zt_assign(skb, sk);
		bpf_sk_release(sk);
		return rc;
	}

	if (!src_enrolled) {
		key = f.daddr;
		v = bpf_map_lookup_elem(&zt_enrolled6, &key);
		if (!v || !(v->flags & ZT_POD_ENROLLED))
			return TC_ACT_UNSPEC;
	}

	sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		if (sk->state != BPF_TCP_LISTEN) {
			rc = zt_assign(skb, sk);
			bpf_sk_release(sk);
			return rc;
		}
		bpf_sk_release(sk);
	}

	if ((f.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN)
		return zt_drop(ZT_STAT_NO_DAEMON);

	__u16 port;
	if (src_dns)
		port = zt_dns_port;
	else if (src_enrolled)
		port = zt_outbound_port;
	else if (f.dport == zt_hbone_port)
		port = zt_hbone_port;
	else
		port = zt_inbound_port;

	zt_to_daemon6(&t, port);
	sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return zt_drop(ZT_STAT_NO_DAEMON);
	if (sk->state == BPF_TCP_LISTEN)
		rc = zt_assign(skb, sk);
	else
		rc = zt_drop(ZT_STAT_NO_DAEMON);
	bpf_sk_release(sk);
	return rc;
}

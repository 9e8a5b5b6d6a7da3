// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Traffic capture for the node tunnel daemon (see ebpf/README.md and ARCHITECTURE.md,
 * "Data path decisions").
 *
 * One TC ingress program, `zt_capture`, attached (as a TCX link) to the node-side veth of
 * every local pod and to the node's uplinks. It steers TCP of enrolled pods into the daemon's
 * sockets with bpf_sk_assign(); the packet keeps its addresses, so the daemon reads the
 * original destination with getsockname(). Assigned packets get `zt_capture_mark`, which an
 * `ip rule fwmark` routes to a `local default dev lo` table: without that the kernel would
 * forward the packet (its destination is not a local address) instead of delivering it.
 *
 * IPv6 takes the same steps in its own functions (capture_v6.h), with its own enrolled map.
 *
 * Per packet, cheapest test first:
 *   1. not IPv4 TCP/UDP, or a non-first fragment, or carrying the daemon's socket mark -> untouched;
 *   2. neither source nor destination IP is an enrolled local pod -> untouched
 *      (one or two hash lookups; no socket lookup for traffic outside the mesh);
 *   3. a socket (not a listener) owns the packet's 4-tuple -> assign it: return traffic of
 *      connections the daemon opened with a pod's IP (IP_TRANSPARENT), and every packet after
 *      the SYN of captured flows (their request/established sockets carry the original tuple);
 *   4. a SYN (no ACK): from an enrolled pod to port 53 (pod's DNS flag set, DNS capture on)
 *      -> DNS TCP listener; from an enrolled pod otherwise -> outbound listener; to an enrolled
 *      pod's HBONE port -> HBONE listener; to an enrolled pod otherwise -> inbound plaintext
 *      listener.
 *   UDP: only datagrams from an enrolled pod with the DNS flag to port 53 (any resolver
 *   address) are assigned, to the daemon's transparent UDP socket on 127.0.0.1:<dns port>;
 *   every other UDP datagram is untouched.
 *
 * Fail closed: the programs and maps are pinned and stay attached while no daemon runs. A
 * packet of an enrolled pod that would be captured but finds no daemon socket (no listener for
 * a SYN, no socket owning a later segment: the daemon is gone or restarting) is dropped, never
 * passed on in clear; a client's SYN retransmission then reaches the restarted daemon.
 *
 * Identity is bound to the interface: a packet whose source address is an enrolled pod's is
 * that pod's only if it entered through the pod's own interface (its ifindex is in the map
 * value). Any other such packet is spoofed and dropped. Both kinds of drop are counted in
 * `zt_stats`, which the daemon exports as a metric.
 *
 * Return codes: TC_ACT_UNSPEC (= TCX_NEXT) for assigned and untouched packets alike, so that
 * programs attached after ours on the same hook (a CNI's network policy, say) still see all
 * traffic, captured or not, and may drop it (alone on a hook it means "pass");
 * TC_ACT_SHOT for the drops below.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

/*
 * Settings, written by the loader (aya EbpfLoader::override_global) before the program is
 * loaded. They live in a frozen read-only map, so the verifier sees them as constants.
 * Ports are in network byte order, marks as the skb carries them.
 */
volatile const __u32 zt_capture_mark = 0;
volatile const __u32 zt_daemon_mark = 0;
volatile const __u16 zt_outbound_port = 0;
volatile const __u16 zt_inbound_port = 0;
volatile const __u16 zt_hbone_port = 0;
/* DNS listeners (UDP and TCP, 127.0.0.1); 0 = DNS capture off. */
volatile const __u16 zt_dns_port = 0;

/* Value flags of zt_enrolled. */
#define ZT_POD_ENROLLED 1u
/* The pod's DNS (port 53) goes to the daemon's DNS proxy. */
#define ZT_POD_DNS 2u

#define DNS_PORT 53

/* An enrolled pod: ZT_POD_* flags and the ifindex of its node-side interface (0 while the
 * daemon has not found it: then no packet is attributed to the pod). */
struct zt_pod {
	__u32 flags;
	__u32 ifindex;
};

/* Enrolled pods on this node: key IPv4 address (network byte order). Written by the daemon on
 * every sync; the programs never change it. Pinned: outlives the daemon. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct zt_pod);
} zt_enrolled SEC(".maps");

/* Drop counters, per CPU (summed by the daemon). */
#define ZT_STAT_SPOOFED 0
#define ZT_STAT_NO_DAEMON 1
#define ZT_STAT_IPV6_EXT 2
#define ZT_STAT_COUNT 3
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ZT_STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} zt_stats SEC(".maps");

#define IP_FRAG_OFFSET_MASK 0x1fff
#define TCP_FLAG_BYTE 13
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10
/* Longest headers we may need in the linear part: Ethernet + IPv4 with options + TCP. */
#define MAX_HDR_LEN (ETH_HLEN + 60 + sizeof(struct tcphdr))

struct zt_flow {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 tcp_flags;
	__u8 proto;
};

enum { PARSE_OK = 0, PARSE_SKIP = 1, PARSE_SHORT = 2, PARSE_EXT = 3 };

/* Reads the IPv4 TCP or UDP tuple. PARSE_SHORT: headers not (all) in the linear area. */
static __always_inline int zt_parse(struct __sk_buff *skb, struct zt_flow *f)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;

	if ((void *)(ip + 1) > data_end)
		return PARSE_SHORT;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return PARSE_SKIP;
	if (ip->frag_off & bpf_htons(IP_FRAG_OFFSET_MASK))
		return PARSE_SKIP;
	__u32 ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return PARSE_SKIP;
	if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *uh = (void *)ip + ihl;
		if ((void *)(uh + 1) > data_end)
			return PARSE_SHORT;
		f->saddr = ip->saddr;
		f->daddr = ip->daddr;
		f->sport = uh->source;
		f->dport = uh->dest;
		f->tcp_flags = 0;
		f->proto = IPPROTO_UDP;
		return PARSE_OK;
	}
	struct tcphdr *th = (void *)ip + ihl;
	if ((void *)(th + 1) > data_end)
		return PARSE_SHORT;

	f->saddr = ip->saddr;
	f->daddr = ip->daddr;
	f->sport = th->source;
	f->dport = th->dest;
	f->tcp_flags = ((__u8 *)th)[TCP_FLAG_BYTE];
	f->proto = IPPROTO_TCP;
	return PARSE_OK;
}

/* zt_parse, after pulling the headers into the linear area when they are not all there. */
static __always_inline int zt_parse_pulled(struct __sk_buff *skb, struct zt_flow *f)
{
	int rc = zt_parse(skb, f);
	if (rc == PARSE_SHORT) {
		__u32 len = skb->len < MAX_HDR_LEN ? skb->len : MAX_HDR_LEN;
		if (bpf_skb_pull_data(skb, len) != 0)
			return PARSE_SKIP;
		rc = zt_parse(skb, f);
	}
	return rc;
}

/* Counts a drop and returns the verdict that drops. */
static __always_inline int zt_drop(__u32 stat)
{
	__u64 *n = bpf_map_lookup_elem(&zt_stats, &stat);
	if (n)
		*n += 1;
	return TC_ACT_SHOT;
}

/* Assigns the packet to `sk` and marks it for local delivery. Does not release `sk`. A packet
 * that cannot be assigned is one the daemon should have had: dropped. An assigned packet goes
 * on to the next program of the hook (TCX_NEXT; a CNI's network policy, say), which may still
 * drop it; with none, it is delivered to `sk`. */
static __always_inline int zt_assign(struct __sk_buff *skb, struct bpf_sock *sk)
{
	if (bpf_sk_assign(skb, sk, 0) != 0)
		return zt_drop(ZT_STAT_NO_DAEMON);
	skb->mark |= zt_capture_mark;
	return TC_ACT_UNSPEC;
}

#include "capture_v6.h"

SEC("classifier")
int zt_capture(struct __sk_buff *skb)
{
	struct zt_flow f;
	int rc;

	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return zt_capture6(skb);
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_UNSPEC;
	if (skb->mark & zt_daemon_mark)
		return TC_ACT_UNSPEC;

	rc = zt_parse_pulled(skb, &f);
	if (rc != PARSE_OK)
		return TC_ACT_UNSPEC;

	/* Read the flags (not just test the pointers: clang would OR the two map value
	 * pointers, which the verifier rejects). The destination only matters when the source
	 * is not enrolled. */
	__u32 key = f.saddr;
	struct zt_pod *v = bpf_map_lookup_elem(&zt_enrolled, &key);
	__u32 src_flags = 0;
	if (v) {
		/* An enrolled pod's address from anywhere but that pod's interface. */
		if (v->ifindex != skb->ifindex)
			return zt_drop(ZT_STAT_SPOOFED);
		src_flags = v->flags;
	}
	__u32 src_enrolled = src_flags & ZT_POD_ENROLLED;
	__u32 src_dns = zt_dns_port != 0 && src_enrolled && (src_flags & ZT_POD_DNS) &&
			f.dport == bpf_htons(DNS_PORT);

	struct bpf_sock_tuple t = {};
	t.ipv4.saddr = f.saddr;
	t.ipv4.daddr = f.daddr;
	t.ipv4.sport = f.sport;
	t.ipv4.dport = f.dport;
	struct bpf_sock *sk;

	if (f.proto == IPPROTO_UDP) {
		if (!src_dns)
			return TC_ACT_UNSPEC;
		/* The daemon's transparent UDP socket 127.0.0.1:<dns port>; it reads the resolver
		 * address the pod asked with IP_RECVORIGDSTADDR. */
		t.ipv4.daddr = bpf_htonl(0x7f000001);
		t.ipv4.dport = zt_dns_port;
		sk = bpf_sk_lookup_udp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
		if (!sk)
			return zt_drop(ZT_STAT_NO_DAEMON);
		rc = zt_assign(skb, sk);
		bpf_sk_release(sk);
		return rc;
	}

	if (!src_enrolled) {
		key = f.daddr;
		v = bpf_map_lookup_elem(&zt_enrolled, &key);
		if (!v || !(v->flags & ZT_POD_ENROLLED))
			return TC_ACT_UNSPEC;
	}

	/* Here the source or the destination is an enrolled pod.
	 * Established (or request / time-wait) socket owning this exact tuple. A listener found
	 * here matched only by destination port (e.g. a host service on 0.0.0.0): never ours. */
	sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		if (sk->state != BPF_TCP_LISTEN) {
			rc = zt_assign(skb, sk);
			bpf_sk_release(sk);
			return rc;
		}
		bpf_sk_release(sk);
	}

	/* A later segment of a captured flow whose daemon socket is gone (the daemon died or
	 * restarted): never let it bypass the daemon. */
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

	/* The daemon's listeners: 127.0.0.1:<outbound|inbound|dns>, 0.0.0.0:<hbone>. A lookup for
	 * 127.0.0.1:<port> finds either. */
	t.ipv4.daddr = bpf_htonl(0x7f000001);
	t.ipv4.dport = port;
	sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return zt_drop(ZT_STAT_NO_DAEMON);
	if (sk->state == BPF_TCP_LISTEN)
		rc = zt_assign(skb, sk);
	else
		rc = zt_drop(ZT_STAT_NO_DAEMON);
	bpf_sk_release(sk);
	return rc;
}

/*
 * Node-local path (`zt_host_redirect`, TC egress of every local pod's node-side veth).
 *
 * A packet the node itself sends to a pod (any host-network process: kubelet probes, a shell
 * on the node) never enters the node's namespace, so `zt_capture` at ingress never sees it;
 * it leaves through the pod veth's egress. There, TCP to an enrolled pod that does not carry
 * the daemon's mark is handed to `lo`'s ingress, where `zt_capture` is attached too and treats
 * it like any other packet arriving for the pod: a SYN goes to the inbound plaintext listener,
 * later segments to the socket owning their tuple, the rest is dropped (fail closed).
 * bpf_sk_assign only works at ingress, hence the detour through lo.
 *
 * The destination MAC becomes lo's (all zeros): eth_type_trans on the redirect would otherwise
 * classify the packet PACKET_OTHERHOST and IP would drop it. The node needs
 * `net.ipv4.conf.lo.accept_local=1` (set by the daemon): the packet's source is one of the
 * node's own addresses, which the input route check rejects on a device without it.
 * IPv6 takes the same detour (zt_host_redirect6: TCP, or anything behind an extension header,
 * to an enrolled pod's IPv6 address; zt_capture6 on lo then captures or drops it); IPv6 has
 * no equivalent of accept_local to set.
 * Everything else (the daemon's own connections, UDP, ICMP, traffic to pods not enrolled)
 * leaves untouched. Packets forwarded to the pod that no ingress program captured (an
 * interface capture is not attached to) take the same detour.
 */
#define ZT_LOOPBACK_IFINDEX 1

SEC("classifier")
int zt_host_redirect(struct __sk_buff *skb)
{
	struct zt_flow f;
	int rc;

	if (skb->mark & zt_daemon_mark)
		return TC_ACT_UNSPEC;
	if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		if (!zt_host_redirect6(skb))
			return TC_ACT_UNSPEC;
	} else {
		if (skb->protocol != bpf_htons(ETH_P_IP))
			return TC_ACT_UNSPEC;
		rc = zt_parse_pulled(skb, &f);
		if (rc != PARSE_OK || f.proto != IPPROTO_TCP)
			return TC_ACT_UNSPEC;
		__u32 key = f.daddr;
		struct zt_pod *v = bpf_map_lookup_elem(&zt_enrolled, &key);
		if (!v || !(v->flags & ZT_POD_ENROLLED))
			return TC_ACT_UNSPEC;
	}

	__u8 lo_mac[ETH_ALEN] = {};
	if (bpf_skb_store_bytes(skb, 0, lo_mac, ETH_ALEN, 0) != 0)
		return zt_drop(ZT_STAT_NO_DAEMON);
	return bpf_redirect(ZT_LOOPBACK_IFINDEX, BPF_F_INGRESS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";

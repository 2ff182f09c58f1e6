// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Service translation for clients outside the node, attached with tc (tcx) to the node's
 * external interfaces. Ingress translates packets to an LB_SCOPE_EXTERNAL frontend (a
 * NodePort on a node address, an externalIP, a LoadBalancer ingress IP) to a backend and
 * records the flow in ct4; egress translates the replies of local backends back. A remote
 * backend under externalTrafficPolicy Cluster also gets the client's source rewritten to
 * a node address (SNAT), so its replies come back here: ingress translates those and
 * sends them straight out towards the client.
 *
 * Not handled: IPv6, IP fragments (left to the stack untranslated, so a fragmented
 * datagram to a frontend is not delivered), ICMP errors about translated flows, and
 * interfaces without an Ethernet header.
 */
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <stdbool.h>
#include <stddef.h>
#include <bpf/bpf_endian.h>

#include "lb.h"

#ifndef AF_INET
#define AF_INET 2
#endif

#define IP_MF 0x2000 /* more fragments */
#define IP_OFFSET 0x1fff /* fragment offset */

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10
#define TCP_FLAGS_OFF 13 /* byte offset of the flags in the TCP header */

#define NSEC_PER_SEC 1000000000ULL

/* A UDP flow whose backend is gone moves to another after this long without packets. */
#define CT_UDP_REUSE_NS (30 * NSEC_PER_SEC)
/* last_seen_ns is written at most this often, to keep the common path read-only. */
#define CT_TOUCH_NS NSEC_PER_SEC

/*
 * Source ports for SNAT when the client's own port is taken. They are checked against the
 * node's sockets before use; the range stays clear of the NodePort range (30000-32767).
 */
#define CT_SNAT_PORT_MIN 32768
#define CT_SNAT_PORT_MAX 65535
#define CT_SNAT_TRIES 16

/* Flows of the tc programs, both directions; see `struct ct4_key` in lb.h. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct4_key);
	__type(value, struct ct4_value);
	__uint(max_entries, LB_MAX_CT);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ct4 SEC(".maps");

/* What the programs read from a packet before translating it. */
struct lb4_packet {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto; /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 tcp_flags; /* TCP: the flags byte; UDP: zero */
	__u16 l4_off; /* offset of the TCP or UDP header from the start of the frame */
};

/* Reads an unfragmented IPv4 TCP or UDP packet. Returns -1 for anything else. */
static __always_inline int lb4_parse(struct __sk_buff *skb, struct lb4_packet *pkt)
{
	struct iphdr iph;
	__be16 ports[2];

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return -1;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &iph, sizeof(iph)) < 0)
		return -1;
	if (iph.version != 4 || iph.ihl < 5)
		return -1;
	if (iph.protocol != IPPROTO_TCP && iph.protocol != IPPROTO_UDP)
		return -1;
	/* Only the first fragment has ports; translating it alone would split the datagram. */
	if (iph.frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return -1;
	pkt->l4_off = ETH_HLEN + iph.ihl * 4;
	if (bpf_skb_load_bytes(skb, pkt->l4_off, ports, sizeof(ports)) < 0)
		return -1;
	pkt->tcp_flags = 0;
	if (iph.protocol == IPPROTO_TCP &&
	    bpf_skb_load_bytes(skb, pkt->l4_off + TCP_FLAGS_OFF, &pkt->tcp_flags, 1) < 0)
		return -1;
	pkt->saddr = iph.saddr;
	pkt->daddr = iph.daddr;
	pkt->sport = ports[0];
	pkt->dport = ports[1];
	pkt->proto = iph.protocol;
	return 0;
}

static __always_inline void ct4_key_of(struct ct4_key *key, const struct lb4_packet *pkt, __u8 dir)
{
	key->saddr = pkt->saddr;
	key->daddr = pkt->daddr;
	key->sport = pkt->sport;
	key->dport = pkt->dport;
	key->proto = pkt->proto;
	key->dir = dir;
}

static __always_inline void ct4_touch(struct ct4_value *ct, __u64 now)
{
	if (now - ct->last_seen_ns > CT_TOUCH_NS)
		ct->last_seen_ns = now;
}

/* Notes a TCP FIN or RST on the flow's original entry, found from its reply entry. */
static __always_inline void ct4_note_close_from_reply(const struct ct4_value *reply,
						      const struct lb4_packet *pkt)
{
	struct ct4_key key = {
		.saddr = reply->daddr,
		.daddr = reply->saddr,
		.sport = reply->dport,
		.dport = reply->sport,
		.proto = pkt->proto,
		.dir = CT_DIR_ORIGINAL,
	};
	struct ct4_value *original;

	if (!(pkt->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)))
		return;
	original = bpf_map_lookup_elem(&ct4, &key);
	if (original)
		original->flags |= CT_F_CLOSING;
}

/*
 * Whether a packet from the client still belongs to the flow `ct` records. Open flows keep
 * their backend even after it left the service; a new TCP connection (a SYN) on a tuple
 * whose flow was closing, or whose backend is gone, starts over, and so does UDP after a
 * quiet spell when its backend is gone.
 */
static __always_inline bool ct4_current(const struct ct4_value *ct, const struct lb4_packet *pkt,
					__u64 now)
{
	__u32 backend_id = ct->backend_id;

	if (pkt->proto == IPPROTO_TCP) {
		if ((pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN)
			return true;
		if (ct->flags & CT_F_CLOSING)
			return false;
	} else if (now - ct->last_seen_ns < CT_UDP_REUSE_NS) {
		return true;
	}
	return bpf_map_lookup_elem(&lb4_backends, &backend_id) != NULL;
}

static __always_inline int lb4_rewrite_addr(struct __sk_buff *skb, __u32 off, __be32 from,
					    __be32 to, __u32 l4_csum_off, __u64 l4_flags)
{
	if (bpf_l4_csum_replace(skb, l4_csum_off, from, to, l4_flags | BPF_F_PSEUDO_HDR | sizeof(to)))
		return -1;
	if (bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), from, to, sizeof(to)))
		return -1;
	return bpf_skb_store_bytes(skb, off, &to, sizeof(to), 0);
}

static __always_inline int lb4_rewrite_port(struct __sk_buff *skb, __u32 off, __be16 from,
					    __be16 to, __u32 l4_csum_off, __u64 l4_flags)
{
	if (bpf_l4_csum_replace(skb, l4_csum_off, from, to, l4_flags | sizeof(to)))
		return -1;
	return bpf_skb_store_bytes(skb, off, &to, sizeof(to), 0);
}

/* Rewrites the packet's addresses and ports to `to`'s, fixing the IP and L4 checksums. */
static __always_inline int lb4_rewrite(struct __sk_buff *skb, const struct lb4_packet *pkt,
				       const struct ct4_value *to)
{
	__u32 l4_csum_off = pkt->l4_off;
	__u64 l4_flags = 0;

	if (pkt->proto == IPPROTO_TCP) {
		l4_csum_off += offsetof(struct tcphdr, check);
	} else {
		l4_csum_off += offsetof(struct udphdr, check);
		/* A UDP checksum of zero means none: keep it so, and never produce one. */
		l4_flags = BPF_F_MARK_MANGLED_0;
	}
	if (to->saddr != pkt->saddr &&
	    lb4_rewrite_addr(skb, ETH_HLEN + offsetof(struct iphdr, saddr), pkt->saddr, to->saddr,
			     l4_csum_off, l4_flags))
		return -1;
	if (to->daddr != pkt->daddr &&
	    lb4_rewrite_addr(skb, ETH_HLEN + offsetof(struct iphdr, daddr), pkt->daddr, to->daddr,
			     l4_csum_off, l4_flags))
		return -1;
	if (to->sport != pkt->sport &&
	    lb4_rewrite_port(skb, pkt->l4_off, pkt->sport, to->sport, l4_csum_off, l4_flags))
		return -1;
	if (to->dport != pkt->dport &&
	    lb4_rewrite_port(skb, pkt->l4_off + sizeof(__be16), pkt->dport, to->dport, l4_csum_off,
			     l4_flags))
		return -1;
	return 0;
}

static __always_inline int lb4_decrement_ttl(struct __sk_buff *skb, __u8 ttl)
{
	__u8 new_ttl = ttl - 1;

	/* ttl is the high byte of a 16-bit checksum word it shares with protocol. */
	if (bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check),
				bpf_htons((__u16)ttl << 8), bpf_htons((__u16)new_ttl << 8),
				sizeof(__u16)))
		return -1;
	return bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct iphdr, ttl), &new_ttl,
				   sizeof(new_ttl), 0);
}

/*
 * Routes a translated packet out of the node without the stack's input path, which would
 * drop it as a martian: its source is now one of the node's own addresses (SNAT towards a
 * remote backend, or a frontend on a reply to the client). Falls back to the stack when the
 * FIB cannot say where the packet goes.
 */
static __always_inline int lb4_forward(struct __sk_buff *skb)
{
	struct bpf_fib_lookup fib = {};
	struct bpf_redir_neigh nh = {};
	struct iphdr iph;
	long rc;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &iph, sizeof(iph)) < 0)
		return TC_ACT_SHOT;
	if (iph.ttl <= 1)
		return TC_ACT_SHOT;
	fib.family = AF_INET;
	fib.tos = iph.tos;
	fib.l4_protocol = iph.protocol;
	fib.tot_len = bpf_ntohs(iph.tot_len);
	fib.ipv4_src = iph.saddr;
	fib.ipv4_dst = iph.daddr;
	fib.ifindex = skb->ingress_ifindex;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (lb4_decrement_ttl(skb, iph.ttl))
			return TC_ACT_SHOT;
		if (bpf_skb_store_bytes(skb, 0, fib.dmac, ETH_ALEN, 0) ||
		    bpf_skb_store_bytes(skb, ETH_ALEN, fib.smac, ETH_ALEN, 0))
			return TC_ACT_SHOT;
		return bpf_redirect(fib.ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		if (lb4_decrement_ttl(skb, iph.ttl))
			return TC_ACT_SHOT;
		/* The lookup left the next hop in ipv4_dst; the kernel resolves its address. */
		nh.nh_family = AF_INET;
		nh.ipv4_nh = fib.ipv4_dst;
		return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
	}
	return TC_ACT_OK;
}

/*
 * The node address a SNATed flow leaves from: the NodePort's own address, which the client
 * targeted; for an externalIP or LoadBalancer IP (perhaps not on the node), the address
 * the node's route towards the backend prefers.
 */
static __always_inline int lb4_snat_address(struct __sk_buff *skb, const struct lb4_packet *pkt,
					    __u8 svc_flags, __be32 backend_address, __be32 *out)
{
	struct bpf_fib_lookup fib = {};

	if (svc_flags & LB_SVC_NODEPORT) {
		*out = pkt->daddr;
		return 0;
	}
	fib.family = AF_INET;
	fib.l4_protocol = pkt->proto;
	fib.ipv4_dst = backend_address;
	fib.ifindex = skb->ingress_ifindex;
	if (bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_SRC | BPF_FIB_LOOKUP_SKIP_NEIGH) !=
	    BPF_FIB_LKUP_RET_SUCCESS)
		return -1;
	*out = fib.ipv4_src;
	return 0;
}

/* Whether a node socket would take the backend's reply addressed to `reply_key`. */
static __always_inline bool lb4_port_used_locally(struct __sk_buff *skb,
						  const struct ct4_key *reply_key)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;

	tuple.ipv4.saddr = reply_key->saddr;
	tuple.ipv4.daddr = reply_key->daddr;
	tuple.ipv4.sport = reply_key->sport;
	tuple.ipv4.dport = reply_key->dport;
	if (reply_key->proto == IPPROTO_TCP)
		sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	else
		sk = bpf_sk_lookup_udp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return false;
	bpf_sk_release(sk);
	return true;
}

/*
 * Claims a SNAT source port by inserting the flow's reply entry, which is what makes the
 * port busy: the client's own port first, then random ones. Fills reply_key->dport.
 */
static __always_inline int ct4_claim_snat_port(struct __sk_buff *skb, struct ct4_key *reply_key,
					       const struct ct4_value *reply, __be16 client_port)
{
	__u16 port = bpf_ntohs(client_port);
	int i;

	for (i = 0; i < CT_SNAT_TRIES; i++) {
		if (i > 0)
			port = CT_SNAT_PORT_MIN +
			       bpf_get_prandom_u32() % (CT_SNAT_PORT_MAX - CT_SNAT_PORT_MIN + 1);
		reply_key->dport = bpf_htons(port);
		if (lb4_port_used_locally(skb, reply_key))
			continue;
		if (bpf_map_update_elem(&ct4, reply_key, reply, BPF_NOEXIST) == 0)
			return 0;
	}
	return -1;
}

/* Forgets the reply entry of a flow whose original entry is about to be replaced. */
static __always_inline void ct4_delete_reply_of(const struct ct4_value *original, __u8 proto)
{
	struct ct4_key key = {
		.saddr = original->daddr,
		.daddr = original->saddr,
		.sport = original->dport,
		.dport = original->sport,
		.proto = proto,
		.dir = CT_DIR_REPLY,
	};

	bpf_map_delete_elem(&ct4, &key);
}

/*
 * A packet to a frontend that starts a flow: picks a backend, records both directions in
 * ct4 and translates. Without a backend the packet is dropped: kube-proxy drops it too for
 * externalTrafficPolicy Local without local endpoints, and rejects it (ICMP or RST) for
 * the others; a drop lets the client time out instead.
 */
static __always_inline int lb4_new_flow(struct __sk_buff *skb, const struct lb4_packet *pkt,
					const struct lb4_key *svc_key, const struct lb4_service *svc,
					__u64 now)
{
	struct ct4_key original_key = {};
	struct ct4_key reply_key = {};
	struct ct4_value original = {};
	struct ct4_value reply = {};
	const struct lb4_backend *backend;
	__u32 backend_id = 0;
	__u8 svc_flags = svc->flags;
	bool snat;

	backend = lb4_select_backend(svc_key, svc, (__u64)pkt->saddr, &backend_id);
	if (!backend)
		return TC_ACT_SHOT;
	/* A local backend or policy Local keeps the client's address; a remote one needs SNAT. */
	snat = !(backend->flags & LB_BACKEND_LOCAL) && !(svc_flags & LB_SVC_LOCAL);

	original.last_seen_ns = now;
	original.saddr = pkt->saddr;
	original.daddr = backend->address;
	original.sport = pkt->sport;
	original.dport = backend->port;
	original.backend_id = backend_id;
	original.rev_nat_index = svc->rev_nat_index;
	original.flags = snat ? CT_F_SNAT : 0;

	reply.last_seen_ns = now;
	reply.saddr = pkt->daddr;
	reply.daddr = pkt->saddr;
	reply.sport = pkt->dport;
	reply.dport = pkt->sport;
	reply.backend_id = backend_id;
	reply.rev_nat_index = svc->rev_nat_index;
	reply.flags = original.flags;

	reply_key.saddr = backend->address;
	reply_key.daddr = pkt->saddr;
	reply_key.sport = backend->port;
	reply_key.dport = pkt->sport;
	reply_key.proto = pkt->proto;
	reply_key.dir = CT_DIR_REPLY;

	if (snat) {
		if (lb4_snat_address(skb, pkt, svc_flags, original.daddr, &original.saddr))
			return TC_ACT_SHOT;
		reply_key.daddr = original.saddr;
		if (ct4_claim_snat_port(skb, &reply_key, &reply, pkt->sport))
			return TC_ACT_SHOT;
		original.sport = reply_key.dport;
	} else if (bpf_map_update_elem(&ct4, &reply_key, &reply, BPF_ANY)) {
		return TC_ACT_SHOT;
	}

	ct4_key_of(&original_key, pkt, CT_DIR_ORIGINAL);
	if (bpf_map_update_elem(&ct4, &original_key, &original, BPF_ANY)) {
		bpf_map_delete_elem(&ct4, &reply_key);
		return TC_ACT_SHOT;
	}
	lb_count_connection(backend_id);

	if (lb4_rewrite(skb, pkt, &original))
		return TC_ACT_SHOT;
	return snat ? lb4_forward(skb) : TC_ACT_OK;
}

/*
 * Ingress of an external interface: packets of known flows from clients, replies of remote
 * backends to SNATed flows, and new flows to LB_SCOPE_EXTERNAL frontends.
 */
static __always_inline int lb4_ingress(struct __sk_buff *skb)
{
	struct lb4_key svc_key = {};
	struct ct4_key key = {};
	struct ct4_value stale = {};
	struct ct4_value to;
	struct lb4_packet pkt;
	struct lb4_service *svc;
	struct ct4_value *ct;
	bool replace = false;
	__u64 now;

	if (lb4_parse(skb, &pkt))
		return TC_ACT_OK;
	now = bpf_ktime_get_ns();

	ct4_key_of(&key, &pkt, CT_DIR_ORIGINAL);
	ct = bpf_map_lookup_elem(&ct4, &key);
	if (ct) {
		if (ct4_current(ct, &pkt, now)) {
			ct4_touch(ct, now);
			if (pkt.tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
				ct->flags |= CT_F_CLOSING;
			to = *ct;
			if (lb4_rewrite(skb, &pkt, &to))
				return TC_ACT_SHOT;
			return (to.flags & CT_F_SNAT) ? lb4_forward(skb) : TC_ACT_OK;
		}
		stale = *ct;
		replace = true;
	} else {
		key.dir = CT_DIR_REPLY;
		ct = bpf_map_lookup_elem(&ct4, &key);
		if (ct) {
			ct4_touch(ct, now);
			to = *ct;
			ct4_note_close_from_reply(&to, &pkt);
			if (lb4_rewrite(skb, &pkt, &to))
				return TC_ACT_SHOT;
			/* The source is now the frontend, often a node address: route it here. */
			return lb4_forward(skb);
		}
	}

	svc_key.address = pkt.daddr;
	svc_key.dport = pkt.dport;
	svc_key.proto = pkt.proto;
	svc_key.scope = LB_SCOPE_EXTERNAL;
	svc = bpf_map_lookup_elem(&lb4_services, &svc_key);
	if (!svc)
		return TC_ACT_OK;
	if (replace)
		ct4_delete_reply_of(&stale, pkt.proto);
	return lb4_new_flow(skb, &pkt, &svc_key, svc, now);
}

/* Egress of an external interface: replies of local backends leave as the frontend. */
static __always_inline int lb4_egress(struct __sk_buff *skb)
{
	struct ct4_key key = {};
	struct ct4_value to;
	struct lb4_packet pkt;
	struct ct4_value *ct;

	if (lb4_parse(skb, &pkt))
		return TC_ACT_OK;
	ct4_key_of(&key, &pkt, CT_DIR_REPLY);
	ct = bpf_map_lookup_elem(&ct4, &key);
	if (!ct)
		return TC_ACT_OK;
	ct4_touch(ct, bpf_ktime_get_ns());
	to = *ct;
	ct4_note_close_from_reply(&to, &pkt);
	if (lb4_rewrite(skb, &pkt, &to))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

SEC("classifier")
int skiff_tc_ingress(struct __sk_buff *skb)
{
	return lb4_ingress(skb);
}

SEC("classifier")
int skiff_tc_egress(struct __sk_buff *skb)
{
	return lb4_egress(skb);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";

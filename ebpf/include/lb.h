/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Map layouts shared by skiff's service load balancer programs and mirrored in Rust by
 * `skiff_ebpf::lb` (which asserts every size and offset at compile time). Every field is
 * in the byte order noted beside it; padding is explicit so that keys hash the same in the
 * kernel and in the agent.
 */
#ifndef SKIFF_LB_H
#define SKIFF_LB_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* Frontend scopes: who reached the frontend. */
#define LB_SCOPE_INTERNAL 0 /* from this node or its pods (socket hooks) */
#define LB_SCOPE_EXTERNAL 1 /* from outside the node (tc on its interfaces) */

/* lb4_service.flags, on slot 0 only. */
#define LB_SVC_AFFINITY (1 << 0) /* sessionAffinity: ClientIP */
#define LB_SVC_NODEPORT (1 << 1) /* a NodePort frontend on one of the node's addresses */
#define LB_SVC_EXTERNAL_IP (1 << 2) /* an externalIP or LoadBalancer ingress IP */
#define LB_SVC_LOCAL (1 << 3) /* backends restricted to this node by a traffic policy */

/* lb4_backend.flags, informational: the datapath treats every slot alike. */
#define LB_BACKEND_TERMINATING (1 << 0) /* serving but terminating (used for want of ready ones) */
#define LB_BACKEND_LOCAL (1 << 1) /* on this node */

/*
 * A frontend and one of its backend slots. Slot 0 holds the service entry (how many
 * backends, flags); slots 1..count hold one backend id each. The agent grows a service by
 * writing the new slots before raising count, and shrinks it by moving the last slot into
 * the hole before lowering count, so a reader always sees a consistent set.
 */
struct lb4_key {
	__be32 address; /* frontend IPv4 address, network order */
	__be16 dport; /* frontend port, network order */
	__u16 backend_slot; /* 0: the service entry; 1..count: a backend */
	__u8 proto; /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 scope; /* LB_SCOPE_* */
	__u8 pad[2]; /* zero */
};

struct lb4_service {
	__u32 backend_id; /* slots 1..count: key into lb4_backends; slot 0: zero */
	__u16 count; /* slot 0: number of backend slots */
	__u16 rev_nat_index; /* slot 0: key into lb4_revnat, unique per frontend */
	__u32 affinity_timeout; /* slot 0: ClientIP affinity in seconds, 0 without affinity */
	__u8 flags; /* slot 0: LB_SVC_* */
	__u8 pad[3]; /* zero */
};

/* A backend of one frontend; ids are never shared between frontends. */
struct lb4_backend {
	__be32 address; /* IPv4, network order */
	__be16 port; /* network order */
	__u8 proto; /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 flags; /* LB_BACKEND_* */
};

/* The frontend a rev_nat_index stands for, to translate replies back. */
struct lb4_reverse_nat {
	__be32 address; /* frontend IPv4, network order */
	__be16 port; /* frontend port, network order */
	__u16 pad; /* zero */
};

/* A socket that was translated to a backend, for recvmsg4 and getpeername4. */
struct lb4_reverse_sk_key {
	__u64 cookie; /* bpf_get_socket_cookie() of the client socket */
	__be32 address; /* backend IPv4, network order */
	__be16 port; /* backend port, network order */
	__u16 pad; /* zero */
};

struct lb4_reverse_sk_value {
	__be32 address; /* frontend IPv4, network order */
	__be16 port; /* frontend port, network order */
	__u16 rev_nat_index; /* the frontend */
};

/* ClientIP session affinity: the backend a client last reached through a frontend. */
struct lb_affinity_key {
	__u64 client; /* socket hooks: the client's netns cookie; tc: its IPv4 address */
	__u16 rev_nat_index; /* the frontend */
	__u8 scope; /* LB_SCOPE_*, so the two kinds of client ids never meet */
	__u8 pad[5]; /* zero */
};

struct lb_affinity_value {
	__u64 last_used_ns; /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) of the last use */
	__u32 backend_id; /* key into lb4_backends */
	__u32 pad; /* zero */
};

/* Per-CPU counters of one backend id, summed by agentctl. */
struct lb_backend_stats {
	__u64 connections; /* connects and first datagrams translated to the backend */
};

#ifndef LB_MAX_SERVICES
#define LB_MAX_SERVICES 65536
#endif
#ifndef LB_MAX_BACKENDS
#define LB_MAX_BACKENDS 65536
#endif
#ifndef LB_MAX_REVERSE_SK
#define LB_MAX_REVERSE_SK 262144
#endif
#ifndef LB_MAX_AFFINITY
#define LB_MAX_AFFINITY 65536
#endif

/*
 * The maps, pinned by name under the agent's bpffs directory and shared by every program
 * object that includes this header. The agent sizes them at load (`--lb-max-*` flags); the
 * sizes here are the defaults.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb4_key);
	__type(value, struct lb4_service);
	__uint(max_entries, LB_MAX_SERVICES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb4_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct lb4_backend);
	__uint(max_entries, LB_MAX_BACKENDS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb4_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u16);
	__type(value, struct lb4_reverse_nat);
	__uint(max_entries, LB_MAX_SERVICES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb4_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb4_reverse_sk_key);
	__type(value, struct lb4_reverse_sk_value);
	__uint(max_entries, LB_MAX_REVERSE_SK);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb4_reverse_sk SEC(".maps");

/*
 * The backend an unconnected UDP socket's datagrams to a frontend go to, so that a flow
 * stays on one backend as it would under kube-proxy's conntrack. Keyed like
 * lb4_reverse_sk, but by the frontend.
 */
struct lb4_sk_backend {
	__u32 backend_id; /* key into lb4_backends */
	__be32 address; /* the backend's IPv4 when chosen: a reused id shows as a mismatch */
	__be16 port; /* the backend's port when chosen, network order */
	__u16 pad; /* zero */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb4_reverse_sk_key);
	__type(value, struct lb4_sk_backend);
	__uint(max_entries, LB_MAX_REVERSE_SK);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb4_sk_fwd SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_affinity_key);
	__type(value, struct lb_affinity_value);
	__uint(max_entries, LB_MAX_AFFINITY);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct lb_backend_stats);
	__uint(max_entries, LB_MAX_BACKENDS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_be_stats SEC(".maps");

/*
 * What a frontend is, for people: "namespace/name:port kind", NUL-padded. The programs
 * never read it; the agent writes it beside the frontend so that agentctl names services
 * while the agent is down.
 */
struct lb4_frontend_name {
	char name[128]; /* UTF-8, NUL-padded */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u16);
	__type(value, struct lb4_frontend_name);
	__uint(max_entries, LB_MAX_SERVICES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb4_names SEC(".maps");

/*
 * Picks the backend for a frontend's service entry: the client's affine backend while its
 * affinity holds, else a random slot. Returns NULL when the service has no backend.
 */
static __always_inline const struct lb4_backend *
lb4_select_backend(const struct lb4_key *svc_key, const struct lb4_service *svc, __u64 client,
		   __u32 *backend_id_out)
{
	struct lb_affinity_key affinity_key = {};
	struct lb_affinity_value *affinity;
	struct lb4_service *slot;
	struct lb4_backend *backend;
	struct lb4_key slot_key = *svc_key;
	__u64 now = 0;
	__u32 backend_id;

	if (svc->count == 0)
		return NULL;
	if (svc->flags & LB_SVC_AFFINITY) {
		now = bpf_ktime_get_ns();
		affinity_key.client = client;
		affinity_key.rev_nat_index = svc->rev_nat_index;
		affinity_key.scope = svc_key->scope;
		affinity = bpf_map_lookup_elem(&lb_affinity, &affinity_key);
		if (affinity &&
		    now - affinity->last_used_ns <= (__u64)svc->affinity_timeout * 1000000000ULL) {
			backend_id = affinity->backend_id;
			backend = bpf_map_lookup_elem(&lb4_backends, &backend_id);
			/* A backend removed from the service is gone from lb4_backends too. */
			if (backend) {
				affinity->last_used_ns = now;
				*backend_id_out = backend_id;
				return backend;
			}
		}
	}
	slot_key.backend_slot = (bpf_get_prandom_u32() % svc->count) + 1;
	slot = bpf_map_lookup_elem(&lb4_services, &slot_key);
	if (!slot)
		return NULL;
	backend_id = slot->backend_id;
	backend = bpf_map_lookup_elem(&lb4_backends, &backend_id);
	if (!backend)
		return NULL;
	if (svc->flags & LB_SVC_AFFINITY) {
		struct lb_affinity_value value = { .last_used_ns = now, .backend_id = backend_id };

		bpf_map_update_elem(&lb_affinity, &affinity_key, &value, BPF_ANY);
	}
	*backend_id_out = backend_id;
	return backend;
}

static __always_inline void lb_count_connection(__u32 backend_id)
{
	struct lb_backend_stats *stats = bpf_map_lookup_elem(&lb_be_stats, &backend_id);

	if (stats)
		stats->connections++;
}

/*
 * Connection tracking of the tc programs (`tc.c`): NodePorts, externalIPs and LoadBalancer
 * IPs reached from outside the node are translated per packet, so every flow is recorded
 * once per direction and later packets follow the record, not the service entries.
 * Removing a backend therefore leaves its open flows alone.
 *
 * A flow has two entries in `ct4`, both keyed by a packet's tuple as it reaches tc before
 * translation: CT_DIR_ORIGINAL for client → frontend, CT_DIR_REPLY for backend → client
 * (or → the SNAT address and port). The value of each is that packet's tuple after
 * translation, so one rewrite routine serves both directions.
 */
#define CT_DIR_ORIGINAL 0 /* client → frontend, as the client sent it */
#define CT_DIR_REPLY 1 /* backend → client (or SNAT address), as the backend sent it */

/* ct4_value.flags; CT_F_CLOSING is kept on the CT_DIR_ORIGINAL entry only. */
#define CT_F_SNAT (1 << 0) /* source translated to a node address: policy Cluster, remote backend */
#define CT_F_CLOSING (1 << 1) /* TCP FIN or RST seen in either direction */

struct ct4_key {
	__be32 saddr; /* source IPv4 of the packet before translation, network order */
	__be32 daddr; /* destination IPv4 before translation, network order */
	__be16 sport; /* source port before translation, network order */
	__be16 dport; /* destination port before translation, network order */
	__u8 proto; /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 dir; /* CT_DIR_* */
	__u8 pad[2]; /* zero */
};

struct ct4_value {
	__u64 last_seen_ns; /* bpf_ktime_get_ns() of a recent packet, updated at most once a second */
	__be32 saddr; /* new source: ORIGINAL: client or SNAT address; REPLY: frontend, network order */
	__be32 daddr; /* new destination: ORIGINAL: backend; REPLY: client, network order */
	__be16 sport; /* new source port: ORIGINAL: client's or SNAT port; REPLY: frontend port */
	__be16 dport; /* new destination port: ORIGINAL: backend port; REPLY: client's port */
	__u32 backend_id; /* key into lb4_backends of the flow's backend */
	__u16 rev_nat_index; /* the frontend, key into lb4_revnat */
	__u8 flags; /* CT_F_* */
	__u8 pad[5]; /* zero */
};

#ifndef LB_MAX_CT
#define LB_MAX_CT 262144 /* default size of ct4; a SNATed flow takes two entries */
#endif

#endif /* SKIFF_LB_H */

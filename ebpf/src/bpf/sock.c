// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Socket-level service translation, attached to the agent's cgroup: connect4 and sendmsg4
 * rewrite a frontend address to a backend's before any packet exists, so east-west traffic
 * needs neither per-packet NAT nor conntrack; recvmsg4 and getpeername4 show the
 * application the frontend it asked for.
 */
#include <linux/in.h>
#include <stdbool.h>
#include <bpf/bpf_endian.h>

#include "lb.h"

#define SYS_PROCEED 1
#define SYS_REJECT 0

/*
 * The backend this socket's earlier datagrams to the frontend went to, if it still serves
 * the frontend (its id still names the same address and port).
 */
static __always_inline const struct lb4_backend *
sock4_sticky_backend(const struct lb4_reverse_sk_key *flow, __u32 *backend_id_out)
{
	struct lb4_sk_backend *sticky = bpf_map_lookup_elem(&lb4_sk_fwd, flow);
	const struct lb4_backend *backend;
	__u32 backend_id;

	if (!sticky)
		return NULL;
	backend_id = sticky->backend_id;
	backend = bpf_map_lookup_elem(&lb4_backends, &backend_id);
	if (!backend || backend->address != sticky->address || backend->port != sticky->port)
		return NULL;
	*backend_id_out = backend_id;
	return backend;
}

/*
 * Translates ctx's destination when it is a frontend. Returns SYS_REJECT for a frontend
 * without backends (kube-proxy rejects those too), SYS_PROCEED otherwise. Unconnected UDP
 * (`datagram`) keeps each socket's flow to a frontend on one backend.
 */
static __always_inline int sock4_translate(struct bpf_sock_addr *ctx, bool datagram)
{
	struct lb4_key key = {
		.address = ctx->user_ip4,
		.dport = (__be16)ctx->user_port,
		.proto = (__u8)ctx->protocol,
		.scope = LB_SCOPE_INTERNAL,
	};
	struct lb4_reverse_sk_key reverse_key = {};
	struct lb4_reverse_sk_value reverse = {};
	__u64 cookie;
	const struct lb4_backend *backend;
	struct lb4_service *svc;
	__u32 backend_id = 0;

	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return SYS_PROCEED;
	svc = bpf_map_lookup_elem(&lb4_services, &key);
	if (!svc)
		return SYS_PROCEED;
	cookie = bpf_get_socket_cookie(ctx);
	if (datagram) {
		struct lb4_reverse_sk_key flow = {
			.cookie = cookie,
			.address = key.address,
			.port = key.dport,
		};

		backend = sock4_sticky_backend(&flow, &backend_id);
		if (backend) {
			ctx->user_ip4 = backend->address;
			ctx->user_port = backend->port;
			return SYS_PROCEED;
		}
		backend = lb4_select_backend(&key, svc, bpf_get_netns_cookie(ctx), &backend_id);
		if (backend) {
			struct lb4_sk_backend sticky = {
				.backend_id = backend_id,
				.address = backend->address,
				.port = backend->port,
			};

			bpf_map_update_elem(&lb4_sk_fwd, &flow, &sticky, BPF_ANY);
		}
	} else {
		backend = lb4_select_backend(&key, svc, bpf_get_netns_cookie(ctx), &backend_id);
	}
	if (!backend)
		return SYS_REJECT;

	reverse_key.cookie = cookie;
	reverse_key.address = backend->address;
	reverse_key.port = backend->port;
	reverse.address = key.address;
	reverse.port = key.dport;
	reverse.rev_nat_index = svc->rev_nat_index;
	/* Losing this entry only shows the backend's address to recvmsg/getpeername. */
	bpf_map_update_elem(&lb4_reverse_sk, &reverse_key, &reverse, BPF_ANY);

	ctx->user_ip4 = backend->address;
	ctx->user_port = backend->port;
	lb_count_connection(backend_id);
	return SYS_PROCEED;
}

/* Shows the frontend in place of the backend a translated socket talks to. */
static __always_inline int sock4_reverse(struct bpf_sock_addr *ctx)
{
	struct lb4_reverse_sk_key key = {
		.cookie = bpf_get_socket_cookie(ctx),
		.address = ctx->user_ip4,
		.port = (__be16)ctx->user_port,
	};
	struct lb4_reverse_sk_value *reverse;

	reverse = bpf_map_lookup_elem(&lb4_reverse_sk, &key);
	if (reverse) {
		ctx->user_ip4 = reverse->address;
		ctx->user_port = reverse->port;
	}
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int skiff_connect4(struct bpf_sock_addr *ctx)
{
	return sock4_translate(ctx, false);
}

SEC("cgroup/sendmsg4")
int skiff_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_translate(ctx, true);
}

SEC("cgroup/recvmsg4")
int skiff_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_reverse(ctx);
}

SEC("cgroup/getpeername4")
int skiff_getpeername4(struct bpf_sock_addr *ctx)
{
	return sock4_reverse(ctx);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";

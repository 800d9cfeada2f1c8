// SPDX-License-Identifier: GPL-2.0
/*
 * openhnv flow-based NVGRE (tunnel_mode: flow): two tc programs sharing three maps.
 *
 * hnv_encap (tc egress of each VSID's tunnel port, a dummy device on the VSID bridge):
 *   the bridge sends a frame for a remote MAC to the tunnel port; the program finds the
 *   port's VSID (hnv_ports), the remote and local PA of the destination MAC
 *   (hnv_remotes), sets the tunnel key VSID<<8 | FlowID, FlowID = the low 8 bits of the
 *   inner flow hash (one value per flow, spread across flows: RFC 7637 entropy), and
 *   redirects the frame to the host's collect-metadata gretap. No entry: dropped.
 * hnv_decap (tc ingress of the collect-metadata gretap): VSID = key >> 8 whatever the
 *   FlowID; the VSID's tunnel port (hnv_vsids) receives the frame as if it had arrived
 *   on it, so the VSID bridge forwards it. A VSID this host does not serve: dropped.
 *   A frame for a MAC this host sends to another PA (hnv_remotes: a VM that migrated
 *   away, whose source forwards what peers still send it) is sent on to that PA from
 *   here, with the key it came with, and never back to the PA it came from. The bridge
 *   could not do it: the frame arrived on the VSID's one tunnel port and would leave by
 *   the same port, which a bridge never does (device mode has a port per peer).
 *
 * The agent (agent/flowmode.py) loads this object with bpftool, pins programs and maps
 * under /sys/fs/bpf/openhnv/<host>/ and writes the maps; the map layouts below are
 * mirrored there (struct formats) and must change together.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#define NVGRE_TTL 64

struct remote_key {
	__u32 vsid;
	__u8 mac[6];
	__u16 pad;
};

struct remote_value {
	__u32 family; /* 4 or 6 */
	__u32 remote[4]; /* network order; IPv4 in remote[0] */
	__u32 local[4];
};

struct port_value {
	__u32 vsid;
	__u32 tunnel_ifindex; /* the collect-metadata gretap of the PA family */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 20);
	__type(key, struct remote_key);
	__type(value, struct remote_value);
} hnv_remotes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 16);
	__type(key, __u32); /* ifindex of a tunnel port */
	__type(value, struct port_value);
} hnv_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 16);
	__type(key, __u32); /* VSID */
	__type(value, __u32); /* ifindex of its tunnel port */
} hnv_vsids SEC(".maps");

/* Encapsulate for `remote` with the GRE key `tunnel_id` and hand the frame to the gretap. */
static __always_inline int send_to(struct __sk_buff *skb, __u32 tunnel_id, const struct remote_value *remote,
				   __u32 tunnel_ifindex)
{
	struct bpf_tunnel_key tunnel = {};
	tunnel.tunnel_id = tunnel_id;
	tunnel.tunnel_ttl = NVGRE_TTL;
	/* NVGRE: no GRE checksum (RFC 7637 forbids C), outer DF as in device mode. */
	__u64 flags = BPF_F_ZERO_CSUM_TX | BPF_F_DONT_FRAGMENT;
	if (remote->family == 6) {
		flags |= BPF_F_TUNINFO_IPV6;
		__builtin_memcpy(tunnel.remote_ipv6, remote->remote, 16);
		__builtin_memcpy(tunnel.local_ipv6, remote->local, 16);
	} else {
		tunnel.remote_ipv4 = __builtin_bswap32(remote->remote[0]);
		tunnel.local_ipv4 = __builtin_bswap32(remote->local[0]);
	}
	if (bpf_skb_set_tunnel_key(skb, &tunnel, sizeof(tunnel), flags) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(tunnel_ifindex, 0);
}

/* Where the frame's destination MAC lives in `vsid` when not on this host (NULL: no entry). */
static __always_inline struct remote_value *remote_of(struct __sk_buff *skb, __u32 vsid)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	if (data + 6 > data_end)
		return NULL;
	struct remote_key key = { .vsid = vsid };
	__builtin_memcpy(key.mac, data, 6);
	return bpf_map_lookup_elem(&hnv_remotes, &key);
}

SEC("tc")
int hnv_encap(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct port_value *port = bpf_map_lookup_elem(&hnv_ports, &ifindex);
	if (!port)
		return TC_ACT_SHOT;

	struct remote_value *remote = remote_of(skb, port->vsid);
	if (!remote)
		return TC_ACT_SHOT;

	/* The flow dissector's hash of the inner headers, not a socket's random txhash
	 * (which a local sender may carry and TCP changes after a timeout): the same
	 * 5-tuple always gets the same FlowID. */
	bpf_set_hash_invalid(skb);
	__u32 flow_id = bpf_get_hash_recalc(skb) & 0xff;
	return send_to(skb, (port->vsid << 8) | flow_id, remote, port->tunnel_ifindex);
}

/* Is the PA the frame came from (the received tunnel key) the remote itself? */
static __always_inline int from_remote(const struct bpf_tunnel_key *tunnel, const struct remote_value *remote,
				       int family)
{
	if (family != remote->family)
		return 0;
	if (family == 4)
		return tunnel->remote_ipv4 == __builtin_bswap32(remote->remote[0]);
	return tunnel->remote_ipv6[0] == remote->remote[0] && tunnel->remote_ipv6[1] == remote->remote[1] &&
	       tunnel->remote_ipv6[2] == remote->remote[2] && tunnel->remote_ipv6[3] == remote->remote[3];
}

SEC("tc")
int hnv_decap(struct __sk_buff *skb)
{
	struct bpf_tunnel_key tunnel = {};
	int family = 4;
	if (bpf_skb_get_tunnel_key(skb, &tunnel, sizeof(tunnel), 0) < 0) {
		if (bpf_skb_get_tunnel_key(skb, &tunnel, sizeof(tunnel), BPF_F_TUNINFO_IPV6) < 0)
			return TC_ACT_SHOT;
		family = 6;
	}
	__u32 vsid = tunnel.tunnel_id >> 8;
	__u32 *port = bpf_map_lookup_elem(&hnv_vsids, &vsid);
	if (!port)
		return TC_ACT_SHOT;

	struct remote_value *remote = remote_of(skb, vsid);
	if (!remote)
		return bpf_redirect(*port, BPF_F_INGRESS); /* a local MAC, or a flood the bridge handles */

	/* Forwarding: the destination MAC lives behind another PA. */
	if (from_remote(&tunnel, remote, family))
		return TC_ACT_SHOT; /* its own PA sent it here: the two disagree, no ping-pong */
	__u32 port_ifindex = *port;
	struct port_value *egress = bpf_map_lookup_elem(&hnv_ports, &port_ifindex);
	if (!egress)
		return TC_ACT_SHOT;
	return send_to(skb, tunnel.tunnel_id, remote, egress->tunnel_ifindex); /* the sender's VSID and FlowID */
}

char LICENSE[] SEC("license") = "GPL";

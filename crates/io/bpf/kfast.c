// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//
// Palisade's in-kernel flow cache ("kernel fast path", issue #23).
//
// The agent's engine decides every flow's first packets in user space, as
// without this program. Once a TCP or UDP connection is established with an
// allow verdict that needs nothing more from user space, the agent writes one
// entry per direction and per host into `kfast_flows`, and these programs
// forward that direction's packets inside the kernel:
//
//   kfast_vnic      tcx ingress of a vNIC's host-side netdev (the veth or tap
//                   the agent reads with AF_PACKET): a hit is either redirected
//                   to a local vNIC's egress, or VXLAN-GBP encapsulated (one
//                   tunnel-GSO skb for a whole TSO super-frame) and redirected
//                   to the underlay netdev through the neighbour table.
//   kfast_underlay  tcx ingress of the underlay netdev: a VXLAN-GBP datagram
//                   to the agent's port whose inner flow hits is decapsulated
//                   and redirected to the vNIC's egress. A miss goes on to the
//                   agent's UDP socket, as before.
//   kfast_sockfilt  the socket filter of the agent's AF_PACKET socket on a
//                   vNIC. Packet taps run BEFORE tc ingress, so without it
//                   every kernel-forwarded frame would also be copied to user
//                   space. It makes the same "fast-pathed?" test as
//                   kfast_vnic and drops (from the socket only) what tc will
//                   forward; everything else is accepted, snapped to the
//                   port's frame size (`kfast_cfg[0]`) as the classic filter
//                   it replaces did.
//
// Only untagged Ethernet + IPv4 without options, unfragmented, TCP or UDP is
// handled; anything else (VLAN tags, IPv6, ICMP, fragments) always goes to
// user space. TCP segments with SYN, FIN or RST always go to user space (the
// engine's state machine sees every connection change). Kernel-forwarded TCP
// segments get NO window check: the program only records, per direction,
// the highest sequence end, acknowledgment, acknowledgment + scaled window
// and window, which the agent folds back into its tracker.
//
// Entry states and removal without a loss window. The socket filter and tc
// read the entry at two different moments for one packet, so a state change
// between the two must never make both of them let go of it:
//   ACTIVE  socket filter drops, tc forwards           (kernel has it)
//   DUAL    socket filter accepts, tc still forwards   (both have it)
//   (gone)  socket filter accepts, tc passes           (user space has it)
// The agent removes an entry ACTIVE -> DUAL, waits a grace (longer than one
// packet's walk from the tap to tc ingress, which runs in one softirq), then
// deletes it. A packet therefore is forwarded at least once; in the grace it
// may be forwarded twice (a duplicate segment, which TCP absorbs). Insertion
// has the same shape: a packet the socket filter accepted just before the
// entry appeared and that tc then forwards is a duplicate, never a loss.

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>

#define SEC(name) __attribute__((section(name), used))
#define INLINE static inline __attribute__((always_inline))

// Helper ids (include/uapi/linux/bpf.h's __BPF_FUNC_MAPPER order).
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static __u64 (*bpf_ktime_get_ns)(void) = (void *)5;
static long (*bpf_skb_store_bytes)(void *skb, __u32 off, const void *from, __u32 len, __u64 flags) = (void *)9;
static long (*bpf_redirect)(__u32 ifindex, __u64 flags) = (void *)23;
static long (*bpf_skb_load_bytes)(const void *skb, __u32 off, void *to, __u32 len) = (void *)26;
static long (*bpf_skb_adjust_room)(void *skb, __s32 len_diff, __u32 mode, __u64 flags) = (void *)50;
static long (*bpf_redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) = (void *)152;

// Not in older uapi headers (Linux 6.3+).
#define ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)

// Legacy map definitions: the agent's loader (palisade_io::kfast) reads them.
struct map_def {
	__u32 type;
	__u32 key_size;
	__u32 value_size;
	__u32 max_entries;
	__u32 map_flags;
};

// A direction of a connection as one program sees it. Addresses and ports
// in network order, as they are on the wire.
struct flow_key {
	__u32 scope;  // kind VNIC: the ingress ifindex; kind UNDERLAY: the VXLAN header's word 1 (VNI << 8)
	__u8 kind;    // KIND_*
	__u8 proto;   // 6 TCP, 17 UDP
	__u16 pad;
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
};

#define KIND_VNIC 0
#define KIND_UNDERLAY 1

#define STATE_ACTIVE 1
#define STATE_DUAL 2

#define ACTION_REDIRECT 1  // to out_ifindex's egress, unchanged
#define ACTION_ENCAP 2     // VXLAN-GBP with `outer`, to out_ifindex via the neighbour table
#define ACTION_DECAP 3     // strip the outer headers, to out_ifindex's egress

struct flow_val {
	__u32 state;
	__u32 action;
	__u32 out_ifindex;
	__u32 vxlan_word0;  // UNDERLAY: the VXLAN header's first word (flags, group) a hit must carry
	__u8 outer[36];     // ENCAP: IPv4 + UDP + VXLAN-GBP; lengths and IP checksum are filled in here
	__u8 wscale;        // TCP: the window scale this direction's sender announced
	__u8 pad[3];
	// Written here, read (and never reset) by the agent:
	__u64 packets;
	__u64 bytes;
	__u64 last_seen;    // CLOCK_MONOTONIC ns
	__u32 seq_end;      // TCP high-water marks, host order
	__u32 ack;
	__u32 limit;        // ack + (window << wscale)
	__u32 max_win;      // window << wscale
};

struct map_def SEC("maps") kfast_flows = {
	.type = BPF_MAP_TYPE_HASH,
	.key_size = sizeof(struct flow_key),
	.value_size = sizeof(struct flow_val),
	.max_entries = 65536,
	.map_flags = 0,
};

// [0] the AF_PACKET ports' snap length; [1] the VXLAN UDP port (host order).
struct map_def SEC("maps") kfast_cfg = {
	.type = BPF_MAP_TYPE_ARRAY,
	.key_size = 4,
	.value_size = 4,
	.max_entries = 4,
	.map_flags = 0,
};

#define ETH_LEN 14
#define IP_LEN 20
#define OUTER_LEN 36   // IPv4 + UDP + VXLAN
#define ENCAP_LEN 50   // OUTER_LEN + the inner Ethernet header

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

struct pkt {
	struct flow_key key;
	__u8 eth[ETH_LEN];
	__u32 seq, ack;    // host order
	__u32 payload;     // TCP payload bytes (the whole super-frame's)
	__u32 hdr;         // Ethernet + IP + L4 header bytes (repeated per segment)
	__u16 win;
	__u8 flags;
	__u16 ip_len;
};

INLINE __u16 be16(__u16 v) { return __builtin_bswap16(v); }
INLINE __u32 be32(__u32 v) { return __builtin_bswap32(v); }

// Parse the Ethernet frame at `off`. 0: not a frame this path handles.
INLINE int parse_frame(struct __sk_buff *skb, __u32 off, struct pkt *p)
{
	__u8 ip[IP_LEN];
	if (bpf_skb_load_bytes(skb, off, p->eth, ETH_LEN) < 0)
		return 0;
	if (p->eth[12] != 0x08 || p->eth[13] != 0x00)
		return 0;  // not IPv4 (or VLAN-tagged)
	if (bpf_skb_load_bytes(skb, off + ETH_LEN, ip, IP_LEN) < 0)
		return 0;
	if (ip[0] != 0x45)
		return 0;  // IPv4 options: not here
	if ((ip[6] & 0x3f) != 0 || ip[7] != 0)
		return 0;  // a fragment (MF or an offset)
	p->ip_len = ((__u16)ip[2] << 8) | ip[3];
	p->key.proto = ip[9];
	__builtin_memcpy(&p->key.saddr, &ip[12], 4);
	__builtin_memcpy(&p->key.daddr, &ip[16], 4);
	__u32 l4 = off + ETH_LEN + IP_LEN;
	if (p->key.proto == 6) {
		__u8 t[20];
		if (bpf_skb_load_bytes(skb, l4, t, 20) < 0)
			return 0;
		__builtin_memcpy(&p->key.sport, &t[0], 2);
		__builtin_memcpy(&p->key.dport, &t[2], 2);
		p->seq = ((__u32)t[4] << 24) | ((__u32)t[5] << 16) | ((__u32)t[6] << 8) | t[7];
		p->ack = ((__u32)t[8] << 24) | ((__u32)t[9] << 16) | ((__u32)t[10] << 8) | t[11];
		__u32 doff = (t[12] >> 4) * 4;
		p->flags = t[13];
		p->win = ((__u16)t[14] << 8) | t[15];
		if (doff < 20 || p->ip_len < IP_LEN + doff)
			return 0;
		p->payload = p->ip_len - IP_LEN - doff;
		p->hdr = ETH_LEN + IP_LEN + doff;
	} else if (p->key.proto == 17) {
		__u8 u[4];
		if (bpf_skb_load_bytes(skb, l4, u, 4) < 0)
			return 0;
		__builtin_memcpy(&p->key.sport, &u[0], 2);
		__builtin_memcpy(&p->key.dport, &u[2], 2);
		p->hdr = ETH_LEN + IP_LEN + 8;
	} else {
		return 0;
	}
	return 1;
}

// The entry a packet of `p` is forwarded by, if this path takes it at all:
// NULL for anything user space must see (no entry, a TCP SYN/FIN/RST).
INLINE struct flow_val *candidate(struct pkt *p)
{
	if (p->key.proto == 6 && (p->flags & (TCP_SYN | TCP_FIN | TCP_RST)))
		return 0;
	return bpf_map_lookup_elem(&kfast_flows, &p->key);
}

INLINE int after(__u32 a, __u32 b) { return (__s32)(a - b) > 0; }

// Count a forwarded packet (a super-frame as its segments) and note its TCP
// marks. The marks are read-compare-write, not atomic: two CPUs forwarding
// one direction at once may leave a mark a little behind, never ahead.
INLINE void account(struct __sk_buff *skb, struct flow_val *v, struct pkt *p, __u32 frame_len)
{
	__u32 segs = skb->gso_segs ? skb->gso_segs : 1;
	__sync_fetch_and_add(&v->packets, segs);
	__sync_fetch_and_add(&v->bytes, (__u64)frame_len + (__u64)(segs - 1) * p->hdr);
	v->last_seen = bpf_ktime_get_ns();
	if (p->key.proto != 6)
		return;
	__u32 end = p->seq + p->payload;
	if (after(end, v->seq_end))
		v->seq_end = end;
	if (p->flags & TCP_ACK) {
		__u32 win = (__u32)p->win << (v->wscale & 15);
		if (after(p->ack, v->ack))
			v->ack = p->ack;
		if (after(p->ack + win, v->limit))
			v->limit = p->ack + win;
		if (win > v->max_win)
			v->max_win = win;
	}
}

INLINE __u32 cfg(__u32 index)
{
	__u32 *v = bpf_map_lookup_elem(&kfast_cfg, &index);
	return v ? *v : 0;
}

// The frame must fit one outer IPv4 packet once encapsulated.
INLINE int fits_encap(struct __sk_buff *skb)
{
	return skb->len >= ETH_LEN && skb->len - ETH_LEN + ENCAP_LEN <= 65535;
}

INLINE int vnic_lookup(struct __sk_buff *skb, struct pkt *p, struct flow_val **out)
{
	__builtin_memset(p, 0, sizeof(*p));
	if (!parse_frame(skb, 0, p))
		return 0;
	p->key.scope = skb->ifindex;
	p->key.kind = KIND_VNIC;
	struct flow_val *v = candidate(p);
	if (!v)
		return 0;
	if (v->action == ACTION_ENCAP && !fits_encap(skb))
		return 0;
	*out = v;
	return 1;
}

SEC("socket")
int kfast_sockfilt(struct __sk_buff *skb)
{
	struct pkt p;
	struct flow_val *v = 0;
	if (vnic_lookup(skb, &p, &v) && v->state == STATE_ACTIVE)
		return 0;  // tc ingress forwards it: no copy for user space
	return cfg(0);
}

INLINE __u16 ip_checksum(__u8 *ip)
{
	__u32 sum = 0;
#pragma unroll
	for (int i = 0; i < IP_LEN; i += 2)
		sum += ((__u32)ip[i] << 8) | ip[i + 1];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum & 0xffff;
}

SEC("tc/vnic")
int kfast_vnic(struct __sk_buff *skb)
{
	struct pkt p;
	struct flow_val *v = 0;
	if (!vnic_lookup(skb, &p, &v))
		return TC_ACT_OK;  // user space (its AF_PACKET copy) has it
	account(skb, v, &p, skb->len);
	if (v->action == ACTION_REDIRECT)
		return bpf_redirect(v->out_ifindex, 0);
	if (v->action != ACTION_ENCAP)
		return TC_ACT_OK;
	__u8 hdr[ETH_LEN + ENCAP_LEN];
	__builtin_memset(hdr, 0, ETH_LEN);
	hdr[12] = 0x08;
	__builtin_memcpy(&hdr[ETH_LEN], v->outer, OUTER_LEN);
	__builtin_memcpy(&hdr[ETH_LEN + OUTER_LEN], p.eth, ETH_LEN);
	__u32 inner = skb->len;  // the inner frame, Ethernet header on
	__u16 ip_total = IP_LEN + 8 + 8 + inner;
	__u16 udp_len = 8 + 8 + inner;
	__u8 *ip = &hdr[ETH_LEN];
	ip[2] = ip_total >> 8;
	ip[3] = ip_total & 0xff;
	ip[10] = 0;
	ip[11] = 0;
	__u16 c = ip_checksum(ip);
	ip[10] = c >> 8;
	ip[11] = c & 0xff;
	ip[IP_LEN + 4] = udp_len >> 8;
	ip[IP_LEN + 5] = udp_len & 0xff;
	ip[IP_LEN + 6] = 0;  // RFC 7348: zero UDP checksum over IPv4
	ip[IP_LEN + 7] = 0;
	__u64 flags = BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
		      BPF_F_ADJ_ROOM_ENCAP_L2_ETH | BPF_F_ADJ_ROOM_ENCAP_L2(ETH_LEN);
	if (bpf_skb_adjust_room(skb, ENCAP_LEN, BPF_ADJ_ROOM_MAC, flags) < 0)
		return TC_ACT_SHOT;  // the socket filter did not copy it: nothing better to do
	if (bpf_skb_store_bytes(skb, 0, hdr, sizeof(hdr), 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect_neigh(v->out_ifindex, 0, 0, 0);
}

SEC("tc/underlay")
int kfast_underlay(struct __sk_buff *skb)
{
	__u8 o[ETH_LEN + OUTER_LEN];
	if (bpf_skb_load_bytes(skb, 0, o, sizeof(o)) < 0)
		return TC_ACT_OK;
	if (o[12] != 0x08 || o[13] != 0x00 || o[14] != 0x45 || o[14 + 9] != 17)
		return TC_ACT_OK;
	if ((o[14 + 6] & 0x3f) != 0 || o[14 + 7] != 0)
		return TC_ACT_OK;
	__u32 port = cfg(1);
	__u16 dport = ((__u16)o[36] << 8) | o[37];
	if (port == 0 || dport != port)
		return TC_ACT_OK;
	struct pkt p;
	__builtin_memset(&p, 0, sizeof(p));
	if (!parse_frame(skb, ETH_LEN + OUTER_LEN, &p))
		return TC_ACT_OK;
	__builtin_memcpy(&p.key.scope, &o[42 + 4], 4);
	p.key.kind = KIND_UNDERLAY;
	struct flow_val *v = candidate(&p);
	if (!v || v->action != ACTION_DECAP)
		return TC_ACT_OK;
	__u32 word0;
	__builtin_memcpy(&word0, &o[42], 4);
	if (word0 != v->vxlan_word0)
		return TC_ACT_OK;  // another group or policy bit than the agent decided for
	// As the engine counts a frame from the underlay: from its VXLAN header on.
	account(skb, v, &p, skb->len - ETH_LEN - IP_LEN - 8);
	if (bpf_skb_adjust_room(skb, -ENCAP_LEN, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO | ADJ_ROOM_DECAP_L3_IPV4) < 0)
		return TC_ACT_OK;
	if (bpf_skb_store_bytes(skb, 0, p.eth, ETH_LEN, 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(v->out_ifindex, 0);
}

char _license[] SEC("license") = "Dual BSD/GPL";

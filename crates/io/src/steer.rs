//! Kernel-side flow steering: which worker a packet belongs to.
//!
//! The agent runs N workers, each with its own datapath engine and flow
//! table, and shares no state between them. Each worker opens its own
//! [`AfPacket`](crate::AfPacket) on every vNIC and its own
//! [`UdpOverlay`](crate::UdpOverlay) underlay socket, and the kernel picks the
//! socket, and so the worker, for every packet. That choice must be
//! consistent: both directions of a connection, on every interface and on the
//! underlay, and the ICMP errors quoting it, must reach the same worker, or a
//! reply would miss the connection state its request created. The kernel
//! makes the choice with a classic BPF program returning the worker index:
//! on AF_PACKET through a `PACKET_FANOUT_CBPF` group per interface, on the
//! underlay through an `SO_REUSEPORT` group with `SO_ATTACH_REUSEPORT_CBPF`.
//!
//! The hash is defined once, in Rust, by [`ip_hash`]; the BPF programs that
//! [`AfPacketConfig::fanout`](crate::AfPacketConfig::fanout) and
//! [`UdpOverlay::bind_steered`](crate::UdpOverlay::bind_steered) install are
//! one body that computes the same thing, and the tests check that the kernel
//! agrees with the reference frame by frame. It is:
//!
//! - **addresses only**, so every fragment of a datagram goes with its first
//!   (later fragments carry no ports); **symmetric** (a XOR), so both
//!   directions go together. IPv4: `src ^ dst`; IPv6: the XOR of the eight
//!   32-bit words of both addresses.
//! - **ICMP errors follow the flow they quote**: an ICMP destination
//!   unreachable, time exceeded or parameter problem (first fragment only),
//!   and an ICMPv6 error (type 1 to 4, directly after the IPv6 header), are
//!   hashed by the addresses of the quoted header.
//! - folded (`h ^= h >> 16; h ^= h >> 8`) and reduced: worker `h % n`.
//! - anything else (ARP, a second VLAN tag, another EtherType), and any packet
//!   too short for a byte the hash reads, goes to **worker 0**: a classic BPF
//!   load beyond the packet's end ends the program with 0, and the reference
//!   returns 0 in exactly those cases (an ICMP error whose quoted header is
//!   cut off goes to worker 0, not by its outer addresses).
//!
//! Where the programs read:
//! - AF_PACKET: before the fanout runs, the receiving kernel has moved the
//!   outer VLAN tag of a frame into the packet's metadata, so the program
//!   tests the packet's protocol (the ancillary `SKF_AD_PROTOCOL`) and reads
//!   relative to the network header (`SKF_NET_OFF`). [`frame_worker`] models
//!   that for a frame as an [`AfPacket`](crate::AfPacket) delivers it (with
//!   the tag put back): it skips one 802.1Q/802.1ad tag.
//! - the underlay: a reuseport program sees the datagram from its UDP payload
//!   on, the 8-byte VXLAN header, so the inner EtherType is at 20 and the
//!   inner IP header at 22 ([`vxlan_worker`]); an inner VLAN tag means worker 0.
//!
//! Kernel behaviour the callers must respect:
//! - the index is the order of joining (fanout) or binding (reuseport): worker
//!   `i` must open its socket `i`-th. When a member closes, the kernel moves the
//!   group's last member into its slot, so a group that loses a member must be
//!   rebuilt, not patched.
//! - loads relative to `SKF_NET_OFF` reach only the linear part of the
//!   kernel's packet buffer. Frames built by the kernel's own stack, veth and
//!   most drivers keep the headers there; a driver that leaves the IP header
//!   in page fragments would have its frames sent to worker 0.

use std::net::IpAddr;

/// EtherType of IPv4.
pub(crate) const ETH_P_IP: u16 = 0x0800;
/// EtherType of IPv6.
pub(crate) const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
/// Offset of the inner Ethernet frame in a VXLAN payload (after the 8-byte VXLAN header).
const VXLAN_INNER: usize = 8;

/// Whether this kernel can keep a fanout group from seeing the host's own
/// transmissions (`PACKET_FANOUT_FLAG_IGNORE_OUTGOING`, Linux 6.2). Older
/// kernels accept the flag without honouring it, and every worker would then
/// receive the frames the workers send: callers run one worker there.
pub fn fanout_ignores_outgoing() -> bool {
    // SAFETY: utsname is plain bytes; uname fills it and has no other preconditions.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return false;
    }
    let release: String = u
        .release
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8 as char)
        .collect();
    kernel_at_least(&release, (6, 2))
}

/// Whether a kernel release string (`6.18.44-fc`) is at least `major.minor`.
fn kernel_at_least(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let mut next = || parts.next().and_then(|p| p.parse::<u32>().ok());
    match (next(), next()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}

/// The steering hash of an IP packet (`ethertype` 0x0800 or 0x86DD), 0 when not steerable.
///
/// `packet` starts at the IP header. The result is already folded: the
/// worker is `ip_hash(..) % workers`. 0 for any other EtherType, and when a
/// byte the hash reads lies beyond the end of `packet`.
pub fn ip_hash(ethertype: u16, packet: &[u8]) -> u32 {
    let h = match ethertype {
        ETH_P_IP => ipv4_hash(packet),
        ETH_P_IPV6 => ipv6_hash(packet),
        _ => None,
    };
    h.map_or(0, fold)
}

/// Worker for an Ethernet frame as an AfPacket port delivers it.
///
/// One 802.1Q or 802.1ad tag is skipped (the kernel steers by the packet
/// behind the outer tag); `workers` 0 counts as 1.
pub fn frame_worker(frame: &[u8], workers: u32) -> u32 {
    let (ethertype, ip) = match be16(frame, 12) {
        Some(ETH_P_8021Q | ETH_P_8021AD) => (be16(frame, 16), 18),
        et => (et, 14),
    };
    let hash = match ethertype {
        Some(et) => ip_hash(et, frame.get(ip..).unwrap_or_default()),
        None => 0,
    };
    hash % workers.max(1)
}

/// Worker for a VXLAN UDP payload as the underlay socket delivers it.
///
/// The payload is the 8-byte VXLAN header and the inner Ethernet frame; an
/// inner VLAN tag is not skipped (worker 0). `workers` 0 counts as 1.
pub fn vxlan_worker(payload: &[u8], workers: u32) -> u32 {
    vxlan_hash(payload) % workers.max(1)
}

/// The steering hash of a VXLAN UDP payload, before it is reduced to a
/// worker: two payloads with the same hash go to the same worker, however
/// many workers the receiver runs.
pub fn vxlan_hash(payload: &[u8]) -> u32 {
    match be16(payload, VXLAN_INNER + 12) {
        Some(et) => ip_hash(et, payload.get(VXLAN_INNER + 14..).unwrap_or_default()),
        None => 0,
    }
}

/// Worker for a connection between two addresses (used to hand saved connections to workers on import).
///
/// The same worker as every packet of the connection, in either direction,
/// gets. An IPv4-mapped IPv6 address counts as IPv4. A connection between
/// an IPv4 and an IPv6 address cannot exist on the wire; it is hashed as IPv6
/// with the IPv4 address mapped. `workers` 0 counts as 1.
pub fn addresses_worker(a: IpAddr, b: IpAddr, workers: u32) -> u32 {
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    };
    let h = match (v4(a), v4(b)) {
        (Some(a), Some(b)) => u32::from(a) ^ u32::from(b),
        _ => {
            let words = |ip: IpAddr| {
                let v6 = match ip {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                let o = v6.octets();
                (0..4).fold(0, |h, i| {
                    h ^ u32::from_be_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
                })
            };
            words(a) ^ words(b)
        }
    };
    fold(h) % workers.max(1)
}

fn fold(mut h: u32) -> u32 {
    h ^= h >> 16;
    h ^= h >> 8;
    h
}

fn byte(p: &[u8], at: usize) -> Option<u8> {
    p.get(at).copied()
}

fn be16(p: &[u8], at: usize) -> Option<u16> {
    let b = p.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

fn be32(p: &[u8], at: usize) -> Option<u32> {
    let b = p.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The unfolded IPv4 hash, reading exactly what the BPF program loads, in the same order.
fn ipv4_hash(p: &[u8]) -> Option<u32> {
    let outer = |p: &[u8]| Some(be32(p, 12)? ^ be32(p, 16)?);
    if byte(p, 9)? != IPPROTO_ICMP || be16(p, 6)? & 0x1fff != 0 {
        return outer(p);
    }
    let x = usize::from(byte(p, 0)? & 0x0f) * 4;
    match byte(p, x)? {
        // Destination unreachable, time exceeded, parameter problem: the ICMP header's 8
        // bytes, then the quoted IPv4 header, whose addresses are at 12 and 16.
        3 | 11 | 12 => Some(be32(p, x + 8 + 12)? ^ be32(p, x + 8 + 16)?),
        _ => outer(p),
    }
}

/// The unfolded IPv6 hash, reading exactly what the BPF program loads.
fn ipv6_hash(p: &[u8]) -> Option<u32> {
    let words = |p: &[u8], from: usize| (0..8).try_fold(0, |h, i| Some(h ^ be32(p, from + 4 * i)?));
    if byte(p, 6)? == IPPROTO_ICMPV6 && (1..=4).contains(&byte(p, 40)?) {
        // The ICMPv6 header's 8 bytes at 40, then the quoted IPv6 header at 48.
        words(p, 48 + 8)
    } else {
        words(p, 8)
    }
}

// Classic BPF opcodes (linux/filter.h), as `sock_filter::code` wants them.
const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const LD_H_ABS: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
const LD_B_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
const LD_W_IND: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_IND) as u16;
const LD_B_IND: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_IND) as u16;
const LDX_B_MSH: u16 = (libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH) as u16;
const LDX_MEM: u16 = (libc::BPF_LDX | libc::BPF_W | libc::BPF_MEM) as u16;
const ST: u16 = libc::BPF_ST as u16;
const TAX: u16 = (libc::BPF_MISC | libc::BPF_TAX) as u16;
const XOR_X: u16 = (libc::BPF_ALU | libc::BPF_XOR | libc::BPF_X) as u16;
const RSH_K: u16 = (libc::BPF_ALU | libc::BPF_RSH | libc::BPF_K) as u16;
const MOD_K: u16 = (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16;
const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGT_K: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const RET_A: u16 = (libc::BPF_RET | libc::BPF_A) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// `SKF_AD_OFF + SKF_AD_PROTOCOL`: loads the packet's protocol (host order) instead of packet bytes.
const AD_PROTOCOL: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_PROTOCOL) as u32;
/// `SKF_NET_OFF`: loads at this offset plus `k` read the network header's byte `k`.
const NET_OFF: u32 = libc::SKF_NET_OFF as u32;

/// The steering program for a `PACKET_FANOUT_CBPF` group of `workers` sockets.
pub(crate) fn fanout_program(workers: u32) -> Vec<libc::sock_filter> {
    program(Ethertype::Protocol, NET_OFF, workers)
}

/// The steering program for an `SO_REUSEPORT` group of `workers` VXLAN underlay sockets.
pub(crate) fn reuseport_program(workers: u32) -> Vec<libc::sock_filter> {
    program(Ethertype::At(VXLAN_INNER as u32 + 12), VXLAN_INNER as u32 + 14, workers)
}

/// Where the program finds the EtherType of the packet it steers.
#[derive(Clone, Copy)]
enum Ethertype {
    /// The packet's metadata (`skb->protocol`).
    Protocol,
    /// A 16-bit field at this offset.
    At(u32),
}

/// Branch targets of the program.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Label {
    V4,
    V4Quoted,
    V4Outer,
    V4Xor,
    V6,
    V6Outer,
    Fold,
    Zero,
}

/// One instruction, with symbolic jump targets (`None`: the next instruction).
enum Asm {
    Op(u16, u32),
    Jump(u16, u32, Option<Label>, Option<Label>),
    Always(Label),
    At(Label),
}

/// The shared body: the IP header is at `ip` (wrapping, so `SKF_NET_OFF` works) and the
/// program returns `fold(hash) % workers`, mirroring [`ip_hash`] load for load.
fn program(ethertype: Ethertype, ip: u32, workers: u32) -> Vec<libc::sock_filter> {
    use Asm::{Always, At, Jump, Op};
    use Label::*;
    let at = |k: u32| ip.wrapping_add(k);
    let mut a = vec![match ethertype {
        Ethertype::Protocol => Op(LD_H_ABS, AD_PROTOCOL),
        Ethertype::At(k) => Op(LD_H_ABS, k),
    }];
    a.extend([
        Jump(JEQ_K, u32::from(ETH_P_IP), Some(V4), None),
        Jump(JEQ_K, u32::from(ETH_P_IPV6), Some(V6), Some(Zero)),
        // IPv4: an ICMP error that is a first fragment is hashed by the quoted header.
        At(V4),
        Op(LD_B_ABS, at(9)),
        Jump(JEQ_K, u32::from(IPPROTO_ICMP), None, Some(V4Outer)),
        Op(LD_H_ABS, at(6)),
        Jump(JSET_K, 0x1fff, Some(V4Outer), None),
        Op(LDX_B_MSH, at(0)),
        Op(LD_B_IND, at(0)),
        Jump(JEQ_K, 3, Some(V4Quoted), None),
        Jump(JEQ_K, 11, Some(V4Quoted), None),
        Jump(JEQ_K, 12, Some(V4Quoted), Some(V4Outer)),
        At(V4Quoted),
        Op(LD_W_IND, at(8 + 12)),
        Op(ST, 0),
        Op(LD_W_IND, at(8 + 16)),
        Always(V4Xor),
        At(V4Outer),
        Op(LD_W_ABS, at(12)),
        Op(ST, 0),
        Op(LD_W_ABS, at(16)),
        At(V4Xor),
        Op(LDX_MEM, 0),
        Op(XOR_X, 0),
        Always(Fold),
        // IPv6: an ICMPv6 error right after the fixed header is hashed by the quoted header.
        At(V6),
        Op(LD_B_ABS, at(6)),
        Jump(JEQ_K, u32::from(IPPROTO_ICMPV6), None, Some(V6Outer)),
        Op(LD_B_ABS, at(40)),
        Jump(JGE_K, 1, None, Some(V6Outer)),
        Jump(JGT_K, 4, Some(V6Outer), None),
    ]);
    // XOR of the eight words of both addresses, accumulated in X.
    let words = |a: &mut Vec<Asm>, from: u32| {
        a.push(Op(LD_W_ABS, at(from)));
        for i in 1..8 {
            a.extend([Op(TAX, 0), Op(LD_W_ABS, at(from + 4 * i)), Op(XOR_X, 0)]);
        }
    };
    words(&mut a, 48 + 8);
    a.push(Always(Fold));
    a.push(At(V6Outer));
    words(&mut a, 8);
    a.extend([
        At(Fold),
        Op(TAX, 0),
        Op(RSH_K, 16),
        Op(XOR_X, 0),
        Op(TAX, 0),
        Op(RSH_K, 8),
        Op(XOR_X, 0),
        Op(MOD_K, workers.max(1)),
        Op(RET_A, 0),
        At(Zero),
        Op(RET_K, 0),
    ]);
    assemble(&a)
}

/// Resolve labels into the relative jump offsets classic BPF uses (forward only).
fn assemble(asm: &[Asm]) -> Vec<libc::sock_filter> {
    let mut labels = Vec::new();
    let mut pc = 0usize;
    for a in asm {
        match a {
            Asm::At(l) => labels.push((*l, pc)),
            _ => pc += 1,
        }
    }
    let target = |l: Label| {
        labels
            .iter()
            .find(|(x, _)| *x == l)
            .map(|&(_, pc)| pc)
            .expect("label defined")
    };
    let rel = |from: usize, to: Option<Label>| -> usize {
        to.map_or(0, |l| {
            target(l)
                .checked_sub(from + 1)
                .expect("classic BPF jumps go forward only")
        })
    };
    let mut out = Vec::with_capacity(pc);
    for a in asm {
        let pc = out.len();
        let insn = match *a {
            Asm::At(_) => continue,
            Asm::Op(code, k) => libc::sock_filter { code, jt: 0, jf: 0, k },
            Asm::Jump(code, k, jt, jf) => libc::sock_filter {
                code,
                jt: u8::try_from(rel(pc, jt)).expect("jump within 255 instructions"),
                jf: u8::try_from(rel(pc, jf)).expect("jump within 255 instructions"),
                k,
            },
            Asm::Always(l) => libc::sock_filter {
                code: JA,
                jt: 0,
                jf: 0,
                k: rel(pc, Some(l)) as u32,
            },
        };
        out.push(insn);
    }
    out
}

/// A `sock_fprog` pointing at `filter`, for `setsockopt`; valid while `filter` is.
pub(crate) fn fprog(filter: &mut [libc::sock_filter]) -> libc::sock_fprog {
    libc::sock_fprog {
        len: u16::try_from(filter.len()).expect("program shorter than 65536 instructions"),
        filter: filter.as_mut_ptr(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_compare_by_major_and_minor() {
        for (release, ok) in [
            ("6.18.44-fc-v669", true),
            ("6.2.0", true),
            ("6.1.112-amd64", false),
            ("5.15.0-91-generic", false),
            ("10.0", true),
            ("garbage", false),
        ] {
            assert_eq!(kernel_at_least(release, (6, 2)), ok, "{release}");
        }
    }
    use std::net::{Ipv4Addr, Ipv6Addr};

    // ---- packet builders -------------------------------------------------------------

    use crate::packets::{icmp, ipv4, ipv6, ports};

    fn eth(ethertype: u16, packet: &[u8]) -> Vec<u8> {
        crate::packets::eth([0x02, 0, 0, 0, 0, 1], [0x02, 0, 0, 0, 0, 2], ethertype, packet)
    }

    fn tagged(tpid: u16, frame: &[u8]) -> Vec<u8> {
        crate::packets::tagged(tpid, 0x0064, frame)
    }

    const A4: [u8; 4] = [10, 1, 2, 3];
    const B4: [u8; 4] = [192, 168, 77, 9];
    const R4: [u8; 4] = [172, 16, 0, 254];

    fn a6() -> Ipv6Addr {
        "2001:db8::1".parse().unwrap()
    }
    fn b6() -> Ipv6Addr {
        "fd00:aa:bb::77:9".parse().unwrap()
    }
    fn r6() -> Ipv6Addr {
        "2001:db8:ffff::fe".parse().unwrap()
    }

    fn v4_hash(p: &[u8]) -> u32 {
        ip_hash(ETH_P_IP, p)
    }

    fn v6_hash(p: &[u8]) -> u32 {
        ip_hash(ETH_P_IPV6, p)
    }

    // ---- the reference -----------------------------------------------------------------

    #[test]
    fn the_hash_is_the_folded_xor_of_the_addresses() {
        let h = u32::from_be_bytes(A4) ^ u32::from_be_bytes(B4);
        let h = h ^ (h >> 16);
        let h = h ^ (h >> 8);
        assert_eq!(v4_hash(&ipv4(A4, B4, 6, 0, &ports(1, 2))), h);
        let h6 = a6()
            .octets()
            .chunks(4)
            .chain(b6().octets().chunks(4))
            .fold(0, |h, w| h ^ u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
        assert_eq!(v6_hash(&ipv6(a6(), b6(), 6, &ports(1, 2))), fold(h6));
    }

    #[test]
    fn both_directions_hash_alike() {
        let cases: Vec<(Vec<u8>, Vec<u8>, u16)> = vec![
            (
                ipv4(A4, B4, 6, 0, &ports(40000, 443)),
                ipv4(B4, A4, 6, 0, &ports(443, 40000)),
                ETH_P_IP,
            ),
            (
                ipv4(A4, B4, 17, 0, &ports(5353, 53)),
                ipv4(B4, A4, 17, 0, &ports(53, 5353)),
                ETH_P_IP,
            ),
            (
                ipv4(A4, R4, 1, 0, &icmp(8, &[0; 8])),
                ipv4(R4, A4, 1, 0, &icmp(0, &[0; 8])),
                ETH_P_IP,
            ),
            (
                ipv6(a6(), b6(), 6, &ports(40000, 443)),
                ipv6(b6(), a6(), 6, &ports(443, 40000)),
                ETH_P_IPV6,
            ),
            (
                ipv6(a6(), r6(), 17, &ports(1, 2)),
                ipv6(r6(), a6(), 17, &ports(2, 1)),
                ETH_P_IPV6,
            ),
        ];
        for (i, (fwd, rev, et)) in cases.iter().enumerate() {
            assert_ne!(ip_hash(*et, fwd), 0, "case {i}");
            assert_eq!(ip_hash(*et, fwd), ip_hash(*et, rev), "case {i}");
            for n in [2, 3, 4, 7, 16] {
                assert_eq!(
                    frame_worker(&eth(*et, fwd), n),
                    frame_worker(&eth(*et, rev), n),
                    "case {i}, {n} workers"
                );
            }
        }
    }

    #[test]
    fn icmp_errors_go_with_the_flow_they_quote() {
        let flow = ipv4(A4, B4, 6, 0, &ports(40000, 443));
        let reply = ipv4(B4, A4, 6, 0, &ports(443, 40000));
        let h = v4_hash(&flow);
        // Errors from a router (third address) about either direction, and their echo-back.
        let cases = [
            ("unreachable to A", ipv4(R4, A4, 1, 0, &icmp(3, &flow))),
            ("time exceeded to A", ipv4(R4, A4, 1, 0, &icmp(11, &flow))),
            ("parameter problem to A", ipv4(R4, A4, 1, 0, &icmp(12, &flow))),
            ("unreachable to B", ipv4(R4, B4, 1, 0, &icmp(3, &reply))),
            ("only 8 quoted payload bytes", ipv4(R4, A4, 1, 0, &icmp(3, &flow[..28]))),
        ];
        for (what, p) in &cases {
            assert_eq!(v4_hash(p), h, "{what}");
        }
        // The quoted header's options do not move its addresses; the outer header's do.
        let mut with_options = ipv4(R4, A4, 1, 0, &[]);
        with_options[0] = 0x46;
        with_options.extend_from_slice(&[1, 1, 1, 0]);
        with_options.extend_from_slice(&icmp(3, &flow));
        assert_eq!(v4_hash(&with_options), h, "outer header with options");

        let flow6 = ipv6(a6(), b6(), 6, &ports(40000, 443));
        let h6 = v6_hash(&flow6);
        for t in 1..=4 {
            let err = ipv6(r6(), a6(), 58, &icmp(t, &flow6));
            assert_eq!(v6_hash(&err), h6, "ICMPv6 type {t}");
        }
    }

    #[test]
    fn other_icmp_uses_the_outer_addresses() {
        let flow = ipv4(A4, B4, 6, 0, &ports(40000, 443));
        let outer = v4_hash(&ipv4(R4, A4, 6, 0, &ports(1, 2)));
        assert_ne!(outer, v4_hash(&flow));
        // (what, packet, hashed by the quoted flow rather than the outer addresses)
        let cases = [
            ("echo request", ipv4(R4, A4, 1, 0, &icmp(8, &flow)), false),
            ("echo reply", ipv4(R4, A4, 1, 0, &icmp(0, &flow)), false),
            ("redirect", ipv4(R4, A4, 1, 0, &icmp(5, &flow)), false),
            // A later fragment's first payload bytes are not an ICMP header.
            ("non-first fragment", ipv4(R4, A4, 1, 0x00b9, &icmp(3, &flow)), false),
            (
                "non-first fragment, MF",
                ipv4(R4, A4, 1, 0x2001, &icmp(11, &flow)),
                false,
            ),
            ("first fragment, MF", ipv4(R4, A4, 1, 0x2000, &icmp(3, &flow)), true),
            ("first fragment, DF", ipv4(R4, A4, 1, 0x4000, &icmp(3, &flow)), true),
        ];
        for (what, p, quoted) in &cases {
            let want = if *quoted { v4_hash(&flow) } else { outer };
            assert_eq!(v4_hash(p), want, "{what}");
        }
        // Not ICMP at all: a TCP packet whose payload looks like an ICMP error.
        assert_eq!(v4_hash(&ipv4(R4, A4, 6, 0, &icmp(3, &flow))), outer);

        let flow6 = ipv6(a6(), b6(), 6, &ports(40000, 443));
        let outer6 = v6_hash(&ipv6(r6(), a6(), 6, &ports(1, 2)));
        for t in [0, 5, 128, 129, 135] {
            assert_eq!(
                v6_hash(&ipv6(r6(), a6(), 58, &icmp(t, &flow6))),
                outer6,
                "ICMPv6 type {t}"
            );
        }
    }

    #[test]
    fn unsteerable_and_truncated_packets_go_to_worker_0() {
        let arp = {
            let mut p = vec![0, 1, 8, 0, 6, 4, 0, 1];
            p.extend_from_slice(&[2, 0, 0, 0, 0, 1, 10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0, 2]);
            p
        };
        assert_eq!(frame_worker(&eth(0x0806, &arp), 4), 0, "ARP");
        assert_eq!(ip_hash(0x0806, &arp), 0);
        let flow = ipv4(A4, B4, 6, 0, &ports(40000, 443));
        let qinq = tagged(ETH_P_8021AD, &tagged(ETH_P_8021Q, &eth(ETH_P_IP, &flow)));
        assert_eq!(frame_worker(&qinq, 4), 0, "QinQ");
        assert_eq!(frame_worker(&eth(0x88b5, &flow), 4), 0, "unknown EtherType");
        assert_eq!(frame_worker(&eth(ETH_P_IP, &flow)[..13], 4), 0, "no EtherType");
        assert_eq!(frame_worker(&[], 4), 0);

        // Truncation: any byte the hash needs missing means 0, never a fall-back.
        let err = ipv4(R4, A4, 1, 0, &icmp(3, &flow));
        assert_ne!(v4_hash(&err), 0);
        assert_eq!(v4_hash(&err[..20 + 8 + 19]), 0, "quoted dst cut short");
        assert_eq!(v4_hash(&err[..20 + 8 + 16]), 0, "quoted src only");
        assert_eq!(v4_hash(&err[..20]), 0, "no ICMP type");
        assert_ne!(v4_hash(&flow[..20]), 0, "TCP needs only the addresses");
        assert_eq!(v4_hash(&flow[..19]), 0, "dst cut short");
        assert_eq!(v4_hash(&flow[..9]), 0, "no protocol");
        let echo = ipv4(R4, A4, 1, 0, &icmp(8, &[]));
        assert_ne!(v4_hash(&echo[..21]), 0, "echo needs the type and addresses");
        let flow6 = ipv6(a6(), b6(), 6, &ports(1, 2));
        assert_ne!(v6_hash(&flow6[..40]), 0);
        assert_eq!(v6_hash(&flow6[..39]), 0);
        let bare_icmp6 = ipv6(r6(), a6(), 58, &[]);
        assert_eq!(v6_hash(&bare_icmp6), 0, "ICMPv6 without a type byte");
        let err6 = ipv6(r6(), a6(), 58, &icmp(1, &flow6));
        assert_ne!(v6_hash(&err6[..88]), 0);
        assert_eq!(v6_hash(&err6[..87]), 0, "quoted dst cut short");
    }

    #[test]
    fn one_vlan_tag_is_skipped() {
        let flow = ipv4(A4, B4, 17, 0, &ports(1, 2));
        let flow6 = ipv6(a6(), b6(), 6, &ports(1, 2));
        for n in [2, 3, 5] {
            for (et, p) in [(ETH_P_IP, &flow), (ETH_P_IPV6, &flow6)] {
                let plain = frame_worker(&eth(et, p), n);
                assert_eq!(frame_worker(&tagged(ETH_P_8021Q, &eth(et, p)), n), plain);
                assert_eq!(frame_worker(&tagged(ETH_P_8021AD, &eth(et, p)), n), plain);
                assert_eq!(plain, ip_hash(et, p) % n);
            }
        }
    }

    #[test]
    fn one_worker_is_always_worker_0() {
        let packets = [
            eth(ETH_P_IP, &ipv4(A4, B4, 6, 0, &ports(1, 2))),
            eth(ETH_P_IPV6, &ipv6(a6(), b6(), 6, &ports(1, 2))),
        ];
        for f in &packets {
            assert_eq!(frame_worker(f, 1), 0);
            assert_eq!(frame_worker(f, 0), 0);
            let mut payload = vec![8, 0, 0, 0, 0, 0, 1, 0];
            payload.extend_from_slice(f);
            assert_eq!(vxlan_worker(&payload, 1), 0);
        }
        assert_eq!(addresses_worker(A4.into(), B4.into(), 1), 0);
    }

    #[test]
    fn flows_spread_over_all_workers() {
        let mut seen = [0u32; 4];
        for i in 0..256u32 {
            let src = [10, 0, (i >> 4) as u8, i as u8];
            let dst = [10, 1, 0, (i * 7) as u8];
            seen[frame_worker(&eth(ETH_P_IP, &ipv4(src, dst, 6, 0, &ports(1, 2))), 4) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n >= 32), "uneven spread {seen:?}");
        let mut seen6 = [0u32; 4];
        for i in 0..256u16 {
            let src = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i);
            let dst = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, i >> 3, 1);
            seen6[frame_worker(&eth(ETH_P_IPV6, &ipv6(src, dst, 6, &ports(1, 2))), 4) as usize] += 1;
        }
        assert!(seen6.iter().all(|&n| n >= 32), "uneven IPv6 spread {seen6:?}");
    }

    #[test]
    fn vxlan_payloads_hash_their_inner_frame() {
        let flow = eth(ETH_P_IP, &ipv4(A4, B4, 6, 0, &ports(1, 2)));
        let mut payload = vec![0x88, 0, 0, 0, 0, 0, 7, 0];
        payload.extend_from_slice(&flow);
        for n in [2, 3, 8] {
            assert_eq!(vxlan_worker(&payload, n), frame_worker(&flow, n));
        }
        let mut tagged_payload = payload[..8].to_vec();
        tagged_payload.extend_from_slice(&tagged(ETH_P_8021Q, &flow));
        assert_eq!(vxlan_worker(&tagged_payload, 8), 0, "inner VLAN tag");
        assert_eq!(vxlan_worker(&payload[..21], 8), 0);
    }

    #[test]
    fn addresses_worker_matches_the_packets() {
        let cases: [(IpAddr, IpAddr, Vec<u8>); 3] = [
            (A4.into(), B4.into(), eth(ETH_P_IP, &ipv4(A4, B4, 6, 0, &ports(1, 2)))),
            (
                Ipv4Addr::from(B4).to_ipv6_mapped().into(),
                A4.into(),
                eth(ETH_P_IP, &ipv4(B4, A4, 17, 0, &ports(1, 2))),
            ),
            (
                a6().into(),
                b6().into(),
                eth(ETH_P_IPV6, &ipv6(b6(), a6(), 6, &ports(1, 2))),
            ),
        ];
        for (a, b, frame) in &cases {
            for n in [2, 3, 4, 5, 16] {
                assert_eq!(addresses_worker(*a, *b, n), frame_worker(frame, n), "{a} {b} / {n}");
                assert_eq!(addresses_worker(*b, *a, n), frame_worker(frame, n), "{b} {a} / {n}");
            }
        }
    }

    // ---- the programs, run by a classic BPF interpreter ---------------------------------

    /// What a kernel program sees: the packet from where loads start, and its protocol.
    struct Skb<'a> {
        data: &'a [u8],
        /// Offset in `data` of the network header.
        net: usize,
        protocol: u16,
    }

    /// Run `prog` as the kernel's classic BPF does (loads beyond the end return 0).
    fn run(prog: &[libc::sock_filter], skb: &Skb<'_>) -> u32 {
        let load = |k: u32, size: usize| -> Option<u32> {
            let at = if k >= libc::SKF_AD_OFF as u32 {
                return (k == AD_PROTOCOL).then_some(u32::from(skb.protocol));
            } else if k >= NET_OFF {
                skb.net.checked_add((k - NET_OFF) as usize)?
            } else {
                k as usize
            };
            let b = skb.data.get(at..at.checked_add(size)?)?;
            Some(b.iter().fold(0, |v, &x| (v << 8) | u32::from(x)))
        };
        let (mut a, mut x, mut mem) = (0u32, 0u32, [0u32; 16]);
        let mut pc = 0;
        loop {
            let i = prog[pc];
            pc += 1;
            let size = match i.code & 0x18 {
                0x00 => 4,
                0x08 => 2,
                _ => 1,
            };
            match i.code {
                LD_W_ABS | LD_H_ABS | LD_B_ABS => match load(i.k, size) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LD_W_IND | LD_B_IND => match load(x.wrapping_add(i.k), size) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LDX_B_MSH => match load(i.k, 1) {
                    Some(v) => x = (v & 0xf) * 4,
                    None => return 0,
                },
                LDX_MEM => x = mem[i.k as usize],
                ST => mem[i.k as usize] = a,
                TAX => x = a,
                XOR_X => a ^= x,
                RSH_K => a >>= i.k,
                MOD_K => a %= i.k,
                JA => pc += i.k as usize,
                JEQ_K | JGT_K | JGE_K | JSET_K => {
                    let taken = match i.code {
                        JEQ_K => a == i.k,
                        JGT_K => a > i.k,
                        JGE_K => a >= i.k,
                        _ => a & i.k != 0,
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                RET_A => return a,
                RET_K => return i.k,
                c => panic!("opcode {c:#x} not interpreted"),
            }
        }
    }

    /// Frames covering every branch of the program.
    fn corpus() -> Vec<Vec<u8>> {
        let flow = ipv4(A4, B4, 6, 0, &ports(40000, 443));
        let flow6 = ipv6(a6(), b6(), 6, &ports(40000, 443));
        let mut opts = ipv4(R4, A4, 1, 0, &[]);
        opts[0] = 0x47;
        opts.extend_from_slice(&[0; 8]);
        opts.extend_from_slice(&icmp(11, &flow));
        let mut short_ihl = ipv4(R4, A4, 1, 0, &icmp(3, &flow));
        short_ihl[0] = 0x41;
        let v4: Vec<Vec<u8>> = vec![
            flow.clone(),
            ipv4(B4, A4, 17, 0, &ports(53, 5353)),
            ipv4(R4, A4, 1, 0, &icmp(3, &flow)),
            ipv4(R4, A4, 1, 0, &icmp(11, &flow)),
            ipv4(R4, A4, 1, 0, &icmp(12, &flow)),
            ipv4(R4, A4, 1, 0, &icmp(8, &flow)),
            ipv4(R4, A4, 1, 0x0010, &icmp(3, &flow)),
            ipv4(R4, A4, 1, 0x4000, &icmp(3, &flow)),
            opts,
            short_ihl,
        ];
        let v6: Vec<Vec<u8>> = vec![
            flow6.clone(),
            ipv6(r6(), a6(), 58, &icmp(1, &flow6)),
            ipv6(r6(), a6(), 58, &icmp(4, &flow6)),
            ipv6(r6(), a6(), 58, &icmp(0, &flow6)),
            ipv6(r6(), a6(), 58, &icmp(5, &flow6)),
            ipv6(r6(), a6(), 58, &icmp(128, &flow6)),
        ];
        let mut frames: Vec<Vec<u8>> = v4.iter().map(|p| eth(ETH_P_IP, p)).collect();
        frames.extend(v6.iter().map(|p| eth(ETH_P_IPV6, p)));
        frames.push(tagged(ETH_P_8021Q, &eth(ETH_P_IP, &flow)));
        frames.push(tagged(ETH_P_8021AD, &eth(ETH_P_IPV6, &flow6)));
        frames.push(tagged(ETH_P_8021AD, &tagged(ETH_P_8021Q, &eth(ETH_P_IP, &flow))));
        frames.push(eth(0x0806, &[0; 28]));
        frames
    }

    /// The skb the fanout program sees for `frame`: the outer tag in metadata, data at the IP header.
    fn fanout_skb(frame: &[u8]) -> Skb<'_> {
        let tagged = matches!(be16(frame, 12), Some(ETH_P_8021Q | ETH_P_8021AD));
        let (et_at, net) = if tagged { (16, 18) } else { (12, 14) };
        Skb {
            data: frame,
            net,
            protocol: be16(frame, et_at).unwrap_or(0),
        }
    }

    #[test]
    fn the_programs_compute_the_reference_at_every_length() {
        for workers in [1, 2, 3, 4, 7] {
            let fanout = fanout_program(workers);
            let reuseport = reuseport_program(workers);
            for frame in corpus() {
                // Every prefix: each load's bounds check must match the reference's.
                for len in 14..=frame.len() {
                    let f = &frame[..len];
                    if len >= 18 || !matches!(be16(f, 12), Some(ETH_P_8021Q | ETH_P_8021AD)) {
                        assert_eq!(
                            run(&fanout, &fanout_skb(f)),
                            frame_worker(f, workers),
                            "fanout {f:02x?}"
                        );
                    }
                    let mut payload = vec![8, 0, 0, 0, 0, 0, 1, 0];
                    payload.extend_from_slice(f);
                    let skb = Skb {
                        data: &payload,
                        net: 0,
                        protocol: 0,
                    };
                    assert_eq!(
                        run(&reuseport, &skb),
                        vxlan_worker(&payload, workers),
                        "reuseport {f:02x?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_programs_agree_on_random_packets() {
        // xorshift: deterministic, no dependency.
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let fanout = fanout_program(5);
        let reuseport = reuseport_program(5);
        let templates = corpus();
        for _ in 0..20_000 {
            let mut f = templates[next() as usize % templates.len()].clone();
            // Flip a few bytes (types, protocols, lengths, addresses) and cut at random.
            for _ in 0..(next() % 4) {
                let at = 12 + next() as usize % (f.len() - 12);
                f[at] = next() as u8;
            }
            f.truncate(14 + next() as usize % (f.len() - 13));
            let tagged = matches!(be16(&f, 12), Some(ETH_P_8021Q | ETH_P_8021AD));
            if !tagged || f.len() >= 18 {
                assert_eq!(run(&fanout, &fanout_skb(&f)), frame_worker(&f, 5), "fanout {f:02x?}");
            }
            let mut payload = vec![8, 0, 0, 0, 0, 0, 1, 0];
            payload.extend_from_slice(&f);
            let skb = Skb {
                data: &payload,
                net: 0,
                protocol: 0,
            };
            assert_eq!(run(&reuseport, &skb), vxlan_worker(&payload, 5), "reuseport {f:02x?}");
        }
    }

    #[test]
    fn programs_fit_classic_bpf() {
        for p in [fanout_program(3), reuseport_program(3)] {
            assert!(p.len() < 4096);
            assert!(matches!(p.last(), Some(i) if i.code == RET_K && i.k == 0));
        }
        assert_eq!(fanout_program(8).len(), reuseport_program(8).len(), "one shared body");
    }
}

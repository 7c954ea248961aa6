//! Deterministic generator of the golden replay captures.
//!
//! Frames are built with palisade-wire's `Repr`s and written with
//! `CaptureWriter`; timestamps are fixed, so regenerating gives the same bytes
//! as the committed `.pcap` files (a test checks that).
//!
//! Every scenario happens on host hv1 of examples/three-tier: bastion-1 (local,
//! zone mgmt, VLAN 900) talks to dns-1 (on hv2, same zone), whose frames reach
//! hv1 on the uplink tagged with VLAN 900.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use palisade_io::capture::{CaptureWriter, LinkType};
use palisade_wire::ethernet::{self, EtherType, EthernetAddress, EthernetRepr};
use palisade_wire::ip::IpProtocol;
use palisade_wire::ipv4::{self, Ipv4Repr};
use palisade_wire::tcp::{self, TcpFlags, TcpRepr};
use palisade_wire::udp::{self, UdpRepr};
use palisade_wire::{icmpv4, vlan, vxlan};

/// bastion-1.0 (local to hv1).
pub const BASTION: ([u8; 6], Ipv4Addr) = ([2, 0, 0x0a, 0, 9, 0x0a], Ipv4Addr::new(10, 0, 9, 10));
/// dns-1.0 (on hv2; reaches hv1 through the uplink).
pub const DNS: ([u8; 6], Ipv4Addr) = ([2, 0, 0x0a, 0, 9, 0x35], Ipv4Addr::new(10, 0, 9, 53));
/// web-1.0's address (bastion-1 spoofs it).
pub const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 11);
/// A MAC the topology binds to bastion-1.0's port (a VM sending from a MAC not its own).
pub const ROGUE_MAC: [u8; 6] = [2, 0, 0, 0, 0x99, 0x99];

/// The zone mgmt's VLAN.
const MGMT_VLAN: u16 = 900;

/// One endpoint: MAC, address, and whether its frames come from the uplink (VLAN-tagged).
#[derive(Clone, Copy)]
pub struct End {
    mac: [u8; 6],
    ip: Ipv4Addr,
    tag: Option<u16>,
}

/// bastion-1, sending on its vNIC (untagged).
pub const B: End = End {
    mac: BASTION.0,
    ip: BASTION.1,
    tag: None,
};
/// dns-1, arriving on the uplink tagged with the zone's VLAN.
pub const D: End = End {
    mac: DNS.0,
    ip: DNS.1,
    tag: Some(MGMT_VLAN),
};

fn eth(src: [u8; 6], dst: [u8; 6], tag: Option<u16>, ethertype: EtherType, payload: &[u8]) -> Vec<u8> {
    let hdr = 14 + if tag.is_some() { 4 } else { 0 };
    let mut f = vec![0; hdr + payload.len()];
    EthernetRepr {
        src_addr: EthernetAddress(src),
        dst_addr: EthernetAddress(dst),
        ethertype: if tag.is_some() { EtherType::VLAN } else { ethertype },
    }
    .emit(&mut ethernet::Frame::new_unchecked(&mut f[..]));
    if let Some(vid) = tag {
        vlan::VlanRepr {
            pcp: 0,
            dei: false,
            vid,
            ethertype,
        }
        .emit(&mut vlan::Packet::new_unchecked(&mut f[14..18]));
    }
    f[hdr..].copy_from_slice(payload);
    f
}

/// An IPv4 packet; `frag` is (more fragments, offset in 8-byte units).
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: IpProtocol, l4: &[u8], frag: Option<(bool, u16)>) -> Vec<u8> {
    let (more_frags, frag_offset) = frag.unwrap_or((false, 0));
    let repr = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        protocol: proto,
        payload_len: l4.len(),
        ttl: 64,
        dscp: 0,
        ecn: 0,
        ident: 7,
        dont_frag: frag.is_none(),
        more_frags,
        frag_offset,
        options: &[],
    };
    let mut p = vec![0; 20 + l4.len()];
    repr.emit(&mut ipv4::Packet::new_unchecked(&mut p[..]));
    p[20..].copy_from_slice(l4);
    p
}

fn tcp_seg(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ports: (u16, u16),
    seq: u32,
    ack: u32,
    flags: TcpFlags,
    data: &[u8],
) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: ports.0,
        dst_port: ports.1,
        seq_number: seq,
        ack_number: ack,
        flags,
        window_len: 64000,
        urgent_pointer: 0,
        options: &[],
        payload: data,
    };
    let mut t = vec![0; repr.buffer_len()];
    repr.emit(&mut tcp::Packet::new_unchecked(&mut t[..]), src.into(), dst.into());
    ipv4(src, dst, IpProtocol::TCP, &t, None)
}

/// A TCP frame from `from` to `to`.
pub fn tcp(from: End, to: End, ports: (u16, u16), seq: u32, ack: u32, flags: TcpFlags, data: &[u8]) -> Vec<u8> {
    let ip = tcp_seg(from.ip, to.ip, ports, seq, ack, flags, data);
    eth(from.mac, to.mac, from.tag, EtherType::IPV4, &ip)
}

fn udp_dgram(src: Ipv4Addr, dst: Ipv4Addr, ports: (u16, u16), data: &[u8]) -> Vec<u8> {
    let repr = UdpRepr {
        src_port: ports.0,
        dst_port: ports.1,
        payload: data,
    };
    let mut u = vec![0; repr.buffer_len()];
    repr.emit(&mut udp::Packet::new_unchecked(&mut u[..]), src.into(), dst.into());
    u
}

/// A UDP frame from `from` to `to`.
pub fn udp(from: End, to: End, ports: (u16, u16), data: &[u8]) -> Vec<u8> {
    let ip = ipv4(
        from.ip,
        to.ip,
        IpProtocol::UDP,
        &udp_dgram(from.ip, to.ip, ports, data),
        None,
    );
    eth(from.mac, to.mac, from.tag, EtherType::IPV4, &ip)
}

/// The two fragments of a UDP datagram from `from` to `to` (first fragment: 8 + 24 bytes).
pub fn udp_fragments(from: End, to: End, ports: (u16, u16), data: &[u8; 64]) -> [Vec<u8>; 2] {
    let dgram = udp_dgram(from.ip, to.ip, ports, data);
    let (first, rest) = dgram.split_at(32);
    let f1 = ipv4(from.ip, to.ip, IpProtocol::UDP, first, Some((true, 0)));
    let f2 = ipv4(from.ip, to.ip, IpProtocol::UDP, rest, Some((false, 4)));
    [
        eth(from.mac, to.mac, from.tag, EtherType::IPV4, &f1),
        eth(from.mac, to.mac, from.tag, EtherType::IPV4, &f2),
    ]
}

/// An ICMPv4 message from `from` to `to`.
pub fn icmp(from: End, to: End, ty: u8, code: u8, rest: [u8; 4], data: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(data);
    icmpv4::Packet::new_unchecked(&mut m[..]).fill_checksum();
    let ip = ipv4(from.ip, to.ip, IpProtocol::ICMP, &m, None);
    eth(from.mac, to.mac, from.tag, EtherType::IPV4, &ip)
}

/// The IP packet inside an Ethernet frame (what an ICMP error quotes).
fn ip_of(frame: &[u8], tagged: bool) -> Vec<u8> {
    frame[if tagged { 18 } else { 14 }..].to_vec()
}

/// A frame with `end`'s addresses but another source MAC, source IP or VLAN tag.
fn with(end: End, mac: Option<[u8; 6]>, ip: Option<Ipv4Addr>, tag: Option<u16>) -> End {
    End {
        mac: mac.unwrap_or(end.mac),
        ip: ip.unwrap_or(end.ip),
        tag: tag.or(end.tag),
    }
}

const SYN: TcpFlags = TcpFlags::SYN;
const ACK: TcpFlags = TcpFlags::ACK;

fn handshake(v: &mut Vec<Vec<u8>>, c: End, s: End, ports: (u16, u16), isn: (u32, u32)) {
    let back = (ports.1, ports.0);
    v.push(tcp(c, s, ports, isn.0, 0, SYN, b""));
    v.push(tcp(s, c, back, isn.1, isn.0 + 1, SYN | ACK, b""));
    v.push(tcp(c, s, ports, isn.0 + 1, isn.1 + 1, ACK, b""));
}

/// TCP: handshake, data and FIN teardown; a reset; an out-of-window segment
/// (mgmt is strict in the topology); a denied connection attempt.
pub fn tcp_scenario() -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    let p = (40000, 53);
    handshake(&mut v, B, D, p, (1000, 5000));
    v.push(tcp(B, D, p, 1001, 5001, ACK | TcpFlags::PSH, b"query"));
    v.push(tcp(D, B, (53, 40000), 5001, 1006, ACK | TcpFlags::PSH, b"answer"));
    v.push(tcp(B, D, p, 1006, 5007, TcpFlags::FIN | ACK, b""));
    v.push(tcp(D, B, (53, 40000), 5007, 1007, TcpFlags::FIN | ACK, b""));
    v.push(tcp(B, D, p, 1007, 5008, ACK, b""));
    // SSH from the bastion, reset by the server.
    let p = (40001, 22);
    handshake(&mut v, B, D, p, (2000, 6000));
    v.push(tcp(D, B, (22, 40001), 6001, 2001, TcpFlags::RST | ACK, b""));
    // A segment far outside the window.
    let p = (40002, 22);
    handshake(&mut v, B, D, p, (3000, 7000));
    v.push(tcp(B, D, p, 3001 + 1_000_000_000, 7001, ACK | TcpFlags::PSH, b"stray"));
    // HTTP to the DNS server: no rule allows it.
    v.push(tcp(B, D, (40003, 80), 4000, 0, SYN, b""));
    v
}

/// ICMP echo and reply, an ICMP error related to a tracked UDP flow, an
/// unrelated one, and a fragmented UDP datagram.
pub fn icmp_frag_scenario() -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    v.push(icmp(B, D, 8, 0, [0, 1, 0, 1], b"ping"));
    v.push(icmp(D, B, 0, 0, [0, 1, 0, 1], b"ping"));
    let query = udp(B, D, (41000, 53), b"query");
    v.push(query.clone());
    // Port unreachable, quoting the query.
    v.push(icmp(D, B, 3, 3, [0; 4], &ip_of(&query, false)[..28]));
    // Port unreachable quoting a datagram that was never sent.
    let never = udp(B, D, (41999, 53), b"never");
    v.push(icmp(D, B, 3, 3, [0; 4], &ip_of(&never, false)[..28]));
    let [f1, f2] = udp_fragments(B, D, (41001, 53), &[0x5a; 64]);
    v.push(f1);
    v.push(f2);
    v
}

/// Spoofing: bastion-1 sending web-1's address, sending from a MAC the
/// topology binds to its port, and tagging a VLAN that is not its zone's.
pub fn spoof_scenario() -> Vec<Vec<u8>> {
    vec![
        udp(with(B, None, Some(WEB_IP), None), D, (42000, 53), b"spoofed ip"),
        udp(with(B, Some(ROGUE_MAC), None, None), D, (42001, 53), b"spoofed mac"),
        udp(with(B, None, None, Some(100)), D, (42002, 53), b"wrong vlan"),
        // The same query from the real addresses goes through.
        udp(B, D, (42003, 53), b"honest"),
    ]
}

/// Two established connections (SSH and DNS over TCP); after packet 7 the
/// policy changes to one without dc-bastion-ssh: SSH is cut on its next
/// packet, DNS keeps going.
pub fn policy_change_scenario() -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    let ssh = (43000, 22);
    let dns = (43001, 53);
    handshake(&mut v, B, D, ssh, (1000, 5000));
    handshake(&mut v, B, D, dns, (2000, 6000));
    v.push(tcp(B, D, ssh, 1001, 5001, ACK | TcpFlags::PSH, b"ls"));
    // Packet 7 was the last under version 1.
    v.push(tcp(B, D, ssh, 1003, 5001, ACK | TcpFlags::PSH, b"id"));
    v.push(tcp(B, D, dns, 2001, 6001, ACK | TcpFlags::PSH, b"query"));
    v.push(tcp(D, B, (53, 43001), 6001, 2006, ACK | TcpFlags::PSH, b"answer"));
    v.push(tcp(D, B, (22, 43000), 5001, 1003, ACK | TcpFlags::PSH, b"out"));
    v
}

/// hv1's uplink MAC and tunnel endpoint, the underlay gateway's MAC, and
/// hv2's tunnel endpoint (from the topology `hv1.json`).
const HV1_UPLINK: ([u8; 6], Ipv4Addr) = ([0x0e, 0, 0, 0, 0, 1], Ipv4Addr::new(192, 168, 0, 1));
const GATEWAY_MAC: [u8; 6] = [0x0e, 0, 0, 0, 0, 0xfe];
const HV2_VTEP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);

/// `inner` (an untagged Ethernet frame) as hv2 sends it to hv1 over the
/// underlay: VXLAN-GBP in zone mgmt's VNI (its VLAN id), with the
/// policy-applied bit as given.
fn from_hv2(inner: &[u8], policy_applied: bool) -> Vec<u8> {
    let vx = vxlan::VxlanRepr {
        vni: u32::from(MGMT_VLAN),
        gbp: Some(vxlan::GbpRepr {
            dont_learn: false,
            policy_applied,
            group_id: 0,
        }),
    };
    let mut payload = vec![0; vx.buffer_len()];
    vx.emit(&mut vxlan::Packet::new_unchecked(&mut payload[..]));
    payload.extend_from_slice(inner);
    let ip = ipv4(
        HV2_VTEP,
        HV1_UPLINK.1,
        IpProtocol::UDP,
        &udp_dgram(HV2_VTEP, HV1_UPLINK.1, (50003, vxlan::VXLAN_PORT), &payload),
        None,
    );
    eth(GATEWAY_MAC, HV1_UPLINK.0, None, EtherType::IPV4, &ip)
}

/// dns-1 on hv2 over the overlay: bastion-1's query goes out, the answer
/// comes back in VXLAN-GBP with the policy-applied bit, then an ICMP error
/// from dns-1 about a later query, and a query from dns-1 that hv2 did not
/// mark as decided (hv1 evaluates it: denied).
pub fn overlay_scenario() -> Vec<Vec<u8>> {
    let d = End { tag: None, ..D };
    let mut v = Vec::new();
    let query = udp(B, D, (44000, 53), b"query");
    v.push(query.clone());
    v.push(from_hv2(&udp(d, B, (53, 44000), b"answer"), true));
    let again = udp(B, D, (44001, 53), b"again");
    v.push(again.clone());
    v.push(from_hv2(&icmp(d, B, 3, 3, [0; 4], &ip_of(&again, false)[..28]), true));
    v.push(from_hv2(&udp(d, B, (44002, 53), b"unasked"), false));
    v
}

/// The scenarios: name and frames.
pub fn scenarios() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    vec![
        ("tcp", tcp_scenario()),
        ("icmp-frag", icmp_frag_scenario()),
        ("spoof", spoof_scenario()),
        ("policy-change", policy_change_scenario()),
        ("overlay", overlay_scenario()),
    ]
}

/// Write `frames` as a pcap at fixed timestamps (1 ms apart).
pub fn write_pcap(path: &Path, frames: &[Vec<u8>]) {
    let mut w = CaptureWriter::create(path, LinkType::ETHERNET).unwrap();
    for (i, f) in frames.iter().enumerate() {
        w.write(Duration::from_secs(1_700_000_000) + Duration::from_millis(i as u64), f)
            .unwrap();
    }
    w.finish().unwrap();
}

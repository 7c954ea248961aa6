//! Whole-frame dissection and flow-key extraction on frames built from `Repr`s:
//! overlay (VXLAN-GBP), QinQ, IPv4 and IPv6 fragments. Each case checks the
//! dissection, the round trip through `emit`, and the fast-path key.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use palisade_wire::ethernet::{self, EtherType, EthernetAddress, EthernetRepr};
use palisade_wire::flow::{self, Fragment, Segment};
use palisade_wire::frame::{Dissection, Network, Transport};
use palisade_wire::ip::IpProtocol;
use palisade_wire::tcp::{self, TcpFlags, TcpRepr};
use palisade_wire::udp::{self, UdpRepr};
use palisade_wire::vxlan::{self, GbpRepr, VxlanRepr};
use palisade_wire::{ipv4, ipv6, vlan};

const A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 11);
const B: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 21);

fn eth(ethertype: EtherType) -> Vec<u8> {
    let mut f = vec![0u8; ethernet::HEADER_LEN];
    EthernetRepr {
        src_addr: EthernetAddress([2, 0, 0, 0, 1, 11]),
        dst_addr: EthernetAddress([2, 0, 0, 0, 2, 21]),
        ethertype,
    }
    .emit(&mut ethernet::Frame::new_unchecked(&mut f[..]));
    f
}

fn ipv4_header(protocol: IpProtocol, payload_len: usize, more_frags: bool, frag_offset: u16) -> Vec<u8> {
    let repr = ipv4::Ipv4Repr {
        src_addr: A,
        dst_addr: B,
        protocol,
        payload_len,
        ttl: 64,
        dscp: 0,
        ecn: 0,
        ident: 7,
        dont_frag: false,
        more_frags,
        frag_offset,
        options: &[],
    };
    let mut h = vec![0u8; repr.buffer_len() + payload_len];
    repr.emit(&mut ipv4::Packet::new_unchecked(&mut h[..]));
    h.truncate(repr.buffer_len());
    h
}

fn tcp_segment(src: IpAddr, dst: IpAddr) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: 40000,
        dst_port: 8080,
        seq_number: 1,
        ack_number: 0,
        flags: TcpFlags::SYN,
        window_len: 65535,
        urgent_pointer: 0,
        options: &[2, 4, 5, 0xb4],
        payload: b"",
    };
    let mut s = vec![0u8; repr.buffer_len()];
    repr.emit(&mut tcp::Packet::new_unchecked(&mut s[..]), src, dst);
    s
}

fn round_trips(frame: &[u8]) {
    let d = Dissection::ethernet(frame);
    assert_eq!(d.error, None);
    assert!(d.checksums_valid());
    let mut out = vec![0u8; d.buffer_len().unwrap()];
    d.emit(&mut out).unwrap();
    assert_eq!(out, frame);
}

#[test]
fn vxlan_gbp_overlay_carries_the_verdict_and_the_inner_flow() {
    let inner_tcp = tcp_segment(A.into(), B.into());
    let mut inner = eth(EtherType::IPV4);
    inner.extend(ipv4_header(IpProtocol::TCP, inner_tcp.len(), false, 0));
    inner.extend(&inner_tcp);

    let vx = VxlanRepr {
        vni: 5001,
        gbp: Some(GbpRepr {
            dont_learn: false,
            policy_applied: true,
            group_id: 42,
        }),
    };
    let mut vxlan_payload = vec![0u8; vx.buffer_len()];
    vx.emit(&mut vxlan::Packet::new_unchecked(&mut vxlan_payload[..]));
    vxlan_payload.extend(&inner);

    let (under_a, under_b) = (Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2));
    let udp = UdpRepr {
        src_port: 51000,
        dst_port: vxlan::VXLAN_PORT,
        payload: &vxlan_payload,
    };
    let mut udp_bytes = vec![0u8; udp.buffer_len()];
    udp.emit(
        &mut udp::Packet::new_unchecked(&mut udp_bytes[..]),
        under_a.into(),
        under_b.into(),
    );
    let mut outer_ip = ipv4_header(IpProtocol::UDP, udp_bytes.len(), false, 0);
    outer_ip[12..16].copy_from_slice(&under_a.octets());
    outer_ip[16..20].copy_from_slice(&under_b.octets());
    ipv4::Packet::new_unchecked(&mut outer_ip[..]).fill_checksum();
    let mut frame = eth(EtherType::IPV4);
    frame.extend(outer_ip);
    frame.extend(&udp_bytes);

    let d = Dissection::ethernet(&frame);
    assert_eq!(d.vxlan, Some(vx));
    round_trips(&frame);
    // The outer key is the underlay's; the inner frame keys on the VM's flow.
    let outer = flow::extract(&frame).unwrap().unwrap();
    assert_eq!(outer.key.dst_port, vxlan::VXLAN_PORT);
    let inner_info = flow::extract(&inner).unwrap().unwrap();
    assert_eq!(
        (inner_info.key.src_addr(), inner_info.key.dst_port),
        (IpAddr::V4(A), 8080)
    );
    assert_eq!(inner_info.tcp_flags, TcpFlags::SYN);
}

#[test]
fn qinq_tags_make_the_segment() {
    let seg = tcp_segment(A.into(), B.into());
    let mut frame = eth(EtherType::QINQ);
    for (vid, next) in [(300u16, EtherType::VLAN), (42, EtherType::IPV4)] {
        let mut tag = vec![0u8; vlan::HEADER_LEN];
        vlan::VlanRepr {
            pcp: 3,
            dei: false,
            vid,
            ethertype: next,
        }
        .emit(&mut vlan::Packet::new_unchecked(&mut tag[..]));
        frame.extend(tag);
    }
    frame.extend(ipv4_header(IpProtocol::TCP, seg.len(), false, 0));
    frame.extend(&seg);
    let d = Dissection::ethernet(&frame);
    assert_eq!(d.tags().map(|t| t.vid).collect::<Vec<_>>(), [300, 42]);
    round_trips(&frame);
    assert_eq!(
        flow::extract(&frame).unwrap().unwrap().key.segment,
        Segment::qinq(300, 42)
    );
}

#[test]
fn three_tags_are_too_deep() {
    let mut frame = eth(EtherType::QINQ);
    for next in [EtherType::VLAN, EtherType::VLAN, EtherType::IPV4] {
        frame.extend([0, 1, (next.0 >> 8) as u8, next.0 as u8]);
    }
    frame.extend([0u8; 40]);
    let d = Dissection::ethernet(&frame);
    assert_eq!(d.error.map(|e| e.kind()), Some(palisade_wire::ErrorKind::TooDeep));
    assert!(flow::extract(&frame).is_err());
}

#[test]
fn ipv4_fragments_first_has_ports_later_do_not() {
    let seg = tcp_segment(A.into(), B.into()); // 24 bytes: header with an MSS option
    let mut first = eth(EtherType::IPV4);
    first.extend(ipv4_header(IpProtocol::TCP, seg.len(), true, 0));
    first.extend(&seg);
    let info = flow::extract(&first).unwrap().unwrap();
    assert_eq!(
        (info.fragment, info.key.src_port, info.key.dst_port),
        (Fragment::First, 40000, 8080)
    );
    assert_eq!(info.tcp_flags, TcpFlags::SYN);
    assert!(matches!(
        Dissection::ethernet(&first).transport,
        Transport::Fragment { first: true, .. }
    ));
    round_trips(&first);

    let mut later = eth(EtherType::IPV4);
    later.extend(ipv4_header(IpProtocol::TCP, 8, false, 3));
    later.extend(b"payload!");
    let info = flow::extract(&later).unwrap().unwrap();
    assert_eq!(
        (info.fragment, info.key.src_port, info.key.dst_port),
        (Fragment::NonFirst, 0, 0)
    );
    round_trips(&later);
}

#[test]
fn tiny_first_fragments_are_refused() {
    // RFC 1858: a first fragment that splits the TCP header hides the flags from the firewall.
    let seg = tcp_segment(A.into(), B.into());
    let mut tiny = eth(EtherType::IPV4);
    tiny.extend(ipv4_header(IpProtocol::TCP, 16, true, 0));
    tiny.extend(&seg[..16]);
    let err = flow::extract(&tiny).unwrap_err();
    assert_eq!(
        (err.layer(), err.kind()),
        (palisade_wire::Layer::Tcp, palisade_wire::ErrorKind::Truncated)
    );
    assert_eq!(Dissection::ethernet(&tiny).error, Some(err));
}

#[test]
fn ipv6_non_first_fragment_has_no_ports() {
    let (src, dst) = (
        "fd00::1".parse::<Ipv6Addr>().unwrap(),
        "fd00::2".parse::<Ipv6Addr>().unwrap(),
    );
    // Fragment header: next TCP, offset 8 (x8 bytes), M=0, ident 99; then 8 bytes of data.
    let frag = [6u8, 0, 0, 64, 0, 0, 0, 99];
    let payload_len = frag.len() + 8;
    let repr = ipv6::Ipv6Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::IPV6_FRAG,
        payload_len,
        hop_limit: 64,
        traffic_class: 0,
        flow_label: 0,
    };
    let mut ip = vec![0u8; ipv6::HEADER_LEN + payload_len];
    repr.emit(&mut ipv6::Packet::new_unchecked(&mut ip[..]));
    ip[ipv6::HEADER_LEN..ipv6::HEADER_LEN + 8].copy_from_slice(&frag);
    let mut frame = eth(EtherType::IPV6);
    frame.extend(&ip);
    let info = flow::extract(&frame).unwrap().unwrap();
    assert_eq!(info.fragment, Fragment::NonFirst);
    assert_eq!(
        (info.key.protocol, info.key.src_port, info.key.dst_port),
        (IpProtocol::TCP, 0, 0)
    );
    let d = Dissection::ethernet(&frame);
    assert!(matches!(d.network, Network::Ipv6(_)));
    assert_eq!(d.ext_headers.len(), 1);
    assert!(matches!(d.transport, Transport::Fragment { first: false, .. }));
    round_trips(&frame);
}

#[test]
fn ipv4_mapped_ipv6_addresses_are_refused() {
    // An IPv6 packet to ::ffff:10.0.2.21 must not be keyed like IPv4 traffic to 10.0.2.21.
    let repr = ipv6::Ipv6Repr {
        src_addr: "fd00::1".parse().unwrap(),
        dst_addr: B.to_ipv6_mapped(),
        next_header: IpProtocol::IPV6_NONXT,
        payload_len: 0,
        hop_limit: 64,
        traffic_class: 0,
        flow_label: 0,
    };
    let mut ip = vec![0u8; ipv6::HEADER_LEN];
    repr.emit(&mut ipv6::Packet::new_unchecked(&mut ip[..]));
    let mut frame = eth(EtherType::IPV6);
    frame.extend(&ip);
    let err = flow::extract(&frame).unwrap_err();
    assert_eq!(
        (err.layer(), err.kind()),
        (palisade_wire::Layer::Ipv6, palisade_wire::ErrorKind::BadValue)
    );
    assert_eq!(Dissection::ethernet(&frame).error, Some(err));
}

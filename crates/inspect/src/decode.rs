//! From captured frames to [`Packet`]s: link layers, VLAN tags, and the
//! tunnels an IDS is expected to look into.
//!
//! A frame yields its outer IP packet and, when that carries a tunnel the
//! decoder knows (GRE with an IP or Ethernet payload, an NSH service header),
//! the inner packet too, outermost first; each is inspected as its own flow,
//! so a rule on the tunnel endpoints and a rule on the inner hosts both see
//! their traffic. Link layers: Ethernet (with 802.1Q/802.1ad tags), raw IP,
//! BSD and OpenBSD loopback, Linux cooked captures (v1 and v2) and Cisco
//! HDLC. Nesting is bounded (`MAX_DEPTH`), so a packet that tunnels itself
//! over and over costs a fixed amount of work. IP headers, extension headers
//! and transport headers are parsed by `palisade-wire`.

use core::net::IpAddr;

use palisade_wire::frame::{Dissection, Network, Transport as WireTransport};
use palisade_wire::ip::IpProtocol;
use palisade_wire::tcp::TcpOption;
use palisade_wire::{ipv4, tcp};

use crate::packet::{Packet, TcpHeader, Transport};

/// Tunnels within tunnels followed at most this deep.
pub const MAX_DEPTH: usize = 4;

/// A capture's link-layer type (tcpdump.org LINKTYPE_ values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinkType(pub u32);

impl LinkType {
    /// BSD loopback.
    pub const NULL: LinkType = LinkType(0);
    /// Ethernet.
    pub const ETHERNET: LinkType = LinkType(1);
    /// Raw IP.
    pub const RAW: LinkType = LinkType(101);
    /// Cisco HDLC.
    pub const C_HDLC: LinkType = LinkType(104);
    /// OpenBSD loopback.
    pub const LOOP: LinkType = LinkType(108);
    /// Linux cooked v1.
    pub const LINUX_SLL: LinkType = LinkType(113);
    /// Raw IPv4.
    pub const IPV4: LinkType = LinkType(228);
    /// Raw IPv6.
    pub const IPV6: LinkType = LinkType(229);
    /// Linux cooked v2.
    pub const LINUX_SLL2: LinkType = LinkType(276);
}

/// Why a frame yielded no packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The link type is not one the decoder reads.
    LinkType(u32),
    /// Not IP (ARP, STP, …).
    NotIp,
    /// Truncated or malformed headers.
    Malformed,
}

/// What one frame decoded to.
#[derive(Debug, Default)]
pub struct Decoded<'a> {
    /// The IP packets, outermost first.
    pub packets: Vec<Packet<'a>>,
    /// Why decoding stopped short, if it did (packets before that are sound).
    pub skipped: Option<Skip>,
    /// Packets whose TCP checksum was checked and is wrong.
    pub bad_checksums: u32,
}

const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86dd;
const ETH_VLAN: [u16; 3] = [0x8100, 0x88a8, 0x9100];
const ETH_NSH: u16 = 0x894f;
const ETH_TEB: u16 = 0x6558;

/// Decodes a frame of link type `link`. With `validate_checksums`, TCP
/// checksums are verified and a wrong one marks the packet
/// ([`Packet::checksum_ok`]); other checksums are not checked, as in Suricata.
pub fn decode(link: LinkType, frame: &[u8], validate_checksums: bool) -> Decoded<'_> {
    let mut out = Decoded::default();
    let l3 = match link {
        LinkType::ETHERNET => ethernet(frame),
        LinkType::RAW | LinkType::IPV4 | LinkType::IPV6 => match frame.first().map(|b| b >> 4) {
            Some(4) => Some((ETH_IPV4, frame)),
            Some(6) => Some((ETH_IPV6, frame)),
            _ => None,
        },
        LinkType::NULL | LinkType::LOOP => {
            if frame.len() < 4 {
                None
            } else {
                let raw = [frame[0], frame[1], frame[2], frame[3]];
                let family = if link == LinkType::LOOP {
                    u32::from_be_bytes(raw)
                } else if u32::from_le_bytes(raw) < 0x100 {
                    u32::from_le_bytes(raw)
                } else {
                    u32::from_be_bytes(raw)
                };
                match family {
                    2 => Some((ETH_IPV4, &frame[4..])),
                    10 | 24 | 28 | 30 => Some((ETH_IPV6, &frame[4..])),
                    _ => None,
                }
            }
        }
        LinkType::LINUX_SLL => frame
            .get(14..16)
            .map(|p| (u16::from_be_bytes([p[0], p[1]]), &frame[16..])),
        LinkType::LINUX_SLL2 => frame
            .get(0..2)
            .filter(|_| frame.len() >= 20)
            .map(|p| (u16::from_be_bytes([p[0], p[1]]), &frame[20..])),
        LinkType::C_HDLC => frame.get(2..4).map(|p| (u16::from_be_bytes([p[0], p[1]]), &frame[4..])),
        LinkType(other) => {
            out.skipped = Some(Skip::LinkType(other));
            return out;
        }
    };
    match l3 {
        Some((ethertype, data)) => by_ethertype(ethertype, data, validate_checksums, 0, &mut out),
        None => out.skipped = Some(Skip::Malformed),
    }
    out
}

/// Ethernet header and VLAN tags: the EtherType and payload after them.
fn ethernet(frame: &[u8]) -> Option<(u16, &[u8])> {
    let mut ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let mut rest = &frame[14..];
    let mut tags = 0;
    while ETH_VLAN.contains(&ethertype) {
        tags += 1;
        if tags > 4 || rest.len() < 4 {
            return None;
        }
        ethertype = u16::from_be_bytes([rest[2], rest[3]]);
        rest = &rest[4..];
    }
    Some((ethertype, rest))
}

fn by_ethertype<'a>(ethertype: u16, data: &'a [u8], validate: bool, depth: usize, out: &mut Decoded<'a>) {
    if depth > MAX_DEPTH {
        out.skipped = Some(Skip::Malformed);
        return;
    }
    match ethertype {
        ETH_IPV4 | ETH_IPV6 => ip(data, validate, depth, out),
        ETH_NSH => nsh(data, validate, depth, out),
        ETH_TEB => match ethernet(data) {
            Some((et, rest)) => by_ethertype(et, rest, validate, depth + 1, out),
            None => out.skipped = Some(Skip::Malformed),
        },
        t if ETH_VLAN.contains(&t) => {
            if data.len() < 4 {
                out.skipped = Some(Skip::Malformed);
                return;
            }
            by_ethertype(
                u16::from_be_bytes([data[2], data[3]]),
                &data[4..],
                validate,
                depth + 1,
                out,
            )
        }
        _ => out.skipped = Some(Skip::NotIp),
    }
}

/// RFC 8300 Network Service Header: base header, service path header,
/// context headers; then IPv4 (1), IPv6 (2) or Ethernet (3).
fn nsh<'a>(data: &'a [u8], validate: bool, depth: usize, out: &mut Decoded<'a>) {
    if data.len() < 8 {
        out.skipped = Some(Skip::Malformed);
        return;
    }
    let version = data[0] >> 6;
    let len_words = usize::from(u16::from_be_bytes([data[0], data[1]]) & 0x3f);
    let next = data[3];
    let len = len_words * 4;
    if version != 0 || len < 8 || len > data.len() {
        out.skipped = Some(Skip::Malformed);
        return;
    }
    let inner = &data[len..];
    match next {
        1 => by_ethertype(ETH_IPV4, inner, validate, depth + 1, out),
        2 => by_ethertype(ETH_IPV6, inner, validate, depth + 1, out),
        3 => match ethernet(inner) {
            Some((et, rest)) => by_ethertype(et, rest, validate, depth + 1, out),
            None => out.skipped = Some(Skip::Malformed),
        },
        _ => out.skipped = Some(Skip::NotIp),
    }
}

/// RFC 2784/2890 GRE (version 0): the EtherType of the payload and the payload.
fn gre(data: &[u8]) -> Option<(u16, &[u8])> {
    if data.len() < 4 {
        return None;
    }
    let flags = u16::from_be_bytes([data[0], data[1]]);
    if flags & 0x0007 != 0 {
        // Version 1 (PPTP's enhanced GRE) carries PPP, not decoded.
        return None;
    }
    let mut len = 4;
    if flags & 0x8000 != 0 {
        len += 4; // checksum + reserved
    }
    if flags & 0x2000 != 0 {
        len += 4; // key
    }
    if flags & 0x1000 != 0 {
        len += 4; // sequence number
    }
    if flags & 0x4000 != 0 {
        // Source routing (RFC 1701) is obsolete.
        return None;
    }
    Some((u16::from_be_bytes([data[2], data[3]]), data.get(len..)?))
}

fn ip<'a>(data: &'a [u8], validate: bool, depth: usize, out: &mut Decoded<'a>) {
    let d = Dissection::ip(data);
    let (src, dst, ttl, ip_len, raw_l4): (IpAddr, IpAddr, u8, usize, &[u8]) = match d.network {
        Network::Ipv4(h) => {
            let Ok(p) = ipv4::Packet::new_checked(data) else {
                out.skipped = Some(Skip::Malformed);
                return;
            };
            (
                h.src_addr.into(),
                h.dst_addr.into(),
                h.ttl,
                usize::from(p.total_len()),
                p.payload(),
            )
        }
        Network::Ipv6(h) => {
            let l4_at = 40 + d.ext_headers.iter().map(|e| e.buffer_len()).sum::<usize>();
            let end = (40 + h.payload_len).min(data.len());
            (
                h.src_addr.into(),
                h.dst_addr.into(),
                h.hop_limit,
                end,
                data.get(l4_at..end).unwrap_or(&[]),
            )
        }
        _ => {
            out.skipped = Some(Skip::Malformed);
            return;
        }
    };
    if d.error.is_some() && matches!(d.transport, WireTransport::None) {
        // The network layer parsed but its transport header did not.
        out.skipped = Some(Skip::Malformed);
        return;
    }
    let checksum_ok = !validate
        || !matches!(d.transport, WireTransport::Tcp(_))
        || tcp::Packet::new_checked(raw_l4).is_ok_and(|p| p.verify_checksum(src, dst));
    if !checksum_ok {
        out.bad_checksums += 1;
    }
    let base = |protocol: u8, transport, payload, fragment| Packet {
        src,
        dst,
        protocol,
        ttl,
        transport,
        payload,
        fragment,
        ip_len,
        checksum_ok,
    };
    match d.transport {
        WireTransport::Tcp(t) => {
            let fast_open = t.option_iter().flatten().any(|o| match o {
                TcpOption::Unknown { kind: 34, .. } => true,
                TcpOption::Unknown { kind: 254, data } => data.starts_with(&[0xf9, 0x89]),
                _ => false,
            });
            out.packets.push(base(
                6,
                Transport::Tcp(TcpHeader {
                    src_port: t.src_port,
                    dst_port: t.dst_port,
                    seq: t.seq_number,
                    ack: t.ack_number,
                    flags: (t.flags.bits() & 0xff) as u8,
                    window: t.window_len,
                    fast_open,
                }),
                t.payload,
                false,
            ));
        }
        WireTransport::Udp(u) => out.packets.push(base(
            17,
            Transport::Udp {
                src_port: u.src_port,
                dst_port: u.dst_port,
            },
            u.payload,
            false,
        )),
        WireTransport::Icmpv4(_) | WireTransport::Icmpv6(_) => {
            let protocol = if matches!(d.transport, WireTransport::Icmpv4(_)) {
                1
            } else {
                58
            };
            if raw_l4.len() < 8 {
                out.skipped = Some(Skip::Malformed);
                return;
            }
            let (icmp_type, code) = (raw_l4[0], raw_l4[1]);
            let is_echo = if protocol == 1 {
                matches!(icmp_type, 0 | 8)
            } else {
                matches!(icmp_type, 128 | 129)
            };
            let echo_id = is_echo.then(|| u16::from_be_bytes([raw_l4[4], raw_l4[5]]));
            out.packets.push(base(
                protocol,
                Transport::Icmp {
                    icmp_type,
                    code,
                    echo_id,
                },
                &raw_l4[8..],
                false,
            ));
        }
        // SCTP is not inspected by port (no rule keyword here reads its
        // ports): its chunks are the payload of a protocol-132 packet.
        WireTransport::Sctp(_) => out
            .packets
            .push(base(132, Transport::Other, raw_l4.get(12..).unwrap_or(&[]), false)),
        WireTransport::Fragment { protocol, data, .. } => {
            out.packets.push(base(protocol.0, Transport::Other, data, true));
        }
        WireTransport::Other(protocol, payload) => {
            out.packets.push(base(protocol.0, Transport::Other, payload, false));
            if protocol == IpProtocol(47)
                && let Some((et, inner)) = gre(payload)
            {
                by_ethertype(et, inner, validate, depth + 1, out);
            }
        }
        WireTransport::None => out.skipped = Some(Skip::Malformed),
    }
}

/// The flow an ICMP error quotes: (source, destination, protocol, source
/// port, destination port) of the packet that caused it, as that packet was
/// sent. `None` when the quote is too short to tell.
pub fn quoted_flow(payload: &[u8]) -> Option<(IpAddr, IpAddr, u8, u16, u16)> {
    let version = payload.first()? >> 4;
    let (src, dst, proto, l4): (IpAddr, IpAddr, u8, &[u8]) = match version {
        4 => {
            let ihl = usize::from(payload[0] & 0x0f) * 4;
            if ihl < 20 || payload.len() < ihl {
                return None;
            }
            let s: [u8; 4] = payload[12..16].try_into().ok()?;
            let d: [u8; 4] = payload[16..20].try_into().ok()?;
            (IpAddr::from(s), IpAddr::from(d), payload[9], &payload[ihl..])
        }
        6 => {
            if payload.len() < 40 {
                return None;
            }
            let s: [u8; 16] = payload[8..24].try_into().ok()?;
            let d: [u8; 16] = payload[24..40].try_into().ok()?;
            (IpAddr::from(s), IpAddr::from(d), payload[6], &payload[40..])
        }
        _ => return None,
    };
    let (sp, dp) = match proto {
        6 | 17 if l4.len() >= 4 => (u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]])),
        6 | 17 => return None,
        _ => (0, 0),
    };
    Some((src, dst, proto, sp, dp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_udp(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let total = 20 + 8 + payload.len();
        let mut p = vec![0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0, 0, 64, 17, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        let udp_len = 8 + payload.len();
        p.extend_from_slice(&[0x30, 0x39, 0x02, 0x02, (udp_len >> 8) as u8, udp_len as u8, 0, 0]);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn gre_carries_an_inner_packet() {
        let inner = ipv4_udp([2, 2, 2, 3], [2, 2, 2, 2], b"EVIL");
        let mut outer = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 47, 0, 0, 1, 1, 1, 2, 1, 1, 1, 1];
        outer.extend_from_slice(&[0, 0, 0x08, 0x00]);
        outer.extend_from_slice(&inner);
        let total = outer.len();
        outer[2] = (total >> 8) as u8;
        outer[3] = total as u8;
        let d = decode(LinkType::RAW, &outer, false);
        assert_eq!(d.packets.len(), 2, "{:?}", d.skipped);
        assert_eq!(d.packets[0].protocol, 47);
        assert_eq!(d.packets[1].payload, b"EVIL");
        assert_eq!(d.packets[1].dst, "2.2.2.2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn linux_cooked_and_loopback() {
        let ip = ipv4_udp([10, 0, 0, 1], [10, 0, 0, 2], b"x");
        let mut sll = vec![0u8; 14];
        sll.extend_from_slice(&[0x08, 0x00]);
        sll.extend_from_slice(&ip);
        assert_eq!(decode(LinkType::LINUX_SLL, &sll, false).packets.len(), 1);
        let mut null = vec![2, 0, 0, 0];
        null.extend_from_slice(&ip);
        assert_eq!(decode(LinkType::NULL, &null, false).packets.len(), 1);
        assert_eq!(decode(LinkType(147), &null, false).skipped, Some(Skip::LinkType(147)));
    }

    #[test]
    fn only_tcp_checksums_are_checked_and_a_bad_one_marks_the_packet() {
        let mut p = vec![0x45, 0, 0, 44, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];
        // TCP: ports, seq, ack, data offset 5, flags PA, window, checksum 0x1234 (wrong), urgent.
        p.extend_from_slice(&[
            0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0x12, 0x34, 0, 0,
        ]);
        p.extend_from_slice(b"EHLO");
        let d = decode(LinkType::RAW, &p, true);
        assert!(!d.packets[0].checksum_ok);
        assert_eq!(d.bad_checksums, 1);
        assert!(decode(LinkType::RAW, &p, false).packets[0].checksum_ok);
        // A UDP packet with a wrong checksum is not marked.
        let mut u = ipv4_udp([10, 0, 0, 1], [10, 0, 0, 2], b"x");
        u[26] = 0x12;
        assert!(decode(LinkType::RAW, &u, true).packets[0].checksum_ok);
    }

    #[test]
    fn quoted_flows() {
        let inner = ipv4_udp([192, 168, 10, 10], [192, 168, 10, 31], b"x");
        let q = quoted_flow(&inner).unwrap();
        assert_eq!((q.2, q.3, q.4), (17, 12345, 514));
        assert!(quoted_flow(&inner[..10]).is_none());
    }

    #[test]
    fn nesting_is_bounded() {
        // GRE in GRE in GRE ... deeper than MAX_DEPTH.
        let mut pkt = ipv4_udp([1, 1, 1, 1], [2, 2, 2, 2], b"x");
        for _ in 0..10 {
            let mut outer = vec![
                0x45, 0, 0, 0, 0, 0, 0, 0, 64, 47, 0, 0, 1, 1, 1, 2, 1, 1, 1, 1, 0, 0, 0x08, 0,
            ];
            outer.extend_from_slice(&pkt);
            let total = outer.len();
            outer[2] = (total >> 8) as u8;
            outer[3] = total as u8;
            pkt = outer;
        }
        let d = decode(LinkType::RAW, &pkt, false);
        assert!(d.packets.len() <= MAX_DEPTH + 2);
        assert_eq!(d.skipped, Some(Skip::Malformed));
    }
}

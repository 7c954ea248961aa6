//! Completing TCP and UDP checksums that a sender left to offload hardware.
//!
//! A Linux sender with TX checksum offload (every veth and TAP by default)
//! writes only the pseudo-header sum into the checksum field and expects the
//! NIC to finish the job. On a veth no NIC ever does: the frame reaches the
//! AF_PACKET ring with `TP_STATUS_CSUMNOTREADY` and a checksum that is wrong on
//! the wire. A switch that forwards it unchanged makes the receiver drop every
//! TCP segment. [`complete_checksum`] recomputes the field from scratch (the
//! partial value is not needed), in place, for TCP and UDP over IPv4 and IPv6,
//! behind up to two VLAN tags. Parsing uses `palisade_wire`'s checked views, so
//! a malformed frame is reported, never a panic.

use palisade_wire::checksum;
use palisade_wire::ethernet::{self, EtherType};
use palisade_wire::ip::IpProtocol;
use palisade_wire::ipv6ext::{self, WalkEnd, WalkItem};
use palisade_wire::vlan::{self, MAX_TAGS};
use palisade_wire::{Error, ErrorKind, Layer, ipv4, ipv6};

/// Offset of the checksum field in a TCP header.
const TCP_CHECKSUM_AT: usize = 16;
/// Offset of the checksum field in a UDP header.
const UDP_CHECKSUM_AT: usize = 6;
/// Minimum TCP header length.
const TCP_HEADER_LEN: usize = 20;
/// UDP header length.
const UDP_HEADER_LEN: usize = 8;

/// Which transport checksum was completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completed {
    /// A TCP checksum.
    Tcp,
    /// A UDP checksum.
    Udp,
}

/// Why a frame's checksum was left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsumSkip {
    /// The frame carries neither IPv4 nor IPv6 (after at most two VLAN tags).
    #[error("not an IP frame")]
    NotIp,
    /// A fragment carries only part of the datagram its checksum covers.
    #[error("IP fragment")]
    Fragment,
    /// An IPv6 routing header with segments left changes the pseudo-header's destination.
    #[error("IPv6 routing header with segments left")]
    Routed,
    /// The transport protocol is neither TCP nor UDP.
    #[error("protocol {0} has no checksum to complete")]
    Protocol(u8),
    /// A header is malformed or truncated.
    #[error("malformed frame: {0}")]
    Malformed(Error),
}

impl From<Error> for CsumSkip {
    fn from(e: Error) -> Self {
        CsumSkip::Malformed(e)
    }
}

/// Where the network and transport headers of a frame lie, and the addresses of its pseudo-header.
pub(crate) struct Segment {
    /// The transport protocol.
    pub protocol: IpProtocol,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the transport header.
    pub start: usize,
    /// Bytes from `start` to the end of the IP datagram.
    pub len: usize,
    /// Source address (IPv4 in the first four bytes).
    pub src: [u8; 16],
    /// Destination address (IPv4 in the first four bytes).
    pub dst: [u8; 16],
    /// IPv6 (else IPv4).
    pub v6: bool,
}

/// Recompute the TCP or UDP checksum of Ethernet `frame` in place.
///
/// The checksum field's current content is ignored. A UDP checksum that
/// computes to zero is sent as 0xffff (RFC 768). Bytes after the IP datagram
/// (Ethernet padding) are not covered.
pub fn complete_checksum(frame: &mut [u8]) -> Result<Completed, CsumSkip> {
    let seg = locate(frame)?;
    let (at, min_len) = match seg.protocol {
        IpProtocol::TCP => (TCP_CHECKSUM_AT, TCP_HEADER_LEN),
        IpProtocol::UDP => (UDP_CHECKSUM_AT, UDP_HEADER_LEN),
        IpProtocol(p) => return Err(CsumSkip::Protocol(p)),
    };
    let layer = if seg.protocol == IpProtocol::TCP {
        Layer::Tcp
    } else {
        Layer::Udp
    };
    // `locate` checked that the segment lies inside the frame.
    let data = &mut frame[seg.start..seg.start + seg.len];
    if data.len() < min_len {
        return Err(Error::new(layer, ErrorKind::Truncated).into());
    }
    let mut len = data.len();
    if seg.protocol == IpProtocol::UDP {
        // The UDP length field, not the IP payload, bounds what the checksum covers.
        let ulen = usize::from(u16::from_be_bytes([data[4], data[5]]));
        if ulen < UDP_HEADER_LEN || ulen > len {
            return Err(Error::new(layer, ErrorKind::BadLength).into());
        }
        len = ulen;
    }
    let data = &mut data[..len];
    data[at..at + 2].copy_from_slice(&[0, 0]);
    let pseudo = if seg.v6 {
        checksum::pseudo_header_v6(seg.src, seg.dst, seg.protocol.0, len as u32)
    } else {
        let (mut s, mut d) = ([0u8; 4], [0u8; 4]);
        s.copy_from_slice(&seg.src[..4]);
        d.copy_from_slice(&seg.dst[..4]);
        // An IPv4 datagram's payload is below 64 KiB, so the length fits.
        checksum::pseudo_header_v4(s, d, seg.protocol.0, len as u16)
    };
    let mut sum = !checksum::fold(checksum::combine(&[pseudo, checksum::sum(data)]));
    if sum == 0 && seg.protocol == IpProtocol::UDP {
        sum = 0xffff;
    }
    data[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(if seg.protocol == IpProtocol::TCP {
        Completed::Tcp
    } else {
        Completed::Udp
    })
}

/// Find the transport segment: skip the Ethernet header, VLAN tags, the IP header and IPv6 extension headers.
pub(crate) fn locate(frame: &[u8]) -> Result<Segment, CsumSkip> {
    let eth = ethernet::Frame::new_checked(frame)?;
    let mut ethertype = eth.ethertype();
    let mut offset = ethernet::HEADER_LEN;
    let mut tags = 0;
    while ethertype.is_vlan_tag() {
        if tags == MAX_TAGS {
            return Err(Error::new(Layer::Vlan, ErrorKind::TooDeep).into());
        }
        let rest = frame.get(offset..).unwrap_or_default();
        vlan::Packet::new_checked(rest)?;
        // new_checked guaranteed the four tag bytes.
        ethertype = EtherType(u16::from_be_bytes([rest[2], rest[3]]));
        offset += vlan::HEADER_LEN;
        tags += 1;
    }
    // The loop above only advanced past bytes it checked exist.
    let ip = &frame[offset..];
    match ethertype {
        EtherType::IPV4 => {
            let p = ipv4::Packet::new_checked(ip)?;
            if p.is_fragment() {
                return Err(CsumSkip::Fragment);
            }
            let (mut src, mut dst) = ([0u8; 16], [0u8; 16]);
            src[..4].copy_from_slice(&p.src_addr().octets());
            dst[..4].copy_from_slice(&p.dst_addr().octets());
            Ok(Segment {
                protocol: p.protocol(),
                l3: offset,
                start: offset + p.header_len(),
                len: p.payload().len(),
                src,
                dst,
                v6: false,
            })
        }
        EtherType::IPV6 => {
            let p = ipv6::Packet::new_checked(ip)?;
            let payload = p.payload();
            for item in ipv6ext::walk(p.next_header(), payload) {
                match item? {
                    WalkItem::Header { header, .. } => {
                        if header.kind() == IpProtocol::IPV6_FRAG {
                            return Err(CsumSkip::Fragment);
                        }
                        if header.kind() == IpProtocol::IPV6_ROUTE && header.segments_left() > 0 {
                            return Err(CsumSkip::Routed);
                        }
                    }
                    WalkItem::End(WalkEnd::Upper { protocol, offset: at }) => {
                        return Ok(Segment {
                            protocol,
                            l3: offset,
                            start: offset + ipv6::HEADER_LEN + at,
                            len: payload.len() - at,
                            src: p.src_addr().octets(),
                            dst: p.dst_addr().octets(),
                            v6: true,
                        });
                    }
                    WalkItem::End(WalkEnd::NonFirstFragment { .. }) => return Err(CsumSkip::Fragment),
                    WalkItem::End(WalkEnd::NoNextHeader { .. }) => return Err(CsumSkip::Protocol(59)),
                }
            }
            // The walker always ends with an End item or an error.
            Err(Error::new(Layer::Ipv6Ext, ErrorKind::Truncated).into())
        }
        _ => Err(CsumSkip::NotIp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_wire::frame::Dissection;

    const MACS: [u8; 12] = [2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];

    fn eth(ethertype: u16, tags: &[u16], ip: &[u8]) -> Vec<u8> {
        let mut f = MACS.to_vec();
        for &tci in tags {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(ip);
        f
    }

    fn ipv4(protocol: u8, frag: u16, l4: &[u8]) -> Vec<u8> {
        let total = (20 + l4.len()) as u16;
        let mut h = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, protocol, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[6..8].copy_from_slice(&frag.to_be_bytes());
        let c = checksum::checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(l4);
        h
    }

    fn ipv6(next: u8, rest: &[u8]) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0, 0, 0, next, 64];
        h[4..6].copy_from_slice(&(rest.len() as u16).to_be_bytes());
        h.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        h.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        h.extend_from_slice(rest);
        h
    }

    /// A UDP header and payload with a deliberately wrong (partial-looking) checksum.
    fn udp(payload: &[u8]) -> Vec<u8> {
        let mut u = vec![0x30, 0x39, 0x00, 0x35, 0, 0, 0x12, 0x34];
        u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u.extend_from_slice(payload);
        u
    }

    /// A TCP SYN with one MSS option and a wrong checksum.
    fn tcp(payload: &[u8]) -> Vec<u8> {
        let mut t = vec![
            0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x60, 0x02, 0xff, 0xff, 0xab, 0xcd, 0, 0,
        ];
        t.extend_from_slice(&[2, 4, 0x05, 0xb4]);
        t.extend_from_slice(payload);
        t
    }

    fn valid(frame: &[u8]) -> bool {
        let d = Dissection::ethernet(frame);
        d.error.is_none() && d.checksums_valid()
    }

    #[test]
    fn completes_what_it_should() {
        let hop_by_hop = {
            let mut h = vec![17, 0, 1, 4, 0, 0, 0, 0];
            h.extend_from_slice(&udp(b"behind hop-by-hop"));
            h
        };
        let mut padded = eth(0x0800, &[], &ipv4(17, 0, &udp(b"pad")));
        padded.extend_from_slice(&[0xee; 10]);
        let cases: Vec<(&str, Vec<u8>, Completed)> = vec![
            ("udp4", eth(0x0800, &[], &ipv4(17, 0, &udp(b"hello"))), Completed::Udp),
            (
                "udp4 odd length",
                eth(0x0800, &[], &ipv4(17, 0, &udp(b"abc"))),
                Completed::Udp,
            ),
            ("tcp4", eth(0x0800, &[], &ipv4(6, 0, &tcp(b""))), Completed::Tcp),
            (
                "tcp4 data",
                eth(0x0800, &[], &ipv4(6, 0, &tcp(&[7; 1000]))),
                Completed::Tcp,
            ),
            ("udp4 padded", padded, Completed::Udp),
            ("udp6", eth(0x86dd, &[], &ipv6(17, &udp(b"six"))), Completed::Udp),
            ("tcp6", eth(0x86dd, &[], &ipv6(6, &tcp(b"x"))), Completed::Tcp),
            (
                "udp6 hop-by-hop",
                eth(0x86dd, &[], &ipv6(0, &hop_by_hop)),
                Completed::Udp,
            ),
            ("vlan tcp4", eth(0x0800, &[100], &ipv4(6, 0, &tcp(b""))), Completed::Tcp),
            (
                "qinq udp6",
                eth(0x86dd, &[100, 200], &ipv6(17, &udp(b"q"))),
                Completed::Udp,
            ),
        ];
        for (name, mut frame, want) in cases {
            assert!(!valid(&frame), "{name}: test frame should start with a bad checksum");
            let before = frame.clone();
            assert_eq!(complete_checksum(&mut frame), Ok(want), "{name}");
            assert!(valid(&frame), "{name}: checksum still invalid");
            let changed: Vec<usize> = (0..frame.len()).filter(|&i| frame[i] != before[i]).collect();
            assert!(
                changed.len() <= 2,
                "{name}: more than the checksum changed: {changed:?}"
            );
        }
    }

    #[test]
    fn udp_zero_sum_is_sent_as_ffff() {
        // A payload word equal to the checksum of a zero payload makes the sum all ones.
        let mut frame = eth(0x0800, &[], &ipv4(17, 0, &udp(&[0, 0])));
        complete_checksum(&mut frame).unwrap();
        let at = frame.len() - 4;
        let c = u16::from_be_bytes([frame[at], frame[at + 1]]);
        let n = frame.len();
        frame[n - 2..].copy_from_slice(&c.to_be_bytes());
        assert_eq!(complete_checksum(&mut frame), Ok(Completed::Udp));
        assert_eq!(&frame[at..at + 2], &[0xff, 0xff]);
        assert!(valid(&frame));
    }

    #[test]
    fn leaves_alone_what_it_should() {
        let routing = {
            let mut h = vec![17, 2, 0, 1, 0, 0, 0, 0];
            h.extend_from_slice(&[0; 16]);
            h.extend_from_slice(&udp(b"r"));
            h
        };
        let fragment6 = {
            let mut h = vec![17, 0, 0, 0, 0, 0, 0, 1];
            h.extend_from_slice(&udp(b"f"));
            h
        };
        let mut short_udp = eth(0x0800, &[], &ipv4(17, 0, &udp(b"")));
        short_udp.truncate(short_udp.len() - 2);
        let mut bad_ulen = eth(0x0800, &[], &ipv4(17, 0, &udp(b"abc")));
        let n = bad_ulen.len();
        bad_ulen[n - 7] = 200;
        let cases: Vec<(&str, Vec<u8>, CsumSkip)> = vec![
            ("arp", eth(0x0806, &[], &[0; 28]), CsumSkip::NotIp),
            (
                "icmp",
                eth(0x0800, &[], &ipv4(1, 0, &[8, 0, 0, 0, 0, 0, 0, 0])),
                CsumSkip::Protocol(1),
            ),
            (
                "first fragment",
                eth(0x0800, &[], &ipv4(17, 0x2000, &udp(b"a"))),
                CsumSkip::Fragment,
            ),
            (
                "later fragment",
                eth(0x0800, &[], &ipv4(17, 0x0010, &udp(b"a"))),
                CsumSkip::Fragment,
            ),
            (
                "ipv6 fragment",
                eth(0x86dd, &[], &ipv6(44, &fragment6)),
                CsumSkip::Fragment,
            ),
            ("ipv6 routed", eth(0x86dd, &[], &ipv6(43, &routing)), CsumSkip::Routed),
            (
                "no next header",
                eth(0x86dd, &[], &ipv6(59, &[])),
                CsumSkip::Protocol(59),
            ),
            (
                "three tags",
                eth(0x0800, &[1, 2, 3], &ipv4(17, 0, &udp(b""))),
                CsumSkip::Malformed(Error::new(Layer::Vlan, ErrorKind::TooDeep)),
            ),
            (
                "udp header cut",
                eth(0x0800, &[], &ipv4(17, 0, &[0; 4])),
                CsumSkip::Malformed(Error::new(Layer::Udp, ErrorKind::Truncated)),
            ),
            (
                "ip datagram cut",
                short_udp,
                CsumSkip::Malformed(Error::new(Layer::Ipv4, ErrorKind::Truncated)),
            ),
            (
                "udp length past payload",
                bad_ulen,
                CsumSkip::Malformed(Error::new(Layer::Udp, ErrorKind::BadLength)),
            ),
        ];
        for (name, mut frame, want) in cases {
            let before = frame.clone();
            assert_eq!(complete_checksum(&mut frame), Err(want), "{name}");
            assert_eq!(frame, before, "{name}: frame modified");
        }
        // Truncated IP headers are malformed, whatever their length: no panic anywhere.
        let full = eth(0x86dd, &[100], &ipv6(6, &tcp(b"abc")));
        for n in 0..full.len() {
            let mut cut = full[..n].to_vec();
            assert!(
                matches!(complete_checksum(&mut cut), Err(CsumSkip::Malformed(_))),
                "cut at {n}"
            );
        }
    }
}

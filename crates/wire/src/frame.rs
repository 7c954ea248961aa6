//! Whole-frame dissection: every header of a packet, outermost first.
//!
//! [`Dissection`] is the slow-path, look-at-everything view of a packet that
//! `palisade pcap stats`, the tshark cross-check and the round-trip tests use:
//! Ethernet, up to [`MAX_TAGS`] VLAN tags, the network layer (ARP, IPv4, IPv6
//! with its extension headers), the transport layer (TCP, UDP, SCTP, ICMPv4,
//! ICMPv6) and, over UDP, a VXLAN header. It never fails: it keeps every layer
//! it could parse and records the first error in [`Dissection::error`], so a
//! malformed packet is still counted at the layers that were sound.
//!
//! [`Dissection::emit`] writes the headers back from their `Repr`s. For a
//! packet whose checksums were valid ([`Dissection::checksums_valid`]) the
//! output equals the input byte for byte; that is the round-trip property the
//! corpus tests check. The fast path does not use this module: it calls
//! [`crate::flow::extract`].
//!
//! Fragments: a non-first IPv4 or IPv6 fragment has no transport header, and a
//! first fragment has only part of the datagram, so both are kept as
//! [`Transport::Fragment`] with their raw bytes rather than parsed as a
//! transport header that would look truncated.

use core::net::IpAddr;

use crate::arp::{self, ArpRepr};
use crate::ethernet::{self, EtherType, EthernetRepr};
use crate::icmpv4::{self, Icmpv4Repr};
use crate::icmpv6::{self, Icmpv6Repr};
use crate::ip::IpProtocol;
use crate::ipv4::{self, Ipv4Repr};
use crate::ipv6::{self, Ipv6Repr};
use crate::ipv6ext::{self, ExtHeaderRepr, MAX_EXT_HEADERS, WalkEnd, WalkItem};
use crate::sctp::{self, SctpRepr};
use crate::tcp::{self, TcpRepr};
use crate::udp::{self, UdpRepr};
use crate::vlan::{self, MAX_TAGS, VlanRepr};
use crate::vxlan::{self, VxlanRepr};
use crate::{Error, ErrorKind, Layer};

/// UDP ports on which the dissector looks for a VXLAN header: the IANA port and
/// the one the Linux kernel used before IANA assigned it.
pub const VXLAN_PORTS: [u16; 2] = [vxlan::VXLAN_PORT, 8472];

/// Offset of the IPv4 header checksum.
const IPV4_CHECKSUM_AT: usize = 10;

/// Offset of the 16-bit Internet checksum field in a parsed transport header
/// (SCTP's CRC32c has one encoding per value and is simply recomputed).
fn transport_checksum_offset(t: &Transport<'_>) -> Option<usize> {
    match t {
        Transport::Tcp(_) => Some(16),
        Transport::Udp(_) => Some(6),
        Transport::Icmpv4(_) | Transport::Icmpv6(_) => Some(2),
        _ => None,
    }
}

/// The network layer of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network<'a> {
    /// Nothing parsed (the link layer was malformed, or there is no payload).
    None,
    /// ARP or RARP.
    Arp(ArpRepr),
    /// IPv4.
    Ipv4(Ipv4Repr<'a>),
    /// IPv6; its extension headers are in [`Dissection::ext_headers`].
    Ipv6(Ipv6Repr),
    /// An EtherType this dissector does not decode (or an 802.3 length), with its payload.
    Other(EtherType, &'a [u8]),
}

/// The IPv6 extension headers of a packet, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExtChain<'a> {
    headers: [Option<ExtHeaderRepr<'a>>; MAX_EXT_HEADERS],
    len: usize,
}

impl<'a> ExtChain<'a> {
    /// The headers, outermost first.
    pub fn iter(&self) -> impl Iterator<Item = &ExtHeaderRepr<'a>> {
        self.headers[..self.len].iter().flatten()
    }

    /// Number of extension headers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, header: ExtHeaderRepr<'a>) {
        // The walker stops with TooDeep after MAX_EXT_HEADERS headers, so there is always room.
        if let Some(slot) = self.headers.get_mut(self.len) {
            *slot = Some(header);
            self.len += 1;
        }
    }

    fn buffer_len(&self) -> usize {
        self.iter().map(ExtHeaderRepr::buffer_len).sum()
    }
}

/// The transport layer of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport<'a> {
    /// Nothing parsed.
    None,
    /// TCP.
    Tcp(TcpRepr<'a>),
    /// UDP (the payload includes any VXLAN header and inner frame).
    Udp(UdpRepr<'a>),
    /// SCTP: the common header, the chunks kept as bytes.
    Sctp(SctpRepr<'a>),
    /// ICMP for IPv4.
    Icmpv4(Icmpv4Repr<'a>),
    /// ICMP for IPv6.
    Icmpv6(Icmpv6Repr<'a>),
    /// A fragment of a larger datagram: its upper-layer protocol and raw bytes.
    Fragment {
        /// The upper-layer protocol of the datagram (the first header of the fragmentable part).
        protocol: IpProtocol,
        /// Whether this is the first fragment (offset 0), which carries the transport header.
        first: bool,
        /// The fragment's bytes.
        data: &'a [u8],
    },
    /// A protocol this dissector does not decode (ESP, GRE, No Next Header…).
    Other(IpProtocol, &'a [u8]),
}

/// Every header of one frame; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dissection<'a> {
    /// The Ethernet header, when the frame had one.
    pub ethernet: Option<EthernetRepr>,
    tags: [Option<VlanRepr>; MAX_TAGS],
    tag_count: usize,
    /// The network layer.
    pub network: Network<'a>,
    /// The IPv6 extension headers (empty for other network layers).
    pub ext_headers: ExtChain<'a>,
    /// The transport layer.
    pub transport: Transport<'a>,
    /// A VXLAN header found in a UDP payload on one of [`VXLAN_PORTS`]; the inner frame follows it.
    pub vxlan: Option<VxlanRepr>,
    /// Bytes inside the IP payload after a UDP datagram whose length field is
    /// shorter than the payload (receivers trim them, RFC 768); kept for `emit`.
    pub udp_slack: &'a [u8],
    /// Bytes after the end the network layer declares (Ethernet padding, trailers).
    pub trailer: &'a [u8],
    /// The first error met; the layers before it are sound.
    pub error: Option<Error>,
    frame: &'a [u8],
    sent: SentChecksums,
}

/// Checksum fields as the sender wrote them. A ones'-complement sum has two
/// encodings of zero (0x0000 and 0xffff) and UDP over IPv4 may omit its
/// checksum (0), so recomputing alone cannot reproduce every valid packet:
/// [`Dissection::emit`] writes the sent value back when it encodes the same sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct SentChecksums {
    ipv4: Option<u16>,
    transport: Option<u16>,
}

/// Whether checksum field `sent` may replace the freshly computed `computed`.
fn same_sum(sent: u16, computed: u16, udp_over_ipv4: bool) -> bool {
    sent == computed || matches!((sent, computed), (0, 0xffff) | (0xffff, 0)) || (udp_over_ipv4 && sent == 0)
}

/// Write `sent` into the 2-byte checksum field at `at` of `buf` if it encodes the same sum.
fn restore_checksum(buf: &mut [u8], at: usize, sent: Option<u16>, udp_over_ipv4: bool) {
    if let (Some(sent), Some(field)) = (sent, buf.get_mut(at..at + 2)) {
        let computed = u16::from_be_bytes([field[0], field[1]]);
        if same_sum(sent, computed, udp_over_ipv4) {
            field.copy_from_slice(&sent.to_be_bytes());
        }
    }
}

impl<'a> Dissection<'a> {
    fn empty(frame: &'a [u8]) -> Self {
        Dissection {
            ethernet: None,
            tags: [None; MAX_TAGS],
            tag_count: 0,
            network: Network::None,
            ext_headers: ExtChain::default(),
            transport: Transport::None,
            vxlan: None,
            udp_slack: &[],
            trailer: &[],
            error: None,
            frame,
            sent: SentChecksums::default(),
        }
    }

    /// Dissect an Ethernet II frame.
    pub fn ethernet(frame: &'a [u8]) -> Dissection<'a> {
        let mut d = Self::empty(frame);
        let eth = match ethernet::Frame::new_checked(frame).and_then(|f| EthernetRepr::parse(&f)) {
            Ok(eth) => eth,
            Err(e) => return d.fail(e),
        };
        d.ethernet = Some(eth);
        let mut ethertype = eth.ethertype;
        let mut rest = &frame[ethernet::HEADER_LEN..];
        while ethertype.is_vlan_tag() {
            if d.tag_count == MAX_TAGS {
                return d.fail(Error::new(Layer::Vlan, ErrorKind::TooDeep));
            }
            let tag = match vlan::Packet::new_checked(rest).and_then(|p| VlanRepr::parse(&p)) {
                Ok(tag) => tag,
                Err(e) => return d.fail(e),
            };
            d.tags[d.tag_count] = Some(tag);
            d.tag_count += 1;
            ethertype = tag.ethertype;
            rest = &rest[vlan::HEADER_LEN..];
        }
        d.network_layer(ethertype, rest);
        d
    }

    /// Dissect a packet that starts at the network layer, given its EtherType
    /// (Linux cooked captures, for instance).
    pub fn from_ethertype(ethertype: EtherType, packet: &'a [u8]) -> Dissection<'a> {
        let mut d = Self::empty(packet);
        d.network_layer(ethertype, packet);
        d
    }

    /// Dissect a raw IP packet (IPv4 or IPv6, told apart by the version nibble).
    pub fn ip(packet: &'a [u8]) -> Dissection<'a> {
        let ethertype = match packet.first().map(|b| b >> 4) {
            Some(6) => EtherType::IPV6,
            Some(4) => EtherType::IPV4,
            Some(_) => return Self::empty(packet).fail(Error::new(Layer::Ipv4, ErrorKind::BadVersion)),
            None => return Self::empty(packet).fail(Error::new(Layer::Ipv4, ErrorKind::Truncated)),
        };
        Self::from_ethertype(ethertype, packet)
    }

    fn fail(mut self, error: Error) -> Self {
        self.error.get_or_insert(error);
        self
    }

    fn record(&mut self, error: Error) {
        self.error.get_or_insert(error);
    }

    /// The VLAN tags, outermost first.
    pub fn tags(&self) -> impl Iterator<Item = &VlanRepr> {
        self.tags[..self.tag_count].iter().flatten()
    }

    /// The network layer's source and destination addresses, for IPv4 and IPv6.
    pub fn addresses(&self) -> Option<(IpAddr, IpAddr)> {
        match self.network {
            Network::Ipv4(ip) => Some((ip.src_addr.into(), ip.dst_addr.into())),
            Network::Ipv6(ip) => Some((ip.src_addr.into(), ip.dst_addr.into())),
            _ => None,
        }
    }

    /// The bytes the frame was dissected from.
    pub fn bytes(&self) -> &'a [u8] {
        self.frame
    }

    fn network_layer(&mut self, ethertype: EtherType, data: &'a [u8]) {
        match ethertype {
            EtherType::IPV4 => self.ipv4(data),
            EtherType::IPV6 => self.ipv6(data),
            EtherType::ARP | EtherType::RARP => {
                let packet = match arp::Packet::new_checked(data) {
                    Ok(p) => p,
                    Err(e) => return self.record(e),
                };
                // ARP for other hardware or protocol types is well-formed, just not decoded.
                if !packet.is_ethernet_ipv4() {
                    self.network = Network::Other(ethertype, data);
                    return;
                }
                match ArpRepr::parse(&packet) {
                    Ok(repr) => {
                        self.network = Network::Arp(repr);
                        self.trailer = &data[repr.buffer_len()..];
                    }
                    Err(e) => self.record(e),
                }
            }
            _ => self.network = Network::Other(ethertype, data),
        }
    }

    fn ipv4(&mut self, data: &'a [u8]) {
        let packet = match ipv4::Packet::new_checked(data) {
            Ok(p) => p,
            Err(e) => return self.record(e),
        };
        let repr = match Ipv4Repr::parse(&packet) {
            Ok(r) => r,
            Err(e) => return self.record(e),
        };
        self.network = Network::Ipv4(repr);
        self.sent.ipv4 = Some(packet.checksum());
        // check_len guarantees total_len <= data.len().
        let total = usize::from(packet.total_len());
        self.trailer = &data[total..];
        let payload = packet.payload();
        if repr.more_frags || repr.frag_offset != 0 {
            self.transport = Transport::Fragment {
                protocol: repr.protocol,
                first: repr.frag_offset == 0,
                data: payload,
            };
            if repr.frag_offset == 0
                && let Err(e) = crate::flow::check_first_fragment(repr.protocol, false, payload)
            {
                self.record(e);
            }
            return;
        }
        // AH over IPv4 is kept opaque (Transport::Other): IPsec traffic is rare on
        // a vNIC, and an opaque payload still round-trips exactly.
        self.transport_layer(repr.protocol, payload, false);
    }

    fn ipv6(&mut self, data: &'a [u8]) {
        let packet = match ipv6::Packet::new_checked(data) {
            Ok(p) => p,
            Err(e) => return self.record(e),
        };
        let repr = match Ipv6Repr::parse(&packet) {
            Ok(r) => r,
            Err(e) => return self.record(e),
        };
        let total = ipv6::HEADER_LEN + repr.payload_len;
        self.trailer = &data[total..];
        self.network = Network::Ipv6(repr);
        if crate::flow::has_v4_mapped_address(&packet) {
            return self.record(Error::new(Layer::Ipv6, ErrorKind::BadValue));
        }
        self.walk_ext_headers(repr.next_header, packet.payload());
    }

    /// Walk extension headers from `first`, then dissect the upper layer.
    fn walk_ext_headers(&mut self, first: IpProtocol, data: &'a [u8]) {
        let mut first_fragment = None;
        for item in ipv6ext::walk(first, data) {
            match item {
                Err(e) => return self.record(e),
                Ok(WalkItem::Header { header, .. }) => match ExtHeaderRepr::parse(&header) {
                    Ok(h) => {
                        if let ExtHeaderRepr::Fragment {
                            more_frags,
                            frag_offset: 0,
                            ..
                        } = h
                        {
                            // Any offset-0 fragment header with more to come makes this a first
                            // fragment, however many fragment headers are stacked (as flow::extract).
                            first_fragment = Some(first_fragment.unwrap_or(false) || more_frags);
                        }
                        self.ext_headers.push(h);
                    }
                    Err(e) => return self.record(e),
                },
                Ok(WalkItem::End(WalkEnd::Upper { protocol, offset })) => {
                    let upper = &data[offset..];
                    match first_fragment {
                        // A first fragment with more to come holds only part of the datagram.
                        Some(true) => {
                            self.transport = Transport::Fragment {
                                protocol,
                                first: true,
                                data: upper,
                            };
                            if let Err(e) = crate::flow::check_first_fragment(protocol, true, upper) {
                                self.record(e);
                            }
                        }
                        _ => self.transport_layer(protocol, upper, true),
                    }
                }
                Ok(WalkItem::End(WalkEnd::NonFirstFragment { protocol, offset, .. })) => {
                    self.transport = Transport::Fragment {
                        protocol,
                        first: false,
                        data: &data[offset..],
                    };
                }
                Ok(WalkItem::End(WalkEnd::NoNextHeader { offset })) => {
                    self.transport = Transport::Other(IpProtocol::IPV6_NONXT, &data[offset..]);
                }
            }
        }
    }

    fn transport_layer(&mut self, protocol: IpProtocol, data: &'a [u8], is_ipv6: bool) {
        let parsed = match protocol {
            IpProtocol::TCP => tcp::Packet::new_checked(data)
                .and_then(|p| TcpRepr::parse(&p))
                .map(Transport::Tcp),
            IpProtocol::UDP => udp::Packet::new_checked(data).and_then(|p| {
                // check_len bounds the length field by the buffer.
                self.udp_slack = &data[usize::from(p.len())..];
                UdpRepr::parse(&p).map(Transport::Udp)
            }),
            IpProtocol::SCTP => sctp::Packet::new_checked(data)
                .and_then(|p| SctpRepr::parse(&p))
                .map(Transport::Sctp),
            IpProtocol::ICMP if !is_ipv6 => icmpv4::Packet::new_checked(data)
                .and_then(|p| Icmpv4Repr::parse(&p))
                .map(Transport::Icmpv4),
            IpProtocol::ICMPV6 if is_ipv6 => icmpv6::Packet::new_checked(data)
                .and_then(|p| Icmpv6Repr::parse(&p))
                .map(Transport::Icmpv6),
            other => Ok(Transport::Other(other, data)),
        };
        match parsed {
            Ok(t) => self.transport = t,
            Err(e) => return self.record(e),
        }
        // Every parsed transport header is at least 8 bytes: the field is in bounds.
        let at = transport_checksum_offset(&self.transport).unwrap_or(0);
        self.sent.transport = data.get(at..at + 2).map(|f| u16::from_be_bytes([f[0], f[1]]));
        if let Transport::Udp(udp) = self.transport
            && VXLAN_PORTS.contains(&udp.dst_port)
        {
            match vxlan::Packet::new_checked(udp.payload).and_then(|p| VxlanRepr::parse(&p)) {
                Ok(v) => self.vxlan = Some(v),
                Err(e) => self.record(e),
            }
        }
    }

    /// Whether the IPv4 header checksum and the TCP, UDP, SCTP, ICMPv4 and
    /// ICMPv6 checksums present in the frame verify. Layers that were not parsed
    /// count as valid; a frame with an [`Dissection::error`] is not checked
    /// beyond its sound layers.
    pub fn checksums_valid(&self) -> bool {
        let (src, dst, l4) = match self.network {
            Network::Ipv4(ip) => {
                let start = self.l3_offset();
                let Ok(packet) = ipv4::Packet::new_checked(&self.frame[start..]) else {
                    return false;
                };
                if !packet.verify_checksum() {
                    return false;
                }
                (
                    IpAddr::V4(ip.src_addr),
                    IpAddr::V4(ip.dst_addr),
                    start + packet.header_len(),
                )
            }
            Network::Ipv6(ip) => (
                IpAddr::V6(ip.src_addr),
                IpAddr::V6(ip.dst_addr),
                self.l3_offset() + ipv6::HEADER_LEN + self.ext_headers.buffer_len(),
            ),
            _ => return true,
        };
        let end = self.frame.len() - self.trailer.len();
        let Some(data) = self.frame.get(l4..end) else {
            return false;
        };
        match (self.transport, src, dst) {
            (Transport::Tcp(_), _, _) => tcp::Packet::new_checked(data).is_ok_and(|p| p.verify_checksum(src, dst)),
            (Transport::Udp(_), _, _) => udp::Packet::new_checked(data).is_ok_and(|p| p.verify_checksum(src, dst)),
            (Transport::Sctp(_), _, _) => sctp::Packet::new_checked(data).is_ok_and(|p| p.verify_checksum()),
            (Transport::Icmpv4(_), _, _) => icmpv4::Packet::new_checked(data).is_ok_and(|p| p.verify_checksum()),
            (Transport::Icmpv6(_), IpAddr::V6(s), IpAddr::V6(d)) => {
                icmpv6::Packet::new_checked(data).is_ok_and(|p| p.verify_checksum(s, d))
            }
            _ => true,
        }
    }

    /// Offset of the network header in the frame.
    fn l3_offset(&self) -> usize {
        match self.ethernet {
            Some(_) => ethernet::HEADER_LEN + self.tag_count * vlan::HEADER_LEN,
            None => 0,
        }
    }

    /// The length [`Dissection::emit`] writes, or `None` when the frame cannot be
    /// re-emitted (it had an error, or no Ethernet header).
    pub fn buffer_len(&self) -> Option<usize> {
        if self.error.is_some() || self.ethernet.is_none() {
            return None;
        }
        let network = match self.network {
            Network::None => 0,
            Network::Arp(a) => a.buffer_len(),
            Network::Ipv4(ip) => ip.buffer_len() + ip.payload_len,
            Network::Ipv6(ip) => ipv6::HEADER_LEN + ip.payload_len,
            Network::Other(_, data) => data.len(),
        };
        Some(self.l3_offset() + network + self.trailer.len())
    }

    /// Write the frame back from its parsed headers into `buf`, which must be
    /// exactly [`Dissection::buffer_len`] long; checksums are recomputed.
    /// Returns `None` (writing nothing) when the frame cannot be re-emitted or
    /// `buf` has the wrong length.
    pub fn emit(&self, buf: &mut [u8]) -> Option<()> {
        if self.buffer_len()? != buf.len() {
            return None;
        }
        let eth = self.ethernet?;
        eth.emit(&mut ethernet::Frame::new_unchecked(&mut *buf));
        let mut at = ethernet::HEADER_LEN;
        for tag in self.tags() {
            tag.emit(&mut vlan::Packet::new_unchecked(&mut buf[at..]));
            at += vlan::HEADER_LEN;
        }
        let trailer_at = buf.len() - self.trailer.len();
        buf[trailer_at..].copy_from_slice(self.trailer);
        let body = &mut buf[at..trailer_at];
        match self.network {
            Network::None => {}
            Network::Arp(a) => a.emit(&mut arp::Packet::new_unchecked(body)),
            Network::Other(_, data) => body.copy_from_slice(data),
            Network::Ipv4(ip) => {
                let hlen = ip.buffer_len();
                // Transport first: the IPv4 header checksum does not cover it, but AH may precede it.
                self.emit_upper(&mut body[hlen..], IpAddr::V4(ip.src_addr), IpAddr::V4(ip.dst_addr));
                ip.emit(&mut ipv4::Packet::new_unchecked(&mut *body));
                restore_checksum(body, IPV4_CHECKSUM_AT, self.sent.ipv4, false);
            }
            Network::Ipv6(ip) => {
                ip.emit(&mut ipv6::Packet::new_unchecked(&mut *body));
                self.emit_upper(
                    &mut body[ipv6::HEADER_LEN..],
                    IpAddr::V6(ip.src_addr),
                    IpAddr::V6(ip.dst_addr),
                );
            }
        }
        Some(())
    }

    /// Write extension headers (if any) and the transport layer into `buf`.
    fn emit_upper(&self, buf: &mut [u8], src: IpAddr, dst: IpAddr) {
        let mut at = 0;
        for h in self.ext_headers.iter() {
            let len = h.buffer_len();
            h.emit(&mut ipv6ext::Packet::new_unchecked(&mut buf[at..at + len], h.kind()));
            at += len;
        }
        let buf = &mut buf[at..];
        match self.transport {
            Transport::None => {}
            Transport::Tcp(t) => t.emit(&mut tcp::Packet::new_unchecked(&mut *buf), src, dst),
            Transport::Udp(u) => {
                let (datagram, slack) = buf.split_at_mut(buf.len() - self.udp_slack.len());
                slack.copy_from_slice(self.udp_slack);
                u.emit(&mut udp::Packet::new_unchecked(datagram), src, dst);
            }
            Transport::Sctp(s) => s.emit(&mut sctp::Packet::new_unchecked(&mut *buf)),
            Transport::Icmpv4(i) => i.emit(&mut icmpv4::Packet::new_unchecked(&mut *buf)),
            Transport::Icmpv6(i) => {
                if let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) {
                    i.emit(&mut icmpv6::Packet::new_unchecked(&mut *buf), s, d)
                }
            }
            Transport::Fragment { data, .. } | Transport::Other(_, data) => buf.copy_from_slice(data),
        }
        if let Some(at) = transport_checksum_offset(&self.transport) {
            let udp_over_ipv4 = matches!(self.transport, Transport::Udp(_)) && src.is_ipv4();
            restore_checksum(buf, at, self.sent.transport, udp_over_ipv4);
        }
    }
}

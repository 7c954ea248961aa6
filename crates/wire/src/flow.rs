//! Flow-key extraction for the fast path.
//!
//! [`extract`] reads just enough of a frame to build the exact-match key the
//! datapath's flow cache is indexed by: segment (VLAN / QinQ / VNI), addresses,
//! protocol and ports (ICMP: identifier, type and code), plus the few facts the
//! connection tracker needs (TCP flags, fragment position). It allocates
//! nothing, copies only the key, and uses the same checked views as the rest of
//! the crate, so a malformed frame is an [`Error`] naming its layer.
//!
//! Key conventions, chosen so that reversing a key ([`FlowKey::reversed`])
//! gives the key of the reply packet:
//! - TCP, UDP, SCTP: the ports.
//! - ICMP and ICMPv6: the message's type and code in their own fields, so
//!   that an echo reply is never taken for a request (the policy names them
//!   apart, and a reply may only pass as part of the connection its request
//!   opened). Echo request/reply: both ports hold the echo identifier, and
//!   reversing a request's key gives its reply's (type 8 ⇄ 0, 128 ⇄ 129).
//!   Other messages: source port 0, destination port `type << 8 | code` (as
//!   flow records show them); errors are related to their flow through the
//!   packet they quote ([`extract_quoted`]), not through their key.
//! - Fragments: the first fragment carries the ports; non-first fragments have
//!   ports 0 and [`Fragment::NonFirst`], so the datapath can reassemble or
//!   apply its fragment policy.
//! - IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`) in 16 bytes so
//!   one key type serves both families; IPv6 packets carrying such addresses
//!   are rejected ([`has_v4_mapped_address`]), so the form is unambiguous.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::ethernet::{self, EtherType};
use crate::ip::IpProtocol;
use crate::ipv6ext::{self, WalkEnd};
use crate::tcp::TcpFlags;
use crate::vlan::{self, MAX_TAGS};
use crate::{Error, ErrorKind, Layer, Result, icmpv4, icmpv6, ipv4, ipv6, sctp, tcp, udp};

/// The L2 segment a frame travels on: untagged, a VLAN, a QinQ pair, or a VXLAN VNI.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct Segment(u32);

impl Segment {
    const KIND_SHIFT: u32 = 28;
    const VLAN: u32 = 1 << Self::KIND_SHIFT;
    const QINQ: u32 = 2 << Self::KIND_SHIFT;
    const VNI: u32 = 3 << Self::KIND_SHIFT;

    /// No tag.
    pub const UNTAGGED: Segment = Segment(0);

    /// A single 802.1Q tag.
    pub const fn vlan(vid: u16) -> Segment {
        Segment(Self::VLAN | (vid as u32 & 0xfff))
    }

    /// An outer (service) and inner (customer) tag.
    pub const fn qinq(outer: u16, inner: u16) -> Segment {
        Segment(Self::QINQ | ((outer as u32 & 0xfff) << 12) | (inner as u32 & 0xfff))
    }

    /// A VXLAN network identifier (24 bits).
    pub const fn vni(vni: u32) -> Segment {
        Segment(Self::VNI | (vni & 0x00ff_ffff))
    }

    /// The packed value (kind in the top nibble), for hashing and classifier meta fields.
    pub const fn raw(self) -> u32 {
        self.0
    }

    /// The VLAN id of a single-tagged segment.
    pub const fn vlan_id(self) -> Option<u16> {
        if self.0 >> Self::KIND_SHIFT == 1 {
            Some((self.0 & 0xfff) as u16)
        } else {
            None
        }
    }

    /// The VNI of an overlay segment.
    pub const fn vni_id(self) -> Option<u32> {
        if self.0 >> Self::KIND_SHIFT == 3 {
            Some(self.0 & 0x00ff_ffff)
        } else {
            None
        }
    }
}

/// Where a packet sits in a fragmented datagram.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub enum Fragment {
    /// Not fragmented.
    #[default]
    None,
    /// The first fragment: the transport header (and so the ports) is present.
    First,
    /// A later fragment: no transport header; ports are 0 in the key.
    NonFirst,
}

/// The exact-match key of a flow (one direction).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub struct FlowKey {
    /// The segment the frame was seen on.
    pub segment: Segment,
    /// Source address (IPv4-mapped for IPv4).
    pub src: [u8; 16],
    /// Destination address (IPv4-mapped for IPv4).
    pub dst: [u8; 16],
    /// Source port, or ICMP identifier (see the module documentation).
    pub src_port: u16,
    /// Destination port, ICMP identifier, or ICMP `type << 8 | code`.
    pub dst_port: u16,
    /// The upper-layer protocol (after IPv6 extension headers; a Mobility or
    /// HIP header that ends the chain is the upper layer).
    pub protocol: IpProtocol,
    /// ICMP and ICMPv6 (over their own IP version): the message type; 0 otherwise.
    pub icmp_type: u8,
    /// ICMP and ICMPv6: the message code; 0 otherwise.
    pub icmp_code: u8,
}

/// Hashed as four words rather than field by field (the derived form feeds
/// each address to the hasher as a length and a byte slice): the connection
/// table hashes a key twice for every new flow. Every field is fed, so keys
/// that are equal hash equally.
impl core::hash::Hash for FlowKey {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        state.write_u128(u128::from_ne_bytes(self.src));
        state.write_u128(u128::from_ne_bytes(self.dst));
        state.write_u32(self.segment.raw());
        state.write_u64(
            u64::from(self.icmp_code) << 48
                | u64::from(self.icmp_type) << 40
                | u64::from(self.src_port) << 24
                | u64::from(self.dst_port) << 8
                | u64::from(self.protocol.0),
        );
    }
}

/// The type of the reply to an ICMP echo request of type `ty` and the
/// request of a reply (ICMP 8 ⇄ 0, ICMPv6 128 ⇄ 129, each over its own IP
/// version: `v4` tells which the key's addresses are); any other type is its own.
const fn echo_counterpart(protocol: IpProtocol, v4: bool, ty: u8) -> u8 {
    match (protocol.0, v4, ty) {
        (1, true, 8) => 0,
        (1, true, 0) => 8,
        (58, false, 128) => 129,
        (58, false, 129) => 128,
        _ => ty,
    }
}

/// Whether a key's address is IPv4 (stored IPv4-mapped, `::ffff:a.b.c.d`).
const fn is_v4_mapped(a: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 10 {
        if a[i] != 0 {
            return false;
        }
        i += 1;
    }
    a[10] == 0xff && a[11] == 0xff
}

/// Whether an ICMP (`v6` false) or ICMPv6 message type is an error, which
/// quotes the packet that caused it (RFC 792 and 1122: destination
/// unreachable, source quench, redirect, time exceeded, parameter problem;
/// RFC 4443: types 1 to 4). Errors are never answered and never open a
/// connection.
pub const fn is_icmp_error(v6: bool, ty: u8) -> bool {
    if v6 {
        matches!(ty, 1..=4)
    } else {
        matches!(ty, 3 | 4 | 5 | 11 | 12)
    }
}

fn mapped(a: Ipv4Addr) -> [u8; 16] {
    a.to_ipv6_mapped().octets()
}

fn unmap(a: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

impl FlowKey {
    /// The key of the reply direction.
    pub const fn reversed(&self) -> FlowKey {
        FlowKey {
            segment: self.segment,
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            protocol: self.protocol,
            // Only ICMP keys look at their addresses' version (TCP and UDP
            // keys are reversed on the engine's hot paths).
            icmp_type: match self.protocol.0 {
                1 | 58 => echo_counterpart(self.protocol, is_v4_mapped(&self.src), self.icmp_type),
                _ => self.icmp_type,
            },
            icmp_code: self.icmp_code,
        }
    }

    /// Whether the key's addresses are IPv4 (stored IPv4-mapped).
    pub const fn is_ipv4(&self) -> bool {
        is_v4_mapped(&self.src)
    }

    /// Whether this is the key of an ICMP or ICMPv6 echo request (each over
    /// its own IP version: protocol 1 over IPv6 is no ICMP to the extractor).
    pub const fn is_echo_request(&self) -> bool {
        match (self.protocol.0, self.icmp_type) {
            (1, 8) => self.is_ipv4(),
            (58, 128) => !self.is_ipv4(),
            _ => false,
        }
    }

    /// Whether this is the key of an ICMP or ICMPv6 echo reply (see [`FlowKey::is_echo_request`]).
    pub const fn is_echo_reply(&self) -> bool {
        match (self.protocol.0, self.icmp_type) {
            (1, 0) => self.is_ipv4(),
            (58, 129) => !self.is_ipv4(),
            _ => false,
        }
    }

    /// The source address.
    pub fn src_addr(&self) -> IpAddr {
        unmap(self.src)
    }

    /// The destination address.
    pub fn dst_addr(&self) -> IpAddr {
        unmap(self.dst)
    }

    /// The direction-independent form of the key (the smaller of the key and its
    /// reverse), and whether it was reversed. Both directions of a connection
    /// map to the same canonical key, which is what a symmetric shard hash needs.
    pub fn canonical(&self) -> (FlowKey, bool) {
        let reversed = self.reversed();
        // The ICMP type breaks the tie of an echo between one address and
        // itself, whose request and reply differ only there.
        if (reversed.src, reversed.src_port, reversed.icmp_type) < (self.src, self.src_port, self.icmp_type) {
            (reversed, true)
        } else {
            (*self, false)
        }
    }

    /// A hash that is the same for both directions of a flow, for choosing the
    /// worker that owns a connection. Each endpoint (address, port) is mixed on
    /// its own and the two are added, so the result is symmetric without first
    /// ordering the endpoints.
    pub fn symmetric_hash(&self) -> u64 {
        let a = endpoint_hash(&self.src, self.src_port);
        let b = endpoint_hash(&self.dst, self.dst_port);
        mix64(a.wrapping_add(b) ^ (u64::from(self.segment.raw()) << 8 | u64::from(self.protocol.0)))
    }
}

/// The splitmix64 finalizer: a cheap, well-distributed 64-bit mix.
const fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn endpoint_hash(addr: &[u8; 16], port: u16) -> u64 {
    let (hi, lo) = addr.split_at(8);
    // Both halves are exactly 8 bytes: split_at(8) of a 16-byte array.
    let hi = u64::from_le_bytes(hi.try_into().unwrap_or_default());
    let lo = u64::from_le_bytes(lo.try_into().unwrap_or_default());
    mix64(hi ^ mix64(lo ^ u64::from(port)))
}

/// What [`extract`] learned about an IP packet.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FlowInfo {
    /// The flow key.
    pub key: FlowKey,
    /// TCP flags (empty for other protocols and non-first fragments).
    pub tcp_flags: TcpFlags,
    /// ICMP type and code (ICMPv4 or ICMPv6), when the packet is ICMP.
    pub icmp: Option<(u8, u8)>,
    /// Fragment position.
    pub fragment: Fragment,
    /// Offset of the IP header in the frame.
    pub l3_offset: u16,
    /// Offset of the transport header (or fragment data) in the frame.
    pub l4_offset: u16,
}

/// [`extract`] for the common case only: an untagged Ethernet frame carrying
/// an unfragmented IPv4 packet without options, whose payload is TCP or UDP.
///
/// Those fields sit at fixed offsets, so they are read directly, after the
/// same length checks [`extract`] makes, without the general walk over tags,
/// versions and extension headers (on a flow-cache hit that walk was a fifth
/// of the time per packet). `None` means "not the common case", never "not
/// IP": the caller then takes [`extract`], which decides. Whenever this
/// returns `Some(info)`, `extract` returns `Ok(Some(info))` for the same
/// frame (checked by a table test, mutation tests and the `dissect` fuzz
/// target).
#[inline(always)]
pub fn extract_quick(frame: &[u8]) -> Option<FlowInfo> {
    const L3: usize = ethernet::HEADER_LEN;
    const L4: usize = L3 + ipv4::HEADER_LEN;
    // The views are made unchecked over a frame that holds both headers
    // (the `get` below), so every accessor used here is within bounds.
    let ip = ipv4::Packet::new_unchecked(frame.get(L3..L4)?);
    // A 20-byte IPv4 header, and neither a later fragment nor one followed
    // by more (the reserved and DF flags are ignored, as `extract` does).
    if ethernet::Frame::new_unchecked(frame).ethertype() != EtherType::IPV4
        || ip.version() != 4
        || ip.header_len() != ipv4::HEADER_LEN
        || ip.more_frags()
        || ip.frag_offset() != 0
    {
        return None;
    }
    // The transport slice ends where the IP layer says the payload ends, as
    // in `extract`; a total length shorter than the header is malformed.
    let upper = frame.get(L4..L3 + usize::from(ip.total_len()))?;
    let protocol = ip.protocol();
    let (src_port, dst_port, tcp_flags) = match protocol {
        IpProtocol::TCP => {
            let t = tcp::Packet::new_checked(upper).ok()?;
            (t.src_port(), t.dst_port(), t.flags())
        }
        IpProtocol::UDP => {
            let u = udp::Packet::new_checked(upper).ok()?;
            (u.src_port(), u.dst_port(), TcpFlags(0))
        }
        _ => return None,
    };
    Some(FlowInfo {
        key: FlowKey {
            segment: Segment::UNTAGGED,
            src: mapped(ip.src_addr()),
            dst: mapped(ip.dst_addr()),
            src_port,
            dst_port,
            protocol,
            icmp_type: 0,
            icmp_code: 0,
        },
        tcp_flags,
        icmp: None,
        fragment: Fragment::None,
        l3_offset: L3 as u16,
        l4_offset: L4 as u16,
    })
}

/// Extract the flow key of an Ethernet frame.
///
/// Returns `Ok(None)` for frames that are not IP (ARP, LLC, …): the datapath
/// handles those by other rules.
pub fn extract(frame: &[u8]) -> Result<Option<FlowInfo>> {
    let eth = ethernet::Frame::new_checked(frame)?;
    let mut ethertype = eth.ethertype();
    let mut offset = ethernet::HEADER_LEN;
    let mut vids = [0u16; MAX_TAGS];
    let mut tags = 0;
    while ethertype.is_vlan_tag() {
        if tags == MAX_TAGS {
            return Err(Error::new(Layer::Vlan, ErrorKind::TooDeep));
        }
        // `offset` never exceeds the frame: it only advances past checked headers.
        let tag = vlan::Packet::new_checked(&frame[offset..])?;
        vids[tags] = tag.vid();
        tags += 1;
        ethertype = tag.ethertype();
        offset += vlan::HEADER_LEN;
    }
    let segment = match tags {
        0 => Segment::UNTAGGED,
        1 => Segment::vlan(vids[0]),
        _ => Segment::qinq(vids[0], vids[1]),
    };
    extract_l3(ethertype, frame, offset, segment)
}

/// Extract the flow key of a packet that starts at the network layer, tagged
/// with `segment` (a decapsulated VXLAN payload's inner frame goes through
/// [`extract`] instead; raw-IP captures come here).
pub fn extract_ip(packet: &[u8], segment: Segment) -> Result<Option<FlowInfo>> {
    let ethertype = match packet.first().map(|b| b >> 4) {
        Some(4) => EtherType::IPV4,
        Some(6) => EtherType::IPV6,
        Some(_) => return Err(Error::new(Layer::Ipv4, ErrorKind::BadVersion)),
        None => return Err(Error::new(Layer::Ipv4, ErrorKind::Truncated)),
    };
    extract_l3(ethertype, packet, 0, segment)
}

fn extract_l3(ethertype: EtherType, frame: &[u8], l3: usize, segment: Segment) -> Result<Option<FlowInfo>> {
    // Callers pass an offset just past checked headers, so the slice is in bounds.
    let data = &frame[l3..];
    let (src, dst, protocol, l4, fragment) = match ethertype {
        EtherType::IPV4 => {
            let ip = ipv4::Packet::new_checked(data)?;
            let fragment = match (ip.frag_offset(), ip.more_frags()) {
                (0, false) => Fragment::None,
                (0, true) => Fragment::First,
                _ => Fragment::NonFirst,
            };
            (
                mapped(ip.src_addr()),
                mapped(ip.dst_addr()),
                ip.protocol(),
                l3 + ip.header_len(),
                fragment,
            )
        }
        EtherType::IPV6 => {
            let ip = ipv6::Packet::new_checked(data)?;
            if has_v4_mapped_address(&ip) {
                return Err(Error::new(Layer::Ipv6, ErrorKind::BadValue));
            }
            let mut fragment = Fragment::None;
            let mut last_header = None;
            let mut walk = ipv6ext::walk(ip.next_header(), ip.payload());
            let end = loop {
                match walk.next() {
                    Some(Ok(ipv6ext::WalkItem::Header { header, offset })) => {
                        if header.kind() == IpProtocol::IPV6_FRAG && header.frag_offset() == 0 && header.more_frags() {
                            fragment = Fragment::First;
                        }
                        last_header = Some((header.kind(), offset));
                    }
                    Some(Ok(ipv6ext::WalkItem::End(end))) => break end,
                    Some(Err(e)) => return Err(e),
                    // A walk that did not fail always ends with an End item.
                    None => return Err(Error::new(Layer::Ipv6Ext, ErrorKind::Truncated)),
                }
            };
            let (protocol, offset) = match end {
                WalkEnd::Upper { protocol, offset } => (protocol, offset),
                WalkEnd::NonFirstFragment { protocol, offset, .. } => {
                    fragment = Fragment::NonFirst;
                    (protocol, offset)
                }
                // A Mobility or HIP header is the message itself, not a header in
                // front of one: its Next Header is No Next Header by specification
                // (RFC 6275 section 6.1.1, RFC 7401 section 5.1). The key names it,
                // as hosts and other firewalls do (Linux: `ip6tables -p mh`), so a
                // rule on the protocol can match it.
                WalkEnd::NoNextHeader { offset } => match last_header {
                    Some((kind @ (IpProtocol::MOBILITY | IpProtocol::HIP), at)) => (kind, at),
                    _ => (IpProtocol::IPV6_NONXT, offset),
                },
            };
            let l4 = l3 + ipv6::HEADER_LEN + offset;
            (ip.src_addr().octets(), ip.dst_addr().octets(), protocol, l4, fragment)
        }
        _ => return Ok(None),
    };
    let mut info = FlowInfo {
        key: FlowKey {
            segment,
            src,
            dst,
            src_port: 0,
            dst_port: 0,
            protocol,
            icmp_type: 0,
            icmp_code: 0,
        },
        tcp_flags: TcpFlags(0),
        icmp: None,
        fragment,
        l3_offset: l3 as u16,
        l4_offset: l4 as u16,
    };
    if fragment == Fragment::NonFirst {
        return Ok(Some(info));
    }
    // The transport slice ends where the IP layer says its payload ends, not at
    // the frame's end (which may carry Ethernet padding).
    let ip_end = l3 + ip_len(ethertype, data);
    let upper = frame.get(l4..ip_end).unwrap_or(&[]);
    let first_fragment = fragment == Fragment::First;
    if first_fragment {
        check_first_fragment(protocol, ethertype == EtherType::IPV6, upper)?;
    }
    match protocol {
        IpProtocol::TCP => {
            let (sport, dport, flags) = if first_fragment {
                ports_only(upper, Layer::Tcp)?
            } else {
                let t = tcp::Packet::new_checked(upper)?;
                (t.src_port(), t.dst_port(), t.flags())
            };
            (info.key.src_port, info.key.dst_port, info.tcp_flags) = (sport, dport, flags);
        }
        IpProtocol::UDP => {
            let (sport, dport, _) = if first_fragment {
                ports_only(upper, Layer::Udp)?
            } else {
                let u = udp::Packet::new_checked(upper)?;
                (u.src_port(), u.dst_port(), TcpFlags(0))
            };
            (info.key.src_port, info.key.dst_port) = (sport, dport);
        }
        IpProtocol::SCTP => {
            // The common header is whole in a first fragment too (checked above).
            let p = sctp::Packet::new_checked(upper)?;
            (info.key.src_port, info.key.dst_port) = (p.src_port(), p.dst_port());
        }
        IpProtocol::ICMP if ethertype == EtherType::IPV4 => {
            let m = icmpv4::Packet::new_checked(upper)?;
            set_icmp(&mut info, m.msg_type().0, m.msg_code(), m.echo_ident());
        }
        IpProtocol::ICMPV6 if ethertype == EtherType::IPV6 => {
            let m = icmpv6::Packet::new_checked(upper)?;
            set_icmp(&mut info, m.msg_type().0, m.msg_code(), m.echo_ident());
        }
        _ => {}
    }
    Ok(Some(info))
}

/// Fill the ICMP fields of `info`'s key (see the module documentation);
/// `ident` is the echo identifier field, used only by echo messages.
fn set_icmp(info: &mut FlowInfo, ty: u8, code: u8, ident: u16) {
    info.icmp = Some((ty, code));
    (info.key.icmp_type, info.key.icmp_code) = (ty, code);
    (info.key.src_port, info.key.dst_port) = icmp_ports(info.key.protocol, ty, code, ident);
}

/// The ports of an ICMP key: both the identifier for echo, else 0 and `type << 8 | code`.
fn icmp_ports(protocol: IpProtocol, ty: u8, code: u8, ident: u16) -> (u16, u16) {
    match (protocol, ty) {
        (IpProtocol::ICMP, 0 | 8) | (IpProtocol::ICMPV6, 128 | 129) => (ident, ident),
        _ => (0, u16::from_be_bytes([ty, code])),
    }
}

/// The key of the packet an ICMP or ICMPv6 error quotes: `quoted` starts at
/// its IP header (IPv4, or IPv6 with any extension headers) and holds at
/// least the first 8 bytes of its transport header, possibly not more (RFC
/// 792 quotes no more; its length fields are not believed). `segment` is
/// the segment to key it in.
///
/// `None` when the quote is too short, malformed, a non-first fragment (no
/// ports), or itself an ICMP error (errors are never sent about errors, RFC
/// 1122 section 3.2.2, so none can be related to one). Keys follow
/// [`extract`]'s conventions, so the key of a quoted packet is the key its
/// flow is tracked under.
pub fn extract_quoted(quoted: &[u8], segment: Segment) -> Option<FlowKey> {
    let version = quoted.first()? >> 4;
    let (src, dst, protocol, l4) = match version {
        4 => {
            let ihl = usize::from(quoted.first()? & 0x0f) * 4;
            if ihl < ipv4::HEADER_LEN {
                return None;
            }
            let header = quoted.get(..ihl)?;
            let ip = ipv4::Packet::new_unchecked(header);
            if ip.frag_offset() != 0 {
                return None;
            }
            (
                mapped(ip.src_addr()),
                mapped(ip.dst_addr()),
                ip.protocol(),
                quoted.get(ihl..)?,
            )
        }
        6 => {
            let header = quoted.get(..ipv6::HEADER_LEN)?;
            let ip = ipv6::Packet::new_unchecked(header);
            if has_v4_mapped_address(&ip) {
                return None;
            }
            let rest = quoted.get(ipv6::HEADER_LEN..)?;
            let mut last_header = None;
            // The header the walk reads next, and where.
            let mut pending = (ip.next_header(), 0);
            let mut walk = ipv6ext::walk(ip.next_header(), rest);
            let (protocol, offset) = loop {
                match walk.next()? {
                    Ok(ipv6ext::WalkItem::Header { header, offset }) => {
                        last_header = Some((header.kind(), offset));
                        pending = (header.next_header(), offset + header.header_len());
                    }
                    // A Mobility or HIP message ending the chain is the
                    // quote's upper layer, as it is the packet's; its first 8
                    // bytes (No Next Header first) may be all that is quoted.
                    Err(_)
                        if matches!(pending.0, IpProtocol::MOBILITY | IpProtocol::HIP)
                            && rest.get(pending.1) == Some(&IpProtocol::IPV6_NONXT.0) =>
                    {
                        break pending;
                    }
                    Ok(ipv6ext::WalkItem::End(WalkEnd::Upper { protocol, offset })) => break (protocol, offset),
                    Ok(ipv6ext::WalkItem::End(WalkEnd::NoNextHeader { offset })) => {
                        break match last_header {
                            Some((kind @ (IpProtocol::MOBILITY | IpProtocol::HIP), at)) => (kind, at),
                            _ => (IpProtocol::IPV6_NONXT, offset),
                        };
                    }
                    Ok(ipv6ext::WalkItem::End(WalkEnd::NonFirstFragment { .. })) | Err(_) => return None,
                }
            };
            (
                ip.src_addr().octets(),
                ip.dst_addr().octets(),
                protocol,
                rest.get(offset..)?,
            )
        }
        _ => return None,
    };
    let word = |i: usize| Some(u16::from_be_bytes([*l4.get(i)?, *l4.get(i + 1)?]));
    let icmp = matches!((version, protocol), (4, IpProtocol::ICMP) | (6, IpProtocol::ICMPV6));
    let (src_port, dst_port, icmp_type, icmp_code) = match protocol {
        IpProtocol::TCP | IpProtocol::UDP | IpProtocol::SCTP => (word(0)?, word(2)?, 0, 0),
        _ if icmp => {
            let (ty, code) = (*l4.first()?, *l4.get(1)?);
            if is_icmp_error(version == 6, ty) {
                return None;
            }
            let (s, d) = icmp_ports(protocol, ty, code, word(4)?);
            (s, d, ty, code)
        }
        _ => (0, 0, 0, 0),
    };
    Some(FlowKey {
        segment,
        src,
        dst,
        src_port,
        dst_port,
        protocol,
        icmp_type,
        icmp_code,
    })
}

/// Whether an IPv6 header carries an IPv4-mapped address (`::ffff:a.b.c.d`).
///
/// Such addresses must not appear on the wire (draft-itojun-v6ops-v4mapped-harmful;
/// Linux drops them in `ip6_rcv_core`): a policy written for `a.b.c.d` would be
/// fooled by them, and this module's keys store IPv4 addresses in exactly that
/// form. Both the extractor and the dissector reject them as malformed.
pub fn has_v4_mapped_address<T: AsRef<[u8]>>(ip: &ipv6::Packet<T>) -> bool {
    ip.src_addr().to_ipv4_mapped().is_some() || ip.dst_addr().to_ipv4_mapped().is_some()
}

/// Length of the IP packet (header + payload) per its own length fields; the
/// views' `check_len` has already bounded it by the buffer.
fn ip_len(ethertype: EtherType, data: &[u8]) -> usize {
    if ethertype == EtherType::IPV4 {
        ipv4::Packet::new_unchecked(data).total_len().into()
    } else {
        ipv6::HEADER_LEN + usize::from(ipv6::Packet::new_unchecked(data).payload_len())
    }
}

/// Refuse a first fragment too short to hold what the firewall decides on: the
/// whole TCP header (flags included: the tiny-fragment attack of RFC 1858 hides
/// them in the second fragment), the first 8 bytes of UDP and ICMP (ports,
/// or type, code and identifier), SCTP's 12-byte common header (ports and
/// verification tag). Both the extractor and the dissector apply it.
pub fn check_first_fragment(protocol: IpProtocol, is_ipv6: bool, upper: &[u8]) -> Result<()> {
    let (layer, min) = match protocol {
        IpProtocol::TCP => (Layer::Tcp, tcp::HEADER_LEN),
        IpProtocol::UDP => (Layer::Udp, udp::HEADER_LEN),
        IpProtocol::SCTP => (Layer::Sctp, sctp::HEADER_LEN),
        // ICMP is parsed only over its own IP version, here as everywhere else.
        IpProtocol::ICMP if !is_ipv6 => (Layer::Icmpv4, icmpv4::HEADER_LEN),
        IpProtocol::ICMPV6 if is_ipv6 => (Layer::Icmpv6, icmpv6::HEADER_LEN),
        _ => return Ok(()),
    };
    if upper.len() < min {
        Err(Error::new(layer, ErrorKind::Truncated))
    } else {
        Ok(())
    }
}

/// Ports (and TCP flags when present) of a first fragment, which may hold
/// less than a whole transport header.
fn ports_only(upper: &[u8], layer: Layer) -> Result<(u16, u16, TcpFlags)> {
    let [a, b, c, d, ..] = *upper else {
        return Err(Error::new(layer, ErrorKind::Truncated));
    };
    let flags = match (layer, upper.get(12..14)) {
        (Layer::Tcp, Some(f)) => TcpFlags(u16::from_be_bytes([f[0], f[1]]) & 0x01ff),
        _ => TcpFlags(0),
    };
    Ok((u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]), flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ethernet + 802.1Q(vid 100) + IPv4 + TCP SYN 10.0.0.1:40000 -> 10.0.0.2:443.
    fn tcp_syn_vlan() -> Vec<u8> {
        let mut f = vec![
            0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x81, 0x00, 0x00, 100, 0x08, 0x00, // eth + tag
            0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2, // ipv4
            0x9c, 0x40, 0x01, 0xbb, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0, // tcp
        ];
        f.extend_from_slice(&[0; 6]); // Ethernet padding to 64 bytes, which must be ignored
        f
    }

    #[test]
    fn tcp_over_vlan() {
        let info = extract(&tcp_syn_vlan()).unwrap().unwrap();
        assert_eq!(info.key.segment, Segment::vlan(100));
        assert_eq!(info.key.src_addr(), IpAddr::from([10, 0, 0, 1]));
        assert_eq!(info.key.dst_addr(), IpAddr::from([10, 0, 0, 2]));
        assert_eq!((info.key.src_port, info.key.dst_port), (40000, 443));
        assert_eq!(info.key.protocol, IpProtocol::TCP);
        assert_eq!(info.tcp_flags, TcpFlags::SYN);
        assert_eq!((info.l3_offset, info.l4_offset), (18, 38));
    }

    /// Ethernet + IPv4 + TCP SYN 10.0.0.1:40000 -> 10.0.0.2:443, padded to 64 bytes.
    fn tcp_syn() -> Vec<u8> {
        let mut f = tcp_syn_vlan();
        f.drain(12..16);
        f.extend_from_slice(&[0; 4]);
        f
    }

    /// What the quick extractor makes of a frame agrees with the general one.
    fn quick_agrees(frame: &[u8]) -> Option<FlowInfo> {
        let quick = extract_quick(frame);
        if let Some(q) = quick {
            assert_eq!(extract(frame), Ok(Some(q)), "quick extraction of {frame:02x?}");
        }
        quick
    }

    #[test]
    fn quick_extraction_takes_only_the_common_case() {
        let syn = tcp_syn();
        let info = quick_agrees(&syn).expect("untagged IPv4 TCP is the common case");
        assert_eq!(
            (info.key.src_port, info.key.dst_port, info.tcp_flags),
            (40000, 443, TcpFlags::SYN)
        );
        // Each edit leaves the frame to the general extractor (which may
        // accept it, reject it, or find it is not IP).
        type Edit = (&'static str, fn(&mut Vec<u8>));
        let edits: &[Edit] = &[
            ("VLAN tag", |f| f.splice(12..12, [0x81, 0x00, 0x00, 100]).for_each(drop)),
            ("IPv6 ethertype", |f| f[12..14].copy_from_slice(&[0x86, 0xdd])),
            ("ARP", |f| f[12..14].copy_from_slice(&[0x08, 0x06])),
            ("IP options", |f| f[14] = 0x46),
            ("IHL below 5", |f| f[14] = 0x44),
            ("version 6 in the IPv4 header", |f| f[14] = 0x65),
            ("more fragments", |f| f[20] |= 0x20),
            ("a later fragment", |f| f[21] = 1),
            ("ICMP", |f| f[23] = 1),
            ("SCTP", |f| f[23] = 132),
            ("total length past the frame", |f| f[17] = 200),
            ("total length below the header", |f| f[17] = 19),
            ("TCP cut by the total length", |f| f[17] = 39),
            ("TCP data offset past the segment", |f| f[46] = 0x60),
            ("TCP data offset below 5", |f| f[46] = 0x40),
            ("truncated IP header", |f| f.truncate(30)),
            ("UDP with a short length field", |f| {
                f[23] = 17;
                f[38..40].copy_from_slice(&[0, 7]);
            }),
            ("UDP length past the packet", |f| {
                f[23] = 17;
                f[38..40].copy_from_slice(&[0, 21]);
            }),
        ];
        for (what, edit) in edits {
            let mut f = syn.clone();
            edit(&mut f);
            assert_eq!(quick_agrees(&f), None, "{what}");
        }
        // Edits that stay in the common case.
        let kept: &[Edit] = &[
            ("don't fragment", |f| f[20] |= 0x40),
            ("the reserved flag", |f| f[20] |= 0x80),
            ("UDP", |f| {
                f[23] = 17;
                f[38..40].copy_from_slice(&[0, 20]);
            }),
            ("no padding", |f| f.truncate(54)),
            ("a wrong IP checksum", |f| f[24] ^= 0xff),
        ];
        for (what, edit) in kept {
            let mut f = syn.clone();
            edit(&mut f);
            assert!(quick_agrees(&f).is_some(), "{what}");
        }
    }

    #[test]
    fn quick_extraction_agrees_on_every_mutation() {
        // Every single-byte change of every byte of a TCP and a UDP frame, and
        // every truncation: wherever the quick path answers, it answers as the
        // general one does (the `dissect` fuzz target checks the same on
        // arbitrary input).
        let mut udp = tcp_syn();
        udp[23] = 17;
        udp[38..40].copy_from_slice(&[0, 20]);
        let mut answered = 0;
        for base in [tcp_syn(), udp] {
            for n in 0..=base.len() {
                answered += usize::from(quick_agrees(&base[..n]).is_some());
            }
            for at in 0..base.len() {
                for v in [0x00, 0x01, 0x05, 0x08, 0x11, 0x20, 0x3f, 0x40, 0x45, 0x50, 0x80, 0xff] {
                    let mut f = base.clone();
                    f[at] = v;
                    answered += usize::from(quick_agrees(&f).is_some());
                }
            }
        }
        assert!(
            answered > 500,
            "the mutations mostly stay in the common case ({answered})"
        );
    }

    #[test]
    fn reverse_and_symmetric_hash() {
        let k = extract(&tcp_syn_vlan()).unwrap().unwrap().key;
        let r = k.reversed();
        assert_eq!((r.src_port, r.dst_port), (443, 40000));
        assert_eq!(r.reversed(), k);
        assert_eq!(k.canonical().0, r.canonical().0);
        assert_ne!(k.canonical().1, r.canonical().1);
        assert_eq!(k.symmetric_hash(), r.symmetric_hash());
        let mut other = k;
        other.src_port += 1;
        assert_ne!(k.symmetric_hash(), other.symmetric_hash());
    }

    #[test]
    fn non_ip_is_none_and_truncations_are_errors() {
        let mut arp = tcp_syn_vlan();
        arp[16..18].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(extract(&arp).unwrap(), None);
        let f = tcp_syn_vlan();
        for n in 0..58 {
            assert!(extract(&f[..n]).is_err(), "prefix of {n} bytes accepted");
        }
    }

    #[test]
    fn mobility_header_is_the_protocol() {
        // IPv6 (next header 135) + an 8-byte Mobility Header whose payload proto is 59.
        let mut p = vec![0x60, 0, 0, 0, 0, 8, 135, 64];
        p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        p.extend_from_slice(&[59, 0, 0, 0, 0, 0, 0, 0]);
        let info = extract_ip(&p, Segment::UNTAGGED).unwrap().unwrap();
        assert_eq!(info.key.protocol, IpProtocol::MOBILITY);
        assert_eq!(info.l4_offset, 40);
        // A Destination Options header ending the chain is still "no next header".
        p[6] = 60;
        let info = extract_ip(&p, Segment::UNTAGGED).unwrap().unwrap();
        assert_eq!(info.key.protocol, IpProtocol::IPV6_NONXT);
        assert_eq!(info.l4_offset, 48);
    }

    /// Ethernet + IPv4 10.0.0.1 -> 10.0.0.2 around `l4` with protocol `proto`.
    fn ipv4_frame(proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = tcp_syn();
        f.truncate(34);
        f[23] = proto;
        f[16..18].copy_from_slice(&(20 + l4.len() as u16).to_be_bytes());
        f.extend_from_slice(l4);
        f
    }

    #[test]
    fn sctp_ports_are_read() {
        // Common header 40000 -> 5000, tag 0, then an INIT chunk header.
        let l4 = [0x9c, 0x40, 0x13, 0x88, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 4];
        let info = extract(&ipv4_frame(132, &l4)).unwrap().unwrap();
        assert_eq!(info.key.protocol, IpProtocol::SCTP);
        assert_eq!((info.key.src_port, info.key.dst_port), (40000, 5000));
        // Shorter than the common header: malformed, also as a first fragment.
        let short = ipv4_frame(132, &l4[..11]);
        assert_eq!(extract(&short), Err(Error::new(Layer::Sctp, ErrorKind::Truncated)));
        let mut first = short.clone();
        first[20] |= 0x20;
        assert_eq!(extract(&first), Err(Error::new(Layer::Sctp, ErrorKind::Truncated)));
    }

    #[test]
    fn icmp_keys_keep_type_and_code_and_echo_reverses() {
        let echo = |ty: u8, code: u8| {
            let mut m = vec![ty, code, 0, 0, 0x12, 0x34, 0, 1];
            crate::icmpv4::Packet::new_unchecked(&mut m[..]).fill_checksum();
            extract(&ipv4_frame(1, &m)).unwrap().unwrap().key
        };
        let request = echo(8, 0);
        let reply = echo(0, 0);
        assert_eq!(
            (request.src_port, request.dst_port, request.icmp_type),
            (0x1234, 0x1234, 8)
        );
        assert_eq!((reply.icmp_type, reply.icmp_code), (0, 0));
        assert!(request.is_echo_request() && reply.is_echo_reply());
        // A request and a reply with the same identifier between the same
        // hosts are different flows; the reverse of one is the other.
        assert_ne!(request, reply);
        let mut answer = reply;
        (answer.src, answer.dst) = (reply.dst, reply.src);
        assert_eq!(request.reversed(), answer);
        assert_eq!(request.canonical().0, answer.canonical().0);
        assert_ne!(request.canonical().0, reply.canonical().0);
        // An echo between one address and itself: request and reply still meet.
        let mut own = request;
        own.dst = own.src;
        assert_eq!(own.canonical().0, own.reversed().canonical().0);
        assert_ne!(own.canonical().1, own.reversed().canonical().1);
        // Other messages: type and code in the key and in the destination port.
        let unreachable = echo(3, 4);
        assert_eq!(
            (
                unreachable.src_port,
                unreachable.dst_port,
                unreachable.icmp_type,
                unreachable.icmp_code
            ),
            (0, 0x0304, 3, 4)
        );
        assert_eq!(unreachable.reversed().icmp_type, 3);
        // Protocol 1 over IPv6 is no ICMP: nothing to swap, no echo.
        let mut bogus = request;
        (bogus.src, bogus.dst) = ([0xfd; 16], [0xfe; 16]);
        bogus.icmp_type = 0;
        assert!(!bogus.is_echo_reply() && !bogus.is_ipv4());
        assert_eq!(bogus.reversed().reversed(), bogus);
        assert_eq!(bogus.reversed().icmp_type, 0);
        assert!(is_icmp_error(false, 3) && !is_icmp_error(false, 8) && is_icmp_error(true, 2));
    }

    #[test]
    fn quoted_packets_are_keyed_as_their_flow() {
        // UDP, SCTP and TCP quotes: 20 bytes of IPv4 header and 8 of transport.
        for proto in [17u8, 132, 6] {
            let frame = ipv4_frame(
                proto,
                &[0x9c, 0x40, 0, 53, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 2, 0, 0, 0, 0, 0, 0],
            );
            let mut own = match proto {
                17 => None,
                _ => extract(&frame).ok().flatten().map(|i| i.key),
            };
            let quoted = &frame[14..14 + 28];
            let key = extract_quoted(quoted, Segment::UNTAGGED).unwrap();
            assert_eq!((key.src_port, key.dst_port, key.protocol.0), (40000, 53, proto));
            if let Some(own) = own.take() {
                assert_eq!(own, key, "protocol {proto}");
            }
        }
        // A quoted echo request is keyed with its identifier and type.
        let mut m = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
        crate::icmpv4::Packet::new_unchecked(&mut m[..]).fill_checksum();
        let ping = ipv4_frame(1, &m);
        let key = extract_quoted(&ping[14..], Segment::UNTAGGED).unwrap();
        assert_eq!(key, extract(&ping).unwrap().unwrap().key);
        // An error quoting an error, a later fragment, short quotes: no key.
        let mut err = ping.clone();
        err[34] = 3;
        assert_eq!(extract_quoted(&err[14..], Segment::UNTAGGED), None);
        let mut later = ping.clone();
        later[21] = 1;
        assert_eq!(extract_quoted(&later[14..], Segment::UNTAGGED), None);
        for n in 0..26 {
            assert_eq!(extract_quoted(&ping[14..14 + n], Segment::UNTAGGED), None, "{n} bytes");
        }
        // GRE (no ports): keyed by addresses and protocol.
        let gre = ipv4_frame(47, &[0; 8]);
        let key = extract_quoted(&gre[14..], Segment::UNTAGGED).unwrap();
        assert_eq!(key, extract(&gre).unwrap().unwrap().key);
        // IPv6 with a destination options header before UDP; the quote's
        // payload length claims more than was quoted.
        let mut p = vec![0x60, 0, 0, 0, 0x05, 0xdc, 60, 64];
        p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        p.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
        p.extend_from_slice(&[0x9c, 0x40, 0, 53, 0, 0, 0, 0]);
        let key = extract_quoted(&p, Segment::vlan(5)).unwrap();
        assert_eq!((key.protocol, key.src_port, key.dst_port), (IpProtocol::UDP, 40000, 53));
        assert_eq!(key.segment, Segment::vlan(5));
        assert_eq!(
            extract_quoted(&p[..47], Segment::UNTAGGED),
            None,
            "cut in the options header"
        );
    }

    #[test]
    fn segments_pack_distinctly() {
        assert_ne!(Segment::vlan(5), Segment::vni(5));
        assert_ne!(Segment::qinq(1, 2), Segment::qinq(2, 1));
        assert_eq!(Segment::vlan(4095).vlan_id(), Some(4095));
        assert_eq!(Segment::vni(0xabcdef).vni_id(), Some(0xabcdef));
        assert_eq!(Segment::UNTAGGED.vlan_id(), None);
    }
}

//! ICMPv6 messages (RFC 4443) and neighbour discovery (RFC 4861).
//!
//! The view's buffer is the whole message (the IPv6 payload after any
//! extension headers); the checksum covers it and the IPv6 pseudo-header with
//! next header 58. Error messages (types below 128) quote as much of the
//! offending packet as fits, which [`Packet::quoted_packet`] returns so the
//! datapath can relate the error to its flow. Neighbour-discovery messages are
//! parsed into [`NdiscRepr`], their options walked by [`NdiscOptions`]; an
//! option of length zero or one running past the message is
//! [`ErrorKind::BadOption`] (RFC 4861 section 4.6: such a packet is discarded).
//! MLD and the other informational messages are kept raw as
//! [`Icmpv6Repr::Other`].

use core::net::Ipv6Addr;

use crate::checksum;
use crate::ethernet::EthernetAddress;
use crate::field::read_u16;
use crate::{Error, ErrorKind, Layer, Result};

/// IPv6 next-header value of ICMPv6.
pub const PROTOCOL: u8 = 58;

/// An ICMPv6 message type.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Icmpv6Message(pub u8);

impl Icmpv6Message {
    /// Destination unreachable.
    pub const DST_UNREACHABLE: Icmpv6Message = Icmpv6Message(1);
    /// Packet too big.
    pub const PKT_TOO_BIG: Icmpv6Message = Icmpv6Message(2);
    /// Time exceeded.
    pub const TIME_EXCEEDED: Icmpv6Message = Icmpv6Message(3);
    /// Parameter problem.
    pub const PARAM_PROBLEM: Icmpv6Message = Icmpv6Message(4);
    /// Echo request.
    pub const ECHO_REQUEST: Icmpv6Message = Icmpv6Message(128);
    /// Echo reply.
    pub const ECHO_REPLY: Icmpv6Message = Icmpv6Message(129);
    /// Multicast listener query (MLD).
    pub const MLD_QUERY: Icmpv6Message = Icmpv6Message(130);
    /// Multicast listener report (MLDv1).
    pub const MLD_REPORT: Icmpv6Message = Icmpv6Message(131);
    /// Multicast listener done (MLDv1).
    pub const MLD_DONE: Icmpv6Message = Icmpv6Message(132);
    /// Router solicitation.
    pub const ROUTER_SOLICIT: Icmpv6Message = Icmpv6Message(133);
    /// Router advertisement.
    pub const ROUTER_ADVERT: Icmpv6Message = Icmpv6Message(134);
    /// Neighbor solicitation.
    pub const NEIGHBOR_SOLICIT: Icmpv6Message = Icmpv6Message(135);
    /// Neighbor advertisement.
    pub const NEIGHBOR_ADVERT: Icmpv6Message = Icmpv6Message(136);
    /// Redirect.
    pub const REDIRECT: Icmpv6Message = Icmpv6Message(137);
    /// Version 2 multicast listener report (RFC 9777).
    pub const MLDV2_REPORT: Icmpv6Message = Icmpv6Message(143);

    /// Whether this is an error message (type below 128), which quotes the packet that caused it.
    pub const fn is_error(self) -> bool {
        self.0 < 128
    }

    /// Whether this is one of the five neighbour-discovery messages.
    pub const fn is_ndisc(self) -> bool {
        matches!(self.0, 133..=137)
    }
}

/// Byte ranges of the header fields.
mod field {
    use crate::field::Field;
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: Field = 2..4;
    /// The four type-specific bytes: echo identifier and sequence number, MTU
    /// (packet too big), pointer (parameter problem), router-advertisement hop
    /// limit, flags and lifetime, neighbor-advertisement flags.
    pub const REST: Field = 4..8;
    pub const ECHO_IDENT: Field = 4..6;
    pub const ECHO_SEQNO: Field = 6..8;
    pub const DATA: usize = 8;
}

/// Length of the ICMPv6 header (type, code, checksum, four type-specific bytes).
pub const HEADER_LEN: usize = field::DATA;

/// A read/write view of an ICMPv6 message.
///
/// Contract: once [`Packet::new_checked`] has succeeded, no accessor panics.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wrap a buffer without checking it; accessors may panic on a short buffer.
    pub const fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wrap a buffer, checking it is long enough for the header.
    pub fn new_checked(buffer: T) -> Result<Packet<T>> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Check that the buffer holds the 8-byte header.
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            Err(Error::new(Layer::Icmpv6, ErrorKind::Truncated))
        } else {
            Ok(())
        }
    }

    /// Give back the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The message type.
    pub fn msg_type(&self) -> Icmpv6Message {
        Icmpv6Message(self.buffer.as_ref()[field::TYPE])
    }

    /// The code.
    pub fn msg_code(&self) -> u8 {
        self.buffer.as_ref()[field::CODE]
    }

    /// The checksum field.
    pub fn checksum(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// The four type-specific bytes after the checksum.
    pub fn rest_of_header(&self) -> [u8; 4] {
        let d = &self.buffer.as_ref()[field::REST];
        [d[0], d[1], d[2], d[3]]
    }

    /// The identifier of an echo request/reply.
    pub fn echo_ident(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::ECHO_IDENT)
    }

    /// The sequence number of an echo request/reply.
    pub fn echo_seq_no(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::ECHO_SEQNO)
    }

    /// The MTU of a packet-too-big message, or the pointer of a parameter problem.
    pub fn rest_u32(&self) -> u32 {
        u32::from_be_bytes(self.rest_of_header())
    }

    /// Verify the checksum over the IPv6 pseudo-header of `src`/`dst` and the whole buffer.
    pub fn verify_checksum(&self, src: Ipv6Addr, dst: Ipv6Addr) -> bool {
        let data = self.buffer.as_ref();
        let Ok(len) = u32::try_from(data.len()) else {
            return false;
        };
        let ph = checksum::pseudo_header_v6(src.octets(), dst.octets(), PROTOCOL, len);
        checksum::fold(checksum::combine(&[ph, checksum::sum(data)])) == 0xffff
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Packet<&'a T> {
    /// The bytes after the 8-byte header.
    pub fn data(&self) -> &'a [u8] {
        &self.buffer.as_ref()[field::DATA..]
    }

    /// For an error message, the quoted packet (IPv6 header first); `None` otherwise.
    ///
    /// The bytes are raw and untrusted: parse them with the IPv6 view, which
    /// checks their length, before relating them to a flow.
    pub fn quoted_packet(&self) -> Option<&'a [u8]> {
        self.msg_type().is_error().then(|| self.data())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Set the message type.
    pub fn set_msg_type(&mut self, value: Icmpv6Message) {
        self.buffer.as_mut()[field::TYPE] = value.0
    }

    /// Set the code.
    pub fn set_msg_code(&mut self, value: u8) {
        self.buffer.as_mut()[field::CODE] = value
    }

    /// Set the checksum field.
    pub fn set_checksum(&mut self, value: u16) {
        self.buffer.as_mut()[field::CHECKSUM].copy_from_slice(&value.to_be_bytes())
    }

    /// Set the four type-specific bytes.
    pub fn set_rest_of_header(&mut self, value: [u8; 4]) {
        self.buffer.as_mut()[field::REST].copy_from_slice(&value)
    }

    /// Compute and store the checksum over the pseudo-header of `src`/`dst` and the whole buffer.
    pub fn fill_checksum(&mut self, src: Ipv6Addr, dst: Ipv6Addr) {
        self.set_checksum(0);
        let data = self.buffer.as_ref();
        // A buffer over 4 GiB cannot be an IPv6 payload; the length saturates rather than panics.
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let ph = checksum::pseudo_header_v6(src.octets(), dst.octets(), PROTOCOL, len);
        let value = !checksum::fold(checksum::combine(&[ph, checksum::sum(data)]));
        self.set_checksum(value)
    }

    /// The bytes after the header, mutably.
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::DATA..]
    }
}

/// Neighbour-discovery option types (RFC 4861 section 4.6).
pub mod ndisc_option {
    /// Source link-layer address.
    pub const SOURCE_LL_ADDR: u8 = 1;
    /// Target link-layer address.
    pub const TARGET_LL_ADDR: u8 = 2;
    /// Prefix information.
    pub const PREFIX_INFO: u8 = 3;
    /// Redirected header.
    pub const REDIRECTED_HEADER: u8 = 4;
    /// MTU.
    pub const MTU: u8 = 5;
}

/// The prefix-information option (RFC 4861 section 4.6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrefixInfo {
    /// Number of leading bits of `prefix` that are valid.
    pub prefix_len: u8,
    /// Flags: L (on-link) 0x80, A (autonomous address configuration) 0x40, others reserved.
    pub flags: u8,
    /// Valid lifetime in seconds (0xffffffff = infinity).
    pub valid_lifetime: u32,
    /// Preferred lifetime in seconds (0xffffffff = infinity).
    pub preferred_lifetime: u32,
    /// The prefix.
    pub prefix: Ipv6Addr,
}

impl PrefixInfo {
    /// The L (on-link) flag.
    pub const FLAG_ON_LINK: u8 = 0x80;
    /// The A (autonomous address configuration) flag.
    pub const FLAG_AUTONOMOUS: u8 = 0x40;
}

/// One neighbour-discovery option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NdiscOption<'a> {
    /// Source link-layer address (six bytes on Ethernet, plus padding on other links).
    SourceLinkLayerAddr(&'a [u8]),
    /// Target link-layer address.
    TargetLinkLayerAddr(&'a [u8]),
    /// Prefix information.
    PrefixInformation(PrefixInfo),
    /// Redirected header: as much of the redirected packet as fits (after six reserved bytes).
    RedirectedHeader(&'a [u8]),
    /// Link MTU.
    Mtu(u32),
    /// Any other option: its type and the bytes after the length byte.
    Unknown {
        /// Option type.
        kind: u8,
        /// Option data (type and length bytes excluded).
        data: &'a [u8],
    },
}

impl NdiscOption<'_> {
    /// The Ethernet address of a source/target link-layer address option of
    /// length 1 (eight bytes, as on Ethernet); `None` for anything else.
    pub fn link_layer_addr(&self) -> Option<EthernetAddress> {
        match *self {
            NdiscOption::SourceLinkLayerAddr(d) | NdiscOption::TargetLinkLayerAddr(d) if d.len() == 6 => {
                Some(EthernetAddress::from_bytes(d))
            }
            _ => None,
        }
    }
}

/// Iterator over neighbour-discovery options.
///
/// Yields `Err(BadOption)` once for a lone trailing byte, a length of zero,
/// an option running past the end, or a known option of the wrong size, then stops.
#[derive(Debug, Clone)]
pub struct NdiscOptions<'a> {
    rest: &'a [u8],
}

impl<'a> NdiscOptions<'a> {
    /// Iterate over raw option bytes.
    pub const fn new(options: &'a [u8]) -> NdiscOptions<'a> {
        NdiscOptions { rest: options }
    }

    fn bad(&mut self) -> Option<Result<NdiscOption<'a>>> {
        self.rest = &[];
        Some(Err(Error::new(Layer::Icmpv6, ErrorKind::BadOption)))
    }
}

impl<'a> Iterator for NdiscOptions<'a> {
    type Item = Result<NdiscOption<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        let (kind, len) = match self.rest {
            [] => return None,
            [_] => return self.bad(),
            [kind, len, ..] => (*kind, usize::from(*len) * 8),
        };
        if len == 0 || len > self.rest.len() {
            return self.bad();
        }
        let data = &self.rest[2..len];
        self.rest = &self.rest[len..];
        let opt = match kind {
            ndisc_option::SOURCE_LL_ADDR => NdiscOption::SourceLinkLayerAddr(data),
            ndisc_option::TARGET_LL_ADDR => NdiscOption::TargetLinkLayerAddr(data),
            ndisc_option::PREFIX_INFO => {
                let Ok(d) = <&[u8; 30]>::try_from(data) else {
                    return self.bad();
                };
                let mut prefix = [0u8; 16];
                prefix.copy_from_slice(&d[14..30]);
                NdiscOption::PrefixInformation(PrefixInfo {
                    prefix_len: d[0],
                    flags: d[1],
                    valid_lifetime: u32::from_be_bytes([d[2], d[3], d[4], d[5]]),
                    preferred_lifetime: u32::from_be_bytes([d[6], d[7], d[8], d[9]]),
                    prefix: Ipv6Addr::from(prefix),
                })
            }
            // data holds at least 6 bytes: the option is a multiple of 8 bytes long.
            ndisc_option::REDIRECTED_HEADER => NdiscOption::RedirectedHeader(&data[6..]),
            ndisc_option::MTU => {
                let Ok(d) = <&[u8; 6]>::try_from(data) else {
                    return self.bad();
                };
                NdiscOption::Mtu(u32::from_be_bytes([d[2], d[3], d[4], d[5]]))
            }
            kind => NdiscOption::Unknown { kind, data },
        };
        Some(Ok(opt))
    }
}

impl core::iter::FusedIterator for NdiscOptions<'_> {}

/// Router-advertisement flags (RFC 4861 M and O, RFC 4191 preference, RFC 5175 others), kept raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RouterFlags(pub u8);

impl RouterFlags {
    /// M: addresses are available via DHCPv6.
    pub const MANAGED: u8 = 0x80;
    /// O: other configuration is available via DHCPv6.
    pub const OTHER: u8 = 0x40;

    /// Whether M is set.
    pub const fn managed(self) -> bool {
        self.0 & Self::MANAGED != 0
    }

    /// Whether O is set.
    pub const fn other(self) -> bool {
        self.0 & Self::OTHER != 0
    }
}

/// Neighbor-advertisement flags: R, S and O (the other 29 bits are reserved: see [`NdiscRepr::NeighborAdvert`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NeighborFlags {
    /// R: the sender is a router.
    pub router: bool,
    /// S: sent in response to a solicitation.
    pub solicited: bool,
    /// O: override an existing cache entry.
    pub override_: bool,
}

impl NeighborFlags {
    const ROUTER: u8 = 0x80;
    const SOLICITED: u8 = 0x40;
    const OVERRIDE: u8 = 0x20;
    /// The bits of the flags word after R, S and O.
    const RESERVED_MASK: u32 = 0x1fff_ffff;

    const fn from_byte(b: u8) -> NeighborFlags {
        NeighborFlags {
            router: b & Self::ROUTER != 0,
            solicited: b & Self::SOLICITED != 0,
            override_: b & Self::OVERRIDE != 0,
        }
    }

    const fn to_byte(self) -> u8 {
        (if self.router { Self::ROUTER } else { 0 })
            | (if self.solicited { Self::SOLICITED } else { 0 })
            | (if self.override_ { Self::OVERRIDE } else { 0 })
    }
}

/// A parsed neighbour-discovery message. Options are kept raw (walk them with
/// [`NdiscRepr::option_iter`]); `parse` has already checked they are well formed.
///
/// Reserved fields carry no meaning (RFC 4861: receivers ignore them) but are
/// kept in `reserved`, so that parse→emit is byte-exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NdiscRepr<'a> {
    /// Router solicitation.
    RouterSolicit {
        /// The reserved header bits, kept so the message re-emits exactly (RFC 4861: ignored on receipt).
        reserved: u32,
        /// Options.
        options: &'a [u8],
    },
    /// Router advertisement.
    RouterAdvert {
        /// Current hop limit to use (0 = unspecified).
        hop_limit: u8,
        /// Flags.
        flags: RouterFlags,
        /// Router lifetime in seconds (0 = not a default router).
        router_lifetime: u16,
        /// Reachable time in milliseconds.
        reachable_time: u32,
        /// Retransmission timer in milliseconds.
        retrans_time: u32,
        /// Options.
        options: &'a [u8],
    },
    /// Neighbor solicitation.
    NeighborSolicit {
        /// The reserved header bits, kept so the message re-emits exactly (RFC 4861: ignored on receipt).
        reserved: u32,
        /// The address being resolved.
        target_addr: Ipv6Addr,
        /// Options.
        options: &'a [u8],
    },
    /// Neighbor advertisement.
    NeighborAdvert {
        /// R/S/O flags.
        flags: NeighborFlags,
        /// The 29 reserved bits after the flags (the flag bits themselves are zero here).
        reserved: u32,
        /// The address advertised.
        target_addr: Ipv6Addr,
        /// Options.
        options: &'a [u8],
    },
    /// Redirect.
    Redirect {
        /// The reserved header bits, kept so the message re-emits exactly (RFC 4861: ignored on receipt).
        reserved: u32,
        /// The better first hop.
        target_addr: Ipv6Addr,
        /// The destination being redirected.
        dest_addr: Ipv6Addr,
        /// Options.
        options: &'a [u8],
    },
}

impl<'a> NdiscRepr<'a> {
    /// The message type.
    pub const fn msg_type(&self) -> Icmpv6Message {
        match self {
            NdiscRepr::RouterSolicit { .. } => Icmpv6Message::ROUTER_SOLICIT,
            NdiscRepr::RouterAdvert { .. } => Icmpv6Message::ROUTER_ADVERT,
            NdiscRepr::NeighborSolicit { .. } => Icmpv6Message::NEIGHBOR_SOLICIT,
            NdiscRepr::NeighborAdvert { .. } => Icmpv6Message::NEIGHBOR_ADVERT,
            NdiscRepr::Redirect { .. } => Icmpv6Message::REDIRECT,
        }
    }

    /// The raw option bytes.
    pub const fn options(&self) -> &'a [u8] {
        match *self {
            NdiscRepr::RouterSolicit { options, .. }
            | NdiscRepr::RouterAdvert { options, .. }
            | NdiscRepr::NeighborSolicit { options, .. }
            | NdiscRepr::NeighborAdvert { options, .. }
            | NdiscRepr::Redirect { options, .. } => options,
        }
    }

    /// An iterator over the options.
    pub const fn option_iter(&self) -> NdiscOptions<'a> {
        NdiscOptions::new(self.options())
    }

    /// Length of the fixed part after the 8-byte ICMPv6 header.
    const fn fixed_len(msg_type: Icmpv6Message) -> usize {
        match msg_type.0 {
            134 => 8,
            135 | 136 => 16,
            137 => 32,
            _ => 0,
        }
    }

    fn parse(msg_type: Icmpv6Message, rest: [u8; 4], data: &'a [u8]) -> Result<NdiscRepr<'a>> {
        let fixed = Self::fixed_len(msg_type);
        if data.len() < fixed {
            return Err(Error::new(Layer::Icmpv6, ErrorKind::Truncated));
        }
        let (body, options) = data.split_at(fixed);
        for opt in NdiscOptions::new(options) {
            opt?;
        }
        // `body` is exactly `fixed` bytes long, so these slices are in range.
        let addr = |at: usize| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&body[at..at + 16]);
            Ipv6Addr::from(a)
        };
        let reserved = u32::from_be_bytes(rest);
        Ok(match msg_type {
            Icmpv6Message::ROUTER_ADVERT => NdiscRepr::RouterAdvert {
                hop_limit: rest[0],
                flags: RouterFlags(rest[1]),
                router_lifetime: u16::from_be_bytes([rest[2], rest[3]]),
                reachable_time: u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                retrans_time: u32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                options,
            },
            Icmpv6Message::NEIGHBOR_SOLICIT => NdiscRepr::NeighborSolicit {
                reserved,
                target_addr: addr(0),
                options,
            },
            Icmpv6Message::NEIGHBOR_ADVERT => NdiscRepr::NeighborAdvert {
                flags: NeighborFlags::from_byte(rest[0]),
                reserved: reserved & NeighborFlags::RESERVED_MASK,
                target_addr: addr(0),
                options,
            },
            Icmpv6Message::REDIRECT => NdiscRepr::Redirect {
                reserved,
                target_addr: addr(0),
                dest_addr: addr(16),
                options,
            },
            _ => NdiscRepr::RouterSolicit { reserved, options },
        })
    }

    /// The four type-specific header bytes.
    fn rest(&self) -> [u8; 4] {
        match *self {
            NdiscRepr::RouterAdvert {
                hop_limit,
                flags,
                router_lifetime,
                ..
            } => {
                let l = router_lifetime.to_be_bytes();
                [hop_limit, flags.0, l[0], l[1]]
            }
            NdiscRepr::NeighborAdvert { flags, reserved, .. } => {
                (u32::from(flags.to_byte()) << 24 | reserved & NeighborFlags::RESERVED_MASK).to_be_bytes()
            }
            NdiscRepr::RouterSolicit { reserved, .. }
            | NdiscRepr::NeighborSolicit { reserved, .. }
            | NdiscRepr::Redirect { reserved, .. } => reserved.to_be_bytes(),
        }
    }

    /// Write the fixed part and the options into `data` (the bytes after the ICMPv6 header).
    fn emit_data(&self, data: &mut [u8]) {
        let (fixed, options) = data.split_at_mut(Self::fixed_len(self.msg_type()));
        match *self {
            NdiscRepr::RouterAdvert {
                reachable_time,
                retrans_time,
                ..
            } => {
                fixed[..4].copy_from_slice(&reachable_time.to_be_bytes());
                fixed[4..].copy_from_slice(&retrans_time.to_be_bytes());
            }
            NdiscRepr::NeighborSolicit { target_addr, .. } | NdiscRepr::NeighborAdvert { target_addr, .. } => {
                fixed.copy_from_slice(&target_addr.octets())
            }
            NdiscRepr::Redirect {
                target_addr, dest_addr, ..
            } => {
                fixed[..16].copy_from_slice(&target_addr.octets());
                fixed[16..].copy_from_slice(&dest_addr.octets());
            }
            NdiscRepr::RouterSolicit { .. } => {}
        }
        options.copy_from_slice(self.options());
    }
}

/// A parsed ICMPv6 message.
///
/// Every byte is kept, so parse→emit is byte-exact: neighbour discovery keeps
/// its reserved bits in `reserved`, and an error message whose unused bytes
/// are not zero (or a packet-too-big with a non-zero code) parses as
/// [`Icmpv6Repr::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Icmpv6Repr<'a> {
    /// Echo request.
    EchoRequest {
        /// Identifier.
        ident: u16,
        /// Sequence number.
        seq_no: u16,
        /// Echo data.
        data: &'a [u8],
    },
    /// Echo reply.
    EchoReply {
        /// Identifier.
        ident: u16,
        /// Sequence number.
        seq_no: u16,
        /// Echo data.
        data: &'a [u8],
    },
    /// Destination unreachable.
    DstUnreachable {
        /// Reason (e.g. 1 = administratively prohibited, 4 = port unreachable).
        code: u8,
        /// The quoted packet.
        header: &'a [u8],
    },
    /// Packet too big.
    PktTooBig {
        /// The next-hop link's MTU.
        mtu: u32,
        /// The quoted packet.
        header: &'a [u8],
    },
    /// Time exceeded.
    TimeExceeded {
        /// 0 = hop limit exceeded in transit, 1 = fragment reassembly time exceeded.
        code: u8,
        /// The quoted packet.
        header: &'a [u8],
    },
    /// Parameter problem.
    ParamProblem {
        /// Code.
        code: u8,
        /// Offset of the offending byte in the quoted packet.
        pointer: u32,
        /// The quoted packet.
        header: &'a [u8],
    },
    /// Neighbour discovery (code 0 only; hosts discard others, which parse as `Other`).
    Ndisc(NdiscRepr<'a>),
    /// Any other message (MLD included), kept raw.
    Other {
        /// Message type.
        msg_type: Icmpv6Message,
        /// Code.
        code: u8,
        /// The four type-specific bytes.
        rest: [u8; 4],
        /// The bytes after the header.
        data: &'a [u8],
    },
}

impl<'a> Icmpv6Repr<'a> {
    /// Parse a message. Neighbour discovery too short for its fixed part is
    /// [`ErrorKind::Truncated`]; malformed ND options are [`ErrorKind::BadOption`].
    ///
    /// The checksum is not verified here: the caller decides (see [`Packet::verify_checksum`]).
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&'a T>) -> Result<Icmpv6Repr<'a>> {
        packet.check_len()?;
        let code = packet.msg_code();
        let data = packet.data();
        let rest = packet.rest_of_header();
        Ok(match packet.msg_type() {
            Icmpv6Message::ECHO_REQUEST if code == 0 => Icmpv6Repr::EchoRequest {
                ident: packet.echo_ident(),
                seq_no: packet.echo_seq_no(),
                data,
            },
            Icmpv6Message::ECHO_REPLY if code == 0 => Icmpv6Repr::EchoReply {
                ident: packet.echo_ident(),
                seq_no: packet.echo_seq_no(),
                data,
            },
            // Error messages whose unused bytes are not zero (or, for packet-too-big, whose
            // code is not) stay raw in `Other`, which keeps every byte; `quoted_packet` still works.
            Icmpv6Message::DST_UNREACHABLE if rest == [0; 4] => Icmpv6Repr::DstUnreachable { code, header: data },
            Icmpv6Message::PKT_TOO_BIG if code == 0 => Icmpv6Repr::PktTooBig {
                mtu: packet.rest_u32(),
                header: data,
            },
            Icmpv6Message::TIME_EXCEEDED if rest == [0; 4] => Icmpv6Repr::TimeExceeded { code, header: data },
            Icmpv6Message::PARAM_PROBLEM => Icmpv6Repr::ParamProblem {
                code,
                pointer: packet.rest_u32(),
                header: data,
            },
            t if t.is_ndisc() && code == 0 => Icmpv6Repr::Ndisc(NdiscRepr::parse(t, rest, data)?),
            msg_type => Icmpv6Repr::Other {
                msg_type,
                code,
                rest,
                data,
            },
        })
    }

    /// The message type.
    pub const fn msg_type(&self) -> Icmpv6Message {
        match self {
            Icmpv6Repr::EchoRequest { .. } => Icmpv6Message::ECHO_REQUEST,
            Icmpv6Repr::EchoReply { .. } => Icmpv6Message::ECHO_REPLY,
            Icmpv6Repr::DstUnreachable { .. } => Icmpv6Message::DST_UNREACHABLE,
            Icmpv6Repr::PktTooBig { .. } => Icmpv6Message::PKT_TOO_BIG,
            Icmpv6Repr::TimeExceeded { .. } => Icmpv6Message::TIME_EXCEEDED,
            Icmpv6Repr::ParamProblem { .. } => Icmpv6Message::PARAM_PROBLEM,
            Icmpv6Repr::Ndisc(nd) => nd.msg_type(),
            Icmpv6Repr::Other { msg_type, .. } => *msg_type,
        }
    }

    /// For an error message, the quoted packet; `None` otherwise.
    pub const fn quoted_packet(&self) -> Option<&'a [u8]> {
        match *self {
            Icmpv6Repr::DstUnreachable { header, .. }
            | Icmpv6Repr::PktTooBig { header, .. }
            | Icmpv6Repr::TimeExceeded { header, .. }
            | Icmpv6Repr::ParamProblem { header, .. } => Some(header),
            Icmpv6Repr::Other { msg_type, data, .. } if msg_type.is_error() => Some(data),
            _ => None,
        }
    }

    /// Header plus body length.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
            + match *self {
                Icmpv6Repr::EchoRequest { data, .. }
                | Icmpv6Repr::EchoReply { data, .. }
                | Icmpv6Repr::Other { data, .. } => data.len(),
                Icmpv6Repr::DstUnreachable { header, .. }
                | Icmpv6Repr::PktTooBig { header, .. }
                | Icmpv6Repr::TimeExceeded { header, .. }
                | Icmpv6Repr::ParamProblem { header, .. } => header.len(),
                Icmpv6Repr::Ndisc(nd) => NdiscRepr::fixed_len(nd.msg_type()) + nd.options().len(),
            }
    }

    /// Write the message, with the checksum over the pseudo-header of `src`/`dst`,
    /// into a buffer exactly [`Self::buffer_len`] long.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>, src: Ipv6Addr, dst: Ipv6Addr) {
        debug_assert_eq!(packet.buffer.as_ref().len(), self.buffer_len());
        packet.set_msg_type(self.msg_type());
        let (code, rest, body) = match *self {
            Icmpv6Repr::EchoRequest { ident, seq_no, data } | Icmpv6Repr::EchoReply { ident, seq_no, data } => {
                let (i, s) = (ident.to_be_bytes(), seq_no.to_be_bytes());
                (0, [i[0], i[1], s[0], s[1]], data)
            }
            Icmpv6Repr::DstUnreachable { code, header } | Icmpv6Repr::TimeExceeded { code, header } => {
                (code, [0; 4], header)
            }
            Icmpv6Repr::PktTooBig { mtu, header } => (0, mtu.to_be_bytes(), header),
            Icmpv6Repr::ParamProblem { code, pointer, header } => (code, pointer.to_be_bytes(), header),
            Icmpv6Repr::Other { code, rest, data, .. } => (code, rest, data),
            Icmpv6Repr::Ndisc(nd) => {
                packet.set_msg_code(0);
                packet.set_rest_of_header(nd.rest());
                nd.emit_data(packet.data_mut());
                packet.fill_checksum(src, dst);
                return;
            }
        };
        packet.set_msg_code(code);
        packet.set_rest_of_header(rest);
        packet.data_mut().copy_from_slice(body);
        packet.fill_checksum(src, dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    /// Echo request 2620:0:e00:400e:d1d:db37:beb:5aac -> 2001:4860:8006::63, id 1 seq 3
    /// (zeek's icmp/icmp6-ping.pcap, frame 1).
    const ECHO: [u8; 40] = [
        0x80, 0x00, 0x29, 0x10, 0x00, 0x01, 0x00, 0x03, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, //
        0x69, 0x6a, 0x6b, 0x6c, 0x6d, 0x6e, 0x6f, 0x70, 0x71, 0x72, 0x73, 0x74, 0x75, 0x76, 0x77, 0x61, //
        0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69,
    ];
    const ECHO_SRC: &str = "2620:0:e00:400e:d1d:db37:beb:5aac";
    const ECHO_DST: &str = "2001:4860:8006::63";

    /// zeek's icmp/icmp6-nd-options.pcap: frame 1, NS from :: to ff02::1:fff5:0 (DAD).
    const NS: [u8; 24] = [
        0x87, 0x00, 0x67, 0x3c, 0x00, 0x00, 0x00, 0x00, 0xfe, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
        0xc0, 0x00, 0x54, 0xff, 0xfe, 0xf5, 0x00, 0x00,
    ];
    /// Frame 2: NA (R, O) fe80::c000:54ff:fef5:0 -> ff02::1, target link-layer address.
    const NA: [u8; 32] = [
        0x88, 0x00, 0x9a, 0xbb, 0xa0, 0x00, 0x00, 0x00, 0xfe, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
        0xc0, 0x00, 0x54, 0xff, 0xfe, 0xf5, 0x00, 0x00, 0x02, 0x01, 0xc2, 0x00, 0x54, 0xf5, 0x00, 0x00,
    ];
    /// Frame 3: RA fe80::c000:54ff:fef5:0 -> ff02::1 with source link-layer address, MTU, prefix.
    const RA: [u8; 64] = [
        0x86, 0x00, 0xc4, 0xfe, 0x40, 0x00, 0x07, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
        0x01, 0x01, 0xc2, 0x00, 0x54, 0xf5, 0x00, 0x00, 0x05, 0x01, 0x00, 0x00, 0x00, 0x00, 0x05, 0xdc, //
        0x03, 0x04, 0x40, 0xc0, 0x00, 0x27, 0x8d, 0x00, 0x00, 0x09, 0x3a, 0x80, 0x00, 0x00, 0x00, 0x00, //
        0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];
    const ND_ROUTER: &str = "fe80::c000:54ff:fef5:0";

    /// Redirect fe80::dead -> fe80::beef, target fe80::cafe, destination fe80::babe,
    /// redirected-header option (zeek's icmp/icmp6-redirect-hdr-opt.pcap).
    const REDIRECT: [u8; 104] = [
        0x89, 0x00, 0xe3, 0xc6, 0x00, 0x00, 0x00, 0x00, 0xfe, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xca, 0xfe, 0xfe, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xba, 0xbe, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
        0x60, 0x00, 0x00, 0x00, 0x00, 0x10, 0x11, 0x40, 0xfe, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xaa, 0xaa, 0xfe, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xbb, 0xbb, 0x75, 0x30, 0x32, 0xc8, 0x00, 0x10, 0x93, 0x0c, //
        0x58, 0x58, 0x58, 0x58, 0x58, 0x58, 0x58, 0x58,
    ];

    /// Packet too big (MTU 1280) fe80::dead -> fe80::beef quoting a UDP packet
    /// (zeek's icmp/icmp6-toobig.pcap).
    const TOO_BIG: [u8; 60] = [
        0x02, 0x00, 0xec, 0xba, 0x00, 0x00, 0x05, 0x00, 0x60, 0x00, 0x00, 0x00, 0x00, 0x0c, 0x11, 0x40, //
        0xfe, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xbe, 0xef, //
        0xfe, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xde, 0xad, //
        0x75, 0x30, 0x32, 0xc8, 0x00, 0x0c, 0x0c, 0x8e, 0x58, 0x58, 0x58, 0x58,
    ];

    /// (message, source, destination) of every real capture above.
    fn captures() -> [(&'static [u8], Ipv6Addr, Ipv6Addr); 6] {
        [
            (&ECHO, ip(ECHO_SRC), ip(ECHO_DST)),
            (&NS, ip("::"), ip("ff02::1:fff5:0")),
            (&NA, ip(ND_ROUTER), ip("ff02::1")),
            (&RA, ip(ND_ROUTER), ip("ff02::1")),
            (&REDIRECT, ip("fe80::dead"), ip("fe80::beef")),
            (&TOO_BIG, ip("fe80::dead"), ip("fe80::beef")),
        ]
    }

    #[test]
    fn real_messages_verify_and_round_trip() {
        for (bytes, src, dst) in captures() {
            let p = Packet::new_checked(bytes).unwrap();
            assert!(p.verify_checksum(src, dst), "{:?}", p.msg_type());
            // The pseudo-header counts: another destination fails (swapping src/dst would not).
            assert!(!p.verify_checksum(src, ip("2001:db8::99")));
            let repr = Icmpv6Repr::parse(&p).unwrap();
            let mut out = vec![0xa5; repr.buffer_len()];
            repr.emit(&mut Packet::new_unchecked(&mut out[..]), src, dst);
            assert_eq!(out, bytes, "{repr:?}");
        }
    }

    #[test]
    fn corrupted_byte_fails_verification() {
        let (src, dst) = (ip(ND_ROUTER), ip("ff02::1"));
        for i in 0..RA.len() {
            let mut b = RA;
            b[i] ^= 0x02;
            assert!(!Packet::new_checked(&b[..]).unwrap().verify_checksum(src, dst), "{i}");
        }
    }

    #[test]
    fn echo_fields() {
        let p = Packet::new_checked(&ECHO[..]).unwrap();
        assert_eq!(
            Icmpv6Repr::parse(&p).unwrap(),
            Icmpv6Repr::EchoRequest {
                ident: 1,
                seq_no: 3,
                data: &ECHO[8..]
            }
        );
        assert_eq!(p.quoted_packet(), None);
    }

    #[test]
    fn neighbor_solicit_and_advert() {
        let p = Packet::new_checked(&NS[..]).unwrap();
        let Icmpv6Repr::Ndisc(ns) = Icmpv6Repr::parse(&p).unwrap() else {
            panic!()
        };
        assert_eq!(
            ns,
            NdiscRepr::NeighborSolicit {
                reserved: 0,
                target_addr: ip(ND_ROUTER),
                options: &[]
            }
        );

        let p = Packet::new_checked(&NA[..]).unwrap();
        let Icmpv6Repr::Ndisc(na) = Icmpv6Repr::parse(&p).unwrap() else {
            panic!()
        };
        let NdiscRepr::NeighborAdvert { flags, target_addr, .. } = na else {
            panic!("{na:?}")
        };
        assert_eq!(
            flags,
            NeighborFlags {
                router: true,
                solicited: false,
                override_: true
            }
        );
        assert_eq!(target_addr, ip(ND_ROUTER));
        let opts: Vec<_> = na.option_iter().collect::<Result<_>>().unwrap();
        assert_eq!(opts, [NdiscOption::TargetLinkLayerAddr(&[0xc2, 0, 0x54, 0xf5, 0, 0])]);
        assert_eq!(opts[0].link_layer_addr().unwrap().to_string(), "c2:00:54:f5:00:00");
    }

    #[test]
    fn router_advert_options() {
        let p = Packet::new_checked(&RA[..]).unwrap();
        let Icmpv6Repr::Ndisc(ra) = Icmpv6Repr::parse(&p).unwrap() else {
            panic!()
        };
        let NdiscRepr::RouterAdvert {
            hop_limit,
            flags,
            router_lifetime,
            reachable_time,
            retrans_time,
            ..
        } = ra
        else {
            panic!("{ra:?}")
        };
        assert_eq!((hop_limit, flags, router_lifetime), (64, RouterFlags(0), 1800));
        assert_eq!((reachable_time, retrans_time), (0, 0));
        let opts: Vec<_> = ra.option_iter().collect::<Result<_>>().unwrap();
        assert_eq!(
            opts,
            [
                NdiscOption::SourceLinkLayerAddr(&[0xc2, 0, 0x54, 0xf5, 0, 0]),
                NdiscOption::Mtu(1500),
                NdiscOption::PrefixInformation(PrefixInfo {
                    prefix_len: 64,
                    flags: PrefixInfo::FLAG_ON_LINK | PrefixInfo::FLAG_AUTONOMOUS,
                    valid_lifetime: 2_592_000,
                    preferred_lifetime: 604_800,
                    prefix: ip("2001:db8:0:1::"),
                }),
            ]
        );
    }

    #[test]
    fn redirect_and_redirected_header() {
        let p = Packet::new_checked(&REDIRECT[..]).unwrap();
        let Icmpv6Repr::Ndisc(rd) = Icmpv6Repr::parse(&p).unwrap() else {
            panic!()
        };
        let NdiscRepr::Redirect {
            target_addr, dest_addr, ..
        } = rd
        else {
            panic!("{rd:?}")
        };
        assert_eq!((target_addr, dest_addr), (ip("fe80::cafe"), ip("fe80::babe")));
        let opts: Vec<_> = rd.option_iter().collect::<Result<_>>().unwrap();
        assert_eq!(opts, [NdiscOption::RedirectedHeader(&REDIRECT[48..])]);
        assert_eq!(p.quoted_packet(), None);
    }

    #[test]
    fn packet_too_big_quotes_the_packet() {
        let p = Packet::new_checked(&TOO_BIG[..]).unwrap();
        let repr = Icmpv6Repr::parse(&p).unwrap();
        assert_eq!(
            repr,
            Icmpv6Repr::PktTooBig {
                mtu: 1280,
                header: &TOO_BIG[8..]
            }
        );
        assert_eq!(p.quoted_packet(), Some(&TOO_BIG[8..]));
        assert_eq!(repr.quoted_packet(), Some(&TOO_BIG[8..]));
        // The quoted IPv6 header starts with version 6 and names UDP.
        assert_eq!((TOO_BIG[8] >> 4, TOO_BIG[8 + 6]), (6, 17));
    }

    #[test]
    fn every_error_variant_round_trips() {
        let quoted = &TOO_BIG[8..];
        let (src, dst) = (ip("2001:db8::1"), ip("2001:db8::2"));
        let reprs = [
            Icmpv6Repr::EchoReply {
                ident: 9,
                seq_no: 10,
                data: b"xyz",
            },
            Icmpv6Repr::DstUnreachable {
                code: 4,
                header: quoted,
            },
            Icmpv6Repr::TimeExceeded {
                code: 0,
                header: quoted,
            },
            Icmpv6Repr::ParamProblem {
                code: 1,
                pointer: 40,
                header: quoted,
            },
            Icmpv6Repr::Other {
                msg_type: Icmpv6Message::MLD_QUERY,
                code: 0,
                rest: [0, 10, 0, 0],
                data: &[0; 16],
            },
            Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit {
                reserved: 0,
                options: &NA[24..],
            }),
            Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit {
                reserved: 0xdead_beef,
                options: &[],
            }),
        ];
        for repr in reprs {
            let mut out = vec![0u8; repr.buffer_len()];
            repr.emit(&mut Packet::new_unchecked(&mut out[..]), src, dst);
            let p = Packet::new_checked(&out[..]).unwrap();
            assert!(p.verify_checksum(src, dst));
            assert_eq!(Icmpv6Repr::parse(&p).unwrap(), repr);
            assert_eq!(repr.quoted_packet().is_some(), repr.msg_type().is_error());
        }
    }

    #[test]
    fn malformed_nd_options() {
        let bad: &[&[u8]] = &[
            &[1],                                              // lone type byte
            &[1, 0, 0, 0, 0, 0, 0, 0],                         // length zero (RFC 4861: discard)
            &[1, 2, 0, 0, 0, 0, 0, 0],                         // runs past the end
            &[5, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], // MTU of the wrong size
            &[3, 1, 0, 0, 0, 0, 0, 0],                         // prefix information of the wrong size
            &[1, 1, 2, 3, 4, 5, 6, 7, 9],                      // good option then a lone byte
        ];
        for opts in bad {
            let results: Vec<_> = NdiscOptions::new(opts).collect();
            assert_eq!(
                *results.last().unwrap(),
                Err(Error::new(Layer::Icmpv6, ErrorKind::BadOption)),
                "{opts:?}"
            );
            assert!(results[..results.len() - 1].iter().all(|r| r.is_ok()));
            let mut msg = vec![133, 0, 0, 0, 0, 0, 0, 0];
            msg.extend_from_slice(opts);
            let p = Packet::new_checked(&msg[..]).unwrap();
            assert_eq!(
                Icmpv6Repr::parse(&p).unwrap_err(),
                Error::new(Layer::Icmpv6, ErrorKind::BadOption)
            );
        }
    }

    #[test]
    fn truncation() {
        for (bytes, _, _) in captures() {
            for n in 0..HEADER_LEN {
                assert_eq!(
                    Packet::new_checked(&bytes[..n]).unwrap_err(),
                    Error::new(Layer::Icmpv6, ErrorKind::Truncated)
                );
            }
            // Cut anywhere inside, every message either parses or fails cleanly;
            // ND messages shorter than their fixed part are Truncated.
            for n in HEADER_LEN..bytes.len() {
                let p = Packet::new_checked(&bytes[..n]).unwrap();
                let r = Icmpv6Repr::parse(&p);
                let t = Icmpv6Message(bytes[0]);
                if t.is_ndisc() && n < HEADER_LEN + NdiscRepr::fixed_len(t) {
                    assert_eq!(r.unwrap_err(), Error::new(Layer::Icmpv6, ErrorKind::Truncated));
                }
            }
        }
    }

    #[test]
    fn nd_with_nonzero_code_is_other() {
        let mut b = NS;
        b[1] = 1;
        let p = Packet::new_checked(&b[..]).unwrap();
        assert!(matches!(
            Icmpv6Repr::parse(&p).unwrap(),
            Icmpv6Repr::Other { code: 1, .. }
        ));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            ty in proptest::sample::select(vec![1u8, 2, 3, 4, 128, 129, 130, 133, 134, 135, 136, 137, 200]),
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..96),
        ) {
            let mut bytes = bytes;
            if let Some(b) = bytes.first_mut() {
                *b = ty;
            }
            if bytes.len() > 1 && ty >= 133 {
                bytes[1] = 0;
            }
            let _ = NdiscOptions::new(&bytes).count();
            if let Ok(p) = Packet::new_checked(&bytes[..]) {
                let _ = (p.msg_type(), p.msg_code(), p.checksum(), p.rest_of_header(), p.data());
                let _ = (p.echo_ident(), p.echo_seq_no(), p.rest_u32(), p.quoted_packet());
                let _ = p.verify_checksum(Ipv6Addr::LOCALHOST, Ipv6Addr::UNSPECIFIED);
                if let Ok(repr) = Icmpv6Repr::parse(&p) {
                    let _ = repr.quoted_packet();
                    if let Icmpv6Repr::Ndisc(nd) = repr {
                        let _ = nd.option_iter().count();
                    }
                    proptest::prop_assert_eq!(repr.buffer_len(), bytes.len());
                }
            }
        }
    }
}

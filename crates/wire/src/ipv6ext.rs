//! IPv6 extension headers (RFC 8200 section 4, RFC 4302, RFC 6564) and a
//! bounded walker over a chain of them.
//!
//! One view, [`Packet`], serves every extension header; it is told which kind
//! it looks at because the length field differs: Hop-by-Hop, Routing,
//! Destination Options and the RFC 6564-format headers (Mobility, HIP, Shim6)
//! count 8-octet units beyond the first 8; the Fragment header is always 8
//! bytes; AH counts 4-octet units minus 2 (RFC 4302). The owned form,
//! [`ExtHeaderRepr`], is an enum with one variant per layout.
//!
//! [`walk`] follows the chain from the fixed header's Next Header to the
//! upper-layer protocol without allocating, following at most
//! [`MAX_EXT_HEADERS`] headers. It ends at the first non-extension protocol
//! (ESP included: its payload is encrypted), at No Next Header, or at a
//! non-first fragment, whose payload continues a datagram rather than starting
//! one, so there is no upper-layer header to read ports from.
//!
//! The views are lenient where RFC 8200 says "ignored on reception" (reserved
//! bits) so that the walker finds the same upper layer a host would;
//! [`ExtHeaderRepr::parse`] is strict, rejecting what it could not re-emit
//! byte for byte.

use crate::ip::IpProtocol;
use crate::{Error, ErrorKind, Layer, Result};

/// The most extension headers [`walk`] follows before giving up with [`ErrorKind::TooDeep`].
pub const MAX_EXT_HEADERS: usize = 8;

/// The length of the shortest extension header, and of every Fragment header.
pub const MIN_HEADER_LEN: usize = 8;

/// Byte offsets within extension headers.
mod field {
    use crate::field::Field;
    pub const NXT_HDR: usize = 0;
    pub const LENGTH: usize = 1;
    /// Options (hop-by-hop, destination) or RFC 6564 body.
    pub const BODY: usize = 2;
    // Routing header.
    pub const ROUTING_TYPE: usize = 2;
    pub const SEG_LEFT: usize = 3;
    pub const ROUTING_DATA: usize = 4;
    // Fragment header.
    pub const FRAG_RESERVED: usize = 1;
    pub const FRAG_OFF_M: Field = 2..4;
    pub const FRAG_IDENT: Field = 4..8;
    // Authentication header.
    pub const AH_RESERVED: Field = 2..4;
    pub const AH_SPI: Field = 4..8;
    pub const AH_SEQ: Field = 8..12;
    pub const AH_ICV: usize = 12;
}

/// The length of an AH without ICV (next header to sequence number).
pub const AH_FIXED_LEN: usize = field::AH_ICV;

const fn err(kind: ErrorKind) -> Error {
    Error::new(Layer::Ipv6Ext, kind)
}

const fn round_up(n: usize, unit: usize) -> usize {
    n.div_ceil(unit) * unit
}

/// A read/write view of one extension header of a known kind.
///
/// The buffer starts at the header and may run on past it (into the next
/// header); [`Packet::payload`] is what follows.
///
/// Contract: once [`Packet::new_checked`] has succeeded, no accessor panics,
/// including the accessors for a kind other than the view's (they then read
/// meaningless but in-bounds bytes).
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
    kind: IpProtocol,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wrap a buffer holding a header of type `kind`, unchecked; accessors may panic.
    pub const fn new_unchecked(buffer: T, kind: IpProtocol) -> Packet<T> {
        Packet { buffer, kind }
    }

    /// Wrap a buffer holding a header of type `kind`, checking its length.
    pub fn new_checked(buffer: T, kind: IpProtocol) -> Result<Packet<T>> {
        let packet = Self::new_unchecked(buffer, kind);
        packet.check_len()?;
        Ok(packet)
    }

    /// Check the kind and that the header's declared length fits the buffer:
    /// a `kind` that is not an extension header is [`ErrorKind::BadValue`];
    /// fewer than 8 bytes, [`ErrorKind::Truncated`]; an AH shorter than its
    /// 12 fixed bytes, or any header running past the buffer,
    /// [`ErrorKind::BadHeaderLength`] (the buffer is normally the IPv6 payload,
    /// already checked against the capture, so running past it is a lie in
    /// the header, not a short capture).
    pub fn check_len(&self) -> Result<()> {
        if !self.kind.is_ipv6_extension_header() {
            return Err(err(ErrorKind::BadValue));
        }
        let len = self.buffer.as_ref().len();
        if len < MIN_HEADER_LEN {
            return Err(err(ErrorKind::Truncated));
        }
        let header_len = self.header_len();
        if (self.kind == IpProtocol::AH && header_len < AH_FIXED_LEN) || header_len > len {
            return Err(err(ErrorKind::BadHeaderLength));
        }
        Ok(())
    }

    /// Give back the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Which extension header this is.
    pub const fn kind(&self) -> IpProtocol {
        self.kind
    }

    /// The type of the header that follows.
    pub fn next_header(&self) -> IpProtocol {
        IpProtocol(self.buffer.as_ref()[field::NXT_HDR])
    }

    /// The raw length octet (meaningless for the Fragment header, where it is reserved).
    pub fn length_field(&self) -> u8 {
        self.buffer.as_ref()[field::LENGTH]
    }

    /// The length of this header in bytes, from its kind and length octet.
    pub fn header_len(&self) -> usize {
        header_len(self.kind, self.length_field())
    }

    /// Everything after the next-header and length octets, up to the end of
    /// the header: the options of a Hop-by-Hop or Destination Options header,
    /// the body of an RFC 6564 header.
    pub fn body(&self) -> &[u8] {
        &self.buffer.as_ref()[field::BODY..self.header_len()]
    }

    /// The options of a Hop-by-Hop or Destination Options header, as TLVs.
    pub fn options(&self) -> Ipv6Options<'_> {
        Ipv6Options::new(self.body())
    }

    /// Routing header: the routing type.
    pub fn routing_type(&self) -> u8 {
        self.buffer.as_ref()[field::ROUTING_TYPE]
    }

    /// Routing header: the number of route segments still to visit.
    pub fn segments_left(&self) -> u8 {
        self.buffer.as_ref()[field::SEG_LEFT]
    }

    /// Routing header: the type-specific data.
    pub fn routing_data(&self) -> &[u8] {
        // header_len >= 8 for every kind once checked, so 4.. is in range.
        &self.buffer.as_ref()[field::ROUTING_DATA..self.header_len()]
    }

    fn frag_word(&self) -> u16 {
        let d = &self.buffer.as_ref()[field::FRAG_OFF_M];
        u16::from_be_bytes([d[0], d[1]])
    }

    /// Fragment header: the offset of this fragment's data in 8-octet units.
    pub fn frag_offset(&self) -> u16 {
        self.frag_word() >> 3
    }

    /// Fragment header: the More Fragments flag.
    pub fn more_frags(&self) -> bool {
        self.frag_word() & 1 != 0
    }

    /// Fragment header: the identification.
    pub fn frag_ident(&self) -> u32 {
        let d = &self.buffer.as_ref()[field::FRAG_IDENT];
        u32::from_be_bytes([d[0], d[1], d[2], d[3]])
    }

    /// Fragment header: whether either reserved field (the octet after Next
    /// Header, the two bits before M) is non-zero. Receivers ignore them.
    pub fn frag_reserved_set(&self) -> bool {
        self.buffer.as_ref()[field::FRAG_RESERVED] != 0 || self.frag_word() & 0x0006 != 0
    }

    /// Whether this is a Fragment header whose offset is not zero: the data
    /// after it continues a datagram, so no upper-layer header follows.
    pub fn is_non_first_fragment(&self) -> bool {
        self.kind == IpProtocol::IPV6_FRAG && self.frag_offset() != 0
    }

    /// AH: the reserved 16 bits, which the sender must zero.
    pub fn ah_reserved(&self) -> u16 {
        let d = &self.buffer.as_ref()[field::AH_RESERVED];
        u16::from_be_bytes([d[0], d[1]])
    }

    /// AH: the Security Parameters Index.
    pub fn spi(&self) -> u32 {
        let d = &self.buffer.as_ref()[field::AH_SPI];
        u32::from_be_bytes([d[0], d[1], d[2], d[3]])
    }

    /// AH: the sequence number; 0 on a view of another kind shorter than 12 bytes.
    pub fn seq(&self) -> u32 {
        match self.buffer.as_ref().get(field::AH_SEQ) {
            Some(&[a, b, c, d]) => u32::from_be_bytes([a, b, c, d]),
            _ => 0,
        }
    }

    /// AH: the Integrity Check Value (with any padding), raw; empty on a view
    /// of another kind shorter than 12 bytes.
    pub fn icv(&self) -> &[u8] {
        self.buffer
            .as_ref()
            .get(field::AH_ICV..self.header_len())
            .unwrap_or(&[])
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Packet<&'a T> {
    /// The bytes after this header.
    pub fn payload(&self) -> &'a [u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }

    /// The header's own bytes.
    pub fn header_bytes(&self) -> &'a [u8] {
        &self.buffer.as_ref()[..self.header_len()]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Set the next header.
    pub fn set_next_header(&mut self, value: IpProtocol) {
        self.buffer.as_mut()[field::NXT_HDR] = value.0
    }

    /// Set the raw length octet.
    pub fn set_length_field(&mut self, value: u8) {
        self.buffer.as_mut()[field::LENGTH] = value
    }

    /// Routing header: set the routing type.
    pub fn set_routing_type(&mut self, value: u8) {
        self.buffer.as_mut()[field::ROUTING_TYPE] = value
    }

    /// Routing header: set segments left.
    pub fn set_segments_left(&mut self, value: u8) {
        self.buffer.as_mut()[field::SEG_LEFT] = value
    }

    /// Fragment header: set the offset (8-octet units, low 13 bits used) and
    /// More Fragments flag, clearing the reserved bits between them.
    pub fn set_frag_offset_more(&mut self, offset: u16, more: bool) {
        let w = (offset << 3) | u16::from(more);
        self.buffer.as_mut()[field::FRAG_OFF_M].copy_from_slice(&w.to_be_bytes())
    }

    /// Fragment header: set the identification.
    pub fn set_frag_ident(&mut self, value: u32) {
        self.buffer.as_mut()[field::FRAG_IDENT].copy_from_slice(&value.to_be_bytes())
    }

    /// AH: set the reserved field.
    pub fn set_ah_reserved(&mut self, value: u16) {
        self.buffer.as_mut()[field::AH_RESERVED].copy_from_slice(&value.to_be_bytes())
    }

    /// AH: set the SPI.
    pub fn set_spi(&mut self, value: u32) {
        self.buffer.as_mut()[field::AH_SPI].copy_from_slice(&value.to_be_bytes())
    }

    /// AH: set the sequence number.
    pub fn set_seq(&mut self, value: u32) {
        self.buffer.as_mut()[field::AH_SEQ].copy_from_slice(&value.to_be_bytes())
    }

    /// The bytes after the next-header and length octets up to the end of the header, mutably.
    pub fn body_mut(&mut self) -> &mut [u8] {
        let end = self.header_len();
        &mut self.buffer.as_mut()[field::BODY..end]
    }
}

/// The length in bytes of an extension header of `kind` whose length octet is `length`.
pub const fn header_len(kind: IpProtocol, length: u8) -> usize {
    match kind {
        IpProtocol::IPV6_FRAG => MIN_HEADER_LEN,
        IpProtocol::AH => (length as usize + 2) * 4,
        _ => (length as usize + 1) * 8,
    }
}

/// One Hop-by-Hop or Destination option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv6Option<'a> {
    /// A single octet of padding (type 0).
    Pad1,
    /// Padding of two or more octets (type 1); holds the data length.
    PadN(u8),
    /// Any other option.
    Other {
        /// The option type; its top two bits say what a node that does not
        /// know it must do (RFC 8200 section 4.2).
        kind: u8,
        /// The option data.
        data: &'a [u8],
    },
}

/// Option type: Pad1.
pub const OPT_PAD1: u8 = 0;
/// Option type: PadN.
pub const OPT_PADN: u8 = 1;

/// An iterator over Hop-by-Hop or Destination options.
///
/// Yields `Err(BadOption)` once, then stops, on an option whose length octet
/// is missing or whose data runs past the header.
#[derive(Debug, Clone)]
pub struct Ipv6Options<'a> {
    data: &'a [u8],
}

impl<'a> Ipv6Options<'a> {
    /// Iterate over the raw options area of a header.
    pub const fn new(data: &'a [u8]) -> Self {
        Ipv6Options { data }
    }
}

impl<'a> Iterator for Ipv6Options<'a> {
    type Item = Result<Ipv6Option<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        let (&kind, rest) = self.data.split_first()?;
        if kind == OPT_PAD1 {
            self.data = rest;
            return Some(Ok(Ipv6Option::Pad1));
        }
        let Some((&len, rest)) = rest.split_first() else {
            self.data = &[];
            return Some(Err(err(ErrorKind::BadOption)));
        };
        let Some((data, rest)) = rest.split_at_checked(usize::from(len)) else {
            self.data = &[];
            return Some(Err(err(ErrorKind::BadOption)));
        };
        self.data = rest;
        Some(Ok(if kind == OPT_PADN {
            Ipv6Option::PadN(len)
        } else {
            Ipv6Option::Other { kind, data }
        }))
    }
}

/// A parsed extension header, one variant per layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtHeaderRepr<'a> {
    /// Hop-by-Hop Options (0).
    HopByHop {
        /// The following header.
        next_header: IpProtocol,
        /// The raw options area (TLVs and padding).
        options: &'a [u8],
    },
    /// Destination Options (60).
    DestinationOptions {
        /// The following header.
        next_header: IpProtocol,
        /// The raw options area (TLVs and padding).
        options: &'a [u8],
    },
    /// Routing header (43).
    Routing {
        /// The following header.
        next_header: IpProtocol,
        /// The routing type (e.g. 4 for Segment Routing).
        routing_type: u8,
        /// Route segments still to visit.
        segments_left: u8,
        /// Type-specific data.
        data: &'a [u8],
    },
    /// Fragment header (44).
    Fragment {
        /// The following header (of the fragmentable part).
        next_header: IpProtocol,
        /// Offset of the data in 8-octet units.
        frag_offset: u16,
        /// More Fragments.
        more_frags: bool,
        /// Identification.
        ident: u32,
    },
    /// Authentication Header (51).
    Ah {
        /// The following header.
        next_header: IpProtocol,
        /// Security Parameters Index.
        spi: u32,
        /// Sequence number.
        seq: u32,
        /// Integrity Check Value, with any padding.
        icv: &'a [u8],
    },
    /// An RFC 6564-format header this module does not decode (Mobility, HIP, Shim6).
    Other {
        /// Which header it is.
        kind: IpProtocol,
        /// The following header.
        next_header: IpProtocol,
        /// The bytes after the next-header and length octets.
        body: &'a [u8],
    },
}

impl<'a> ExtHeaderRepr<'a> {
    /// Parse a header.
    ///
    /// Strict where the view is lenient: malformed Hop-by-Hop or Destination
    /// options are [`ErrorKind::BadOption`]; non-zero reserved bits in a
    /// Fragment header or AH are [`ErrorKind::BadValue`] (this type has no
    /// place to keep them, and a conforming sender zeroes them).
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&'a T>) -> Result<ExtHeaderRepr<'a>> {
        packet.check_len()?;
        let buf: &'a [u8] = packet.buffer.as_ref();
        let hl = packet.header_len();
        let next_header = packet.next_header();
        // check_len guarantees 8 <= hl <= buf.len(), and hl >= 12 for AH, so
        // every slice below is in range.
        Ok(match packet.kind {
            IpProtocol::HOPOPT | IpProtocol::IPV6_OPTS => {
                let options = &buf[field::BODY..hl];
                for opt in Ipv6Options::new(options) {
                    opt?;
                }
                if packet.kind == IpProtocol::HOPOPT {
                    ExtHeaderRepr::HopByHop { next_header, options }
                } else {
                    ExtHeaderRepr::DestinationOptions { next_header, options }
                }
            }
            IpProtocol::IPV6_ROUTE => ExtHeaderRepr::Routing {
                next_header,
                routing_type: packet.routing_type(),
                segments_left: packet.segments_left(),
                data: &buf[field::ROUTING_DATA..hl],
            },
            IpProtocol::IPV6_FRAG => {
                if packet.frag_reserved_set() {
                    return Err(err(ErrorKind::BadValue));
                }
                ExtHeaderRepr::Fragment {
                    next_header,
                    frag_offset: packet.frag_offset(),
                    more_frags: packet.more_frags(),
                    ident: packet.frag_ident(),
                }
            }
            IpProtocol::AH => {
                if packet.ah_reserved() != 0 {
                    return Err(err(ErrorKind::BadValue));
                }
                ExtHeaderRepr::Ah {
                    next_header,
                    spi: packet.spi(),
                    seq: packet.seq(),
                    icv: &buf[field::AH_ICV..hl],
                }
            }
            kind => ExtHeaderRepr::Other {
                kind,
                next_header,
                body: &buf[field::BODY..hl],
            },
        })
    }

    /// Which extension header this is.
    pub const fn kind(&self) -> IpProtocol {
        match self {
            ExtHeaderRepr::HopByHop { .. } => IpProtocol::HOPOPT,
            ExtHeaderRepr::DestinationOptions { .. } => IpProtocol::IPV6_OPTS,
            ExtHeaderRepr::Routing { .. } => IpProtocol::IPV6_ROUTE,
            ExtHeaderRepr::Fragment { .. } => IpProtocol::IPV6_FRAG,
            ExtHeaderRepr::Ah { .. } => IpProtocol::AH,
            ExtHeaderRepr::Other { kind, .. } => *kind,
        }
    }

    /// The type of the header that follows.
    pub const fn next_header(&self) -> IpProtocol {
        match self {
            ExtHeaderRepr::HopByHop { next_header, .. }
            | ExtHeaderRepr::DestinationOptions { next_header, .. }
            | ExtHeaderRepr::Routing { next_header, .. }
            | ExtHeaderRepr::Fragment { next_header, .. }
            | ExtHeaderRepr::Ah { next_header, .. }
            | ExtHeaderRepr::Other { next_header, .. } => *next_header,
        }
    }

    /// The emitted header length: the variable part padded up to the
    /// header's unit (8 octets; 4 for AH, whose ICV the caller must size to a
    /// multiple of 8 for IPv6).
    pub const fn buffer_len(&self) -> usize {
        match self {
            ExtHeaderRepr::HopByHop { options: b, .. }
            | ExtHeaderRepr::DestinationOptions { options: b, .. }
            | ExtHeaderRepr::Other { body: b, .. } => round_up(field::BODY + b.len(), 8),
            ExtHeaderRepr::Routing { data, .. } => round_up(field::ROUTING_DATA + data.len(), 8),
            ExtHeaderRepr::Fragment { .. } => MIN_HEADER_LEN,
            ExtHeaderRepr::Ah { icv, .. } => round_up(AH_FIXED_LEN + icv.len(), 4),
        }
    }

    /// Write the header into a buffer at least [`Self::buffer_len`] long.
    /// Options are padded with Pad1/PadN, other variable parts with zeros.
    ///
    /// # Panics
    /// If the header would be too long for its length octet (2048 bytes;
    /// 1028 for AH) or the buffer is shorter than [`Self::buffer_len`].
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        let len = self.buffer_len();
        let length_field = match self {
            ExtHeaderRepr::Fragment { .. } => 0,
            ExtHeaderRepr::Ah { .. } => len / 4 - 2,
            _ => len / 8 - 1,
        };
        let length_field = u8::try_from(length_field).expect("extension header too long");
        packet.kind = self.kind();
        packet.set_next_header(self.next_header());
        packet.set_length_field(length_field);
        let buf = &mut packet.buffer.as_mut()[..len];
        match *self {
            ExtHeaderRepr::HopByHop { options, .. } | ExtHeaderRepr::DestinationOptions { options, .. } => {
                let end = field::BODY + options.len();
                buf[field::BODY..end].copy_from_slice(options);
                match len - end {
                    0 => {}
                    1 => buf[end] = OPT_PAD1,
                    n => {
                        buf[end] = OPT_PADN;
                        // n <= 7 here: the padding is less than one 8-octet unit.
                        buf[end + 1] = (n - 2) as u8;
                        buf[end + 2..].fill(0);
                    }
                }
            }
            ExtHeaderRepr::Other { body, .. } => {
                buf[field::BODY..field::BODY + body.len()].copy_from_slice(body);
                buf[field::BODY + body.len()..].fill(0);
            }
            ExtHeaderRepr::Routing {
                routing_type,
                segments_left,
                data,
                ..
            } => {
                buf[field::ROUTING_TYPE] = routing_type;
                buf[field::SEG_LEFT] = segments_left;
                buf[field::ROUTING_DATA..field::ROUTING_DATA + data.len()].copy_from_slice(data);
                buf[field::ROUTING_DATA + data.len()..].fill(0);
            }
            ExtHeaderRepr::Fragment {
                frag_offset,
                more_frags,
                ident,
                ..
            } => {
                buf[field::FRAG_RESERVED] = 0;
                packet.set_frag_offset_more(frag_offset, more_frags);
                packet.set_frag_ident(ident);
            }
            ExtHeaderRepr::Ah { spi, seq, icv, .. } => {
                buf[field::AH_ICV..field::AH_ICV + icv.len()].copy_from_slice(icv);
                buf[field::AH_ICV + icv.len()..].fill(0);
                packet.set_ah_reserved(0);
                packet.set_spi(spi);
                packet.set_seq(seq);
            }
        }
    }
}

/// Start walking the extension-header chain of an IPv6 payload.
///
/// `first` is the fixed header's Next Header and `data` its payload (offsets
/// in the items are relative to `data`). It also walks an IPv4 payload whose
/// protocol is AH.
pub fn walk(first: IpProtocol, data: &[u8]) -> ExtWalker<'_> {
    ExtWalker {
        data,
        next: first,
        offset: 0,
        count: 0,
        state: WalkState::Headers,
    }
}

/// How a walk over extension headers ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WalkEnd {
    /// The upper-layer header (TCP, UDP, ICMPv6, ESP, …) starts at `offset`.
    Upper {
        /// Its protocol.
        protocol: IpProtocol,
        /// Where it starts in the walked data.
        offset: usize,
    },
    /// The data after a Fragment header with a non-zero offset continues a
    /// datagram: the upper-layer header is absent, so ports are unknown.
    NonFirstFragment {
        /// The Fragment header's Next Header: the first header of the
        /// fragmentable part (upper-layer protocol or a later extension header).
        protocol: IpProtocol,
        /// Where the fragment data starts.
        offset: usize,
        /// The fragment offset in 8-octet units.
        frag_offset: u16,
    },
    /// A header said No Next Header (59); nothing follows it.
    NoNextHeader {
        /// Where the (ignored) bytes after the last header start.
        offset: usize,
    },
}

/// One step of a walk.
#[derive(Debug, Clone)]
pub enum WalkItem<'a> {
    /// An extension header, viewed over the data from `offset` on.
    Header {
        /// Where the header starts in the walked data.
        offset: usize,
        /// The checked header.
        header: Packet<&'a [u8]>,
    },
    /// The end of the chain; always the last item of a walk that did not fail.
    End(WalkEnd),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WalkState {
    Headers,
    NonFirstFragment(u16),
    Done,
}

/// An iterator over an extension-header chain; see [`walk`].
///
/// Yields each extension header, then one [`WalkItem::End`]; or, on a
/// malformed or too-deep chain, an error, after which it yields nothing.
/// Errors: [`ErrorKind::TooDeep`] past [`MAX_EXT_HEADERS`] headers,
/// [`ErrorKind::BadValue`] for a Hop-by-Hop header anywhere but first (RFC
/// 8200 section 4.3), and those of [`Packet::check_len`].
#[derive(Debug, Clone)]
pub struct ExtWalker<'a> {
    data: &'a [u8],
    next: IpProtocol,
    offset: usize,
    count: usize,
    state: WalkState,
}

impl<'a> ExtWalker<'a> {
    /// Run the walk to its end, returning how it ended.
    pub fn finish(self) -> Result<WalkEnd> {
        for item in self {
            if let WalkItem::End(end) = item? {
                return Ok(end);
            }
        }
        // Every walk that does not fail yields an End before stopping, so this
        // is reached only by a walker that had already finished.
        Err(err(ErrorKind::Truncated))
    }

    fn fail(&mut self, kind: ErrorKind) -> Option<Result<WalkItem<'a>>> {
        self.state = WalkState::Done;
        Some(Err(err(kind)))
    }

    fn end(&mut self, end: WalkEnd) -> Option<Result<WalkItem<'a>>> {
        self.state = WalkState::Done;
        Some(Ok(WalkItem::End(end)))
    }
}

impl<'a> Iterator for ExtWalker<'a> {
    type Item = Result<WalkItem<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        let (protocol, offset) = (self.next, self.offset);
        match self.state {
            WalkState::Done => return None,
            WalkState::NonFirstFragment(frag_offset) => {
                return self.end(WalkEnd::NonFirstFragment {
                    protocol,
                    offset,
                    frag_offset,
                });
            }
            WalkState::Headers => {}
        }
        if protocol == IpProtocol::IPV6_NONXT {
            return self.end(WalkEnd::NoNextHeader { offset });
        }
        if !protocol.is_ipv6_extension_header() {
            return self.end(WalkEnd::Upper { protocol, offset });
        }
        if self.count == MAX_EXT_HEADERS {
            return self.fail(ErrorKind::TooDeep);
        }
        if protocol == IpProtocol::HOPOPT && self.count != 0 {
            return self.fail(ErrorKind::BadValue);
        }
        // offset only ever advances by a checked header length, so it is <= data.len().
        let rest = &self.data[offset..];
        let header = match Packet::new_checked(rest, protocol) {
            Ok(h) => h,
            Err(e) => return self.fail(e.kind()),
        };
        self.count += 1;
        self.offset += header.header_len();
        self.next = header.next_header();
        if header.is_non_first_fragment() {
            self.state = WalkState::NonFirstFragment(header.frag_offset());
        }
        Some(Ok(WalkItem::Header { offset, header }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HBH: [u8; 8] = [
        58, 0, // next: ICMPv6, 8 bytes
        0x05, 0x02, 0x00, 0x00, // Router Alert (RFC 2711), MLD
        0x01, 0x00, // PadN, 0 data bytes
    ];
    const DEST: [u8; 16] = [
        17, 1,    // next: UDP, 16 bytes
        0x00, // Pad1
        0x1e, 0x03, 0xaa, 0xbb, 0xcc, // experimental option 0x1e (RFC 4727), 3 bytes
        0x01, 0x06, 0, 0, 0, 0, 0, 0, // PadN, 6 bytes
    ];
    /// Segment Routing header (RFC 8754): one segment 2001:db8::1, segments left 0.
    const SRH: [u8; 24] = [
        6, 2, 4, 0, // next: TCP, 24 bytes, type 4, segments left 0
        0, 0, 0, 0, // last entry, flags, tag
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
    ];
    /// A first fragment of UDP, M set, ident 0xdeadbeef.
    const FRAG_FIRST: [u8; 8] = [17, 0, 0x00, 0x01, 0xde, 0xad, 0xbe, 0xef];
    /// A later fragment, offset 185 (1480 bytes), M clear.
    const FRAG_LATER: [u8; 8] = [17, 0, 0x05, 0xc8, 0xde, 0xad, 0xbe, 0xef];
    /// AH with a 96-bit ICV (HMAC-SHA1-96): length (24/4)-2 = 4, SPI 0x1000, seq 7.
    const AH: [u8; 24] = [
        6, 4, 0, 0, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x07, //
        1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    ];
    /// A Mobility header (RFC 6275), Binding Refresh Request, no next header.
    const MOBILITY: [u8; 8] = [59, 0, 0, 0, 0, 0, 0, 0];

    fn cases() -> [(IpProtocol, &'static [u8]); 7] {
        [
            (IpProtocol::HOPOPT, &HBH),
            (IpProtocol::IPV6_OPTS, &DEST),
            (IpProtocol::IPV6_ROUTE, &SRH),
            (IpProtocol::IPV6_FRAG, &FRAG_FIRST),
            (IpProtocol::IPV6_FRAG, &FRAG_LATER),
            (IpProtocol::AH, &AH),
            (IpProtocol::MOBILITY, &MOBILITY),
        ]
    }

    #[test]
    fn parse_emit_is_byte_exact() {
        for (kind, bytes) in cases() {
            let mut with_tail = bytes.to_vec();
            with_tail.extend_from_slice(&[0x99; 5]);
            let p = Packet::new_checked(&with_tail[..], kind).unwrap();
            assert_eq!(p.header_len(), bytes.len(), "{kind}");
            assert_eq!(p.payload(), &[0x99; 5]);
            let repr = ExtHeaderRepr::parse(&p).unwrap();
            assert_eq!((repr.kind(), repr.buffer_len()), (kind, bytes.len()));
            let mut out = vec![0x55u8; bytes.len()];
            repr.emit(&mut Packet::new_unchecked(&mut out[..], kind));
            assert_eq!(out, bytes, "{kind}");
        }
    }

    #[test]
    fn typed_fields() {
        let p = |k, b| ExtHeaderRepr::parse(&Packet::new_checked(b, k).unwrap()).unwrap();
        assert_eq!(
            p(IpProtocol::IPV6_FRAG, &FRAG_LATER[..]),
            ExtHeaderRepr::Fragment {
                next_header: IpProtocol::UDP,
                frag_offset: 185,
                more_frags: false,
                ident: 0xdead_beef
            }
        );
        assert_eq!(
            p(IpProtocol::AH, &AH[..]),
            ExtHeaderRepr::Ah {
                next_header: IpProtocol::TCP,
                spi: 0x1000,
                seq: 7,
                icv: &AH[12..]
            }
        );
        let ExtHeaderRepr::Routing {
            routing_type: 4,
            segments_left: 0,
            data,
            ..
        } = p(IpProtocol::IPV6_ROUTE, &SRH[..])
        else {
            panic!("not a routing header")
        };
        assert_eq!(data.len(), 20);
        let dest = Packet::new_checked(&DEST[..], IpProtocol::IPV6_OPTS).unwrap();
        let opts: Vec<_> = dest.options().collect::<Result<_>>().unwrap();
        assert_eq!(
            opts,
            [
                Ipv6Option::Pad1,
                Ipv6Option::Other {
                    kind: 0x1e,
                    data: &[0xaa, 0xbb, 0xcc]
                },
                Ipv6Option::PadN(6)
            ]
        );
    }

    #[test]
    fn emit_pads_options() {
        for (opts, pad) in [
            (&[0x1e, 0x00][..], &[0x01, 0x02, 0, 0][..]),
            (&[0x1e, 0x03, 1, 2, 3][..], &[0x00][..]),
            (&[0x1e, 0x04, 1, 2, 3, 4][..], &[][..]),
        ] {
            let repr = ExtHeaderRepr::DestinationOptions {
                next_header: IpProtocol::TCP,
                options: opts,
            };
            assert_eq!(repr.buffer_len(), 8);
            let mut out = [0xffu8; 8];
            repr.emit(&mut Packet::new_unchecked(&mut out[..], IpProtocol::IPV6_OPTS));
            assert_eq!(&out[2..2 + opts.len()], opts);
            assert_eq!(&out[2 + opts.len()..], pad);
            let p = Packet::new_checked(&out[..], IpProtocol::IPV6_OPTS).unwrap();
            assert!(p.options().all(|o| o.is_ok()));
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for (kind, bytes) in cases() {
            for n in 0..bytes.len() {
                let e = Packet::new_checked(&bytes[..n], kind).unwrap_err();
                let expect = if n < MIN_HEADER_LEN {
                    ErrorKind::Truncated
                } else {
                    ErrorKind::BadHeaderLength
                };
                assert_eq!(e, err(expect), "{kind} len {n}");
                assert!(walk(kind, &bytes[..n]).finish().is_err());
            }
        }
    }

    #[test]
    fn bad_headers() {
        assert_eq!(
            Packet::new_checked(&HBH[..], IpProtocol::TCP).unwrap_err(),
            err(ErrorKind::BadValue)
        );
        // AH with length 0 (8 bytes) cannot hold its SPI and sequence number.
        let ah = [6u8, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(
            Packet::new_checked(&ah[..], IpProtocol::AH).unwrap_err(),
            err(ErrorKind::BadHeaderLength)
        );
        // Reserved bits: readable through the view, rejected by the Repr.
        for (kind, bytes, at, bit) in [
            (IpProtocol::IPV6_FRAG, &FRAG_FIRST[..], 1, 0xff),
            (IpProtocol::IPV6_FRAG, &FRAG_FIRST[..], 3, 0x04),
            (IpProtocol::AH, &AH[..], 2, 0x80),
        ] {
            let mut b = bytes.to_vec();
            b[at] |= bit;
            let p = Packet::new_checked(&b[..], kind).unwrap();
            assert_eq!(ExtHeaderRepr::parse(&p).unwrap_err(), err(ErrorKind::BadValue));
            assert!(walk(kind, &b).finish().is_ok());
        }
    }

    #[test]
    fn malformed_options() {
        let cases: &[&[u8]] = &[
            &[0x1e],                   // length octet missing
            &[0x1e, 0x03, 1, 2],       // data past the end
            &[0x00, 0x01, 0x05, 0, 0], // PadN past the end
        ];
        for (i, opts) in cases.iter().enumerate() {
            let results: Vec<_> = Ipv6Options::new(opts).collect();
            assert_eq!(results.last(), Some(&Err(err(ErrorKind::BadOption))), "case {i}");
            assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
        }
        let mut b = HBH;
        b[7] = 1; // PadN claims one byte past the header
        let p = Packet::new_checked(&b[..], IpProtocol::HOPOPT).unwrap();
        assert_eq!(ExtHeaderRepr::parse(&p).unwrap_err(), err(ErrorKind::BadOption));
    }

    /// Concatenate headers, fixing each one's next header to the following kind.
    fn chain(parts: &[(IpProtocol, &[u8])], last: IpProtocol, tail: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, (_, bytes)) in parts.iter().enumerate() {
            let start = out.len();
            out.extend_from_slice(bytes);
            out[start] = parts.get(i + 1).map_or(last, |p| p.0).0;
        }
        out.extend_from_slice(tail);
        out
    }

    #[test]
    fn walk_to_upper_layer() {
        let parts = [
            (IpProtocol::HOPOPT, &HBH[..]),
            (IpProtocol::IPV6_OPTS, &DEST[..]),
            (IpProtocol::IPV6_ROUTE, &SRH[..]),
            (IpProtocol::IPV6_FRAG, &FRAG_FIRST[..]),
            (IpProtocol::AH, &AH[..]),
        ];
        let data = chain(&parts, IpProtocol::TCP, &[0xaa; 20]);
        let items: Vec<_> = walk(IpProtocol::HOPOPT, &data).collect::<Result<_>>().unwrap();
        assert_eq!(items.len(), parts.len() + 1);
        let mut expect_offset = 0;
        for (item, (kind, bytes)) in items.iter().zip(parts) {
            let WalkItem::Header { offset, header } = item else {
                panic!("expected a header")
            };
            assert_eq!(
                (*offset, header.kind(), header.header_len()),
                (expect_offset, kind, bytes.len())
            );
            expect_offset += bytes.len();
        }
        assert_eq!(data.len() - expect_offset, 20);
        assert!(matches!(
            items.last(),
            Some(WalkItem::End(WalkEnd::Upper { protocol: IpProtocol::TCP, offset })) if *offset == expect_offset
        ));
        // No extension headers at all.
        assert_eq!(
            walk(IpProtocol::UDP, &[]).finish(),
            Ok(WalkEnd::Upper {
                protocol: IpProtocol::UDP,
                offset: 0
            })
        );
    }

    #[test]
    fn walk_from_an_ipv6_packet() {
        // An MLDv2 report as Linux sends it: fe80::1 -> ff02::16, hop limit 1,
        // Hop-by-Hop with Router Alert, then ICMPv6 type 143 (checksum not
        // relevant here); 2 bytes of link padding after the payload.
        let mut pkt = vec![
            0x60, 0, 0, 0, 0x00, 0x10, 0x00, 0x01, //
            0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, //
            0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x16,
        ];
        pkt.extend_from_slice(&HBH);
        pkt.extend_from_slice(&[143, 0, 0x12, 0x34, 0, 0, 0, 0, 0xee, 0xee]);
        let ip = crate::ipv6::Packet::new_checked(&pkt[..]).unwrap();
        let mut w = walk(ip.next_header(), ip.payload());
        let Some(Ok(WalkItem::Header { offset: 0, header })) = w.next() else {
            panic!("expected HBH")
        };
        let opts: Vec<_> = header.options().collect::<Result<_>>().unwrap();
        assert_eq!(
            opts,
            [
                Ipv6Option::Other {
                    kind: 0x05,
                    data: &[0, 0]
                },
                Ipv6Option::PadN(0)
            ]
        );
        assert_eq!(
            w.finish(),
            Ok(WalkEnd::Upper {
                protocol: IpProtocol::ICMPV6,
                offset: 8
            })
        );
        assert_eq!(ip.payload()[8], 143);
    }

    #[test]
    fn walk_ends() {
        // ESP ends the walk: its payload is encrypted.
        let data = chain(&[(IpProtocol::IPV6_OPTS, &DEST[..])], IpProtocol::ESP, &[0; 8]);
        assert_eq!(
            walk(IpProtocol::IPV6_OPTS, &data).finish(),
            Ok(WalkEnd::Upper {
                protocol: IpProtocol::ESP,
                offset: 16
            })
        );
        // No Next Header, with trailing junk that is not parsed.
        let data = chain(
            &[(IpProtocol::MOBILITY, &MOBILITY[..])],
            IpProtocol::IPV6_NONXT,
            &[0xff; 3],
        );
        assert_eq!(
            walk(IpProtocol::MOBILITY, &data).finish(),
            Ok(WalkEnd::NoNextHeader { offset: 8 })
        );
        // A non-first fragment whose fragmentable part starts with a
        // Destination Options header: the walk must not parse the fragment
        // data as that header.
        let data = chain(
            &[(IpProtocol::IPV6_FRAG, &FRAG_LATER[..])],
            IpProtocol::IPV6_OPTS,
            &[0xff; 3],
        );
        let items: Vec<_> = walk(IpProtocol::IPV6_FRAG, &data).collect::<Result<_>>().unwrap();
        assert_eq!(items.len(), 2);
        assert!(matches!(
            items[1],
            WalkItem::End(WalkEnd::NonFirstFragment {
                protocol: IpProtocol::IPV6_OPTS,
                offset: 8,
                frag_offset: 185
            })
        ));
        // A first fragment is walked through to the upper layer.
        assert_eq!(
            walk(IpProtocol::IPV6_FRAG, &FRAG_FIRST).finish(),
            Ok(WalkEnd::Upper {
                protocol: IpProtocol::UDP,
                offset: 8
            })
        );
    }

    #[test]
    fn walk_limits() {
        let opts: Vec<(IpProtocol, &[u8])> = vec![(IpProtocol::IPV6_OPTS, &DEST[..]); MAX_EXT_HEADERS + 1];
        let data = chain(&opts[..MAX_EXT_HEADERS], IpProtocol::UDP, &[]);
        assert_eq!(
            walk(IpProtocol::IPV6_OPTS, &data).finish(),
            Ok(WalkEnd::Upper {
                protocol: IpProtocol::UDP,
                offset: data.len()
            })
        );
        let data = chain(&opts, IpProtocol::UDP, &[]);
        let items: Vec<_> = walk(IpProtocol::IPV6_OPTS, &data).collect();
        assert_eq!(items.len(), MAX_EXT_HEADERS + 1);
        assert_eq!(items.last().unwrap().as_ref().unwrap_err(), &err(ErrorKind::TooDeep));
        // Hop-by-Hop anywhere but first.
        let data = chain(
            &[(IpProtocol::IPV6_OPTS, &DEST[..]), (IpProtocol::HOPOPT, &HBH[..])],
            IpProtocol::UDP,
            &[],
        );
        assert_eq!(
            walk(IpProtocol::IPV6_OPTS, &data).finish(),
            Err(err(ErrorKind::BadValue))
        );
        // A header whose length runs past the data.
        let mut data = chain(&[(IpProtocol::IPV6_OPTS, &DEST[..])], IpProtocol::UDP, &[]);
        data[1] = 2;
        assert_eq!(
            walk(IpProtocol::IPV6_OPTS, &data).finish(),
            Err(err(ErrorKind::BadHeaderLength))
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            kind in proptest::sample::select(vec![0u8, 43, 44, 51, 60, 135, 139, 140, 6]),
            mut data in proptest::collection::vec(proptest::num::u8::ANY, 0..96),
        ) {
            // Keep half the length octets small enough to fit, so parsing goes past check_len.
            if data.len() >= 2 && data[0] & 1 == 0 {
                data[1] %= 12;
            }
            let kind = IpProtocol(kind);
            if let Ok(p) = Packet::new_checked(&data[..], kind) {
                let _ = (p.next_header(), p.header_len(), p.body(), p.routing_type(), p.segments_left());
                let _ = (p.routing_data(), p.frag_offset(), p.more_frags(), p.frag_ident(), p.frag_reserved_set());
                let _ = (p.spi(), p.seq(), p.icv(), p.ah_reserved(), p.payload(), p.header_bytes());
                for o in p.options() {
                    let _ = o;
                }
                if let Ok(repr) = ExtHeaderRepr::parse(&p) {
                    proptest::prop_assert_eq!(repr.buffer_len(), p.header_len());
                    let mut out = vec![0u8; repr.buffer_len()];
                    repr.emit(&mut Packet::new_unchecked(&mut out[..], kind));
                    proptest::prop_assert_eq!(&out[..], p.header_bytes());
                }
            }
            // Bytes as a chain: the walk ends (bounded) and offsets stay in range.
            let mut n = 0;
            for item in walk(kind, &data) {
                n += 1;
                if let Ok(WalkItem::End(WalkEnd::Upper { offset, .. })) = item {
                    proptest::prop_assert!(offset <= data.len());
                }
            }
            proptest::prop_assert!(n <= MAX_EXT_HEADERS + 1);
        }
    }
}

//! IPv4 headers (RFC 791), options, and fragment fields.
//!
//! [`Packet`] is a zero-copy view; [`Ipv4Repr`] is the owned form, which keeps
//! the options as a raw slice so that parse→emit reproduces a header with a
//! valid checksum byte for byte. [`Ipv4Options`] walks the options as TLVs.
//!
//! Length checks ([`Packet::check_len`]), in order:
//! - fewer than 20 bytes: [`ErrorKind::Truncated`];
//! - version other than 4: [`ErrorKind::BadVersion`];
//! - IHL below 5, or header longer than the total length or than the buffer:
//!   [`ErrorKind::BadHeaderLength`];
//! - total length longer than the buffer: [`ErrorKind::Truncated`]. We chose
//!   `Truncated` over `BadLength` because the common cause is a capture cut at
//!   its snap length, not a lying sender, and drop counters should say so.
//!
//! Bytes after the total length are link-layer padding or trailer (a 60-byte
//! minimum Ethernet frame carrying a 40-byte TCP segment, say) and are not
//! part of [`Packet::payload`].

use core::net::Ipv4Addr;

use crate::checksum;
use crate::ip::IpProtocol;
use crate::{Error, ErrorKind, Layer, Result};

/// Byte ranges of the fixed header fields.
mod field {
    use crate::field::Field;
    pub const VER_IHL: usize = 0;
    pub const DSCP_ECN: usize = 1;
    pub const LENGTH: Field = 2..4;
    pub const IDENT: Field = 4..6;
    pub const FLG_OFF: Field = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Field = 10..12;
    pub const SRC_ADDR: Field = 12..16;
    pub const DST_ADDR: Field = 16..20;
    pub const OPTIONS: usize = 20;
}

/// Length of a header without options.
pub const HEADER_LEN: usize = field::OPTIONS;
/// The most option bytes a header can carry (IHL 15).
pub const MAX_OPTIONS_LEN: usize = 40;

/// The reserved ("evil") flag bit of the flags/fragment-offset word.
const FLAG_RESERVED: u16 = 0x8000;
/// Don't Fragment.
const FLAG_DF: u16 = 0x4000;
/// More Fragments.
const FLAG_MF: u16 = 0x2000;
/// The fragment offset, in 8-octet units.
const OFFSET_MASK: u16 = 0x1fff;

const fn err(kind: ErrorKind) -> Error {
    Error::new(Layer::Ipv4, kind)
}

/// A read/write view of an IPv4 packet.
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

    /// Wrap a buffer, checking the version and all length fields (see the module docs).
    pub fn new_checked(buffer: T) -> Result<Packet<T>> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Check the version and length fields against each other and the buffer.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(err(ErrorKind::Truncated));
        }
        if self.version() != 4 {
            return Err(err(ErrorKind::BadVersion));
        }
        let header_len = self.header_len();
        let total_len = usize::from(self.total_len());
        if header_len < HEADER_LEN || header_len > total_len || header_len > len {
            return Err(err(ErrorKind::BadHeaderLength));
        }
        if total_len > len {
            return Err(err(ErrorKind::Truncated));
        }
        Ok(())
    }

    /// Give back the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The version field (4 for a checked packet).
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] >> 4
    }

    /// The Internet Header Length field, in 32-bit words.
    pub fn ihl(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] & 0x0f
    }

    /// The header length in bytes, options included.
    pub fn header_len(&self) -> usize {
        usize::from(self.ihl()) * 4
    }

    /// Differentiated Services Code Point.
    pub fn dscp(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN] >> 2
    }

    /// Explicit Congestion Notification.
    pub fn ecn(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN] & 0x03
    }

    /// The total length (header and payload) in bytes.
    pub fn total_len(&self) -> u16 {
        let d = &self.buffer.as_ref()[field::LENGTH];
        u16::from_be_bytes([d[0], d[1]])
    }

    /// The identification field.
    pub fn ident(&self) -> u16 {
        let d = &self.buffer.as_ref()[field::IDENT];
        u16::from_be_bytes([d[0], d[1]])
    }

    fn flags_offset(&self) -> u16 {
        let d = &self.buffer.as_ref()[field::FLG_OFF];
        u16::from_be_bytes([d[0], d[1]])
    }

    /// The reserved flag bit, which RFC 791 requires to be zero.
    pub fn reserved_flag(&self) -> bool {
        self.flags_offset() & FLAG_RESERVED != 0
    }

    /// The Don't Fragment flag.
    pub fn dont_frag(&self) -> bool {
        self.flags_offset() & FLAG_DF != 0
    }

    /// The More Fragments flag.
    pub fn more_frags(&self) -> bool {
        self.flags_offset() & FLAG_MF != 0
    }

    /// The fragment offset in 8-octet units, as on the wire.
    pub fn frag_offset(&self) -> u16 {
        self.flags_offset() & OFFSET_MASK
    }

    /// The fragment offset in bytes.
    pub fn frag_offset_bytes(&self) -> usize {
        usize::from(self.frag_offset()) * 8
    }

    /// Whether this packet is a fragment (first, middle or last) of a larger datagram.
    pub fn is_fragment(&self) -> bool {
        self.more_frags() || self.frag_offset() != 0
    }

    /// Whether the fragment offset is zero, i.e. the payload starts with the
    /// upper-layer header. True for unfragmented packets too.
    pub fn is_first_fragment(&self) -> bool {
        self.frag_offset() == 0
    }

    /// Time to live.
    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }

    /// The upper-layer protocol.
    pub fn protocol(&self) -> IpProtocol {
        IpProtocol(self.buffer.as_ref()[field::PROTOCOL])
    }

    /// The header checksum field.
    pub fn checksum(&self) -> u16 {
        let d = &self.buffer.as_ref()[field::CHECKSUM];
        u16::from_be_bytes([d[0], d[1]])
    }

    /// The source address.
    pub fn src_addr(&self) -> Ipv4Addr {
        let d = &self.buffer.as_ref()[field::SRC_ADDR];
        Ipv4Addr::new(d[0], d[1], d[2], d[3])
    }

    /// The destination address.
    pub fn dst_addr(&self) -> Ipv4Addr {
        let d = &self.buffer.as_ref()[field::DST_ADDR];
        Ipv4Addr::new(d[0], d[1], d[2], d[3])
    }

    /// The raw option bytes (between the fixed header and the payload).
    pub fn options(&self) -> &[u8] {
        &self.buffer.as_ref()[field::OPTIONS..self.header_len()]
    }

    /// An iterator over the options as TLVs.
    pub fn option_iter(&self) -> Ipv4Options<'_> {
        Ipv4Options::new(self.options())
    }

    /// Whether the header checksum verifies.
    pub fn verify_checksum(&self) -> bool {
        checksum::fold(checksum::sum(&self.buffer.as_ref()[..self.header_len()])) == 0xffff
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Packet<&'a T> {
    /// The payload: the bytes after the header, up to the total length.
    pub fn payload(&self) -> &'a [u8] {
        let end = usize::from(self.total_len());
        &self.buffer.as_ref()[self.header_len()..end]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Set the version field.
    pub fn set_version(&mut self, value: u8) {
        let b = &mut self.buffer.as_mut()[field::VER_IHL];
        *b = (*b & 0x0f) | (value << 4);
    }

    /// Set the header length in bytes (a multiple of 4, at most 60).
    pub fn set_header_len(&mut self, value: usize) {
        let b = &mut self.buffer.as_mut()[field::VER_IHL];
        *b = (*b & 0xf0) | ((value / 4) as u8 & 0x0f);
    }

    /// Set the DSCP (low 6 bits used).
    pub fn set_dscp(&mut self, value: u8) {
        let b = &mut self.buffer.as_mut()[field::DSCP_ECN];
        *b = (*b & 0x03) | (value << 2);
    }

    /// Set the ECN (low 2 bits used).
    pub fn set_ecn(&mut self, value: u8) {
        let b = &mut self.buffer.as_mut()[field::DSCP_ECN];
        *b = (*b & 0xfc) | (value & 0x03);
    }

    /// Set the total length.
    pub fn set_total_len(&mut self, value: u16) {
        self.buffer.as_mut()[field::LENGTH].copy_from_slice(&value.to_be_bytes())
    }

    /// Set the identification.
    pub fn set_ident(&mut self, value: u16) {
        self.buffer.as_mut()[field::IDENT].copy_from_slice(&value.to_be_bytes())
    }

    fn set_flags_offset(&mut self, value: u16) {
        self.buffer.as_mut()[field::FLG_OFF].copy_from_slice(&value.to_be_bytes())
    }

    fn set_flag(&mut self, flag: u16, value: bool) {
        let v = self.flags_offset();
        self.set_flags_offset(if value { v | flag } else { v & !flag })
    }

    /// Set the reserved flag bit.
    pub fn set_reserved_flag(&mut self, value: bool) {
        self.set_flag(FLAG_RESERVED, value)
    }

    /// Set Don't Fragment.
    pub fn set_dont_frag(&mut self, value: bool) {
        self.set_flag(FLAG_DF, value)
    }

    /// Set More Fragments.
    pub fn set_more_frags(&mut self, value: bool) {
        self.set_flag(FLAG_MF, value)
    }

    /// Set the fragment offset in 8-octet units (low 13 bits used).
    pub fn set_frag_offset(&mut self, value: u16) {
        let v = (self.flags_offset() & !OFFSET_MASK) | (value & OFFSET_MASK);
        self.set_flags_offset(v)
    }

    /// Set the TTL.
    pub fn set_ttl(&mut self, value: u8) {
        self.buffer.as_mut()[field::TTL] = value
    }

    /// Set the protocol.
    pub fn set_protocol(&mut self, value: IpProtocol) {
        self.buffer.as_mut()[field::PROTOCOL] = value.0
    }

    /// Set the checksum field.
    pub fn set_checksum(&mut self, value: u16) {
        self.buffer.as_mut()[field::CHECKSUM].copy_from_slice(&value.to_be_bytes())
    }

    /// Set the source address.
    pub fn set_src_addr(&mut self, value: Ipv4Addr) {
        self.buffer.as_mut()[field::SRC_ADDR].copy_from_slice(&value.octets())
    }

    /// Set the destination address.
    pub fn set_dst_addr(&mut self, value: Ipv4Addr) {
        self.buffer.as_mut()[field::DST_ADDR].copy_from_slice(&value.octets())
    }

    /// The option bytes, mutably (their length follows the header length field).
    pub fn options_mut(&mut self) -> &mut [u8] {
        let end = self.header_len();
        &mut self.buffer.as_mut()[field::OPTIONS..end]
    }

    /// Compute and store the header checksum.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let c = checksum::checksum(&self.buffer.as_ref()[..self.header_len()]);
        self.set_checksum(c)
    }

    /// The payload (up to the total length), mutably.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (start, end) = (self.header_len(), usize::from(self.total_len()));
        &mut self.buffer.as_mut()[start..end]
    }
}

/// One IPv4 option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv4Option<'a> {
    /// End of Option List (type 0); anything after it is padding.
    EndOfList,
    /// No Operation (type 1), used to align later options.
    NoOperation,
    /// Any other option: its type octet and the data after the length octet.
    Other {
        /// The option type octet (copied flag, class, number).
        kind: u8,
        /// The option data, without the type and length octets.
        data: &'a [u8],
    },
}

/// Option type: End of Option List.
pub const OPT_END: u8 = 0;
/// Option type: No Operation.
pub const OPT_NOP: u8 = 1;

/// An iterator over IPv4 options.
///
/// Yields `Err(BadOption)` once, then stops, on a TLV whose length octet is
/// missing, below 2, or runs past the options; stops after End of Option List.
#[derive(Debug, Clone)]
pub struct Ipv4Options<'a> {
    data: &'a [u8],
}

impl<'a> Ipv4Options<'a> {
    /// Iterate over raw option bytes.
    pub const fn new(data: &'a [u8]) -> Self {
        Ipv4Options { data }
    }
}

impl<'a> Iterator for Ipv4Options<'a> {
    type Item = Result<Ipv4Option<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        let (&kind, rest) = self.data.split_first()?;
        match kind {
            OPT_END => {
                self.data = &[];
                Some(Ok(Ipv4Option::EndOfList))
            }
            OPT_NOP => {
                self.data = rest;
                Some(Ok(Ipv4Option::NoOperation))
            }
            _ => {
                let len = rest.first().map(|&l| usize::from(l));
                match len {
                    Some(len) if len >= 2 && len <= self.data.len() => {
                        let data = &self.data[2..len];
                        self.data = &self.data[len..];
                        Some(Ok(Ipv4Option::Other { kind, data }))
                    }
                    _ => {
                        self.data = &[];
                        Some(Err(err(ErrorKind::BadOption)))
                    }
                }
            }
        }
    }
}

/// A parsed IPv4 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Repr<'a> {
    /// Source address.
    pub src_addr: Ipv4Addr,
    /// Destination address.
    pub dst_addr: Ipv4Addr,
    /// Upper-layer protocol.
    pub protocol: IpProtocol,
    /// Payload length in bytes (total length less the header).
    pub payload_len: usize,
    /// Time to live.
    pub ttl: u8,
    /// DSCP (6 bits).
    pub dscp: u8,
    /// ECN (2 bits).
    pub ecn: u8,
    /// Identification.
    pub ident: u16,
    /// Don't Fragment.
    pub dont_frag: bool,
    /// More Fragments.
    pub more_frags: bool,
    /// Fragment offset in 8-octet units, as on the wire.
    pub frag_offset: u16,
    /// Raw option bytes, emitted verbatim (zero-padded to a multiple of 4).
    pub options: &'a [u8],
}

impl<'a> Ipv4Repr<'a> {
    /// Parse a header.
    ///
    /// Besides the length checks of [`Packet::check_len`], rejects a set
    /// reserved flag ([`ErrorKind::BadValue`]; RFC 791 requires it clear and
    /// this type cannot carry it) and malformed options
    /// ([`ErrorKind::BadOption`]). The checksum is *not* verified here, so that
    /// a caller can count bad checksums separately with
    /// [`Packet::verify_checksum`].
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&'a T>) -> Result<Ipv4Repr<'a>> {
        packet.check_len()?;
        if packet.reserved_flag() {
            return Err(err(ErrorKind::BadValue));
        }
        let buf: &'a [u8] = packet.buffer.as_ref();
        // check_len guarantees 20 <= header_len <= min(total_len, buffer length), so
        // the slice and the payload_len subtraction below cannot fail.
        let options = &buf[field::OPTIONS..packet.header_len()];
        for opt in Ipv4Options::new(options) {
            opt?;
        }
        Ok(Ipv4Repr {
            src_addr: packet.src_addr(),
            dst_addr: packet.dst_addr(),
            protocol: packet.protocol(),
            payload_len: usize::from(packet.total_len()) - packet.header_len(),
            ttl: packet.ttl(),
            dscp: packet.dscp(),
            ecn: packet.ecn(),
            ident: packet.ident(),
            dont_frag: packet.dont_frag(),
            more_frags: packet.more_frags(),
            frag_offset: packet.frag_offset(),
            options,
        })
    }

    /// The header length: 20 plus the options rounded up to a multiple of 4.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN + self.options.len().div_ceil(4) * 4
    }

    /// Write the header (options verbatim, then zero padding, then the
    /// checksum) into a buffer at least [`Self::buffer_len`] long. The payload
    /// is left alone.
    ///
    /// # Panics
    /// If the options exceed [`MAX_OPTIONS_LEN`], if header plus payload
    /// exceeds 65535 bytes, or if the buffer is shorter than the header.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        assert!(
            self.options.len() <= MAX_OPTIONS_LEN,
            "IPv4 options longer than 40 bytes"
        );
        let header_len = self.buffer_len();
        let total_len = u16::try_from(header_len + self.payload_len).expect("IPv4 total length over 65535");
        packet.set_version(4);
        packet.set_header_len(header_len);
        packet.set_dscp(self.dscp);
        packet.set_ecn(self.ecn);
        packet.set_total_len(total_len);
        packet.set_ident(self.ident);
        let flags = if self.dont_frag { FLAG_DF } else { 0 } | if self.more_frags { FLAG_MF } else { 0 };
        packet.set_flags_offset(flags | (self.frag_offset & OFFSET_MASK));
        packet.set_ttl(self.ttl);
        packet.set_protocol(self.protocol);
        packet.set_src_addr(self.src_addr);
        packet.set_dst_addr(self.dst_addr);
        let opts = &mut packet.buffer.as_mut()[field::OPTIONS..header_len];
        opts[..self.options.len()].copy_from_slice(self.options);
        opts[self.options.len()..].fill(OPT_END);
        packet.fill_checksum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ICMP echo request 192.168.1.1 -> 192.168.1.2 (valid checksum 0x9b47),
    /// followed by 6 bytes of Ethernet padding that are not payload.
    const PING: [u8; 34] = [
        0x45, 0x00, 0x00, 0x1c, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x01, 0x9b, 0x47, //
        0xc0, 0xa8, 0x01, 0x01, 0xc0, 0xa8, 0x01, 0x02, // addresses
        0x08, 0x00, 0xf7, 0xff, 0x00, 0x00, 0x00, 0x00, // ICMP echo
        0, 0, 0, 0, 0, 0, // padding
    ];

    /// A header with options: Router Alert (RFC 2113), NOP, EOL, padding; a
    /// fragment (MF set, offset 185 = 1480 bytes) of UDP, ECN CE, DSCP EF.
    fn with_options() -> Vec<u8> {
        let mut p = vec![
            0x47, 0xbb, 0x00, 0x20, 0xbe, 0xef, 0x20, 0xb9, 0x01, 0x11, 0x00, 0x00, //
            10, 0, 0, 1, 10, 0, 0, 2, //
            0x94, 0x04, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, // RA, NOP, EOL, pad
            0xde, 0xad, 0xbe, 0xef,
        ];
        Packet::new_unchecked(&mut p[..]).fill_checksum();
        p
    }

    #[test]
    fn fields_of_a_real_ping() {
        let p = Packet::new_checked(&PING[..]).unwrap();
        assert_eq!((p.version(), p.header_len(), p.total_len()), (4, 20, 28));
        assert_eq!((p.dscp(), p.ecn(), p.ident(), p.ttl()), (0, 0, 0x1c46, 64));
        assert!(p.dont_frag() && !p.more_frags() && !p.is_fragment() && p.is_first_fragment());
        assert_eq!(p.protocol(), IpProtocol::ICMP);
        assert_eq!(p.src_addr(), Ipv4Addr::new(192, 168, 1, 1));
        assert_eq!(p.dst_addr(), Ipv4Addr::new(192, 168, 1, 2));
        assert_eq!(p.checksum(), 0x9b47);
        assert!(p.verify_checksum());
        assert_eq!(p.payload(), &PING[20..28]);
        assert!(p.options().is_empty());
    }

    #[test]
    fn parse_emit_is_byte_exact() {
        let opts = with_options();
        for bytes in [&PING[..28], &opts[..]] {
            let p = Packet::new_checked(bytes).unwrap();
            assert!(p.verify_checksum());
            let repr = Ipv4Repr::parse(&p).unwrap();
            assert_eq!(repr.buffer_len(), p.header_len());
            let mut out = vec![0u8; bytes.len()];
            out[repr.buffer_len()..].copy_from_slice(p.payload());
            repr.emit(&mut Packet::new_unchecked(&mut out[..]));
            assert_eq!(out, bytes);
        }
    }

    #[test]
    fn options_and_fragment_fields() {
        let bytes = with_options();
        let p = Packet::new_checked(&bytes[..]).unwrap();
        let repr = Ipv4Repr::parse(&p).unwrap();
        assert_eq!((repr.dscp, repr.ecn), (46, 3));
        assert!(repr.more_frags && !repr.dont_frag);
        assert_eq!((repr.frag_offset, p.frag_offset_bytes()), (185, 1480));
        assert!(p.is_fragment() && !p.is_first_fragment());
        assert_eq!(repr.payload_len, 4);
        let opts: Vec<_> = p.option_iter().collect::<Result<_>>().unwrap();
        assert_eq!(
            opts,
            [
                Ipv4Option::Other {
                    kind: 0x94,
                    data: &[0, 0]
                },
                Ipv4Option::NoOperation,
                Ipv4Option::EndOfList
            ]
        );
    }

    #[test]
    fn emit_pads_options_and_fills_checksum() {
        let repr = Ipv4Repr {
            src_addr: Ipv4Addr::new(10, 1, 1, 1),
            dst_addr: Ipv4Addr::new(10, 2, 2, 2),
            protocol: IpProtocol::TCP,
            payload_len: 0,
            ttl: 1,
            dscp: 0,
            ecn: 0,
            ident: 7,
            dont_frag: false,
            more_frags: false,
            frag_offset: 0,
            options: &[0x94, 0x04, 0x00],
        };
        assert_eq!(repr.buffer_len(), 24);
        let mut out = [0xffu8; 24];
        repr.emit(&mut Packet::new_unchecked(&mut out[..]));
        let p = Packet::new_checked(&out[..]).unwrap();
        assert!(p.verify_checksum());
        assert_eq!(p.options(), &[0x94, 0x04, 0x00, 0x00]);
        assert_eq!(Ipv4Repr::parse(&p).unwrap().options, &[0x94, 0x04, 0x00, 0x00]);
    }

    #[test]
    fn checksum_detects_corruption_and_fill_repairs() {
        let mut bytes = PING;
        bytes[8] = 63; // TTL decremented without updating the checksum
        let mut p = Packet::new_checked(&mut bytes[..]).unwrap();
        assert!(!p.verify_checksum());
        p.fill_checksum();
        assert!(p.verify_checksum());
        // Matches the RFC 1624 incremental update of the same change.
        let expect = checksum::update16(0x9b47, 0x4001, 0x3f01);
        assert_eq!(p.checksum(), expect);
    }

    #[test]
    fn known_good_header_checksum() {
        // The worked example of the IPv4 header checksum article on Wikipedia
        // (a captured UDP packet): checksum 0xb861.
        let mut b = [0u8; 0x73];
        b[..20].copy_from_slice(&[
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, //
            0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ]);
        let mut p = Packet::new_checked(&mut b[..]).unwrap();
        assert!(p.verify_checksum());
        p.set_checksum(0);
        assert!(!p.verify_checksum());
        p.fill_checksum();
        assert_eq!(p.checksum(), 0xb861);
    }

    #[test]
    fn every_truncation_is_an_error() {
        for bytes in [&PING[..28], &with_options()[..]] {
            for n in 0..bytes.len() {
                assert!(Packet::new_checked(&bytes[..n]).is_err(), "len {n}");
            }
            assert_eq!(
                Packet::new_checked(&bytes[..bytes.len() - 1]).unwrap_err().kind(),
                ErrorKind::Truncated
            );
        }
    }

    /// A corruption of a good header and the error it must produce.
    type Case = (fn(&mut [u8]), ErrorKind);

    #[test]
    fn bad_headers() {
        let cases: &[Case] = &[
            (|b| b[0] = 0x65, ErrorKind::BadVersion),
            (|b| b[0] = 0x44, ErrorKind::BadHeaderLength),
            (|b| b[0] = 0x40, ErrorKind::BadHeaderLength),
            // IHL 7 (28 bytes) > total length 28? no: equal is fine; IHL 8 is not.
            (|b| b[0] = 0x48, ErrorKind::BadHeaderLength),
            // total length 19, below the header
            (|b| b[3] = 19, ErrorKind::BadHeaderLength),
            // total length 35 > buffer of 34
            (|b| b[3] = 35, ErrorKind::Truncated),
        ];
        for (i, (mutate, kind)) in cases.iter().enumerate() {
            let mut b = PING;
            mutate(&mut b);
            assert_eq!(Packet::new_checked(&b[..]).unwrap_err(), err(*kind), "case {i}");
        }
        // IHL 15 (60 bytes) with total length 60 but only 34 bytes captured.
        let mut b = PING;
        b[0] = 0x4f;
        b[3] = 60;
        assert_eq!(
            Packet::new_checked(&b[..]).unwrap_err(),
            err(ErrorKind::BadHeaderLength)
        );
        // The reserved flag is readable but not representable.
        let mut b = PING;
        b[6] |= 0x80;
        let p = Packet::new_checked(&b[..]).unwrap();
        assert!(p.reserved_flag());
        assert_eq!(Ipv4Repr::parse(&p).unwrap_err(), err(ErrorKind::BadValue));
    }

    #[test]
    fn malformed_options() {
        let cases: &[&[u8]] = &[
            &[0x94],                   // length octet missing
            &[0x94, 0x01, 0, 0],       // length below 2
            &[0x01, 0x94, 0x05, 0, 0], // length past the end
            &[0x83, 0x00, 0, 0],       // length zero
        ];
        for (i, opts) in cases.iter().enumerate() {
            let results: Vec<_> = Ipv4Options::new(opts).collect();
            assert_eq!(results.last(), Some(&Err(err(ErrorKind::BadOption))), "case {i}");
            assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
        }
        // The same bad options inside a header make Repr::parse fail.
        let mut b = with_options();
        b[21] = 0x09;
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(Ipv4Repr::parse(&p).unwrap_err(), err(ErrorKind::BadOption));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(mut data in proptest::collection::vec(proptest::num::u8::ANY, 0..80)) {
            // Steer half the cases to a plausible version/IHL/length so the
            // accessors, not just check_len, are exercised.
            if data.len() >= 20 && data[1] & 1 == 0 {
                let ihl = (data[0] & 0x0f).clamp(5, (data.len() / 4).min(15) as u8);
                data[0] = 0x40 | ihl;
                let hl = usize::from(ihl) * 4;
                let total = hl + usize::from(data[2]) % (data.len() - hl + 1);
                data[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                data[6] &= 0x7f;
            }
            if let Ok(p) = Packet::new_checked(&data[..]) {
                let _ = (p.version(), p.ihl(), p.dscp(), p.ecn(), p.total_len(), p.ident());
                let _ = (p.dont_frag(), p.more_frags(), p.frag_offset(), p.is_fragment(), p.is_first_fragment());
                let _ = (p.ttl(), p.protocol(), p.checksum(), p.src_addr(), p.dst_addr());
                let _ = (p.options(), p.payload(), p.verify_checksum());
                for o in p.option_iter() {
                    let _ = o;
                }
                if let Ok(repr) = Ipv4Repr::parse(&p) {
                    proptest::prop_assert_eq!(repr.buffer_len(), p.header_len());
                    // With a valid checksum, parse→emit reproduces the header exactly.
                    let hl = p.header_len();
                    let mut good = data[..hl].to_vec();
                    Packet::new_unchecked(&mut good[..]).fill_checksum();
                    let mut out = vec![0u8; usize::from(p.total_len())];
                    repr.emit(&mut Packet::new_unchecked(&mut out[..]));
                    proptest::prop_assert_eq!(&out[..hl], &good[..]);
                }
            }
        }
    }
}

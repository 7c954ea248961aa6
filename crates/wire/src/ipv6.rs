//! IPv6 fixed headers (RFC 8200 section 3).
//!
//! [`Packet`] views the 40-byte fixed header and its payload, bounded by the
//! payload length (anything after it is link-layer padding). Extension headers
//! are parsed by [`crate::ipv6ext`], starting from [`Packet::next_header`] and
//! [`Packet::payload`].
//!
//! Length checks ([`Packet::check_len`]), in order: fewer than 40 bytes is
//! [`ErrorKind::Truncated`]; a version other than 6 is
//! [`ErrorKind::BadVersion`]; a payload length of zero followed by a
//! Hop-by-Hop header is a jumbogram (RFC 2675), which Palisade does not
//! support (no virtual link carries one), so it is [`ErrorKind::BadLength`];
//! a payload running past the buffer is [`ErrorKind::Truncated`], as for
//! IPv4.

use core::net::Ipv6Addr;

use crate::ip::IpProtocol;
use crate::{Error, ErrorKind, Layer, Result};

/// Byte ranges of the fixed header fields.
mod field {
    use crate::field::Field;
    pub const VER_TC_FLOW: Field = 0..4;
    pub const LENGTH: Field = 4..6;
    pub const NXT_HDR: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC_ADDR: Field = 8..24;
    pub const DST_ADDR: Field = 24..40;
    pub const PAYLOAD: usize = 40;
}

/// Length of the fixed header.
pub const HEADER_LEN: usize = field::PAYLOAD;

const fn err(kind: ErrorKind) -> Error {
    Error::new(Layer::Ipv6, kind)
}

/// A read/write view of an IPv6 packet.
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

    /// Wrap a buffer, checking the version and payload length (see the module docs).
    pub fn new_checked(buffer: T) -> Result<Packet<T>> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Check the version and the payload length against the buffer.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(err(ErrorKind::Truncated));
        }
        if self.version() != 6 {
            return Err(err(ErrorKind::BadVersion));
        }
        if self.payload_len() == 0 && self.next_header() == IpProtocol::HOPOPT {
            return Err(err(ErrorKind::BadLength));
        }
        if HEADER_LEN + usize::from(self.payload_len()) > len {
            return Err(err(ErrorKind::Truncated));
        }
        Ok(())
    }

    /// Give back the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn ver_tc_flow(&self) -> u32 {
        let d = &self.buffer.as_ref()[field::VER_TC_FLOW];
        u32::from_be_bytes([d[0], d[1], d[2], d[3]])
    }

    /// The version field (6 for a checked packet).
    pub fn version(&self) -> u8 {
        (self.ver_tc_flow() >> 28) as u8
    }

    /// The traffic class (DSCP and ECN).
    pub fn traffic_class(&self) -> u8 {
        (self.ver_tc_flow() >> 20) as u8
    }

    /// The DSCP part of the traffic class.
    pub fn dscp(&self) -> u8 {
        self.traffic_class() >> 2
    }

    /// The ECN part of the traffic class.
    pub fn ecn(&self) -> u8 {
        self.traffic_class() & 0x03
    }

    /// The 20-bit flow label.
    pub fn flow_label(&self) -> u32 {
        self.ver_tc_flow() & 0x000f_ffff
    }

    /// The payload length (extension headers included) in bytes.
    pub fn payload_len(&self) -> u16 {
        let d = &self.buffer.as_ref()[field::LENGTH];
        u16::from_be_bytes([d[0], d[1]])
    }

    /// The type of the first extension header or of the upper-layer header.
    pub fn next_header(&self) -> IpProtocol {
        IpProtocol(self.buffer.as_ref()[field::NXT_HDR])
    }

    /// The hop limit.
    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[field::HOP_LIMIT]
    }

    /// The source address.
    pub fn src_addr(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.buffer.as_ref()[field::SRC_ADDR]);
        Ipv6Addr::from(a)
    }

    /// The destination address.
    pub fn dst_addr(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.buffer.as_ref()[field::DST_ADDR]);
        Ipv6Addr::from(a)
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Packet<&'a T> {
    /// The payload (extension headers and upper layer), up to the payload length.
    pub fn payload(&self) -> &'a [u8] {
        let end = HEADER_LEN + usize::from(self.payload_len());
        &self.buffer.as_ref()[HEADER_LEN..end]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn set_ver_tc_flow(&mut self, value: u32) {
        self.buffer.as_mut()[field::VER_TC_FLOW].copy_from_slice(&value.to_be_bytes())
    }

    /// Set the version (low 4 bits used).
    pub fn set_version(&mut self, value: u8) {
        let v = (self.ver_tc_flow() & 0x0fff_ffff) | (u32::from(value & 0x0f) << 28);
        self.set_ver_tc_flow(v)
    }

    /// Set the traffic class.
    pub fn set_traffic_class(&mut self, value: u8) {
        let v = (self.ver_tc_flow() & 0xf00f_ffff) | (u32::from(value) << 20);
        self.set_ver_tc_flow(v)
    }

    /// Set the flow label (low 20 bits used).
    pub fn set_flow_label(&mut self, value: u32) {
        let v = (self.ver_tc_flow() & 0xfff0_0000) | (value & 0x000f_ffff);
        self.set_ver_tc_flow(v)
    }

    /// Set the payload length.
    pub fn set_payload_len(&mut self, value: u16) {
        self.buffer.as_mut()[field::LENGTH].copy_from_slice(&value.to_be_bytes())
    }

    /// Set the next header.
    pub fn set_next_header(&mut self, value: IpProtocol) {
        self.buffer.as_mut()[field::NXT_HDR] = value.0
    }

    /// Set the hop limit.
    pub fn set_hop_limit(&mut self, value: u8) {
        self.buffer.as_mut()[field::HOP_LIMIT] = value
    }

    /// Set the source address.
    pub fn set_src_addr(&mut self, value: Ipv6Addr) {
        self.buffer.as_mut()[field::SRC_ADDR].copy_from_slice(&value.octets())
    }

    /// Set the destination address.
    pub fn set_dst_addr(&mut self, value: Ipv6Addr) {
        self.buffer.as_mut()[field::DST_ADDR].copy_from_slice(&value.octets())
    }

    /// The payload (up to the payload length), mutably.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = HEADER_LEN + usize::from(self.payload_len());
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }
}

/// A parsed IPv6 fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv6Repr {
    /// Source address.
    pub src_addr: Ipv6Addr,
    /// Destination address.
    pub dst_addr: Ipv6Addr,
    /// The first extension header or upper-layer protocol.
    pub next_header: IpProtocol,
    /// Payload length in bytes (extension headers included).
    pub payload_len: usize,
    /// Hop limit.
    pub hop_limit: u8,
    /// Traffic class (DSCP << 2 | ECN).
    pub traffic_class: u8,
    /// Flow label (20 bits).
    pub flow_label: u32,
}

impl Ipv6Repr {
    /// Parse a fixed header.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&T>) -> Result<Ipv6Repr> {
        packet.check_len()?;
        Ok(Ipv6Repr {
            src_addr: packet.src_addr(),
            dst_addr: packet.dst_addr(),
            next_header: packet.next_header(),
            payload_len: usize::from(packet.payload_len()),
            hop_limit: packet.hop_limit(),
            traffic_class: packet.traffic_class(),
            flow_label: packet.flow_label(),
        })
    }

    /// The fixed header length, 40.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Write the fixed header into a buffer at least [`Self::buffer_len`] long.
    ///
    /// # Panics
    /// If `payload_len` exceeds 65535 (jumbograms are not supported) or the
    /// buffer is shorter than the header.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        let payload_len = u16::try_from(self.payload_len).expect("IPv6 payload length over 65535");
        packet.set_ver_tc_flow(0x6000_0000 | (u32::from(self.traffic_class) << 20) | (self.flow_label & 0x000f_ffff));
        packet.set_payload_len(payload_len);
        packet.set_next_header(self.next_header);
        packet.set_hop_limit(self.hop_limit);
        packet.set_src_addr(self.src_addr);
        packet.set_dst_addr(self.dst_addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ICMPv6 echo request fe80::1 -> ff02::1, traffic class 0xb8 (EF),
    /// flow label 0x12345, hop limit 64, payload 8 bytes, then 2 bytes of
    /// link-layer padding.
    const PING6: [u8; 50] = [
        0x6b, 0x81, 0x23, 0x45, 0x00, 0x08, 0x3a, 0x40, //
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, //
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, //
        0x80, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01, //
        0xee, 0xee,
    ];

    #[test]
    fn fields() {
        let p = Packet::new_checked(&PING6[..]).unwrap();
        assert_eq!((p.version(), p.traffic_class(), p.dscp(), p.ecn()), (6, 0xb8, 46, 0));
        assert_eq!(p.flow_label(), 0x12345);
        assert_eq!(
            (p.payload_len(), p.next_header(), p.hop_limit()),
            (8, IpProtocol::ICMPV6, 64)
        );
        assert_eq!(p.src_addr(), "fe80::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.dst_addr(), "ff02::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.payload(), &PING6[40..48]);
    }

    #[test]
    fn parse_emit_is_byte_exact() {
        let p = Packet::new_checked(&PING6[..]).unwrap();
        let repr = Ipv6Repr::parse(&p).unwrap();
        let mut out = PING6;
        out[..40].fill(0);
        repr.emit(&mut Packet::new_unchecked(&mut out[..]));
        assert_eq!(out, PING6);
    }

    #[test]
    fn setters_keep_neighbouring_bits() {
        let mut b = PING6;
        let mut p = Packet::new_unchecked(&mut b[..]);
        p.set_flow_label(0xfffff);
        assert_eq!((p.version(), p.traffic_class(), p.flow_label()), (6, 0xb8, 0xfffff));
        p.set_traffic_class(0x01);
        assert_eq!((p.version(), p.traffic_class(), p.flow_label()), (6, 0x01, 0xfffff));
        p.set_version(4);
        assert_eq!((p.version(), p.traffic_class(), p.flow_label()), (4, 0x01, 0xfffff));
    }

    #[test]
    fn every_truncation_is_an_error() {
        for n in 0..48 {
            assert_eq!(
                Packet::new_checked(&PING6[..n]).unwrap_err(),
                err(ErrorKind::Truncated),
                "len {n}"
            );
        }
    }

    #[test]
    fn bad_headers() {
        let mut b = PING6;
        b[0] = 0x4b;
        assert_eq!(Packet::new_checked(&b[..]).unwrap_err(), err(ErrorKind::BadVersion));
        // Jumbogram: payload length 0 with a Hop-by-Hop header.
        let mut b = PING6;
        b[4..7].copy_from_slice(&[0, 0, 0]);
        assert_eq!(Packet::new_checked(&b[..]).unwrap_err(), err(ErrorKind::BadLength));
        // Payload length 0 with No Next Header is fine and has an empty payload.
        b[6] = 59;
        assert!(Packet::new_checked(&b[..]).unwrap().payload().is_empty());
        // Payload length past the buffer.
        let mut b = PING6;
        b[5] = 11;
        assert_eq!(Packet::new_checked(&b[..]).unwrap_err(), err(ErrorKind::Truncated));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(mut data in proptest::collection::vec(proptest::num::u8::ANY, 0..72)) {
            if data.len() >= 40 && data[1] & 1 == 0 {
                data[0] = 0x60 | (data[0] & 0x0f);
                let plen = (data[4] as usize % (data.len() - 39)) as u16;
                data[4..6].copy_from_slice(&plen.to_be_bytes());
            }
            if let Ok(p) = Packet::new_checked(&data[..]) {
                let _ = (p.version(), p.traffic_class(), p.flow_label(), p.payload_len(), p.next_header());
                let _ = (p.hop_limit(), p.src_addr(), p.dst_addr(), p.payload());
                let repr = Ipv6Repr::parse(&p).unwrap();
                proptest::prop_assert_eq!(repr.payload_len, p.payload().len());
                let mut out = [0u8; HEADER_LEN];
                repr.emit(&mut Packet::new_unchecked(&mut out[..]));
                proptest::prop_assert_eq!(&out[..], &data[..HEADER_LEN]);
            }
        }
    }
}

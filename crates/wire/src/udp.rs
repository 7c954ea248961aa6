//! UDP datagrams (RFC 768) and their checksum over the IPv4/IPv6 pseudo-header.
//!
//! The view's buffer is the IP payload; the datagram proper is bounded by the
//! UDP length field, so trailing link-layer padding is never taken for payload.
//! A zero checksum means "not computed" over IPv4 and verifies; over IPv6 it is
//! invalid (RFC 8200 section 8.1) and fails [`Packet::verify_checksum`]. A
//! tunnel endpoint that accepts zero checksums on IPv6 (RFC 6935, as Linux's
//! `udp6zerocsumrx` does for VXLAN) checks `!has_checksum() || verify_checksum(..)`.

use core::net::IpAddr;

use crate::checksum;
use crate::field::{read_u16, write_u16};
use crate::{Error, ErrorKind, Layer, Result};

/// IP protocol number of UDP.
pub const PROTOCOL: u8 = 17;

/// Byte ranges of the header fields.
mod field {
    use crate::field::Field;
    pub const SRC_PORT: Field = 0..2;
    pub const DST_PORT: Field = 2..4;
    pub const LENGTH: Field = 4..6;
    pub const CHECKSUM: Field = 6..8;
    pub const PAYLOAD: usize = 8;
}

/// Length of the UDP header.
pub const HEADER_LEN: usize = field::PAYLOAD;

/// A read/write view of a UDP datagram.
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

    /// Wrap a buffer, checking the header and the length field.
    pub fn new_checked(buffer: T) -> Result<Packet<T>> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Check that the buffer holds a header and that the length field is
    /// at least the header length and no more than the buffer.
    pub fn check_len(&self) -> Result<()> {
        let buf_len = self.buffer.as_ref().len();
        if buf_len < HEADER_LEN {
            return Err(Error::new(Layer::Udp, ErrorKind::Truncated));
        }
        let len = usize::from(self.len());
        if len < HEADER_LEN || len > buf_len {
            return Err(Error::new(Layer::Udp, ErrorKind::BadLength));
        }
        Ok(())
    }

    /// Give back the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The source port.
    pub fn src_port(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::SRC_PORT)
    }

    /// The destination port.
    pub fn dst_port(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::DST_PORT)
    }

    /// The length field: header plus payload, in bytes.
    pub fn len(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::LENGTH)
    }

    /// Whether the length field is zero (always malformed; present for API symmetry with `len`).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The checksum field.
    pub fn checksum(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// Whether the sender computed a checksum (the field is not zero).
    pub fn has_checksum(&self) -> bool {
        self.checksum() != 0
    }

    /// The datagram as the length field bounds it (header included).
    fn datagram(&self) -> &[u8] {
        let buf = self.buffer.as_ref();
        // Bounded by the buffer so that even an unchecked view cannot slice out of range.
        &buf[..usize::from(self.len()).min(buf.len())]
    }

    /// Verify the checksum over the pseudo-header of `src`/`dst`.
    ///
    /// A zero checksum verifies over IPv4 ("none computed") and fails over
    /// IPv6. Addresses of different families are a caller bug and fail.
    pub fn verify_checksum(&self, src: IpAddr, dst: IpAddr) -> bool {
        if self.checksum() == 0 {
            return src.is_ipv4() && dst.is_ipv4();
        }
        let data = self.datagram();
        match checksum::pseudo_header(src, dst, PROTOCOL, data.len()) {
            Some(ph) => checksum::fold(checksum::combine(&[ph, checksum::sum(data)])) == 0xffff,
            None => false,
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Packet<&'a T> {
    /// The payload, bounded by the length field.
    pub fn payload(&self) -> &'a [u8] {
        let buf = self.buffer.as_ref();
        let d = &buf[field::LENGTH];
        let len = usize::from(u16::from_be_bytes([d[0], d[1]])).min(buf.len());
        // A checked view guarantees HEADER_LEN <= len; max() keeps an unchecked one in range.
        &buf[HEADER_LEN..len.max(HEADER_LEN)]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Set the source port.
    pub fn set_src_port(&mut self, value: u16) {
        write_u16(self.buffer.as_mut(), field::SRC_PORT, value)
    }

    /// Set the destination port.
    pub fn set_dst_port(&mut self, value: u16) {
        write_u16(self.buffer.as_mut(), field::DST_PORT, value)
    }

    /// Set the length field.
    pub fn set_len(&mut self, value: u16) {
        write_u16(self.buffer.as_mut(), field::LENGTH, value)
    }

    /// Set the checksum field.
    pub fn set_checksum(&mut self, value: u16) {
        write_u16(self.buffer.as_mut(), field::CHECKSUM, value)
    }

    /// Compute and store the checksum over the pseudo-header of `src`/`dst`.
    ///
    /// A computed zero is sent as 0xffff (RFC 768), since zero means "none".
    /// Addresses of different families are a caller bug: the field is left zero.
    pub fn fill_checksum(&mut self, src: IpAddr, dst: IpAddr) {
        self.set_checksum(0);
        let data = self.datagram();
        let Some(ph) = checksum::pseudo_header(src, dst, PROTOCOL, data.len()) else {
            return;
        };
        let value = !checksum::fold(checksum::combine(&[ph, checksum::sum(data)]));
        self.set_checksum(if value == 0 { 0xffff } else { value });
    }

    /// The payload, bounded by the length field, mutably.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let len = usize::from(self.len());
        let buf = self.buffer.as_mut();
        let end = len.min(buf.len()).max(HEADER_LEN);
        &mut buf[HEADER_LEN..end]
    }
}

/// A parsed UDP datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UdpRepr<'a> {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// The payload.
    pub payload: &'a [u8],
}

impl<'a> UdpRepr<'a> {
    /// Parse a datagram. The checksum is not verified here: the caller decides
    /// (see [`Packet::verify_checksum`]), since offloaded packets may carry none.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&'a T>) -> Result<UdpRepr<'a>> {
        packet.check_len()?;
        Ok(UdpRepr {
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            payload: packet.payload(),
        })
    }

    /// Header plus payload length.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Write the datagram (header, payload and checksum over the pseudo-header
    /// of `src`/`dst`) into a buffer exactly [`Self::buffer_len`] long.
    ///
    /// A payload longer than 65527 bytes cannot be described by the length field;
    /// that is a caller bug (debug-asserted) and the length field is then wrong.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>, src: IpAddr, dst: IpAddr) {
        debug_assert!(self.buffer_len() <= usize::from(u16::MAX), "UDP datagram too long");
        packet.set_src_port(self.src_port);
        packet.set_dst_port(self.dst_port);
        packet.set_len(self.buffer_len() as u16);
        packet.payload_mut().copy_from_slice(self.payload);
        packet.fill_checksum(src, dst);
    }
}

#[cfg(test)]
mod tests {
    use core::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    /// DNS query 192.168.1.11:43966 -> 209.87.249.18:53 (tcpdump's dns_udp.pcap, frame 1).
    const DNS_V4: [u8; 64] = [
        0xab, 0xbe, 0x00, 0x35, 0x00, 0x40, 0x78, 0x24, 0x59, 0x34, 0x01, 0x20, 0x00, 0x01, 0x00, 0x00, //
        0x00, 0x00, 0x00, 0x01, 0x03, 0x77, 0x77, 0x77, 0x07, 0x74, 0x63, 0x70, 0x64, 0x75, 0x6d, 0x70, //
        0x03, 0x6f, 0x72, 0x67, 0x00, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x29, 0x10, 0x00, 0x00, 0x00, //
        0x00, 0x00, 0x00, 0x0c, 0x00, 0x0a, 0x00, 0x08, 0x42, 0xf5, 0xd0, 0x09, 0x96, 0xf9, 0x0b, 0x13,
    ];
    const DNS_V4_SRC: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 11));
    const DNS_V4_DST: IpAddr = IpAddr::V4(Ipv4Addr::new(209, 87, 249, 18));

    /// DHCPv6 Solicit fe80::201:2ff:fe03:405 -> ff02::1:2 (tcpdump's dhcpv6-ia-na.pcap, frame 1).
    const DHCP_V6: [u8; 56] = [
        0x02, 0x22, 0x02, 0x23, 0x00, 0x38, 0x11, 0x23, 0x01, 0x90, 0xb4, 0x5c, 0x00, 0x01, 0x00, 0x0a, //
        0x00, 0x03, 0x00, 0x01, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x00, 0x06, 0x00, 0x04, 0x00, 0x17, //
        0x00, 0x18, 0x00, 0x08, 0x00, 0x02, 0x00, 0x00, 0x00, 0x03, 0x00, 0x0c, 0x02, 0x03, 0x04, 0x05, //
        0x00, 0x00, 0x0e, 0x10, 0x00, 0x00, 0x15, 0x18,
    ];
    const DHCP_V6_SRC: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0x201, 0x2ff, 0xfe03, 0x405));
    const DHCP_V6_DST: IpAddr = IpAddr::V6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2));

    #[test]
    fn real_datagrams_parse_verify_and_round_trip() {
        let cases = [
            (&DNS_V4[..], DNS_V4_SRC, DNS_V4_DST, 43966, 53, 0x7824),
            (&DHCP_V6[..], DHCP_V6_SRC, DHCP_V6_DST, 546, 547, 0x1123),
        ];
        for (bytes, src, dst, sport, dport, check) in cases {
            let p = Packet::new_checked(bytes).unwrap();
            assert_eq!((p.src_port(), p.dst_port(), p.checksum()), (sport, dport, check));
            assert!(p.verify_checksum(src, dst));
            // Swapping in an address of the other family or a wrong address fails.
            assert!(!p.verify_checksum(dst, dst));
            assert!(!p.verify_checksum(src, if src.is_ipv4() { DHCP_V6_DST } else { DNS_V4_DST }));
            let repr = UdpRepr::parse(&p).unwrap();
            assert_eq!(repr.payload, &bytes[8..]);
            let mut out = vec![0xa5; repr.buffer_len()];
            repr.emit(&mut Packet::new_unchecked(&mut out[..]), src, dst);
            assert_eq!(out, bytes);
        }
    }

    #[test]
    fn payload_is_bounded_by_the_length_field() {
        let mut padded = DNS_V4.to_vec();
        padded.extend_from_slice(&[0, 0, 0, 0]);
        let p = Packet::new_checked(&padded[..]).unwrap();
        assert_eq!(p.payload(), &DNS_V4[8..]);
        assert!(p.verify_checksum(DNS_V4_SRC, DNS_V4_DST));
    }

    #[test]
    fn bad_lengths() {
        for n in 0..HEADER_LEN {
            assert_eq!(
                Packet::new_checked(&DNS_V4[..n]).unwrap_err(),
                Error::new(Layer::Udp, ErrorKind::Truncated)
            );
        }
        for n in HEADER_LEN..DNS_V4.len() {
            assert_eq!(
                Packet::new_checked(&DNS_V4[..n]).unwrap_err(),
                Error::new(Layer::Udp, ErrorKind::BadLength),
                "{n}"
            );
        }
        for len in [0u16, 7] {
            let mut b = DNS_V4;
            b[4..6].copy_from_slice(&len.to_be_bytes());
            assert_eq!(
                Packet::new_checked(&b[..]).unwrap_err(),
                Error::new(Layer::Udp, ErrorKind::BadLength)
            );
        }
    }

    #[test]
    fn zero_checksum_is_none_on_v4_and_invalid_on_v6() {
        let mut b = DNS_V4;
        b[6..8].copy_from_slice(&[0, 0]);
        let p = Packet::new_checked(&b[..]).unwrap();
        assert!(!p.has_checksum());
        assert!(p.verify_checksum(DNS_V4_SRC, DNS_V4_DST));
        let mut b = DHCP_V6;
        b[6..8].copy_from_slice(&[0, 0]);
        let p = Packet::new_checked(&b[..]).unwrap();
        assert!(!p.verify_checksum(DHCP_V6_SRC, DHCP_V6_DST));
    }

    #[test]
    fn corrupted_byte_fails_verification() {
        let mut b = DNS_V4;
        b[20] ^= 0x01;
        assert!(
            !Packet::new_checked(&b[..])
                .unwrap()
                .verify_checksum(DNS_V4_SRC, DNS_V4_DST)
        );
    }

    #[test]
    fn computed_zero_is_sent_as_ffff() {
        // With a zero payload word the checksum is C = !S, S the sum of everything
        // else; a payload word of C makes the sum S + !S = 0xffff, i.e. checksum 0.
        let src = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let dst = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        let mut payload = [0u8; 2];
        let mut buf = [0u8; 10];
        UdpRepr {
            src_port: 1,
            dst_port: 2,
            payload: &payload,
        }
        .emit(&mut Packet::new_unchecked(&mut buf[..]), src, dst);
        let c = u16::from_be_bytes([buf[6], buf[7]]);
        payload = c.to_be_bytes();
        UdpRepr {
            src_port: 1,
            dst_port: 2,
            payload: &payload,
        }
        .emit(&mut Packet::new_unchecked(&mut buf[..]), src, dst);
        assert_eq!(&buf[6..8], &[0xff, 0xff]);
        assert!(Packet::new_checked(&buf[..]).unwrap().verify_checksum(src, dst));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..80),
            length in 0u16..96,
        ) {
            // Random length fields are almost never plausible: half the time, use a small one.
            let mut bytes = bytes;
            if bytes.len() >= HEADER_LEN && length % 2 == 0 {
                bytes[4..6].copy_from_slice(&length.to_be_bytes());
            }
            if let Ok(p) = Packet::new_checked(&bytes[..]) {
                let _ = (p.src_port(), p.dst_port(), p.len(), p.checksum(), p.payload());
                let _ = p.verify_checksum(DNS_V4_SRC, DNS_V4_DST);
                let _ = p.verify_checksum(DHCP_V6_SRC, DHCP_V6_DST);
                let repr = UdpRepr::parse(&p).unwrap();
                proptest::prop_assert_eq!(repr.buffer_len(), usize::from(p.len()));
                let mut out = vec![0u8; repr.buffer_len()];
                repr.emit(&mut Packet::new_unchecked(&mut out[..]), DNS_V4_SRC, DNS_V4_DST);
                proptest::prop_assert_eq!(&out[..6], &bytes[..6]);
                proptest::prop_assert!(Packet::new_checked(&out[..]).unwrap().verify_checksum(DNS_V4_SRC, DNS_V4_DST));
            }
        }
    }
}

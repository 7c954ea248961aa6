//! ARP (RFC 826) and RARP (RFC 903) packets.
//!
//! RARP (EtherType 0x8035, sent by QEMU to announce a VM after live
//! migration) uses the same layout as ARP, so one view serves both; the
//! EtherType that told them apart is in the enclosing header.
//!
//! [`Packet`] reads the generic header (hardware and protocol types and
//! lengths, operation) and the four addresses as raw byte slices whose length
//! comes from the packet, so any hardware/protocol pair can be inspected.
//! [`ArpRepr`] is the owned form for the only pair Palisade acts on,
//! Ethernet/IPv4; any other pair is a [`ErrorKind::BadValue`].

use core::fmt;
use core::net::Ipv4Addr;

use crate::ethernet::{EtherType, EthernetAddress};
use crate::{Error, ErrorKind, Layer, Result};

/// An ARP hardware type.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Hardware(pub u16);

impl Hardware {
    /// Ethernet (10Mb and every later speed).
    pub const ETHERNET: Hardware = Hardware(1);
}

/// An ARP operation code.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Operation(pub u16);

impl Operation {
    /// ARP request.
    pub const REQUEST: Operation = Operation(1);
    /// ARP reply.
    pub const REPLY: Operation = Operation(2);
    /// RARP request ("request reverse"); QEMU's post-migration announce.
    pub const REVERSE_REQUEST: Operation = Operation(3);
    /// RARP reply.
    pub const REVERSE_REPLY: Operation = Operation(4);
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            1 => f.write_str("request"),
            2 => f.write_str("reply"),
            3 => f.write_str("reverse-request"),
            4 => f.write_str("reverse-reply"),
            n => write!(f, "{n}"),
        }
    }
}

/// Byte ranges of the fixed header; the addresses follow at offsets that
/// depend on the two length fields.
mod field {
    use crate::field::Field;
    pub const HTYPE: Field = 0..2;
    pub const PTYPE: Field = 2..4;
    pub const HLEN: usize = 4;
    pub const PLEN: usize = 5;
    pub const OPER: Field = 6..8;
    pub const ADDRESSES: usize = 8;
}

/// Length of the fixed header, before the addresses.
pub const FIXED_HEADER_LEN: usize = field::ADDRESSES;
/// Length of a whole Ethernet/IPv4 ARP packet.
pub const ETHERNET_IPV4_LEN: usize = FIXED_HEADER_LEN + 2 * (6 + 4);

/// A read/write view of an ARP or RARP packet.
///
/// Contract: once [`Packet::new_checked`] has succeeded, no accessor panics.
/// Bytes after the target protocol address (Ethernet minimum-frame padding)
/// are ignored.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wrap a buffer without checking its length; accessors may panic on a short buffer.
    pub const fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wrap a buffer, checking it holds the fixed header and all four addresses.
    pub fn new_checked(buffer: T) -> Result<Packet<T>> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Check that the buffer holds the fixed header and the four addresses
    /// whose lengths it declares.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < FIXED_HEADER_LEN || len < self.packet_len() {
            Err(Error::new(Layer::Arp, ErrorKind::Truncated))
        } else {
            Ok(())
        }
    }

    /// Give back the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The hardware type.
    pub fn hardware_type(&self) -> Hardware {
        let d = &self.buffer.as_ref()[field::HTYPE];
        Hardware(u16::from_be_bytes([d[0], d[1]]))
    }

    /// The protocol type (an EtherType).
    pub fn protocol_type(&self) -> EtherType {
        let d = &self.buffer.as_ref()[field::PTYPE];
        EtherType(u16::from_be_bytes([d[0], d[1]]))
    }

    /// The hardware address length in bytes.
    pub fn hardware_len(&self) -> u8 {
        self.buffer.as_ref()[field::HLEN]
    }

    /// The protocol address length in bytes.
    pub fn protocol_len(&self) -> u8 {
        self.buffer.as_ref()[field::PLEN]
    }

    /// The operation.
    pub fn operation(&self) -> Operation {
        let d = &self.buffer.as_ref()[field::OPER];
        Operation(u16::from_be_bytes([d[0], d[1]]))
    }

    /// The length of the packet the header declares: fixed header plus four addresses.
    pub fn packet_len(&self) -> usize {
        match self.buffer.as_ref().get(field::HLEN..=field::PLEN) {
            Some(&[h, p]) => FIXED_HEADER_LEN + 2 * (usize::from(h) + usize::from(p)),
            _ => FIXED_HEADER_LEN,
        }
    }

    /// Whether the header declares Ethernet hardware addresses and IPv4 protocol addresses.
    pub fn is_ethernet_ipv4(&self) -> bool {
        self.hardware_type() == Hardware::ETHERNET
            && self.protocol_type() == EtherType::IPV4
            && self.hardware_len() == 6
            && self.protocol_len() == 4
    }

    /// Range of the `index`th address (0 = SHA, 1 = SPA, 2 = THA, 3 = TPA).
    fn address_range(&self, index: usize) -> core::ops::Range<usize> {
        let h = usize::from(self.hardware_len());
        let p = usize::from(self.protocol_len());
        let (start, len) = match index {
            0 => (FIXED_HEADER_LEN, h),
            1 => (FIXED_HEADER_LEN + h, p),
            2 => (FIXED_HEADER_LEN + h + p, h),
            _ => (FIXED_HEADER_LEN + 2 * h + p, p),
        };
        start..start + len
    }

    /// The sender hardware address, `hardware_len` bytes.
    pub fn source_hardware_addr(&self) -> &[u8] {
        &self.buffer.as_ref()[self.address_range(0)]
    }

    /// The sender protocol address, `protocol_len` bytes.
    pub fn source_protocol_addr(&self) -> &[u8] {
        &self.buffer.as_ref()[self.address_range(1)]
    }

    /// The target hardware address, `hardware_len` bytes.
    pub fn target_hardware_addr(&self) -> &[u8] {
        &self.buffer.as_ref()[self.address_range(2)]
    }

    /// The target protocol address, `protocol_len` bytes.
    pub fn target_protocol_addr(&self) -> &[u8] {
        &self.buffer.as_ref()[self.address_range(3)]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Set the hardware type.
    pub fn set_hardware_type(&mut self, value: Hardware) {
        self.buffer.as_mut()[field::HTYPE].copy_from_slice(&value.0.to_be_bytes())
    }

    /// Set the protocol type.
    pub fn set_protocol_type(&mut self, value: EtherType) {
        self.buffer.as_mut()[field::PTYPE].copy_from_slice(&value.0.to_be_bytes())
    }

    /// Set the hardware address length (which moves every address after the first).
    pub fn set_hardware_len(&mut self, value: u8) {
        self.buffer.as_mut()[field::HLEN] = value
    }

    /// Set the protocol address length (which moves every address after the first).
    pub fn set_protocol_len(&mut self, value: u8) {
        self.buffer.as_mut()[field::PLEN] = value
    }

    /// Set the operation.
    pub fn set_operation(&mut self, value: Operation) {
        self.buffer.as_mut()[field::OPER].copy_from_slice(&value.0.to_be_bytes())
    }

    /// Set the sender hardware address; `value` must be `hardware_len` bytes.
    pub fn set_source_hardware_addr(&mut self, value: &[u8]) {
        let r = self.address_range(0);
        self.buffer.as_mut()[r].copy_from_slice(value)
    }

    /// Set the sender protocol address; `value` must be `protocol_len` bytes.
    pub fn set_source_protocol_addr(&mut self, value: &[u8]) {
        let r = self.address_range(1);
        self.buffer.as_mut()[r].copy_from_slice(value)
    }

    /// Set the target hardware address; `value` must be `hardware_len` bytes.
    pub fn set_target_hardware_addr(&mut self, value: &[u8]) {
        let r = self.address_range(2);
        self.buffer.as_mut()[r].copy_from_slice(value)
    }

    /// Set the target protocol address; `value` must be `protocol_len` bytes.
    pub fn set_target_protocol_addr(&mut self, value: &[u8]) {
        let r = self.address_range(3);
        self.buffer.as_mut()[r].copy_from_slice(value)
    }
}

/// A parsed Ethernet/IPv4 ARP or RARP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ArpRepr {
    /// The operation (request, reply, RARP request/reply, or another code).
    pub operation: Operation,
    /// Sender MAC.
    pub source_hardware_addr: EthernetAddress,
    /// Sender IPv4 address.
    pub source_protocol_addr: Ipv4Addr,
    /// Target MAC (zero in a request).
    pub target_hardware_addr: EthernetAddress,
    /// Target IPv4 address.
    pub target_protocol_addr: Ipv4Addr,
}

impl ArpRepr {
    /// Parse an Ethernet/IPv4 ARP or RARP packet.
    ///
    /// Any other hardware type, protocol type or address length is
    /// [`ErrorKind::BadValue`]: such packets can still be read through the view.
    /// Operation codes are not restricted; the caller decides what to do with
    /// codes other than 1–4.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&T>) -> Result<ArpRepr> {
        packet.check_len()?;
        if !packet.is_ethernet_ipv4() {
            return Err(Error::new(Layer::Arp, ErrorKind::BadValue));
        }
        // With hlen 6 and plen 4 (checked just above), the address slices are
        // exactly 6 and 4 bytes, so these conversions cannot fail.
        let ip = |s: &[u8]| Ipv4Addr::new(s[0], s[1], s[2], s[3]);
        Ok(ArpRepr {
            operation: packet.operation(),
            source_hardware_addr: EthernetAddress::from_bytes(packet.source_hardware_addr()),
            source_protocol_addr: ip(packet.source_protocol_addr()),
            target_hardware_addr: EthernetAddress::from_bytes(packet.target_hardware_addr()),
            target_protocol_addr: ip(packet.target_protocol_addr()),
        })
    }

    /// The packet length: [`ETHERNET_IPV4_LEN`].
    pub const fn buffer_len(&self) -> usize {
        ETHERNET_IPV4_LEN
    }

    /// Write the packet into a buffer at least [`Self::buffer_len`] long.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        packet.set_hardware_type(Hardware::ETHERNET);
        packet.set_protocol_type(EtherType::IPV4);
        packet.set_hardware_len(6);
        packet.set_protocol_len(4);
        packet.set_operation(self.operation);
        packet.set_source_hardware_addr(self.source_hardware_addr.as_bytes());
        packet.set_source_protocol_addr(&self.source_protocol_addr.octets());
        packet.set_target_hardware_addr(self.target_hardware_addr.as_bytes());
        packet.set_target_protocol_addr(&self.target_protocol_addr.octets());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request "who has 10.0.0.2? tell 10.0.0.1", padded to the Ethernet minimum.
    const REQUEST: [u8; 46] = {
        let mut b = [0u8; 46];
        let head = [
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, // Ethernet/IPv4, request
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 10, 0, 0, 1, // sender
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 10, 0, 0, 2, // target
        ];
        let mut i = 0;
        while i < head.len() {
            b[i] = head[i];
            i += 1;
        }
        b
    };

    /// QEMU's post-migration RARP announce (qemu_announce_self): sender and
    /// target are both the VM's MAC, protocol addresses zero.
    const RARP: [u8; 28] = [
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x03, //
        0x52, 0x54, 0x00, 0xab, 0xcd, 0xef, 0, 0, 0, 0, //
        0x52, 0x54, 0x00, 0xab, 0xcd, 0xef, 0, 0, 0, 0,
    ];

    #[test]
    fn round_trips() {
        for bytes in [&REQUEST[..], &RARP[..]] {
            let p = Packet::new_checked(bytes).unwrap();
            let repr = ArpRepr::parse(&p).unwrap();
            let mut out = [0u8; ETHERNET_IPV4_LEN];
            repr.emit(&mut Packet::new_unchecked(&mut out[..]));
            assert_eq!(out[..], bytes[..ETHERNET_IPV4_LEN]);
        }
    }

    #[test]
    fn request_fields() {
        let repr = ArpRepr::parse(&Packet::new_checked(&REQUEST[..]).unwrap()).unwrap();
        assert_eq!(repr.operation, Operation::REQUEST);
        assert_eq!(repr.source_hardware_addr.to_string(), "52:54:00:12:34:56");
        assert_eq!(repr.source_protocol_addr, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(repr.target_protocol_addr, Ipv4Addr::new(10, 0, 0, 2));
        let rarp = ArpRepr::parse(&Packet::new_checked(&RARP[..]).unwrap()).unwrap();
        assert_eq!(rarp.operation.to_string(), "reverse-request");
        assert_eq!(rarp.source_hardware_addr, rarp.target_hardware_addr);
    }

    #[test]
    fn short_buffers_are_truncated_not_panics() {
        for n in 0..ETHERNET_IPV4_LEN {
            let err = Packet::new_checked(&REQUEST[..n]).unwrap_err();
            assert_eq!(err, Error::new(Layer::Arp, ErrorKind::Truncated), "len {n}");
        }
    }

    #[test]
    fn other_types_are_readable_but_not_reprs() {
        // Hardware type 6 (IEEE 802), hlen 6, plen 4: readable, not an ArpRepr.
        let mut ieee = REQUEST;
        ieee[1] = 6;
        // IPv6 protocol type with plen 16: 8 + 2 * (6 + 16) = 52 bytes needed.
        let mut v6 = [0u8; 52];
        v6[..8].copy_from_slice(&[0x00, 0x01, 0x86, 0xdd, 6, 16, 0, 1]);
        v6[14..30].fill(0xaa);
        let mut plen5 = REQUEST;
        plen5[5] = 5;
        for bytes in [&ieee[..], &v6[..], &plen5[..]] {
            let p = Packet::new_checked(bytes).unwrap();
            assert!(!p.is_ethernet_ipv4());
            assert_eq!(
                ArpRepr::parse(&p).unwrap_err(),
                Error::new(Layer::Arp, ErrorKind::BadValue)
            );
        }
        let p = Packet::new_checked(&v6[..]).unwrap();
        assert_eq!(p.protocol_type(), EtherType::IPV6);
        assert_eq!(p.source_protocol_addr(), &[0xaa; 16]);
        assert_eq!(p.target_protocol_addr().len(), 16);
        // A declared length beyond the buffer is truncation.
        assert_eq!(
            Packet::new_checked(&v6[..51]).unwrap_err(),
            Error::new(Layer::Arp, ErrorKind::Truncated)
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(mut data in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            // Make half the long-enough cases Ethernet/IPv4 so ArpRepr::parse succeeds too.
            if data.len() >= ETHERNET_IPV4_LEN && data[7] & 1 == 0 {
                data[..6].copy_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4]);
            }
            if let Ok(p) = Packet::new_checked(&data[..]) {
                let _ = (p.hardware_type(), p.protocol_type(), p.hardware_len(), p.protocol_len(), p.operation());
                let _ = (p.source_hardware_addr(), p.source_protocol_addr());
                let _ = (p.target_hardware_addr(), p.target_protocol_addr());
                proptest::prop_assert_eq!(ArpRepr::parse(&p).is_ok(), p.is_ethernet_ipv4());
                if let Ok(repr) = ArpRepr::parse(&p) {
                    let mut out = [0u8; ETHERNET_IPV4_LEN];
                    repr.emit(&mut Packet::new_unchecked(&mut out[..]));
                    proptest::prop_assert_eq!(&out[..], &data[..ETHERNET_IPV4_LEN]);
                }
            }
        }
    }
}

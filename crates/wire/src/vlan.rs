//! IEEE 802.1Q (C-tag) and 802.1ad (S-tag, QinQ) VLAN tags.
//!
//! On the wire a tag is the 16-bit TPID (0x8100, 0x88a8, or the pre-standard
//! 0x9100) followed by the 16-bit TCI and the encapsulated EtherType. The TPID
//! sits where an untagged frame has its EtherType, so it is read by
//! [`crate::ethernet::Frame::ethertype`] (or by the previous tag's
//! [`Packet::ethertype`]); **the view in this module covers only the 4 bytes
//! that follow it**: TCI (PCP 3 bits, DEI 1 bit, VID 12 bits) then the inner
//! EtherType. A QinQ frame is thus Ethernet header, outer tag view, inner tag
//! view, payload.
//!
//! The frame dissector follows at most [`MAX_TAGS`] stacked tags.

use crate::ethernet::EtherType;
use crate::{Error, ErrorKind, Layer, Result};

/// The most tags the frame dissector follows (one 802.1ad S-tag plus one 802.1Q C-tag).
pub const MAX_TAGS: usize = 2;

/// Byte ranges of the tag fields (after the TPID).
mod field {
    use crate::field::Field;
    pub const TCI: Field = 0..2;
    pub const ETHERTYPE: Field = 2..4;
    pub const PAYLOAD: usize = 4;
}

/// Length of the part of a tag this module parses: TCI and inner EtherType.
pub const HEADER_LEN: usize = field::PAYLOAD;

/// VID 0: the frame carries a priority only and belongs to the port's native VLAN.
pub const VID_PRIORITY_ONLY: u16 = 0;
/// VID 0xfff: reserved by IEEE 802.1Q, never to be sent.
pub const VID_RESERVED: u16 = 0xfff;

/// A read/write view of a VLAN tag's TCI and inner EtherType.
///
/// Contract: once [`Packet::new_checked`] has succeeded, no accessor panics.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wrap a buffer without checking its length; accessors may panic on a short buffer.
    pub const fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wrap a buffer, checking it is long enough for the TCI and inner EtherType.
    pub fn new_checked(buffer: T) -> Result<Packet<T>> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Check that the buffer holds a whole tag.
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            Err(Error::new(Layer::Vlan, ErrorKind::Truncated))
        } else {
            Ok(())
        }
    }

    /// Give back the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The raw 16-bit Tag Control Information.
    pub fn tci(&self) -> u16 {
        let d = &self.buffer.as_ref()[field::TCI];
        u16::from_be_bytes([d[0], d[1]])
    }

    /// Priority Code Point (802.1p class of service), 0..=7.
    pub fn pcp(&self) -> u8 {
        (self.tci() >> 13) as u8
    }

    /// Drop Eligible Indicator (formerly CFI).
    pub fn dei(&self) -> bool {
        self.tci() & 0x1000 != 0
    }

    /// VLAN identifier, 0..=4095.
    pub fn vid(&self) -> u16 {
        self.tci() & 0x0fff
    }

    /// The EtherType of what follows the tag (another tag's TPID for QinQ).
    pub fn ethertype(&self) -> EtherType {
        let d = &self.buffer.as_ref()[field::ETHERTYPE];
        EtherType(u16::from_be_bytes([d[0], d[1]]))
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Packet<&'a T> {
    /// The bytes after the tag.
    pub fn payload(&self) -> &'a [u8] {
        &self.buffer.as_ref()[field::PAYLOAD..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Set the raw TCI.
    pub fn set_tci(&mut self, value: u16) {
        self.buffer.as_mut()[field::TCI].copy_from_slice(&value.to_be_bytes())
    }

    /// Set the PCP; only the low 3 bits of `value` are used.
    pub fn set_pcp(&mut self, value: u8) {
        let tci = (self.tci() & 0x1fff) | (u16::from(value & 0x7) << 13);
        self.set_tci(tci)
    }

    /// Set the DEI bit.
    pub fn set_dei(&mut self, value: bool) {
        let tci = (self.tci() & !0x1000) | if value { 0x1000 } else { 0 };
        self.set_tci(tci)
    }

    /// Set the VID; only the low 12 bits of `value` are used.
    pub fn set_vid(&mut self, value: u16) {
        let tci = (self.tci() & 0xf000) | (value & 0x0fff);
        self.set_tci(tci)
    }

    /// Set the inner EtherType.
    pub fn set_ethertype(&mut self, value: EtherType) {
        self.buffer.as_mut()[field::ETHERTYPE].copy_from_slice(&value.0.to_be_bytes())
    }

    /// The bytes after the tag, mutably.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD..]
    }
}

/// A parsed VLAN tag (without its TPID, which the enclosing header carries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VlanRepr {
    /// Priority Code Point, 0..=7.
    pub pcp: u8,
    /// Drop Eligible Indicator.
    pub dei: bool,
    /// VLAN identifier, 0..=4095. 0 means priority-tagged (native VLAN);
    /// 4095 is reserved but is accepted here so a policy can see and drop it.
    pub vid: u16,
    /// EtherType of what follows the tag.
    pub ethertype: EtherType,
}

impl VlanRepr {
    /// Parse a tag.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&T>) -> Result<VlanRepr> {
        packet.check_len()?;
        Ok(VlanRepr {
            pcp: packet.pcp(),
            dei: packet.dei(),
            vid: packet.vid(),
            ethertype: packet.ethertype(),
        })
    }

    /// The length of the tag body this module writes.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Write the tag into a buffer at least [`Self::buffer_len`] long.
    /// Out-of-range `pcp` and `vid` are masked to their field widths.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        let tci = (u16::from(self.pcp & 0x7) << 13) | if self.dei { 0x1000 } else { 0 } | (self.vid & 0x0fff);
        packet.set_tci(tci);
        packet.set_ethertype(self.ethertype);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ethernet::{EthernetRepr, Frame};

    /// A QinQ frame: S-tag VID 100 PCP 3, C-tag VID 4094 PCP 5 DEI, then IPv4.
    const QINQ: [u8; 26] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // dst
        0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // src
        0x88, 0xa8, // S-tag TPID
        0x60, 0x64, // PCP 3, DEI 0, VID 100
        0x81, 0x00, // C-tag TPID
        0xbf, 0xfe, // PCP 5, DEI 1, VID 4094
        0x08, 0x00, // IPv4
        0x45, 0x00, 0x00, 0x14,
    ];

    #[test]
    fn qinq_parse_and_emit_round_trip() {
        let eth = Frame::new_checked(&QINQ[..]).unwrap();
        assert!(EthernetRepr::parse(&eth).unwrap().ethertype.is_vlan_tag());
        let outer = Packet::new_checked(eth.payload()).unwrap();
        let outer_repr = VlanRepr::parse(&outer).unwrap();
        assert_eq!(
            outer_repr,
            VlanRepr {
                pcp: 3,
                dei: false,
                vid: 100,
                ethertype: EtherType::VLAN
            }
        );
        let inner = Packet::new_checked(outer.payload()).unwrap();
        let inner_repr = VlanRepr::parse(&inner).unwrap();
        assert_eq!(
            inner_repr,
            VlanRepr {
                pcp: 5,
                dei: true,
                vid: 4094,
                ethertype: EtherType::IPV4
            }
        );
        assert_eq!(inner.payload(), &QINQ[22..]);

        let mut out = QINQ;
        out[14..22].fill(0);
        outer_repr.emit(&mut Packet::new_unchecked(&mut out[14..18]));
        inner_repr.emit(&mut Packet::new_unchecked(&mut out[18..22]));
        assert_eq!(out, QINQ);
    }

    #[test]
    fn setters_touch_only_their_bits() {
        let mut buf = [0xffu8, 0xff, 0x86, 0xdd];
        let mut p = Packet::new_unchecked(&mut buf[..]);
        p.set_vid(0x123);
        assert_eq!(p.tci(), 0xf123);
        p.set_dei(false);
        assert_eq!(p.tci(), 0xe123);
        p.set_pcp(0);
        assert_eq!(p.tci(), 0x0123);
        p.set_pcp(0xff);
        assert_eq!((p.pcp(), p.dei(), p.vid()), (7, false, 0x123));
        assert_eq!(p.ethertype(), EtherType::IPV6);
    }

    #[test]
    fn emit_masks_out_of_range_fields() {
        let mut buf = [0u8; 4];
        VlanRepr {
            pcp: 9,
            dei: false,
            vid: 0x1fff,
            ethertype: EtherType::ARP,
        }
        .emit(&mut Packet::new_unchecked(&mut buf[..]));
        assert_eq!(buf, [0x2f, 0xff, 0x08, 0x06]);
    }

    #[test]
    fn short_buffers_are_truncated_not_panics() {
        for n in 0..HEADER_LEN {
            let err = Packet::new_checked(&QINQ[14..14 + n]).unwrap_err();
            assert_eq!(err, Error::new(Layer::Vlan, ErrorKind::Truncated));
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..16)) {
            if let Ok(p) = Packet::new_checked(&data[..]) {
                let _ = (p.tci(), p.pcp(), p.dei(), p.vid(), p.ethertype(), p.payload());
                let repr = VlanRepr::parse(&p).unwrap();
                proptest::prop_assert!(repr.pcp < 8 && repr.vid < 4096);
                let mut out = [0u8; HEADER_LEN];
                repr.emit(&mut Packet::new_unchecked(&mut out[..]));
                proptest::prop_assert_eq!(&out[..], &data[..HEADER_LEN]);
            }
        }
    }
}

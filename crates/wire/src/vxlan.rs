//! VXLAN headers (RFC 7348) with the Group Based Policy extension.
//!
//! Palisade carries a flow's verdict across hosts in the GBP extension
//! (draft-smith-vxlan-group-policy), laid out as in Linux's
//! `include/net/vxlan.h` (`VXLAN_HF_GBP`, `VXLAN_GBP_DONT_LEARN = BIT(6) << 16`,
//! `VXLAN_GBP_POLICY_APPLIED = BIT(3) << 16`, `VXLAN_GBP_ID_MASK = 0xFFFF`):
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |G|R|R|R|I|R|R|R|R|D|R|R|A|R|R|R|        Group Policy ID        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |          VXLAN Network Identifier (VNI)       |   Reserved    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! So G is 0x80 and I is 0x08 of byte 0; D ("don't learn") is 0x40 and A
//! ("policy applied") is 0x08 of byte 1; bytes 2..4 are the group policy ID.
//! Without G, bytes 1..4 are reserved and ignored (RFC 7348), as are the R bits
//! and the last byte: parse→emit is byte-exact when they are zero.

use crate::{Error, ErrorKind, Layer, Result};

/// The IANA-assigned VXLAN UDP port.
pub const VXLAN_PORT: u16 = 4789;

/// Largest VNI (24 bits).
pub const VNI_MAX: u32 = 0x00ff_ffff;

/// Bits of the first byte.
mod flag {
    /// Group Based Policy extension present.
    pub const G: u8 = 0x80;
    /// The VNI is valid (RFC 7348: must be set).
    pub const I: u8 = 0x08;
    /// (second byte) Don't learn the inner source address.
    pub const D: u8 = 0x40;
    /// (second byte) Policy already applied.
    pub const A: u8 = 0x08;
}

/// Byte ranges of the header fields.
mod field {
    use crate::field::Field;
    pub const FLAGS: usize = 0;
    pub const GBP_FLAGS: usize = 1;
    pub const GROUP_ID: Field = 2..4;
    /// Followed by one reserved byte.
    pub const VNI: Field = 4..7;
    pub const PAYLOAD: usize = 8;
}

/// Length of a VXLAN header.
pub const HEADER_LEN: usize = field::PAYLOAD;

/// A read/write view of a VXLAN header and the inner Ethernet frame after it.
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

    /// Check that the buffer holds a whole header.
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            Err(Error::new(Layer::Vxlan, ErrorKind::Truncated))
        } else {
            Ok(())
        }
    }

    /// Give back the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The first byte (G and I flags, reserved bits).
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// Whether the I flag (VNI valid) is set.
    pub fn vni_valid(&self) -> bool {
        self.flags() & flag::I != 0
    }

    /// Whether the G flag (Group Based Policy extension present) is set.
    pub fn has_gbp(&self) -> bool {
        self.flags() & flag::G != 0
    }

    /// The D bit ("don't learn"); meaningful only when [`Self::has_gbp`].
    pub fn dont_learn(&self) -> bool {
        self.buffer.as_ref()[field::GBP_FLAGS] & flag::D != 0
    }

    /// The A bit ("policy applied"); meaningful only when [`Self::has_gbp`].
    pub fn policy_applied(&self) -> bool {
        self.buffer.as_ref()[field::GBP_FLAGS] & flag::A != 0
    }

    /// The group policy ID; meaningful only when [`Self::has_gbp`].
    pub fn group_id(&self) -> u16 {
        let d = &self.buffer.as_ref()[field::GROUP_ID];
        u16::from_be_bytes([d[0], d[1]])
    }

    /// The 24-bit VXLAN network identifier.
    pub fn vni(&self) -> u32 {
        let d = &self.buffer.as_ref()[field::VNI];
        u32::from_be_bytes([0, d[0], d[1], d[2]])
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Packet<&'a T> {
    /// The inner Ethernet frame.
    pub fn payload(&self) -> &'a [u8] {
        &self.buffer.as_ref()[field::PAYLOAD..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Set the first byte.
    pub fn set_flags(&mut self, value: u8) {
        self.buffer.as_mut()[field::FLAGS] = value
    }

    /// Set or clear the D bit.
    pub fn set_dont_learn(&mut self, value: bool) {
        let b = &mut self.buffer.as_mut()[field::GBP_FLAGS];
        *b = if value { *b | flag::D } else { *b & !flag::D };
    }

    /// Set or clear the A bit.
    pub fn set_policy_applied(&mut self, value: bool) {
        let b = &mut self.buffer.as_mut()[field::GBP_FLAGS];
        *b = if value { *b | flag::A } else { *b & !flag::A };
    }

    /// Set the group policy ID.
    pub fn set_group_id(&mut self, value: u16) {
        self.buffer.as_mut()[field::GROUP_ID].copy_from_slice(&value.to_be_bytes())
    }

    /// Set the VNI. Values above 24 bits are a caller bug (debug-asserted; masked in release).
    pub fn set_vni(&mut self, value: u32) {
        debug_assert!(value <= VNI_MAX, "VNI {value:#x} exceeds 24 bits");
        let b = (value & VNI_MAX).to_be_bytes();
        self.buffer.as_mut()[field::VNI].copy_from_slice(&b[1..]);
    }

    /// The inner Ethernet frame, mutably.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD..]
    }
}

/// The Group Based Policy extension's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct GbpRepr {
    /// D: the receiving VTEP must not learn the inner source address.
    pub dont_learn: bool,
    /// A: policy was already applied; the receiver must not apply it again.
    pub policy_applied: bool,
    /// The source's group policy ID.
    pub group_id: u16,
}

/// A parsed VXLAN header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VxlanRepr {
    /// The 24-bit VXLAN network identifier.
    pub vni: u32,
    /// The GBP extension, when the G bit is set.
    pub gbp: Option<GbpRepr>,
}

impl VxlanRepr {
    /// Parse a header; a header without the I flag is [`ErrorKind::BadValue`].
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&T>) -> Result<VxlanRepr> {
        packet.check_len()?;
        if !packet.vni_valid() {
            return Err(Error::new(Layer::Vxlan, ErrorKind::BadValue));
        }
        let gbp = packet.has_gbp().then(|| GbpRepr {
            dont_learn: packet.dont_learn(),
            policy_applied: packet.policy_applied(),
            group_id: packet.group_id(),
        });
        Ok(VxlanRepr { vni: packet.vni(), gbp })
    }

    /// The header length.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Write the header into a buffer at least [`Self::buffer_len`] long; reserved bits are zeroed.
    ///
    /// A VNI above 24 bits is a caller bug (debug-asserted; masked in release).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        packet.buffer.as_mut()[..HEADER_LEN].fill(0);
        match self.gbp {
            Some(gbp) => {
                packet.set_flags(flag::I | flag::G);
                packet.set_dont_learn(gbp.dont_learn);
                packet.set_policy_applied(gbp.policy_applied);
                packet.set_group_id(gbp.group_id);
            }
            None => packet.set_flags(flag::I),
        }
        packet.set_vni(self.vni);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The VXLAN header and start of the inner frame of tcpdump's vxlan.pcap, frame 1 (VNI 100).
    const PLAIN: [u8; 14] = [
        0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x64, 0x00, // VXLAN
        0x00, 0x30, 0x88, 0x01, 0x00, 0x02, // inner destination MAC
    ];

    #[test]
    fn real_header_parses_and_round_trips() {
        let p = Packet::new_checked(&PLAIN[..]).unwrap();
        let repr = VxlanRepr::parse(&p).unwrap();
        assert_eq!(repr, VxlanRepr { vni: 100, gbp: None });
        assert_eq!(p.payload(), &PLAIN[8..]);
        let mut out = [0xffu8; 8];
        repr.emit(&mut Packet::new_unchecked(&mut out[..]));
        assert_eq!(out, PLAIN[..8]);
    }

    #[test]
    fn gbp_bits_match_the_kernel_layout() {
        // (byte 0, byte 1, expected dont_learn, expected policy_applied)
        let cases = [
            (0x88u8, 0x00u8, false, false),
            (0x88, 0x40, true, false),
            (0x88, 0x08, false, true),
            (0x88, 0x48, true, true),
        ];
        for (b0, b1, d, a) in cases {
            let bytes = [b0, b1, 0x12, 0x34, 0xab, 0xcd, 0xef, 0x00];
            let repr = VxlanRepr::parse(&Packet::new_checked(&bytes[..]).unwrap()).unwrap();
            let gbp = GbpRepr {
                dont_learn: d,
                policy_applied: a,
                group_id: 0x1234,
            };
            assert_eq!(
                repr,
                VxlanRepr {
                    vni: 0xabcdef,
                    gbp: Some(gbp)
                }
            );
            let mut out = [0u8; 8];
            repr.emit(&mut Packet::new_unchecked(&mut out[..]));
            assert_eq!(out, bytes);
        }
        // Without G, the GBP bytes are reserved and ignored.
        let bytes = [0x08, 0x48, 0x12, 0x34, 0, 0, 1, 0];
        assert_eq!(
            VxlanRepr::parse(&Packet::new_checked(&bytes[..]).unwrap()).unwrap(),
            VxlanRepr { vni: 1, gbp: None }
        );
    }

    #[test]
    fn i_flag_unset_is_bad_value() {
        for b0 in [0x00u8, 0x80, 0x77] {
            let bytes = [b0, 0, 0, 0, 0, 0, 1, 0];
            assert_eq!(
                VxlanRepr::parse(&Packet::new_checked(&bytes[..]).unwrap()).unwrap_err(),
                Error::new(Layer::Vxlan, ErrorKind::BadValue)
            );
        }
    }

    #[test]
    fn truncated() {
        for n in 0..HEADER_LEN {
            assert_eq!(
                Packet::new_checked(&PLAIN[..n]).unwrap_err(),
                Error::new(Layer::Vxlan, ErrorKind::Truncated)
            );
        }
    }

    #[test]
    fn max_vni_round_trips() {
        let repr = VxlanRepr {
            vni: VNI_MAX,
            gbp: Some(GbpRepr {
                group_id: u16::MAX,
                ..Default::default()
            }),
        };
        let mut out = [0u8; 8];
        repr.emit(&mut Packet::new_unchecked(&mut out[..]));
        assert_eq!(out, [0x88, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
        assert_eq!(VxlanRepr::parse(&Packet::new_checked(&out[..]).unwrap()).unwrap(), repr);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..16)) {
            if let Ok(p) = Packet::new_checked(&bytes[..]) {
                let _ = (p.flags(), p.vni(), p.group_id(), p.dont_learn(), p.policy_applied(), p.payload());
                if let Ok(repr) = VxlanRepr::parse(&p) {
                    proptest::prop_assert!(repr.vni <= VNI_MAX);
                }
            }
        }
    }
}

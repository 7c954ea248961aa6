//! TCP segments (RFC 9293), their flags and options.
//!
//! The view's buffer is the whole segment (the IP payload): the checksum covers
//! all of it. [`TcpOptions`] walks the option TLVs and reports a malformed one
//! as [`ErrorKind::BadOption`] instead of guessing; [`TcpRepr`] keeps the option
//! bytes verbatim, so parse→emit reproduces a segment exactly.

use core::fmt;
use core::net::IpAddr;
use core::ops::{BitAnd, BitOr, BitOrAssign};

use crate::checksum;
use crate::field::{read_u16, read_u32, write_u16, write_u32};
use crate::{Error, ErrorKind, Layer, Result};

/// IP protocol number of TCP.
pub const PROTOCOL: u8 = 6;

/// The twelve bits after the data offset: the nine flags and three reserved bits.
///
/// Reserved bits are kept (not masked off) so that a parsed header re-emits
/// byte for byte; [`TcpFlags::RESERVED`] names them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TcpFlags(pub u16);

impl TcpFlags {
    /// No flags.
    pub const EMPTY: TcpFlags = TcpFlags(0);
    /// FIN: no more data from sender.
    pub const FIN: TcpFlags = TcpFlags(0x001);
    /// SYN: synchronise sequence numbers.
    pub const SYN: TcpFlags = TcpFlags(0x002);
    /// RST: reset the connection.
    pub const RST: TcpFlags = TcpFlags(0x004);
    /// PSH: push function.
    pub const PSH: TcpFlags = TcpFlags(0x008);
    /// ACK: the acknowledgment field is significant.
    pub const ACK: TcpFlags = TcpFlags(0x010);
    /// URG: the urgent pointer is significant.
    pub const URG: TcpFlags = TcpFlags(0x020);
    /// ECE: ECN-Echo (RFC 3168).
    pub const ECE: TcpFlags = TcpFlags(0x040);
    /// CWR: congestion window reduced (RFC 3168).
    pub const CWR: TcpFlags = TcpFlags(0x080);
    /// NS: ECN nonce (RFC 3540, historic; reused as AE by AccECN).
    pub const NS: TcpFlags = TcpFlags(0x100);
    /// The three reserved bits between the data offset and NS.
    pub const RESERVED: TcpFlags = TcpFlags(0xe00);

    const NAMES: [(TcpFlags, &'static str); 9] = [
        (TcpFlags::NS, "NS"),
        (TcpFlags::CWR, "CWR"),
        (TcpFlags::ECE, "ECE"),
        (TcpFlags::URG, "URG"),
        (TcpFlags::ACK, "ACK"),
        (TcpFlags::PSH, "PSH"),
        (TcpFlags::RST, "RST"),
        (TcpFlags::SYN, "SYN"),
        (TcpFlags::FIN, "FIN"),
    ];

    /// The raw bits (at most twelve).
    pub const fn bits(self) -> u16 {
        self.0
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether any flag of `other` is set.
    pub const fn intersects(self, other: TcpFlags) -> bool {
        self.0 & other.0 != 0
    }

    /// Whether no bit is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl BitOr for TcpFlags {
    type Output = TcpFlags;
    fn bitor(self, rhs: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 | rhs.0)
    }
}

impl BitOrAssign for TcpFlags {
    fn bitor_assign(&mut self, rhs: TcpFlags) {
        self.0 |= rhs.0
    }
}

impl BitAnd for TcpFlags {
    type Output = TcpFlags;
    fn bitand(self, rhs: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 & rhs.0)
    }
}

impl fmt::Display for TcpFlags {
    /// Flag names joined by `|` (`SYN|ACK`), `-` when none; reserved bits as hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (flag, name) in Self::NAMES {
            if self.contains(flag) {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        let reserved = self.0 & !0x1ff;
        if reserved != 0 {
            if !first {
                f.write_str("|")?;
            }
            write!(f, "{reserved:#x}")?;
            first = false;
        }
        if first {
            f.write_str("-")?;
        }
        Ok(())
    }
}

impl fmt::Debug for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TcpFlags({self})")
    }
}

/// Option kinds this module interprets (IANA "TCP Option Kind Numbers").
pub mod option_kind {
    /// End of option list.
    pub const END: u8 = 0;
    /// No-operation (padding).
    pub const NOP: u8 = 1;
    /// Maximum segment size.
    pub const MSS: u8 = 2;
    /// Window scale (RFC 7323).
    pub const WINDOW_SCALE: u8 = 3;
    /// SACK permitted (RFC 2018).
    pub const SACK_PERMITTED: u8 = 4;
    /// SACK blocks (RFC 2018).
    pub const SACK: u8 = 5;
    /// Timestamps (RFC 7323).
    pub const TIMESTAMPS: u8 = 8;
}

/// The left/right edges of up to four SACK blocks, as carried on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SackBlocks<'a>(&'a [u8]);

impl<'a> SackBlocks<'a> {
    /// The number of blocks.
    pub const fn len(&self) -> usize {
        self.0.len() / 8
    }

    /// Whether there is no block (never true for a parsed option).
    pub const fn is_empty(&self) -> bool {
        self.0.len() < 8
    }

    /// The blocks as (left edge, right edge) pairs.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u32)> + 'a {
        self.0.chunks_exact(8).map(|c| {
            (
                u32::from_be_bytes([c[0], c[1], c[2], c[3]]),
                u32::from_be_bytes([c[4], c[5], c[6], c[7]]),
            )
        })
    }
}

impl fmt::Debug for SackBlocks<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// One TCP option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpOption<'a> {
    /// End of option list; the iterator stops after it (the rest is padding).
    EndOfList,
    /// No-operation.
    NoOperation,
    /// Maximum segment size.
    MaxSegmentSize(u16),
    /// Window scale shift count.
    WindowScale(u8),
    /// SACK permitted.
    SackPermitted,
    /// Selective acknowledgment blocks.
    Sack(SackBlocks<'a>),
    /// Timestamps.
    Timestamps {
        /// TSval.
        tsval: u32,
        /// TSecr.
        tsecr: u32,
    },
    /// Any other option: its kind and the bytes after the length byte.
    Unknown {
        /// Option kind.
        kind: u8,
        /// Option data (length byte excluded).
        data: &'a [u8],
    },
}

/// Iterator over the options of a TCP header.
///
/// Yields `Err(BadOption)` once for a truncated TLV, a length byte below 2 or
/// past the end, or a known option of the wrong size, then stops.
#[derive(Debug, Clone)]
pub struct TcpOptions<'a> {
    rest: &'a [u8],
}

impl<'a> TcpOptions<'a> {
    /// Iterate over raw option bytes (the header after its first 20 bytes).
    pub const fn new(options: &'a [u8]) -> TcpOptions<'a> {
        TcpOptions { rest: options }
    }

    fn bad(&mut self) -> Option<Result<TcpOption<'a>>> {
        self.rest = &[];
        Some(Err(Error::new(Layer::Tcp, ErrorKind::BadOption)))
    }
}

impl<'a> Iterator for TcpOptions<'a> {
    type Item = Result<TcpOption<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        let (&kind, after_kind) = self.rest.split_first()?;
        match kind {
            option_kind::END => {
                self.rest = &[];
                return Some(Ok(TcpOption::EndOfList));
            }
            option_kind::NOP => {
                self.rest = after_kind;
                return Some(Ok(TcpOption::NoOperation));
            }
            _ => {}
        }
        let Some(&len) = after_kind.first() else {
            return self.bad();
        };
        let len = usize::from(len);
        if len < 2 || len > self.rest.len() {
            return self.bad();
        }
        let data = &self.rest[2..len];
        self.rest = &self.rest[len..];
        let opt = match (kind, data.len()) {
            (option_kind::MSS, 2) => TcpOption::MaxSegmentSize(u16::from_be_bytes([data[0], data[1]])),
            (option_kind::WINDOW_SCALE, 1) => TcpOption::WindowScale(data[0]),
            (option_kind::SACK_PERMITTED, 0) => TcpOption::SackPermitted,
            (option_kind::SACK, n) if n > 0 && n % 8 == 0 => TcpOption::Sack(SackBlocks(data)),
            (option_kind::TIMESTAMPS, 8) => TcpOption::Timestamps {
                tsval: u32::from_be_bytes([data[0], data[1], data[2], data[3]]),
                tsecr: u32::from_be_bytes([data[4], data[5], data[6], data[7]]),
            },
            (
                option_kind::MSS
                | option_kind::WINDOW_SCALE
                | option_kind::SACK_PERMITTED
                | option_kind::SACK
                | option_kind::TIMESTAMPS,
                _,
            ) => return self.bad(),
            (kind, _) => TcpOption::Unknown { kind, data },
        };
        Some(Ok(opt))
    }
}

impl core::iter::FusedIterator for TcpOptions<'_> {}

/// Byte ranges of the header fields.
mod field {
    use crate::field::Field;
    pub const SRC_PORT: Field = 0..2;
    pub const DST_PORT: Field = 2..4;
    pub const SEQ_NUM: Field = 4..8;
    pub const ACK_NUM: Field = 8..12;
    /// Data offset (high nibble) and the twelve flag bits.
    pub const FLAGS: Field = 12..14;
    pub const WINDOW: Field = 14..16;
    pub const CHECKSUM: Field = 16..18;
    pub const URGENT: Field = 18..20;
    pub const OPTIONS: usize = 20;
}

/// Length of a TCP header without options.
pub const HEADER_LEN: usize = field::OPTIONS;

/// Longest TCP header (data offset 15).
pub const MAX_HEADER_LEN: usize = 60;

/// A read/write view of a TCP segment.
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

    /// Wrap a buffer, checking the fixed header and the data offset.
    pub fn new_checked(buffer: T) -> Result<Packet<T>> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Check that the buffer holds the fixed header and that the data offset is
    /// at least 5 words and within the buffer.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::new(Layer::Tcp, ErrorKind::Truncated));
        }
        let header_len = self.header_len();
        if header_len < HEADER_LEN || header_len > len {
            return Err(Error::new(Layer::Tcp, ErrorKind::BadHeaderLength));
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

    /// The sequence number.
    pub fn seq_number(&self) -> u32 {
        read_u32(self.buffer.as_ref(), field::SEQ_NUM)
    }

    /// The acknowledgment number.
    pub fn ack_number(&self) -> u32 {
        read_u32(self.buffer.as_ref(), field::ACK_NUM)
    }

    /// The data offset field, in 32-bit words.
    pub fn data_offset(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS.start] >> 4
    }

    /// The header length in bytes (data offset × 4).
    pub fn header_len(&self) -> usize {
        usize::from(self.data_offset()) * 4
    }

    /// The flags, reserved bits included.
    pub fn flags(&self) -> TcpFlags {
        TcpFlags(read_u16(self.buffer.as_ref(), field::FLAGS) & 0x0fff)
    }

    /// The receive window (unscaled).
    pub fn window_len(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::WINDOW)
    }

    /// The checksum field.
    pub fn checksum(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// The urgent pointer.
    pub fn urgent_pointer(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::URGENT)
    }

    /// Verify the checksum over the pseudo-header of `src`/`dst` and the whole buffer.
    ///
    /// Addresses of different families are a caller bug and fail.
    pub fn verify_checksum(&self, src: IpAddr, dst: IpAddr) -> bool {
        let data = self.buffer.as_ref();
        match checksum::pseudo_header(src, dst, PROTOCOL, data.len()) {
            Some(ph) => checksum::fold(checksum::combine(&[ph, checksum::sum(data)])) == 0xffff,
            None => false,
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Packet<&'a T> {
    /// The raw option bytes (between the fixed header and the payload).
    pub fn options(&self) -> &'a [u8] {
        let buf = self.buffer.as_ref();
        // A checked view has HEADER_LEN <= header_len <= buf.len(); clamp anyway
        // so an unchecked one yields an empty slice instead of panicking.
        let end = self.header_len().clamp(HEADER_LEN, buf.len().max(HEADER_LEN));
        buf.get(HEADER_LEN..end).unwrap_or(&[])
    }

    /// An iterator over the options.
    pub fn option_iter(&self) -> TcpOptions<'a> {
        TcpOptions::new(self.options())
    }

    /// The bytes after the header.
    pub fn payload(&self) -> &'a [u8] {
        let buf = self.buffer.as_ref();
        buf.get(self.header_len().max(HEADER_LEN)..).unwrap_or(&[])
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

    /// Set the sequence number.
    pub fn set_seq_number(&mut self, value: u32) {
        write_u32(self.buffer.as_mut(), field::SEQ_NUM, value)
    }

    /// Set the acknowledgment number.
    pub fn set_ack_number(&mut self, value: u32) {
        write_u32(self.buffer.as_mut(), field::ACK_NUM, value)
    }

    /// Set the header length in bytes; it must be a multiple of 4 between 20 and 60.
    pub fn set_header_len(&mut self, value: usize) {
        debug_assert!(value % 4 == 0 && (HEADER_LEN..=MAX_HEADER_LEN).contains(&value));
        let b = &mut self.buffer.as_mut()[field::FLAGS.start];
        *b = (*b & 0x0f) | (((value / 4) as u8) << 4);
    }

    /// Set the flags (the low twelve bits), keeping the data offset.
    pub fn set_flags(&mut self, value: TcpFlags) {
        let raw = read_u16(self.buffer.as_ref(), field::FLAGS);
        write_u16(self.buffer.as_mut(), field::FLAGS, (raw & 0xf000) | (value.0 & 0x0fff))
    }

    /// Set the receive window.
    pub fn set_window_len(&mut self, value: u16) {
        write_u16(self.buffer.as_mut(), field::WINDOW, value)
    }

    /// Set the checksum field.
    pub fn set_checksum(&mut self, value: u16) {
        write_u16(self.buffer.as_mut(), field::CHECKSUM, value)
    }

    /// Set the urgent pointer.
    pub fn set_urgent_pointer(&mut self, value: u16) {
        write_u16(self.buffer.as_mut(), field::URGENT, value)
    }

    /// Compute and store the checksum over the pseudo-header of `src`/`dst` and the whole buffer.
    ///
    /// Addresses of different families are a caller bug: the field is left zero.
    pub fn fill_checksum(&mut self, src: IpAddr, dst: IpAddr) {
        self.set_checksum(0);
        let data = self.buffer.as_ref();
        if let Some(ph) = checksum::pseudo_header(src, dst, PROTOCOL, data.len()) {
            let value = !checksum::fold(checksum::combine(&[ph, checksum::sum(data)]));
            self.set_checksum(value);
        }
    }

    /// The option bytes, mutably (per the current data offset).
    pub fn options_mut(&mut self) -> &mut [u8] {
        let end = self.header_len();
        let buf = self.buffer.as_mut();
        let end = end.clamp(HEADER_LEN, buf.len().max(HEADER_LEN));
        &mut buf[HEADER_LEN..end]
    }

    /// The bytes after the header, mutably.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = self.header_len().max(HEADER_LEN);
        let buf = self.buffer.as_mut();
        let start = start.min(buf.len());
        &mut buf[start..]
    }
}

/// A parsed TCP segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TcpRepr<'a> {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq_number: u32,
    /// Acknowledgment number (meaningful when `flags` has ACK).
    pub ack_number: u32,
    /// Flags, reserved bits included.
    pub flags: TcpFlags,
    /// Receive window (unscaled).
    pub window_len: u16,
    /// Urgent pointer.
    pub urgent_pointer: u16,
    /// Raw option bytes, emitted verbatim (padded with zeros, i.e. EOL, to a multiple of 4).
    pub options: &'a [u8],
    /// Payload.
    pub payload: &'a [u8],
}

impl<'a> TcpRepr<'a> {
    /// Parse a segment, validating the option TLVs (a malformed one is [`ErrorKind::BadOption`]).
    ///
    /// The checksum is not verified here: the caller decides (see
    /// [`Packet::verify_checksum`]), since offloaded packets may not carry one yet.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&'a T>) -> Result<TcpRepr<'a>> {
        packet.check_len()?;
        let options = packet.options();
        for opt in TcpOptions::new(options) {
            opt?;
        }
        Ok(TcpRepr {
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            seq_number: packet.seq_number(),
            ack_number: packet.ack_number(),
            flags: packet.flags(),
            window_len: packet.window_len(),
            urgent_pointer: packet.urgent_pointer(),
            options,
            payload: packet.payload(),
        })
    }

    /// An iterator over the options.
    pub fn option_iter(&self) -> TcpOptions<'a> {
        TcpOptions::new(self.options)
    }

    /// Header length: 20 plus the options rounded up to a multiple of 4.
    pub const fn header_len(&self) -> usize {
        HEADER_LEN + self.options.len().div_ceil(4) * 4
    }

    /// Header plus payload length.
    pub const fn buffer_len(&self) -> usize {
        self.header_len() + self.payload.len()
    }

    /// Write the segment (header, options, payload, and the checksum over the
    /// pseudo-header of `src`/`dst`) into a buffer exactly [`Self::buffer_len`] long.
    ///
    /// More than 40 option bytes cannot be described by the data offset; that
    /// is a caller bug (debug-asserted).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>, src: IpAddr, dst: IpAddr) {
        debug_assert!(
            self.options.len() <= MAX_HEADER_LEN - HEADER_LEN,
            "TCP options too long"
        );
        debug_assert_eq!(packet.buffer.as_ref().len(), self.buffer_len());
        packet.set_src_port(self.src_port);
        packet.set_dst_port(self.dst_port);
        packet.set_seq_number(self.seq_number);
        packet.set_ack_number(self.ack_number);
        write_u16(packet.buffer.as_mut(), field::FLAGS, 0);
        packet.set_header_len(self.header_len());
        packet.set_flags(self.flags);
        packet.set_window_len(self.window_len);
        packet.set_urgent_pointer(self.urgent_pointer);
        let opts = packet.options_mut();
        let (verbatim, padding) = opts.split_at_mut(self.options.len());
        verbatim.copy_from_slice(self.options);
        padding.fill(0);
        packet.payload_mut().copy_from_slice(self.payload);
        packet.fill_checksum(src, dst);
    }
}

#[cfg(test)]
mod tests {
    use core::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    /// SYN 192.168.1.11:33779 -> 209.87.249.18:53 with MSS, SACK-permitted,
    /// timestamps, NOP and window scale (tcpdump's dns_tcp.pcap, frame 1).
    const SYN_V4: [u8; 40] = [
        0x83, 0xf3, 0x00, 0x35, 0x23, 0xfe, 0xc8, 0x0c, 0x00, 0x00, 0x00, 0x00, 0xa0, 0x02, 0xfa, 0xf0, //
        0x0c, 0x41, 0x00, 0x00, 0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x79, 0xe2, 0xca, 0x9a, //
        0x00, 0x00, 0x00, 0x00, 0x01, 0x03, 0x03, 0x07,
    ];
    const SYN_V4_SRC: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 11));
    const SYN_V4_DST: IpAddr = IpAddr::V4(Ipv4Addr::new(209, 87, 249, 18));

    /// SYN 2001:4f8:4:7:2e0:81ff:fe52:ffff:30000 -> 2001:4f8:4:7:2e0:81ff:fe52:9a6b:80
    /// (zeek's chksums/ip6-tcp-good-chksum.pcap).
    const SYN_V6: [u8; 20] = [
        0x75, 0x30, 0x00, 0x50, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x50, 0x02, 0x20, 0x00, //
        0x2f, 0x8a, 0x00, 0x00,
    ];
    const SYN_V6_SRC: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0x4f8, 4, 7, 0x2e0, 0x81ff, 0xfe52, 0xffff));
    const SYN_V6_DST: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0x4f8, 4, 7, 0x2e0, 0x81ff, 0xfe52, 0x9a6b));

    #[test]
    fn real_syn_v4_fields_and_options() {
        let p = Packet::new_checked(&SYN_V4[..]).unwrap();
        assert_eq!((p.src_port(), p.dst_port()), (33779, 53));
        assert_eq!(p.seq_number(), 0x23fe_c80c);
        assert_eq!(p.ack_number(), 0);
        assert_eq!(p.header_len(), 40);
        assert_eq!(p.flags(), TcpFlags::SYN);
        assert_eq!(p.flags().to_string(), "SYN");
        assert_eq!(p.window_len(), 64240);
        assert_eq!(p.checksum(), 0x0c41);
        assert_eq!(p.urgent_pointer(), 0);
        assert!(p.payload().is_empty());
        let opts: Vec<_> = p.option_iter().collect::<Result<_>>().unwrap();
        assert_eq!(
            opts,
            [
                TcpOption::MaxSegmentSize(1460),
                TcpOption::SackPermitted,
                TcpOption::Timestamps {
                    tsval: 2_044_906_138,
                    tsecr: 0
                },
                TcpOption::NoOperation,
                TcpOption::WindowScale(7),
            ]
        );
    }

    #[test]
    fn checksums_verify_and_round_trip_v4_and_v6() {
        for (bytes, src, dst) in [
            (&SYN_V4[..], SYN_V4_SRC, SYN_V4_DST),
            (&SYN_V6[..], SYN_V6_SRC, SYN_V6_DST),
        ] {
            let p = Packet::new_checked(bytes).unwrap();
            assert!(p.verify_checksum(src, dst));
            assert!(!p.verify_checksum(dst, dst));
            assert!(!p.verify_checksum(SYN_V4_SRC, SYN_V6_DST), "mixed families must fail");
            let repr = TcpRepr::parse(&p).unwrap();
            let mut out = vec![0xa5; repr.buffer_len()];
            repr.emit(&mut Packet::new_unchecked(&mut out[..]), src, dst);
            assert_eq!(out, bytes);
        }
    }

    #[test]
    fn corrupted_byte_fails_verification() {
        for i in 0..SYN_V4.len() {
            let mut b = SYN_V4;
            b[i] ^= 0x10;
            assert!(
                !Packet::new_unchecked(&b[..]).verify_checksum(SYN_V4_SRC, SYN_V4_DST),
                "{i}"
            );
        }
    }

    #[test]
    fn emit_with_payload_sack_and_unaligned_options() {
        // SACK with two blocks, then a 3-byte unknown option: 22 bytes, padded to 24.
        let options = [
            1, 1, 5, 18, 0, 0, 0, 10, 0, 0, 0, 20, 0, 0, 0, 30, 0, 0, 0, 40, 0xfe, 3, 0xaa, // ...
        ];
        let repr = TcpRepr {
            src_port: 1,
            dst_port: 2,
            seq_number: 3,
            ack_number: 4,
            flags: TcpFlags::ACK | TcpFlags::PSH | TcpFlags::NS,
            window_len: 5,
            urgent_pointer: 0,
            options: &options,
            payload: b"hello",
        };
        assert_eq!(repr.header_len(), 44);
        let mut out = vec![0xa5; repr.buffer_len()];
        repr.emit(&mut Packet::new_unchecked(&mut out[..]), SYN_V6_SRC, SYN_V6_DST);
        let p = Packet::new_checked(&out[..]).unwrap();
        assert!(p.verify_checksum(SYN_V6_SRC, SYN_V6_DST));
        assert_eq!(p.flags().to_string(), "NS|ACK|PSH");
        assert_eq!(p.payload(), b"hello");
        assert_eq!(&p.options()[..23], &options);
        assert_eq!(p.options()[23], 0);
        let opts: Vec<_> = p.option_iter().collect::<Result<_>>().unwrap();
        let TcpOption::Sack(blocks) = opts[2] else {
            panic!("{opts:?}")
        };
        assert_eq!(blocks.iter().collect::<Vec<_>>(), [(10, 20), (30, 40)]);
        assert_eq!(
            opts[3],
            TcpOption::Unknown {
                kind: 0xfe,
                data: &[0xaa]
            }
        );
        assert_eq!(opts[4], TcpOption::EndOfList);
        assert_eq!(opts.len(), 5);
    }

    #[test]
    fn malformed_options() {
        let bad: &[&[u8]] = &[
            &[2],                         // kind without length
            &[2, 4, 5],                   // length past the end
            &[0xfe, 1, 0],                // length below 2
            &[0xfe, 0],                   // length zero
            &[2, 3, 5],                   // MSS of the wrong size
            &[3, 4, 7, 0],                // window scale of the wrong size
            &[4, 3, 0],                   // SACK-permitted with data
            &[5, 2],                      // SACK with no block
            &[5, 6, 0, 0, 0, 0],          // SACK with half a block
            &[8, 6, 0, 0, 0, 0],          // short timestamps
            &[1, 1, 2, 4, 5, 0xb4, 0xfe], // good options, then a lone kind
        ];
        for opts in bad {
            let results: Vec<_> = TcpOptions::new(opts).collect();
            let last = results.last().unwrap();
            assert_eq!(*last, Err(Error::new(Layer::Tcp, ErrorKind::BadOption)), "{opts:?}");
            assert!(results[..results.len() - 1].iter().all(|r| r.is_ok()));

            // Leading NOPs align the area so that the bad option stays the last one.
            let area = opts.len().div_ceil(4) * 4;
            let mut seg = vec![0u8; HEADER_LEN + area];
            seg[12] = ((HEADER_LEN + area) / 4) as u8 * 16;
            seg[HEADER_LEN..HEADER_LEN + area - opts.len()].fill(option_kind::NOP);
            seg[HEADER_LEN + area - opts.len()..].copy_from_slice(opts);
            let p = Packet::new_checked(&seg[..]).unwrap();
            assert_eq!(TcpRepr::parse(&p).unwrap_err().kind(), ErrorKind::BadOption, "{opts:?}");
        }
    }

    #[test]
    fn end_of_list_stops_iteration() {
        let opts: Vec<_> = TcpOptions::new(&[1, 0, 2, 4]).collect();
        assert_eq!(opts, [Ok(TcpOption::NoOperation), Ok(TcpOption::EndOfList)]);
    }

    #[test]
    fn truncation_and_bad_data_offset() {
        for n in 0..HEADER_LEN {
            assert_eq!(
                Packet::new_checked(&SYN_V4[..n]).unwrap_err(),
                Error::new(Layer::Tcp, ErrorKind::Truncated)
            );
        }
        for n in HEADER_LEN..SYN_V4.len() {
            assert_eq!(
                Packet::new_checked(&SYN_V4[..n]).unwrap_err(),
                Error::new(Layer::Tcp, ErrorKind::BadHeaderLength),
                "{n}"
            );
        }
        for off in 0..5u8 {
            let mut b = SYN_V4;
            b[12] = off << 4;
            assert_eq!(
                Packet::new_checked(&b[..]).unwrap_err(),
                Error::new(Layer::Tcp, ErrorKind::BadHeaderLength)
            );
        }
    }

    #[test]
    fn flags_display_and_reserved_bits_survive() {
        assert_eq!(TcpFlags::EMPTY.to_string(), "-");
        assert_eq!((TcpFlags::SYN | TcpFlags::ACK).to_string(), "ACK|SYN");
        assert_eq!(TcpFlags(0x811).to_string(), "ACK|FIN|0x800");
        assert!((TcpFlags::SYN | TcpFlags::ACK).contains(TcpFlags::SYN));
        assert!(!TcpFlags::SYN.contains(TcpFlags::SYN | TcpFlags::ACK));
        let mut b = SYN_V4;
        b[12] |= 0x0e;
        let p = Packet::new_checked(&b[..]).unwrap();
        assert!(p.flags().intersects(TcpFlags::RESERVED));
        let repr = TcpRepr::parse(&p).unwrap();
        let mut out = [0u8; 40];
        repr.emit(&mut Packet::new_unchecked(&mut out[..]), SYN_V4_SRC, SYN_V4_DST);
        assert_eq!(out[12], b[12]);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..72)) {
            let p = Packet::new_unchecked(&bytes[..]);
            let _ = TcpOptions::new(&bytes).count();
            if let Ok(p) = Packet::new_checked(p.into_inner()) {
                let _ = (p.src_port(), p.dst_port(), p.seq_number(), p.ack_number(), p.flags().to_string());
                let _ = (p.window_len(), p.checksum(), p.urgent_pointer(), p.payload(), p.options());
                let _ = p.verify_checksum(SYN_V4_SRC, SYN_V4_DST);
                let _ = p.verify_checksum(SYN_V6_SRC, SYN_V6_DST);
                let _ = p.option_iter().count();
                if let Ok(repr) = TcpRepr::parse(&p) {
                    // Whatever parsed re-emits to the same bytes, checksum aside.
                    let mut out = vec![0u8; repr.buffer_len()];
                    repr.emit(&mut Packet::new_unchecked(&mut out[..]), SYN_V4_SRC, SYN_V4_DST);
                    proptest::prop_assert_eq!(&out[..16], &bytes[..16]);
                    proptest::prop_assert_eq!(&out[18..], &bytes[18..]);
                }
            }
        }
    }
}

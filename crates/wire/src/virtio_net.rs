//! The virtio-net packet header: offload metadata in front of a frame.
//!
//! Every frame that crosses a virtio-net device (a vhost-user queue, a TAP
//! opened with `IFF_VNET_HDR`, an AF_PACKET socket with `PACKET_VNET_HDR`)
//! is preceded by this header (virtio 1.x §5.1.6, Linux
//! `include/uapi/linux/virtio_net.h`). It says whether the frame's TCP/UDP
//! checksum is still partial (`NEEDS_CSUM`: the sender summed only the
//! pseudo-header and left the rest to "hardware"), whether the checksum was
//! already verified (`DATA_VALID`), and whether the frame is a segmentation
//! offload super-frame (`gso_type`, up to 64 KiB of payload to be cut into
//! `gso_size` segments behind copies of the first `hdr_len` bytes).
//!
//! ```text
//!  0        1          2        4         6            8             10            12
//! +--------+----------+--------+---------+------------+-------------+-------------+
//! | flags  | gso_type | hdr_len| gso_size| csum_start | csum_offset | num_buffers |
//! +--------+----------+--------+---------+------------+-------------+-------------+
//! ```
//!
//! **Byte order:** every multi-byte field is little-endian. That is the
//! virtio 1.0 rule; legacy (pre-1.0) devices use the guest's native order,
//! which is the same on every host Palisade runs on (x86-64, little-endian
//! aarch64).
//!
//! The header is 12 bytes (`struct virtio_net_hdr_v1`, identical to
//! `virtio_net_hdr_mrg_rxbuf`) when virtio 1.0 or mergeable receive buffers
//! are negotiated, and 10 bytes without `num_buffers` otherwise (`struct
//! virtio_net_hdr`: legacy devices, AF_PACKET's `PACKET_VNET_HDR`, a TAP's
//! default). [`Header`] reads and writes both; [`Header::num_buffers`] is
//! `None` on a 10-byte one.
//!
//! [`VirtioNetRepr::parse`] checks what a header claims against the frame it
//! describes, because both come from whoever sent the frame (a guest, for
//! a vhost-user port) and drive work on the receiving side: a checksum
//! position past the frame, a segmentation request with a zero segment size
//! or an unknown type, flags outside the specification are each an
//! [`Error`] with [`Layer::VirtioNet`], never a panic and never silently
//! reinterpreted.

use crate::field::{read_u16_le, write_u16_le};
use crate::{Error, ErrorKind, Layer, Result, checksum};

/// Length of the header with `num_buffers` (virtio 1.0, or mergeable receive buffers).
pub const HEADER_LEN: usize = field::NUM_BUFFERS.end;

/// Length of the header without `num_buffers` (legacy devices without
/// mergeable receive buffers, AF_PACKET's `PACKET_VNET_HDR`, a TAP's default).
pub const HEADER_LEN_NO_NUM_BUFFERS: usize = field::CSUM_OFFSET.end;

/// Bits of the `flags` field.
pub mod flags {
    /// The checksum from `csum_start` to the end of the frame is still to be
    /// computed and stored at `csum_start + csum_offset` (the field holds the
    /// pseudo-header sum).
    pub const NEEDS_CSUM: u8 = 1;
    /// The receiver's device already verified the frame's checksum.
    pub const DATA_VALID: u8 = 2;
    /// `csum_start`/`csum_offset` carry receive-segment-coalescing counts
    /// (`VIRTIO_NET_F_RSC_EXT`); not accepted by [`super::VirtioNetRepr::parse`].
    pub const RSC_INFO: u8 = 4;
    /// The outer UDP checksum of a UDP-tunnel super-frame is to be computed
    /// too (Linux 6.17+); not accepted by [`super::VirtioNetRepr::parse`].
    pub const UDP_TUNNEL_CSUM: u8 = 8;
}

/// Values of the `gso_type` field.
pub mod gso_type {
    /// Not a segmentation offload frame.
    pub const NONE: u8 = 0;
    /// TCP over IPv4 segmentation (TSO).
    pub const TCPV4: u8 = 1;
    /// UDP fragmentation offload (UFO: one UDP datagram cut into IPv4 fragments); legacy.
    pub const UDP: u8 = 3;
    /// TCP over IPv6 segmentation.
    pub const TCPV6: u8 = 4;
    /// UDP segmentation (USO: several UDP datagrams, each with its own header).
    pub const UDP_L4: u8 = 5;
    /// Flag bit: the TCP segments carry ECN (CWR is set on the first segment only).
    pub const ECN: u8 = 0x80;
    /// Flag bit (Linux 6.17+, `VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO`): the frame is
    /// encapsulated in a UDP tunnel over IPv4 and the type above applies to the
    /// inner packet; the header is then the 24-byte `virtio_net_hdr_v1_hash_tunnel`.
    /// Not accepted by [`super::VirtioNetRepr::parse`].
    pub const UDP_TUNNEL_IPV4: u8 = 0x20;
    /// As [`UDP_TUNNEL_IPV4`], with an IPv6 outer header.
    pub const UDP_TUNNEL_IPV6: u8 = 0x40;
}

/// Byte ranges of the header fields.
mod field {
    use crate::field::Field;
    pub const FLAGS: usize = 0;
    pub const GSO_TYPE: usize = 1;
    pub const HDR_LEN: Field = 2..4;
    pub const GSO_SIZE: Field = 4..6;
    pub const CSUM_START: Field = 6..8;
    pub const CSUM_OFFSET: Field = 8..10;
    pub const NUM_BUFFERS: Field = 10..12;
}

/// A read/write view of a virtio-net header (10 or 12 bytes; a longer buffer's tail is ignored).
///
/// Contract: once [`Header::new_checked`] has succeeded, no accessor panics.
#[derive(Debug, Clone)]
pub struct Header<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Header<T> {
    /// Wrap a buffer without checking it; accessors may panic on a short buffer.
    pub const fn new_unchecked(buffer: T) -> Header<T> {
        Header { buffer }
    }

    /// Wrap a buffer, checking it holds at least the 10-byte header.
    pub fn new_checked(buffer: T) -> Result<Header<T>> {
        let header = Self::new_unchecked(buffer);
        header.check_len()?;
        Ok(header)
    }

    /// Check that the buffer holds at least the 10 bytes without `num_buffers`.
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN_NO_NUM_BUFFERS {
            Err(Error::new(Layer::VirtioNet, ErrorKind::Truncated))
        } else {
            Ok(())
        }
    }

    /// Give back the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The `flags` field (see [`flags`]).
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// The raw `gso_type` field (see [`gso_type`]).
    pub fn gso_type(&self) -> u8 {
        self.buffer.as_ref()[field::GSO_TYPE]
    }

    /// The `hdr_len` field: how many leading bytes of the frame every segment repeats (a hint).
    pub fn hdr_len(&self) -> u16 {
        read_u16_le(self.buffer.as_ref(), field::HDR_LEN)
    }

    /// The `gso_size` field: the payload bytes per segment.
    pub fn gso_size(&self) -> u16 {
        read_u16_le(self.buffer.as_ref(), field::GSO_SIZE)
    }

    /// The `csum_start` field: where the checksummed bytes start, from the start of the frame.
    pub fn csum_start(&self) -> u16 {
        read_u16_le(self.buffer.as_ref(), field::CSUM_START)
    }

    /// The `csum_offset` field: where the checksum is stored, from `csum_start`.
    pub fn csum_offset(&self) -> u16 {
        read_u16_le(self.buffer.as_ref(), field::CSUM_OFFSET)
    }

    /// The `num_buffers` field (how many receive buffers the frame spans), when the header has it.
    pub fn num_buffers(&self) -> Option<u16> {
        (self.buffer.as_ref().len() >= HEADER_LEN).then(|| read_u16_le(self.buffer.as_ref(), field::NUM_BUFFERS))
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
    /// Set the `flags` field.
    pub fn set_flags(&mut self, value: u8) {
        self.buffer.as_mut()[field::FLAGS] = value
    }

    /// Set the raw `gso_type` field.
    pub fn set_gso_type(&mut self, value: u8) {
        self.buffer.as_mut()[field::GSO_TYPE] = value
    }

    /// Set the `hdr_len` field.
    pub fn set_hdr_len(&mut self, value: u16) {
        write_u16_le(self.buffer.as_mut(), field::HDR_LEN, value)
    }

    /// Set the `gso_size` field.
    pub fn set_gso_size(&mut self, value: u16) {
        write_u16_le(self.buffer.as_mut(), field::GSO_SIZE, value)
    }

    /// Set the `csum_start` field.
    pub fn set_csum_start(&mut self, value: u16) {
        write_u16_le(self.buffer.as_mut(), field::CSUM_START, value)
    }

    /// Set the `csum_offset` field.
    pub fn set_csum_offset(&mut self, value: u16) {
        write_u16_le(self.buffer.as_mut(), field::CSUM_OFFSET, value)
    }

    /// Set the `num_buffers` field; a 10-byte header has none, and this does nothing.
    pub fn set_num_buffers(&mut self, value: u16) {
        if self.buffer.as_ref().len() >= HEADER_LEN {
            write_u16_le(self.buffer.as_mut(), field::NUM_BUFFERS, value)
        }
    }
}

/// A checksum the sender left partial (`NEEDS_CSUM`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PartialChecksum {
    /// Where the checksummed bytes start (the transport header), from the start of the frame.
    pub start: u16,
    /// Where the 16-bit checksum field is, from `start` (16 for TCP, 6 for UDP).
    pub offset: u16,
}

impl PartialChecksum {
    /// Finish the checksum in `frame`: sum the bytes from `start` to the end
    /// (the field holds the pseudo-header sum the sender wrote) and store the
    /// complement in the field, as Linux's `skb_checksum_help` does (a sum
    /// that complements to zero is stored as 0xffff, its other
    /// representation, so UDP does not read it as "no checksum").
    ///
    /// Bytes after the IP datagram (Ethernet padding) must not be in `frame`:
    /// the virtio rule is "to the end of the frame". A field that does not
    /// fit in `frame` is [`ErrorKind::BadLength`].
    pub fn complete(&self, frame: &mut [u8]) -> Result<()> {
        let start = usize::from(self.start);
        let at = start + usize::from(self.offset);
        if at + 2 > frame.len() {
            return Err(Error::new(Layer::VirtioNet, ErrorKind::BadLength));
        }
        let value = !checksum::fold(checksum::sum(&frame[start..]));
        let value = if value == 0 { 0xffff } else { value };
        frame[at..at + 2].copy_from_slice(&value.to_be_bytes());
        Ok(())
    }
}

/// Which segmentation offload a super-frame asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GsoKind {
    /// TCP over IPv4 (`VIRTIO_NET_HDR_GSO_TCPV4`).
    TcpV4,
    /// TCP over IPv6 (`VIRTIO_NET_HDR_GSO_TCPV6`).
    TcpV6,
    /// UDP segmentation, each segment a datagram (`VIRTIO_NET_HDR_GSO_UDP_L4`).
    UdpL4,
    /// UDP fragmentation offload, one datagram in IPv4 fragments (`VIRTIO_NET_HDR_GSO_UDP`; legacy).
    Ufo,
}

impl GsoKind {
    /// The `gso_type` value, without the ECN bit.
    pub const fn raw(self) -> u8 {
        match self {
            GsoKind::TcpV4 => gso_type::TCPV4,
            GsoKind::TcpV6 => gso_type::TCPV6,
            GsoKind::UdpL4 => gso_type::UDP_L4,
            GsoKind::Ufo => gso_type::UDP,
        }
    }

    /// Whether this is one of the TCP kinds.
    pub const fn is_tcp(self) -> bool {
        matches!(self, GsoKind::TcpV4 | GsoKind::TcpV6)
    }
}

/// A segmentation offload request: the frame is a super-frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Gso {
    /// The kind of segmentation.
    pub kind: GsoKind,
    /// TCP only: the segments carry ECN (`VIRTIO_NET_HDR_GSO_ECN`).
    pub ecn: bool,
    /// Payload bytes per segment (never 0).
    pub size: u16,
    /// How many leading bytes every segment repeats (`hdr_len`; a hint, at most the frame's length).
    pub header_len: u16,
}

/// A parsed virtio-net header, checked against the frame it describes.
///
/// Fields a flag does not enable (`csum_start`/`csum_offset` without
/// `NEEDS_CSUM`, `gso_size`/`hdr_len` without a GSO type) are not kept:
/// parse→emit is byte-exact when they are zero, as every sender writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct VirtioNetRepr {
    /// `NEEDS_CSUM`: the frame's checksum is partial.
    pub csum: Option<PartialChecksum>,
    /// `DATA_VALID`: the checksum was verified by the device that received the frame.
    pub data_valid: bool,
    /// A segmentation offload request.
    pub gso: Option<Gso>,
    /// Receive buffers the frame spans (mergeable receive buffers); 0 when the header has no such field.
    pub num_buffers: u16,
}

impl VirtioNetRepr {
    /// A header that asks for nothing: a plain frame with a complete checksum.
    pub const PLAIN: VirtioNetRepr = VirtioNetRepr {
        csum: None,
        data_valid: false,
        gso: None,
        num_buffers: 0,
    };

    /// Parse `header`, which describes a frame of `frame_len` bytes (the header not included).
    ///
    /// [`ErrorKind::BadValue`]: a flag other than `NEEDS_CSUM`/`DATA_VALID`;
    /// an unknown `gso_type`; the ECN bit without a TCP type; a GSO type with
    /// `gso_size` 0 or without `NEEDS_CSUM` (virtio 1.x §5.1.6.2.1: a
    /// driver must ask for the checksum of every super-frame).
    /// [`ErrorKind::BadLength`]: the checksum field (`csum_start +
    /// csum_offset + 2`) or `hdr_len` beyond the frame.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(header: &Header<&T>, frame_len: usize) -> Result<VirtioNetRepr> {
        header.check_len()?;
        let bad = |kind| Err(Error::new(Layer::VirtioNet, kind));
        let flags = header.flags();
        if flags & !(flags::NEEDS_CSUM | flags::DATA_VALID) != 0 {
            return bad(ErrorKind::BadValue);
        }
        let csum = if flags & flags::NEEDS_CSUM != 0 {
            let c = PartialChecksum {
                start: header.csum_start(),
                offset: header.csum_offset(),
            };
            if usize::from(c.start) + usize::from(c.offset) + 2 > frame_len {
                return bad(ErrorKind::BadLength);
            }
            Some(c)
        } else {
            None
        };
        let raw = header.gso_type();
        let ecn = raw & gso_type::ECN != 0;
        let kind = match raw & !gso_type::ECN {
            gso_type::NONE if !ecn => None,
            gso_type::TCPV4 => Some(GsoKind::TcpV4),
            gso_type::TCPV6 => Some(GsoKind::TcpV6),
            gso_type::UDP_L4 => Some(GsoKind::UdpL4),
            gso_type::UDP => Some(GsoKind::Ufo),
            _ => return bad(ErrorKind::BadValue),
        };
        let gso = match kind {
            None => None,
            Some(kind) => {
                if (ecn && !kind.is_tcp()) || header.gso_size() == 0 || csum.is_none() {
                    return bad(ErrorKind::BadValue);
                }
                if usize::from(header.hdr_len()) > frame_len {
                    return bad(ErrorKind::BadLength);
                }
                Some(Gso {
                    kind,
                    ecn,
                    size: header.gso_size(),
                    header_len: header.hdr_len(),
                })
            }
        };
        Ok(VirtioNetRepr {
            csum,
            data_valid: flags & flags::DATA_VALID != 0,
            gso,
            num_buffers: header.num_buffers().unwrap_or(0),
        })
    }

    /// Write this header into `header` (10 or 12 bytes; `num_buffers` only into 12).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, header: &mut Header<T>) {
        let mut flags = 0;
        if self.csum.is_some() {
            flags |= flags::NEEDS_CSUM;
        }
        if self.data_valid {
            flags |= flags::DATA_VALID;
        }
        header.set_flags(flags);
        let csum = self.csum.unwrap_or(PartialChecksum { start: 0, offset: 0 });
        header.set_csum_start(csum.start);
        header.set_csum_offset(csum.offset);
        match self.gso {
            Some(g) => {
                header.set_gso_type(g.kind.raw() | if g.ecn { gso_type::ECN } else { 0 });
                header.set_gso_size(g.size);
                header.set_hdr_len(g.header_len);
            }
            None => {
                header.set_gso_type(gso_type::NONE);
                header.set_gso_size(0);
                header.set_hdr_len(0);
            }
        }
        header.set_num_buffers(self.num_buffers);
    }

    /// The header as 12 bytes (with `num_buffers`).
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        self.emit(&mut Header::new_unchecked(&mut b[..]));
        b
    }
}

/// What a frame's offload state asks of whoever handles it next: the
/// transport-independent part of a virtio-net header.
///
/// Ports hand it over with every received frame and take it with every frame
/// to send (`palisade_io::FramePort`); the engine reads it to treat a
/// super-frame as the segments it stands for. [`VirtioNetRepr`] adds what
/// only the device transport needs (`num_buffers`); converting either way
/// keeps every other field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Offload {
    /// The TCP/UDP checksum is partial (`NEEDS_CSUM`): the field holds the
    /// pseudo-header sum and the rest is to be summed from `start`.
    pub csum: Option<PartialChecksum>,
    /// The checksum was verified by the device the frame came from (`DATA_VALID`).
    pub csum_valid: bool,
    /// The frame is a segmentation-offload super-frame.
    pub gso: Option<Gso>,
}

impl Offload {
    /// A plain frame: complete checksum, one packet.
    pub const NONE: Offload = Offload {
        csum: None,
        csum_valid: false,
        gso: None,
    };

    /// Whether the frame is a super-frame standing for several packets.
    pub const fn is_gso(&self) -> bool {
        self.gso.is_some()
    }

    /// Whether the frame is a plain one whose bytes are final on the wire
    /// (no partial checksum, no segmentation pending).
    pub const fn is_plain(&self) -> bool {
        self.csum.is_none() && self.gso.is_none()
    }

    /// This offload state as a header with `num_buffers` 0.
    pub const fn to_repr(&self) -> VirtioNetRepr {
        VirtioNetRepr {
            csum: self.csum,
            data_valid: self.csum_valid,
            gso: self.gso,
            num_buffers: 0,
        }
    }

    /// The same offload state for the frame with `n` bytes inserted before
    /// offset `at` (a VLAN tag put back after the addresses): the checksum
    /// start and the repeated header length move when they lie past `at`.
    /// `None` if a field would pass 65,535.
    pub fn shifted(&self, at: u16, n: u16) -> Option<Offload> {
        let mut o = *self;
        if let Some(c) = &mut o.csum
            && c.start >= at
        {
            c.start = c.start.checked_add(n)?;
        }
        if let Some(g) = &mut o.gso
            && g.header_len > at
        {
            g.header_len = g.header_len.checked_add(n)?;
        }
        Some(o)
    }
}

impl From<VirtioNetRepr> for Offload {
    fn from(r: VirtioNetRepr) -> Offload {
        Offload {
            csum: r.csum,
            csum_valid: r.data_valid,
            gso: r.gso,
        }
    }
}

impl From<Offload> for VirtioNetRepr {
    fn from(o: Offload) -> VirtioNetRepr {
        o.to_repr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TSO super-frame header as Linux writes it: Ethernet + IPv4 + TCP, 1448-byte segments.
    const TSO4: [u8; 12] = [
        0x01, 0x01, // NEEDS_CSUM, TCPV4
        66, 0, // hdr_len 66
        0xa8, 0x05, // gso_size 1448
        34, 0, // csum_start 34
        16, 0, // csum_offset 16
        1, 0, // num_buffers 1
    ];

    #[test]
    fn parses_a_linux_tso_header() {
        let r = VirtioNetRepr::parse(&Header::new_checked(&TSO4[..]).unwrap(), 65_000).unwrap();
        assert_eq!(r.csum, Some(PartialChecksum { start: 34, offset: 16 }));
        assert_eq!(
            r.gso,
            Some(Gso {
                kind: GsoKind::TcpV4,
                ecn: false,
                size: 1448,
                header_len: 66
            })
        );
        assert!(!r.data_valid);
        assert_eq!(r.num_buffers, 1);
        assert_eq!(r.to_bytes(), TSO4);
    }

    #[test]
    fn round_trips_both_lengths() {
        let reprs = [
            VirtioNetRepr::PLAIN,
            VirtioNetRepr {
                data_valid: true,
                num_buffers: 3,
                ..VirtioNetRepr::PLAIN
            },
            VirtioNetRepr {
                csum: Some(PartialChecksum { start: 54, offset: 6 }),
                gso: Some(Gso {
                    kind: GsoKind::UdpL4,
                    ecn: false,
                    size: 1200,
                    header_len: 62,
                }),
                ..VirtioNetRepr::PLAIN
            },
            VirtioNetRepr {
                csum: Some(PartialChecksum { start: 54, offset: 16 }),
                gso: Some(Gso {
                    kind: GsoKind::TcpV6,
                    ecn: true,
                    size: 1428,
                    header_len: 86,
                }),
                ..VirtioNetRepr::PLAIN
            },
        ];
        for r in reprs {
            let long = r.to_bytes();
            let back = VirtioNetRepr::parse(&Header::new_checked(&long[..]).unwrap(), 9000).unwrap();
            assert_eq!(back, r);
            let mut short = [0xeeu8; HEADER_LEN_NO_NUM_BUFFERS];
            r.emit(&mut Header::new_checked(&mut short[..]).unwrap());
            assert_eq!(short[..], long[..HEADER_LEN_NO_NUM_BUFFERS]);
            let back = VirtioNetRepr::parse(&Header::new_checked(&short[..]).unwrap(), 9000).unwrap();
            assert_eq!(back, VirtioNetRepr { num_buffers: 0, ..r });
        }
    }

    #[test]
    fn field_accessors_are_little_endian() {
        let mut b = [0u8; HEADER_LEN];
        let mut h = Header::new_checked(&mut b[..]).unwrap();
        h.set_hdr_len(0x0102);
        h.set_gso_size(0x0304);
        h.set_csum_start(0x0506);
        h.set_csum_offset(0x0708);
        h.set_num_buffers(0x090a);
        assert_eq!(b, [0, 0, 2, 1, 4, 3, 6, 5, 8, 7, 0x0a, 0x09]);
        let h = Header::new_checked(&b[..]).unwrap();
        assert_eq!(
            (
                h.hdr_len(),
                h.gso_size(),
                h.csum_start(),
                h.csum_offset(),
                h.num_buffers()
            ),
            (0x0102, 0x0304, 0x0506, 0x0708, Some(0x090a))
        );
        assert_eq!(Header::new_checked(&b[..10]).unwrap().num_buffers(), None);
    }

    #[test]
    fn refuses_what_the_specification_does_not_allow() {
        // (description, header bytes, frame length, expected error kind)
        let cases: &[(&str, [u8; 12], usize, ErrorKind)] = &[
            (
                "checksum field past the frame",
                [1, 0, 0, 0, 0, 0, 34, 0, 16, 0, 0, 0],
                51,
                ErrorKind::BadLength,
            ),
            (
                "checksum start and offset at the u16 limits",
                [1, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0],
                65_535,
                ErrorKind::BadLength,
            ),
            (
                "gso_size 0 with a GSO type",
                [1, 1, 66, 0, 0, 0, 34, 0, 16, 0, 0, 0],
                9000,
                ErrorKind::BadValue,
            ),
            (
                "unknown gso_type 2",
                [1, 2, 66, 0, 0xa8, 5, 34, 0, 16, 0, 0, 0],
                9000,
                ErrorKind::BadValue,
            ),
            (
                "unknown gso_type 6",
                [1, 6, 66, 0, 0xa8, 5, 34, 0, 16, 0, 0, 0],
                9000,
                ErrorKind::BadValue,
            ),
            (
                "ECN bit without a GSO type",
                [0, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                100,
                ErrorKind::BadValue,
            ),
            (
                "ECN bit on UDP segmentation",
                [1, 0x85, 42, 0, 0xa8, 5, 34, 0, 6, 0, 0, 0],
                9000,
                ErrorKind::BadValue,
            ),
            (
                "GSO without NEEDS_CSUM",
                [0, 1, 66, 0, 0xa8, 5, 0, 0, 0, 0, 0, 0],
                9000,
                ErrorKind::BadValue,
            ),
            (
                "hdr_len past the frame",
                [1, 1, 0x10, 0x27, 0xa8, 5, 34, 0, 16, 0, 0, 0],
                9000,
                ErrorKind::BadLength,
            ),
            (
                "RSC_INFO flag (never negotiated)",
                [4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                100,
                ErrorKind::BadValue,
            ),
            (
                "unknown flag bit 0x80",
                [0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                100,
                ErrorKind::BadValue,
            ),
        ];
        for (what, bytes, frame_len, kind) in cases {
            let e = VirtioNetRepr::parse(&Header::new_checked(&bytes[..]).unwrap(), *frame_len).expect_err(what);
            assert_eq!((e.layer(), e.kind()), (Layer::VirtioNet, *kind), "{what}");
        }
        let e = Header::new_checked(&[0u8; 9][..]).unwrap_err();
        assert_eq!((e.layer(), e.kind()), (Layer::VirtioNet, ErrorKind::Truncated));
    }

    proptest::proptest! {
        /// Any bytes and frame length: parsing never panics, and what it accepts emits to a
        /// header that parses to the same value.
        #[test]
        fn accepted_headers_round_trip(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..16),
                                       frame_len in 0usize..70_000) {
            let Ok(h) = Header::new_checked(&bytes[..]) else { return Ok(()) };
            if let Ok(r) = VirtioNetRepr::parse(&h, frame_len) {
                let again = VirtioNetRepr::parse(&Header::new_checked(&r.to_bytes()[..]).unwrap(), frame_len).unwrap();
                proptest::prop_assert_eq!(again, r);
            }
        }
    }

    #[test]
    fn offload_keeps_every_field_but_num_buffers() {
        let r = VirtioNetRepr::parse(&Header::new_checked(&TSO4[..]).unwrap(), 65_000).unwrap();
        let o = Offload::from(r);
        assert!(o.is_gso() && !o.is_plain());
        assert_eq!(VirtioNetRepr::from(o), VirtioNetRepr { num_buffers: 0, ..r });
        assert!(Offload::NONE.is_plain());
        assert_eq!(Offload::default(), Offload::NONE);
        // A VLAN tag put back after the addresses moves both offsets by 4.
        let s = o.shifted(12, 4).unwrap();
        assert_eq!(s.csum, Some(PartialChecksum { start: 38, offset: 16 }));
        assert_eq!(s.gso.unwrap().header_len, 70);
        let near_limit = Offload {
            csum: Some(PartialChecksum {
                start: 65_533,
                offset: 0,
            }),
            ..Offload::NONE
        };
        assert_eq!(near_limit.shifted(12, 4), None);
    }

    #[test]
    fn checksum_field_ending_exactly_at_the_frame_end_is_accepted() {
        let b = [1, 0, 0, 0, 0, 0, 34, 0, 16, 0, 0, 0];
        assert!(VirtioNetRepr::parse(&Header::new_checked(&b[..]).unwrap(), 52).is_ok());
    }

    #[test]
    fn completes_a_partial_udp_checksum() {
        // IPv4 UDP 10.0.0.1:1000 -> 10.0.0.2:2000, payload "hi!", checksum field = pseudo-header sum.
        let mut frame = vec![0u8; 14];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = [0x45, 0, 0, 31, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];
        frame.extend_from_slice(&ip);
        let udp_len = 11u16;
        frame.extend_from_slice(&[0x03, 0xe8, 0x07, 0xd0, 0, udp_len as u8, 0, 0]);
        frame.extend_from_slice(b"hi!");
        let pseudo = checksum::pseudo_header_v4([10, 0, 0, 1], [10, 0, 0, 2], 17, udp_len);
        frame[40..42].copy_from_slice(&checksum::fold(pseudo).to_be_bytes());
        let csum = PartialChecksum { start: 34, offset: 6 };
        csum.complete(&mut frame).unwrap();
        // A receiver verifies: pseudo-header + segment sums to 0xffff.
        let total = checksum::combine(&[pseudo, checksum::sum(&frame[34..])]);
        assert_eq!(checksum::fold(total), 0xffff);
        assert_eq!(
            PartialChecksum { start: 34, offset: 10 }
                .complete(&mut frame)
                .unwrap_err()
                .kind(),
            ErrorKind::BadLength
        );
    }
}

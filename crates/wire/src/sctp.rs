//! SCTP packets (RFC 9260): the common header and the chunks behind it.
//!
//! The firewall needs the common header only: the ports key the flow and the
//! verification tag names the association. The chunks stay opaque in
//! [`SctpRepr`] (so a packet re-emits byte for byte) and can be walked with
//! [`Chunks`] when their types matter (an INIT opens an association, an ABORT
//! or SHUTDOWN-COMPLETE ends it). All fields are big-endian, except the
//! CRC32c checksum, which RFC 9260 appendix A stores least significant byte
//! first (the byte order of the reflected CRC's register).

use crate::field::{read_u16, read_u32, read_u32_le, write_u16, write_u32, write_u32_le};
use crate::{Error, ErrorKind, Layer, Result};

/// IP protocol number of SCTP.
pub const PROTOCOL: u8 = 132;

/// Byte ranges of the common header's fields.
mod field {
    use crate::field::Field;
    pub const SRC_PORT: Field = 0..2;
    pub const DST_PORT: Field = 2..4;
    pub const VERIFICATION_TAG: Field = 4..8;
    pub const CHECKSUM: Field = 8..12;
    pub const CHUNKS: usize = 12;
}

/// Length of the common header.
pub const HEADER_LEN: usize = field::CHUNKS;

/// Length of a chunk header (type, flags, length).
pub const CHUNK_HEADER_LEN: usize = 4;

/// Chunk types the firewall looks at (RFC 9260 section 3.2).
pub mod chunk {
    /// Payload data.
    pub const DATA: u8 = 0;
    /// Initiation: the first chunk of a new association (verification tag 0).
    pub const INIT: u8 = 1;
    /// Initiation acknowledgement.
    pub const INIT_ACK: u8 = 2;
    /// Abort: ends the association.
    pub const ABORT: u8 = 6;
    /// Shutdown.
    pub const SHUTDOWN: u8 = 7;
    /// Shutdown complete: the last chunk of an association.
    pub const SHUTDOWN_COMPLETE: u8 = 14;
}

/// CRC32c (Castagnoli, reflected polynomial 0x82f63b78) lookup table.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// The CRC32c of `parts` read one after the other.
fn crc32c(parts: &[&[u8]]) -> u32 {
    let mut crc = !0u32;
    for part in parts {
        for &b in *part {
            crc = CRC32C_TABLE[usize::from((crc as u8) ^ b)] ^ (crc >> 8);
        }
    }
    !crc
}

/// A read/write view of an SCTP packet (the whole IP payload).
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

    /// Wrap a buffer, checking that it holds the common header.
    pub fn new_checked(buffer: T) -> Result<Packet<T>> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Check that the buffer holds the common header.
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            return Err(Error::new(Layer::Sctp, ErrorKind::Truncated));
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

    /// The verification tag (0 in a packet carrying INIT).
    pub fn verification_tag(&self) -> u32 {
        read_u32(self.buffer.as_ref(), field::VERIFICATION_TAG)
    }

    /// The checksum field, as the CRC32c value it holds (stored least significant byte first).
    pub fn checksum(&self) -> u32 {
        read_u32_le(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// The CRC32c of the packet with its checksum field taken as zero.
    fn compute_checksum(&self) -> u32 {
        let buf = self.buffer.as_ref();
        crc32c(&[&buf[..field::CHECKSUM.start], &[0; 4], &buf[field::CHUNKS..]])
    }

    /// Whether the CRC32c checksum verifies.
    pub fn verify_checksum(&self) -> bool {
        self.checksum() == self.compute_checksum()
    }

    /// The chunks, in order.
    pub fn chunks(&self) -> Chunks<'_> {
        Chunks {
            rest: &self.buffer.as_ref()[field::CHUNKS..],
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Packet<&'a T> {
    /// Everything after the common header: the chunks, unparsed.
    pub fn payload(&self) -> &'a [u8] {
        &self.buffer.as_ref()[field::CHUNKS..]
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

    /// Set the verification tag.
    pub fn set_verification_tag(&mut self, value: u32) {
        write_u32(self.buffer.as_mut(), field::VERIFICATION_TAG, value)
    }

    /// Set the checksum field to a CRC32c value.
    pub fn set_checksum(&mut self, value: u32) {
        write_u32_le(self.buffer.as_mut(), field::CHECKSUM, value)
    }

    /// Compute and store the CRC32c checksum over the whole packet.
    pub fn fill_checksum(&mut self) {
        let value = self.compute_checksum();
        self.set_checksum(value);
    }

    /// The chunks, unparsed, mutably.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::CHUNKS..]
    }
}

/// One chunk: its type, flags and value (the bytes after the chunk header,
/// up to its length field, without padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Chunk<'a> {
    /// Chunk type (see [`chunk`]).
    pub kind: u8,
    /// Chunk flags.
    pub flags: u8,
    /// The chunk's value.
    pub value: &'a [u8],
}

/// Iterator over the chunks of a packet ([`Packet::chunks`]). A chunk whose
/// length field is below the chunk header or past the packet yields an
/// error and ends the walk; the padding after the last chunk may be absent.
#[derive(Debug, Clone)]
pub struct Chunks<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Chunks<'a> {
    type Item = Result<Chunk<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let [kind, flags, l0, l1, ..] = *self.rest else {
            self.rest = &[];
            return Some(Err(Error::new(Layer::Sctp, ErrorKind::Truncated)));
        };
        let len = usize::from(u16::from_be_bytes([l0, l1]));
        if len < CHUNK_HEADER_LEN || len > self.rest.len() {
            self.rest = &[];
            return Some(Err(Error::new(Layer::Sctp, ErrorKind::BadLength)));
        }
        let value = &self.rest[CHUNK_HEADER_LEN..len];
        // Chunks are padded to a multiple of 4; the last one's padding may be missing.
        let padded = (len + 3) & !3;
        self.rest = self.rest.get(padded..).unwrap_or(&[]);
        Some(Ok(Chunk { kind, flags, value }))
    }
}

/// A parsed SCTP packet: the common header, the chunks kept as bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SctpRepr<'a> {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Verification tag.
    pub verification_tag: u32,
    /// The chunks, unparsed.
    pub payload: &'a [u8],
}

impl<'a> SctpRepr<'a> {
    /// Parse a packet (the checksum is not verified: see [`Packet::verify_checksum`]).
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&'a T>) -> Result<SctpRepr<'a>> {
        packet.check_len()?;
        Ok(SctpRepr {
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            verification_tag: packet.verification_tag(),
            payload: packet.payload(),
        })
    }

    /// Bytes [`SctpRepr::emit`] writes.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Write the packet into `packet`, whose buffer is [`SctpRepr::buffer_len`] long, with its checksum.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        packet.set_src_port(self.src_port);
        packet.set_dst_port(self.dst_port);
        packet.set_verification_tag(self.verification_tag);
        packet.payload_mut()[..self.payload.len()].copy_from_slice(self.payload);
        packet.fill_checksum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An INIT from port 40000 to 5000 (verification tag 0, as an INIT must carry).
    const INIT: [u8; 32] = [
        0x9c, 0x40, 0x13, 0x88, 0, 0, 0, 0, 0, 0, 0, 0, // common header, checksum filled below
        1, 0, 0, 20, 0x12, 0x34, 0x56, 0x78, 0, 1, 0, 0, 0, 10, 0, 10, 0, 0, 0, 1, // INIT
    ];

    #[test]
    fn crc32c_known_answers() {
        // RFC 3720 appendix B.4: 32 bytes of zeros, and of 0xff.
        assert_eq!(crc32c(&[&[0u8; 32]]), 0x8a91_36aa);
        assert_eq!(crc32c(&[&[0xffu8; 32]]), 0x62a8_ab43);
        // Split input sums as one.
        assert_eq!(crc32c(&[b"12345", b"6789"]), crc32c(&[b"123456789"]));
        assert_eq!(crc32c(&[b"123456789"]), 0xe306_9283);
    }

    #[test]
    fn header_fields_checksum_and_chunks() {
        let mut buf = INIT;
        let mut p = Packet::new_checked(&mut buf[..]).unwrap();
        assert!(!p.verify_checksum());
        p.fill_checksum();
        assert!(p.verify_checksum());
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!((p.src_port(), p.dst_port(), p.verification_tag()), (40000, 5000, 0));
        let chunks: Vec<_> = p.chunks().collect();
        assert_eq!(chunks.len(), 1);
        let c = chunks[0].unwrap();
        assert_eq!((c.kind, c.flags, c.value.len()), (chunk::INIT, 0, 16));
        // One flipped bit anywhere fails the checksum.
        for i in 0..buf.len() {
            let mut b = buf;
            b[i] ^= 0x10;
            assert!(!Packet::new_unchecked(&b[..]).verify_checksum(), "byte {i}");
        }
    }

    #[test]
    fn repr_round_trip_and_bad_lengths() {
        let mut buf = INIT;
        Packet::new_unchecked(&mut buf[..]).fill_checksum();
        let repr = SctpRepr::parse(&Packet::new_checked(&buf[..]).unwrap()).unwrap();
        let mut out = vec![0; repr.buffer_len()];
        repr.emit(&mut Packet::new_unchecked(&mut out[..]));
        assert_eq!(out, buf);
        for n in 0..HEADER_LEN {
            assert_eq!(
                Packet::new_checked(&buf[..n]).unwrap_err(),
                Error::new(Layer::Sctp, ErrorKind::Truncated)
            );
        }
        // A chunk length below its header, past the packet, or a cut chunk header.
        for (len, kind) in [(2u16, ErrorKind::BadLength), (200, ErrorKind::BadLength)] {
            let mut b = buf;
            b[14..16].copy_from_slice(&len.to_be_bytes());
            let p = Packet::new_checked(&b[..]).unwrap();
            assert_eq!(p.chunks().collect::<Vec<_>>(), vec![Err(Error::new(Layer::Sctp, kind))]);
        }
        let p = Packet::new_checked(&buf[..14]).unwrap();
        assert_eq!(
            p.chunks().collect::<Vec<_>>(),
            vec![Err(Error::new(Layer::Sctp, ErrorKind::Truncated))]
        );
        // Two chunks, the first padded, the last without its padding.
        let mut two = buf[..12].to_vec();
        two.extend_from_slice(&[0, 3, 0, 5, 0xaa, 0, 0, 0, 14, 0, 0, 6, 1, 2]);
        let kinds: Vec<_> = Packet::new_checked(&two[..])
            .unwrap()
            .chunks()
            .map(|c| c.map(|c| (c.kind, c.value.to_vec())))
            .collect();
        assert_eq!(kinds, vec![Ok((0, vec![0xaa])), Ok((14, vec![1, 2]))]);
    }
}

//! Field offsets and the byte order fields are read and written in.
//!
//! Each protocol module names its header fields as byte ranges in a private
//! `field` module and reads and writes every multi-byte field through the
//! functions here, so the byte order is decided in one place: network byte
//! order (big-endian) for every field of every header, except the two
//! fields their specifications store least significant byte first (the
//! `_le` functions): SCTP's CRC32c (RFC 9260 appendix A) and the virtio-net
//! header (virtio 1.x, section 5.1.6).
//!
//! A range longer than the value reads its first bytes; a shorter one, or
//! one past the end of the buffer, panics, which a view's `new_checked`
//! rules out before any accessor runs.

/// A range of bytes within a header.
pub type Field = core::ops::Range<usize>;
/// The bytes from an offset to the end of the header.
#[allow(dead_code)]
pub type Rest = core::ops::RangeFrom<usize>;

/// The 16-bit field at `f`, in network byte order.
pub fn read_u16(buf: &[u8], f: Field) -> u16 {
    let d = &buf[f];
    u16::from_be_bytes([d[0], d[1]])
}

/// The 32-bit field at `f`, in network byte order.
pub fn read_u32(buf: &[u8], f: Field) -> u32 {
    let d = &buf[f];
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// Set the 16-bit field at `f`, in network byte order.
pub fn write_u16(buf: &mut [u8], f: Field, value: u16) {
    buf[f].copy_from_slice(&value.to_be_bytes())
}

/// Set the 32-bit field at `f`, in network byte order.
pub fn write_u32(buf: &mut [u8], f: Field, value: u32) {
    buf[f].copy_from_slice(&value.to_be_bytes())
}

/// The 16-bit field at `f`, least significant byte first (virtio-net header).
pub fn read_u16_le(buf: &[u8], f: Field) -> u16 {
    let d = &buf[f];
    u16::from_le_bytes([d[0], d[1]])
}

/// The 32-bit field at `f`, least significant byte first (SCTP's CRC32c).
pub fn read_u32_le(buf: &[u8], f: Field) -> u32 {
    let d = &buf[f];
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

/// Set the 16-bit field at `f`, least significant byte first (virtio-net header).
pub fn write_u16_le(buf: &mut [u8], f: Field, value: u16) {
    buf[f].copy_from_slice(&value.to_le_bytes())
}

/// Set the 32-bit field at `f`, least significant byte first (SCTP's CRC32c).
pub fn write_u32_le(buf: &mut [u8], f: Field, value: u32) {
    buf[f].copy_from_slice(&value.to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_orders() {
        let mut b = [0u8; 6];
        write_u16(&mut b, 0..2, 0x1234);
        write_u32(&mut b, 2..6, 0x89ab_cdef);
        assert_eq!(b, [0x12, 0x34, 0x89, 0xab, 0xcd, 0xef]);
        assert_eq!((read_u16(&b, 0..2), read_u32(&b, 2..6)), (0x1234, 0x89ab_cdef));
        assert_eq!((read_u16_le(&b, 0..2), read_u32_le(&b, 2..6)), (0x3412, 0xefcd_ab89));
        write_u16_le(&mut b, 0..2, 0x1234);
        write_u32_le(&mut b, 2..6, 0x89ab_cdef);
        assert_eq!(b, [0x34, 0x12, 0xef, 0xcd, 0xab, 0x89]);
        // A longer range reads its first bytes.
        assert_eq!(read_u16(&b, 0..6), 0x3412);
    }
}

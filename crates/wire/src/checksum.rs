//! The Internet checksum (RFC 1071), pseudo-headers, and incremental update (RFC 1624).
//!
//! Sums are accumulated in a `u32` without folding until the end; a caller
//! combines partial sums with [`combine`] and folds once with [`fold`].

use core::net::IpAddr;

/// Sum `data` as big-endian 16-bit words (an odd trailing byte is padded with zero).
///
/// Returns a 32-bit accumulator (folded to 16 bits: a value equal, in ones'
/// complement arithmetic, to the sum). Adding the result of several calls is
/// valid as long as every part but the last has even length.
///
/// The words are summed as little-endian 32-bit words into a 64-bit
/// accumulator (a loop the compiler vectorizes), folded, and byte-swapped:
/// the ones' complement sum does not depend on byte order (RFC 1071 §2(B)).
pub fn sum(data: &[u8]) -> u32 {
    // Four accumulators of 32-bit words in 64 bits: no carry is lost below 2^32 words.
    let mut acc = [0u64; 4];
    let mut quads = data.chunks_exact(16);
    for q in &mut quads {
        for (a, w) in acc.iter_mut().zip(q.chunks_exact(4)) {
            *a += u64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        }
    }
    let mut total: u64 = acc.iter().map(|&a| (a & 0xffff_ffff) + (a >> 32)).sum();
    let mut words = quads.remainder().chunks_exact(4);
    for w in &mut words {
        total += u64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    total += u64::from(u32::from_le_bytes(tail));
    // Fold 64 → 16 bits with end-around carries, then back to big-endian words.
    while total > 0xffff {
        total = (total & 0xffff) + (total >> 16);
    }
    u32::from((total as u16).swap_bytes())
}

/// Add unfolded partial sums.
pub fn combine(parts: &[u32]) -> u32 {
    let mut acc: u64 = parts.iter().map(|&p| u64::from(p)).sum();
    while acc > 0xffff_ffff {
        acc = (acc & 0xffff_ffff) + (acc >> 32);
    }
    acc as u32
}

/// Fold an accumulator to 16 bits (ones' complement sum, not yet complemented).
pub fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The checksum field value for `data`: the complement of the folded sum.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data))
}

/// Sum of the IPv4 pseudo-header for an upper-layer protocol (RFC 793 / 768).
pub fn pseudo_header_v4(src: [u8; 4], dst: [u8; 4], protocol: u8, length: u16) -> u32 {
    sum(&src) + sum(&dst) + u32::from(protocol) + u32::from(length)
}

/// Sum of the IPv6 pseudo-header (RFC 8200 section 8.1).
pub fn pseudo_header_v6(src: [u8; 16], dst: [u8; 16], next_header: u8, length: u32) -> u32 {
    combine(&[
        sum(&src),
        sum(&dst),
        (length >> 16) + (length & 0xffff),
        u32::from(next_header),
    ])
}

/// Sum of the pseudo-header for either IP version, for TCP and UDP, whose
/// checksum routines take `core::net::IpAddr`s. `None` when the addresses are
/// of different families (a caller bug) or `length` does not fit the version's field.
pub fn pseudo_header(src: IpAddr, dst: IpAddr, protocol: u8, length: usize) -> Option<u32> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Some(pseudo_header_v4(
            s.octets(),
            d.octets(),
            protocol,
            u16::try_from(length).ok()?,
        )),
        (IpAddr::V6(s), IpAddr::V6(d)) => Some(pseudo_header_v6(
            s.octets(),
            d.octets(),
            protocol,
            u32::try_from(length).ok()?,
        )),
        _ => None,
    }
}

/// Incrementally update checksum field `old_check` when one 16-bit word of the
/// covered data changes from `old` to `new` (RFC 1624, equation 3:
/// `HC' = ~(~HC + ~m + m')`).
pub fn update16(old_check: u16, old: u16, new: u16) -> u16 {
    let acc = u32::from(!old_check) + u32::from(!old) + u32::from(new);
    !fold(acc)
}

/// Incrementally update a checksum when a 32-bit field (an IPv4 address, say) changes.
pub fn update32(old_check: u16, old: u32, new: u32) -> u16 {
    let c = update16(old_check, (old >> 16) as u16, (new >> 16) as u16);
    update16(c, old as u16, new as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: words 0001 f203 f4f5 f6f7 sum to 0xddf2 (folded).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(sum(&[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
    }

    #[test]
    fn long_buffers_match_bytewise_sum() {
        let data: Vec<u8> = (0..1501u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut slow = 0u64;
        for p in data.chunks(2) {
            let w = if p.len() == 2 {
                u16::from_be_bytes([p[0], p[1]])
            } else {
                u16::from(p[0]) << 8
            };
            slow += u64::from(w);
        }
        while slow > 0xffff {
            slow = (slow & 0xffff) + (slow >> 16);
        }
        assert_eq!(u64::from(fold(sum(&data))), slow);
    }

    /// The sum by the definition: big-endian 16-bit words, odd byte padded, folded.
    fn reference(data: &[u8]) -> u16 {
        let mut acc = 0u64;
        for p in data.chunks(2) {
            acc += u64::from(u16::from_be_bytes([p[0], *p.get(1).unwrap_or(&0)]));
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    proptest::proptest! {
        /// Any bytes, any length and alignment: the fast sum folds to the reference, and
        /// sums of even-length parts add up to the sum of the whole.
        #[test]
        fn sum_matches_the_definition(data in proptest::collection::vec(proptest::num::u8::ANY, 0..3000),
                                      skip in 0usize..8, cut in 0usize..3000) {
            let data = &data[skip.min(data.len())..];
            proptest::prop_assert_eq!(fold(sum(data)), reference(data));
            let cut = (cut.min(data.len())) & !1;
            proptest::prop_assert_eq!(fold(combine(&[sum(&data[..cut]), sum(&data[cut..])])), reference(data));
        }
    }

    #[test]
    fn sums_at_the_carry_edges() {
        for data in [
            vec![0xff; 65_536],
            vec![0xff; 7],
            vec![0; 64],
            vec![0xff, 0xff],
            vec![],
            vec![0x80; 131_071],
        ] {
            assert_eq!(
                fold(sum(&data)),
                reference(&data),
                "{} bytes of {:?}",
                data.len(),
                data.first()
            );
        }
    }

    #[test]
    fn incremental_update_matches_recompute() {
        let mut data: Vec<u8> = (0..40u8).collect();
        let before = checksum(&data);
        let old = u32::from_be_bytes([data[12], data[13], data[14], data[15]]);
        let new = 0xc0a8_0101u32;
        data[12..16].copy_from_slice(&new.to_be_bytes());
        assert_eq!(update32(before, old, new), checksum(&data));
    }
}

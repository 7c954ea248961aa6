//! HPACK (RFC 7541): the header compression of HTTP/2, decoding side.
//!
//! Integers with prefixes, string literals (plain or Huffman-coded), the
//! static table, and a dynamic table whose size the peer sets within the
//! limit we allow. The Huffman code is canonical, so it is rebuilt from the
//! code lengths of RFC 7541 Appendix B. Every length read from the input is
//! checked against what remains and against `MAX_STRING`, so a hostile
//! header block costs bounded memory and time and ends in an error, never a
//! panic.

use std::collections::VecDeque;
use std::sync::OnceLock;

/// Longest header name or value decoded.
pub const MAX_STRING: usize = 16 * 1024;
/// Largest dynamic table we accept (the default SETTINGS_HEADER_TABLE_SIZE).
pub const MAX_TABLE_SIZE: usize = 4096;
/// Headers decoded from one block at most.
pub const MAX_HEADERS: usize = 256;

/// Why a header block did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HpackError {
    /// The block ended inside a representation.
    Truncated,
    /// An integer does not fit.
    Overflow,
    /// An index outside the tables.
    BadIndex,
    /// Invalid Huffman data (bad padding, or the EOS symbol).
    BadHuffman,
    /// A table size update above the limit.
    TableSize,
    /// A string or the header list is over the limits.
    TooLarge,
}

/// Code lengths of symbols 0..=256 (256 is EOS), RFC 7541 Appendix B.
const LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, // 0-15
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, // 16-31
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, // 32-47
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, // 48-63
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, // 64-79
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, // 80-95
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, // 96-111
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, // 112-127
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, // 128-143
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, // 144-159
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, // 160-175
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, // 176-191
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, // 192-207
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, // 208-223
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, // 224-239
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, // 240-255
    30, // EOS
];

const EOS: u16 = 256;

/// A binary decoding tree: node i has children `[left, right]`; a child
/// value `>= 0x8000` is a leaf holding symbol `value - 0x8000`.
struct Tree {
    nodes: Vec<[u16; 2]>,
}

fn tree() -> &'static Tree {
    static TREE: OnceLock<Tree> = OnceLock::new();
    TREE.get_or_init(|| {
        // Canonical codes: by length, then symbol.
        let mut syms: Vec<(u8, u16)> = (0..=256u16).map(|s| (LENGTHS[usize::from(s)], s)).collect();
        syms.sort_unstable();
        let mut nodes = vec![[0u16; 2]];
        let mut code: u32 = 0;
        let mut prev_len = syms[0].0;
        for (i, &(len, sym)) in syms.iter().enumerate() {
            if i > 0 {
                code = (code + 1) << (len - prev_len);
            }
            prev_len = len;
            let mut node = 0usize;
            for bit in (0..len).rev() {
                let b = ((code >> bit) & 1) as usize;
                if bit == 0 {
                    nodes[node][b] = 0x8000 | sym;
                } else {
                    if nodes[node][b] == 0 {
                        nodes.push([0, 0]);
                        nodes[node][b] = (nodes.len() - 1) as u16;
                    }
                    node = usize::from(nodes[node][b]);
                }
            }
        }
        Tree { nodes }
    })
}

/// Decodes Huffman-coded bytes.
pub fn huffman_decode(data: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    let t = tree();
    let mut node = 0usize;
    // Bits consumed since the last symbol, all ones so far (valid padding is a prefix of EOS).
    let mut pad_bits = 0u32;
    let mut pad_ones = true;
    for &byte in data {
        for bit in (0..8).rev() {
            let b = usize::from((byte >> bit) & 1);
            pad_bits += 1;
            pad_ones &= b == 1;
            let next = t.nodes[node][b];
            if next == 0 {
                return Err(HpackError::BadHuffman);
            }
            if next & 0x8000 != 0 {
                let sym = next & 0x7fff;
                if sym == EOS {
                    return Err(HpackError::BadHuffman);
                }
                out.push(sym as u8);
                if out.len() > MAX_STRING {
                    return Err(HpackError::TooLarge);
                }
                node = 0;
                pad_bits = 0;
                pad_ones = true;
            } else {
                node = usize::from(next);
            }
        }
    }
    if pad_bits > 7 || !pad_ones {
        return Err(HpackError::BadHuffman);
    }
    Ok(())
}

/// The static table (RFC 7541 Appendix A), indexes 1..=61.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// One direction's decoder (its dynamic table).
#[derive(Debug, Default)]
pub struct Decoder {
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max: Option<usize>,
}

/// A decoded header list.
pub type Headers = Vec<(Vec<u8>, Vec<u8>)>;

fn read_int(data: &[u8], at: &mut usize, prefix: u8) -> Result<usize, HpackError> {
    let first = *data.get(*at).ok_or(HpackError::Truncated)?;
    *at += 1;
    let mask = ((1u16 << prefix) - 1) as u8;
    let mut v = usize::from(first & mask);
    if v < usize::from(mask) {
        return Ok(v);
    }
    let mut shift = 0u32;
    loop {
        let b = *data.get(*at).ok_or(HpackError::Truncated)?;
        *at += 1;
        if shift > 28 {
            return Err(HpackError::Overflow);
        }
        v = v
            .checked_add(usize::from(b & 0x7f) << shift)
            .ok_or(HpackError::Overflow)?;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
}

fn read_string(data: &[u8], at: &mut usize) -> Result<Vec<u8>, HpackError> {
    let huffman = data.get(*at).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = read_int(data, at, 7)?;
    if len > MAX_STRING * 2 {
        return Err(HpackError::TooLarge);
    }
    let end = at.checked_add(len).ok_or(HpackError::Overflow)?;
    let raw = data.get(*at..end).ok_or(HpackError::Truncated)?;
    *at = end;
    if huffman {
        let mut out = Vec::with_capacity(len * 8 / 5);
        huffman_decode(raw, &mut out)?;
        Ok(out)
    } else if len > MAX_STRING {
        Err(HpackError::TooLarge)
    } else {
        Ok(raw.to_vec())
    }
}

impl Decoder {
    fn limit(&self) -> usize {
        self.max.unwrap_or(MAX_TABLE_SIZE)
    }

    fn get(&self, index: usize) -> Result<(Vec<u8>, Vec<u8>), HpackError> {
        match index {
            0 => Err(HpackError::BadIndex),
            1..=61 => {
                let (n, v) = STATIC[index - 1];
                Ok((n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            }
            _ => self.table.get(index - 62).cloned().ok_or(HpackError::BadIndex),
        }
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = name.len() + value.len() + 32;
        self.table.push_front((name, value));
        self.size += size;
        self.evict();
    }

    fn evict(&mut self) {
        while self.size > self.limit() {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + 32,
                None => {
                    self.size = 0;
                    break;
                }
            }
        }
    }

    /// Decodes one header block.
    pub fn decode(&mut self, block: &[u8]) -> Result<Headers, HpackError> {
        let mut at = 0;
        let mut out = Vec::new();
        while at < block.len() {
            if out.len() >= MAX_HEADERS {
                return Err(HpackError::TooLarge);
            }
            let b = block[at];
            if b & 0x80 != 0 {
                // Indexed field.
                let i = read_int(block, &mut at, 7)?;
                out.push(self.get(i)?);
            } else if b & 0xc0 == 0x40 {
                // Literal with incremental indexing.
                let i = read_int(block, &mut at, 6)?;
                let name = if i == 0 {
                    read_string(block, &mut at)?
                } else {
                    self.get(i)?.0
                };
                let value = read_string(block, &mut at)?;
                self.insert(name.clone(), value.clone());
                out.push((name, value));
            } else if b & 0xe0 == 0x20 {
                // Dynamic table size update.
                let size = read_int(block, &mut at, 5)?;
                if size > MAX_TABLE_SIZE {
                    return Err(HpackError::TableSize);
                }
                self.max = Some(size);
                self.evict();
            } else {
                // Literal without indexing (0000) or never indexed (0001).
                let i = read_int(block, &mut at, 4)?;
                let name = if i == 0 {
                    read_string(block, &mut at)?
                } else {
                    self.get(i)?.0
                };
                let value = read_string(block, &mut at)?;
                out.push((name, value));
            }
        }
        Ok(out)
    }
}

// Carrying the dynamic table to another host (live migration): `crate::persist`.
impl Decoder {
    /// Appends the dynamic table (oldest entry last, as it is indexed) and its size limit.
    pub(crate) fn persist(&self, out: &mut Vec<u8>) {
        use crate::persist::{put_bytes, put_u16, put_u32};
        match self.max {
            None => out.push(0),
            Some(m) => {
                out.push(1);
                put_u32(out, m as u32);
            }
        }
        put_u16(out, self.table.len() as u16);
        for (n, v) in &self.table {
            put_bytes(out, n);
            put_bytes(out, v);
        }
    }

    /// A decoder from [`Decoder::persist`]'s bytes: the table's size is
    /// recomputed from its entries and must fit its limit.
    pub(crate) fn restore(r: &mut crate::persist::Reader<'_>) -> crate::persist::Result<Decoder> {
        use crate::persist::{bound, inconsistent};
        let max = match r.bool("hpack limit")? {
            false => None,
            true => {
                let at = r.at();
                let m = r.u32("hpack limit")?;
                bound("hpack limit", at, u64::from(m), MAX_TABLE_SIZE as u64)?;
                Some(m as usize)
            }
        };
        let at = r.at();
        let n = r.count("hpack entries", MAX_TABLE_SIZE / 32)?;
        let mut d = Decoder {
            table: VecDeque::with_capacity(n),
            size: 0,
            max,
        };
        for _ in 0..n {
            let name = r.bytes("hpack name", MAX_TABLE_SIZE)?;
            let value = r.bytes("hpack value", MAX_TABLE_SIZE)?;
            d.size += name.len() + value.len() + 32;
            if d.size > d.limit() {
                return Err(inconsistent("hpack entries", at, "the table is larger than its limit"));
            }
            d.table.push_back((name, value));
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The canonical rebuild gives the RFC's codes (spot checks across lengths).
    #[test]
    fn canonical_codes_match_the_rfc() {
        // (symbol, code, bits) from RFC 7541 Appendix B.
        let known: &[(u16, u32, u8)] = &[
            (48, 0x0, 5),
            (116, 0x9, 5),
            (32, 0x14, 6),
            (58, 0x5c, 7),
            (38, 0xf8, 8),
            (33, 0x3f8, 10),
            (39, 0x7fa, 11),
            (0, 0x1ff8, 13),
            (92, 0x7fff0, 19),
            (128, 0xfffe6, 20),
            (1, 0x7fffd8, 23),
            (9, 0xffffea, 24),
            (199, 0x1ffffec, 25),
            (255, 0x3ffffee, 26),
            (254, 0x7fffff0, 27),
            (127, 0xffffffc, 28),
            (256, 0x3fffffff, 30),
        ];
        let t = tree();
        for &(sym, code, bits) in known {
            let mut node = 0usize;
            let mut leaf = None;
            for bit in (0..bits).rev() {
                let b = ((code >> bit) & 1) as usize;
                let next = t.nodes[node][b];
                if next & 0x8000 != 0 {
                    leaf = Some(next & 0x7fff);
                    assert_eq!(bit, 0, "symbol {sym} ends early");
                } else {
                    node = usize::from(next);
                }
            }
            assert_eq!(leaf, Some(sym), "code {code:#x}/{bits}");
        }
    }

    #[test]
    fn rfc_examples() {
        // C.4.1: Huffman-coded "www.example.com".
        let mut out = Vec::new();
        huffman_decode(
            &[0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff],
            &mut out,
        )
        .unwrap();
        assert_eq!(out, b"www.example.com");
        // C.3: three requests without Huffman coding, sharing a dynamic table.
        let mut d = Decoder::default();
        let h = d
            .decode(&[
                0x82, 0x86, 0x84, 0x41, 0x0f, b'w', b'w', b'w', b'.', b'e', b'x', b'a', b'm', b'p', b'l', b'e', b'.',
                b'c', b'o', b'm',
            ])
            .unwrap();
        assert_eq!(h[2], (b":path".to_vec(), b"/".to_vec()));
        assert_eq!(h[3], (b":authority".to_vec(), b"www.example.com".to_vec()));
        let h = d
            .decode(&[
                0x82, 0x86, 0x84, 0xbe, 0x58, 0x08, b'n', b'o', b'-', b'c', b'a', b'c', b'h', b'e',
            ])
            .unwrap();
        assert_eq!(h[3], (b":authority".to_vec(), b"www.example.com".to_vec()));
        assert_eq!(h[4], (b"cache-control".to_vec(), b"no-cache".to_vec()));
        assert_eq!(d.table.len(), 2);
    }

    #[test]
    fn hostile_blocks_fail_cleanly() {
        let mut d = Decoder::default();
        assert_eq!(d.decode(&[0x80]), Err(HpackError::BadIndex));
        assert_eq!(d.decode(&[0xff, 0x80]), Err(HpackError::Truncated));
        assert_eq!(
            d.decode(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Err(HpackError::Overflow)
        );
        assert_eq!(d.decode(&[0x3f, 0xe2, 0x1f]), Err(HpackError::TableSize));
        assert!(d.decode(&[0x3f, 0xe1, 0x1f]).is_ok(), "4096 is the limit itself");
        assert_eq!(d.decode(&[0x00, 0x05, b'a']), Err(HpackError::Truncated));
        let mut out = Vec::new();
        // All-ones for more than 7 bits is not padding.
        assert_eq!(huffman_decode(&[0xff, 0xff], &mut out), Err(HpackError::BadHuffman));
        for n in 0..40u8 {
            let block: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37) ^ 0x55).collect();
            let _ = d.decode(&block);
        }
    }
}

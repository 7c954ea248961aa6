//! The on-disk format of a segment: a header, then framed records.
//!
//! A segment file `seg-<first seq, 20 digits>.log` starts with a header
//! (magic, the sequence number of its first record, the hash of the record
//! before it — the previous segment's last — and that record's time), followed
//! by frames `[len u32 LE][payload: JSON of a Record][hash: 32 bytes]`. The
//! hash is BLAKE3 over (previous record's hash ‖ seq as u64 LE ‖ payload), so
//! the records of all segments form one chain: changing, removing, adding or
//! moving any record breaks the chain at that point, and the header ties each
//! segment to its predecessor. Sequence numbers are not stored per record;
//! they follow from the header and the position, and are bound by the hash.
//!
//! Sidecars share the segment's stem: `.ckpt` (signed checkpoints, see
//! [`crate::checkpoint`]), `.idx` (the query index, see [`crate::index`]) and
//! `.torn` (bytes of a torn tail set aside by recovery).
//!
//! Readers stream a segment ([`FrameScanner`]): memory is one read buffer
//! and the frames being looked at, never the segment. After damage the
//! chain itself says where reading can resume ([`resync`]): each frame's
//! stored hash is the chain hash of its payload after the stored hash of the
//! frame before it, which are the 32 bytes just before it.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::error::{AuditError, IoContext};

/// A record hash.
pub type Hash = [u8; 32];

/// The hash before the first record of a log.
pub const GENESIS: Hash = [0; 32];

/// Length of a record hash.
pub const HASH_LEN: usize = 32;

/// Length of a frame's length prefix.
pub const LEN_LEN: usize = 4;

/// The largest payload a frame may carry; a longer length is corruption.
pub const MAX_PAYLOAD: u32 = 16 << 20;

/// Bytes of a frame around its payload.
pub const FRAME_OVERHEAD: usize = LEN_LEN + HASH_LEN;

/// Field layout of the segment header.
mod field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..8;
    pub const FIRST_SEQ: Range<usize> = 8..16;
    pub const PREV_HASH: Range<usize> = 16..48;
    pub const PREV_TIME_NS: Range<usize> = 48..56;
}

/// Segment magic: format name and version.
pub const MAGIC: &[u8; 8] = b"PALAUDS1";

/// Length of the segment header.
pub const HEADER_LEN: usize = field::PREV_TIME_NS.end;

/// A segment's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Sequence number of the segment's first record (the log starts at 1).
    pub first_seq: u64,
    /// Hash of the record before it ([`GENESIS`] for the log's first).
    pub prev_hash: Hash,
    /// Time of the record before it (0 for the log's first): informative only.
    pub prev_time_ns: u64,
}

impl SegmentHeader {
    /// The header's bytes.
    pub fn emit(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[field::MAGIC].copy_from_slice(MAGIC);
        b[field::FIRST_SEQ].copy_from_slice(&self.first_seq.to_le_bytes());
        b[field::PREV_HASH].copy_from_slice(&self.prev_hash);
        b[field::PREV_TIME_NS].copy_from_slice(&self.prev_time_ns.to_le_bytes());
        b
    }

    /// Parse a header; `None` when `b` is short or the magic is wrong.
    pub fn parse(b: &[u8]) -> Option<SegmentHeader> {
        let b = b.get(..HEADER_LEN)?;
        if &b[field::MAGIC] != MAGIC {
            return None;
        }
        // The ranges lie inside the HEADER_LEN bytes checked above.
        let u64_at = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().unwrap_or([0; 8]));
        let mut prev_hash = [0u8; 32];
        prev_hash.copy_from_slice(&b[field::PREV_HASH]);
        Some(SegmentHeader {
            first_seq: u64_at(field::FIRST_SEQ),
            prev_hash,
            prev_time_ns: u64_at(field::PREV_TIME_NS),
        })
    }
}

/// The chain hash of the record `seq` with `payload` after `prev`.
pub fn chain_hash(prev: &Hash, seq: u64, payload: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(prev);
    h.update(&seq.to_le_bytes());
    h.update(payload);
    *h.finalize().as_bytes()
}

/// The file name of the segment whose first record is `first_seq`.
pub fn segment_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.log")
}

/// The first sequence number named by a segment file name.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A sidecar of segment `seg` with extension `ext` (`ckpt`, `idx`, `torn`).
pub fn sidecar(seg: &Path, ext: &str) -> PathBuf {
    seg.with_extension(ext)
}

/// The segments of `dir`, ordered by first sequence number.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, AuditError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        if let Some(first) = entry.file_name().to_str().and_then(parse_segment_name) {
            out.push((first, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// What the scanner found next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// A whole frame at `offset`; its payload and hash are in the scanner.
    Frame {
        /// Byte offset of the frame in the segment.
        offset: u64,
    },
    /// The file ends inside a frame starting at `offset`.
    Torn {
        /// Where the incomplete frame starts.
        offset: u64,
        /// How many bytes of it there are.
        bytes: u64,
    },
    /// A frame at `offset` has an impossible length: the framing is lost.
    BadLength {
        /// Where the frame starts.
        offset: u64,
        /// The length it claims.
        len: u32,
    },
    /// The file ends after a whole frame.
    End,
}

/// A whole frame read into buffers of its own (reused between reads).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frame {
    /// Byte offset of the frame in the segment.
    pub offset: u64,
    /// The payload.
    pub payload: Vec<u8>,
    /// The stored hash.
    pub hash: Hash,
}

impl Frame {
    /// Whether the stored hash is the chain hash of the payload at `seq` after `prev`.
    pub fn chains(&self, prev: &Hash, seq: u64) -> bool {
        chain_hash(prev, seq, &self.payload) == self.hash
    }

    /// The frame's length in the segment.
    pub fn len(&self) -> u64 {
        (FRAME_OVERHEAD + self.payload.len()) as u64
    }

    /// Whether the payload is empty (never for a frame read from a segment).
    pub fn is_empty(&self) -> bool {
        self.payload.is_empty()
    }
}

/// Size of the read buffer of [`FrameScanner::open`]: what streaming a
/// segment holds besides the frame being looked at, whatever the segment's size.
pub const READ_BUFFER: usize = 1 << 20;

/// Reads the frames of a segment in order, reusing one buffer.
pub struct FrameScanner<R: Read> {
    r: BufReader<R>,
    pos: u64,
    /// The file's length when known: a frame that would run past it is
    /// reported as incomplete without reading (or allocating) its payload.
    limit: Option<u64>,
    /// Payload of the last frame returned.
    pub payload: Vec<u8>,
    /// Stored hash of the last frame returned.
    pub hash: Hash,
}

impl FrameScanner<File> {
    /// Open a segment and read its header.
    pub fn open(path: &Path) -> Result<(SegmentHeader, FrameScanner<File>), AuditError> {
        let f = File::open(path).at(path)?;
        let limit = f.metadata().at(path)?.len();
        let mut r = BufReader::with_capacity(READ_BUFFER, f);
        let mut hb = [0u8; HEADER_LEN];
        let n = read_full(&mut r, &mut hb).at(path)?;
        let header = SegmentHeader::parse(&hb[..n])
            .ok_or_else(|| AuditError::format(path, "not a segment: bad or short header"))?;
        Ok((
            header,
            FrameScanner {
                r,
                pos: HEADER_LEN as u64,
                limit: Some(limit),
                payload: Vec::new(),
                hash: GENESIS,
            },
        ))
    }

    /// The segment file, for positioned reads beside the stream.
    pub fn file(&self) -> &File {
        self.r.get_ref()
    }

    /// Continue reading at `offset` (after damage, where the chain resumes).
    pub fn seek(&mut self, offset: u64) -> io::Result<()> {
        self.r.seek(SeekFrom::Start(offset))?;
        self.pos = offset;
        Ok(())
    }

    /// Bytes of buffer the scanner holds: its read buffer and the payload buffer.
    pub fn buffer_bytes(&self) -> usize {
        self.r.capacity() + self.payload.capacity()
    }
}

impl<R: Read> FrameScanner<R> {
    /// The next frame.
    pub fn next_frame(&mut self) -> io::Result<Scan> {
        let offset = self.pos;
        let mut lb = [0u8; LEN_LEN];
        let n = read_full(&mut self.r, &mut lb)?;
        if n == 0 {
            return Ok(Scan::End);
        }
        if n < LEN_LEN {
            self.pos += n as u64;
            return Ok(Scan::Torn {
                offset,
                bytes: n as u64,
            });
        }
        let len = u32::from_le_bytes(lb);
        if len == 0 || len > MAX_PAYLOAD {
            return Ok(Scan::BadLength { offset, len });
        }
        if let Some(limit) = self.limit
            && offset + (FRAME_OVERHEAD as u64) + u64::from(len) > limit
        {
            self.pos = limit;
            return Ok(Scan::Torn {
                offset,
                bytes: limit.saturating_sub(offset),
            });
        }
        self.payload.resize(len as usize, 0);
        let got = read_full(&mut self.r, &mut self.payload)?;
        let mut got_hash = 0;
        if got == self.payload.len() {
            got_hash = read_full(&mut self.r, &mut self.hash)?;
        }
        let total = (LEN_LEN + got + got_hash) as u64;
        self.pos += total;
        if got < self.payload.len() || got_hash < HASH_LEN {
            return Ok(Scan::Torn { offset, bytes: total });
        }
        Ok(Scan::Frame { offset })
    }

    /// The next frame, read into `frame` (whose buffers the scanner takes
    /// in exchange for its own, so neither allocates once warm).
    pub fn next_into(&mut self, frame: &mut Frame) -> io::Result<Scan> {
        std::mem::swap(&mut self.payload, &mut frame.payload);
        let r = self.next_frame();
        std::mem::swap(&mut self.payload, &mut frame.payload);
        if let Ok(Scan::Frame { offset }) = r {
            frame.offset = offset;
            frame.hash = self.hash;
        }
        r
    }

    /// The offset just past what has been read.
    pub fn position(&self) -> u64 {
        self.pos
    }
}

/// Where the chain picks up again after damage (see [`resync`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resync {
    /// The offset of the first frame that chains again.
    pub offset: u64,
    /// Its sequence number.
    pub seq: u64,
    /// The 32 bytes before it: the stored hash of the record it follows.
    pub prev: Hash,
}

/// How far [`resync`] looks ahead in sequence numbers: records lost in a
/// damaged stretch, at most.
pub const MAX_RESYNC_SKIP: u64 = 4096;

/// The first offset at or after `from` where a whole frame's stored hash is
/// the chain hash of its payload after the 32 bytes that precede it (the
/// stored hash of the frame before it) at one of the sequence numbers
/// `first_seq..=first_seq + MAX_RESYNC_SKIP`: where reading picks up after a
/// damaged stretch. Records are JSON objects, so a candidate must also start
/// with `{` and end with `}` before any hashing. `budget` bounds the bytes
/// hashed (a hostile file full of candidates cannot make this slow); when
/// it runs out the search stops and answers `None` with `budget` at 0.
pub fn resync(file: &File, file_len: u64, from: u64, first_seq: u64, budget: &mut u64) -> io::Result<Option<Resync>> {
    use std::os::unix::fs::FileExt;
    const WINDOW: usize = 64 << 10;
    // The frame before a candidate is whole: at least a header and a 1-byte frame precede it.
    let min_start = (HEADER_LEN + FRAME_OVERHEAD + 1) as u64;
    let mut window = vec![0u8; WINDOW + LEN_LEN + 1];
    let mut payload = Vec::new();
    let mut base = from.max(min_start);
    while base + (FRAME_OVERHEAD + 1) as u64 <= file_len {
        let want = (file_len - base).min(window.len() as u64) as usize;
        file.read_exact_at(&mut window[..want], base)?;
        // Candidates in this window: positions with a length and one payload byte readable.
        let last = want.saturating_sub(LEN_LEN + 1).min(WINDOW - 1);
        for i in 0..=last {
            let p = base + i as u64;
            let len = u32::from_le_bytes([window[i], window[i + 1], window[i + 2], window[i + 3]]);
            if len == 0 || len > MAX_PAYLOAD || window[i + LEN_LEN] != b'{' {
                continue;
            }
            let end = p + (FRAME_OVERHEAD as u64) + u64::from(len);
            if end > file_len {
                continue;
            }
            payload.resize(len as usize, 0);
            file.read_exact_at(&mut payload, p + LEN_LEN as u64)?;
            if payload.last() != Some(&b'}') {
                continue;
            }
            let mut hash = [0u8; HASH_LEN];
            file.read_exact_at(&mut hash, end - HASH_LEN as u64)?;
            let mut prev = [0u8; HASH_LEN];
            file.read_exact_at(&mut prev, p - HASH_LEN as u64)?;
            for seq in first_seq..=first_seq.saturating_add(MAX_RESYNC_SKIP) {
                let cost = payload.len() as u64 + 40;
                if *budget < cost {
                    *budget = 0;
                    return Ok(None);
                }
                *budget -= cost;
                if chain_hash(&prev, seq, &payload) == hash {
                    return Ok(Some(Resync { offset: p, seq, prev }));
                }
            }
        }
        base += last as u64 + 1;
    }
    Ok(None)
}

/// The frame `[start, end)` would be if its length field were wrong: the
/// payload between the length field and the last 32 bytes, and those bytes
/// as its hash; `None` when that cannot be a frame.
pub fn implied_frame(file: &File, start: u64, end: u64) -> io::Result<Option<Frame>> {
    use std::os::unix::fs::FileExt;
    let Some(len) = end.checked_sub(start + FRAME_OVERHEAD as u64) else {
        return Ok(None);
    };
    if len == 0 || len > u64::from(MAX_PAYLOAD) {
        return Ok(None);
    }
    let mut payload = vec![0u8; len as usize];
    file.read_exact_at(&mut payload, start + LEN_LEN as u64)?;
    let mut hash = [0u8; HASH_LEN];
    file.read_exact_at(&mut hash, end - HASH_LEN as u64)?;
    Ok(Some(Frame {
        offset: start,
        payload,
        hash,
    }))
}

/// Read until `buf` is full or the reader ends; the number of bytes read.
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The offsets and payload lengths of a segment's whole frames, in order
/// (stops at the first torn or malformed frame); for tools and tests that
/// need to point at a record.
pub fn frame_offsets(path: &Path) -> Result<Vec<(u64, u32)>, AuditError> {
    let (_, mut s) = FrameScanner::open(path)?;
    let mut out = Vec::new();
    while let Scan::Frame { offset } = s.next_frame().at(path)? {
        // Payloads are at most MAX_PAYLOAD (checked by the scanner), so they fit a u32.
        out.push((offset, s.payload.len() as u32));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_rejects_bad_magic() {
        let h = SegmentHeader {
            first_seq: 42,
            prev_hash: [7; 32],
            prev_time_ns: 99,
        };
        let b = h.emit();
        assert_eq!(SegmentHeader::parse(&b), Some(h));
        assert_eq!(SegmentHeader::parse(&b[..HEADER_LEN - 1]), None);
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(SegmentHeader::parse(&bad), None);
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_segment_name(&segment_name(17)), Some(17));
        assert_eq!(parse_segment_name("seg-17.log"), None);
        assert_eq!(parse_segment_name("seg-0000000000000000001x.log"), None);
    }

    #[test]
    fn scanner_reports_torn_and_bad_lengths() {
        let mut data = Vec::new();
        data.extend_from_slice(&3u32.to_le_bytes());
        data.extend_from_slice(b"abc");
        data.extend_from_slice(&[1; 32]);
        data.extend_from_slice(&5u32.to_le_bytes());
        data.extend_from_slice(b"ab");
        let mut s = FrameScanner {
            r: BufReader::new(&data[..]),
            pos: 0,
            limit: None,
            payload: Vec::new(),
            hash: GENESIS,
        };
        assert_eq!(s.next_frame().unwrap(), Scan::Frame { offset: 0 });
        assert_eq!(s.payload, b"abc");
        assert_eq!(s.next_frame().unwrap(), Scan::Torn { offset: 39, bytes: 6 });
        let huge = (MAX_PAYLOAD + 1).to_le_bytes();
        let mut s = FrameScanner {
            r: BufReader::new(&huge[..]),
            pos: 0,
            limit: None,
            payload: Vec::new(),
            hash: GENESIS,
        };
        assert_eq!(
            s.next_frame().unwrap(),
            Scan::BadLength {
                offset: 0,
                len: MAX_PAYLOAD + 1
            }
        );
    }
}

//! Query indexes: per segment, where each record is, when it was made, and
//! which records name a VM, zone, rule, verdict or kind; per log, each
//! segment's time range.
//!
//! Indexes are derived data. A segment's `.idx` is written when the segment
//! is sealed and rebuilt from the segment whenever it is missing or fails its
//! checksum; the active segment's index lives in memory. Queries re-check
//! every filter on the record itself, so a stale index can only make a query
//! slower, never wrong about what matches.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use crate::error::{AuditError, IoContext};
use crate::record::{Record, Verdict};
use crate::segment::{FrameScanner, Scan};

/// Magic of a segment index file.
const IDX_MAGIC: &[u8; 8] = b"PALAUDI1";

/// The index of one segment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SegmentIndex {
    /// Sequence number of the segment's first record.
    pub first_seq: u64,
    /// Byte offset of each record's frame (position `i` is seq `first_seq + i`).
    pub offsets: Vec<u64>,
    /// Each record's time.
    pub times: Vec<u64>,
    /// Posting lists: key → positions, ascending.
    pub postings: BTreeMap<String, Vec<u32>>,
}

/// The index keys of a record: `v:` VM name, `z:` zone, `r:` rule id,
/// `d:` verdict, `k:` kind.
pub fn record_keys(r: &Record, mut f: impl FnMut(String)) {
    match r {
        Record::Flow(fl) => {
            f("k:flow".into());
            f(format!("d:{}", verdict_name(fl.verdict)));
            for vm in [&fl.src.vm, &fl.dst.vm].into_iter().flatten() {
                f(format!("v:{}", vm.name));
                f(format!("z:{}", vm.zone));
            }
            for d in &fl.decided_by {
                f(format!("r:{}", d.rule));
            }
        }
        Record::Change(c) => {
            f("k:change".into());
            if let Some(vm) = c.resource.strip_prefix("vm/") {
                f(format!("v:{vm}"));
            }
        }
    }
}

/// The lowercase name of a verdict.
pub fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
        Verdict::Reject => "reject",
    }
}

impl SegmentIndex {
    /// An empty index for a segment starting at `first_seq`.
    pub fn new(first_seq: u64) -> SegmentIndex {
        SegmentIndex {
            first_seq,
            ..SegmentIndex::default()
        }
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// Earliest and latest record time, if any record.
    pub fn time_range(&self) -> Option<(u64, u64)> {
        let min = self.times.iter().min()?;
        let max = self.times.iter().max()?;
        Some((*min, *max))
    }

    /// Add the next record, whose frame is at `offset`.
    pub fn push(&mut self, offset: u64, r: &Record) {
        // Segments hold far fewer than 2^32 records (frames are at least 37 bytes
        // and segment sizes are configured in megabytes), so positions fit a u32.
        let pos = self.offsets.len() as u32;
        self.offsets.push(offset);
        self.times.push(r.time_ns());
        let mut last: Option<String> = None;
        record_keys(r, |k| {
            // Both ends in one VM or zone would otherwise list the record twice.
            if last.as_deref() == Some(&k) {
                return;
            }
            match self.postings.get_mut(&k) {
                Some(list) if list.last() == Some(&pos) => {}
                Some(list) => list.push(pos),
                None => {
                    self.postings.insert(k.clone(), vec![pos]);
                }
            }
            last = Some(k);
        });
    }

    /// Build the index of a segment by reading it (whole frames only; what
    /// follows the first torn or malformed frame is not indexed).
    pub fn build(path: &Path) -> Result<SegmentIndex, AuditError> {
        let (header, mut scan) = FrameScanner::open(path)?;
        let mut idx = SegmentIndex::new(header.first_seq);
        while let Scan::Frame { offset } = scan.next_frame().at(path)? {
            let seq = header.first_seq + idx.len() as u64;
            let rec: Record =
                serde_json::from_slice(&scan.payload).map_err(|source| AuditError::Json { seq, source })?;
            idx.push(offset, &rec);
        }
        Ok(idx)
    }

    /// Encode: magic, then the body, then the BLAKE3 of the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32 + self.len() * 24);
        b.extend_from_slice(IDX_MAGIC);
        b.extend_from_slice(&self.first_seq.to_le_bytes());
        b.extend_from_slice(&(self.offsets.len() as u64).to_le_bytes());
        for (o, t) in self.offsets.iter().zip(&self.times) {
            b.extend_from_slice(&o.to_le_bytes());
            b.extend_from_slice(&t.to_le_bytes());
        }
        b.extend_from_slice(&(self.postings.len() as u64).to_le_bytes());
        for (k, list) in &self.postings {
            b.extend_from_slice(&(k.len() as u64).to_le_bytes());
            b.extend_from_slice(k.as_bytes());
            b.extend_from_slice(&(list.len() as u64).to_le_bytes());
            for p in list {
                b.extend_from_slice(&p.to_le_bytes());
            }
        }
        let sum = blake3::hash(&b[IDX_MAGIC.len()..]);
        b.extend_from_slice(sum.as_bytes());
        b
    }

    /// Decode; `None` on any damage (bad magic, checksum, lengths, positions).
    pub fn decode(b: &[u8]) -> Option<SegmentIndex> {
        let body = b.strip_prefix(IDX_MAGIC)?;
        let (body, sum) = body.split_at_checked(body.len().checked_sub(32)?)?;
        if blake3::hash(body).as_bytes() != sum {
            return None;
        }
        let mut r = Reader(body);
        let first_seq = r.u64()?;
        let n = usize::try_from(r.u64()?).ok()?;
        // Each entry takes 16 bytes: refuse counts the body cannot hold before allocating.
        if n > r.0.len() / 16 {
            return None;
        }
        let mut offsets = Vec::with_capacity(n);
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            offsets.push(r.u64()?);
            times.push(r.u64()?);
        }
        let keys = r.u64()?;
        let mut postings = BTreeMap::new();
        for _ in 0..keys {
            let kl = usize::try_from(r.u64()?).ok()?;
            let k = String::from_utf8(r.take(kl)?.to_vec()).ok()?;
            let pl = usize::try_from(r.u64()?).ok()?;
            let raw = r.take(pl.checked_mul(4)?)?;
            let list: Vec<u32> = raw
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if list.iter().any(|&p| p as usize >= n) || list.windows(2).any(|w| w[0] >= w[1]) {
                return None;
            }
            postings.insert(k, list);
        }
        if !r.0.is_empty() {
            return None;
        }
        Some(SegmentIndex {
            first_seq,
            offsets,
            times,
            postings,
        })
    }

    /// Write the index next to its segment, atomically (temp file + rename).
    pub fn store(&self, path: &Path) -> Result<(), AuditError> {
        let tmp = path.with_extension("idx.tmp");
        let mut f = std::fs::File::create(&tmp).at(&tmp)?;
        f.write_all(&self.encode()).at(&tmp)?;
        f.sync_data().at(&tmp)?;
        std::fs::rename(&tmp, path).at(path)
    }

    /// Read an index file; `Ok(None)` when it is missing or damaged.
    pub fn load(path: &Path, first_seq: u64) -> Result<Option<SegmentIndex>, AuditError> {
        match std::fs::read(path) {
            Ok(b) => Ok(SegmentIndex::decode(&b).filter(|i| i.first_seq == first_seq)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AuditError::io(path, e)),
        }
    }
}

/// A little-endian cursor.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (a, b) = self.0.split_at_checked(n)?;
        self.0 = b;
        Some(a)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// What the log index keeps about a sealed segment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SegmentSummary {
    /// Its file name.
    pub name: String,
    /// First sequence number.
    pub first_seq: u64,
    /// Number of records.
    pub records: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// Earliest record time (0 when empty).
    pub min_time_ns: u64,
    /// Latest record time (0 when empty).
    pub max_time_ns: u64,
}

impl SegmentSummary {
    /// The summary of a segment with index `idx`.
    pub fn of(name: String, bytes: u64, idx: &SegmentIndex) -> SegmentSummary {
        let (min_time_ns, max_time_ns) = idx.time_range().unwrap_or((0, 0));
        SegmentSummary {
            name,
            first_seq: idx.first_seq,
            records: idx.len() as u64,
            bytes,
            min_time_ns,
            max_time_ns,
        }
    }

    /// Whether the segment may hold records in `[since, until)`.
    pub fn overlaps(&self, since: Option<u64>, until: Option<u64>) -> bool {
        self.records > 0 && since.is_none_or(|s| self.max_time_ns >= s) && until.is_none_or(|u| self.min_time_ns < u)
    }
}

/// The log index file `<dir>/index.json`: summaries of sealed segments and a
/// checksum over them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct IndexFile {
    segments: Vec<SegmentSummary>,
    check: String,
}

fn summaries_check(s: &[SegmentSummary]) -> String {
    // Serializing plain structs of strings and integers cannot fail.
    let text = serde_json::to_vec(s).unwrap_or_default();
    crate::checkpoint::to_hex(blake3::hash(&text).as_bytes())
}

/// Read `<dir>/index.json`; `Ok(None)` when missing or damaged.
pub fn load_summaries(dir: &Path) -> Result<Option<Vec<SegmentSummary>>, AuditError> {
    let path = dir.join("index.json");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AuditError::io(path, e)),
    };
    let Ok(file) = serde_json::from_slice::<IndexFile>(&bytes) else {
        return Ok(None);
    };
    Ok((summaries_check(&file.segments) == file.check).then_some(file.segments))
}

/// Write `<dir>/index.json` atomically.
pub fn store_summaries(dir: &Path, segments: &[SegmentSummary]) -> Result<(), AuditError> {
    let path = dir.join("index.json");
    let tmp = dir.join("index.json.tmp");
    let file = IndexFile {
        segments: segments.to_vec(),
        check: summaries_check(segments),
    };
    let text = serde_json::to_vec_pretty(&file).map_err(|source| AuditError::Json { seq: 0, source })?;
    let mut f = std::fs::File::create(&tmp).at(&tmp)?;
    f.write_all(&text).at(&tmp)?;
    f.sync_data().at(&tmp)?;
    std::fs::rename(&tmp, &path).at(&path)
}

/// Intersect ascending lists.
pub fn intersect(mut lists: Vec<&[u32]>) -> Vec<u32> {
    lists.sort_by_key(|l| l.len());
    let Some((first, rest)) = lists.split_first() else {
        return Vec::new();
    };
    first
        .iter()
        .copied()
        .filter(|p| rest.iter().all(|l| l.binary_search(p).is_ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::ChangeRecord;

    #[test]
    fn encode_decode_and_damage() {
        let mut idx = SegmentIndex::new(5);
        let rec = Record::Change(ChangeRecord {
            time_ns: 10,
            actor: "a".into(),
            action: "vm.tag".into(),
            resource: "vm/web-1".into(),
            diff: String::new(),
            policy_version: None,
        });
        idx.push(56, &rec);
        idx.push(200, &rec);
        let b = idx.encode();
        assert_eq!(SegmentIndex::decode(&b), Some(idx.clone()));
        assert_eq!(idx.postings["v:web-1"], vec![0, 1]);
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x40;
            assert_eq!(SegmentIndex::decode(&bad), None, "flip at {i}");
        }
        assert_eq!(SegmentIndex::decode(&b[..b.len() - 1]), None);
        assert_eq!(SegmentIndex::decode(b"garbage"), None);
    }

    #[test]
    fn intersection() {
        assert_eq!(intersect(vec![&[1, 3, 5, 7], &[3, 7, 9]]), vec![3, 7]);
        assert!(intersect(vec![]).is_empty());
    }
}

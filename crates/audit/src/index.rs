//! Query indexes: per segment, where each record is, when it was made, and
//! which records name a VM, zone, rule, verdict or kind; per log, each
//! segment's time range.
//!
//! Indexes are derived data, but a query trusts them to say which records
//! can match, so a stale or forged index could hide a record. A sealed
//! segment's `.idx` therefore records the segment's length and the BLAKE3
//! digest of its bytes and is signed by the writer (with the trail's key,
//! purpose [`Purpose::Index`]); the log index `index.json` is signed the
//! same way. A reader trusts an index only when its signature verifies and
//! the segment still has exactly the bytes it covers; otherwise it rebuilds
//! the index from the segment while verifying the segment's chain against
//! its signed checkpoints, and reports what it found (see [`crate::query`]).
//! The active segment's index lives in memory. Queries re-check every
//! filter on the record itself.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::checkpoint::{Checkpoint, Purpose};
use crate::error::{AuditError, IoContext};
use crate::record::{Record, Verdict};
use crate::segment::{FrameScanner, Hash, Scan};

/// Magic of a segment index file (version 2: sealed and signed).
const IDX_MAGIC: &[u8; 8] = b"PALAUDI2";

/// Length of the signature after an index body.
const SIG_LEN: usize = 64;

/// What a sealed index says about its segment, and the writer's signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seal {
    /// The segment's length when it was sealed.
    pub segment_bytes: u64,
    /// BLAKE3 of the segment's bytes.
    pub digest: Hash,
    /// The writer's signature over the index body (zero when unsigned).
    pub signature: [u8; 64],
}

impl Seal {
    /// Whether `vk` signed the index whose body hashes to `body_hash`.
    fn verify(&self, vk: &VerifyingKey, first_seq: u64, body_hash: &Hash) -> bool {
        Checkpoint {
            seq: first_seq,
            hash: *body_hash,
            time_ns: self.segment_bytes,
            signature: self.signature,
        }
        .verify(vk, Purpose::Index)
    }
}

/// The BLAKE3 digest of the first `len` bytes of the file at `path`,
/// streamed; `None` when the file is shorter.
pub fn digest_file(path: &Path, len: u64) -> Result<Option<Hash>, AuditError> {
    use std::io::Read;
    let f = std::fs::File::open(path).at(path)?;
    let mut r = f.take(len);
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = crate::segment::read_full(&mut r, &mut buf).at(path)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n == len).then(|| *h.finalize().as_bytes()))
}

/// The offset of a position whose record could not be read (an index
/// rebuilt from a damaged segment): no posting list names it.
pub const HOLE: u64 = u64::MAX;

/// The index of one segment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SegmentIndex {
    /// Sequence number of the segment's first record.
    pub first_seq: u64,
    /// Byte offset of each record's frame (position `i` is seq `first_seq + i`;
    /// [`HOLE`] where the record could not be read).
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
        Record::Alert(a) => {
            f("k:alert".into());
            for vm in [&a.src, &a.dest].into_iter().flatten() {
                f(format!("v:{}", vm.name));
                f(format!("z:{}", vm.zone));
            }
            for d in &a.decided_by {
                f(format!("r:{}", d.rule));
            }
        }
        Record::AlertsNotRecorded(_) => f("k:alert".into()),
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
        let times = || {
            self.offsets
                .iter()
                .zip(&self.times)
                .filter(|(o, _)| **o != HOLE)
                .map(|(_, t)| *t)
        };
        Some((times().min()?, times().max()?))
    }

    /// Add record `seq`, whose frame is at `offset`, after the records so
    /// far; positions skipped (records that could not be read) become holes.
    pub fn push_at(&mut self, seq: u64, offset: u64, r: &Record) {
        if self.is_empty() && self.first_seq > seq {
            return;
        }
        let pos = seq.saturating_sub(self.first_seq);
        while (self.offsets.len() as u64) < pos {
            self.offsets.push(HOLE);
            self.times.push(0);
        }
        if self.offsets.len() as u64 == pos {
            self.push(offset, r);
        }
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

    /// The body: first seq, positions (offset and time), postings, then
    /// the seal's segment length and digest.
    fn body(&self, segment_bytes: u64, digest: &Hash) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.len() * 24);
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
        b.extend_from_slice(&segment_bytes.to_le_bytes());
        b.extend_from_slice(digest);
        b
    }

    /// Encode: magic, the body, the signature, then the BLAKE3 of body and
    /// signature (the checksum catches damage; the signature, forgery).
    fn encode_with(&self, segment_bytes: u64, digest: &Hash, key: Option<&SigningKey>) -> Vec<u8> {
        let body = self.body(segment_bytes, digest);
        let signature = key.map_or([0; SIG_LEN], |k| {
            let h = *blake3::hash(&body).as_bytes();
            Checkpoint::sign(k, Purpose::Index, self.first_seq, h, segment_bytes).signature
        });
        let mut b = Vec::with_capacity(IDX_MAGIC.len() + body.len() + SIG_LEN + 32);
        b.extend_from_slice(IDX_MAGIC);
        b.extend_from_slice(&body);
        b.extend_from_slice(&signature);
        let sum = blake3::hash(&b[IDX_MAGIC.len()..]);
        b.extend_from_slice(sum.as_bytes());
        b
    }

    /// Encode without a seal or signature (a reader trusts it no more than no index).
    pub fn encode(&self) -> Vec<u8> {
        self.encode_with(0, &[0; 32], None)
    }

    /// Encode sealed to a segment of `segment_bytes` bytes with `digest`, signed by `key`.
    pub fn encode_sealed(&self, segment_bytes: u64, digest: &Hash, key: &SigningKey) -> Vec<u8> {
        self.encode_with(segment_bytes, digest, Some(key))
    }

    /// Decode; `None` on any damage (bad magic, checksum, lengths, positions).
    pub fn decode(b: &[u8]) -> Option<SegmentIndex> {
        SegmentIndex::decode_sealed(b).map(|(i, _, _)| i)
    }

    /// Decode with the seal and the BLAKE3 of the body (what the signature covers).
    pub fn decode_sealed(b: &[u8]) -> Option<(SegmentIndex, Seal, Hash)> {
        let rest = b.strip_prefix(IDX_MAGIC)?;
        let (signed, sum) = rest.split_at_checked(rest.len().checked_sub(32)?)?;
        if blake3::hash(signed).as_bytes() != sum {
            return None;
        }
        let (body, sig) = signed.split_at_checked(signed.len().checked_sub(SIG_LEN)?)?;
        let body_hash = *blake3::hash(body).as_bytes();
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
        let segment_bytes = r.u64()?;
        let digest: Hash = r.take(32)?.try_into().ok()?;
        if !r.0.is_empty() {
            return None;
        }
        let signature: [u8; SIG_LEN] = sig.try_into().ok()?;
        Some((
            SegmentIndex {
                first_seq,
                offsets,
                times,
                postings,
            },
            Seal {
                segment_bytes,
                digest,
                signature,
            },
            body_hash,
        ))
    }

    /// Write the index next to its segment, atomically (temp file + rename), unsealed.
    pub fn store(&self, path: &Path) -> Result<(), AuditError> {
        write_atomic(path, &self.encode())
    }

    /// Write the index sealed to its segment and signed, atomically.
    pub fn store_sealed(
        &self,
        path: &Path,
        segment_bytes: u64,
        digest: &Hash,
        key: &SigningKey,
    ) -> Result<(), AuditError> {
        write_atomic(path, &self.encode_sealed(segment_bytes, digest, key))
    }

    /// Read an index file; `Ok(None)` when it is missing or damaged.
    pub fn load(path: &Path, first_seq: u64) -> Result<Option<SegmentIndex>, AuditError> {
        Ok(SegmentIndex::load_sealed(path, first_seq, None)?.map(|(i, _)| i))
    }

    /// Read an index file and its seal when `vk` signed it (`None` for the
    /// seal when unsigned or signed by another key, or `vk` is `None`);
    /// `Ok(None)` when it is missing or damaged.
    pub fn load_sealed(
        path: &Path,
        first_seq: u64,
        vk: Option<&VerifyingKey>,
    ) -> Result<Option<(SegmentIndex, Option<Seal>)>, AuditError> {
        match std::fs::read(path) {
            Ok(b) => Ok(SegmentIndex::decode_sealed(&b)
                .filter(|(i, _, _)| i.first_seq == first_seq)
                .map(|(i, seal, body_hash)| {
                    let signed = vk.is_some_and(|k| seal.verify(k, first_seq, &body_hash));
                    (i, signed.then_some(seal))
                })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AuditError::io(path, e)),
        }
    }
}

/// Write `bytes` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AuditError> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let mut f = std::fs::File::create(&tmp).at(&tmp)?;
    f.write_all(bytes).at(&tmp)?;
    f.sync_data().at(&tmp)?;
    std::fs::rename(&tmp, path).at(path)
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

/// The log index file `<dir>/index.json`: summaries of sealed segments, a
/// checksum over them, and the writer's signature over that checksum.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct IndexFile {
    segments: Vec<SegmentSummary>,
    check: String,
    #[serde(default)]
    signature: Option<String>,
}

fn summaries_hash(s: &[SegmentSummary]) -> Hash {
    // Serializing plain structs of strings and integers cannot fail.
    let text = serde_json::to_vec(s).unwrap_or_default();
    *blake3::hash(&text).as_bytes()
}

/// Read `<dir>/index.json`; `Ok(None)` when missing or damaged. With `vk`,
/// also `None` unless `vk` signed it.
pub fn load_summaries(dir: &Path, vk: Option<&VerifyingKey>) -> Result<Option<Vec<SegmentSummary>>, AuditError> {
    let path = dir.join("index.json");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AuditError::io(path, e)),
    };
    let Ok(file) = serde_json::from_slice::<IndexFile>(&bytes) else {
        return Ok(None);
    };
    let hash = summaries_hash(&file.segments);
    if crate::checkpoint::to_hex(&hash) != file.check {
        return Ok(None);
    }
    if let Some(vk) = vk {
        let signature = file.signature.as_deref().and_then(crate::checkpoint::from_hex::<64>);
        let signed = signature.is_some_and(|signature| {
            Checkpoint {
                seq: file.segments.len() as u64,
                hash,
                time_ns: 0,
                signature,
            }
            .verify(vk, Purpose::Index)
        });
        if !signed {
            return Ok(None);
        }
    }
    Ok(Some(file.segments))
}

/// Write `<dir>/index.json` atomically, signed by `key` if given.
pub fn store_summaries(dir: &Path, segments: &[SegmentSummary], key: Option<&SigningKey>) -> Result<(), AuditError> {
    let path = dir.join("index.json");
    let hash = summaries_hash(segments);
    let file = IndexFile {
        segments: segments.to_vec(),
        check: crate::checkpoint::to_hex(&hash),
        signature: key.map(|k| {
            crate::checkpoint::to_hex(&Checkpoint::sign(k, Purpose::Index, segments.len() as u64, hash, 0).signature)
        }),
    };
    let text = serde_json::to_vec_pretty(&file).map_err(|source| AuditError::Json { seq: 0, source })?;
    write_atomic(&path, &text)
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

//! Queries over the log: filters by VM, zone, verdict, rule, kind and time.
//!
//! A query skips segments whose time range (from the log index) misses the
//! window, then, within a segment, intersects the posting lists of its keyed
//! filters and drops candidates by their indexed time before reading a single
//! record; only the candidates are read (by offset) and decoded. Memory is one
//! segment index at a time plus the results the caller keeps: results stream
//! through [`LogReader::query_each`].
//!
//! A query trusts nothing it has not checked. Every query checks the trail's
//! structure: each segment continues the one before it under a signed
//! checkpoint, and the first starts at seq 1 or after a signed retention
//! entry (a deleted segment cannot hide). The log index is used only when
//! the writer signed it. Each sealed segment a query reads is used through
//! its signed index only when the segment still has exactly the bytes the
//! index covers (its BLAKE3 digest, recomputed); otherwise its index is
//! rebuilt from the segment while its chain is verified against its signed
//! checkpoints, and whatever is wrong is reported. The active segment's
//! chain is verified too. A process remembers the digest each segment file
//! was verified to have until the file changes (size, times or inode), so
//! repeated queries do not re-read unchanged segments; indexes themselves
//! are loaded per query (only the last few rebuilt ones are kept). [`LogReader::query_report`] answers with the
//! problems found ([`QueryReport`]); [`LogReader::query_each`] and
//! [`LogReader::query`] refuse ([`AuditError::Integrity`]) once one is found,
//! before reading a damaged segment's records. `palisade audit verify` is
//! still the full check: queries look only at the segments they read.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::checkpoint::{self, CHECKPOINT_LEN, Checkpoint, Purpose, for_each_checkpoint, read_verifying_key};
use crate::error::{AuditError, IoContext};
use crate::index::{self, SegmentIndex, SegmentSummary, digest_file, intersect, verdict_name};
use crate::record::{Record, Verdict};
use crate::segment::{self, GENESIS, HEADER_LEN, LEN_LEN, MAX_PAYLOAD, SegmentHeader};
use crate::verify::{Problem, ProblemKind, SegmentInput, check_segment};

/// Which kind of record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordKind {
    /// Flow records.
    Flow,
    /// Change records.
    Change,
    /// Inline inspection's alerts, and the records of alerts shed.
    Alert,
}

/// A query; every filter given must hold (`None` = any).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// A VM at either end of a flow, or the VM a change was made to (`vm/NAME`).
    pub vm: Option<String>,
    /// The zone of either end of a flow.
    pub zone: Option<String>,
    /// A flow's verdict.
    pub verdict: Option<Verdict>,
    /// A rule among a flow's deciding rules.
    pub rule: Option<String>,
    /// Records at or after this time (Unix ns).
    pub since_ns: Option<u64>,
    /// Records before this time (Unix ns).
    pub until_ns: Option<u64>,
    /// At most this many results (the first, in sequence order).
    pub limit: Option<usize>,
    /// Flow, change or alert records only.
    pub kind: Option<RecordKind>,
}

impl Query {
    /// Whether `r` satisfies every filter.
    pub fn matches(&self, r: &Record) -> bool {
        let t = r.time_ns();
        if self.since_ns.is_some_and(|s| t < s) || self.until_ns.is_some_and(|u| t >= u) {
            return false;
        }
        match r {
            Record::Flow(f) => {
                let vms = || [&f.src.vm, &f.dst.vm].into_iter().flatten();
                self.kind.is_none_or(|k| k == RecordKind::Flow)
                    && self.vm.as_ref().is_none_or(|v| vms().any(|m| &m.name == v))
                    && self.zone.as_ref().is_none_or(|z| vms().any(|m| &m.zone == z))
                    && self.verdict.is_none_or(|v| f.verdict == v)
                    && self
                        .rule
                        .as_ref()
                        .is_none_or(|id| f.decided_by.iter().any(|d| &d.rule == id))
            }
            Record::Change(c) => {
                self.kind.is_none_or(|k| k == RecordKind::Change)
                    && self
                        .vm
                        .as_ref()
                        .is_none_or(|v| c.resource.strip_prefix("vm/") == Some(v.as_str()))
                    && self.zone.is_none()
                    && self.verdict.is_none()
                    && self.rule.is_none()
            }
            Record::Alert(a) => {
                let vms = || [&a.src, &a.dest].into_iter().flatten();
                self.kind.is_none_or(|k| k == RecordKind::Alert)
                    && self.vm.as_ref().is_none_or(|v| vms().any(|m| &m.name == v))
                    && self.zone.as_ref().is_none_or(|z| vms().any(|m| &m.zone == z))
                    && self.verdict.is_none()
                    && self
                        .rule
                        .as_ref()
                        .is_none_or(|id| a.decided_by.iter().any(|d| &d.rule == id))
            }
            // A gap in the alerts names no VM: it answers only a query for alerts or for everything.
            Record::AlertsNotRecorded(_) => {
                self.kind.is_none_or(|k| k == RecordKind::Alert)
                    && self.vm.is_none()
                    && self.zone.is_none()
                    && self.verdict.is_none()
                    && self.rule.is_none()
            }
        }
    }

    /// The index keys a matching record must have.
    fn keys(&self) -> Vec<String> {
        let mut k = Vec::new();
        if let Some(v) = &self.vm {
            k.push(format!("v:{v}"));
        }
        if let Some(z) = &self.zone {
            k.push(format!("z:{z}"));
        }
        if let Some(v) = self.verdict {
            k.push(format!("d:{}", verdict_name(v)));
        }
        if let Some(r) = &self.rule {
            k.push(format!("r:{r}"));
        }
        match self.kind {
            Some(RecordKind::Flow) => k.push("k:flow".into()),
            Some(RecordKind::Change) => k.push("k:change".into()),
            Some(RecordKind::Alert) => k.push("k:alert".into()),
            None => {}
        }
        k
    }

    fn in_window(&self, t: u64) -> bool {
        self.since_ns.is_none_or(|s| t >= s) && self.until_ns.is_none_or(|u| t < u)
    }
}

/// What a query found besides its records.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueryReport {
    /// Records that matched (and were passed on).
    pub matches: usize,
    /// Segments whose records were read.
    pub segments_read: usize,
    /// Integrity problems of the trail's structure and of the segments read:
    /// when not empty, the answer may be incomplete or wrong.
    pub problems: Vec<Problem>,
    /// Remarks (an index rebuilt, a torn tail being written).
    pub notes: Vec<String>,
}

/// Read and decode the record whose frame is at `offset` of `file`.
pub(crate) fn read_record_at(file: &File, path: &Path, offset: u64, seq: u64) -> Result<Record, AuditError> {
    let corrupt = |reason: String| AuditError::Corrupt {
        path: path.into(),
        offset,
        seq,
        reason,
    };
    let mut lb = [0u8; LEN_LEN];
    file.read_exact_at(&mut lb, offset)
        .map_err(|e| corrupt(format!("reading frame: {e}")))?;
    let len = u32::from_le_bytes(lb);
    if len == 0 || len > MAX_PAYLOAD {
        return Err(corrupt(format!("frame length {len} out of range (index stale?)")));
    }
    let mut payload = vec![0u8; len as usize];
    file.read_exact_at(&mut payload, offset + LEN_LEN as u64)
        .map_err(|e| corrupt(format!("reading payload: {e}")))?;
    serde_json::from_slice(&payload).map_err(|e| corrupt(format!("undecodable record: {e}")))
}

/// Run `q` over one segment with index `idx`; `false` from `f` stops.
fn run_segment(
    path: &Path,
    idx: &SegmentIndex,
    q: &Query,
    found: &mut usize,
    f: &mut dyn FnMut(u64, Record) -> bool,
) -> Result<bool, AuditError> {
    let keys = q.keys();
    let candidates: Vec<u32> = if keys.is_empty() {
        // Positions are below the segment's record count, which fits a u32 (see SegmentIndex::push).
        (0..idx.len() as u32).collect()
    } else {
        let lists = keys
            .iter()
            .map(|k| idx.postings.get(k).map_or(&[][..], Vec::as_slice))
            .collect();
        intersect(lists)
    };
    let mut file = None;
    for pos in candidates {
        // Positions come from this index, whose decoder checked them against its length.
        let (offset, time) = (idx.offsets[pos as usize], idx.times[pos as usize]);
        if offset == index::HOLE || !q.in_window(time) {
            continue;
        }
        let file = match &file {
            Some(f) => f,
            None => file.insert(File::open(path).at(path)?),
        };
        let seq = idx.first_seq + u64::from(pos);
        let rec = read_record_at(file, path, offset, seq)?;
        if !q.matches(&rec) {
            continue;
        }
        *found += 1;
        if !f(seq, rec) || q.limit.is_some_and(|l| *found >= l) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// What identifies a file's content as unchanged since it was checked: a
/// write changes its size or its times (ctime cannot be set back), a
/// replacement its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn file_id(path: &Path) -> Result<FileId, AuditError> {
    let m = std::fs::metadata(path).at(path)?;
    Ok(FileId {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// A sealed segment as a reader found it: the index to use and what is wrong.
#[derive(Debug)]
pub(crate) struct Consulted {
    pub(crate) index: SegmentIndex,
    problems: Vec<Problem>,
    notes: Vec<String>,
    /// Whether the index was rebuilt from a segment that verified by its
    /// chain with no problem (the writer may then seal it again).
    clean_rebuild: bool,
}

/// What a process checked per segment file, until the file changes: the
/// digest each segment was verified to have (a few bytes per segment), and
/// the last few indexes that had to be rebuilt (whole indexes: bounded).
#[derive(Debug, Default)]
pub(crate) struct SegmentCache {
    verified: Mutex<HashMap<PathBuf, (FileId, segment::Hash)>>,
    rebuilt: Mutex<Vec<(PathBuf, FileId, Arc<Consulted>)>>,
}

/// Rebuilt indexes kept per process.
const REBUILT_KEPT: usize = 4;

impl SegmentCache {
    fn verified(&self, path: &Path, id: FileId, digest: &segment::Hash) -> bool {
        let map = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        map.get(path).is_some_and(|(i, d)| *i == id && d == digest)
    }

    fn set_verified(&self, path: &Path, id: FileId, digest: segment::Hash) {
        let mut map = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(path.into(), (id, digest));
    }

    fn rebuilt(&self, path: &Path, id: FileId) -> Option<Arc<Consulted>> {
        let list = self.rebuilt.lock().unwrap_or_else(|p| p.into_inner());
        list.iter()
            .find(|(p, i, _)| p == path && *i == id)
            .map(|(_, _, c)| c.clone())
    }

    fn keep_rebuilt(&self, path: &Path, id: FileId, c: Arc<Consulted>) {
        let mut list = self.rebuilt.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|(p, _, _)| p != path);
        if list.len() == REBUILT_KEPT {
            list.remove(0);
        }
        list.push((path.into(), id, c));
    }
}

/// Rebuild a segment's index while verifying its chain against its signed
/// checkpoints: the index of every record that chains (holes where damage
/// is), and the problems.
fn rebuild(
    path: &Path,
    first_seq: u64,
    vk: &VerifyingKey,
    active: bool,
) -> Result<(SegmentIndex, Vec<Problem>, Vec<String>), AuditError> {
    let inp = SegmentInput {
        path,
        name_first: first_seq,
        expected: None,
        next_header: None,
        last_segment: active,
        first_segment: false,
        retention: &[],
        vk,
        want_hash_at: None,
    };
    let mut idx = SegmentIndex::new(first_seq);
    let mut undecodable = Vec::new();
    let check = check_segment(&inp, &mut |seq, f| {
        match serde_json::from_slice::<Record>(&f.payload) {
            Ok(r) => {
                if idx.is_empty() {
                    idx.first_seq = idx.first_seq.min(seq);
                }
                idx.push_at(seq, f.offset, &r);
            }
            Err(e) => undecodable.push((f.offset, seq, e.to_string())),
        }
        Ok(())
    })?;
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    for p in check.problems {
        // A torn tail of the active segment is a write in progress, or a crash the writer will set aside.
        if active && p.kind == ProblemKind::TornTail {
            notes.push(format!("{p} (being written?)"));
        } else {
            problems.push(p);
        }
    }
    for (offset, seq, e) in undecodable {
        problems.push(Problem {
            kind: ProblemKind::ChainBroken,
            file: path.into(),
            offset: Some(offset),
            seq: Some(seq),
            detail: format!("the record chains but is not a record: {e}; it is not searched"),
        });
    }
    if !active && check.next.is_some_and(|n| !n.closed) && problems.is_empty() {
        problems.push(Problem {
            kind: ProblemKind::MissingCheckpoints,
            file: segment::sidecar(path, "ckpt"),
            offset: None,
            seq: check.next.map(|n| n.seq - 1),
            detail: "no signed checkpoint closes this sealed segment: its end cannot be trusted".into(),
        });
    }
    Ok((idx, problems, notes))
}

/// A sealed segment's index, checked: through its signed index when the
/// segment still has the bytes the index covers, else rebuilt while
/// verifying the segment.
pub(crate) fn consult_sealed(
    path: &Path,
    first_seq: u64,
    vk: &VerifyingKey,
    cache: &SegmentCache,
) -> Result<Arc<Consulted>, AuditError> {
    let id = file_id(path)?;
    let idx_path = segment::sidecar(path, "idx");
    let mut changed = false;
    if let Some((idx, seal)) = SegmentIndex::load_sealed(&idx_path, first_seq, Some(vk))?
        && let Some(seal) = seal
    {
        let ok = cache.verified(path, id, &seal.digest)
            || (id.len == seal.segment_bytes && digest_file(path, seal.segment_bytes)? == Some(seal.digest));
        if ok {
            cache.set_verified(path, id, seal.digest);
            return Ok(Arc::new(Consulted {
                index: idx,
                problems: Vec::new(),
                notes: Vec::new(),
                clean_rebuild: false,
            }));
        }
        changed = true;
    }
    if let Some(c) = cache.rebuilt(path, id) {
        return Ok(c);
    }
    let (index, mut problems, mut notes) = rebuild(path, first_seq, vk, false)?;
    if changed && problems.is_empty() {
        problems.push(Problem {
            kind: ProblemKind::SegmentChanged,
            file: path.into(),
            offset: None,
            seq: None,
            detail: "the segment's bytes differ from those its signed index covers (changed since it was sealed)"
                .into(),
        });
    }
    let clean_rebuild = problems.is_empty() && !changed;
    if !changed {
        notes.push(format!(
            "{}: no index signed by this key; rebuilt from the segment, verified by its chain",
            idx_path.display()
        ));
    }
    let c = Arc::new(Consulted {
        index,
        problems,
        notes,
        clean_rebuild,
    });
    cache.keep_rebuilt(path, id, c.clone());
    Ok(c)
}

/// The header of a segment, if readable.
fn read_header(path: &Path) -> Option<SegmentHeader> {
    let mut b = [0u8; HEADER_LEN];
    let n = File::open(path)
        .and_then(|mut f| segment::read_full(&mut f, &mut b))
        .ok()?;
    SegmentHeader::parse(&b[..n])
}

/// Whether a validly signed checkpoint in `ckpt` covers `seq` with `hash`
/// (the last entry is tried first: a sealed segment's closing checkpoint).
fn signed_at(ckpt: &Path, seq: u64, hash: &segment::Hash, vk: &VerifyingKey) -> Result<bool, AuditError> {
    let ok = |c: &Checkpoint| c.seq == seq && c.hash == *hash && c.verify(vk, Purpose::Checkpoint);
    if let Ok(f) = File::open(ckpt) {
        let len = f.metadata().at(ckpt)?.len();
        if len >= CHECKPOINT_LEN as u64 {
            let mut b = [0u8; CHECKPOINT_LEN];
            let at = (len / CHECKPOINT_LEN as u64 - 1) * CHECKPOINT_LEN as u64;
            if f.read_exact_at(&mut b, at).is_ok() && Checkpoint::parse(&b).is_some_and(|c| ok(&c)) {
                return Ok(true);
            }
        }
    }
    let mut found = false;
    for_each_checkpoint(ckpt, |_, c| found |= ok(&c))?;
    Ok(found)
}

/// The trail's structure: readable headers that agree with their names,
/// each segment continuing the one before under a signed checkpoint, the
/// first starting at seq 1 or explained by a signed retention entry.
pub(crate) fn structure_problems(
    dir: &Path,
    segs: &[(u64, PathBuf)],
    vk: &VerifyingKey,
) -> Result<Vec<Problem>, AuditError> {
    let mut out = Vec::new();
    let mut prev: Option<&Path> = None;
    for (i, (first, path)) in segs.iter().enumerate() {
        let prob = |kind, seq, detail: String| Problem {
            kind,
            file: path.clone(),
            offset: Some(0),
            seq,
            detail,
        };
        let Some(h) = read_header(path) else {
            out.push(prob(ProblemKind::BadHeader, None, "unreadable segment header".into()));
            prev = None;
            continue;
        };
        if h.first_seq != *first || h.first_seq == 0 {
            out.push(prob(
                ProblemKind::BadHeader,
                Some(h.first_seq),
                format!("header says first seq {} but the file name says {first}", h.first_seq),
            ));
        }
        let anchor = h.first_seq.saturating_sub(1);
        if i == 0 {
            if h.first_seq == 1 {
                if h.prev_hash != GENESIS {
                    out.push(prob(
                        ProblemKind::BadHeader,
                        Some(1),
                        "the log's first segment must chain from the zero hash".into(),
                    ));
                }
            } else {
                let mut explained = false;
                for_each_checkpoint(&checkpoint::retention_path(dir), |_, r| {
                    explained |= r.verify(vk, Purpose::Retention)
                        && (r.seq > anchor || (r.seq == anchor && r.hash == h.prev_hash));
                })?;
                if !explained {
                    out.push(prob(
                        ProblemKind::UnexplainedStart,
                        Some(h.first_seq),
                        format!(
                            "the log starts at seq {} but no signed retention entry covers seq 1..={anchor}: segments deleted?",
                            h.first_seq
                        ),
                    ));
                }
            }
        } else if let Some(p) = prev
            && !signed_at(&segment::sidecar(p, "ckpt"), anchor, &h.prev_hash, vk)?
        {
            out.push(prob(
                ProblemKind::MissingSegment,
                Some(h.first_seq),
                format!(
                    "does not continue {}: no signed checkpoint there covers seq {anchor} with this segment's previous hash (a segment deleted or replaced)",
                    p.display()
                ),
            ));
        }
        prev = Some(path);
    }
    Ok(out)
}

/// Summaries of the sealed segments `segs`: from `<dir>/index.json` when
/// `vk` signed it and it lists them, else rebuilt from their checked
/// indexes (and stored, signed by `key` when given and every segment was
/// clean); `true` if rebuilt, and the problems met.
pub(crate) fn sealed_summaries(
    dir: &Path,
    segs: &[(u64, PathBuf)],
    vk: &VerifyingKey,
    key: Option<&SigningKey>,
    cache: &SegmentCache,
) -> Result<(Vec<SegmentSummary>, bool, Vec<Problem>), AuditError> {
    if let Some(s) = index::load_summaries(dir, Some(vk))? {
        let same = s.len() == segs.len()
            && s.iter().zip(segs).all(|(a, (first, p))| {
                a.first_seq == *first && p.file_name().and_then(|n| n.to_str()) == Some(a.name.as_str())
            });
        if same {
            return Ok((s, false, Vec::new()));
        }
    }
    let mut out = Vec::with_capacity(segs.len());
    let mut problems = Vec::new();
    for (first, path) in segs {
        let c = consult_sealed(path, *first, vk, cache)?;
        if let (Some(key), true) = (key, c.clean_rebuild) {
            // Verified by its chain and its signed closing checkpoint: seal the rebuilt index again.
            let len = std::fs::metadata(path).at(path)?.len();
            if let Some(digest) = digest_file(path, len)? {
                c.index
                    .store_sealed(&segment::sidecar(path, "idx"), len, &digest, key)?;
            }
        }
        problems.extend(c.problems.iter().cloned());
        let bytes = std::fs::metadata(path).at(path)?.len();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        out.push(SegmentSummary::of(name, bytes, &c.index));
    }
    let sign = key.filter(|_| problems.is_empty());
    // A read-only directory still answers queries; the rebuild is just repeated.
    let _ = index::store_summaries(dir, &out, sign);
    Ok((out, true, problems))
}

/// Where a query reads and how its answer is checked.
pub(crate) struct Ctx<'a> {
    pub dir: &'a Path,
    pub vk: &'a VerifyingKey,
    pub cache: &'a SegmentCache,
    /// Refuse ([`AuditError::Integrity`]) at the first problem.
    pub strict: bool,
}

/// Run `q` over sealed segments (by summary) and the active one, with the
/// problems already known (structure, active segment).
pub(crate) fn run(
    ctx: &Ctx<'_>,
    sealed: &[SegmentSummary],
    active: Option<(&Path, &SegmentIndex)>,
    known: Vec<Problem>,
    q: &Query,
    f: &mut dyn FnMut(u64, Record) -> bool,
) -> Result<QueryReport, AuditError> {
    let mut report = QueryReport {
        problems: known,
        ..QueryReport::default()
    };
    let refuse = |problems: &[Problem]| {
        Err(AuditError::Integrity {
            problems: problems.to_vec(),
        })
    };
    if ctx.strict && !report.problems.is_empty() {
        return refuse(&report.problems);
    }
    let mut found = 0;
    if q.limit == Some(0) {
        return Ok(report);
    }
    for s in sealed {
        if !s.overlaps(q.since_ns, q.until_ns) {
            continue;
        }
        let path = ctx.dir.join(&s.name);
        let c = consult_sealed(&path, s.first_seq, ctx.vk, ctx.cache)?;
        report.problems.extend(c.problems.iter().cloned());
        report.notes.extend(c.notes.iter().cloned());
        if c.index.len() as u64 != s.records && c.problems.is_empty() {
            report.problems.push(Problem {
                kind: ProblemKind::SegmentChanged,
                file: path.clone(),
                offset: None,
                seq: None,
                detail: format!(
                    "the log index says {} records but the segment holds {}",
                    s.records,
                    c.index.len()
                ),
            });
        }
        if ctx.strict && !report.problems.is_empty() {
            return refuse(&report.problems);
        }
        report.segments_read += 1;
        if !run_segment(&path, &c.index, q, &mut found, f)? {
            report.matches = found;
            return Ok(report);
        }
    }
    if let Some((path, idx)) = active {
        let overlaps = idx
            .time_range()
            .is_some_and(|(min, max)| q.since_ns.is_none_or(|s| max >= s) && q.until_ns.is_none_or(|u| min < u));
        if overlaps {
            report.segments_read += 1;
            run_segment(path, idx, q, &mut found, f)?;
        }
    }
    report.matches = found;
    Ok(report)
}

/// The active (last) segment's index and problems, verified by its chain.
pub(crate) fn consult_active(
    path: &Path,
    first_seq: u64,
    vk: &VerifyingKey,
) -> Result<(SegmentIndex, Vec<Problem>, Vec<String>), AuditError> {
    rebuild(path, first_seq, vk, true)
}

/// Read-only access to a log for queries and export: never modifies records
/// or checkpoints (it may rewrite derived index files).
#[derive(Debug)]
pub struct LogReader {
    dir: PathBuf,
    vk: VerifyingKey,
    segs: Vec<(u64, PathBuf)>,
    sealed: Vec<SegmentSummary>,
    active: Option<(PathBuf, SegmentIndex)>,
    /// Problems found at open (the active segment, a rebuilt log index).
    problems: Vec<Problem>,
    notes: Vec<String>,
    cache: SegmentCache,
}

impl LogReader {
    /// Open the log in `dir`, checking it with `<dir>/audit.pub` (which only
    /// shows the trail agrees with itself; see [`LogReader::open_with_key`]).
    pub fn open(dir: &Path) -> Result<LogReader, AuditError> {
        let vk = read_verifying_key(&dir.join("audit.pub"))?;
        LogReader::open_with_key(dir, vk)
    }

    /// Open the log in `dir`, checking signatures with `vk`.
    pub fn open_with_key(dir: &Path, vk: VerifyingKey) -> Result<LogReader, AuditError> {
        let mut segs = segment::list_segments(dir)?;
        let Some(last) = segs.pop() else {
            return Err(AuditError::format(dir, "no audit segments (seg-*.log) here"));
        };
        let cache = SegmentCache::default();
        let (sealed, rebuilt, mut problems) = sealed_summaries(dir, &segs, &vk, None, &cache)?;
        let mut notes = Vec::new();
        if rebuilt && !segs.is_empty() {
            notes
                .push("the log index (index.json) is not signed by this key: rebuilt from the checked segments".into());
        }
        let (idx, p, n) = consult_active(&last.1, last.0, &vk)?;
        problems.extend(p);
        notes.extend(n);
        segs.push(last.clone());
        Ok(LogReader {
            dir: dir.into(),
            vk,
            segs,
            sealed,
            active: Some((last.1, idx)),
            problems,
            notes,
            cache,
        })
    }

    fn run(&self, q: &Query, strict: bool, f: &mut dyn FnMut(u64, Record) -> bool) -> Result<QueryReport, AuditError> {
        let mut known = structure_problems(&self.dir, &self.segs, &self.vk)?;
        known.extend(self.problems.iter().cloned());
        let ctx = Ctx {
            dir: &self.dir,
            vk: &self.vk,
            cache: &self.cache,
            strict,
        };
        let active = self.active.as_ref().map(|(p, i)| (p.as_path(), i));
        let mut report = run(&ctx, &self.sealed, active, known, q, f)?;
        let mut notes = self.notes.clone();
        notes.append(&mut report.notes);
        report.notes = notes;
        Ok(report)
    }

    /// Call `f` with each matching record in sequence order until it returns
    /// `false` or the limit is reached; the report says what else was found:
    /// problems mean the answer may be incomplete or wrong.
    pub fn query_report(&self, q: &Query, mut f: impl FnMut(u64, Record) -> bool) -> Result<QueryReport, AuditError> {
        self.run(q, false, &mut f)
    }

    /// Call `f` with each matching record in sequence order until it returns
    /// `false` or the limit is reached; the number of matches. Refuses
    /// ([`AuditError::Integrity`]) when the trail's structure or a segment
    /// it reads fails its check, before passing on that segment's records.
    pub fn query_each(&self, q: &Query, mut f: impl FnMut(u64, Record) -> bool) -> Result<usize, AuditError> {
        Ok(self.run(q, true, &mut f)?.matches)
    }

    /// The matching records with their sequence numbers (refused as
    /// [`LogReader::query_each`] is).
    pub fn query(&self, q: &Query) -> Result<Vec<(u64, Record)>, AuditError> {
        let mut out = Vec::new();
        self.query_each(q, |s, r| {
            out.push((s, r));
            true
        })?;
        Ok(out)
    }

    /// Number of records.
    pub fn records(&self) -> u64 {
        self.sealed.iter().map(|s| s.records).sum::<u64>() + self.active.as_ref().map_or(0, |(_, i)| i.len() as u64)
    }
}

//! Queries over the log: filters by VM, zone, verdict, rule, kind and time.
//!
//! A query skips segments whose time range (from the log index) misses the
//! window, then, within a segment, intersects the posting lists of its keyed
//! filters and drops candidates by their indexed time before reading a single
//! record; only the candidates are read (by offset) and decoded. Memory is one
//! segment index at a time plus the results the caller keeps: results stream
//! through [`LogReader::query_each`].

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{AuditError, IoContext};
use crate::index::{self, SegmentIndex, SegmentSummary, intersect, verdict_name};
use crate::record::{Record, Verdict};
use crate::segment::{self, LEN_LEN, MAX_PAYLOAD};

/// Which kind of record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordKind {
    /// Flow records.
    Flow,
    /// Change records.
    Change,
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
    /// Flow or change records only.
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
            None => {}
        }
        k
    }

    fn in_window(&self, t: u64) -> bool {
        self.since_ns.is_none_or(|s| t >= s) && self.until_ns.is_none_or(|u| t < u)
    }
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
        if !q.in_window(time) {
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

/// Run `q` over sealed segments (by summary) and the active one.
pub(crate) fn run(
    dir: &Path,
    sealed: &[SegmentSummary],
    active: Option<(&Path, &SegmentIndex)>,
    q: &Query,
    f: &mut dyn FnMut(u64, Record) -> bool,
) -> Result<usize, AuditError> {
    let mut found = 0;
    if q.limit == Some(0) {
        return Ok(0);
    }
    for s in sealed {
        if !s.overlaps(q.since_ns, q.until_ns) {
            continue;
        }
        let path = dir.join(&s.name);
        let idx = segment_index(&path, s.first_seq)?;
        if !run_segment(&path, &idx, q, &mut found, f)? {
            return Ok(found);
        }
    }
    if let Some((path, idx)) = active {
        let overlaps = idx
            .time_range()
            .is_some_and(|(min, max)| q.since_ns.is_none_or(|s| max >= s) && q.until_ns.is_none_or(|u| min < u));
        if overlaps {
            run_segment(path, idx, q, &mut found, f)?;
        }
    }
    Ok(found)
}

/// A sealed segment's index: its `.idx`, or rebuilt from the segment (and
/// stored again when the directory is writable) when missing or damaged.
pub(crate) fn segment_index(path: &Path, first_seq: u64) -> Result<SegmentIndex, AuditError> {
    let idx_path = segment::sidecar(path, "idx");
    if let Some(idx) = SegmentIndex::load(&idx_path, first_seq)? {
        return Ok(idx);
    }
    let idx = SegmentIndex::build(path)?;
    // A read-only directory still answers queries; the rebuild is just repeated.
    let _ = idx.store(&idx_path);
    Ok(idx)
}

/// Summaries of the sealed segments `segs`: from `<dir>/index.json` when it
/// matches them, else rebuilt (and stored when possible); `true` if rebuilt.
pub(crate) fn sealed_summaries(dir: &Path, segs: &[(u64, PathBuf)]) -> Result<(Vec<SegmentSummary>, bool), AuditError> {
    if let Some(s) = index::load_summaries(dir)? {
        let same = s.len() == segs.len()
            && s.iter().zip(segs).all(|(a, (first, p))| {
                a.first_seq == *first && p.file_name().and_then(|n| n.to_str()) == Some(a.name.as_str())
            });
        if same {
            return Ok((s, false));
        }
    }
    let mut out = Vec::with_capacity(segs.len());
    for (first, path) in segs {
        let idx = segment_index(path, *first)?;
        let bytes = std::fs::metadata(path).at(path)?.len();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        out.push(SegmentSummary::of(name, bytes, &idx));
    }
    let _ = index::store_summaries(dir, &out);
    Ok((out, true))
}

/// Read-only access to a log for queries and export: never modifies records
/// or checkpoints (it may rewrite derived index files).
#[derive(Debug)]
pub struct LogReader {
    dir: PathBuf,
    sealed: Vec<SegmentSummary>,
    active: Option<(PathBuf, SegmentIndex)>,
}

impl LogReader {
    /// Open the log in `dir`.
    pub fn open(dir: &Path) -> Result<LogReader, AuditError> {
        let mut segs = segment::list_segments(dir)?;
        let Some(last) = segs.pop() else {
            return Err(AuditError::format(dir, "no audit segments (seg-*.log) here"));
        };
        let (sealed, _) = sealed_summaries(dir, &segs)?;
        let idx = SegmentIndex::build(&last.1)?;
        Ok(LogReader {
            dir: dir.into(),
            sealed,
            active: Some((last.1, idx)),
        })
    }

    /// Call `f` with each matching record in sequence order until it returns
    /// `false` or the limit is reached; the number of matches.
    pub fn query_each(&self, q: &Query, mut f: impl FnMut(u64, Record) -> bool) -> Result<usize, AuditError> {
        let active = self.active.as_ref().map(|(p, i)| (p.as_path(), i));
        run(&self.dir, &self.sealed, active, q, &mut f)
    }

    /// The matching records with their sequence numbers.
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

//! Offline verification of a log directory: [`verify`].
//!
//! Every segment is read in order and every record's hash recomputed. When
//! the chain breaks, the records around the break are tried against the
//! possible explanations — a changed payload, a changed hash, records
//! deleted, a record inserted, two records swapped — and the first that fits
//! is reported with the file, byte offset and sequence number; verification
//! then resynchronises and goes on, so one report lists every problem.
//! Segment headers are checked against the previous segment (a deleted
//! segment leaves a gap), checkpoint signatures against the public key and
//! their hashes against the records, and a log that starts after seq 1 must
//! be explained by a signed retention entry.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;

use crate::checkpoint::{CHECKPOINT_LEN, Checkpoint, Purpose, read_checkpoints, read_verifying_key, retention_path};
use crate::error::{AuditError, IoContext};
use crate::segment::{self, GENESIS, HASH_LEN, HEADER_LEN, Hash, LEN_LEN, MAX_PAYLOAD, SegmentHeader, chain_hash};

/// How far verification looks for the continuation after deleted records.
const MAX_DELETED_SEARCH: u64 = 4096;

/// What kind of problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// A record's payload was changed (its stored hash is the original).
    Modified,
    /// A record's stored hash was changed.
    HashModified,
    /// Records were removed from the middle of a segment.
    Deleted,
    /// A record that is not part of the chain was inserted.
    Inserted,
    /// Two records were swapped.
    Reordered,
    /// The chain breaks and no simple explanation fits.
    ChainBroken,
    /// A frame's length is impossible, or a sealed segment ends mid-record.
    BadFrame,
    /// A segment header is unreadable or inconsistent.
    BadHeader,
    /// The log ends inside a record (a crash while appending; `open` sets it aside).
    TornTail,
    /// A whole segment is missing between two others.
    MissingSegment,
    /// Records are missing at the end of a segment.
    MissingRecords,
    /// A checkpoint or retention signature does not verify.
    BadSignature,
    /// A validly signed checkpoint disagrees with the records.
    CheckpointMismatch,
    /// A segment has no checkpoint file or no valid anchor.
    MissingCheckpoints,
    /// The log starts after seq 1 without a signed retention entry.
    UnexplainedStart,
    /// A segment overlaps the previous one.
    Overlap,
}

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// What.
    pub kind: ProblemKind,
    /// The file (segment or checkpoint file).
    pub file: PathBuf,
    /// Byte offset in it.
    pub offset: Option<u64>,
    /// The sequence number concerned.
    pub seq: Option<u64>,
    /// Explanation.
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(o) = self.offset {
            write!(f, " byte {o}")?;
        }
        if let Some(s) = self.seq {
            write!(f, " seq {s}")?;
        }
        write!(f, ": {:?}: {}", self.kind, self.detail)
    }
}

/// The result of [`verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// Segments read.
    pub segments: usize,
    /// Records read.
    pub records: u64,
    /// First sequence number present.
    pub first_seq: u64,
    /// Last sequence number present.
    pub last_seq: u64,
    /// Checkpoints with a valid signature.
    pub checkpoints: u64,
    /// The highest sequence number covered by a valid checkpoint.
    pub signed_through: u64,
    /// Everything wrong, in log order.
    pub problems: Vec<Problem>,
    /// Remarks that are not problems (where the key came from, unsigned tail).
    pub notes: Vec<String>,
}

impl VerifyReport {
    /// Whether the log is intact.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// Whether the only problems are a torn tail (what a crash leaves).
    pub fn only_torn_tail(&self) -> bool {
        self.problems.iter().all(|p| p.kind == ProblemKind::TornTail)
    }
}

/// A whole frame in a segment's bytes.
struct Frame<'a> {
    offset: u64,
    payload: &'a [u8],
    hash: Hash,
}

/// The frames of a segment body and where parsing stopped early, if it did.
fn frames(data: &[u8]) -> (Vec<Frame<'_>>, Option<(u64, String, bool)>) {
    let mut out = Vec::new();
    let mut at = HEADER_LEN;
    while at < data.len() {
        let rest = &data[at..];
        let torn = |what: &str| Some((at as u64, format!("{what} ({} bytes left)", rest.len()), true));
        let Some(lb) = rest.get(..LEN_LEN) else {
            return (out, torn("incomplete length"));
        };
        // `lb` has exactly LEN_LEN bytes.
        let len = u32::from_le_bytes([lb[0], lb[1], lb[2], lb[3]]);
        if len == 0 || len > MAX_PAYLOAD {
            return (out, Some((at as u64, format!("impossible frame length {len}"), false)));
        }
        let end = LEN_LEN + len as usize + HASH_LEN;
        let Some(frame) = rest.get(..end) else {
            return (out, torn("incomplete record"));
        };
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&frame[end - HASH_LEN..]);
        out.push(Frame {
            offset: at as u64,
            payload: &frame[LEN_LEN..end - HASH_LEN],
            hash,
        });
        at += end;
    }
    (out, None)
}

/// Verify the log in `dir` with the public key at `public_key` (default:
/// `<dir>/audit.pub`, which only shows the log agrees with itself).
pub fn verify(dir: &Path, public_key: Option<&Path>) -> Result<VerifyReport, AuditError> {
    let mut report = VerifyReport::default();
    let segs = segment::list_segments(dir)?;
    if segs.is_empty() {
        return Err(AuditError::format(dir, "no audit segments (seg-*.log) here"));
    }
    let vk = match public_key {
        Some(p) => read_verifying_key(p)?,
        None => {
            report.notes.push(format!(
                "public key read from {}: pass --key with a copy kept elsewhere to detect a rewrite by someone holding the log's key",
                dir.join("audit.pub").display()
            ));
            read_verifying_key(&dir.join("audit.pub"))?
        }
    };
    let mut problems = Vec::new();
    let retention = read_signed(&retention_path(dir), Purpose::Retention, &vk, &mut problems, false)?;
    let (mut total_ckpts, mut valid_ckpts) = (0u64, 0u64);
    // (next expected seq, previous hash, whether the previous segment ended at its signed close)
    let mut expected: Option<(u64, Hash, bool)> = None;
    let mut next_headers: Vec<Option<SegmentHeader>> = Vec::with_capacity(segs.len());
    for (_, p) in &segs {
        let mut b = [0u8; HEADER_LEN];
        let h = std::fs::File::open(p)
            .and_then(|mut f| segment::read_full(&mut f, &mut b))
            .ok()
            .and_then(|n| SegmentHeader::parse(&b[..n]));
        next_headers.push(h);
    }
    for (i, (name_first, path)) in segs.iter().enumerate() {
        let last_segment = i + 1 == segs.len();
        let data = std::fs::read(path).at(path)?;
        report.segments += 1;
        let prob = |kind, offset: Option<u64>, seq: Option<u64>, detail: String| Problem {
            kind,
            file: path.clone(),
            offset,
            seq,
            detail,
        };
        let Some(header) = SegmentHeader::parse(&data) else {
            problems.push(prob(
                ProblemKind::BadHeader,
                Some(0),
                None,
                "unreadable segment header".into(),
            ));
            expected = None;
            continue;
        };
        if header.first_seq != *name_first || header.first_seq == 0 {
            problems.push(prob(
                ProblemKind::BadHeader,
                Some(0),
                Some(header.first_seq),
                format!(
                    "header says first seq {} but the file name says {name_first}",
                    header.first_seq
                ),
            ));
        }
        let ckpt_path = segment::sidecar(path, "ckpt");
        let ckpts = if ckpt_path.exists() {
            let (all, _) = read_checkpoints(&ckpt_path)?;
            total_ckpts += all.len() as u64;
            let v = read_signed(&ckpt_path, Purpose::Checkpoint, &vk, &mut problems, last_segment)?;
            valid_ckpts += v.len() as u64;
            v
        } else {
            problems.push(prob(
                ProblemKind::MissingCheckpoints,
                None,
                None,
                format!("{} is missing", ckpt_path.display()),
            ));
            Vec::new()
        };
        let anchor_seq = header.first_seq.wrapping_sub(1);
        match ckpts.iter().find(|(_, c)| c.seq == anchor_seq) {
            Some((off, c)) if c.hash != header.prev_hash => problems.push(Problem {
                kind: ProblemKind::CheckpointMismatch,
                file: ckpt_path.clone(),
                offset: Some(*off),
                seq: Some(anchor_seq),
                detail: "the segment header's previous hash differs from its signed anchor".into(),
            }),
            Some(_) => {}
            None => problems.push(prob(
                ProblemKind::MissingCheckpoints,
                Some(0),
                Some(header.first_seq),
                "no validly signed anchor for the segment header".into(),
            )),
        }
        match expected {
            None if i == 0 => {
                if header.first_seq == 1 {
                    if header.prev_hash != GENESIS {
                        problems.push(prob(
                            ProblemKind::BadHeader,
                            Some(0),
                            Some(1),
                            "the log's first segment must chain from the zero hash".into(),
                        ));
                    }
                } else {
                    let explained = retention
                        .iter()
                        .any(|(_, r)| r.seq > anchor_seq || (r.seq == anchor_seq && r.hash == header.prev_hash));
                    if !explained {
                        problems.push(prob(
                            ProblemKind::UnexplainedStart,
                            Some(0),
                            Some(header.first_seq),
                            format!(
                                "the log starts at seq {} but no signed retention entry covers seq 1..={anchor_seq}: segments deleted?",
                                header.first_seq
                            ),
                        ));
                    }
                }
            }
            None => {}
            Some((nseq, phash, closed)) => {
                if header.first_seq > nseq {
                    let (kind, what) = if closed {
                        (ProblemKind::MissingSegment, "a segment is missing")
                    } else {
                        (ProblemKind::MissingRecords, "records are missing")
                    };
                    problems.push(prob(
                        kind,
                        Some(0),
                        Some(nseq),
                        format!("{what}: seq {nseq}..={} are not in the log", header.first_seq - 1),
                    ));
                } else if header.first_seq < nseq {
                    problems.push(prob(
                        ProblemKind::Overlap,
                        Some(0),
                        Some(header.first_seq),
                        format!(
                            "starts at seq {} but the previous segment ends at {}",
                            header.first_seq,
                            nseq - 1
                        ),
                    ));
                } else if header.prev_hash != phash {
                    problems.push(prob(
                        ProblemKind::ChainBroken,
                        Some(0),
                        Some(header.first_seq),
                        "the header's previous hash does not match the previous segment's last record".into(),
                    ));
                }
            }
        }
        let (fr, stop) = frames(&data);
        let by_seq: HashMap<u64, (u64, Hash)> = ckpts.iter().map(|(o, c)| (c.seq, (*o, c.hash))).collect();
        let accept = |seq: u64, hash: &Hash, problems: &mut Vec<Problem>| {
            if let Some((off, h)) = by_seq.get(&seq)
                && h != hash
            {
                problems.push(Problem {
                    kind: ProblemKind::CheckpointMismatch,
                    file: ckpt_path.clone(),
                    offset: Some(*off),
                    seq: Some(seq),
                    detail: "a validly signed checkpoint disagrees with the record's hash: records were rewritten"
                        .into(),
                });
            }
        };
        let ok = |j: usize, prev: &Hash, seq: u64| chain_hash(prev, seq, fr[j].payload) == fr[j].hash;
        let (mut prev, mut s, mut i) = (header.prev_hash, header.first_seq, 0usize);
        while i < fr.len() {
            let f = &fr[i];
            if ok(i, &prev, s) {
                accept(s, &f.hash, &mut problems);
                (prev, s, i) = (f.hash, s + 1, i + 1);
                continue;
            }
            let at = |kind, seq: u64, detail: String| prob(kind, Some(f.offset), Some(seq), detail);
            if i + 1 < fr.len() {
                let g = &fr[i + 1];
                if ok(i + 1, &prev, s) {
                    if ok(i, &g.hash, s + 1) {
                        problems.push(at(
                            ProblemKind::Reordered,
                            s,
                            format!(
                                "records seq {s} and {} are swapped (bytes {} and {})",
                                s + 1,
                                g.offset,
                                f.offset
                            ),
                        ));
                        accept(s, &g.hash, &mut problems);
                        accept(s + 1, &f.hash, &mut problems);
                        (prev, s, i) = (f.hash, s + 2, i + 2);
                    } else {
                        let copy = i > 0 && fr[i - 1].payload == f.payload && fr[i - 1].hash == f.hash;
                        let what = if copy { " (a copy of the record before it)" } else { "" };
                        problems.push(at(
                            ProblemKind::Inserted,
                            s,
                            format!("a record that is not in the chain was inserted before seq {s}{what}"),
                        ));
                        i += 1;
                    }
                    continue;
                }
                let recomputed = chain_hash(&prev, s, f.payload);
                if ok(i + 1, &recomputed, s + 1) {
                    problems.push(at(
                        ProblemKind::HashModified,
                        s,
                        "the record's stored hash was altered".into(),
                    ));
                    accept(s, &recomputed, &mut problems);
                    accept(s + 1, &g.hash, &mut problems);
                    (prev, s, i) = (g.hash, s + 2, i + 2);
                    continue;
                }
                if ok(i + 1, &f.hash, s + 1) {
                    problems.push(at(ProblemKind::Modified, s, "the record's content was altered".into()));
                    accept(s, &f.hash, &mut problems);
                    (prev, s, i) = (f.hash, s + 1, i + 1);
                    continue;
                }
                if let Some(k) = (1..=MAX_DELETED_SEARCH).find(|k| ok(i + 1, &f.hash, s + k + 1)) {
                    problems.push(at(
                        ProblemKind::Deleted,
                        s,
                        format!("{k} record(s) deleted here: seq {s}..={}", s + k - 1),
                    ));
                    accept(s + k, &f.hash, &mut problems);
                    (prev, s, i) = (f.hash, s + k + 1, i + 1);
                    continue;
                }
            } else {
                // The segment's last record: the next header holds what its hash should be.
                let recomputed = chain_hash(&prev, s, f.payload);
                let next_prev = next_headers.get(i + 1).copied().flatten().map(|h| h.prev_hash);
                let (kind, detail) = if next_prev == Some(recomputed) {
                    (ProblemKind::HashModified, "the record's stored hash was altered")
                } else if next_prev == Some(f.hash) || next_prev.is_none() {
                    (ProblemKind::Modified, "the record's content (or hash) was altered")
                } else {
                    (ProblemKind::ChainBroken, "the record does not match the chain")
                };
                problems.push(at(kind, s, detail.into()));
                accept(s, &f.hash, &mut problems);
                (prev, s, i) = (f.hash, s + 1, i + 1);
                continue;
            }
            problems.push(at(
                ProblemKind::ChainBroken,
                s,
                "the record does not match the chain and no single edit explains it".into(),
            ));
            (prev, s, i) = (f.hash, s + 1, i + 1);
        }
        if let Some((offset, what, torn)) = stop {
            let (kind, detail) = match (torn, last_segment) {
                (true, true) => (ProblemKind::TornTail, format!("the log ends inside a record: {what}")),
                (true, false) => (
                    ProblemKind::BadFrame,
                    format!("sealed segment ends inside a record: {what}"),
                ),
                (false, _) => (
                    ProblemKind::BadFrame,
                    format!("{what}: the rest of the segment is unreadable"),
                ),
            };
            problems.push(prob(kind, Some(offset), Some(s), detail));
        }
        let last = s - 1;
        for (off, c) in &ckpts {
            if c.seq > last {
                problems.push(Problem {
                    kind: ProblemKind::MissingRecords,
                    file: ckpt_path.clone(),
                    offset: Some(*off),
                    seq: Some(c.seq),
                    detail: format!(
                        "a signed checkpoint covers seq {} but the segment ends at seq {last}: records were removed from its end",
                        c.seq
                    ),
                });
            }
            report.signed_through = report.signed_through.max(c.seq.min(last));
        }
        let closed = ckpts.iter().any(|(_, c)| c.seq == last);
        if i == 0 || report.records == 0 {
            report.first_seq = header.first_seq;
        }
        report.records += fr.len() as u64;
        report.last_seq = last;
        expected = Some((s, prev, closed));
    }
    if total_ckpts > 0 && valid_ckpts == 0 {
        problems.insert(
            0,
            Problem {
                kind: ProblemKind::BadSignature,
                file: public_key.map_or_else(|| dir.join("audit.pub"), Path::to_path_buf),
                offset: None,
                seq: None,
                detail: format!("none of {total_ckpts} checkpoints verifies with this public key: wrong key?"),
            },
        );
    }
    report.checkpoints = valid_ckpts;
    if report.last_seq > report.signed_through {
        report.notes.push(format!(
            "records {}..={} follow the last checkpoint: chained but not yet signed",
            report.signed_through + 1,
            report.last_seq
        ));
    }
    for entry in std::fs::read_dir(dir).at(dir)? {
        let p = entry.at(dir)?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.contains(".torn") {
            report.notes.push(format!(
                "{} holds bytes of a torn tail that recovery set aside",
                p.display()
            ));
        }
    }
    report.problems = problems;
    Ok(report)
}

/// The validly signed entries of a checkpoint file with their offsets;
/// bad signatures and a torn tail go to `problems`. A missing file is empty.
fn read_signed(
    path: &Path,
    purpose: Purpose,
    vk: &VerifyingKey,
    problems: &mut Vec<Problem>,
    may_be_torn: bool,
) -> Result<Vec<(u64, Checkpoint)>, AuditError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let (entries, torn) = read_checkpoints(path)?;
    let mut out = Vec::new();
    for (j, c) in entries.into_iter().enumerate() {
        let offset = (j * CHECKPOINT_LEN) as u64;
        if c.verify(vk, purpose) {
            out.push((offset, c));
        } else {
            problems.push(Problem {
                kind: ProblemKind::BadSignature,
                file: path.into(),
                offset: Some(offset),
                seq: Some(c.seq),
                detail: "the signature does not verify: checkpoint altered or signed by another key".into(),
            });
        }
    }
    if torn > 0 {
        let offset = (out.len() * CHECKPOINT_LEN) as u64;
        problems.push(Problem {
            kind: if may_be_torn {
                ProblemKind::TornTail
            } else {
                ProblemKind::BadFrame
            },
            file: path.into(),
            offset: Some(offset),
            seq: None,
            detail: format!("{torn} trailing bytes are not a whole checkpoint"),
        });
    }
    Ok(out)
}

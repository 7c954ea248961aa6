//! Offline verification of a log directory: [`verify`], [`verify_with`].
//!
//! Every segment is streamed (memory is a read buffer and the few frames
//! being compared, whatever the segment's size) and every record's hash
//! recomputed. When the chain breaks, the records around the break are
//! tried against the possible explanations — a changed payload, a changed
//! hash, records deleted, a record inserted, two records swapped — and the
//! first that fits is reported with the file, byte offset and sequence
//! number. For a segment's last record the witnesses are what comes after
//! it: the next segment's header and the signed checkpoints. When nothing
//! explains a break, or a frame's length is impossible, reading resumes
//! where the chain does ([`crate::segment::resync`]), so one damaged frame
//! is one problem and the records after it are still checked; a frame whose
//! only damage is its length field is recognised as such.
//!
//! Segment headers are checked against their file names, their signed
//! anchors and the previous segment; a header that disagrees with its own
//! records is reported once and the records are read by what they chain
//! as. Checkpoint signatures are checked against the public key and their
//! hashes against the records; two validly signed checkpoints for one
//! sequence number with different hashes are a forked history. A log that
//! starts after seq 1 must be explained by a signed retention entry. Given
//! the last head published outside the trail ([`VerifyOptions::expect_head`]),
//! a trail that ends before it or differs from it is reported: that is what
//! catches a cut tail, a deleted last segment or an older copy put back.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;

use crate::checkpoint::{CHECKPOINT_LEN, Checkpoint, Purpose, for_each_checkpoint, read_verifying_key, retention_path};
use crate::error::{AuditError, IoContext};
use crate::head::SignedHead;
pub use crate::problem::{Problem, ProblemKind};
use crate::segment::{
    self, FrameScanner, GENESIS, HEADER_LEN, Hash, MAX_RESYNC_SKIP, Scan, SegmentHeader, chain_hash, implied_frame,
    resync,
};

/// How far verification looks for the continuation after deleted records.
const MAX_DELETED_SEARCH: u64 = MAX_RESYNC_SKIP;

/// Bytes of payload hashed while looking for where the chain resumes, per
/// segment: bounds the work a hostile file can cause.
const RESYNC_BUDGET: u64 = 512 << 20;

/// Problems listed per file; the rest are counted in one last line.
const MAX_LISTED: usize = 64;

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
    /// Records after the last checkpoint (`last_seq - signed_through`):
    /// chained but not yet signed, the window a tail cut goes unnoticed in.
    pub unsigned_records: u64,
    /// The sequence number of the expected head, when one was given and matched.
    pub head_seq: Option<u64>,
    /// Everything wrong, in log order.
    pub problems: Vec<Problem>,
    /// Remarks that are not problems (where the key came from, unsigned tail).
    pub notes: Vec<String>,
    /// The most bytes of buffers held at once while reading a segment (read
    /// buffer and frame buffers): bounded by the largest frame, not by the
    /// segment's size.
    #[serde(skip)]
    pub buffer_bytes: usize,
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

/// What [`verify_with`] checks against.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// The public key, and where it came from. `None`: the expected head's
    /// key, else `<dir>/audit.pub` (which only shows the trail agrees with itself).
    pub key: Option<(VerifyingKey, String)>,
    /// The last head published outside the trail, and where it came from
    /// (a file name, a controller URL).
    pub expect_head: Option<(SignedHead, String)>,
}

/// Problems of one file, listed up to [`MAX_LISTED`], then counted.
#[derive(Default)]
struct Problems {
    listed: Vec<Problem>,
    more: BTreeMap<PathBuf, usize>,
    per_file: BTreeMap<PathBuf, usize>,
}

impl Problems {
    fn push(&mut self, p: Problem) {
        let n = self.per_file.entry(p.file.clone()).or_default();
        *n += 1;
        if *n > MAX_LISTED {
            *self.more.entry(p.file).or_default() += 1;
        } else {
            self.listed.push(p);
        }
    }

    fn finish(mut self) -> Vec<Problem> {
        for (file, n) in self.more {
            let kind = self
                .listed
                .iter()
                .rev()
                .find(|p| p.file == file)
                .map_or(ProblemKind::ChainBroken, |p| p.kind);
            self.listed.push(Problem {
                kind,
                file,
                offset: None,
                seq: None,
                detail: format!("... and {n} more problems in this file (the first {MAX_LISTED} are listed)"),
            });
        }
        self.listed
    }
}

/// Where a segment must continue from: the previous one's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expected {
    /// The next sequence number.
    pub seq: u64,
    /// The hash it chains from.
    pub prev: Hash,
    /// Whether the previous segment ended at a signed checkpoint.
    pub closed: bool,
}

/// What [`check_segment`] looks at besides the segment.
pub(crate) struct SegmentInput<'a> {
    /// The segment.
    pub path: &'a Path,
    /// The first sequence number its file name says.
    pub name_first: u64,
    /// The previous segment's end, if known.
    pub expected: Option<Expected>,
    /// The next segment's header, if there is one and it is readable.
    pub next_header: Option<SegmentHeader>,
    /// Whether it is the log's last segment (a torn tail is a crash, not damage).
    pub last_segment: bool,
    /// Whether it is the log's first segment (it must start at 1 or be explained by retention).
    pub first_segment: bool,
    /// Valid retention entries.
    pub retention: &'a [(u64, Checkpoint)],
    /// The public key.
    pub vk: &'a VerifyingKey,
    /// Record the chain hash at this sequence number ([`SegmentCheck::hash_at`]).
    pub want_hash_at: Option<u64>,
}

/// What [`check_segment`] found.
#[derive(Debug, Default)]
pub(crate) struct SegmentCheck {
    /// The header, if readable.
    pub header: Option<SegmentHeader>,
    /// The sequence number its records chain from (normally the header's).
    pub first_seq: u64,
    /// Frames read as records.
    pub records: u64,
    /// Where the next segment must continue from (`None`: unreadable header).
    pub next: Option<Expected>,
    /// Validly signed checkpoints in its checkpoint file, with their offsets, in file order.
    pub checkpoints: Vec<(u64, Checkpoint)>,
    /// All checkpoint entries, valid or not.
    pub total_checkpoints: u64,
    /// The highest sequence number of a valid checkpoint within the records.
    pub signed_through: u64,
    /// Everything wrong with the segment and its checkpoint file.
    pub problems: Vec<Problem>,
    /// The offset of an incomplete last frame (reported as a torn tail).
    pub torn_at: Option<u64>,
    /// The offset of a partial entry at the end of the checkpoint file.
    pub ckpt_torn_at: Option<u64>,
    /// The byte just past the last frame read as a record.
    pub end_offset: u64,
    /// The chain hash at [`SegmentInput::want_hash_at`], if reached.
    pub hash_at: Option<Hash>,
    /// Most buffer bytes held.
    pub buffer_bytes: usize,
}

/// A segment's checkpoints: valid ones by sequence number, distinct hashes.
struct Ckpts {
    by_seq: BTreeMap<u64, Vec<(u64, Hash)>>,
    /// Entries already reported as disagreeing with the records.
    reported: std::collections::BTreeSet<u64>,
}

impl Ckpts {
    /// Whether a valid entry covers `seq` with `hash`.
    fn has(&self, seq: u64, hash: &Hash) -> bool {
        self.by_seq.get(&seq).is_some_and(|v| v.iter().any(|(_, h)| h == hash))
    }

    /// The hashes of valid entries for `seq`.
    fn at(&self, seq: u64) -> impl Iterator<Item = &(u64, Hash)> {
        self.by_seq.get(&seq).into_iter().flatten()
    }
}

/// The frames of a segment with one frame of lookahead.
struct Reader {
    sc: FrameScanner<File>,
    peeked: Option<(Scan, segment::Frame)>,
    spare: segment::Frame,
}

impl Reader {
    fn next(&mut self, into: &mut segment::Frame) -> std::io::Result<Scan> {
        if let Some((scan, f)) = self.peeked.take() {
            self.spare = std::mem::replace(into, f);
            return Ok(scan);
        }
        self.sc.next_into(into)
    }

    fn peek(&mut self) -> std::io::Result<(Scan, &segment::Frame)> {
        if self.peeked.is_none() {
            let mut f = std::mem::take(&mut self.spare);
            let scan = self.sc.next_into(&mut f)?;
            self.peeked = Some((scan, f));
        }
        match &self.peeked {
            Some((scan, f)) => Ok((*scan, f)),
            None => Ok((Scan::End, &self.spare)),
        }
    }

    fn seek(&mut self, offset: u64) -> std::io::Result<()> {
        if let Some((_, f)) = self.peeked.take() {
            self.spare = f;
        }
        self.sc.seek(offset)
    }

    fn buffer_bytes(&self) -> usize {
        self.sc.buffer_bytes()
            + self.spare.payload.capacity()
            + self.peeked.as_ref().map_or(0, |(_, f)| f.payload.capacity())
    }
}

/// Where the bytes stop reading as the chain: the offset, the record
/// expected there, and the hash it should chain from.
struct Break {
    start: u64,
    seq: u64,
    prev: Hash,
}

/// What to do after a damaged stretch.
enum After {
    /// Go on reading at `offset`, seq `seq`, chaining from `prev`.
    Resume { offset: u64, seq: u64, prev: Hash },
    /// Nothing more can be read from this segment.
    Stop,
}

/// The state of checking one segment.
struct Check<'a, 'f> {
    inp: &'a SegmentInput<'a>,
    out: SegmentCheck,
    probs: Problems,
    ck: Ckpts,
    ckpt_path: PathBuf,
    /// The segment, for positioned reads beside the stream.
    file: File,
    on_record: &'f mut dyn FnMut(u64, &segment::Frame) -> Result<(), AuditError>,
    budget: u64,
    resync_bytes: usize,
}

impl Check<'_, '_> {
    fn prob(&mut self, kind: ProblemKind, offset: Option<u64>, seq: Option<u64>, detail: String) {
        self.probs.push(Problem {
            kind,
            file: self.inp.path.into(),
            offset,
            seq,
            detail,
        });
    }

    /// A damaged frame (as opposed to a header or checkpoint problem).
    fn damage(&mut self, kind: ProblemKind, offset: u64, seq: u64, detail: String) {
        self.prob(kind, Some(offset), Some(seq), detail);
    }

    /// The record `seq` has chain hash `hash`: compare it with the checkpoints.
    fn accept(&mut self, seq: u64, hash: &Hash) {
        if self.inp.want_hash_at == Some(seq) {
            self.out.hash_at = Some(*hash);
        }
        let bad: Vec<u64> = self.ck.at(seq).filter(|(_, h)| h != hash).map(|(o, _)| *o).collect();
        if !bad.is_empty() && self.ck.reported.insert(seq) {
            for off in bad {
                self.probs.push(Problem {
                    kind: ProblemKind::CheckpointMismatch,
                    file: self.ckpt_path.clone(),
                    offset: Some(off),
                    seq: Some(seq),
                    detail: "a validly signed checkpoint disagrees with the record's hash: records were rewritten"
                        .into(),
                });
            }
        }
    }

    /// A chained record.
    fn record(&mut self, seq: u64, f: &segment::Frame) -> Result<(), AuditError> {
        self.accept(seq, &f.hash);
        self.out.end_offset = f.offset + f.len();
        (self.on_record)(seq, f)
    }

    /// Whether a frame after `start` chains again (then what follows `start`
    /// is misread damage, not the segment's end).
    fn resumes_after(&mut self, start: u64, seq: u64) -> Result<bool, AuditError> {
        let path = self.inp.path;
        let file = &self.file;
        let file_len = file.metadata().at(path)?.len();
        let mut budget = self.budget;
        Ok(resync(file, file_len, start + 1, seq, &mut budget).at(path)?.is_some())
    }

    /// The bytes from `start` do not read as the next record `seq` (after
    /// `prev`): find where the chain resumes and report the stretch once.
    /// `torn`: the stream ended inside a frame at `start`. The second value
    /// is whether a record was recovered at `start` (its length field was
    /// the only damage).
    fn damaged(&mut self, at: Break, what: &str, kind: ProblemKind, torn: bool) -> Result<(After, bool), AuditError> {
        let (start, seq, prev) = (at.start, at.seq, &at.prev);
        let path = self.inp.path;
        // A second handle: the checks below report through `self`.
        let file = self.file.try_clone().at(path)?;
        let file = &file;
        let file_len = file.metadata().at(path)?.len();
        self.resync_bytes = self.resync_bytes.max(64 << 10);
        let found = resync(file, file_len, start + 1, seq, &mut self.budget).at(path)?;
        if let Some(r) = found {
            if r.seq == seq + 1
                && let Some(f) = implied_frame(file, start, r.offset).at(path)?
                && f.chains(prev, seq)
            {
                self.resync_bytes = self.resync_bytes.max(f.payload.len());
                self.damage(
                    ProblemKind::BadFrame,
                    start,
                    seq,
                    format!(
                        "the frame's length field was altered ({what}); the record itself is intact ({} bytes)",
                        f.payload.len()
                    ),
                );
                self.accept(seq, &f.hash);
                return Ok((
                    After::Resume {
                        offset: r.offset,
                        seq: r.seq,
                        prev: r.prev,
                    },
                    true,
                ));
            }
            if r.seq == seq && r.prev == *prev {
                self.damage(
                    ProblemKind::Inserted,
                    start,
                    seq,
                    format!(
                        "{} bytes that are not part of the chain were inserted before seq {seq} ({what})",
                        r.offset - start
                    ),
                );
            } else {
                let lost = if r.seq > seq {
                    format!("seq {seq}..={} could not be read", r.seq - 1)
                } else {
                    "the chain does not link across them".to_string()
                };
                self.damage(
                    kind,
                    start,
                    seq,
                    format!(
                        "{what}: bytes {start}..{} are damaged, {lost}; reading resumes at byte {} (seq {})",
                        r.offset, r.offset, r.seq
                    ),
                );
            }
            return Ok((
                After::Resume {
                    offset: r.offset,
                    seq: r.seq,
                    prev: r.prev,
                },
                false,
            ));
        }
        if self.budget == 0 {
            self.damage(
                kind,
                start,
                seq,
                format!("{what}: gave up looking for where the chain resumes (too many candidates); the rest of the segment is not checked"),
            );
            return Ok((After::Stop, false));
        }
        if let Some(f) = implied_frame(file, start, file_len).at(path)?
            && f.chains(prev, seq)
        {
            self.damage(
                ProblemKind::BadFrame,
                start,
                seq,
                format!(
                    "the frame's length field was altered ({what}); the record itself is intact ({} bytes) and is the segment's last",
                    f.payload.len()
                ),
            );
            self.accept(seq, &f.hash);
            self.out.end_offset = file_len;
            return Ok((
                After::Resume {
                    offset: file_len,
                    seq: seq + 1,
                    prev: f.hash,
                },
                true,
            ));
        }
        if torn && self.inp.last_segment {
            self.out.torn_at = Some(start);
            self.prob(
                ProblemKind::TornTail,
                Some(start),
                Some(seq),
                format!(
                    "the log ends inside a record ({} bytes of an incomplete frame): a crash while appending; opening the log sets it aside",
                    file_len - start
                ),
            );
        } else if torn {
            self.damage(
                ProblemKind::BadFrame,
                start,
                seq,
                format!("sealed segment ends inside a record ({} bytes)", file_len - start),
            );
        } else {
            self.damage(
                kind,
                start,
                seq,
                format!("{what}: the rest of the segment (bytes {start}..{file_len}, from seq {seq}) is unreadable"),
            );
        }
        Ok((After::Stop, false))
    }
}

/// Read a checkpoint file: valid entries (by `vk`) in file order, each
/// (seq, hash) once, bad signatures reported, a partial last entry reported
/// as a torn tail (`may_be_torn`) or damage, and the number of entries
/// (an exact copy of a valid entry is counted once);
/// `None` when missing.
fn read_ckpts(
    path: &Path,
    purpose: Purpose,
    vk: &VerifyingKey,
    probs: &mut Problems,
    may_be_torn: bool,
) -> Result<Option<CkptFile>, AuditError> {
    if !path.exists() {
        return Ok(None);
    }
    let mut valid = Vec::new();
    // Copies of a valid entry add nothing (and must not add memory).
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let torn = for_each_checkpoint(path, |offset, c| {
        total += 1;
        if seen.contains(&c.emit()) {
            return;
        }
        if c.verify(vk, purpose) {
            seen.insert(c.emit());
            valid.push((offset, c));
        } else {
            probs.push(Problem {
                kind: ProblemKind::BadSignature,
                file: path.into(),
                offset: Some(offset),
                seq: Some(c.seq),
                detail: "the signature does not verify: checkpoint altered or signed by another key".into(),
            });
        }
    })?;
    let mut torn_at = None;
    if torn > 0 {
        let offset = total * CHECKPOINT_LEN as u64;
        torn_at = Some(offset);
        probs.push(Problem {
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
    Ok(Some(CkptFile { valid, total, torn_at }))
}

/// What [`read_ckpts`] found in a checkpoint file.
struct CkptFile {
    /// Valid entries with their offsets, in file order.
    valid: Vec<(u64, Checkpoint)>,
    /// All entries.
    total: u64,
    /// The offset of a partial last entry.
    torn_at: Option<u64>,
}

/// Check one segment and its checkpoint file; `on_record` gets each record
/// that chains (with its sequence number), in order, damaged ones left out.
pub(crate) fn check_segment(
    inp: &SegmentInput<'_>,
    on_record: &mut dyn FnMut(u64, &segment::Frame) -> Result<(), AuditError>,
) -> Result<SegmentCheck, AuditError> {
    let path = inp.path;
    let ckpt_path = segment::sidecar(path, "ckpt");
    let (header, sc) = match FrameScanner::open(path) {
        Ok(x) => x,
        Err(AuditError::Format { .. }) => {
            return Ok(SegmentCheck {
                problems: vec![Problem {
                    kind: ProblemKind::BadHeader,
                    file: path.into(),
                    offset: Some(0),
                    seq: None,
                    detail: "unreadable segment header".into(),
                }],
                ..SegmentCheck::default()
            });
        }
        Err(e) => return Err(e),
    };
    let mut c = Check {
        inp,
        out: SegmentCheck {
            header: Some(header),
            ..SegmentCheck::default()
        },
        probs: Problems::default(),
        ck: Ckpts {
            by_seq: BTreeMap::new(),
            reported: Default::default(),
        },
        ckpt_path: ckpt_path.clone(),
        file: sc.file().try_clone().at(path)?,
        on_record,
        budget: RESYNC_BUDGET,
        resync_bytes: 0,
    };
    let mut rd = Reader {
        sc,
        peeked: None,
        spare: segment::Frame::default(),
    };

    // Checkpoints: valid ones by seq; two different hashes for one seq are a fork.
    let ckpts = read_ckpts(&ckpt_path, Purpose::Checkpoint, inp.vk, &mut c.probs, inp.last_segment)?;
    match &ckpts {
        Some(CkptFile { valid, total, torn_at }) => {
            c.out.total_checkpoints = *total;
            c.out.ckpt_torn_at = *torn_at;
            for (off, ck) in valid {
                let list = c.ck.by_seq.entry(ck.seq).or_default();
                if list.iter().any(|(_, h)| *h == ck.hash) {
                    continue;
                }
                list.push((*off, ck.hash));
                if list.len() == 2 {
                    let first = list[0].0;
                    c.probs.push(Problem {
                        kind: ProblemKind::ConflictingCheckpoints,
                        file: ckpt_path.clone(),
                        offset: Some(*off),
                        seq: Some(ck.seq),
                        detail: format!(
                            "two validly signed checkpoints for seq {} disagree (bytes {first} and {off}): a forked history, records rewritten and re-signed",
                            ck.seq
                        ),
                    });
                }
            }
            c.out.checkpoints = valid.clone();
        }
        None => c.prob(
            ProblemKind::MissingCheckpoints,
            None,
            None,
            format!("{} is missing", ckpt_path.display()),
        ),
    }

    // Where the records chain from: the header's word, unless its records
    // say otherwise (then the header is reported once, not every record).
    let anchor_of = |seq: u64| -> Vec<Hash> { c.ck.at(seq.wrapping_sub(1)).map(|(_, h)| *h).collect() };
    let mut candidates = vec![(header.first_seq, header.prev_hash), (inp.name_first, header.prev_hash)];
    if let Some(e) = inp.expected {
        candidates.push((e.seq, e.prev));
        candidates.push((e.seq, header.prev_hash));
    }
    for seq in [inp.name_first, header.first_seq] {
        for h in anchor_of(seq) {
            candidates.push((seq, h));
        }
    }
    let (first_seq, first_prev) = match rd.peek().at(path)? {
        (Scan::Frame { .. }, f) => candidates
            .iter()
            .copied()
            .find(|(s, p)| *s >= 1 && f.chains(p, *s))
            .unwrap_or((header.first_seq, header.prev_hash)),
        _ => (header.first_seq, header.prev_hash),
    };
    let mut said = Vec::new();
    if first_seq != header.first_seq {
        said.push(format!(
            "the header says first seq {} but its records chain as seq {first_seq}",
            header.first_seq
        ));
    } else if header.first_seq != inp.name_first {
        said.push(format!(
            "the header says first seq {} but the file name says {}",
            header.first_seq, inp.name_first
        ));
    }
    if first_prev != header.prev_hash {
        said.push("the header's previous hash was altered (its records chain from another)".into());
    }
    if header.first_seq == 0 && first_seq == 0 {
        said.push("first seq 0 (sequence numbers start at 1)".into());
    }
    if !said.is_empty() {
        c.prob(ProblemKind::BadHeader, Some(0), Some(first_seq), said.join("; "));
    }
    let first_seq = first_seq.max(1);
    c.out.first_seq = first_seq;
    c.out.end_offset = HEADER_LEN as u64;
    let anchor_seq = first_seq - 1;
    if inp.want_hash_at == Some(anchor_seq) {
        c.out.hash_at = Some(first_prev);
    }
    if ckpts.is_some() {
        let anchors: Vec<(u64, Hash)> = c.ck.at(anchor_seq).copied().collect();
        if anchors.is_empty() {
            c.prob(
                ProblemKind::MissingCheckpoints,
                Some(0),
                Some(first_seq),
                "no validly signed anchor for the segment header".into(),
            );
        } else if !anchors.iter().any(|(_, h)| *h == first_prev) {
            c.probs.push(Problem {
                kind: ProblemKind::CheckpointMismatch,
                file: ckpt_path.clone(),
                offset: Some(anchors[0].0),
                seq: Some(anchor_seq),
                detail: "the segment header's previous hash differs from its signed anchor".into(),
            });
            c.ck.reported.insert(anchor_seq);
        }
    }
    match inp.expected {
        None if inp.first_segment => {
            if first_seq == 1 {
                if first_prev != GENESIS {
                    c.prob(
                        ProblemKind::BadHeader,
                        Some(0),
                        Some(1),
                        "the log's first segment must chain from the zero hash".into(),
                    );
                }
            } else {
                let explained = inp
                    .retention
                    .iter()
                    .any(|(_, r)| r.seq > anchor_seq || (r.seq == anchor_seq && r.hash == first_prev));
                if !explained {
                    c.prob(
                        ProblemKind::UnexplainedStart,
                        Some(0),
                        Some(first_seq),
                        format!(
                            "the log starts at seq {first_seq} but no signed retention entry covers seq 1..={anchor_seq}: segments deleted?"
                        ),
                    );
                }
            }
        }
        None => {}
        Some(e) => {
            if first_seq > e.seq {
                let (kind, what) = if e.closed {
                    (ProblemKind::MissingSegment, "a segment is missing")
                } else {
                    (ProblemKind::MissingRecords, "records are missing")
                };
                c.prob(
                    kind,
                    Some(0),
                    Some(e.seq),
                    format!("{what}: seq {}..={} are not in the log", e.seq, first_seq - 1),
                );
            } else if first_seq < e.seq {
                c.prob(
                    ProblemKind::Overlap,
                    Some(0),
                    Some(first_seq),
                    format!(
                        "starts at seq {first_seq} but the previous segment ends at {}",
                        e.seq - 1
                    ),
                );
            } else if first_prev != e.prev {
                c.prob(
                    ProblemKind::ChainBroken,
                    Some(0),
                    Some(first_seq),
                    "the header's previous hash does not match the previous segment's last record".into(),
                );
            }
        }
    }

    // The records.
    let (mut prev, mut s) = (first_prev, first_seq);
    let mut cur = segment::Frame::default();
    let mut last = segment::Frame::default();
    loop {
        let scan = rd.next(&mut cur).at(path)?;
        let after = match scan {
            Scan::End => break,
            Scan::Torn { offset, .. } => c.damaged(
                Break {
                    start: offset,
                    seq: s,
                    prev,
                },
                "a frame runs past the end of the file",
                ProblemKind::BadFrame,
                true,
            )?,
            Scan::BadLength { offset, len } => c.damaged(
                Break {
                    start: offset,
                    seq: s,
                    prev,
                },
                &format!("impossible frame length {len}"),
                ProblemKind::BadFrame,
                false,
            )?,
            Scan::Frame { .. } => {
                c.out.records += 1;
                if cur.chains(&prev, s) {
                    c.record(s, &cur)?;
                    (prev, s) = (cur.hash, s + 1);
                    std::mem::swap(&mut last, &mut cur);
                    continue;
                }
                let at = cur.offset;
                let (next_scan, g) = rd.peek().at(path)?;
                match next_scan {
                    Scan::Frame { .. } => {
                        if g.chains(&prev, s) {
                            if cur.chains(&g.hash, s + 1) {
                                let (g_off, g_hash) = (g.offset, g.hash);
                                c.damage(
                                    ProblemKind::Reordered,
                                    at,
                                    s,
                                    format!("records seq {s} and {} are swapped (bytes {g_off} and {at})", s + 1),
                                );
                                c.accept(s, &g_hash);
                                c.accept(s + 1, &cur.hash);
                                let mut skip = segment::Frame::default();
                                rd.next(&mut skip).at(path)?;
                                c.out.records += 1;
                                (prev, s) = (cur.hash, s + 2);
                            } else {
                                let copy = last.payload == cur.payload && last.hash == cur.hash;
                                let what = if copy { " (a copy of the record before it)" } else { "" };
                                c.damage(
                                    ProblemKind::Inserted,
                                    at,
                                    s,
                                    format!("a record that is not in the chain was inserted before seq {s}{what}"),
                                );
                                c.out.records -= 1;
                            }
                            continue;
                        }
                        let recomputed = chain_hash(&prev, s, &cur.payload);
                        if g.chains(&recomputed, s + 1) {
                            c.damage(
                                ProblemKind::HashModified,
                                at,
                                s,
                                "the record's stored hash was altered".into(),
                            );
                            c.accept(s, &recomputed);
                            (prev, s) = (recomputed, s + 1);
                            continue;
                        }
                        if g.chains(&cur.hash, s + 1) {
                            c.damage(ProblemKind::Modified, at, s, "the record's content was altered".into());
                            c.accept(s, &cur.hash);
                            (prev, s) = (cur.hash, s + 1);
                            continue;
                        }
                        if let Some(k) = (1..=MAX_DELETED_SEARCH).find(|k| g.chains(&cur.hash, s + k + 1)) {
                            c.damage(
                                ProblemKind::Deleted,
                                at,
                                s,
                                format!("{k} record(s) deleted here: seq {s}..={}", s + k - 1),
                            );
                            c.accept(s + k, &cur.hash);
                            (prev, s) = (cur.hash, s + k + 1);
                            continue;
                        }
                    }
                    Scan::End | Scan::Torn { .. } if next_scan == Scan::End || !c.resumes_after(at, s)? => {
                        // The segment's last whole record: what comes after it
                        // (the next header, signed checkpoints) says what it should be.
                        let recomputed = chain_hash(&prev, s, &cur.payload);
                        let mut witnesses: Vec<(u64, Hash)> =
                            c.ck.by_seq
                                .range(s..)
                                .flat_map(|(seq, v)| v.iter().map(move |(_, h)| (*seq, *h)))
                                .collect();
                        if next_scan == Scan::End
                            && let Some(h) = inp.next_header
                            && h.first_seq >= 1
                        {
                            witnesses.push((h.first_seq - 1, h.prev_hash));
                        }
                        let same = witnesses
                            .iter()
                            .filter(|(w, h)| *h == cur.hash && *w >= s)
                            .map(|(w, _)| *w)
                            .min();
                        if witnesses.iter().any(|(w, h)| *w == s && *h == recomputed) {
                            c.damage(
                                ProblemKind::HashModified,
                                at,
                                s,
                                "the record's stored hash was altered".into(),
                            );
                            c.accept(s, &recomputed);
                            (prev, s) = (recomputed, s + 1);
                        } else if let Some(w) = same {
                            if w == s {
                                c.damage(ProblemKind::Modified, at, s, "the record's content was altered".into());
                            } else {
                                c.damage(
                                    ProblemKind::Deleted,
                                    at,
                                    s,
                                    format!("{} record(s) deleted here: seq {s}..={}", w - s, w - 1),
                                );
                            }
                            c.accept(w, &cur.hash);
                            (prev, s) = (cur.hash, w + 1);
                        } else {
                            c.damage(
                                ProblemKind::ChainBroken,
                                at,
                                s,
                                "the record does not match the chain, and nothing after it (a later record, the next segment's header, a signed checkpoint) tells whether it was altered or records before it were deleted".into(),
                            );
                            c.accept(s, &cur.hash);
                            (prev, s) = (cur.hash, s + 1);
                        }
                        c.out.end_offset = cur.offset + cur.len();
                        continue;
                    }
                    Scan::End | Scan::Torn { .. } | Scan::BadLength { .. } => {}
                }
                // Nothing explains it: the framing itself may be lost.
                let (after, recovered) = c.damaged(
                    Break {
                        start: at,
                        seq: s,
                        prev,
                    },
                    "the record does not match the chain and no single edit explains it",
                    ProblemKind::ChainBroken,
                    false,
                )?;
                if !recovered {
                    c.out.records -= 1;
                }
                match after {
                    After::Resume { offset, seq, prev: p } => {
                        rd.seek(offset).at(path)?;
                        (prev, s) = (p, seq);
                    }
                    After::Stop => break,
                }
                continue;
            }
        };
        // After a damaged stretch found by the scanner (torn, bad length).
        match after {
            (After::Resume { offset, seq, prev: p }, recovered) => {
                if recovered {
                    c.out.records += 1;
                }
                rd.seek(offset).at(path)?;
                (prev, s) = (p, seq);
            }
            (After::Stop, _) => break,
        }
    }

    let last_seq = s - 1;
    let mut beyond = Vec::new();
    for (off, ck) in &c.out.checkpoints {
        if ck.seq > last_seq {
            beyond.push((*off, ck.seq));
        } else {
            c.out.signed_through = c.out.signed_through.max(ck.seq);
        }
    }
    for (off, seq) in beyond {
        c.probs.push(Problem {
            kind: ProblemKind::MissingRecords,
            file: ckpt_path.clone(),
            offset: Some(off),
            seq: Some(seq),
            detail: format!(
                "a signed checkpoint covers seq {seq} but the segment ends at seq {last_seq}: records were removed from its end"
            ),
        });
    }
    let closed = c.ck.has(last_seq, &prev);
    c.out.next = Some(Expected { seq: s, prev, closed });
    c.out.buffer_bytes = rd.buffer_bytes() + cur.payload.capacity() + last.payload.capacity() + c.resync_bytes;
    c.out.problems = c.probs.finish();
    Ok(c.out)
}

/// Verify the log in `dir` with the public key at `public_key` (default:
/// `<dir>/audit.pub`, which only shows the log agrees with itself).
pub fn verify(dir: &Path, public_key: Option<&Path>) -> Result<VerifyReport, AuditError> {
    let key = match public_key {
        Some(p) => Some((read_verifying_key(p)?, p.display().to_string())),
        None => None,
    };
    verify_with(dir, &VerifyOptions { key, expect_head: None })
}

/// Verify the log in `dir` as [`VerifyOptions`] says.
pub fn verify_with(dir: &Path, opts: &VerifyOptions) -> Result<VerifyReport, AuditError> {
    let mut report = VerifyReport::default();
    let segs = segment::list_segments(dir)?;
    if segs.is_empty() {
        return Err(AuditError::format(dir, "no audit segments (seg-*.log) here"));
    }
    let mut probs = Problems::default();
    let pub_path = dir.join("audit.pub");
    let (vk, key_source) = match (&opts.key, &opts.expect_head) {
        (Some((k, src)), _) => (*k, src.clone()),
        (None, Some((head, src))) => match head.verifying_key() {
            Some(k) => {
                report.notes.push(format!("public key taken from the head {src}"));
                (k, src.clone())
            }
            None => {
                return Err(AuditError::Key {
                    path: src.into(),
                    reason: "the head's public key is not a valid ed25519 key".into(),
                });
            }
        },
        (None, None) => {
            report.notes.push(format!(
                "public key read from {}: pass --key with a copy kept elsewhere (or --expect-head) to detect a rewrite by someone holding the log's key",
                pub_path.display()
            ));
            (read_verifying_key(&pub_path)?, pub_path.display().to_string())
        }
    };
    // The head: signed by the key verified with, or it is worthless.
    let mut head = None;
    if let Some((h, src)) = &opts.expect_head {
        if h.public_key != vk.to_bytes() {
            probs.push(Problem {
                kind: ProblemKind::BadSignature,
                file: src.into(),
                offset: None,
                seq: Some(h.seq),
                detail: format!("the head was signed by another key than {key_source}: not this trail's head"),
            });
        } else if !h.checkpoint().verify(&vk, Purpose::Checkpoint) {
            probs.push(Problem {
                kind: ProblemKind::BadSignature,
                file: src.into(),
                offset: None,
                seq: Some(h.seq),
                detail: "the head's signature does not verify: altered".into(),
            });
        } else {
            head = Some((*h, src.clone()));
        }
    }
    let retention = read_ckpts(&retention_path(dir), Purpose::Retention, &vk, &mut probs, false)?
        .map_or_else(Vec::new, |f| f.valid);
    let mut headers: Vec<Option<SegmentHeader>> = Vec::with_capacity(segs.len());
    for (_, p) in &segs {
        let mut b = [0u8; HEADER_LEN];
        let h = File::open(p)
            .and_then(|mut f| segment::read_full(&mut f, &mut b))
            .ok()
            .and_then(|n| SegmentHeader::parse(&b[..n]));
        headers.push(h);
    }
    let (mut total_ckpts, mut valid_ckpts) = (0u64, 0u64);
    let mut expected: Option<Expected> = None;
    let mut hash_at = None;
    let mut first_seq = None;
    for (i, (name_first, path)) in segs.iter().enumerate() {
        let inp = SegmentInput {
            path,
            name_first: *name_first,
            expected,
            next_header: headers.get(i + 1).copied().flatten(),
            last_segment: i + 1 == segs.len(),
            first_segment: i == 0,
            retention: &retention,
            vk: &vk,
            want_hash_at: head.as_ref().map(|(h, _)| h.seq),
        };
        let check = check_segment(&inp, &mut |_, _| Ok(()))?;
        report.segments += 1;
        report.records += check.records;
        total_ckpts += check.total_checkpoints;
        valid_ckpts += check.checkpoints.len() as u64;
        report.signed_through = report.signed_through.max(check.signed_through);
        report.buffer_bytes = report.buffer_bytes.max(check.buffer_bytes);
        if check.hash_at.is_some() {
            hash_at = check.hash_at;
        }
        for p in check.problems {
            probs.push(p);
        }
        expected = check.next;
        if let Some(next) = check.next {
            first_seq.get_or_insert(check.first_seq);
            report.last_seq = next.seq - 1;
        }
    }
    report.first_seq = first_seq.unwrap_or(0);
    report.checkpoints = valid_ckpts;
    report.unsigned_records = report.last_seq.saturating_sub(report.signed_through);
    let mut problems = probs.finish();
    if total_ckpts > 0 && valid_ckpts == 0 {
        problems.insert(
            0,
            Problem {
                kind: ProblemKind::BadSignature,
                file: key_source.clone().into(),
                offset: None,
                seq: None,
                detail: format!("none of {total_ckpts} checkpoints verifies with this public key: wrong key?"),
            },
        );
    }
    if let Some((h, src)) = head {
        if h.seq > report.last_seq {
            problems.push(Problem {
                kind: ProblemKind::BehindHead,
                file: src.clone().into(),
                offset: None,
                seq: Some(h.seq),
                detail: format!(
                    "the trail ends at seq {} but the head published at {src} is seq {}: records {}..={} were cut, the last segment deleted, or an older copy of the trail restored",
                    report.last_seq,
                    h.seq,
                    report.last_seq + 1,
                    h.seq
                ),
            });
        } else if h.seq + 1 < report.first_seq {
            report.notes.push(format!(
                "the head {src} (seq {}) is older than the first record kept (seq {}): not checked",
                h.seq, report.first_seq
            ));
        } else if hash_at == Some(h.hash) {
            report.head_seq = Some(h.seq);
            report.notes.push(format!(
                "the trail contains the head published at {src} (seq {})",
                h.seq
            ));
        } else {
            problems.push(Problem {
                kind: ProblemKind::HeadMismatch,
                file: src.clone().into(),
                offset: None,
                seq: Some(h.seq),
                detail: match hash_at {
                    Some(_) => format!(
                        "record {} differs from the head published at {src}: the history up to it was rewritten (or forked) after the head was published",
                        h.seq
                    ),
                    None => format!("record {} could not be read to compare with the head published at {src}", h.seq),
                },
            });
        }
    }
    if report.unsigned_records > 0 {
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
        if name.contains(".ckpt.orphan") {
            report.notes.push(format!(
                "{} holds the checkpoints of a segment that is not there (deleted?); the writer kept them aside",
                p.display()
            ));
        }
    }
    report.problems = problems;
    Ok(report)
}

/// What a place that collects heads (a controller) holds for one trail:
/// the public key it pinned for it, the newest head it accepted, and the
/// heads it refused as a rollback (a lower seq than one it had) or a fork
/// (the same seq, another hash), kept as evidence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishedHeads {
    /// Where they come from, for messages (`http://ctl:8443 host hv1`).
    pub source: String,
    /// The pinned public key.
    pub public_key: [u8; 32],
    /// The newest head accepted, if any.
    pub head: Option<SignedHead>,
    /// Heads refused as a rollback or fork.
    pub conflicts: Vec<RefusedHead>,
}

/// A head the publisher refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedHead {
    /// The head.
    pub head: SignedHead,
    /// A fork (the same seq as a head held, another hash), else a rollback
    /// (behind the head held).
    pub fork: bool,
    /// The reason the publisher gave.
    pub reason: String,
}

/// Verify the trail in `dir` against heads published elsewhere: with the
/// pinned key (any signature by another key is `BadSignature`), against the
/// newest head (`BehindHead` names the records missing, `HeadMismatch` a
/// rewrite), and failing for each conflict the publisher kept: a refused
/// head with a lower seq than one published before is `BehindHead` (the
/// trail was rolled back at some point), one with the same seq and another
/// hash `ConflictingCheckpoints` (two histories were signed).
pub fn verify_published(dir: &Path, published: &PublishedHeads) -> Result<VerifyReport, AuditError> {
    let key = VerifyingKey::from_bytes(&published.public_key).map_err(|_| AuditError::Key {
        path: published.source.clone().into(),
        reason: "the published public key is not a valid ed25519 key".into(),
    })?;
    let opts = VerifyOptions {
        key: Some((key, format!("the key pinned at {}", published.source))),
        expect_head: published.head.map(|h| (h, published.source.clone())),
    };
    let mut report = verify_with(dir, &opts)?;
    if published.head.is_none() {
        report.notes.push(format!(
            "{} holds no head for this trail yet: only the key is pinned",
            published.source
        ));
    }
    for r in &published.conflicts {
        let (c, reason) = (&r.head, &r.reason);
        let signed = c.public_key == published.public_key && c.verify();
        let kind = if r.fork {
            ProblemKind::ConflictingCheckpoints
        } else {
            ProblemKind::BehindHead
        };
        report.problems.push(Problem {
            kind,
            file: published.source.clone().into(),
            offset: None,
            seq: Some(c.seq),
            detail: format!(
                "{} refused a head of this trail (seq {}, hash {}{}): {}; the trail was rolled back or forked after publishing",
                published.source,
                c.seq,
                crate::checkpoint::to_hex(&c.hash),
                if signed { "" } else { ", not signed by the pinned key" },
                reason
            ),
        });
    }
    Ok(report)
}

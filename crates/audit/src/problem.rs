//! What verification finds wrong with a trail: [`Problem`], of a [`ProblemKind`].
//!
//! Its own module because both [`mod@crate::verify`], which finds problems,
//! and [`crate::AuditError::Integrity`], which refuses to answer from a
//! trail that has them, carry them.

use std::fmt;
use std::path::PathBuf;

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
    /// A record (or bytes) that is not part of the chain was inserted.
    Inserted,
    /// Two records were swapped.
    Reordered,
    /// The chain breaks and no simple explanation fits.
    ChainBroken,
    /// A frame's length is impossible or altered, or a sealed segment ends mid-record.
    BadFrame,
    /// A segment header is unreadable or inconsistent.
    BadHeader,
    /// The log ends inside a record (a crash while appending; `open` sets it aside).
    TornTail,
    /// A whole segment is missing between two others.
    MissingSegment,
    /// Records are missing at the end of a segment.
    MissingRecords,
    /// A checkpoint, retention or head signature does not verify.
    BadSignature,
    /// A validly signed checkpoint disagrees with the records.
    CheckpointMismatch,
    /// Two validly signed checkpoints for one sequence number disagree: a forked history.
    ConflictingCheckpoints,
    /// A segment has no checkpoint file or no valid anchor.
    MissingCheckpoints,
    /// The log starts after seq 1 without a signed retention entry.
    UnexplainedStart,
    /// A segment overlaps the previous one.
    Overlap,
    /// The trail ends before the head published outside it.
    BehindHead,
    /// The trail's record at the published head's sequence number differs from it.
    HeadMismatch,
    /// A sealed segment's bytes differ from those its signed index covers.
    SegmentChanged,
}

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// What.
    pub kind: ProblemKind,
    /// The file (segment, checkpoint file, or the head's source).
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

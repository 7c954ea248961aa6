//! The store's typed errors.
//!
//! Everything that reads files the store did not just write (segments,
//! sidecars, keys, the index) can meet damage or tampering; those paths
//! return one of these errors, naming the file, rather than panicking.

use std::io;
use std::path::PathBuf;

/// An error of the audit store.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// An I/O operation on a file of the log failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A key file is missing, malformed or does not match its partner.
    #[error("key {path}: {reason}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A segment is damaged somewhere other than its tail, so the log cannot
    /// be appended to safely; `palisade audit verify` gives the full picture.
    #[error("{path}: corrupt at byte {offset} (seq {seq}): {reason}")]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Byte offset in the segment.
        offset: u64,
        /// The sequence number expected there.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// A file does not have the expected format.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A record could not be encoded or decoded as JSON.
    #[error("record at seq {seq}: {source}")]
    Json {
        /// Its sequence number (0 while encoding).
        seq: u64,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A record is larger than a frame may hold.
    #[error("record of {0} bytes exceeds the frame limit")]
    TooLarge(usize),
    /// The trail fails a check a query or open relies on: the answer could
    /// be incomplete or wrong, so none is given. `palisade audit verify`
    /// gives the full picture.
    #[error("the audit trail fails verification: {}{}; run `palisade audit verify`", problems.first().map_or_else(String::new, ToString::to_string), if problems.len() > 1 { format!(" (and {} more)", problems.len() - 1) } else { String::new() })]
    Integrity {
        /// What is wrong.
        problems: Vec<crate::problem::Problem>,
    },
    /// The trail does not contain the head last published outside it: it
    /// was cut, rolled back or rewritten, and extending it would overwrite
    /// the evidence with new heads.
    #[error("{publisher}: {reason}")]
    BehindHead {
        /// Where the head was published.
        publisher: String,
        /// What disagrees.
        reason: String,
    },
    /// An earlier append failed part-way; the in-memory state may be ahead of
    /// the files, so the log must be reopened (which recovers the tail).
    #[error("an earlier write failed; reopen the log")]
    Poisoned,
}

impl AuditError {
    /// An [`AuditError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> AuditError {
        AuditError::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`AuditError::Format`] for `path`.
    pub fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> AuditError {
        AuditError::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Attach a path to an `io::Result`.
pub(crate) trait IoContext<T> {
    /// Map the error to [`AuditError::Io`] naming `path`.
    fn at(self, path: &std::path::Path) -> Result<T, AuditError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T, AuditError> {
        self.map_err(|e| AuditError::io(path, e))
    }
}

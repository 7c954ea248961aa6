//! The controller's own audit log: the change records it makes and the flow
//! records its agents push, in one tamper-evident [`AuditLog`].
//!
//! The store stays the source of truth for changes (a change and its record
//! commit in one transaction); the trail gets a copy after the commit, so a
//! failing disk can never undo a committed change. Such a failure is printed
//! on stderr and counted ([`TrailStatus::append_failures`], served by
//! `GET /v1/status`), because a trail with holes has to be noticed.
//!
//! One process owns a trail directory: [`Trail::open`] takes an exclusive
//! lock on `<dir>/controller.lock`, since two writers appending to one hash
//! chain would break it. With etcd, each controller keeps its own trail of
//! the changes it made and the flows pushed to it.

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use palisade_audit::record::{ChangeRecord, Record};
use palisade_audit::{AuditConfig, AuditError, AuditLog, Query};
use serde::{Deserialize, Serialize};

/// Opening a trail failed.
#[derive(Debug, thiserror::Error)]
pub enum TrailError {
    /// Another process holds the trail's lock.
    #[error("audit log {0} is in use by another process")]
    Locked(PathBuf),
    /// The lock file could not be created.
    #[error("cannot create {path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The audit log did not open.
    #[error(transparent)]
    Audit(#[from] AuditError),
}

/// What a trail reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrailStatus {
    /// The log directory.
    pub dir: PathBuf,
    /// The last record's sequence number.
    pub last_seq: u64,
    /// Change records that could not be appended since the start.
    pub append_failures: u64,
    /// The last such failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A controller's audit log.
#[derive(Debug)]
pub struct Trail {
    log: Mutex<AuditLog>,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
    // Held for the life of the trail: the OS releases the lock when it closes.
    _lock: File,
}

impl Trail {
    /// Open (creating) the log in `dir` for this process alone, its signing
    /// key beside it (`<dir>.key`, see [`AuditConfig::key_file`]).
    pub fn open(dir: &Path) -> Result<Trail, TrailError> {
        Trail::open_with(dir, AuditConfig::default())
    }

    /// Open as [`Trail::open`] with `config` (the key file and the head file,
    /// both outside `dir`).
    pub fn open_with(dir: &Path, config: AuditConfig) -> Result<Trail, TrailError> {
        std::fs::create_dir_all(dir).map_err(|source| TrailError::Io {
            path: dir.into(),
            source,
        })?;
        let lock_path = dir.join("controller.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| TrailError::Io {
                path: lock_path.clone(),
                source,
            })?;
        // SAFETY: flock only reads the descriptor, which `lock` keeps open for the call.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let source = std::io::Error::last_os_error();
            if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(TrailError::Locked(dir.into()));
            }
            return Err(TrailError::Io {
                path: lock_path,
                source,
            });
        }
        let log = AuditLog::open(dir, config)?;
        for t in &log.recovery().torn {
            eprintln!(
                "palisade controller: audit log: set aside {} torn bytes of {} (after seq {})",
                t.bytes,
                t.file.display(),
                t.last_intact_seq
            );
        }
        Ok(Trail {
            log: Mutex::new(log),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
            _lock: lock,
        })
    }

    fn log(&self) -> MutexGuard<'_, AuditLog> {
        // A panic while holding the lock leaves the log itself consistent
        // (AuditLog poisons itself on a failed write), so keep using it.
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Append `records` durably and sign a checkpoint over them; the last sequence number.
    pub fn append(&self, records: &[Record], now_ns: u64) -> Result<u64, AuditError> {
        let mut log = self.log();
        let seq = log.append(records)?;
        log.checkpoint(now_ns)?;
        Ok(seq)
    }

    /// Append a committed change's record; a failure is reported and counted, not returned.
    pub fn record_change(&self, change: &ChangeRecord) {
        if let Err(e) = self.append(&[Record::Change(change.clone())], change.time_ns) {
            let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            let msg = format!(
                "{} {} by {} is committed but NOT in the audit log: {e}",
                change.action, change.resource, change.actor
            );
            eprintln!("palisade controller: AUDIT LOG FAILURE #{n}: {msg}");
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg);
        }
    }

    /// The records matching `q`, in sequence order.
    pub fn query(&self, q: &Query) -> Result<Vec<(u64, Record)>, AuditError> {
        self.log().query(q)
    }

    /// The store's own status: signed and published heads, the unsigned window.
    pub fn audit_status(&self) -> palisade_audit::AuditStatus {
        self.log().status()
    }

    /// Where the trail stands.
    pub fn status(&self) -> TrailStatus {
        let log = self.log();
        TrailStatus {
            dir: log.dir().to_path_buf(),
            last_seq: log.last_seq(),
            append_failures: self.failures.load(Ordering::Relaxed),
            last_error: self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

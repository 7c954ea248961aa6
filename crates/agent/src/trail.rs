//! The agent's side of the audit trail: batches flow records and makes each
//! batch durable in the tamper-evident store.
//!
//! Records are appended in batches (every 200 ms or 1,000 records, whichever
//! comes first): the store syncs each batch, so a crash loses at most the
//! records of the current batch, which were never acknowledged. If the store
//! fails, the agent stops with an error rather than forwarding traffic it can
//! no longer account for.
//!
//! The signing key and the published head live outside the trail directory
//! (`audit_key`, `audit_head` in the configuration). The store signs a
//! checkpoint at least every [`palisade_audit::store::DEFAULT_CHECKPOINT_EVERY`]
//! records, and [`Trail::tick`] (called every second) signs one once the
//! oldest unsigned record is a second old: the window in which a tail cut
//! would go unnoticed, reported in [`TrailStats`] and `/health`. With a
//! controller, each head is also handed to a [`crate::upstream::HeadQueue`]
//! (a one-slot queue the control side drains), never blocking the appends.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use palisade_audit::record::Record;
use palisade_audit::store::{AuditConfig, AuditLog, AuditStatus};

use crate::error::AgentError;
use crate::upstream::HeadQueue;

const MAX_BATCH: usize = 1000;
const MAX_DELAY: Duration = Duration::from_millis(200);

/// Counts for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrailStats {
    /// Records made durable.
    pub written: u64,
    /// Batches appended.
    pub batches: u64,
    /// Records waiting.
    pub pending: u64,
    /// Last acknowledged sequence number.
    pub last_seq: u64,
    /// The last record covered by a signed checkpoint.
    pub signed_seq: u64,
    /// The last head published outside the trail.
    pub published_seq: Option<u64>,
    /// Head publications that failed since the start (the head file's, and
    /// the controller's: refused or not delivered).
    pub publish_failures: u64,
    /// The last head the controller accepted.
    pub controller_seq: Option<u64>,
}

/// A batching writer over the audit store.
pub struct Trail {
    dir: PathBuf,
    log: AuditLog,
    heads: Option<Arc<HeadQueue>>,
    pending: Vec<Record>,
    oldest: Option<Instant>,
    stats: TrailStats,
}

impl core::fmt::Debug for Trail {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Trail")
            .field("dir", &self.dir)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Trail {
    /// Open (or create) the store in `dir`, signing with `key_file` and
    /// publishing heads to `head_file` (both outside `dir`).
    pub fn open(
        dir: &Path,
        retention: palisade_audit::Retention,
        key_file: &Path,
        head_file: &Path,
    ) -> Result<Trail, AgentError> {
        Trail::open_with(dir, retention, key_file, head_file, None)
    }

    /// Open as [`Trail::open`], also handing each signed head to `heads`
    /// (the controller's queue), whose failures the stats count.
    pub fn open_with(
        dir: &Path,
        retention: palisade_audit::Retention,
        key_file: &Path,
        head_file: &Path,
        heads: Option<Arc<HeadQueue>>,
    ) -> Result<Trail, AgentError> {
        let config = AuditConfig {
            retention,
            key_file: Some(key_file.to_path_buf()),
            head_file: Some(head_file.to_path_buf()),
            ..AuditConfig::default()
        };
        let publishers = heads.iter().map(|q| q.publisher()).collect();
        let log = AuditLog::open_with(dir, config, publishers).map_err(|e| AgentError::Audit {
            dir: dir.to_path_buf(),
            message: e.to_string(),
        })?;
        // A crash mid-append leaves a torn record: say so, loudly, once.
        for t in &log.recovery().torn {
            eprintln!(
                "palisade agent: audit trail: a torn record ({} bytes at offset {} of {}) was set aside to {}; \
                 the trail continues after record {}",
                t.bytes,
                t.offset,
                t.file.display(),
                t.moved_to.display(),
                t.last_intact_seq
            );
        }
        for n in &log.recovery().notes {
            eprintln!("palisade agent: audit trail: {n}");
        }
        // The head published last goes to the controller too (it may have
        // missed it: a restart, an agent newly given a controller).
        if let Some(q) = &heads
            && let Ok(Some(h)) = palisade_audit::SignedHead::read(head_file)
            && h.public_key == log.public_key()
        {
            q.offer(h);
        }
        let status = log.status();
        Ok(Trail {
            dir: dir.to_path_buf(),
            log,
            heads,
            pending: Vec::new(),
            oldest: None,
            stats: TrailStats {
                last_seq: status.last_seq,
                signed_seq: status.signed_seq,
                published_seq: status.published_seq,
                ..TrailStats::default()
            },
        })
    }

    /// Queue a record.
    pub fn push(&mut self, r: Record) {
        self.oldest.get_or_insert_with(Instant::now);
        self.pending.push(r);
    }

    /// Append the queue if it is big or old enough.
    pub fn maybe_flush(&mut self) -> Result<(), AgentError> {
        if self.pending.len() >= MAX_BATCH || self.oldest.is_some_and(|t| t.elapsed() >= MAX_DELAY) {
            self.flush()?;
        }
        Ok(())
    }

    /// Append and sync everything queued.
    pub fn flush(&mut self) -> Result<(), AgentError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let seq = self.log.append(&self.pending).map_err(|e| AgentError::Audit {
            dir: self.dir.clone(),
            message: e.to_string(),
        })?;
        self.stats.written += self.pending.len() as u64;
        self.stats.batches += 1;
        self.stats.last_seq = seq;
        self.pending.clear();
        self.oldest = None;
        Ok(())
    }

    /// Sign a checkpoint if records have waited unsigned for the configured
    /// interval, at `now_ns` (Unix time): call it every second or so.
    pub fn tick(&mut self, now_ns: u64) -> Result<(), AgentError> {
        self.log.tick(now_ns).map_err(|e| AgentError::Audit {
            dir: self.dir.clone(),
            message: e.to_string(),
        })?;
        Ok(())
    }

    /// The public key its checkpoints and heads verify with.
    pub fn public_key(&self) -> [u8; 32] {
        self.log.public_key()
    }

    /// The store's own status: signed, published, the unsigned window.
    pub fn status(&self) -> AuditStatus {
        self.log.status()
    }

    /// Append what is queued and sign a checkpoint over it (at shutdown), at `now_ns` (Unix time).
    pub fn close(&mut self, now_ns: u64) -> Result<(), AgentError> {
        self.flush()?;
        self.log.checkpoint(now_ns).map_err(|e| AgentError::Audit {
            dir: self.dir.clone(),
            message: e.to_string(),
        })
    }

    /// Delete segments past the retention limits (whole sealed segments; the
    /// chain stays verifiable from the first one kept).
    pub fn retain(&mut self, now_ns: u64) -> Result<u64, AgentError> {
        let r = self.log.apply_retention(now_ns).map_err(|e| AgentError::Audit {
            dir: self.dir.clone(),
            message: e.to_string(),
        })?;
        Ok(r.records_deleted)
    }

    /// Counts.
    pub fn stats(&self) -> TrailStats {
        let status = self.log.status();
        TrailStats {
            pending: self.pending.len() as u64,
            signed_seq: status.signed_seq,
            published_seq: status.published_seq,
            publish_failures: status.publish_failures + self.heads.as_ref().map_or(0, |q| q.failures()),
            controller_seq: self.heads.as_ref().and_then(|q| q.accepted_seq()),
            ..self.stats
        }
    }
}

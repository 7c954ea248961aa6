//! The controller's own audit log: the change records it makes and the flow
//! records its agents push, in one tamper-evident [`AuditLog`].
//!
//! The store stays the source of truth for changes (a change and its record
//! commit in one transaction); the trail gets a copy after the commit, so a
//! failing disk can never undo a committed change. Such a failure is printed
//! on stderr and counted ([`TrailStatus::append_failures`], served by
//! `GET /v1/status`), and the record is appended again from the store
//! ([`Trail::ensure_change`], which first looks whether the trail has it)
//! before the controller accepts another change: see [`crate::core`].
//!
//! A trail has an identity, a random id kept in `<dir>/controller.id` and
//! made at its first open: the store remembers under it the last change
//! committed by the controller that keeps this trail, which is how a
//! restarted controller (on etcd, one of several) finds what its own trail
//! may lack.
//!
//! Each signed head goes to the head file outside the trail
//! ([`AuditConfig::head_file`]) and, opened with [`Trail::open_publishing`],
//! to the store under `trail/<id>/head` (so on etcd it is replicated, and
//! `GET /v1/audit/head` serves it). The store publisher is called with the
//! log's lock held; it only writes one store key, and nothing holds a store
//! transaction while waiting for the log, so the order is always log, then
//! store. At open the log refuses a trail that does not contain the head
//! the store holds (a rolled-back directory).
//!
//! One process owns a trail directory: [`Trail::open`] takes an exclusive
//! lock on `<dir>/controller.lock`, since two writers appending to one hash
//! chain would break it. With etcd, each controller keeps its own trail of
//! the changes it made and the flows pushed to it.

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use palisade_api::documents::TrailStatus;
use palisade_audit::record::{ChangeRecord, Record};
use palisade_audit::{AuditConfig, AuditError, AuditLog, HeadPublisher, Query, SignedHead};

use crate::store::Store;

/// Where the controller's store keeps what it knows of its trails.
const TRAILS: &str = "trail/";

/// Where the store keeps the last record `trail` is known to hold.
pub(crate) fn trail_last_key(trail: &Trail) -> String {
    format!("{TRAILS}{}/last", trail.id())
}

/// Where the trail with id `trail_id` publishes its signed heads.
pub fn trail_head_key(trail_id: &str) -> String {
    format!("{TRAILS}{trail_id}/head")
}

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

/// Publishes a trail's signed heads to the controller's store, under
/// `trail/<id>/head`.
struct StoreHeadPublisher {
    store: Arc<dyn Store>,
    key: String,
}

impl HeadPublisher for StoreHeadPublisher {
    fn publish(&mut self, head: &SignedHead) -> Result<(), String> {
        let doc = serde_json::to_vec(&palisade_api::HeadDocument::of(head)).map_err(|e| e.to_string())?;
        self.store.put(&self.key, &doc).map_err(|e| e.to_string())
    }

    fn last_published(&mut self) -> Result<Option<SignedHead>, AuditError> {
        let bad = |m: String| AuditError::format(std::path::Path::new(&self.key), m);
        let Some(bytes) = self.store.get(&self.key).map_err(|e| bad(e.to_string()))? else {
            return Ok(None);
        };
        let doc: palisade_api::HeadDocument =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a signed head: {e}")))?;
        doc.to_head()
            .map(Some)
            .map_err(|e| bad(format!("not a signed head: {e}")))
    }

    fn describe(&self) -> String {
        format!("the controller store's {}", self.key)
    }
}

/// The store a trail publishes its heads to, if any.
#[derive(Clone, Default)]
struct HeadStore(Option<Arc<dyn Store>>);

impl std::fmt::Debug for HeadStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "HeadStore(store)"
        } else {
            "HeadStore(none)"
        })
    }
}

impl HeadStore {
    fn publishers(&self, id: &str) -> Vec<Box<dyn HeadPublisher>> {
        match &self.0 {
            Some(store) => vec![Box::new(StoreHeadPublisher {
                store: store.clone(),
                key: trail_head_key(id),
            })],
            None => Vec::new(),
        }
    }
}

/// A controller's audit log.
#[derive(Debug)]
pub struct Trail {
    id: String,
    /// How the log is opened (again, after a failed write).
    config: AuditConfig,
    /// Where its heads go besides the head file.
    heads: HeadStore,
    /// The public key its checkpoints verify with.
    public_key: [u8; 32],
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
        Trail::open_inner(dir, config, HeadStore(None))
    }

    /// Open as [`Trail::open_with`], also publishing each signed head to
    /// `store` (under `trail/<id>/head`); refused when the trail does not
    /// contain the head the store holds.
    pub fn open_publishing(dir: &Path, config: AuditConfig, store: Arc<dyn Store>) -> Result<Trail, TrailError> {
        Trail::open_inner(dir, config, HeadStore(Some(store)))
    }

    fn open_inner(dir: &Path, config: AuditConfig, heads: HeadStore) -> Result<Trail, TrailError> {
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
        let id = trail_id(dir)?;
        let log = open_log(dir, &config, heads.publishers(&id))?;
        Ok(Trail {
            public_key: log.public_key(),
            id,
            config,
            heads,
            log: Mutex::new(log),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
            _lock: lock,
        })
    }

    /// The public key its checkpoints (and heads) verify with.
    pub fn public_key(&self) -> [u8; 32] {
        self.public_key
    }

    /// This trail's identity (see the module's documentation).
    pub fn id(&self) -> &str {
        &self.id
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

    /// Append a committed change's record; a failure is reported and
    /// counted, not returned: `false` then, and the record is to be
    /// appended again ([`Trail::ensure_change`]).
    pub fn record_change(&self, change: &ChangeRecord) -> bool {
        match self.append(&[Record::Change(change.clone())], change.time_ns) {
            Ok(_) => true,
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                self.failed(change, &e);
                false
            }
        }
    }

    /// Report a failed append of `change` (counted by the caller: once per record, not per try).
    fn failed(&self, change: &ChangeRecord, e: &AuditError) {
        let n = self.failures.load(Ordering::Relaxed);
        let msg = format!(
            "{} {} by {} is committed but NOT in the audit log yet: {e}",
            change.action,
            palisade_api::validate::Quoted(&change.resource),
            palisade_api::validate::Quoted(&change.actor)
        );
        eprintln!("palisade controller: AUDIT LOG FAILURE #{n}: {msg}");
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg);
    }

    /// Whether the trail holds `change` (a record of the same time and content).
    pub fn holds_change(&self, change: &ChangeRecord) -> Result<bool, AuditError> {
        Self::held(&self.log(), change)
    }

    fn held(log: &AuditLog, change: &ChangeRecord) -> Result<bool, AuditError> {
        let q = Query {
            since_ns: Some(change.time_ns),
            until_ns: Some(change.time_ns.saturating_add(1)),
            kind: Some(palisade_audit::RecordKind::Change),
            ..Query::default()
        };
        Ok(log
            .query(&q)?
            .iter()
            .any(|(_, r)| matches!(r, Record::Change(c) if c == change)))
    }

    /// Make sure the trail holds `change`, a committed change's record:
    /// `Ok(false)` when it does already (a record of the same time and
    /// content), `Ok(true)` when it was appended now. A log that failed a
    /// write before refuses every append; it is opened again first (its
    /// recovery sets a torn tail aside), provided its directory is still
    /// there: a trail that vanished is not silently begun anew.
    pub fn ensure_change(&self, change: &ChangeRecord) -> Result<bool, AuditError> {
        let mut log = self.log();
        let held = |log: &AuditLog| Self::held(log, change);
        let first = match held(&log) {
            Ok(true) => return Ok(false),
            Ok(false) => Self::append_to(&mut log, change),
            Err(e) => Err(e),
        };
        let Err(e) = first else { return Ok(true) };
        let dir = log.dir().to_path_buf();
        if !dir.is_dir() {
            self.failed(change, &e);
            return Err(e);
        }
        match open_log(&dir, &self.config, self.heads.publishers(&self.id)) {
            Ok(fresh) => *log = fresh,
            Err(e) => {
                self.failed(change, &e);
                return Err(e);
            }
        }
        let r = match held(&log) {
            Ok(true) => return Ok(false),
            Ok(false) => Self::append_to(&mut log, change),
            Err(e) => Err(e),
        };
        r.map(|()| true).inspect_err(|e| self.failed(change, e))
    }

    fn append_to(log: &mut AuditLog, change: &ChangeRecord) -> Result<(), AuditError> {
        log.append(&[Record::Change(change.clone())])?;
        log.checkpoint(change.time_ns)?;
        Ok(())
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
        let a = log.status();
        TrailStatus {
            dir: log.dir().to_path_buf(),
            last_seq: log.last_seq(),
            append_failures: self.failures.load(Ordering::Relaxed),
            unaudited: 0,
            last_error: self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            signed_seq: a.signed_seq,
            published_seq: a.published_seq,
            unsigned_records: a.unsigned_records,
            publish_failures: a.publish_failures,
        }
    }
}

/// Open the audit log in `dir`, reporting a torn tail that recovery set aside.
fn open_log(dir: &Path, config: &AuditConfig, publishers: Vec<Box<dyn HeadPublisher>>) -> Result<AuditLog, AuditError> {
    let log = AuditLog::open_with(dir, config.clone(), publishers)?;
    for t in &log.recovery().torn {
        eprintln!(
            "palisade controller: audit log: set aside {} torn bytes of {} (after seq {})",
            t.bytes,
            t.file.display(),
            t.last_intact_seq
        );
    }
    Ok(log)
}

/// The trail's id in `<dir>/controller.id`, made (random, written
/// atomically) when there is none.
fn trail_id(dir: &Path) -> Result<String, TrailError> {
    let path = dir.join("controller.id");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TrailError::Io { path, source }
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(id.to_string());
            }
            return Err(TrailError::Io {
                path,
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not a trail id (32 hex digits)"),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&path)(e)),
    }
    let bytes: [u8; 16] = rand::random();
    let id = crate::auth::hex(&bytes);
    let tmp = dir.join("controller.id.tmp");
    {
        use std::io::Write as _;
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(format!("{id}\n").as_bytes()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    Ok(id)
}

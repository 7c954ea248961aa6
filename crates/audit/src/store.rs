//! The append-only, hash-chained, signed store: [`AuditLog`].
//!
//! Appends are batched: a batch is framed into one buffer, written with one
//! `write` and made durable with one `fdatasync` before [`AuditLog::append`]
//! returns, so a returned sequence number is an acknowledgement. Segments
//! rotate at [`AuditConfig::segment_bytes`]; sealing one writes a closing
//! checkpoint, its query index and the log index, then the next segment is
//! created (header via temp file and rename) with its signed anchor.
//!
//! Opening recovers from a crash, and only from a crash. The active segment
//! is verified as `verify` does (chain, signed checkpoints); appends are
//! fdatasync'd before they return, so every whole frame on disk was either
//! acknowledged or is a whole record of the last, unacknowledged batch, and
//! a crash can only leave an *incomplete* last frame. That, when no signed
//! checkpoint covers it, is the one thing recovery sets aside (moved to
//! `<segment>.torn`, reported in [`Recovery`]), with a partial last entry of
//! the checkpoint file. Anything else — a whole last frame whose hash does
//! not match, a damaged length field, a signed record missing or changed, a
//! bad signature — is tampering or media failure: [`AuditLog::open`] refuses
//! with the location, and the files are kept exactly as they are (`palisade
//! audit verify` gives the full picture). Refusing rather than continuing in
//! a new segment is deliberate: a writer that continued would have to sign
//! over, or beside, data it cannot vouch for, and a damaged active segment
//! needs an operator either way.
//!
//! The signing key is read from a file outside the trail directory
//! ([`AuditConfig::key_file`]; see [`crate::checkpoint`]). Each checkpoint is
//! handed, as a [`SignedHead`], to the log's [`HeadPublisher`]s (a file
//! outside the trail, [`AuditConfig::head_file`], or whatever the embedding
//! daemon supplies); opening refuses a trail that does not contain the head
//! its publishers last published, since continuing would replace the
//! evidence of a cut or rollback with new heads. A checkpoint is signed at
//! least every [`AuditConfig::checkpoint_every`] records and, through
//! [`AuditLog::tick`], every [`AuditConfig::checkpoint_interval`]: that
//! bounds the unsigned window a tail cut can hide in ([`AuditStatus`]).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::checkpoint::{self, Checkpoint, Purpose, append_checkpoint, default_key_file, load_or_create_key, sync_dir};
use crate::error::{AuditError, IoContext};
use crate::head::{FileHeadPublisher, HeadPublisher, SignedHead};
use crate::index::{self, SegmentIndex, SegmentSummary};
use crate::query::{self, Query, QueryReport, SegmentCache};
use crate::record::{ChangeRecord, Record};
use crate::segment::{
    self, FRAME_OVERHEAD, FrameScanner, GENESIS, HASH_LEN, HEADER_LEN, Hash, LEN_LEN, MAX_PAYLOAD, SegmentHeader,
    chain_hash,
};
use crate::verify::{Problem, ProblemKind, SegmentInput, check_segment};

/// What retention deletes (whole sealed segments, oldest first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    /// Delete segments whose newest record is older than this.
    pub max_age: Option<Duration>,
    /// Delete the oldest segments while the log is larger than this.
    pub max_bytes: Option<u64>,
}

/// Configuration of an [`AuditLog`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// A segment is sealed once the next frame would take it past this size.
    pub segment_bytes: u64,
    /// Sign a checkpoint once this many records are unsigned (checked
    /// after each batch): the most records a tail cut can remove unnoticed.
    pub checkpoint_every: u64,
    /// ... or once this much time has passed since the last one (record time
    /// when appending; wall-clock time through [`AuditLog::tick`]).
    pub checkpoint_interval: Duration,
    /// What [`AuditLog::apply_retention`] deletes.
    pub retention: Retention,
    /// The signing key (a hex ed25519 seed, mode 0600), outside the trail
    /// directory; created if missing. `None`: `<dir>.key` beside the trail
    /// directory (see [`checkpoint::default_key_file`]).
    pub key_file: Option<PathBuf>,
    /// Publish signed heads to this file (outside the trail directory),
    /// replacing it atomically; opening checks the trail against it.
    pub head_file: Option<PathBuf>,
    /// Publish a checkpoint's head once this many records were signed since
    /// the last publication (a head file costs two fsyncs); [`AuditLog::tick`]
    /// publishes the newest head once `checkpoint_interval` has passed since,
    /// and [`AuditLog::checkpoint`] always does. 1: every checkpoint.
    pub head_every: u64,
}

/// Default [`AuditConfig::checkpoint_every`]: the unsigned window, in
/// records. A checkpoint costs a signature and an fdatasync of the
/// checkpoint file (and a head publication); at 1,000 records it is at most
/// one per 1,000-record batch (the agent's), which the audit bench measures.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 1_000;

/// Default [`AuditConfig::checkpoint_interval`]: the unsigned window, in time.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Default [`AuditConfig::head_every`]: under a sustained load, at most one
/// head publication per this many records (the audit bench measures what a
/// head file costs); under a light load `tick` publishes once a second.
pub const DEFAULT_HEAD_EVERY: u64 = 10_000;

impl Default for AuditConfig {
    fn default() -> AuditConfig {
        AuditConfig {
            segment_bytes: 64 << 20,
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            retention: Retention::default(),
            key_file: None,
            head_file: None,
            head_every: DEFAULT_HEAD_EVERY,
        }
    }
}

/// Where a log stands, for `/health`-style status: how much is signed and
/// published, and the bound on what is not.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditStatus {
    /// The last record's sequence number.
    pub last_seq: u64,
    /// The last record covered by a signed checkpoint.
    pub signed_seq: u64,
    /// Records after it (the unsigned window now).
    pub unsigned_records: u64,
    /// When the last checkpoint was signed (Unix ns).
    pub last_checkpoint_ns: u64,
    /// The bound on the unsigned window, in records.
    pub checkpoint_every: u64,
    /// The bound on the unsigned window, in milliseconds (with [`AuditLog::tick`]).
    pub checkpoint_interval_ms: u64,
    /// The last head published (by every publisher that succeeded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_seq: Option<u64>,
    /// Publications that failed since opening.
    pub publish_failures: u64,
    /// The last such failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_publish_error: Option<String>,
}

/// A torn tail set aside by recovery.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TornTail {
    /// The segment (or checkpoint file) it was cut from.
    pub file: PathBuf,
    /// Where the torn bytes started.
    pub offset: u64,
    /// How many bytes were set aside.
    pub bytes: u64,
    /// Where they are now.
    pub moved_to: PathBuf,
    /// The last intact record's sequence number; the log continues after it.
    pub last_intact_seq: u64,
}

/// What opening the log found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Recovery {
    /// Torn tails set aside.
    pub torn: Vec<TornTail>,
    /// Other repairs and findings (a rebuilt index, a new key, a checkpoint
    /// file in a new segment's way moved aside, also when found later).
    pub notes: Vec<String>,
}

impl Recovery {
    /// Whether nothing needed repair.
    pub fn is_clean(&self) -> bool {
        self.torn.is_empty() && self.notes.is_empty()
    }
}

/// What [`AuditLog::apply_retention`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RetentionReport {
    /// Segments deleted.
    pub segments_deleted: usize,
    /// Records in them.
    pub records_deleted: u64,
    /// Their size.
    pub bytes_freed: u64,
    /// The first record still kept.
    pub first_kept_seq: u64,
}

/// The segment being appended to.
struct Active {
    path: PathBuf,
    ckpt: PathBuf,
    file: File,
    header: SegmentHeader,
    bytes: u64,
    index: SegmentIndex,
    /// BLAKE3 of the segment's bytes so far (sealed into its index).
    digest: blake3::Hasher,
}

/// The tamper-evident audit log in a directory.
pub struct AuditLog {
    dir: PathBuf,
    config: AuditConfig,
    key: SigningKey,
    vk: VerifyingKey,
    sealed: Vec<SegmentSummary>,
    active: Active,
    last_seq: u64,
    last_hash: Hash,
    last_time: u64,
    last_ckpt_seq: u64,
    last_ckpt_time: u64,
    recovery: Recovery,
    poisoned: bool,
    buf: Vec<u8>,
    publishers: Vec<Box<dyn HeadPublisher>>,
    /// The newest signed checkpoint not yet published.
    pending_head: Option<Checkpoint>,
    /// The seq and time of the last publication attempt.
    last_publish: (u64, u64),
    published_seq: Option<u64>,
    publish_failures: u64,
    last_publish_error: Option<String>,
    cache: SegmentCache,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("dir", &self.dir)
            .field("last_seq", &self.last_seq)
            .field("segments", &(self.sealed.len() + 1))
            .finish_non_exhaustive()
    }
}

/// Move `path`'s bytes from `offset` on to a `.torn` sidecar (a new name if
/// one exists), then cut the file there; durable before it returns.
fn set_aside(path: &Path, offset: u64, ext: &str) -> Result<(PathBuf, u64), AuditError> {
    let mut f = OpenOptions::new().read(true).write(true).open(path).at(path)?;
    f.seek(SeekFrom::Start(offset)).at(path)?;
    let mut torn = Vec::new();
    f.read_to_end(&mut torn).at(path)?;
    let mut dest = segment::sidecar(path, ext);
    let mut n = 1;
    while dest.exists() {
        dest = segment::sidecar(path, &format!("{ext}.{n}"));
        n += 1;
    }
    let mut out = File::create(&dest).at(&dest)?;
    out.write_all(&torn).at(&dest)?;
    out.sync_all().at(&dest)?;
    f.set_len(offset).at(path)?;
    f.sync_all().at(path)?;
    Ok((dest, torn.len() as u64))
}

/// The note for a checkpoint file that was in a new segment's way.
fn orphan_note(moved_to: &Path) -> String {
    format!(
        "a checkpoint file of a segment that is not there (deleted?) was in the way of a new segment: kept as {}",
        moved_to.display()
    )
}

/// A problem that keeps the log from being extended, as an error naming it.
fn refusal(p: &Problem) -> AuditError {
    AuditError::Corrupt {
        path: p.file.clone(),
        offset: p.offset.unwrap_or(0),
        seq: p.seq.unwrap_or(0),
        reason: format!(
            "{:?}: {}; recovery sets aside only an incomplete last record, so the files are kept as they are \
             and the log is not extended: run `palisade audit verify`",
            p.kind, p.detail
        ),
    }
}

impl AuditLog {
    /// Open (creating if needed) the log in `dir`, recovering its tail.
    pub fn open(dir: &Path, config: AuditConfig) -> Result<AuditLog, AuditError> {
        AuditLog::open_with(dir, config, Vec::new())
    }

    /// Open as [`AuditLog::open`], publishing each signed head to
    /// `publishers` too (after the file of [`AuditConfig::head_file`], if
    /// any). Refused when the trail does not contain the head a publisher
    /// last published ([`AuditError::BehindHead`]).
    pub fn open_with(
        dir: &Path,
        config: AuditConfig,
        mut publishers: Vec<Box<dyn HeadPublisher>>,
    ) -> Result<AuditLog, AuditError> {
        std::fs::create_dir_all(dir).at(dir)?;
        let mut recovery = Recovery::default();
        let key_file = match &config.key_file {
            Some(k) => k.clone(),
            None => default_key_file(dir)?,
        };
        let (key, created) = load_or_create_key(dir, &key_file)?;
        if created {
            recovery
                .notes
                .push(format!("created signing key {}", key_file.display()));
        }
        let vk = key.verifying_key();
        if let Some(h) = &config.head_file {
            publishers.insert(0, Box::new(FileHeadPublisher::new(h, dir)?));
        }
        for entry in std::fs::read_dir(dir).at(dir)? {
            let p = entry.at(dir)?.path();
            if p.extension().is_some_and(|e| e == "tmp") {
                std::fs::remove_file(&p).at(&p)?;
                recovery.notes.push(format!("removed unfinished {}", p.display()));
            }
        }
        // The heads published outside the trail, checked below against it.
        let mut heads = Vec::new();
        for p in &mut publishers {
            if let Some(h) = p.last_published()? {
                if h.public_key != vk.to_bytes() || !h.verify() {
                    return Err(AuditError::BehindHead {
                        publisher: p.describe(),
                        reason: format!(
                            "the head published there (seq {}) is not signed by this trail's key {}: another trail's head, or altered",
                            h.seq,
                            key_file.display()
                        ),
                    });
                }
                heads.push((p.describe(), h));
            }
        }
        let mut segs = segment::list_segments(dir)?;
        let cache = SegmentCache::default();
        let Some((last_first, last_path)) = segs.pop() else {
            if let Some((from, h)) = heads.iter().find(|(_, h)| h.seq > 0) {
                return Err(AuditError::BehindHead {
                    publisher: from.clone(),
                    reason: format!(
                        "the trail {} is empty but the head published there is seq {}: the trail was deleted; \
                         to start a new trail knowingly, move the head aside",
                        dir.display(),
                        h.seq
                    ),
                });
            }
            let (active, moved) = create_segment(dir, &key, 1, GENESIS, 0)?;
            if let Some(m) = moved {
                recovery.notes.push(orphan_note(&m));
            }
            return Ok(AuditLog {
                dir: dir.into(),
                config,
                key,
                vk,
                sealed: Vec::new(),
                active,
                last_seq: 0,
                last_hash: GENESIS,
                last_time: 0,
                last_ckpt_seq: 0,
                last_ckpt_time: 0,
                recovery,
                poisoned: false,
                buf: Vec::new(),
                publishers,
                pending_head: None,
                last_publish: (0, 0),
                published_seq: None,
                publish_failures: 0,
                last_publish_error: None,
                cache,
            });
        };
        let (sealed, rebuilt, sealed_problems) = query::sealed_summaries(dir, &segs, &vk, Some(&key), &cache)?;
        if rebuilt && !segs.is_empty() {
            recovery.notes.push("rebuilt the log index (index.json)".into());
        }
        for p in sealed_problems {
            recovery.notes.push(format!(
                "a sealed segment fails its check (not extended, kept as is): {p}"
            ));
        }
        let wanted: Vec<u64> = heads.iter().map(|(_, h)| h.seq).collect();
        let mut tail = recover_active(&last_path, last_first, &vk, &wanted)?;
        let ckpt = segment::sidecar(&last_path, "ckpt");
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&last_path)
            .at(&last_path)?;
        let mut digest = blake3::Hasher::new();
        {
            let mut r = (&mut file).take(tail.bytes);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = segment::read_full(&mut r, &mut buf).at(&last_path)?;
                if n == 0 {
                    break;
                }
                digest.update(&buf[..n]);
            }
        }
        let mut log = AuditLog {
            dir: dir.into(),
            config,
            key,
            vk,
            sealed,
            active: Active {
                path: last_path,
                ckpt,
                file,
                header: tail.header,
                bytes: tail.bytes,
                index: std::mem::take(&mut tail.index),
                digest,
            },
            last_seq: tail.last_seq,
            last_hash: tail.last_hash,
            last_time: tail.last_time,
            last_ckpt_seq: tail.last_ckpt.map_or(0, |c| c.seq),
            last_ckpt_time: tail.last_ckpt.map_or(0, |c| c.time_ns),
            recovery,
            poisoned: false,
            buf: Vec::new(),
            publishers,
            pending_head: None,
            last_publish: (0, 0),
            published_seq: None,
            publish_failures: 0,
            last_publish_error: None,
            cache,
        };
        // The trail must contain every head published outside it.
        for (from, h) in &heads {
            let have = if h.seq > log.last_seq {
                None
            } else if let Some((_, hash)) = tail.hashes.iter().find(|(s, _)| *s == h.seq) {
                Some(*hash)
            } else {
                log.hash_at_sealed(h.seq)?
            };
            let reason = match have {
                Some(hash) if hash == h.hash => continue,
                Some(_) => format!(
                    "the trail's record {} differs from the head published there: the trail was rewritten or forked",
                    h.seq
                ),
                None if h.seq > log.last_seq => format!(
                    "the trail ends at seq {} but the head published there is seq {}: it was cut, its last segment deleted, or an older copy restored",
                    log.last_seq, h.seq
                ),
                None => format!(
                    "the trail's record {} cannot be read to compare with the head published there",
                    h.seq
                ),
            };
            return Err(AuditError::BehindHead {
                publisher: from.clone(),
                reason: format!(
                    "{reason}; the log is not extended (new heads would replace this evidence): \
                     run `palisade audit verify {} --expect-head ...`, and move the head aside only to start over knowingly",
                    log.dir.display()
                ),
            });
        }
        // The log opens: now, and only now, set the torn tail aside.
        tail.set_aside_torn(&log.active.path, &mut log.recovery)?;
        log.published_seq = heads.iter().map(|(_, h)| h.seq).min();
        log.last_publish = heads.iter().map(|(_, h)| (h.seq, h.time_ns)).min().unwrap_or((0, 0));
        // Publish the newest signed head if the publishers are behind it (a crash before publishing).
        if let Some(c) = tail.last_ckpt
            && log.published_seq.is_none_or(|p| p < c.seq)
            && c.seq > 0
        {
            log.publish(&c, c.time_ns);
        }
        Ok(log)
    }

    /// The chain hash of record `seq` in a sealed segment (as stored), if present.
    fn hash_at_sealed(&self, seq: u64) -> Result<Option<Hash>, AuditError> {
        for s in &self.sealed {
            let path = self.dir.join(&s.name);
            if seq + 1 == s.first_seq {
                return Ok(FrameScanner::open(&path).ok().map(|(h, _)| h.prev_hash));
            }
            if seq >= s.first_seq && seq < s.first_seq + s.records {
                let c = query::consult_sealed(&path, s.first_seq, &self.vk, &self.cache)?;
                let Some(&offset) = c.index.offsets.get((seq - s.first_seq) as usize) else {
                    return Ok(None);
                };
                let f = File::open(&path).at(&path)?;
                let mut lb = [0u8; LEN_LEN];
                f.read_exact_at(&mut lb, offset).at(&path)?;
                let len = u64::from(u32::from_le_bytes(lb));
                let mut hash = [0u8; HASH_LEN];
                f.read_exact_at(&mut hash, offset + LEN_LEN as u64 + len).at(&path)?;
                return Ok(Some(hash));
            }
        }
        Ok(None)
    }

    /// What opening found and repaired.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The sequence number of the last record (0 when empty).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The public key checkpoints verify with.
    pub fn public_key(&self) -> [u8; 32] {
        self.vk.to_bytes()
    }

    /// Where the log stands: signed, published, and the unsigned window.
    pub fn status(&self) -> AuditStatus {
        AuditStatus {
            last_seq: self.last_seq,
            signed_seq: self.last_ckpt_seq,
            unsigned_records: self.last_seq - self.last_ckpt_seq.min(self.last_seq),
            last_checkpoint_ns: self.last_ckpt_time,
            checkpoint_every: self.config.checkpoint_every.max(1),
            checkpoint_interval_ms: u64::try_from(self.config.checkpoint_interval.as_millis()).unwrap_or(u64::MAX),
            published_seq: self.published_seq,
            publish_failures: self.publish_failures,
            last_publish_error: self.last_publish_error.clone(),
        }
    }

    /// Append `records`; durable (written and fdatasync'd) when it returns
    /// the last record's sequence number.
    pub fn append(&mut self, records: &[Record]) -> Result<u64, AuditError> {
        if self.poisoned {
            return Err(AuditError::Poisoned);
        }
        if records.is_empty() {
            return Ok(self.last_seq);
        }
        let mut payloads = Vec::with_capacity(records.len());
        for r in records {
            let p = serde_json::to_vec(r).map_err(|source| AuditError::Json { seq: 0, source })?;
            if p.len() > MAX_PAYLOAD as usize {
                return Err(AuditError::TooLarge(p.len()));
            }
            payloads.push(p);
        }
        let r = self.append_encoded(records, &payloads);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    fn append_encoded(&mut self, records: &[Record], payloads: &[Vec<u8>]) -> Result<u64, AuditError> {
        self.buf.clear();
        for (rec, payload) in records.iter().zip(payloads) {
            let frame = (FRAME_OVERHEAD + payload.len()) as u64;
            let used = self.active.bytes + self.buf.len() as u64;
            if used + frame > self.config.segment_bytes && (!self.active.index.is_empty() || !self.buf.is_empty()) {
                self.flush()?;
                self.rotate()?;
            }
            let seq = self.last_seq + 1;
            let hash = chain_hash(&self.last_hash, seq, payload);
            let offset = self.active.bytes + self.buf.len() as u64;
            // MAX_PAYLOAD (checked in `append`) fits a u32.
            self.buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            self.buf.extend_from_slice(payload);
            self.buf.extend_from_slice(&hash);
            self.active.index.push(offset, rec);
            self.last_seq = seq;
            self.last_hash = hash;
            self.last_time = rec.time_ns();
        }
        self.flush()?;
        let interval = u64::try_from(self.config.checkpoint_interval.as_nanos()).unwrap_or(u64::MAX);
        if self.last_seq > self.last_ckpt_seq
            && (self.last_seq - self.last_ckpt_seq >= self.config.checkpoint_every.max(1)
                || self.last_time.saturating_sub(self.last_ckpt_time) >= interval)
        {
            self.sign_checkpoint(self.last_time)?;
        }
        Ok(self.last_seq)
    }

    fn flush(&mut self) -> Result<(), AuditError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let p = &self.active.path;
        self.active.file.write_all(&self.buf).at(p)?;
        self.active.file.sync_data().at(p)?;
        self.active.digest.update(&self.buf);
        self.active.bytes += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Sign a checkpoint if records are unsigned and the last one is at
    /// least [`AuditConfig::checkpoint_interval`] older than `now_ns` (Unix
    /// ns), and publish the newest head if it has waited that long: call it
    /// periodically, so the unsigned window and the published head's lag are
    /// bounded in time even when records stop coming. `true` if it signed one.
    pub fn tick(&mut self, now_ns: u64) -> Result<bool, AuditError> {
        if self.poisoned {
            return Err(AuditError::Poisoned);
        }
        let interval = u64::try_from(self.config.checkpoint_interval.as_nanos()).unwrap_or(u64::MAX);
        let mut signed = false;
        if self.last_seq > self.last_ckpt_seq && now_ns.saturating_sub(self.last_ckpt_time) >= interval {
            self.sign_checkpoint(now_ns)?;
            signed = true;
        }
        if let Some(c) = self.pending_head
            && now_ns.saturating_sub(self.last_publish.1) >= interval
        {
            self.publish(&c, now_ns);
        }
        Ok(signed)
    }

    /// Sign a checkpoint of the last record now (no-op when the last
    /// checkpoint already covers it) and publish it as the new head.
    pub fn checkpoint(&mut self, now_ns: u64) -> Result<(), AuditError> {
        self.sign_checkpoint(now_ns)?;
        if let Some(c) = self.pending_head {
            self.publish(&c, now_ns);
        }
        Ok(())
    }

    /// Sign a checkpoint of the last record (no-op when one covers it); its
    /// head is published once [`AuditConfig::head_every`] records were
    /// signed since the last publication, else kept pending.
    fn sign_checkpoint(&mut self, now_ns: u64) -> Result<(), AuditError> {
        if self.last_ckpt_seq == self.last_seq && self.last_seq > 0 {
            return Ok(());
        }
        let c = Checkpoint::sign(&self.key, Purpose::Checkpoint, self.last_seq, self.last_hash, now_ns);
        append_checkpoint(&self.active.ckpt, &c)?;
        self.last_ckpt_seq = self.last_seq;
        self.last_ckpt_time = now_ns;
        self.pending_head = Some(c);
        if c.seq.saturating_sub(self.last_publish.0) >= self.config.head_every.max(1) {
            self.publish(&c, now_ns);
        }
        Ok(())
    }

    /// Hand the signed checkpoint `c` to every publisher; failures are
    /// counted, not returned (the records are durable either way).
    fn publish(&mut self, c: &Checkpoint, now_ns: u64) {
        self.pending_head = None;
        self.last_publish = (c.seq, now_ns);
        if self.publishers.is_empty() {
            return;
        }
        let head = SignedHead::new(c, self.vk.to_bytes());
        let mut all = true;
        for p in &mut self.publishers {
            if let Err(e) = p.publish(&head) {
                all = false;
                self.publish_failures += 1;
                self.last_publish_error = Some(format!("{}: {e}", p.describe()));
            }
        }
        if all {
            self.published_seq = Some(c.seq);
        }
    }

    /// Seal the active segment and start the next.
    fn rotate(&mut self) -> Result<(), AuditError> {
        self.sign_checkpoint(self.last_time)?;
        let idx_path = segment::sidecar(&self.active.path, "idx");
        let digest = *self.active.digest.finalize().as_bytes();
        self.active
            .index
            .store_sealed(&idx_path, self.active.bytes, &digest, &self.key)?;
        let name = self
            .active
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        self.sealed
            .push(SegmentSummary::of(name, self.active.bytes, &self.active.index));
        index::store_summaries(&self.dir, &self.sealed, Some(&self.key))?;
        let (active, moved) = create_segment(&self.dir, &self.key, self.last_seq + 1, self.last_hash, self.last_time)?;
        self.active = active;
        if let Some(m) = moved {
            self.recovery.notes.push(orphan_note(&m));
        }
        Ok(())
    }

    /// Delete whole sealed segments by the configured retention; the first
    /// kept segment stays verifiable through its signed anchor, and the
    /// deletion is signed in `retention.ckpt` and recorded as a change record.
    pub fn apply_retention(&mut self, now_ns: u64) -> Result<RetentionReport, AuditError> {
        if self.poisoned {
            return Err(AuditError::Poisoned);
        }
        let ret = self.config.retention.clone();
        let mut total: u64 = self.sealed.iter().map(|s| s.bytes).sum::<u64>() + self.active.bytes;
        let max_age = ret.max_age.map(|a| u64::try_from(a.as_nanos()).unwrap_or(u64::MAX));
        let mut cut = 0;
        for s in &self.sealed {
            let old = max_age.is_some_and(|a| s.max_time_ns.saturating_add(a) < now_ns);
            let big = ret.max_bytes.is_some_and(|m| total > m);
            if !(old || big) {
                break;
            }
            total -= s.bytes;
            cut += 1;
        }
        if cut == 0 {
            return Ok(RetentionReport {
                first_kept_seq: self
                    .sealed
                    .first()
                    .map_or(self.active.header.first_seq, |s| s.first_seq),
                ..RetentionReport::default()
            });
        }
        let next = match self.sealed.get(cut) {
            Some(s) => {
                let p = self.dir.join(&s.name);
                FrameScanner::open(&p)?.0
            }
            None => self.active.header,
        };
        let entry = Checkpoint::sign(
            &self.key,
            Purpose::Retention,
            next.first_seq - 1,
            next.prev_hash,
            now_ns,
        );
        append_checkpoint(&checkpoint::retention_path(&self.dir), &entry)?;
        let mut report = RetentionReport {
            first_kept_seq: next.first_seq,
            ..RetentionReport::default()
        };
        for s in self.sealed.drain(..cut) {
            let p = self.dir.join(&s.name);
            for f in [segment::sidecar(&p, "ckpt"), segment::sidecar(&p, "idx"), p.clone()] {
                match std::fs::remove_file(&f) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(AuditError::io(f, e)),
                    _ => {}
                }
            }
            report.segments_deleted += 1;
            report.records_deleted += s.records;
            report.bytes_freed += s.bytes;
        }
        sync_dir(&self.dir)?;
        index::store_summaries(&self.dir, &self.sealed, Some(&self.key))?;
        self.append(&[Record::Change(ChangeRecord {
            time_ns: now_ns,
            actor: "palisade-audit".into(),
            action: "audit.retention".into(),
            resource: "audit".into(),
            diff: format!(
                "deleted records up to seq {} ({} segments, {} bytes)",
                next.first_seq - 1,
                report.segments_deleted,
                report.bytes_freed
            ),
            policy_version: None,
        })])?;
        Ok(report)
    }

    /// What a query of this log can rely on: the trail's structure as it is
    /// on disk, and the active segment's bytes as this writer wrote them.
    fn known_problems(&self) -> Result<Vec<Problem>, AuditError> {
        let segs = segment::list_segments(&self.dir)?;
        let mut problems = query::structure_problems(&self.dir, &segs, &self.vk)?;
        let path = &self.active.path;
        let len = std::fs::metadata(path).at(path)?.len();
        let digest = index::digest_file(path, self.active.bytes)?;
        if len != self.active.bytes || digest != Some(*self.active.digest.finalize().as_bytes()) {
            let (_, found, _) = query::consult_active(path, self.active.header.first_seq, &self.vk)?;
            if found.is_empty() {
                problems.push(Problem {
                    kind: ProblemKind::SegmentChanged,
                    file: path.clone(),
                    offset: None,
                    seq: None,
                    detail: format!(
                        "the active segment is not what this writer wrote ({len} bytes, written {})",
                        self.active.bytes
                    ),
                });
            }
            problems.extend(found);
        }
        Ok(problems)
    }

    fn run_query(
        &self,
        q: &Query,
        strict: bool,
        f: &mut dyn FnMut(u64, Record) -> bool,
    ) -> Result<QueryReport, AuditError> {
        let known = self.known_problems()?;
        let ctx = query::Ctx {
            dir: &self.dir,
            vk: &self.vk,
            cache: &self.cache,
            strict,
        };
        let active = Some((self.active.path.as_path(), &self.active.index));
        query::run(&ctx, &self.sealed, active, known, q, f)
    }

    /// The records matching `q`, in sequence order (refused as
    /// [`AuditLog::query_each`] is).
    pub fn query(&self, q: &Query) -> Result<Vec<(u64, Record)>, AuditError> {
        let mut out = Vec::new();
        self.query_each(q, |s, r| {
            out.push((s, r));
            true
        })?;
        Ok(out)
    }

    /// Call `f` with each matching record until it returns `false`; the
    /// number of matches. Refused ([`AuditError::Integrity`]) when the trail
    /// fails a check the answer relies on.
    pub fn query_each(&self, q: &Query, mut f: impl FnMut(u64, Record) -> bool) -> Result<usize, AuditError> {
        Ok(self.run_query(q, true, &mut f)?.matches)
    }

    /// Call `f` with each matching record until it returns `false`; the
    /// report lists what is wrong with what the answer relied on.
    pub fn query_report(&self, q: &Query, mut f: impl FnMut(u64, Record) -> bool) -> Result<QueryReport, AuditError> {
        self.run_query(q, false, &mut f)
    }
}

/// Create the segment starting at `first_seq` and its anchor checkpoint;
/// also where a checkpoint file found in the way was moved.
fn create_segment(
    dir: &Path,
    key: &SigningKey,
    first_seq: u64,
    prev_hash: Hash,
    prev_time_ns: u64,
) -> Result<(Active, Option<PathBuf>), AuditError> {
    let path = dir.join(segment::segment_name(first_seq));
    let tmp = path.with_extension("log.tmp");
    let header = SegmentHeader {
        first_seq,
        prev_hash,
        prev_time_ns,
    };
    let bytes = header.emit();
    {
        let mut f = File::create(&tmp).at(&tmp)?;
        f.write_all(&bytes).at(&tmp)?;
        f.sync_all().at(&tmp)?;
    }
    // The signed anchor exists, durably, before the segment does: a crash
    // between the two leaves at most an orphan sidecar holding (a prefix of)
    // this very anchor, replaced here. Any other checkpoint file by that name
    // is evidence (the checkpoints of a segment that was deleted): it is
    // moved aside, never overwritten.
    let ckpt = segment::sidecar(&path, "ckpt");
    let anchor = Checkpoint::sign(key, Purpose::Checkpoint, first_seq - 1, prev_hash, prev_time_ns);
    let mut moved = None;
    match std::fs::read(&ckpt) {
        Ok(old) if anchor.emit().starts_with(&old) => std::fs::remove_file(&ckpt).at(&ckpt)?,
        Ok(_) => {
            let mut n = 0;
            let dest = loop {
                let ext = if n == 0 {
                    "ckpt.orphan".to_string()
                } else {
                    format!("ckpt.orphan.{n}")
                };
                let dest = segment::sidecar(&path, &ext);
                if !dest.exists() {
                    break dest;
                }
                n += 1;
            };
            std::fs::rename(&ckpt, &dest).at(&dest)?;
            moved = Some(dest);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).at(&ckpt),
    }
    append_checkpoint(&ckpt, &anchor)?;
    sync_dir(dir)?;
    std::fs::rename(&tmp, &path).at(&path)?;
    sync_dir(dir)?;
    let file = OpenOptions::new().read(true).append(true).open(&path).at(&path)?;
    let mut digest = blake3::Hasher::new();
    digest.update(&bytes);
    Ok((
        Active {
            path,
            ckpt,
            file,
            header,
            bytes: HEADER_LEN as u64,
            index: SegmentIndex::new(first_seq),
            digest,
        },
        moved,
    ))
}

/// The state at the end of the active segment after recovery.
struct Tail {
    header: SegmentHeader,
    bytes: u64,
    index: SegmentIndex,
    last_seq: u64,
    last_hash: Hash,
    last_time: u64,
    /// The last valid checkpoint within the records.
    last_ckpt: Option<Checkpoint>,
    /// Chain hashes at the sequence numbers asked for.
    hashes: Vec<(u64, Hash)>,
    /// An incomplete last frame to set aside, and a partial last checkpoint entry.
    torn_at: Option<u64>,
    ckpt_torn_at: Option<u64>,
}

impl Tail {
    /// Set aside what recovery found torn (once the log is known to open).
    fn set_aside_torn(&self, path: &Path, recovery: &mut Recovery) -> Result<(), AuditError> {
        let ckpt = segment::sidecar(path, "ckpt");
        for (file, at) in [(path, self.torn_at), (ckpt.as_path(), self.ckpt_torn_at)] {
            if let Some(offset) = at {
                let (moved_to, bytes) = set_aside(file, offset, "torn")?;
                recovery.torn.push(TornTail {
                    file: file.into(),
                    offset,
                    bytes,
                    moved_to,
                    last_intact_seq: self.last_seq,
                });
            }
        }
        Ok(())
    }
}

/// Verify the active segment and index it; find an incomplete last frame
/// beyond the last signed checkpoint (and a partial last checkpoint entry)
/// to set aside; refuse anything else. Changes nothing.
fn recover_active(path: &Path, name_first: u64, vk: &VerifyingKey, wanted: &[u64]) -> Result<Tail, AuditError> {
    let inp = SegmentInput {
        path,
        name_first,
        expected: None,
        next_header: None,
        last_segment: true,
        first_segment: false,
        retention: &[],
        vk,
        want_hash_at: None,
    };
    let mut index: Option<SegmentIndex> = None;
    let mut last = None;
    let mut hashes = Vec::new();
    let check = check_segment(&inp, &mut |seq, f| {
        let rec: Record = serde_json::from_slice(&f.payload).map_err(|e| AuditError::Corrupt {
            path: path.into(),
            offset: f.offset,
            seq,
            reason: format!("the record chains but does not decode ({e}); run `palisade audit verify`"),
        })?;
        index.get_or_insert_with(|| SegmentIndex::new(seq)).push(f.offset, &rec);
        last = Some((seq, f.hash, rec.time_ns()));
        if wanted.contains(&seq) {
            hashes.push((seq, f.hash));
        }
        Ok(())
    })?;
    let Some(header) = check.header else {
        return Err(AuditError::format(path, "not a segment: bad or short header"));
    };
    // The only repair: an incomplete last frame (a torn write) and a partial
    // last checkpoint entry. A checkpoint covering the torn record would have
    // been reported as records missing, and refused here.
    let ckpt = segment::sidecar(path, "ckpt");
    let repairable = |p: &Problem| {
        p.kind == ProblemKind::TornTail
            && ((p.file == path && p.offset.is_some() && p.offset == check.torn_at)
                || (p.file == ckpt && p.offset.is_some() && p.offset == check.ckpt_torn_at))
    };
    if let Some(p) = check.problems.iter().find(|p| !repairable(p)) {
        return Err(refusal(p));
    }
    let first_seq = check.first_seq;
    let (last_seq, last_hash, last_time) = last.unwrap_or((first_seq - 1, header.prev_hash, header.prev_time_ns));
    if wanted.contains(&(first_seq - 1)) {
        hashes.push((first_seq - 1, header.prev_hash));
    }
    let index = index.unwrap_or_else(|| SegmentIndex::new(first_seq));
    let end = check.torn_at.unwrap_or(check.end_offset);
    let last_ckpt = check
        .checkpoints
        .iter()
        .map(|(_, c)| *c)
        .filter(|c| c.seq <= last_seq)
        .max_by_key(|c| (c.seq, c.time_ns));
    Ok(Tail {
        header,
        bytes: end,
        index,
        last_seq,
        last_hash,
        last_time,
        last_ckpt,
        hashes,
        torn_at: check.torn_at,
        ckpt_torn_at: check.ckpt_torn_at,
    })
}

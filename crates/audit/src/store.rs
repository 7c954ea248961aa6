//! The append-only, hash-chained, signed store: [`AuditLog`].
//!
//! Appends are batched: a batch is framed into one buffer, written with one
//! `write` and made durable with one `fdatasync` before [`AuditLog::append`]
//! returns, so a returned sequence number is an acknowledgement. Segments
//! rotate at [`AuditConfig::segment_bytes`]; sealing one writes a closing
//! checkpoint, its query index and the log index, then the next segment is
//! created (header via temp file and rename) with its signed anchor.
//!
//! Opening recovers from a crash: the active segment is verified, and a torn
//! last record (an incomplete frame, or a final frame whose hash does not
//! match) is moved to `<segment>.torn` and reported in [`Recovery`]; damage
//! anywhere else is an error, because appending after it would extend a chain
//! nobody can verify.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ed25519_dalek::SigningKey;

use crate::checkpoint::{self, Checkpoint, Purpose, append_checkpoint, load_or_create_key, read_checkpoints, sync_dir};
use crate::error::{AuditError, IoContext};
use crate::index::{self, SegmentIndex, SegmentSummary};
use crate::query::{self, Query};
use crate::record::{ChangeRecord, Record};
use crate::segment::{
    self, FRAME_OVERHEAD, FrameScanner, GENESIS, HEADER_LEN, Hash, MAX_PAYLOAD, Scan, SegmentHeader, chain_hash,
};

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
    /// Sign a checkpoint after this many records (checked after each batch).
    pub checkpoint_every: u64,
    /// ... or once this much record time has passed since the last one.
    pub checkpoint_interval: Duration,
    /// What [`AuditLog::apply_retention`] deletes.
    pub retention: Retention,
    /// Sign with this key file (hex ed25519 seed) instead of `<dir>/audit.key`.
    pub key_file: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> AuditConfig {
        AuditConfig {
            segment_bytes: 64 << 20,
            checkpoint_every: 10_000,
            checkpoint_interval: Duration::from_secs(60),
            retention: Retention::default(),
            key_file: None,
        }
    }
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
    /// Other repairs (a rebuilt index, a missing anchor written, a new key).
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
}

/// The tamper-evident audit log in a directory.
pub struct AuditLog {
    dir: PathBuf,
    config: AuditConfig,
    key: SigningKey,
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

impl AuditLog {
    /// Open (creating if needed) the log in `dir`, recovering its tail.
    pub fn open(dir: &Path, config: AuditConfig) -> Result<AuditLog, AuditError> {
        std::fs::create_dir_all(dir).at(dir)?;
        let mut recovery = Recovery::default();
        let (key, created) = load_or_create_key(dir, config.key_file.as_deref())?;
        if created {
            recovery
                .notes
                .push(format!("created signing key {}", dir.join("audit.key").display()));
        }
        for entry in std::fs::read_dir(dir).at(dir)? {
            let p = entry.at(dir)?.path();
            if p.extension().is_some_and(|e| e == "tmp") {
                std::fs::remove_file(&p).at(&p)?;
                recovery.notes.push(format!("removed unfinished {}", p.display()));
            }
        }
        let mut segs = segment::list_segments(dir)?;
        let Some((_, last_path)) = segs.pop() else {
            let active = create_segment(dir, &key, 1, GENESIS, 0)?;
            return Ok(AuditLog {
                dir: dir.into(),
                config,
                key,
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
            });
        };
        let (sealed, rebuilt) = query::sealed_summaries(dir, &segs)?;
        if rebuilt && !segs.is_empty() {
            recovery.notes.push("rebuilt the log index (index.json)".into());
        }
        let tail = recover_active(&last_path, &mut recovery)?;
        let ckpt = segment::sidecar(&last_path, "ckpt");
        let mut entries = Vec::new();
        if ckpt.exists() {
            let (e, torn) = read_checkpoints(&ckpt)?;
            if torn > 0 {
                let len = std::fs::metadata(&ckpt).at(&ckpt)?.len();
                let (moved_to, bytes) = set_aside(&ckpt, len - torn as u64, "torn")?;
                recovery.torn.push(TornTail {
                    file: ckpt.clone(),
                    offset: len - torn as u64,
                    bytes,
                    moved_to,
                    last_intact_seq: tail.last_seq,
                });
            }
            entries = e;
        }
        if entries.is_empty() {
            let h = tail.header;
            let anchor = Checkpoint::sign(&key, Purpose::Checkpoint, h.first_seq - 1, h.prev_hash, h.prev_time_ns);
            append_checkpoint(&ckpt, &anchor)?;
            recovery
                .notes
                .push(format!("wrote the missing anchor checkpoint of {}", ckpt.display()));
            entries.push(anchor);
        }
        // Checkpoints are written only after the records they cover are durable.
        let last_ckpt = entries.iter().filter(|c| c.seq <= tail.last_seq).max_by_key(|c| c.seq);
        let (last_ckpt_seq, last_ckpt_time) = last_ckpt.map_or((0, 0), |c| (c.seq, c.time_ns));
        let file = OpenOptions::new().append(true).open(&last_path).at(&last_path)?;
        Ok(AuditLog {
            dir: dir.into(),
            config,
            key,
            sealed,
            active: Active {
                path: last_path,
                ckpt,
                file,
                header: tail.header,
                bytes: tail.bytes,
                index: tail.index,
            },
            last_seq: tail.last_seq,
            last_hash: tail.last_hash,
            last_time: tail.last_time,
            last_ckpt_seq,
            last_ckpt_time,
            recovery,
            poisoned: false,
            buf: Vec::new(),
        })
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
        self.key.verifying_key().to_bytes()
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
            self.checkpoint(self.last_time)?;
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
        self.active.bytes += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Sign a checkpoint of the last record now (no-op when the last
    /// checkpoint already covers it).
    pub fn checkpoint(&mut self, now_ns: u64) -> Result<(), AuditError> {
        if self.last_ckpt_seq == self.last_seq && self.last_seq > 0 {
            return Ok(());
        }
        let c = Checkpoint::sign(&self.key, Purpose::Checkpoint, self.last_seq, self.last_hash, now_ns);
        append_checkpoint(&self.active.ckpt, &c)?;
        self.last_ckpt_seq = self.last_seq;
        self.last_ckpt_time = now_ns;
        Ok(())
    }

    /// Seal the active segment and start the next.
    fn rotate(&mut self) -> Result<(), AuditError> {
        self.checkpoint(self.last_time)?;
        let idx_path = segment::sidecar(&self.active.path, "idx");
        self.active.index.store(&idx_path)?;
        let name = self
            .active
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        self.sealed
            .push(SegmentSummary::of(name, self.active.bytes, &self.active.index));
        index::store_summaries(&self.dir, &self.sealed)?;
        self.active = create_segment(&self.dir, &self.key, self.last_seq + 1, self.last_hash, self.last_time)?;
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
        index::store_summaries(&self.dir, &self.sealed)?;
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

    /// The records matching `q`, in sequence order.
    pub fn query(&self, q: &Query) -> Result<Vec<(u64, Record)>, AuditError> {
        let mut out = Vec::new();
        self.query_each(q, |s, r| {
            out.push((s, r));
            true
        })?;
        Ok(out)
    }

    /// Call `f` with each matching record until it returns `false`; the
    /// number of matches.
    pub fn query_each(&self, q: &Query, mut f: impl FnMut(u64, Record) -> bool) -> Result<usize, AuditError> {
        let active = Some((self.active.path.as_path(), &self.active.index));
        query::run(&self.dir, &self.sealed, active, q, &mut f)
    }
}

/// Create the segment starting at `first_seq` and its anchor checkpoint.
fn create_segment(
    dir: &Path,
    key: &SigningKey,
    first_seq: u64,
    prev_hash: Hash,
    prev_time_ns: u64,
) -> Result<Active, AuditError> {
    let path = dir.join(segment::segment_name(first_seq));
    let tmp = path.with_extension("log.tmp");
    let header = SegmentHeader {
        first_seq,
        prev_hash,
        prev_time_ns,
    };
    {
        let mut f = File::create(&tmp).at(&tmp)?;
        f.write_all(&header.emit()).at(&tmp)?;
        f.sync_all().at(&tmp)?;
    }
    // The signed anchor exists before the segment does: a crash between the
    // two leaves at most an orphan sidecar (ignored, and replaced here next
    // time), never a segment that verify must call unanchored.
    let ckpt = segment::sidecar(&path, "ckpt");
    match std::fs::remove_file(&ckpt) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).at(&ckpt),
        _ => {}
    }
    let anchor = Checkpoint::sign(key, Purpose::Checkpoint, first_seq - 1, prev_hash, prev_time_ns);
    append_checkpoint(&ckpt, &anchor)?;
    std::fs::rename(&tmp, &path).at(&path)?;
    sync_dir(dir)?;
    let file = OpenOptions::new().append(true).open(&path).at(&path)?;
    Ok(Active {
        path,
        ckpt,
        file,
        header,
        bytes: HEADER_LEN as u64,
        index: SegmentIndex::new(first_seq),
    })
}

/// The state at the end of the active segment after recovery.
struct Tail {
    header: SegmentHeader,
    bytes: u64,
    index: SegmentIndex,
    last_seq: u64,
    last_hash: Hash,
    last_time: u64,
}

/// Verify the active segment, set aside a torn tail, and index it.
fn recover_active(path: &Path, recovery: &mut Recovery) -> Result<Tail, AuditError> {
    let (header, mut scan) = FrameScanner::open(path)?;
    let mut index = SegmentIndex::new(header.first_seq);
    let (mut last_seq, mut last_hash, mut last_time) = (header.first_seq - 1, header.prev_hash, header.prev_time_ns);
    let mut end = HEADER_LEN as u64;
    // A whole final frame whose hash does not match is what a crash can leave
    // when the payload reached the disk before the hash did: it is torn too.
    let mut bad: Option<(u64, String)> = None;
    let torn_at = loop {
        let step = scan.next_frame().at(path)?;
        if let Some((offset, reason)) = bad.take() {
            if step == Scan::End {
                break Some(offset);
            }
            return Err(AuditError::Corrupt {
                path: path.into(),
                offset,
                seq: last_seq + 1,
                reason: format!("{reason}; run `palisade audit verify`"),
            });
        }
        match step {
            Scan::End => break None,
            Scan::Torn { offset, .. } | Scan::BadLength { offset, .. } => break Some(offset),
            Scan::Frame { offset } => {
                let seq = last_seq + 1;
                if chain_hash(&last_hash, seq, &scan.payload) != scan.hash {
                    bad = Some((offset, "hash does not match the chain".into()));
                    continue;
                }
                let rec: Record = match serde_json::from_slice(&scan.payload) {
                    Ok(r) => r,
                    Err(e) => {
                        bad = Some((offset, format!("undecodable record: {e}")));
                        continue;
                    }
                };
                index.push(offset, &rec);
                (last_seq, last_hash, last_time) = (seq, scan.hash, rec.time_ns());
                end = scan.position();
            }
        }
    };
    if let Some(offset) = torn_at {
        let (moved_to, bytes) = set_aside(path, offset, "torn")?;
        recovery.torn.push(TornTail {
            file: path.into(),
            offset,
            bytes,
            moved_to,
            last_intact_seq: last_seq,
        });
        end = offset;
    }
    Ok(Tail {
        header,
        bytes: end,
        index,
        last_seq,
        last_hash,
        last_time,
    })
}

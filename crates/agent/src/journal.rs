//! The crash journal: the connections a worker made, changed or ended since
//! its last snapshot, in a memory-mapped file that outlives the process.
//!
//! Snapshots ([`crate::snapshot`]) are taken every 200 ms, so a crash loses
//! the connections opened in the last interval. Each worker therefore also
//! appends one record per connection event (start, state change, end; never
//! per packet) to its journal, `conntrack/host-N.journal` under the state
//! directory (a tmpfs such as `/run` in production). The file is mapped
//! shared, so a record is in the kernel's page cache as soon as it is
//! copied: a kill -9, the OOM killer or a panic loses nothing written (a
//! power cut loses the tmpfs anyway, snapshots included).
//!
//! The file holds two halves, each a header and a fixed number of
//! fixed-size slots. One half is active; a snapshot round switches the
//! worker to the other, resetting it under a new generation, at the moment
//! it encodes the worker's table. A crash before the snapshot's file is
//! renamed into place leaves the previous snapshot and both halves, which
//! together hold everything; a crash after it leaves the new snapshot and
//! records it already contains, which replay again to the same state (a
//! record holds the connection's whole state after its event, and every
//! state change makes one). A start replays the snapshot, then the older
//! half, then the newer.
//!
//! Across runs the same holds one level up. A start after a crash forwards
//! before its first snapshot round: it moves the previous run's journal
//! aside as the older generation (`host-N.journal.prev`), opens a fresh
//! one, and removes the older generation once its first round has written
//! every worker's file. A crash anywhere in between leaves the snapshot the
//! previous run wrote or the new one, the older generation and the new
//! journal: replayed in that order they are one unbroken stretch of events
//! that begins before the snapshot, so again nothing is lost and what the
//! snapshot already holds replays to the same state. An older generation is
//! checked like any journal (a bad header refuses it, a torn or damaged
//! record ends it, each counted). A start that finds one already there (its
//! predecessor crashed in that window) takes its first round before
//! forwarding, so generations never chain (see `Agent::start_journals`).
//!
//! Layout (big-endian), version 1:
//!
//! ```text
//! half:   header [HEADER_LEN] | capacity × slot
//! header: magic "PLSDJR" | version u16 | generation u64 | worker u32
//!         | capacity u32 | identity u64 | host_len u8 | host [59]
//!         | crc32 u32 (over the header before it)
//! slot:   generation u64 | op u8 | policy_version u64
//!         | record [state::RECORD_LEN] (the snapshot blobs' record)
//!         | crc32 u32 (over the slot before it)
//! ```
//!
//! A slot belongs to its half only if it carries the half's generation (a
//! reset does not clear the slots: the previous generation's records end
//! the journal by their number). The first slot of the half's generation
//! whose checksum fails ends it: the last record a kill interrupted
//! (`torn`, nothing valid after it) or damage (`corrupt`, valid records
//! after it, which are not trusted either). Both are dropped and counted,
//! never imported. A header that fails its checks refuses the whole file,
//! as does a journal of another host or vNIC set (its `identity`).
//!
//! The mapping is written through raw pointers only (never read back while
//! running, never borrowed as a slice), because another process may map
//! the same file; the logic is shared with an in-memory backing that the
//! tests (also under Miri) exercise through the same code.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::ptr::NonNull;

use palisade_datapath::state::{self, ConnRecord, RECORD_LEN, Snapshot};
use palisade_datapath::{Conn, EventKind, FlowEvent, peer_flags};
use palisade_wire::flow::FlowKey;
use palisade_wire::ip::IpProtocol;

const MAGIC: &[u8; 6] = b"PLSDJR";
/// The journal format version this build writes and reads.
pub const VERSION: u16 = 1;
/// Length of a half's header.
pub const HEADER_LEN: usize = 96;
/// Bytes of the host name a header keeps.
const HOST_MAX: usize = 59;
/// Length of one slot.
pub const SLOT_LEN: usize = 8 + 1 + 8 + RECORD_LEN + 4;
/// Slots per half by default: the connection events one worker may make
/// between two snapshots (a full half counts the events it could not keep).
pub const DEFAULT_CAPACITY: u32 = 16_384;
/// Most slots per half a file may claim (bounds what reading one costs).
pub const MAX_CAPACITY: u32 = 1 << 20;

/// A record's operation.
const OP_UPSERT: u8 = 1;
const OP_REMOVE: u8 = 2;

/// What a journal belongs to: a host and the vNICs it switches. A journal
/// written for another is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The host's name (its first 59 bytes are kept, for messages).
    pub host: String,
    /// A hash of the host's name and its sorted vNIC names.
    pub hash: u64,
}

impl Identity {
    /// The identity of `host` switching `vnics` (in any order).
    pub fn new<'a>(host: &str, vnics: impl IntoIterator<Item = &'a str>) -> Identity {
        let mut names: Vec<&str> = vnics.into_iter().collect();
        names.sort_unstable();
        // FNV-1a, 64 bits, over the host and each name, NUL-separated.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for part in std::iter::once(host).chain(names) {
            for &b in part.as_bytes().iter().chain(&[0]) {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        Identity {
            host: host.to_string(),
            hash: h,
        }
    }
}

/// Why a journal file was refused (nothing of it is imported).
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The file could not be read.
    #[error("cannot read it: {0}")]
    Io(#[from] io::Error),
    /// Not a regular file (a directory, a FIFO, a device...).
    #[error("not a regular file")]
    NotRegular,
    /// Its size is not two halves of the capacity its headers claim.
    #[error("{0}")]
    Geometry(String),
    /// Not a Palisade journal.
    #[error("not a Palisade crash journal (bad magic in half {0})")]
    BadMagic(usize),
    /// Written by a format version this build does not read.
    #[error("unsupported journal version {found} in half {half} (this build reads {VERSION})")]
    UnsupportedVersion {
        /// The half.
        half: usize,
        /// The version it claims.
        found: u16,
    },
    /// A header's checksum does not match.
    #[error("header checksum mismatch in half {0}")]
    HeaderChecksum(usize),
    /// Written by another host, or for another set of vNICs.
    #[error(
        "journal of host {found:?} with another vNIC set or host (identity {found_hash:#018x}, this agent's {expected:#018x})"
    )]
    Foreign {
        /// The host name the journal carries.
        found: String,
        /// Its identity.
        found_hash: u64,
        /// This agent's identity.
        expected: u64,
    },
}

impl JournalError {
    /// A short label for counters (`palisade_state_refused_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            JournalError::Io(_) => "unreadable",
            JournalError::NotRegular => "not_regular",
            JournalError::Geometry(_) => "truncated",
            JournalError::BadMagic(_) => "bad_magic",
            JournalError::UnsupportedVersion { .. } => "wrong_version",
            JournalError::HeaderChecksum(_) => "checksum",
            JournalError::Foreign { .. } => "foreign",
        }
    }
}

/// One replayed operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// The connection as it was after an event (created or changed).
    Upsert {
        /// The policy version its verdict was reached under.
        policy_version: u64,
        /// The connection.
        record: ConnRecord,
    },
    /// The connection with this (initiator-direction) key is gone.
    Remove(FlowKey),
}

/// What a journal file held.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replay {
    /// The operations, oldest first.
    pub ops: Vec<Op>,
    /// Last records a kill interrupted (dropped).
    pub torn: u64,
    /// Records that failed their checksum with valid records after them,
    /// or that passed it but did not decode (dropped, with the rest of
    /// their half).
    pub corrupt: u64,
}

/// The bytes a journal lives in: a shared mapping of its file, or (for
/// tests) a heap buffer. Both are written through the same raw pointer.
struct Backing {
    ptr: NonNull<u8>,
    len: usize,
    kind: BackingKind,
}

enum BackingKind {
    /// `munmap` on drop; the file stays open for as long as the mapping.
    Mapped(#[allow(dead_code)] File),
    /// Freed on drop (rebuilt from its parts).
    Heap,
}

// SAFETY: the backing is owned by one `Journal`, which is used by one
// thread at a time (behind its worker's lock); the pointer is valid for
// `len` bytes for the backing's whole life.
unsafe impl Send for Backing {}

impl Backing {
    fn heap(len: usize) -> Backing {
        let boxed: Box<[u8]> = vec![0u8; len].into_boxed_slice();
        let ptr = NonNull::new(Box::into_raw(boxed).cast::<u8>()).unwrap_or(NonNull::dangling());
        Backing {
            ptr,
            len,
            kind: BackingKind::Heap,
        }
    }

    fn mapped(path: &Path, len: usize) -> io::Result<Backing> {
        use std::os::unix::io::AsRawFd;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(len as u64)?;
        // SAFETY: a fresh shared read-write mapping of a file we just sized
        // to `len` bytes; the kernel picks the address. The result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // The journal is written a slot at a time and read back only by the
        // next run (with `read`, not through a mapping): read-ahead around a
        // faulting page only fills memory with the sparse file's zeros. It
        // cost a restart a few milliseconds per journal, before its first
        // new flow, on its first two writes (the headers). A hint: a failure
        // changes nothing else.
        // SAFETY: advice on the mapping just made, within its length.
        unsafe {
            libc::madvise(p, len, libc::MADV_RANDOM);
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Backing {
            ptr,
            len,
            kind: BackingKind::Mapped(file),
        })
    }

    /// Copy `bytes` to offset `at`. Panics (a bug, never input) if they do
    /// not fit: every offset is computed from the journal's own geometry.
    fn write(&mut self, at: usize, bytes: &[u8]) {
        assert!(at.checked_add(bytes.len()).is_some_and(|end| end <= self.len));
        // SAFETY: bounds checked above; `bytes` is ours and cannot overlap
        // the backing (nothing ever borrows the backing's memory).
        unsafe {
            self.ptr
                .as_ptr()
                .add(at)
                .copy_from_nonoverlapping(bytes.as_ptr(), bytes.len())
        }
    }

    /// A copy of the whole backing (tests read what a crash would leave).
    #[cfg(test)]
    fn snapshot(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        // SAFETY: `len` bytes are valid; `v` is a separate allocation.
        unsafe { v.as_mut_ptr().copy_from_nonoverlapping(self.ptr.as_ptr(), self.len) };
        v
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        match self.kind {
            // SAFETY: the mapping made in `mapped`, unmapped once.
            BackingKind::Mapped(_) => unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), self.len);
            },
            // SAFETY: the box leaked in `heap`, rebuilt with its length once.
            BackingKind::Heap => unsafe {
                drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                    self.ptr.as_ptr(),
                    self.len,
                )));
            },
        }
    }
}

/// Counters of a journal while it runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct JournalStats {
    /// Records written.
    pub records: u64,
    /// Events not written because the active half was full.
    pub overflows: u64,
    /// Halves switched (snapshot rounds).
    pub rotations: u64,
}

/// A worker's journal, open for appending.
pub struct Journal {
    backing: Backing,
    identity: Identity,
    worker: u32,
    capacity: u32,
    /// The active half and its generation.
    active: usize,
    generation: u64,
    /// Slots used in the active half.
    used: u32,
    /// A slot being built (no allocation per record once warm).
    scratch: Vec<u8>,
    /// The last snapshot round's file was not written: the older half
    /// holds events no snapshot on disk has, so the next round must not
    /// reset it (see [`Journal::rotate`]).
    older_unsaved: bool,
    /// What it did.
    pub stats: JournalStats,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("worker", &self.worker)
            .field("generation", &self.generation)
            .field("used", &self.used)
            .finish()
    }
}

/// CRC-32 (IEEE 802.3), the snapshot blobs' checksum, computed with the
/// carry-less multiply where the CPU has it: a record is checksummed on the
/// worker's path, where the bitwise form would cost a microsecond.
fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

fn half_len(capacity: u32) -> usize {
    HEADER_LEN + capacity as usize * SLOT_LEN
}

impl Journal {
    /// Create (or truncate) the journal at `path`, mapped shared, empty.
    pub fn create(path: &Path, identity: Identity, worker: u32, capacity: u32) -> io::Result<Journal> {
        let capacity = capacity.clamp(1, MAX_CAPACITY);
        let backing = Backing::mapped(path, 2 * half_len(capacity))?;
        Ok(Journal::init(backing, identity, worker, capacity))
    }

    /// A journal in memory (tests and benchmarks).
    pub fn in_memory(identity: Identity, worker: u32, capacity: u32) -> Journal {
        let capacity = capacity.clamp(1, MAX_CAPACITY);
        Journal::init(Backing::heap(2 * half_len(capacity)), identity, worker, capacity)
    }

    fn init(backing: Backing, identity: Identity, worker: u32, capacity: u32) -> Journal {
        let mut j = Journal {
            backing,
            identity,
            worker,
            capacity,
            active: 0,
            generation: 1,
            used: 0,
            scratch: Vec::with_capacity(SLOT_LEN),
            older_unsaved: false,
            stats: JournalStats::default(),
        };
        // The other half: generation 0, no records.
        j.write_header(1, 0);
        j.write_header(0, 1);
        j
    }

    fn write_header(&mut self, half: usize, generation: u64) {
        let mut h = [0u8; HEADER_LEN];
        h[..6].copy_from_slice(MAGIC);
        h[6..8].copy_from_slice(&VERSION.to_be_bytes());
        h[8..16].copy_from_slice(&generation.to_be_bytes());
        h[16..20].copy_from_slice(&self.worker.to_be_bytes());
        h[20..24].copy_from_slice(&self.capacity.to_be_bytes());
        h[24..32].copy_from_slice(&self.identity.hash.to_be_bytes());
        let host = truncate_utf8(&self.identity.host, HOST_MAX);
        h[32] = host.len() as u8;
        h[33..33 + host.len()].copy_from_slice(host.as_bytes());
        let crc = crc32(&h[..HEADER_LEN - 4]);
        h[HEADER_LEN - 4..].copy_from_slice(&crc.to_be_bytes());
        self.backing.write(half * half_len(self.capacity), &h);
    }

    /// Record what `event` did to its connection in `conn` (the connection
    /// as the engine holds it now, `None` once it is gone), at `now`.
    pub fn note(&mut self, event: &FlowEvent, conn: Option<&Conn>, now: u64) {
        match (event.kind, conn) {
            (EventKind::Denied(_), _) => {}
            (_, Some(c)) => self.append(OP_UPSERT, c.policy_version, c, now),
            (_, None) => self.append(OP_REMOVE, 0, &Conn::new(event.key, now), now),
        }
    }

    fn append(&mut self, op: u8, policy_version: u64, conn: &Conn, now: u64) {
        if self.used >= self.capacity {
            self.stats.overflows += 1;
            return;
        }
        let s = &mut self.scratch;
        s.clear();
        s.extend_from_slice(&self.generation.to_be_bytes());
        s.push(op);
        s.extend_from_slice(&policy_version.to_be_bytes());
        state::push_record(s, conn, now);
        let crc = crc32(s);
        s.extend_from_slice(&crc.to_be_bytes());
        debug_assert_eq!(s.len(), SLOT_LEN);
        let at = self.active * half_len(self.capacity) + HEADER_LEN + self.used as usize * SLOT_LEN;
        self.backing.write(at, &self.scratch);
        self.used += 1;
        self.stats.records += 1;
    }

    /// Switch to the other half, empty under the next generation: called
    /// while the worker's table is encoded for a snapshot, so the new half
    /// holds exactly what happens after it.
    ///
    /// After a round whose snapshot file was not written
    /// ([`Journal::snapshot_saved`] with `false`), it does not switch: the
    /// older half still holds the only copy of the events before that round,
    /// and resetting it would lose them. The active half keeps filling (a
    /// full half counts what it could not keep) until a round is written;
    /// its records that the written snapshot already holds replay to the
    /// same state.
    pub fn rotate(&mut self) {
        if self.older_unsaved {
            return;
        }
        self.active ^= 1;
        self.generation += 1;
        self.used = 0;
        self.write_header(self.active, self.generation);
        self.stats.rotations += 1;
    }

    /// Whether the snapshot file of the round that last called
    /// [`Journal::rotate`] was written. Until one is, rotations are held.
    pub fn snapshot_saved(&mut self, written: bool) {
        self.older_unsaved = !written;
    }

    /// Slots used in the active half.
    pub fn used(&self) -> u32 {
        self.used
    }

    #[cfg(test)]
    fn bytes(&self) -> Vec<u8> {
        self.backing.snapshot()
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A half's header, checked.
struct Header {
    generation: u64,
    capacity: u32,
}

fn read_header(bytes: &[u8], half: usize, identity: &Identity) -> Result<Header, JournalError> {
    if bytes.len() < HEADER_LEN {
        return Err(JournalError::Geometry(format!(
            "truncated: {} bytes, shorter than a header",
            bytes.len()
        )));
    }
    let h = &bytes[..HEADER_LEN];
    if &h[..6] != MAGIC {
        return Err(JournalError::BadMagic(half));
    }
    let version = u16::from_be_bytes([h[6], h[7]]);
    if version != VERSION {
        return Err(JournalError::UnsupportedVersion { half, found: version });
    }
    let crc = u32::from_be_bytes([h[92], h[93], h[94], h[95]]);
    if crc != crc32(&h[..HEADER_LEN - 4]) {
        return Err(JournalError::HeaderChecksum(half));
    }
    let be64 = |at: usize| u64::from_be_bytes(h[at..at + 8].try_into().unwrap_or([0; 8]));
    let hash = be64(24);
    if hash != identity.hash {
        let n = usize::from(h[32]).min(HOST_MAX);
        return Err(JournalError::Foreign {
            found: String::from_utf8_lossy(&h[33..33 + n]).into_owned(),
            found_hash: hash,
            expected: identity.hash,
        });
    }
    Ok(Header {
        generation: be64(8),
        capacity: u32::from_be_bytes([h[20], h[21], h[22], h[23]]),
    })
}

/// Read and check the journal at `path` for `identity`. The file is read,
/// not mapped: it is input like any other (its owner may be gone, or it
/// may be anyone's).
pub fn read(path: &Path, identity: &Identity) -> Result<Replay, JournalError> {
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.file_type().is_file() {
        return Err(JournalError::NotRegular);
    }
    let limit = 2 * half_len(MAX_CAPACITY) as u64;
    if meta.len() > limit {
        return Err(JournalError::Geometry(format!(
            "{} bytes, more than the largest journal ({limit})",
            meta.len()
        )));
    }
    let file = File::open(path)?;
    let mut replay = Replay::default();
    for (generation, at, capacity) in check_geometry(meta.len(), identity, |at, buf| file.read_exact_at(buf, at))? {
        // Only the slots this generation wrote (a half is megabytes, mostly
        // unused between two snapshots), read in chunks: up to the first slot
        // of another generation, or the whole half when one of its own fails
        // its checksum (telling a torn record from damage needs the rest).
        let slots = capacity as usize * SLOT_LEN;
        let mut buf = Vec::new();
        let mut whole = false;
        while buf.len() < slots {
            let from = buf.len();
            let n = if whole {
                slots - from
            } else {
                (slots - from).min(CHUNK_SLOTS * SLOT_LEN)
            };
            buf.resize(from + n, 0);
            file.read_exact_at(&mut buf[from..], at + (HEADER_LEN + from) as u64)?;
            if whole {
                break;
            }
            match buf[from..]
                .chunks_exact(SLOT_LEN)
                .position(|slot| !ours(slot, generation) || !sealed(slot))
            {
                Some(i) if ours(&buf[from + i * SLOT_LEN..], generation) => whole = true,
                Some(i) => {
                    buf.truncate(from + i * SLOT_LEN);
                    break;
                }
                None => {}
            }
        }
        read_slots(&buf, generation, &mut replay);
    }
    Ok(replay)
}

/// Slots [`read`] takes at a time.
const CHUNK_SLOTS: usize = 256;

/// Check a journal's two headers (read with `read_at(offset, buf)`) and its
/// length for `identity`; the halves to replay, oldest first, as
/// (generation, offset, capacity).
fn check_geometry(
    len: u64,
    identity: &Identity,
    mut read_at: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> Result<Vec<(u64, u64, u32)>, JournalError> {
    let mut h = [0u8; HEADER_LEN];
    if len < HEADER_LEN as u64 {
        return Err(JournalError::Geometry(format!(
            "truncated: {len} bytes, shorter than a header"
        )));
    }
    read_at(0, &mut h)?;
    let first = read_header(&h, 0, identity)?;
    if first.capacity == 0 || first.capacity > MAX_CAPACITY {
        return Err(JournalError::Geometry(format!(
            "capacity {} out of range",
            first.capacity
        )));
    }
    let half = half_len(first.capacity) as u64;
    if len != 2 * half {
        return Err(JournalError::Geometry(format!(
            "truncated or extended: {len} bytes, its capacity of {} records makes {}",
            first.capacity,
            2 * half
        )));
    }
    read_at(half, &mut h)?;
    let second = read_header(&h, 1, identity)?;
    if second.capacity != first.capacity {
        return Err(JournalError::Geometry(format!(
            "halves disagree on their capacity ({} and {})",
            first.capacity, second.capacity
        )));
    }
    let mut halves = vec![
        (first.generation, 0, first.capacity),
        (second.generation, half, first.capacity),
    ];
    halves.sort_by_key(|(g, _, _)| *g);
    halves.retain(|(g, _, _)| *g != 0);
    Ok(halves)
}

/// Check and decode a journal's bytes for `identity` (see [`read`], which
/// reads only the slots it needs of a file; the checks are the same).
pub fn parse(bytes: &[u8], identity: &Identity) -> Result<Replay, JournalError> {
    let halves = check_geometry(bytes.len() as u64, identity, |at, buf| {
        let at = at as usize;
        let src = bytes
            .get(at..at + buf.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    })?;
    let mut replay = Replay::default();
    for (generation, at, capacity) in halves {
        let at = at as usize + HEADER_LEN;
        read_slots(&bytes[at..at + capacity as usize * SLOT_LEN], generation, &mut replay);
    }
    Ok(replay)
}

/// Whether `slot` was written in `generation`.
fn ours(slot: &[u8], generation: u64) -> bool {
    slot[..8] == generation.to_be_bytes()
}

/// Whether `slot`'s checksum holds.
fn sealed(slot: &[u8]) -> bool {
    let (body, crc) = slot[..SLOT_LEN].split_at(SLOT_LEN - 4);
    crc32(body).to_be_bytes() == crc
}

fn read_slots(slots: &[u8], generation: u64, replay: &mut Replay) {
    let ours = |slot: &[u8]| ours(slot, generation);
    let mut chunks = slots.chunks_exact(SLOT_LEN);
    while let Some(slot) = chunks.next() {
        if !ours(slot) {
            // Never written in this generation: the end.
            return;
        }
        if !sealed(slot) {
            if chunks.any(|s| ours(s) && sealed(s)) {
                replay.corrupt += 1;
            } else {
                replay.torn += 1;
            }
            return;
        }
        let policy_version = u64::from_be_bytes(slot[9..17].try_into().unwrap_or([0; 8]));
        let record = match state::decode_record(&slot[17..17 + RECORD_LEN]) {
            Ok(r) => r,
            Err(_) => {
                replay.corrupt += 1;
                return;
            }
        };
        replay.ops.push(match slot[8] {
            OP_UPSERT => Op::Upsert { policy_version, record },
            OP_REMOVE => Op::Remove(record.key),
            _ => {
                replay.corrupt += 1;
                return;
            }
        });
    }
}

/// Apply `replay` to what a snapshot held (`None`: there was none): the
/// connections as they were when the journal's last record was written.
/// Journaled TCP connections get the snapshot's relaxed window checks (see
/// [`crate::snapshot`]). When a record was made under another policy
/// version than the snapshot's, the result carries version 0, so every
/// connection is checked against the policy on its next packet.
pub fn apply(snapshot: Option<Snapshot>, replay: Replay) -> Snapshot {
    let mut version = snapshot.as_ref().map(|s| s.policy_version);
    let mut snap = snapshot.unwrap_or(Snapshot {
        vnic: String::new(),
        policy_version: 0,
        conns: Vec::new(),
    });
    if replay.ops.is_empty() {
        // Nothing journaled since the snapshot: it stands as it is.
        return snap;
    }
    let mut versions_agree = true;
    // The journal's last word on each connection it names (`None`: removed),
    // and the order they first appear in. Indexed by the journal, which is
    // short beside the snapshot (a restart's critical path reads this): the
    // snapshot is then walked once, not indexed.
    let mut last: HashMap<FlowKey, Option<ConnRecord>> = HashMap::with_capacity(replay.ops.len());
    let mut order = Vec::new();
    for op in replay.ops {
        let (k, record) = match op {
            Op::Upsert {
                policy_version,
                mut record,
            } => {
                versions_agree &= *version.get_or_insert(policy_version) == policy_version;
                if record.key.protocol == IpProtocol::TCP {
                    for p in &mut record.tcp.peers {
                        p.flags |= peer_flags::BE_LIBERAL;
                    }
                }
                (record.key.canonical().0, Some(record))
            }
            Op::Remove(key) => (key.canonical().0, None),
        };
        if last.insert(k, record).is_none() {
            order.push(k);
        }
    }
    // The snapshot's connections, each the journal names replaced (in its
    // place) or removed by its last word. A word is used once: a second
    // record of the same connection in the snapshot then goes.
    snap.conns.retain_mut(|c| match last.get_mut(&c.key.canonical().0) {
        None => true,
        Some(word) => match word.take() {
            Some(record) => {
                *c = record;
                true
            }
            None => false,
        },
    });
    // Then the connections the snapshot did not hold.
    snap.conns
        .extend(order.iter().filter_map(|k| last.get_mut(k).and_then(Option::take)));
    snap.policy_version = if versions_agree { version.unwrap_or(0) } else { 0 };
    snap
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_datapath::ConnState;
    use palisade_wire::flow::Segment;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            segment: Segment::vlan(100),
            src: [1; 16],
            dst: [2; 16],
            src_port: port,
            dst_port: 80,
            protocol: IpProtocol::TCP,
            icmp_type: 0,
            icmp_code: 0,
        }
    }

    fn conn(port: u16, state: ConnState) -> Conn {
        let mut c = Conn::new(key(port), 10);
        c.state = state;
        c.policy_version = 7;
        c.packets = u64::from(port);
        c
    }

    fn event(kind: EventKind, port: u16) -> FlowEvent {
        conn(port, ConnState::SynSent).event(kind, 20)
    }

    fn ident() -> Identity {
        Identity::new("hv1", ["web-1.0", "db-1.0"])
    }

    /// A journal with: 1 opened, 2 opened, 1 established, 2 ended and gone.
    fn written() -> Journal {
        let mut j = Journal::in_memory(ident(), 0, 8);
        j.note(&event(EventKind::Start, 1), Some(&conn(1, ConnState::SynSent)), 20);
        j.note(&event(EventKind::Start, 2), Some(&conn(2, ConnState::SynSent)), 20);
        j.note(&event(EventKind::Update, 1), Some(&conn(1, ConnState::Established)), 30);
        j.note(&event(EventKind::End(palisade_datapath::EndReason::Reset), 2), None, 40);
        j
    }

    fn states(s: &Snapshot) -> Vec<(u16, ConnState)> {
        let mut v: Vec<_> = s.conns.iter().map(|c| (c.key.src_port, c.state)).collect();
        v.sort_by_key(|(p, _)| *p);
        v
    }

    #[test]
    fn replay_gives_the_table_as_of_the_last_record() {
        let j = written();
        let r = parse(&j.bytes(), &ident()).unwrap();
        assert_eq!((r.ops.len(), r.torn, r.corrupt), (4, 0, 0));
        let s = apply(None, r);
        assert_eq!(states(&s), [(1, ConnState::Established)]);
        assert_eq!(s.policy_version, 7);
        assert!(
            s.conns[0]
                .tcp
                .peers
                .iter()
                .all(|p| p.flags & peer_flags::BE_LIBERAL != 0)
        );
        // Denied flows make no record.
        let mut j = written();
        j.note(
            &event(EventKind::Denied(palisade_datapath::DropReason::PolicyDeny), 9),
            None,
            50,
        );
        assert_eq!(j.used(), 4);
    }

    #[test]
    fn a_rotation_keeps_both_halves_until_the_next_and_replays_them_in_order() {
        let mut j = written();
        j.rotate();
        // After the snapshot was encoded: 1 closes, 3 opens.
        j.note(
            &event(EventKind::End(palisade_datapath::EndReason::Closed), 1),
            None,
            50,
        );
        j.note(&event(EventKind::Start, 3), Some(&conn(3, ConnState::SynSent)), 50);
        let r = parse(&j.bytes(), &ident()).unwrap();
        assert_eq!(r.ops.len(), 6, "the older half's records, then the newer's");
        // Over the snapshot taken at the rotation (1 established), or the one before it (empty).
        let snap = Snapshot {
            vnic: String::new(),
            policy_version: 7,
            conns: vec![
                state::decode(&state::encode("x", 7, &[conn(1, ConnState::Established)], 30))
                    .unwrap()
                    .conns
                    .remove(0),
            ],
        };
        assert_eq!(states(&apply(Some(snap), r.clone())), [(3, ConnState::SynSent)]);
        assert_eq!(states(&apply(None, r)), [(3, ConnState::SynSent)]);
        // A second rotation resets the first half: its records are gone.
        j.rotate();
        let r = parse(&j.bytes(), &ident()).unwrap();
        assert_eq!(r.ops.len(), 2);
    }

    /// Two snapshot rounds in a row whose files were not written: the
    /// events before the first must still be in the journal, since no
    /// snapshot on disk holds them (the last written snapshot is older).
    #[test]
    fn rounds_whose_snapshot_was_not_written_do_not_reset_the_older_half() {
        let mut j = written();
        j.rotate();
        j.snapshot_saved(false);
        j.note(&event(EventKind::Start, 3), Some(&conn(3, ConnState::SynSent)), 50);
        j.rotate();
        j.snapshot_saved(false);
        j.note(&event(EventKind::Start, 4), Some(&conn(4, ConnState::SynSent)), 60);
        let r = parse(&j.bytes(), &ident()).unwrap();
        assert_eq!(r.ops.len(), 6, "every record since the last written snapshot");
        assert_eq!(
            states(&apply(None, r)),
            [
                (1, ConnState::Established),
                (3, ConnState::SynSent),
                (4, ConnState::SynSent)
            ]
        );
        // A round that is written (its rotation still held, as it began
        // before the write) lets the next one switch: the half it resets
        // held only events before the first failed round, which the
        // written snapshot has; the other half (3, 4, 5) is kept.
        j.rotate();
        j.snapshot_saved(true);
        j.note(&event(EventKind::Start, 5), Some(&conn(5, ConnState::SynSent)), 70);
        j.rotate();
        let r = parse(&j.bytes(), &ident()).unwrap();
        assert_eq!(r.ops.len(), 3, "the kept half's records: 3, 4 and 5");
        assert_eq!(
            states(&apply(None, r)),
            [
                (3, ConnState::SynSent),
                (4, ConnState::SynSent),
                (5, ConnState::SynSent)
            ]
        );
    }

    /// The replay as first written: the snapshot indexed, every operation
    /// applied in turn (the reference `apply` must agree with).
    fn apply_reference(snapshot: Option<Snapshot>, replay: Replay) -> Snapshot {
        let mut version = snapshot.as_ref().map(|s| s.policy_version);
        let mut snap = snapshot.unwrap_or(Snapshot {
            vnic: String::new(),
            policy_version: 0,
            conns: Vec::new(),
        });
        let mut versions_agree = true;
        let mut by_key: HashMap<FlowKey, usize> = snap
            .conns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.key.canonical().0, i))
            .collect();
        let mut conns: Vec<Option<ConnRecord>> = snap.conns.drain(..).map(Some).collect();
        for op in replay.ops {
            match op {
                Op::Upsert {
                    policy_version,
                    mut record,
                } => {
                    versions_agree &= *version.get_or_insert(policy_version) == policy_version;
                    for p in &mut record.tcp.peers {
                        p.flags |= peer_flags::BE_LIBERAL;
                    }
                    let k = record.key.canonical().0;
                    match by_key.get(&k) {
                        Some(&i) => conns[i] = Some(record),
                        None => {
                            by_key.insert(k, conns.len());
                            conns.push(Some(record));
                        }
                    }
                }
                Op::Remove(key) => {
                    if let Some(i) = by_key.remove(&key.canonical().0) {
                        conns[i] = None;
                    }
                }
            }
        }
        snap.policy_version = if versions_agree { version.unwrap_or(0) } else { 0 };
        snap.conns = conns.into_iter().flatten().collect();
        snap
    }

    /// Snapshots and journals at random: `apply` (indexing the journal, not
    /// the snapshot) gives the same connections, states and policy version
    /// as the reference; an empty journal leaves the snapshot as it was.
    #[test]
    fn apply_agrees_with_the_reference_on_random_journals() {
        let record = |port: u16, state: ConnState, packets: u64| {
            let mut c = conn(port, state);
            c.packets = packets;
            state::decode(&state::encode("x", 7, &[c], 30)).unwrap().conns.remove(0)
        };
        let summary = |s: &Snapshot| {
            let mut v: Vec<_> = s
                .conns
                .iter()
                .map(|c| (c.key.src_port, c.state, c.packets, c.tcp.peers.map(|p| p.flags)))
                .collect();
            v.sort_by_key(|e| e.0);
            (v, s.policy_version)
        };
        let mut x = 0x2545_f491_u32;
        let mut next = |n: u32| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x % n
        };
        for round in 0..300 {
            let snapshot = (next(4) != 0).then(|| Snapshot {
                vnic: "x".into(),
                policy_version: 7,
                conns: (0..40u16)
                    .filter(|_| next(2) == 0)
                    .map(|p| record(p, ConnState::Established, 1))
                    .collect(),
            });
            let mut replay = Replay::default();
            for i in 0..next(30) {
                let port = next(60) as u16;
                replay.ops.push(if next(3) == 0 {
                    Op::Remove(key(port))
                } else {
                    Op::Upsert {
                        policy_version: if next(20) == 0 { 8 } else { 7 },
                        record: record(port, ConnState::SynSent, u64::from(i) + 2),
                    }
                });
            }
            let empty = replay.ops.is_empty();
            let want = apply_reference(snapshot.clone(), replay.clone());
            let got = apply(snapshot.clone(), replay);
            assert_eq!(summary(&got), summary(&want), "round {round}");
            if empty && let Some(s) = snapshot {
                assert_eq!(got.conns, s.conns, "round {round}: unchanged, in order");
            }
        }
    }

    #[test]
    fn a_full_half_counts_what_it_could_not_keep() {
        let mut j = Journal::in_memory(ident(), 0, 2);
        for p in 1..=5 {
            j.note(&event(EventKind::Start, p), Some(&conn(p, ConnState::SynSent)), 20);
        }
        assert_eq!((j.stats.records, j.stats.overflows), (2, 3));
        j.rotate();
        j.note(&event(EventKind::Start, 6), Some(&conn(6, ConnState::SynSent)), 20);
        assert_eq!(j.stats.records, 3);
        let r = parse(&j.bytes(), &ident()).unwrap();
        assert_eq!(r.ops.len(), 3);
    }

    /// Every way a record can be cut short by a kill: the last one torn at
    /// each byte is dropped and counted, the ones before it replayed.
    #[test]
    fn a_torn_last_record_is_dropped_and_counted_at_every_cut() {
        let j = written();
        let full = j.bytes();
        let last = HEADER_LEN + 3 * SLOT_LEN;
        // What the slot held before the write: zeros (a fresh file).
        for cut in 0..SLOT_LEN {
            let mut b = full.clone();
            b[last + cut..last + SLOT_LEN].fill(0);
            let r = parse(&b, &ident()).unwrap();
            let (ops, torn) = (r.ops.len(), r.torn);
            if cut < 8 {
                // Its generation not all written: not a record of this half yet.
                assert_eq!((ops, torn), (3, 0), "cut at {cut}");
            } else {
                assert_eq!((ops, torn, r.corrupt), (3, 1, 0), "cut at {cut}");
            }
        }
    }

    #[test]
    fn damage_before_the_last_record_drops_the_rest_of_the_half() {
        let j = written();
        let mut b = j.bytes();
        b[HEADER_LEN + SLOT_LEN + 40] ^= 1;
        let r = parse(&b, &ident()).unwrap();
        assert_eq!((r.ops.len(), r.torn, r.corrupt), (1, 0, 1));
    }

    /// Table-driven: every damaged, foreign or odd file is refused with
    /// its reason, never imported and never a panic.
    #[test]
    fn bad_files_are_refused_with_their_reason() {
        let good = written().bytes();
        let half = good.len() / 2;
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            b
        };
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", Vec::new(), "truncated"),
            ("half a header", good[..40].to_vec(), "truncated"),
            ("one half", good[..half].to_vec(), "truncated"),
            ("cut in the second half", good[..good.len() - 1].to_vec(), "truncated"),
            ("a byte too many", with(&|b| b.push(0)), "truncated"),
            ("bad magic", with(&|b| b[0] = b'X'), "bad_magic"),
            ("version 2", with(&|b| b[7] = 2), "wrong_version"),
            (
                "version 2 in the second half",
                with(&|b| b[half + 7] = 2),
                "wrong_version",
            ),
            ("header bit flip", with(&|b| b[10] ^= 1), "checksum"),
            ("second header bit flip", with(&|b| b[half + 50] ^= 1), "checksum"),
        ];
        for (what, bytes, reason) in cases {
            let e = parse(&bytes, &ident()).expect_err(what);
            assert_eq!(e.reason(), reason, "{what}: {e}");
        }
        for other in [
            Identity::new("hv2", ["web-1.0", "db-1.0"]),
            Identity::new("hv1", ["web-1.0"]),
            Identity::new("hv1", ["web-1.0", "db-1.0", "app-1.0"]),
        ] {
            let e = parse(&good, &other).unwrap_err();
            assert_eq!(e.reason(), "foreign");
            assert!(e.to_string().contains("\"hv1\""), "{e}");
        }
        // The vNICs' order does not matter.
        assert!(parse(&good, &Identity::new("hv1", ["db-1.0", "web-1.0"])).is_ok());
        // Any single bit flip anywhere: refused, or replayed without it.
        for i in (0..good.len()).step_by(7) {
            let b = with(&|b| b[i] ^= 0x10);
            if let Ok(r) = parse(&b, &ident()) {
                assert!(r.ops.len() <= 4);
            }
        }
    }

    #[test]
    fn a_mapped_journal_is_on_disk_as_soon_as_it_is_written() {
        if cfg!(miri) {
            return; // Miri cannot map files.
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host-0.journal");
        let mut j = Journal::create(&path, ident(), 0, 8).unwrap();
        j.note(&event(EventKind::Start, 1), Some(&conn(1, ConnState::SynSent)), 20);
        // Read while the mapping lives (what a restart after kill -9 reads).
        let r = read(&path, &ident()).unwrap();
        assert_eq!(r.ops.len(), 1);
        drop(j);
        assert_eq!(read(&path, &ident()).unwrap().ops.len(), 1);
        let e = read(dir.path(), &ident()).unwrap_err();
        assert_eq!(e.reason(), "not_regular");
    }
}

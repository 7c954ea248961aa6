//! Connection state on disk: what a clean stop saves and what a crash leaves.
//!
//! On SIGTERM the agent saves every worker's connections exactly
//! (`conntrack/host-N.state`). A crash (kill -9, the OOM killer, a panic)
//! saves nothing, so the control thread also snapshots every worker's table
//! on a timer (`conntrack/host-N.snapshot`, every 200 ms by default). Each
//! file is written beside its name and renamed over it, so a crash in the
//! middle of a write leaves the previous snapshot whole; the blob is
//! checksummed, so a torn or foreign file is refused with a message and a
//! counter, never half imported.
//!
//! A start prefers a clean save. Without one it resumes from the snapshots,
//! with TCP window checks relaxed for the connections they hold (their
//! windows moved on after the snapshot was taken; they are learned again
//! from the traffic, as Linux does for a connection it picks up), and says
//! how old the snapshots were. What a crash can still lose is bounded by
//! the interval: a connection opened after the last snapshot. A liberal zone
//! picks it up again from its next segment; a strict zone drops it, as it
//! drops any segment of a connection it never saw open.
//!
//! The cost is bounded too: each worker is locked only while its table is
//! encoded, and the next snapshot waits at least [`COST_FACTOR`] times as
//! long as the last one took, so a huge table is snapshotted less often
//! rather than stalling its worker for a larger share of the time.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A snapshot waits at least this many times its own duration after the
/// previous one: the workers' lost time stays under 1/`COST_FACTOR`.
pub const COST_FACTOR: u32 = 20;

/// Default interval between snapshots.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(200);

/// How long after the workers start a start's first snapshot round waits
/// (at most; a shorter interval is kept): the first new flows after a
/// restart pass first (see [`SnapshotTimer::first_round_after_start`]).
pub const FIRST_ROUND_AFTER_START: Duration = Duration::from_millis(200);

/// Which of the two kinds of state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateKind {
    /// Saved at a clean stop: exact, used once.
    Saved,
    /// Taken on a timer while running: what a crash leaves.
    Snapshot,
    /// The crash journal written since the last snapshot ([`crate::journal`]).
    Journal,
    /// The journal of the run before, kept beside this run's until this
    /// run's first snapshot holds what it adds (see
    /// [`crate::journal`]'s generations across runs).
    PrevJournal,
}

impl StateKind {
    fn extension(self) -> &'static str {
        match self {
            StateKind::Saved => "state",
            StateKind::Snapshot => "snapshot",
            StateKind::Journal => "journal",
            StateKind::PrevJournal => "journal.prev",
        }
    }
}

/// The directory holding the state files.
fn state_dir(dir: &Path) -> PathBuf {
    dir.join("conntrack")
}

/// Worker `worker`'s file of `kind` under the agent's state directory.
pub fn state_path(dir: &Path, worker: usize, kind: StateKind) -> PathBuf {
    state_dir(dir).join(format!("host-{worker}.{}", kind.extension()))
}

/// Every file of `kind` under the agent's state directory, sorted by name.
/// For [`StateKind::Saved`], `host.state` (what a single-threaded agent
/// wrote) too.
pub fn state_files(dir: &Path, kind: StateKind) -> Vec<PathBuf> {
    let ext = kind.extension();
    let mut files: Vec<PathBuf> = std::fs::read_dir(state_dir(dir))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        (kind == StateKind::Saved && n == "host.state")
                            || n.strip_prefix("host-")
                                .and_then(|rest| rest.strip_suffix(ext))
                                .and_then(|rest| rest.strip_suffix('.'))
                                .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// The worker index a state file's name carries (`host-N.kind`).
pub fn worker_of(path: &Path) -> Option<usize> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix("host-")?.split('.').next()?.parse().ok()
}

/// The name an agent's state blobs carry: its host and vNIC set, so that a
/// start refuses state another host (or another configuration) left.
pub fn blob_name(identity: &crate::journal::Identity) -> String {
    format!("{HOST_BLOB}:{}:{:016x}", identity.host, identity.hash)
}

/// The name of a whole-engine blob written before blobs named their host
/// (read as this host's: an upgrade keeps its connections).
const HOST_BLOB: &str = "*host*";

/// Check that a decoded state blob is this agent's (see [`blob_name`]):
/// `Err` names whose it is.
pub fn check_blob_name(found: &str, identity: &crate::journal::Identity) -> Result<(), String> {
    if found == HOST_BLOB || found == blob_name(identity) {
        return Ok(());
    }
    Err(match found.strip_prefix("*host*:").and_then(|r| r.rsplit_once(':')) {
        Some((host, hash)) if host == identity.host => format!(
            "written by host {host:?} with another vNIC set (identity {hash}, this agent's {:016x})",
            identity.hash
        ),
        Some((host, _)) => format!("written by another host, {host:?}"),
        None => format!("not a host's state (it names {found:?}: a vNIC's migration blob?)"),
    })
}

/// A short label for why a state blob was refused (metrics, `/health`).
pub fn refusal_reason(e: &palisade_datapath::StateError) -> &'static str {
    use palisade_datapath::StateError as E;
    match e {
        E::Truncated | E::Cut { .. } => "truncated",
        E::BadMagic => "bad_magic",
        E::UnsupportedVersion(_) => "wrong_version",
        E::BadChecksum { .. } => "checksum",
        E::Malformed(_) => "malformed",
        E::ForeignVnic { .. } | E::UnknownPort => "foreign",
        E::NoRoom { .. } => "no_room",
    }
}

/// Write `blob` to `path` so that a reader (or a crash) sees either the
/// old file or the new one whole: written to a temporary name beside it,
/// then renamed over it.
pub fn write_state(path: &Path, blob: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, blob)?;
    std::fs::rename(&tmp, path)
}

/// What the snapshots did, for metrics and `/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct SnapshotStats {
    /// The configured interval in milliseconds (0: snapshots are off).
    pub interval_ms: u64,
    /// Rounds written (every worker's file).
    pub written: u64,
    /// Rounds in which some worker's file could not be written.
    pub failures: u64,
    /// Connections in the last round.
    pub last_connections: u64,
    /// Bytes written in the last round.
    pub last_bytes: u64,
    /// How long the last round took, nanoseconds (encoding and writing).
    pub last_duration_ns: u64,
}

/// When to take the next snapshot.
#[derive(Debug)]
pub struct SnapshotTimer {
    interval: Option<Duration>,
    next: Instant,
    /// The last round failed.
    failing: bool,
    /// What the rounds did so far.
    pub stats: SnapshotStats,
}

impl SnapshotTimer {
    /// A timer for snapshots every `interval` (`None`: never).
    pub fn new(interval: Option<Duration>, now: Instant) -> SnapshotTimer {
        SnapshotTimer {
            interval,
            next: now + interval.unwrap_or_default(),
            failing: false,
            stats: SnapshotStats {
                interval_ms: interval.map_or(0, |i| i.as_millis() as u64),
                ..SnapshotStats::default()
            },
        }
    }

    /// Whether a snapshot is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.interval.is_some() && now >= self.next
    }

    /// Make a start's first round (taken once the workers forward) due
    /// [`FIRST_ROUND_AFTER_START`] after `workers_start`, or one interval
    /// after it if that is shorter.
    ///
    /// Not at once: right after a restart the first new flows arrive, and a
    /// round encodes every worker's whole table under its lock (and writes
    /// it) on a machine whose cores the start-up has just been using; taken
    /// then it delayed new connections (seen in `bench/chaos.sh`). Nothing
    /// is less safe meanwhile: the run's fresh journals hold every event
    /// since the start and the previous run's, kept aside, the rest (see
    /// [`crate::journal`]); a crash before the round only makes the next
    /// start take its round before forwarding.
    pub fn first_round_after_start(&mut self, workers_start: Instant) {
        let delay = self
            .interval
            .map_or(FIRST_ROUND_AFTER_START, |i| i.min(FIRST_ROUND_AFTER_START));
        self.next = workers_start + delay;
    }

    /// Whether the last round failed to write some file.
    pub fn failing(&self) -> bool {
        self.failing
    }

    /// A round that started at `started` ended at `now`, holding
    /// `connections` in `bytes`, every file written (`ok`) or not.
    pub fn done(&mut self, started: Instant, now: Instant, connections: u64, bytes: u64, ok: bool) {
        let took = now.saturating_duration_since(started);
        let interval = self.interval.unwrap_or_default();
        // Measured from the round's start: a round every interval, or every
        // COST_FACTOR times its duration when that is longer.
        self.next = started + interval.max(took * COST_FACTOR);
        self.failing = !ok;
        let s = &mut self.stats;
        if ok {
            s.written += 1;
        } else {
            s.failures += 1;
        }
        s.last_connections = connections;
        s.last_bytes = bytes;
        s.last_duration_ns = took.as_nanos() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_found_by_kind_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("conntrack")).unwrap();
        for name in [
            "host-0.state",
            "host-1.state",
            "host.state",
            "host-0.snapshot",
            "host-0.tmp",
            "host-.state",
            "host-x.snapshot",
            "host-1.snapshot.tmp",
            "host-0.journal",
            "host-2.journal.prev",
            "host-2.journal.prev.tmp",
            "other-0.state",
        ] {
            std::fs::write(dir.path().join("conntrack").join(name), b"").unwrap();
        }
        let names = |kind| -> Vec<String> {
            state_files(dir.path(), kind)
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names(StateKind::Saved), ["host-0.state", "host-1.state", "host.state"]);
        assert_eq!(names(StateKind::Snapshot), ["host-0.snapshot"]);
        assert_eq!(names(StateKind::Journal), ["host-0.journal"]);
        assert_eq!(names(StateKind::PrevJournal), ["host-2.journal.prev"]);
        assert_eq!(worker_of(&state_path(dir.path(), 2, StateKind::PrevJournal)), Some(2));
        assert_eq!(
            state_path(dir.path(), 3, StateKind::Snapshot),
            dir.path().join("conntrack/host-3.snapshot")
        );
    }

    #[test]
    fn a_write_replaces_the_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host-0.snapshot");
        write_state(&path, b"first").unwrap();
        write_state(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert!(!path.with_extension("tmp").exists());
    }

    #[test]
    fn the_timer_keeps_its_interval_and_backs_off_from_slow_rounds() {
        let t0 = Instant::now();
        let mut t = SnapshotTimer::new(Some(Duration::from_millis(200)), t0);
        assert!(!t.due(t0));
        assert!(t.due(t0 + Duration::from_millis(200)));
        // A fast round: the next is one interval after it started.
        let start = t0 + Duration::from_millis(200);
        t.done(start, start + Duration::from_millis(1), 10, 100, true);
        assert!(!t.due(start + Duration::from_millis(199)));
        assert!(t.due(start + Duration::from_millis(200)));
        // A 50 ms round: the next waits until 20 × 50 ms after its start.
        let start = start + Duration::from_millis(201);
        t.done(start, start + Duration::from_millis(50), 10, 100, false);
        assert!(!t.due(start + Duration::from_millis(999)));
        assert!(t.due(start + Duration::from_millis(1000)));
        assert_eq!((t.stats.written, t.stats.failures, t.stats.interval_ms), (1, 1, 200));
        assert!(t.failing(), "the last round failed");
        assert_eq!(t.stats.last_duration_ns, 50_000_000);
        let off = SnapshotTimer::new(None, t0);
        assert!(!off.due(t0 + Duration::from_secs(3600)));
    }

    /// A start's first round is not due with the first new flows: it waits
    /// FIRST_ROUND_AFTER_START after the workers start (or a shorter
    /// interval), however long the start-up itself took. (It used to be
    /// due at once.)
    #[test]
    fn a_starts_first_round_waits_for_the_first_flows() {
        let t0 = Instant::now();
        let interval = Duration::from_millis(60_000);
        let mut t = SnapshotTimer::new(Some(interval), t0);
        let workers = t0 + Duration::from_millis(40);
        t.first_round_after_start(workers);
        assert!(!t.due(workers), "not with the first flows");
        assert!(!t.due(workers + FIRST_ROUND_AFTER_START - Duration::from_millis(1)));
        assert!(
            t.due(workers + FIRST_ROUND_AFTER_START),
            "not a whole long interval later either"
        );
        let mut fast = SnapshotTimer::new(Some(Duration::from_millis(50)), t0);
        fast.first_round_after_start(workers);
        assert!(!fast.due(workers + Duration::from_millis(49)));
        assert!(
            fast.due(workers + Duration::from_millis(50)),
            "a shorter interval is kept"
        );
        let mut off = SnapshotTimer::new(None, t0);
        off.first_round_after_start(workers);
        assert!(!off.due(workers + Duration::from_secs(3600)), "off stays off");
    }
}

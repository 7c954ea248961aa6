//! Housekeeping that holds a worker's lock stands aside for a live
//! migration's pause.
//!
//! A migration's pause takes every worker's lock twice, on the source (the
//! delta's export and quiesce) and on the destination (the delta's apply);
//! whatever holds a lock then adds its hold to the guest's blackout. Two
//! periodic jobs hold a lock for a time that grows with the table: the
//! workers' sweep of their connection tables (expiry, and the minute's
//! update records) and the control thread's state snapshot (the whole table
//! encoded under the lock, every 200 ms by default). At 50,000 connections
//! each is milliseconds, and a pause that lands on one waits for it (issue
//! #20: a 4 ms apply of a one-connection delta).
//!
//! Two signals, process-wide (a process's workers are locked together by a
//! migration, so one flag serves them all):
//! - a migration in flight ([`Quiet::begin_migration`] at the source's pre-copy or
//!   the destination's staging, [`Quiet::end_migration`] when its pause is over):
//!   no snapshot round and no sweep step starts meanwhile, for at most
//!   [`MAX_QUIET`] after the last begin (a migration that never ends, such as
//!   a source that died, does not stop them for longer);
//! - a lock wanted now ([`Quiet::want_locks`], held while a control call takes and
//!   holds the workers' locks): a worker takes no further sweep step, so the
//!   call waits for one step at most (a step looks at a bounded number of
//!   slots, [`sweep_step_slots`]).
//!
//! The deferred work is not lost: a sweep resumes where it stopped and a
//! snapshot round is taken when the quiet ends, so expiry and the crash
//! snapshot's age are late by at most [`MAX_QUIET`].

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The longest a migration in flight holds housekeeping off, from its begin.
pub(crate) const MAX_QUIET: Duration = Duration::from_secs(5);

/// Slots of the connection table a sweep step looks at under the worker's
/// lock: a few hundred microseconds at most (a slot is a few hundred bytes,
/// read in order), so a lock taker waits for that at most.
pub(crate) const SWEEP_STEP_SLOTS: usize = 4096;

/// The signals, process-wide in [`QUIET`] (a type so a test has its own).
pub(crate) struct Quiet {
    /// Migrations in flight.
    in_flight: AtomicUsize,
    /// Until when (ns since [`origin`]) the migrations in flight hold housekeeping off.
    until: AtomicU64,
    /// Control calls waiting for or holding the workers' locks.
    locks_wanted: AtomicUsize,
}

/// This process's signals.
pub(crate) static QUIET: Quiet = Quiet::new();

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    origin().elapsed().as_nanos() as u64
}

impl Quiet {
    const fn new() -> Quiet {
        Quiet {
            in_flight: AtomicUsize::new(0),
            until: AtomicU64::new(0),
            locks_wanted: AtomicUsize::new(0),
        }
    }

    /// A migration starts (its pre-copy is out, or staged here):
    /// housekeeping holds off until it ends, for [`MAX_QUIET`] at most.
    pub(crate) fn begin_migration(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.until
            .fetch_max(now_ns() + MAX_QUIET.as_nanos() as u64, Ordering::SeqCst);
    }

    /// A migration begun with [`Quiet::begin_migration`] is over (its pause
    /// is past, or it was abandoned). An end without a begin changes nothing.
    pub(crate) fn end_migration(&self) {
        let _ = self
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    /// The workers' locks are wanted now: no sweep step starts until the
    /// returned value is dropped.
    pub(crate) fn want_locks(&self) -> LocksWanted<'_> {
        self.locks_wanted.fetch_add(1, Ordering::SeqCst);
        LocksWanted(self)
    }

    /// Whether a migration in flight holds housekeeping (snapshot rounds,
    /// sweep steps) off now.
    pub(crate) fn migration_quiet(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) > 0 && now_ns() < self.until.load(Ordering::SeqCst) && !quiet_disabled()
    }

    /// Whether a worker may take a sweep step now.
    pub(crate) fn sweep_may_step(&self) -> bool {
        self.locks_wanted.load(Ordering::SeqCst) == 0 && !self.migration_quiet()
    }
}

/// Held while a control call waits for and holds the workers' locks.
#[must_use = "the locks are wanted while this lives"]
pub(crate) struct LocksWanted<'a>(&'a Quiet);

impl Drop for LocksWanted<'_> {
    fn drop(&mut self) {
        self.0.locks_wanted.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The sweep step's size: [`SWEEP_STEP_SLOTS`], or for a measurement
/// `PALISADE_SWEEP_STEP_SLOTS` (a positive number; a huge one makes each
/// sweep one step, as before steps existed).
pub(crate) fn sweep_step_slots() -> usize {
    std::env::var("PALISADE_SWEEP_STEP_SLOTS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(SWEEP_STEP_SLOTS)
}

/// Whether migrations leave housekeeping alone (`PALISADE_MIGRATION_QUIET=0`,
/// for a measurement of what the quiet saves).
fn quiet_disabled() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    *OFF.get_or_init(|| std::env::var("PALISADE_MIGRATION_QUIET").is_ok_and(|v| v == "0"))
}

/// Whether housekeeping's lock holds are logged (`PALISADE_LOG_HOLDS=1`,
/// for a measurement: a line per sweep pass and snapshot round).
pub(crate) fn log_holds() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("PALISADE_LOG_HOLDS").is_ok_and(|v| v == "1"))
}

/// A monotonic clock reading in ns (CLOCK_MONOTONIC, as the migration
/// logs' readings of [`crate::peer`]): lines of both agents line up.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_migration_holds_housekeeping_off_until_it_ends_and_wanted_locks_stop_steps() {
        let q = Quiet::new();
        assert!(!q.migration_quiet() && q.sweep_may_step());
        q.begin_migration();
        q.begin_migration();
        assert!(q.migration_quiet() && !q.sweep_may_step());
        q.end_migration();
        // One of two still in flight.
        assert!(q.migration_quiet());
        q.end_migration();
        assert!(!q.migration_quiet() && q.sweep_may_step());
        // An end without a begin is harmless: the next begin still counts.
        q.end_migration();
        q.begin_migration();
        assert!(q.migration_quiet());
        // A migration that never ends holds off only until its deadline.
        q.until.store(now_ns().saturating_sub(1), Ordering::SeqCst);
        assert!(!q.migration_quiet());
        q.end_migration();
        let wanted = q.want_locks();
        assert!(!q.sweep_may_step());
        drop(wanted);
        assert!(q.sweep_may_step());
    }
}

//! A supervisor for hosts without systemd: runs the agent as its child,
//! arms the fail-open fallback ([`crate::fallback`]) when the child dies and
//! starts it again with backoff.
//!
//! It does what systemd's `Restart=` and `ExecStopPost=` do for the agent's
//! unit, and nothing else: it holds no datapath state, opens no socket, and
//! its loop is spawn, wait, arm, sleep. The child takes the state
//! directory's lock and disarms the fallback as it starts, so the supervisor
//! needs no protocol with it.
//!
//! Limits: a supervisor that dies too (kill -9 of both, an OOM kill of the
//! whole group) arms nothing, so every zone is then closed, never open, as
//! under systemd when the unit's `ExecStopPost=` cannot run. The child's
//! death is seen by polling every [`POLL`] (an upper bound on the time
//! between the death and the start of arming).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::fallback;

/// How often the supervisor looks at its child.
pub const POLL: Duration = Duration::from_millis(5);
/// The first restart's delay; it doubles on each quick death, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// The longest delay between restarts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A child that ran this long resets the delay to [`FIRST_BACKOFF`].
pub const STABLE_RUN: Duration = Duration::from_secs(30);
/// The child's pid file in the state directory (rewritten at each start).
pub const PID_FILE: &str = "agent.pid";

/// What the supervisor runs.
#[derive(Debug, Clone)]
pub struct Supervised {
    /// The `palisade` binary.
    pub exe: PathBuf,
    /// The agent's configuration file.
    pub config: PathBuf,
    /// The agent's state directory (its plan, lock and pid file).
    pub state_dir: PathBuf,
    /// Stop after this many restarts (`None`: never).
    pub max_restarts: Option<u32>,
    /// The first restart's delay (systemd's `RestartSec=`; default [`FIRST_BACKOFF`]).
    pub restart_delay: Duration,
}

/// The delay before the next start, after a child that ran for `ran`;
/// `last` is the delay before that child's start (`None`: the first
/// start), `first` the first restart's delay.
pub fn next_backoff(first: Duration, last: Option<Duration>, ran: Duration) -> Duration {
    match last {
        Some(last) if ran < STABLE_RUN => (last * 2).clamp(first, MAX_BACKOFF.max(first)),
        _ => first,
    }
}

fn start(s: &Supervised) -> std::io::Result<Child> {
    let child = Command::new(&s.exe)
        .arg("agent")
        .arg("--config")
        .arg(&s.config)
        .spawn()?;
    let _ = std::fs::write(s.state_dir.join(PID_FILE), format!("{}\n", child.id()));
    Ok(child)
}

/// Wait for `child` to exit, or for `stop` (then it is sent SIGTERM, which
/// makes the agent save its connections, and waited for).
fn wait(child: &mut Child, stop: &AtomicBool) -> std::io::Result<(ExitStatus, bool)> {
    let mut forwarded = false;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok((status, forwarded));
        }
        if stop.load(Ordering::Relaxed) && !forwarded {
            // std has no SIGTERM: `kill` the program, which every host has.
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            forwarded = true;
        }
        std::thread::sleep(POLL);
    }
}

/// Print what an arm did (or why it failed), with the time since the death.
fn arm_after_death(state_dir: &Path, died: Instant) {
    match fallback::arm(state_dir) {
        Ok(r) => {
            match &r.armed {
                Some(a) => eprintln!(
                    "palisade supervise: fail-open fallback armed for zone(s) {} ({} interface(s)) {} us after the agent died \
                     (arm: lock {} us, plan and devices read {} us, devices made {} us, fdb {} us, vNICs attached {} us)",
                    a.zones.join(","),
                    a.interfaces.len(),
                    died.elapsed().as_micros(),
                    r.phases_us.locked,
                    r.phases_us.read,
                    r.phases_us.devices,
                    r.phases_us.fdb,
                    r.phases_us.attached
                ),
                None => eprintln!("palisade supervise: no open zone in the fallback plan: every zone stays closed"),
            }
            if !r.missing.is_empty() {
                eprintln!(
                    "palisade supervise: fallback: interfaces missing: {}",
                    r.missing.join(",")
                );
            }
            if !r.foreign.is_empty() {
                eprintln!(
                    "palisade supervise: fallback: interfaces in another bridge, left alone: {}",
                    r.foreign.join(",")
                );
            }
        }
        Err(e) => eprintln!("palisade supervise: fallback not armed (zones stay closed): {e}"),
    }
}

/// Run the agent until `stop`: start it, wait, arm the fallback when it
/// exits, start it again after a backoff. Returns the last child's status.
pub fn run(s: &Supervised, stop: &AtomicBool) -> std::io::Result<Option<ExitStatus>> {
    let mut backoff = None;
    let mut restarts = 0u32;
    let mut last = None;
    while !stop.load(Ordering::Relaxed) {
        let began = Instant::now();
        let mut child = start(s)?;
        eprintln!("palisade supervise: agent started, pid {}", child.id());
        let (status, stopped) = wait(&mut child, stop)?;
        let died = Instant::now();
        last = Some(status);
        if !stopped {
            eprintln!("palisade supervise: agent pid {} exited: {status}", child.id());
        }
        // Stopped or crashed, the datapath is gone either way: open zones open.
        arm_after_death(&s.state_dir, died);
        if stopped || s.max_restarts.is_some_and(|m| restarts >= m) {
            break;
        }
        restarts += 1;
        let delay = next_backoff(s.restart_delay, backoff, died - began);
        backoff = Some(delay);
        let until = Instant::now() + delay;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(POLL.max(Duration::from_millis(20)));
        }
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_on_quick_deaths_and_resets_after_a_stable_run() {
        let quick = Duration::from_millis(100);
        let mut b = None;
        let mut seen = Vec::new();
        for _ in 0..8 {
            let d = next_backoff(FIRST_BACKOFF, b, quick);
            b = Some(d);
            seen.push(d.as_millis());
        }
        assert_eq!(seen, [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]);
        assert_eq!(
            next_backoff(FIRST_BACKOFF, Some(MAX_BACKOFF), STABLE_RUN),
            FIRST_BACKOFF
        );
        let slow = Duration::from_secs(20);
        assert_eq!(
            next_backoff(slow, Some(slow), quick),
            slow,
            "a first delay above the cap is kept"
        );
    }
}

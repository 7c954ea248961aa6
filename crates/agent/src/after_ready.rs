//! What a start costs traffic after the agent says it is ready.
//!
//! A restart's new-flow stall (`bench/chaos.sh`) runs from the restart to
//! the first new connection through the datapath: the start-up line says
//! where the time before `agent ready` went, and this says what followed
//! it, once, in one line: when the workers ran, when the first new
//! connection was decided (the start of the first flow record whose first
//! packet came after ready), and when the first snapshot round ran, how
//! long it took and how long it held a worker (a worker waits for the
//! round while its table is encoded). The line is said once both are
//! known, or [`AfterReady::SAY_BY`] after ready with what is known by then.

use std::time::{Duration, Instant};

/// The first things that happen after ready, as they happen.
#[derive(Debug)]
pub(crate) struct AfterReady {
    /// When the agent said ready (the control loop's start).
    ready: Instant,
    /// The same moment in Unix nanoseconds (the clock of flow records).
    ready_unix_ns: u64,
    /// The workers' threads started, this long after ready.
    workers: Option<Duration>,
    /// The first new connection's first packet, this long after ready.
    first_connection: Option<Duration>,
    /// The first snapshot round: its start after ready, its duration, and
    /// the longest it held one worker's lock.
    first_snapshot: Option<(Duration, Duration, Duration)>,
    /// Whether a snapshot round is expected at all.
    snapshots: bool,
    said: bool,
}

impl AfterReady {
    /// Said at the latest this long after ready.
    pub const SAY_BY: Duration = Duration::from_secs(2);

    /// Ready at `ready` (Unix time `ready_unix_ns`); `snapshots`: whether
    /// a first snapshot round is to be waited for.
    pub fn new(ready: Instant, ready_unix_ns: u64, snapshots: bool) -> AfterReady {
        AfterReady {
            ready,
            ready_unix_ns,
            workers: None,
            first_connection: None,
            first_snapshot: None,
            snapshots,
            said: false,
        }
    }

    /// The workers' threads were all started at `at`.
    pub fn workers_started(&mut self, at: Instant) {
        self.workers.get_or_insert(at.saturating_duration_since(self.ready));
    }

    /// A flow started at `start_unix_ns`: the first one after ready is kept.
    /// Earlier starts (flows the workers' first round found queued from
    /// before ready count from ready) are clamped to zero.
    pub fn flow_started(&mut self, start_unix_ns: u64) {
        if self.first_connection.is_none() {
            let after = start_unix_ns.saturating_sub(self.ready_unix_ns);
            self.first_connection = Some(Duration::from_nanos(after));
        }
    }

    /// A snapshot round ran from `started` to `ended`, holding a worker up
    /// to `held`: the first one is kept.
    pub fn snapshot_round(&mut self, started: Instant, ended: Instant, held: Duration) {
        self.first_snapshot.get_or_insert((
            started.saturating_duration_since(self.ready),
            ended.saturating_duration_since(started),
            held,
        ));
    }

    /// The line, once: when the first connection and the first snapshot
    /// round (if one is expected) are known, or at [`Self::SAY_BY`].
    pub fn line(&mut self, now: Instant) -> Option<String> {
        if self.said {
            return None;
        }
        let known = self.first_connection.is_some() && (self.first_snapshot.is_some() || !self.snapshots);
        if !known && now.saturating_duration_since(self.ready) < Self::SAY_BY {
            return None;
        }
        self.said = true;
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        let workers = self.workers.map_or("?".into(), |d| format!("+{}", ms(d)));
        let connection = self
            .first_connection
            .map_or(format!("none within {}", ms(Self::SAY_BY)), |d| format!("+{}", ms(d)));
        let snapshot = match (self.first_snapshot, self.snapshots) {
            (Some((at, took, held)), _) => {
                format!("+{} (took {}, held a worker {})", ms(at), ms(took), ms(held))
            }
            (None, true) => format!("not within {}", ms(Self::SAY_BY)),
            (None, false) => "off".into(),
        };
        Some(format!(
            "palisade agent: after ready: workers running {workers}, first new connection {connection}, \
             first snapshot round {snapshot}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn said_once_when_the_first_connection_and_snapshot_are_known() {
        let t0 = Instant::now();
        let mut a = AfterReady::new(t0, 1_000 * MS, true);
        a.workers_started(t0 + Duration::from_micros(300));
        assert_eq!(a.line(t0 + Duration::from_millis(10)), None, "nothing known yet");
        a.flow_started(1_012 * MS);
        // A later flow does not replace the first.
        a.flow_started(1_050 * MS);
        assert_eq!(
            a.line(t0 + Duration::from_millis(20)),
            None,
            "the snapshot round is awaited"
        );
        let s = t0 + Duration::from_millis(200);
        a.snapshot_round(s, s + Duration::from_millis(7), Duration::from_millis(3));
        a.snapshot_round(s, s + Duration::from_millis(70), Duration::from_millis(30));
        let line = a.line(s + Duration::from_millis(8)).unwrap();
        assert_eq!(
            line,
            "palisade agent: after ready: workers running +0.3 ms, first new connection +12.0 ms, \
             first snapshot round +200.0 ms (took 7.0 ms, held a worker 3.0 ms)"
        );
        assert_eq!(a.line(s + Duration::from_secs(5)), None, "said once");
    }

    #[test]
    fn said_by_the_deadline_with_what_is_known() {
        let t0 = Instant::now();
        let mut a = AfterReady::new(t0, 5_000 * MS, true);
        // A flow whose packet was queued before ready counts from ready.
        a.flow_started(4_990 * MS);
        assert_eq!(a.line(t0 + Duration::from_millis(1999)), None);
        let line = a.line(t0 + AfterReady::SAY_BY).unwrap();
        assert!(line.contains("workers running ?"), "{line}");
        assert!(line.contains("first new connection +0.0 ms"), "{line}");
        assert!(line.contains("first snapshot round not within 2000.0 ms"), "{line}");
        let mut quiet = AfterReady::new(t0, 0, false);
        let line = quiet.line(t0 + AfterReady::SAY_BY).unwrap();
        assert!(line.contains("first new connection none within 2000.0 ms"), "{line}");
        assert!(line.contains("first snapshot round off"), "{line}");
    }
}

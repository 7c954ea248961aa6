//! `threshold` and `detection_filter`: whether a match raises an alert,
//! given the matches before it.
//!
//! Each tracked key (the flow, a source, a destination, a pair, or the rule
//! itself) has a window that starts at its first match and lasts `seconds`;
//! a match after the window starts a new one. Within a window:
//! - `limit`: the first `count` matches alert;
//! - `threshold`: every `count`th match alerts;
//! - `both`: the `count`th match alerts, once;
//! - `detection_filter`: every match after the first `count` alerts.
//!
//! Host-tracked state lives in a table bounded by `capacity`; when it is
//! full, expired entries are evicted first and, if none is expired, the match
//! is judged as the first of a new window (so a flood of distinct sources
//! cannot silence a rule), and the miss is counted.

use core::net::IpAddr;
use std::collections::HashMap;
use std::time::Duration;

use crate::prefilter::SigId;
use crate::rules::{Threshold, ThresholdKind, Track};

/// Window state of one tracked key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    pub(crate) start: Duration,
    pub(crate) count: u32,
}

/// Applies one match to `window` (None: the first ever); returns whether it alerts.
pub(crate) fn judge(t: &Threshold, window: &mut Option<Window>, now: Duration) -> bool {
    let secs = Duration::from_secs(u64::from(t.seconds));
    let w = match window {
        Some(w) if now.saturating_sub(w.start) <= secs => {
            w.count = w.count.saturating_add(1);
            w
        }
        _ => window.insert(Window { start: now, count: 1 }),
    };
    match t.kind {
        ThresholdKind::Limit => w.count <= t.count,
        ThresholdKind::Threshold => {
            if w.count >= t.count {
                w.count = 0;
                true
            } else {
                false
            }
        }
        ThresholdKind::Both => w.count == t.count,
        ThresholdKind::DetectionFilter => w.count > t.count,
    }
}

/// What a host-tracked threshold counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Rule,
    One(IpAddr),
    Pair(IpAddr, IpAddr),
}

/// Threshold windows tracked by host or by rule, bounded.
#[derive(Debug)]
pub(crate) struct HostThresholds {
    table: HashMap<(SigId, Key), Window, foldhash::fast::RandomState>,
    capacity: usize,
    /// Matches judged without history because the table was full.
    pub full_misses: u64,
}

impl HostThresholds {
    pub fn new(capacity: usize) -> Self {
        HostThresholds {
            table: HashMap::with_hasher(foldhash::fast::RandomState::default()),
            capacity,
            full_misses: 0,
        }
    }

    /// Judges a match of `sig` from `src` to `dst`.
    pub fn judge(&mut self, sig: SigId, t: &Threshold, src: IpAddr, dst: IpAddr, now: Duration) -> bool {
        let key = match t.track {
            Track::BySrc => Key::One(src),
            Track::ByDst => Key::One(dst),
            Track::ByBoth => Key::Pair(src, dst),
            Track::ByRule => Key::Rule,
            Track::ByFlow => unreachable!("flow-tracked thresholds live in the flow"),
        };
        let mut window = self.table.get(&(sig, key)).copied();
        let verdict = judge(t, &mut window, now);
        if self.table.len() >= self.capacity && !self.table.contains_key(&(sig, key)) {
            // Make room: drop windows that have expired for the longest rule window we know of.
            let horizon = Duration::from_secs(u64::from(t.seconds));
            self.table.retain(|_, w| now.saturating_sub(w.start) <= horizon);
            if self.table.len() >= self.capacity {
                self.full_misses += 1;
                return verdict;
            }
        }
        if let Some(w) = window {
            self.table.insert((sig, key), w);
        }
        verdict
    }

    /// Live entries.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.table.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(kind: ThresholdKind, count: u32) -> Threshold {
        Threshold {
            kind,
            track: Track::ByFlow,
            count,
            seconds: 60,
        }
    }

    fn alerts(th: Threshold, times: &[u64]) -> Vec<bool> {
        let mut w = None;
        times
            .iter()
            .map(|&s| judge(&th, &mut w, Duration::from_secs(s)))
            .collect()
    }

    #[test]
    fn each_kind_over_eight_matches() {
        let eight = [0, 1, 2, 3, 4, 5, 6, 7];
        let cases: &[(ThresholdKind, u32, usize)] = &[
            (ThresholdKind::Limit, 1, 1),
            (ThresholdKind::Limit, 2, 2),
            (ThresholdKind::Threshold, 3, 2),
            (ThresholdKind::Both, 3, 1),
            (ThresholdKind::DetectionFilter, 1, 7),
            (ThresholdKind::DetectionFilter, 2, 6),
            (ThresholdKind::DetectionFilter, 4, 4),
            (ThresholdKind::DetectionFilter, 7, 1),
            (ThresholdKind::DetectionFilter, 8, 0),
        ];
        for &(kind, count, want) in cases {
            let n = alerts(t(kind, count), &eight).iter().filter(|&&a| a).count();
            assert_eq!(n, want, "{kind:?} count {count}");
        }
    }

    #[test]
    fn windows_restart_after_their_seconds() {
        assert_eq!(
            alerts(t(ThresholdKind::Limit, 1), &[0, 10, 61, 62, 200]),
            vec![true, false, true, false, true]
        );
        assert_eq!(
            alerts(t(ThresholdKind::Both, 2), &[0, 1, 2, 100, 101]),
            vec![false, true, false, false, true]
        );
    }

    #[test]
    fn host_table_is_bounded_and_fails_open() {
        let th = Threshold {
            kind: ThresholdKind::Limit,
            track: Track::BySrc,
            count: 1,
            seconds: 3600,
        };
        let mut h = HostThresholds::new(2);
        let dst: IpAddr = "10.0.0.1".parse().unwrap();
        let now = Duration::from_secs(1);
        for i in 0..5u8 {
            let src = IpAddr::from([192, 0, 2, i]);
            assert!(h.judge(0, &th, src, dst, now), "first match of a source alerts");
        }
        assert_eq!(h.len(), 2);
        assert_eq!(h.full_misses, 3);
        // A tracked source is still limited.
        assert!(!h.judge(0, &th, IpAddr::from([192, 0, 2, 0]), dst, now));
    }
}

//! A resumable sweep of the connection table, in bounded steps.
//!
//! Connections expire lazily on lookup, and a periodic sweep removes the
//! ones no packet comes for (emitting their end events), and once a minute
//! reports the live ones as update records. Done in one go, that sweep is a
//! walk of the whole table under the worker's lock: at 50,000 connections
//! it held the lock for milliseconds once a second, and a live migration's
//! pause, which needs that lock, waited behind it (issue #20's 50k tail).
//! A [`Sweep`] walks the table instead in steps of at most a given number
//! of slots ([`crate::Engine::sweep_step`]), resuming where the last step
//! stopped, so the caller can release its lock between steps.
//!
//! Same results as the whole sweep: a pass started at a time `now` and
//! stepped with that same `now` removes exactly the connections
//! [`crate::Engine::expire`] would, in the same (slot) order, with the same
//! end events, and reports the same updates as a walk of the survivors. A
//! connection due at time `d` is removed by the first pass that starts after
//! `d`; with passes started every `period` and each one finished within
//! `ceil(slab_len / step)` steps, nothing due stays longer than `period` plus
//! the time those steps take (and a lookup removes it earlier on any packet).

/// Where a sweep of one table stands: idle, or part way through a pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sweep {
    /// The slot the next step starts at, while a pass is under way.
    pub(crate) next: Option<usize>,
    /// The pass also reports live connections seen since this time.
    pub(crate) updates_since: Option<u64>,
}

/// What one step of a sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepStep {
    /// Slots looked at (at most the step's size).
    pub scanned: usize,
    /// Connections removed as expired.
    pub expired: usize,
    /// The pass is over (every slot looked at).
    pub done: bool,
}

impl Sweep {
    /// An idle sweep.
    pub fn new() -> Sweep {
        Sweep::default()
    }

    /// Start a pass from the table's first slot (a pass under way starts
    /// over); with `updates_since`, it also reports every live connection
    /// whose last packet was at or after that time.
    pub fn start(&mut self, updates_since: Option<u64>) {
        self.next = Some(0);
        self.updates_since = updates_since;
    }

    /// Whether a pass is under way.
    pub fn is_active(&self) -> bool {
        self.next.is_some()
    }
}

#[cfg(test)]
mod tests {
    use palisade_wire::flow::{FlowKey, Segment};
    use palisade_wire::ip::IpProtocol;

    use super::*;
    use crate::conntrack::{Conn, ConnState, Conntrack, FullPolicy, Timeouts};
    use crate::events::{EventKind, FlowEvent};
    use crate::verdict::Counters;

    const SEC: u64 = 1_000_000_000;

    fn key(i: u32) -> FlowKey {
        let mut src = [0; 16];
        src[..4].copy_from_slice(&i.to_be_bytes());
        FlowKey {
            segment: Segment::vlan(7),
            src,
            dst: [9; 16],
            src_port: (i % 60_000) as u16 + 1,
            dst_port: 53,
            protocol: IpProtocol(17),
            icmp_type: 0,
            icmp_code: 0,
        }
    }

    /// A table of `n` UDP connections with varied states and ages, some
    /// slots freed again (holes), deterministic from `seed`: at 100 s some
    /// are due, some not, some were seen since 40 s (updates), some ended.
    fn table(n: u32, seed: u64) -> Conntrack {
        let mut t = Conntrack::new(n as usize + 8, 4, Timeouts::default(), FullPolicy::Refuse);
        let mut c = Counters::default();
        let mut x = seed | 1;
        let mut rand = move || {
            // xorshift64: reproducible, no dependency.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..n {
            let r = rand();
            let mut conn = Conn::new(key(i), 0);
            conn.state = if r % 2 == 0 { ConnState::New } else { ConnState::Replied };
            // Unreplied UDP times out after 30 s, replied after 180 s.
            conn.last_seen = (r >> 8) % (100 * SEC);
            conn.ended = (r >> 40) % 11 == 0;
            let slot = t.create(conn, [u32::MAX; 2], 0, &mut (), &mut c).expect("room");
            if (r >> 48) % 7 == 0 {
                t.remove(slot, crate::events::EndReason::Evicted, 0, &mut (), &mut c);
            }
        }
        t
    }

    fn keys(events: &[FlowEvent], kind: fn(&EventKind) -> bool) -> Vec<FlowKey> {
        events.iter().filter(|e| kind(&e.kind)).map(|e| e.key).collect()
    }

    /// The whole sweep (as the worker did it): expire everything due, then
    /// the survivors seen since `since`.
    fn whole(t: &mut Conntrack, now: u64, since: u64) -> (Vec<FlowEvent>, Vec<FlowEvent>) {
        let mut ends = Vec::new();
        t.expire(now, usize::MAX, &mut ends, &mut Counters::default());
        let updates = t
            .iter()
            .filter(|(_, c)| c.last_seen >= since && !c.ended)
            .map(|(_, c)| c.event(EventKind::Update, now))
            .collect();
        (ends, updates)
    }

    /// The same pass in steps of `scan` slots; returns the events and each step's slots.
    fn stepped(t: &mut Conntrack, now: u64, since: u64, scan: usize) -> (Vec<FlowEvent>, Vec<FlowEvent>, Vec<usize>) {
        let (mut ends, mut updates, mut steps) = (Vec::new(), Vec::new(), Vec::new());
        let mut next = 0;
        let mut c = Counters::default();
        loop {
            let (to, _) = t.sweep(next, scan, now, Some(since), &mut ends, &mut updates, &mut c);
            steps.push(to - next);
            next = to;
            if next >= t.slab_len() {
                break;
            }
        }
        (ends, updates, steps)
    }

    #[test]
    fn a_sweep_in_steps_removes_and_reports_what_the_whole_sweep_does() {
        let now = 100 * SEC;
        let since = 40 * SEC;
        for (n, seed) in [(0, 1), (1, 2), (5, 3), (64, 4), (1000, 5), (5000, 6)] {
            for scan in [1, 2, 7, 64, 1000, 4096, usize::MAX] {
                let mut a = table(n, seed);
                let mut b = a.clone();
                let (ends_a, updates_a) = whole(&mut a, now, since);
                let (ends_b, updates_b, steps) = stepped(&mut b, now, since, scan);
                // The same end events (same connections, counters, reason), in the same order.
                assert_eq!(ends_a, ends_b, "n {n} scan {scan}");
                assert_eq!(updates_a, updates_b, "n {n} scan {scan}");
                // The same table afterwards: nothing due is left.
                let left_a: Vec<_> = a.iter().map(|(s, c)| (s, c.key)).collect();
                let left_b: Vec<_> = b.iter().map(|(s, c)| (s, c.key)).collect();
                assert_eq!(left_a, left_b, "n {n} scan {scan}");
                assert!(b.iter().all(|(_, c)| !c.expired(now, &b.timeouts)));
                // Every step but the last looked at exactly `scan` slots, that one at most.
                let slab = b.slab_len();
                assert_eq!(steps.iter().sum::<usize>(), slab);
                assert!(steps.iter().all(|&s| s <= scan));
                assert_eq!(steps.len(), slab.div_ceil(scan).max(1), "n {n} scan {scan}");
                // The test's tables do have work in them.
                if n >= 64 {
                    assert!(!ends_a.is_empty() && !updates_a.is_empty());
                    assert!(keys(&ends_a, |k| matches!(k, EventKind::End(_))).len() == ends_a.len());
                }
            }
        }
    }

    #[test]
    fn a_step_removes_no_more_than_its_slots_even_when_all_are_due() {
        let n = 10_000;
        let mut t = Conntrack::new(n, 1, Timeouts::default(), FullPolicy::Refuse);
        let mut c = Counters::default();
        for i in 0..n as u32 {
            t.create(Conn::new(key(i), 0), [u32::MAX; 2], 0, &mut (), &mut c)
                .expect("room");
        }
        // Everything is due at an hour (unreplied UDP: 30 s).
        let now = 3600 * SEC;
        let mut ends = Vec::new();
        let (next, removed) = t.sweep(0, 512, now, None, &mut ends, &mut (), &mut c);
        assert_eq!((next, removed, ends.len()), (512, 512, 512));
        assert_eq!(t.len(), n - 512);
        // The rest are left for the next steps, whose slots start at 512.
        assert!(t.iter().all(|(s, _)| s >= 512));
        let (next, removed) = t.sweep(next, 512, now, None, &mut ends, &mut (), &mut c);
        assert_eq!((next, removed), (1024, 512));
        assert_eq!(t.len(), n - 1024);
    }

    #[test]
    fn a_pass_starts_over_from_the_first_slot() {
        let mut sweep = Sweep::new();
        assert!(!sweep.is_active());
        sweep.start(Some(5));
        assert_eq!((sweep.next, sweep.updates_since), (Some(0), Some(5)));
        sweep.next = Some(77);
        sweep.start(None);
        assert_eq!((sweep.next, sweep.updates_since), (Some(0), None));
        assert!(sweep.is_active());
    }
}

//! Migrations made without the controller (libvirt, virsh, another tool),
//! seen on the destination: a guest announces itself on arrival (QEMU's
//! RARP, or the guest's gratuitous ARP), the engine counts it per vNIC
//! ([`palisade_datapath::announce`]), and this host's agent tells the
//! controller (`POST /v1/agents/{host}/arrivals`), which places the VM here
//! and orders the host it left to send its state ([`crate::orders`], a
//! `follow` order).
//!
//! Until that state arrives the guest's frames are **held**: the vNIC is
//! quiesced (its frames dropped and counted as `vnic_migrating`, like the
//! source's during a migration), for at most [`HOLD_BOUND`]. The hold
//! starts in the engine with the announcement itself: each round this
//! thread marks standby the vNICs the inventory places elsewhere
//! ([`palisade_datapath::Engine::set_port_standby`]), and an announcement
//! on a standby port quiesces it there and then, so no frame of the guest
//! is decided in the time it takes this thread to notice. Dropping, not
//! deciding: without its connections a mid-stream segment of an
//! established connection would be judged as a new flow (denied, or
//! tracked from the middle with the wrong window), and a reply could be
//! refused; a dropped segment is sent again by TCP once the state is here
//! (the import ends the hold), and a bounded hold costs an established flow
//! at most one retransmission timeout. Past the bound (the old host's agent
//! gone, or slow) the vNIC forwards again and its frames are decided by
//! the policy without the state (counted in [`ArrivalCounts::hold_expired`]).
//!
//! A vNIC is held, and its arrival reported, only when the inventory this
//! agent holds places its VM on another host and its state was not imported
//! moments ago (a migration this agent took part in announces itself too):
//! a guest placed here that announces itself (a boot, a new address) costs
//! the controller nothing. The controller's answer decides whether the hold
//! stays (it moved the VM here) or ends at once. A report the controller
//! does not take (it is away, or refuses while the VM's previous move is
//! still being carried out) is made again every [`REPORT_INTERVAL`] for up
//! to [`RETRY_BOUND`] while the inventory here still places the VM
//! elsewhere: a dropped report would leave the controller placing the VM on
//! the host it left, and the next migration ordered from the wrong host.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use palisade_api::client::Client;
use palisade_api::migration::{ArrivalReport, ArrivalResponse};

use crate::error::AgentError;
use crate::http::Control;

/// The longest a vNIC is held for its state.
pub const HOLD_BOUND: Duration = Duration::from_secs(2);

/// Announcements this soon after a vNIC's arrival was reported are that
/// arrival's (QEMU's announcement is a burst of five RARPs over about
/// 0.8 s, seen over a few rounds; a guest may repeat its gratuitous ARP),
/// not reported again; and a failed report is tried again this often.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(2);

/// How long an arrival whose report failed (the controller away, or
/// refusing while an earlier move of the VM is still being carried out)
/// is reported again, every [`REPORT_INTERVAL`], before it is given up.
pub const RETRY_BOUND: Duration = Duration::from_secs(30);

/// What the watcher did, for the metrics and tests.
#[derive(Debug, Default)]
pub struct ArrivalCounts {
    /// Announcements reported to the controller.
    pub reported: AtomicU64,
    /// Reports the controller took as a move to this host.
    pub moved: AtomicU64,
    /// vNICs held for their state.
    pub held: AtomicU64,
    /// Holds that reached [`HOLD_BOUND`] without the state.
    pub hold_expired: AtomicU64,
    /// Reports that failed (the controller away or refusing).
    pub failed: AtomicU64,
}

/// The watcher's memory between rounds.
#[derive(Debug, Default)]
pub struct Watcher {
    /// Announcements seen per vNIC.
    seen: HashMap<String, u64>,
    /// When each vNIC's arrival was last reported (tried).
    reported: HashMap<String, Instant>,
    /// When the controller last took a report of each vNIC's arrival.
    taken: HashMap<String, Instant>,
    /// vNICs held, since when.
    holds: Vec<(String, Instant)>,
    /// Arrivals not reported yet (waiting out [`REPORT_INTERVAL`], or
    /// their report failed), since when: reported again each round while
    /// the inventory still places the vNIC elsewhere, up to [`RETRY_BOUND`].
    /// With whether a report of it failed already.
    pending: HashMap<String, (Instant, bool)>,
}

impl Watcher {
    /// One round at `now`: report new announcements through `report`, hold
    /// and end holds through `control`.
    pub fn round(
        &mut self,
        host: &str,
        control: &dyn Control,
        report: &mut dyn FnMut(&ArrivalReport) -> Result<ArrivalResponse, String>,
        counts: &ArrivalCounts,
        now: Instant,
    ) {
        control.mark_standby();
        for a in control.announcements() {
            let seen = self.seen.entry(a.vnic.clone()).or_insert(0);
            let fresh = a.count > *seen;
            *seen = a.count;
            // The engine holds it already when it was standby.
            let elsewhere = a.held_by_engine || a.placed_on.as_deref().is_some_and(|h| h != host);
            if !elsewhere {
                // A guest placed here announcing itself (a boot, an address
                // change), or an arrival the controller has placed here
                // meanwhile: nothing moved, and the controller is not asked.
                self.pending.remove(&a.vnic);
                continue;
            }
            let burst = self
                .taken
                .get(&a.vnic)
                .is_some_and(|t| now.duration_since(*t) < REPORT_INTERVAL);
            if fresh && !burst {
                // A new arrival: reported as itself, whatever an earlier one's fate.
                self.pending.insert(a.vnic.clone(), (now, false));
            }
            let Some(&(since, retry)) = self.pending.get(&a.vnic) else {
                continue;
            };
            if now.duration_since(since) >= RETRY_BOUND {
                self.pending.remove(&a.vnic);
                eprintln!(
                    "palisade agent: the arrival of {} is given up: the controller did not take it within {RETRY_BOUND:?}",
                    a.vnic
                );
                continue;
            }
            if self
                .reported
                .get(&a.vnic)
                .is_some_and(|t| now.duration_since(*t) < REPORT_INTERVAL)
            {
                // Tried moments ago: tried again later, not dropped.
                continue;
            }
            self.reported.insert(a.vnic.clone(), now);
            // Held before asking, so no frame is decided without its state
            // meanwhile (a retry after a failed report: the guest forwards
            // already, and is held only if its state is to follow).
            let mut held = !retry && control.hold_vnic(&a.vnic).unwrap_or(false);
            let arrival = ArrivalReport {
                vnic: a.vnic.clone(),
                mac: a.mac.clone(),
                via: a.kind.to_string(),
            };
            counts.reported.fetch_add(1, Ordering::Relaxed);
            let answer = report(&arrival);
            if answer.is_ok() {
                self.pending.remove(&a.vnic);
                self.taken.insert(a.vnic.clone(), now);
            } else {
                self.pending.insert(a.vnic.clone(), (since, true));
            }
            let state_follows = match &answer {
                Ok(r) => {
                    r.moved
                        || r.order
                            .as_ref()
                            .is_some_and(|o| o.to == host && o.kind == palisade_api::migration::MigrationKind::Follow)
                }
                Err(e) => {
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                    if !retry {
                        eprintln!(
                            "palisade agent: reporting the arrival of {}: {e} (reported again every {REPORT_INTERVAL:?})",
                            a.vnic
                        );
                    }
                    false
                }
            };
            if matches!(&answer, Ok(r) if r.moved) {
                counts.moved.fetch_add(1, Ordering::Relaxed);
            }
            if state_follows && !held {
                // The inventory here lagged the controller's.
                held = control.hold_vnic(&a.vnic).unwrap_or(false);
            }
            match (held, state_follows) {
                (true, true) => {
                    counts.held.fetch_add(1, Ordering::Relaxed);
                    self.holds.retain(|(v, _)| v != &a.vnic);
                    self.holds.push((a.vnic.clone(), now));
                }
                (true, false) => {
                    // Placed here already, moving here under an order, or
                    // the controller away: nothing to wait for.
                    let _ = control.end_hold(&a.vnic);
                }
                _ => {}
            }
        }
        self.holds.retain(|(vnic, since)| {
            if now.duration_since(*since) < HOLD_BOUND {
                return true;
            }
            if control.end_hold(vnic).unwrap_or(false) {
                counts.hold_expired.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "palisade agent: {vnic}: its state did not arrive within {HOLD_BOUND:?}; forwarding without it"
                );
            }
            false
        });
    }
}

/// Start the thread that watches this host's vNICs for arrivals every
/// `poll` (see the module's documentation).
pub fn watch(
    client: Client,
    host: String,
    control: Arc<dyn Control>,
    counts: Arc<ArrivalCounts>,
    poll: Duration,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, AgentError> {
    std::thread::Builder::new()
        .name("palisade-arrivals".into())
        .spawn(move || {
            let mut w = Watcher::default();
            let mut report = |a: &ArrivalReport| client.report_arrival(&host, a).map_err(|e| e.to_string());
            while !stop.load(Ordering::Relaxed) {
                w.round(&host, &*control, &mut report, &counts, Instant::now());
                std::thread::sleep(poll);
            }
        })
        .map_err(|e| AgentError::Controller(format!("starting the arrivals thread: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{ControlError, VnicAnnouncements};
    use palisade_api::migration::{MigrationKind, MigrationOrder, MigrationState};
    use std::sync::Mutex;

    /// vNICs with announcement counts; records holds and their ends.
    #[derive(Default)]
    struct Fake {
        vnics: Mutex<Vec<VnicAnnouncements>>,
        calls: Mutex<Vec<String>>,
        /// The import came: an end of hold finds nothing held.
        imported: AtomicBool,
        recent_import: bool,
    }

    impl Fake {
        fn announce(&self, vnic: &str, placed_on: &str) {
            let mut v = self.vnics.lock().unwrap();
            match v.iter_mut().find(|a| a.vnic == vnic) {
                Some(a) => a.count += 1,
                None => v.push(VnicAnnouncements {
                    vnic: vnic.into(),
                    mac: "02:00:00:00:00:01".into(),
                    count: 1,
                    kind: "rarp",
                    placed_on: Some(placed_on.into()),
                    held_by_engine: false,
                }),
            }
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Control for Fake {
        fn export_vnic(&self, _: &str, _: Option<&str>) -> Result<Vec<u8>, ControlError> {
            unreachable!()
        }
        fn import_vnic(&self, _: &str, _: &[u8], _: Option<&str>) -> Result<usize, ControlError> {
            unreachable!()
        }
        fn resume_vnic(&self, _: &str, _: Option<&str>) -> Result<(), ControlError> {
            unreachable!("holds end with end_hold")
        }
        fn release_vnic(&self, _: &str, _: Option<&str>) -> Result<usize, ControlError> {
            unreachable!()
        }
        fn announcements(&self) -> Vec<VnicAnnouncements> {
            self.vnics.lock().unwrap().clone()
        }
        fn hold_vnic(&self, vnic: &str) -> Result<bool, ControlError> {
            if self.recent_import {
                return Ok(false);
            }
            self.calls.lock().unwrap().push(format!("hold {vnic}"));
            Ok(true)
        }
        fn end_hold(&self, vnic: &str) -> Result<bool, ControlError> {
            let still = !self.imported.load(Ordering::Relaxed);
            self.calls.lock().unwrap().push(format!("end {vnic} {still}"));
            Ok(still)
        }
    }

    fn follow_order(to: &str) -> MigrationOrder {
        MigrationOrder {
            id: "web-1@1".into(),
            vm: "web-1".into(),
            vnics: vec!["web-1.0".into()],
            kind: MigrationKind::Follow,
            from: "hv1".into(),
            to: to.into(),
            requested_by: "agent/hv2".into(),
            requested_ns: 1,
            deadline_ns: 2,
            staged_ns: Some(1),
            state: MigrationState::Pending,
            started_ns: None,
            finished_ns: None,
            connections: None,
            state_bytes: None,
            state_blake3: None,
            switchover_us: None,
            reason: None,
        }
    }

    fn moved(r: &ArrivalReport) -> Result<ArrivalResponse, String> {
        Ok(ArrivalResponse {
            vm: "web-1".into(),
            moved: true,
            order: Some(follow_order("hv2")),
        })
        .inspect(|_| assert_eq!(r.via, "rarp"))
    }

    #[test]
    fn a_guest_arriving_from_elsewhere_is_held_until_its_state_comes_or_the_bound() {
        let c = Fake::default();
        let counts = ArrivalCounts::default();
        let mut w = Watcher::default();
        let t0 = Instant::now();
        let mut sent = Vec::new();
        let mut report = |r: &ArrivalReport| {
            sent.push(r.clone());
            moved(r)
        };
        // Nothing announced: nothing reported.
        w.round("hv2", &c, &mut report, &counts, t0);
        c.announce("web-1.0", "hv1");
        w.round("hv2", &c, &mut report, &counts, t0);
        // QEMU's next RARPs: not reported again.
        c.announce("web-1.0", "hv1");
        w.round("hv2", &c, &mut report, &counts, t0 + Duration::from_millis(100));
        assert_eq!(c.calls(), ["hold web-1.0"]);
        // Past the bound without the state: forwarding again, counted.
        w.round("hv2", &c, &mut report, &counts, t0 + HOLD_BOUND);
        assert_eq!(c.calls(), ["hold web-1.0", "end web-1.0 true"]);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].vnic, "web-1.0");
        assert_eq!(counts.held.load(Ordering::Relaxed), 1);
        assert_eq!(counts.hold_expired.load(Ordering::Relaxed), 1);

        // Another arrival, and this time the state comes within the bound.
        let c = Fake::default();
        let counts = ArrivalCounts::default();
        let mut w = Watcher::default();
        c.announce("web-1.0", "hv1");
        w.round("hv2", &c, &mut moved, &counts, t0);
        c.imported.store(true, Ordering::Relaxed);
        w.round("hv2", &c, &mut moved, &counts, t0 + HOLD_BOUND);
        assert_eq!(c.calls(), ["hold web-1.0", "end web-1.0 false"]);
        assert_eq!(counts.hold_expired.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_guest_placed_here_or_just_migrated_here_is_not_held() {
        let counts = ArrivalCounts::default();
        let t0 = Instant::now();
        let mut not_moved = |_: &ArrivalReport| {
            Ok(ArrivalResponse {
                vm: "web-1".into(),
                moved: false,
                order: None,
            })
        };
        // Placed here: neither held nor reported.
        let c = Fake::default();
        c.announce("web-1.0", "hv2");
        Watcher::default().round("hv2", &c, &mut |_| panic!("not reported"), &counts, t0);
        assert!(c.calls().is_empty(), "{:?}", c.calls());
        assert_eq!(counts.reported.load(Ordering::Relaxed), 0);
        // Placed elsewhere, but the controller has it here already: the hold ends at once.
        let c = Fake::default();
        c.announce("web-1.0", "hv1");
        Watcher::default().round("hv2", &c, &mut not_moved, &counts, t0);
        assert_eq!(c.calls(), ["hold web-1.0", "end web-1.0 true"]);
        // Its state was imported moments ago (an ordered migration): not held.
        let c = Fake {
            recent_import: true,
            ..Fake::default()
        };
        c.announce("web-1.0", "hv1");
        Watcher::default().round("hv2", &c, &mut moved, &counts, t0);
        assert!(c.calls().is_empty(), "{:?}", c.calls());
        // The controller away: the hold ends, nothing blackholed.
        let c = Fake::default();
        c.announce("web-1.0", "hv1");
        let mut away = |_: &ArrivalReport| Err("connection refused".to_string());
        Watcher::default().round("hv2", &c, &mut away, &counts, t0);
        assert_eq!(c.calls(), ["hold web-1.0", "end web-1.0 true"]);
        assert_eq!(counts.failed.load(Ordering::Relaxed), 1);
    }

    /// The guest announced itself here while the controller was still
    /// carrying out its previous move (it answers 409 until that order is
    /// over): the arrival is reported again until the controller takes it,
    /// not dropped, which left the controller placing the VM on the host it
    /// had left (`bench/migration.sh`'s quick back-and-forths).
    #[test]
    fn an_arrival_the_controller_refused_is_reported_again_until_taken() {
        let c = Fake::default();
        let counts = ArrivalCounts::default();
        let mut w = Watcher::default();
        let t0 = Instant::now();
        let mut answers = 0;
        let mut busy_then_moved = |r: &ArrivalReport| {
            answers += 1;
            if answers == 1 {
                return Err("controller answered 409: VM \"web-1\" is being migrated from hv2 to hv1".to_string());
            }
            moved(r)
        };
        c.announce("web-1.0", "hv1");
        w.round("hv2", &c, &mut busy_then_moved, &counts, t0);
        // Refused: the hold ends, the guest forwards meanwhile.
        assert_eq!(c.calls(), ["hold web-1.0", "end web-1.0 true"]);
        // Not before the interval; then again, taken, and held for the state that follows.
        w.round("hv2", &c, &mut busy_then_moved, &counts, t0 + REPORT_INTERVAL / 2);
        assert_eq!(counts.reported.load(Ordering::Relaxed), 1);
        w.round("hv2", &c, &mut busy_then_moved, &counts, t0 + REPORT_INTERVAL);
        assert_eq!(counts.reported.load(Ordering::Relaxed), 2);
        assert_eq!(counts.moved.load(Ordering::Relaxed), 1);
        assert_eq!(c.calls(), ["hold web-1.0", "end web-1.0 true", "hold web-1.0"]);
        // Taken: not reported again.
        w.round("hv2", &c, &mut busy_then_moved, &counts, t0 + 3 * REPORT_INTERVAL);
        assert_eq!(counts.reported.load(Ordering::Relaxed), 2);

        // A controller that never takes it: tried every interval up to the bound, then given up.
        let c = Fake::default();
        let counts = ArrivalCounts::default();
        let mut w = Watcher::default();
        let mut away = |_: &ArrivalReport| Err("connection refused".to_string());
        c.announce("web-1.0", "hv1");
        let mut t = t0;
        while t <= t0 + RETRY_BOUND + REPORT_INTERVAL {
            w.round("hv2", &c, &mut away, &counts, t);
            t += REPORT_INTERVAL;
        }
        let tries = counts.reported.load(Ordering::Relaxed);
        assert_eq!(
            tries as u32,
            RETRY_BOUND.as_secs() as u32 / REPORT_INTERVAL.as_secs() as u32
        );
        w.round("hv2", &c, &mut away, &counts, t + RETRY_BOUND);
        assert_eq!(counts.reported.load(Ordering::Relaxed), tries);
    }

    /// A guest that comes back to this host a few seconds after its last
    /// arrival here was reported is a new arrival, reported (it used to be
    /// taken for the first one's repeat for 5 s, and never reported); the
    /// repeats of one announcement burst are not.
    #[test]
    fn a_guest_back_soon_is_a_new_arrival_and_a_burst_is_one() {
        let c = Fake::default();
        let counts = ArrivalCounts::default();
        let mut w = Watcher::default();
        let t0 = Instant::now();
        c.announce("web-1.0", "hv2");
        w.round("hv1", &c, &mut moved, &counts, t0);
        c.announce("web-1.0", "hv2");
        w.round("hv1", &c, &mut moved, &counts, t0 + REPORT_INTERVAL / 2);
        assert_eq!(counts.reported.load(Ordering::Relaxed), 1, "one burst, one report");
        // It left (the inventory here places it on hv2 again) and is back 3 s later.
        c.announce("web-1.0", "hv2");
        w.round("hv1", &c, &mut moved, &counts, t0 + Duration::from_secs(3));
        assert_eq!(counts.reported.load(Ordering::Relaxed), 2);
    }
}

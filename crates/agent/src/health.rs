//! The datapath health report: gathered by the control thread from its
//! workers, served on `/health` and pushed to the controller.
//!
//! Drop counts in a report are deltas: the control thread keeps the
//! cumulative counts at the last report boundary ([`DropBaseline`]) and
//! moves it once per report interval, so `/health` (refreshed twice a
//! second) shows the drops since the last report, the same figure the
//! controller receives.

use std::collections::BTreeMap;

use palisade_api::health::{FailOpenEpisode, FailureMode, HealthReport, TableFill};
use palisade_datapath::{DropReason, Engine};
use palisade_policy::Model;
use palisade_policy::model::OnFailure;

/// Cumulative drop counts at the last report boundary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropBaseline {
    /// Frames the kernel dropped before a worker read them.
    pub ring: u64,
    /// Packets dropped for a full connection table or vNIC connection limit.
    pub table: u64,
}

/// Packets an engine dropped because a connection table was full.
pub fn table_drops(engine: &Engine) -> u64 {
    let c = engine.counters();
    c.dropped(DropReason::ConntrackFull) + c.dropped(DropReason::VnicConnLimit)
}

/// The `on_failure` of each zone in `zones` (names the model lacks are left out).
pub fn zone_modes<'a>(model: &Model, zones: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, FailureMode> {
    zones
        .into_iter()
        .filter_map(|name| {
            let z = model.inventory.zone(name)?;
            let mode = match z.on_failure {
                OnFailure::Open => FailureMode::Open,
                OnFailure::Closed => FailureMode::Closed,
            };
            Some((name.to_string(), mode))
        })
        .collect()
}

/// What the control thread knows, turned into a report.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// The host.
    pub host: &'a str,
    /// Now (Unix nanoseconds).
    pub time_ns: u64,
    /// The report interval in milliseconds.
    pub interval_ms: u64,
    /// Seconds since start.
    pub uptime_s: u64,
    /// Workers started, and those still running.
    pub workers: (u32, u32),
    /// Each worker's engine.
    pub engines: &'a [&'a Engine],
    /// The policy version in force, the controller revision, seconds since installed.
    pub policy: (u64, Option<u64>, u64),
    /// The last policy refused, if the one in force is older.
    pub policy_error: Option<&'a str>,
    /// Cumulative kernel drops over every socket.
    pub ring_drops_total: u64,
    /// The counts at the last report boundary.
    pub baseline: DropBaseline,
    /// The zones of this host's ports.
    pub zones: BTreeMap<String, FailureMode>,
    /// Whether a fail-open plan is written ([`crate::fallback`]).
    pub fallback_planned: bool,
    /// The fail-open episode this start ended.
    pub last_fail_open: Option<&'a crate::fallback::Episode>,
    /// What became of the connections that episode let through, so far.
    pub takeover: Option<crate::takeover::TakeOverCounts>,
}

/// The report, and the cumulative counts it was computed from (the next baseline).
pub fn report(i: Inputs<'_>) -> (HealthReport, DropBaseline) {
    let table_total: u64 = i.engines.iter().map(|e| table_drops(e)).sum();
    let tables = i
        .engines
        .iter()
        .enumerate()
        .map(|(w, e)| TableFill {
            worker: w as u32,
            connections: e.conntrack().len() as u64,
            capacity: e.conntrack().capacity() as u64,
        })
        .collect();
    let (started, alive) = i.workers;
    let r = HealthReport {
        host: i.host.to_string(),
        time_ns: i.time_ns,
        interval_ms: i.interval_ms,
        uptime_s: i.uptime_s,
        status: if i.policy_error.is_some() { "degraded" } else { "ok" }.into(),
        enforcing: started > 0 && alive == started,
        fail_open_active: false,
        workers: started,
        workers_alive: alive,
        policy_version: i.policy.0,
        controller_revision: i.policy.1,
        policy_age_s: i.policy.2,
        policy_error: i
            .policy_error
            .map(|e| e.chars().take(palisade_api::health::MAX_POLICY_ERROR_CHARS).collect()),
        // Counters only grow; a restarted worker's would restart from 0, so saturate.
        ring_drops: i.ring_drops_total.saturating_sub(i.baseline.ring),
        table_drops: table_total.saturating_sub(i.baseline.table),
        tables,
        zones: i.zones,
        fallback_planned: i.fallback_planned,
        last_fail_open: i.last_fail_open.map(|e| FailOpenEpisode {
            zones: e.zones.clone(),
            armed_at_ns: e.armed_at_ns,
            ended_at_ns: e.ended_at_ns,
            picked_up: i.takeover.map_or(0, |t| t.picked_up),
            cut: i.takeover.map_or(0, |t| t.cut),
        }),
    };
    let totals = DropBaseline {
        ring: i.ring_drops_total,
        table: table_total,
    };
    (r, totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs<'a>(engines: &'a [&'a Engine], baseline: DropBaseline, ring: u64) -> Inputs<'a> {
        Inputs {
            host: "hv1",
            time_ns: 5,
            interval_ms: 3000,
            uptime_s: 9,
            workers: (2, 2),
            engines,
            policy: (3, Some(7), 4),
            policy_error: None,
            ring_drops_total: ring,
            baseline,
            zones: BTreeMap::new(),
            fallback_planned: false,
            last_fail_open: None,
            takeover: None,
        }
    }

    #[test]
    fn drops_are_counted_from_the_last_report() {
        let (r, base) = report(inputs(&[], DropBaseline::default(), 40));
        assert_eq!((r.ring_drops, base.ring), (40, 40));
        let (r, base) = report(inputs(&[], base, 55));
        assert_eq!((r.ring_drops, base.ring), (15, 55));
        assert!(r.enforcing);
        assert_eq!(r.status, "ok");
        assert!(r.check("hv1").is_ok());
    }

    #[test]
    fn a_dead_worker_or_a_refused_policy_shows() {
        let mut i = inputs(&[], DropBaseline::default(), 0);
        i.workers = (2, 1);
        i.policy_error = Some("policy.yaml:1:1: bad");
        let (r, _) = report(i);
        assert!(!r.enforcing);
        assert_eq!(r.status, "degraded");
        assert_eq!(r.workers_alive, 1);
    }

    #[test]
    fn a_fail_open_episode_the_start_ended_is_reported() {
        let e = crate::fallback::Episode {
            zones: vec!["web".into()],
            armed_at_ns: 2_000_000_000,
            ended_at_ns: 5_500_000_000,
        };
        let mut i = inputs(&[], DropBaseline::default(), 0);
        i.fallback_planned = true;
        i.last_fail_open = Some(&e);
        i.takeover = Some(crate::takeover::TakeOverCounts { picked_up: 3, cut: 1 });
        let (r, _) = report(i);
        assert!(r.fallback_planned);
        let got = r.last_fail_open.unwrap();
        assert_eq!(
            (got.zones.as_slice(), got.active_ms()),
            (&["web".to_string()][..], 3500)
        );
        assert_eq!(
            (got.picked_up, got.cut),
            (3, 1),
            "the episode's connections taken over and cut"
        );
    }

    #[test]
    fn zones_carry_their_on_failure() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/three-tier");
        let loaded = palisade_policy::load(&palisade_policy::DirSource::new(&dir)).unwrap();
        let got = zone_modes(&loaded.model, ["web", "db", "nope"]);
        assert_eq!(
            got,
            BTreeMap::from([
                ("db".to_string(), FailureMode::Closed),
                ("web".to_string(), FailureMode::Open)
            ])
        );
    }
}

//! Datapath health: what an agent reports about its host, and what the
//! controller makes of it.
//!
//! An agent builds a [`HealthReport`] every few seconds
//! ([`HealthReport::interval_ms`]), serves it on its own `/health` endpoint
//! and pushes it to `POST /v1/agents/{host}/health`. The controller keeps
//! the last one per host with the time it arrived and derives a
//! [`HostHealth`]: healthy, degraded (the datapath runs but something is
//! wrong: a dead worker, rising drops, a nearly full connection table, an
//! old policy) or failed (no report for longer than the bound, or the
//! datapath says it is not enforcing). Drop counts are deltas since the
//! previous report, so a controller that misses one report undercounts
//! rather than double-counts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::validate::{RequestError, check_host, check_text};

/// The most workers one report describes.
pub const MAX_WORKERS: usize = 1024;
/// The most zones one report names.
pub const MAX_ZONES: usize = 4096;
/// The longest zone name in a report, in characters.
pub const MAX_ZONE_NAME_CHARS: usize = 128;
/// The longest policy error a report carries, in characters.
pub const MAX_POLICY_ERROR_CHARS: usize = 4096;

/// What a zone's vNICs do while the host's datapath is down (the policy's
/// `on_failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Forward unfiltered.
    Open,
    /// Forward nothing.
    Closed,
}

/// One worker's connection table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableFill {
    /// The worker's index.
    pub worker: u32,
    /// Connections tracked.
    pub connections: u64,
    /// The table's capacity.
    pub capacity: u64,
}

impl TableFill {
    /// The fill in per cent (0 for an empty or zero-sized table).
    pub fn percent(&self) -> u64 {
        (self.connections.saturating_mul(100))
            .checked_div(self.capacity)
            .unwrap_or(0)
    }
}

/// An agent's datapath health: `GET /health` on the agent,
/// `POST /v1/agents/{host}/health` to the controller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// The host.
    pub host: String,
    /// When the agent made it (its clock, Unix nanoseconds).
    pub time_ns: u64,
    /// How often the agent reports, in milliseconds.
    pub interval_ms: u64,
    /// Seconds since the agent started.
    pub uptime_s: u64,
    /// `ok`, or `degraded` when the agent itself sees a problem (a policy it could not load).
    pub status: String,
    /// Whether the datapath is filtering traffic (every worker running a policy).
    pub enforcing: bool,
    /// Whether some zone's traffic is passing unfiltered through a fail-open fallback.
    pub fail_open_active: bool,
    /// Datapath workers started.
    pub workers: u32,
    /// Datapath workers running now.
    pub workers_alive: u32,
    /// The policy's own version number in force.
    pub policy_version: u64,
    /// The controller's effective-policy revision in force (controller mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller_revision: Option<u64>,
    /// Seconds since the policy in force was installed.
    pub policy_age_s: u64,
    /// The last policy the agent refused, when the one in force is older.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_error: Option<String>,
    /// Frames the kernel dropped before a worker read them (ring or socket
    /// buffer full), since the previous report.
    pub ring_drops: u64,
    /// Packets dropped because a connection table or a vNIC's connection
    /// limit was full, since the previous report.
    pub table_drops: u64,
    /// Each worker's connection table.
    pub tables: Vec<TableFill>,
    /// The `on_failure` of each zone with a port on this host.
    pub zones: BTreeMap<String, FailureMode>,
    /// Whether the agent wrote a fail-open plan: if it dies, whoever arms
    /// the fallback (systemd's `ExecStopPost=`, `palisade agent supervise`)
    /// lets the `open` zones forward unfiltered. `false`: every zone fails closed.
    #[serde(default)]
    pub fallback_planned: bool,
    /// The fail-open episode the agent's start ended, if the fallback was
    /// armed while it was gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fail_open: Option<FailOpenEpisode>,
}

/// A time the agent was gone and its `open` zones forwarded unfiltered
/// through the kernel fallback.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailOpenEpisode {
    /// The zones that forwarded.
    pub zones: Vec<String>,
    /// When the fallback was armed (the host's clock, Unix nanoseconds).
    pub armed_at_ns: u64,
    /// When the restarted agent removed it (the host's clock, Unix nanoseconds).
    pub ended_at_ns: u64,
    /// TCP connections that passed during the episode, met mid-stream by the
    /// restarted agent and picked up as established under its policy (so far).
    #[serde(default)]
    pub picked_up: u64,
    /// TCP connections that passed during the episode, met mid-stream by the
    /// restarted agent and cut: its policy denies them (so far).
    #[serde(default)]
    pub cut: u64,
}

impl FailOpenEpisode {
    /// How long it lasted, in milliseconds.
    pub fn active_ms(&self) -> u64 {
        self.ended_at_ns.saturating_sub(self.armed_at_ns) / 1_000_000
    }
}

impl HealthReport {
    /// Check the sizes and names (the host against `path_host`, the host of the request).
    pub fn check(&self, path_host: &str) -> Result<(), RequestError> {
        check_host(&self.host)?;
        if self.host != path_host {
            return Err(RequestError::unprocessable(format!(
                "the report is for host \"{}\", not \"{path_host}\"",
                self.host
            )));
        }
        check_text("status", &self.status, 1, 16)?;
        if self.tables.len() > MAX_WORKERS {
            return Err(RequestError::too_large(format!(
                "{} tables; the limit is {MAX_WORKERS}",
                self.tables.len()
            )));
        }
        if self.zones.len() > MAX_ZONES {
            return Err(RequestError::too_large(format!(
                "{} zones; the limit is {MAX_ZONES}",
                self.zones.len()
            )));
        }
        for z in self.zones.keys() {
            check_text("zone name", z, 1, MAX_ZONE_NAME_CHARS).map_err(RequestError::on_key)?;
        }
        if let Some(e) = &self.last_fail_open {
            if e.zones.len() > MAX_ZONES {
                return Err(RequestError::too_large(format!(
                    "last_fail_open names {} zones; the limit is {MAX_ZONES}",
                    e.zones.len()
                )));
            }
            for z in &e.zones {
                check_text("last_fail_open zone name", z, 1, MAX_ZONE_NAME_CHARS)?;
            }
        }
        if let Some(e) = &self.policy_error {
            // Rendered diagnostics hold newlines: only the length is bounded.
            let n = e.chars().count();
            if n > MAX_POLICY_ERROR_CHARS {
                return Err(RequestError::too_large(format!(
                    "policy_error has {n} characters; the limit is {MAX_POLICY_ERROR_CHARS}"
                )));
            }
        }
        if self.workers_alive > self.workers {
            return Err(RequestError::unprocessable(format!(
                "workers_alive ({}) is more than workers ({})",
                self.workers_alive, self.workers
            )));
        }
        Ok(())
    }
}

/// A host's datapath state as the controller derives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    /// No health report received yet.
    Unknown,
    /// Reporting, every worker running, nothing over a threshold.
    Healthy,
    /// Reporting, but something is wrong (the reason says what).
    Degraded,
    /// Not reporting for longer than the bound, or not enforcing.
    Failed,
}

impl HealthState {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Unknown => "unknown",
            HealthState::Healthy => "healthy",
            HealthState::Degraded => "degraded",
            HealthState::Failed => "failed",
        }
    }
}

/// Where the evacuation hook of a failure stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvacuationStatus {
    /// To be run.
    Pending,
    /// Claimed by a controller and running.
    Running,
    /// Run (see the outcome).
    Done,
}

/// The evacuation hook's run for one failure of a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evacuation {
    /// Where it stands.
    pub status: EvacuationStatus,
    /// The VMs the inventory placed on the host when it failed.
    pub vms: Vec<String>,
    /// When a controller claimed it (Unix nanoseconds; 0 while pending).
    #[serde(default)]
    pub started_ns: u64,
    /// What happened: each hook's exit status or error, once done.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub outcome: String,
}

/// The controller's view of a host's datapath, kept in its store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostHealth {
    /// The state.
    pub state: HealthState,
    /// Why (empty when healthy).
    #[serde(default)]
    pub reason: String,
    /// Since when it is in this state (controller's clock, Unix nanoseconds).
    pub since_ns: u64,
    /// When the last report arrived (controller's clock, Unix nanoseconds; 0: never).
    #[serde(default)]
    pub last_report_ns: u64,
    /// Since when the host has enforced a revision older than the
    /// controller's current one (0: it is current).
    #[serde(default)]
    pub behind_since_ns: u64,
    /// The evacuation of the current failure, if the host is failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evacuation: Option<Evacuation>,
    /// The last report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<HealthReport>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> HealthReport {
        HealthReport {
            host: "hv1".into(),
            status: "ok".into(),
            workers: 2,
            workers_alive: 2,
            ..Default::default()
        }
    }

    #[test]
    fn checks() {
        assert!(report().check("hv1").is_ok());
        assert!(report().check("hv2").is_err());
        let mut r = report();
        r.workers_alive = 3;
        assert!(r.check("hv1").is_err());
        let mut r = report();
        r.zones.insert("bad\u{7}".into(), FailureMode::Open);
        assert!(r.check("hv1").is_err());
        let mut r = report();
        r.tables = vec![TableFill::default(); MAX_WORKERS + 1];
        assert_eq!(
            r.check("hv1").unwrap_err().kind,
            crate::validate::RequestErrorKind::TooLarge
        );
        let mut r = report();
        r.policy_error = Some("x".repeat(MAX_POLICY_ERROR_CHARS + 1));
        assert!(r.check("hv1").is_err());
        let mut r = report();
        r.last_fail_open = Some(FailOpenEpisode {
            zones: vec!["web".into()],
            armed_at_ns: 1_000_000,
            ended_at_ns: 5_000_000,
            ..Default::default()
        });
        assert!(r.check("hv1").is_ok());
        assert_eq!(r.last_fail_open.as_ref().unwrap().active_ms(), 4);
        // An episode reported before the take-over was counted reads as none counted.
        let older: FailOpenEpisode =
            serde_json::from_str(r#"{"zones":["web"],"armed_at_ns":1,"ended_at_ns":2}"#).unwrap();
        assert_eq!((older.picked_up, older.cut), (0, 0));
        r.last_fail_open.as_mut().unwrap().zones.push("\n".into());
        assert!(r.check("hv1").is_err());
        let mut r = report();
        r.last_fail_open = Some(FailOpenEpisode {
            zones: vec!["z".into(); MAX_ZONES + 1],
            ..Default::default()
        });
        assert!(r.check("hv1").is_err());
    }

    #[test]
    fn table_percent() {
        let t = |c, cap| TableFill {
            worker: 0,
            connections: c,
            capacity: cap,
        };
        assert_eq!(t(0, 0).percent(), 0);
        assert_eq!(t(91, 100).percent(), 91);
        assert_eq!(t(u64::MAX, 1).percent(), u64::MAX);
    }
}

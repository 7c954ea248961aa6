//! Host health: the agents' datapath reports, the state the controller
//! derives from them, and the evacuation hook of a failed host.
//!
//! Each agent pushes a [`HealthReport`] every few seconds (3 s by default).
//! The controller keeps the last one per host with the time it arrived, in
//! the store under `health/<host>` as a [`HostHealth`], and a monitor
//! ([`Controller::health_tick`], once a second on a thread of the server)
//! derives the host's state from it ([`derive()`]):
//!
//! - **failed**: no report for longer than [`HealthConfig::failed_after`]
//!   (15 s by default: five missed reports), or the agent says its datapath
//!   is not enforcing, or no worker runs;
//! - **degraded**: a worker dead, drops in the last report over
//!   [`HealthConfig::drop_threshold`], a worker's connection table at
//!   [`HealthConfig::table_percent`] or fuller, the agent's own status not
//!   ok (a policy it refused), or a controller revision older than the
//!   current one for longer than [`HealthConfig::behind_after`];
//! - **healthy** otherwise.
//!
//! Every change of state is committed with a change record (action
//! `host.health`, actor `controller`, resource `host/<name>`), so it lands in
//! the store's change list and in the controller's audit trail like any
//! change: a health transition changes what the controller believes about a
//! host, not the policy, and the record says so (no `policy_version`).
//!
//! A transition to failed also stores a pending [`Evacuation`] naming the
//! VMs the inventory puts on the host. The monitor claims it (pending →
//! running, by compare-and-swap: of several controllers on one etcd, one
//! runs it), runs the operator's hook on its own thread (a command and/or a
//! webhook, each with the host, its VMs and a timeout), and commits the
//! outcome (→ done) with a `host.evacuate` change record. Because the
//! evacuation is stored with the failure, a restarted controller neither
//! runs a done hook again nor forgets a pending one; a claim whose
//! controller died (still running after the hook timeout plus a minute) is
//! run again, so a hook runs at least once per failure and, unless a
//! controller dies during it, exactly once. Recovery clears it: the next
//! failure runs the hook again.
//!
//! The times are each controller's own clock: with several controllers on
//! one etcd their clocks should agree to well under the failure bound.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use palisade_api::health::{EvacuationStatus, HealthReport, HealthState, HostHealth};
use palisade_api::validate::check_host;
use palisade_audit::record::ChangeRecord;

use crate::core::{Controller, CoreError, now_ns};
use crate::store::{self, Compare};

pub use palisade_api::health::Evacuation;

/// Where host health lives in the store.
pub const HEALTH: &str = "health/";
/// How often a state change is retried after losing a compare-and-swap.
const CAS_RETRIES: usize = 8;

/// The thresholds of [`derive()`] and the evacuation hooks.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// No report for this long: failed.
    pub failed_after: Duration,
    /// More drops (ring and table) than this in one report: degraded.
    pub drop_threshold: u64,
    /// A worker's connection table this full (per cent) or fuller: degraded.
    pub table_percent: u64,
    /// Enforcing an older revision than the current one for this long: degraded.
    pub behind_after: Duration,
    /// How often the monitor looks.
    pub check_interval: Duration,
    /// Run with the host and its VMs as arguments (and as JSON on stdin) when a host fails.
    pub evacuate_command: Option<PathBuf>,
    /// POSTed the same JSON when a host fails.
    pub evacuate_webhook: Option<String>,
    /// How long a hook may run (a command is killed after it).
    pub hook_timeout: Duration,
}

impl Default for HealthConfig {
    fn default() -> HealthConfig {
        HealthConfig {
            failed_after: Duration::from_secs(15),
            drop_threshold: 1000,
            table_percent: 90,
            behind_after: Duration::from_secs(30),
            check_interval: Duration::from_secs(1),
            evacuate_command: None,
            evacuate_webhook: None,
            hook_timeout: Duration::from_secs(60),
        }
    }
}

fn health_key(host: &str) -> String {
    format!("{HEALTH}{host}")
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// What a silent host's zones do, as its last report said: the open zones
/// forward unfiltered once the host's fallback is armed (the controller
/// cannot see whether it was), the others pass nothing.
fn failure_modes(r: &HealthReport) -> String {
    let open: Vec<&str> = r
        .zones
        .iter()
        .filter(|(_, m)| **m == palisade_api::health::FailureMode::Open)
        .map(|(z, _)| z.as_str())
        .collect();
    if r.fallback_planned && !open.is_empty() {
        format!(
            "zone(s) {} fail open if its fallback armed, the others closed",
            open.join(",")
        )
    } else {
        "every zone fails closed".into()
    }
}

/// The state of `h` at `now_ns`, with its reason, and the new
/// `behind_since_ns`. `current` is the controller's current revision;
/// `watching_since_ns` is when this controller's monitor started: silence
/// counts from then at the earliest, so a controller that was down (or
/// restarted) gives every agent the whole bound to reach it again before
/// it calls a host failed, instead of evacuating the fleet at its start.
pub fn derive(
    h: &HostHealth,
    now_ns: u64,
    current: u64,
    cfg: &HealthConfig,
    watching_since_ns: u64,
) -> (HealthState, String, u64) {
    let Some(r) = &h.report else {
        return (HealthState::Unknown, "no report yet".into(), 0);
    };
    // The grace keeps healthy hosts healthy; it does not revive a failed one.
    let heard = match h.state {
        HealthState::Failed => h.last_report_ns,
        _ => h.last_report_ns.max(watching_since_ns),
    };
    let silent = now_ns.saturating_sub(heard);
    if silent > cfg.failed_after.as_nanos() as u64 {
        let why = format!(
            "no report for {:.1} s (bound {} s); {}",
            secs(silent),
            cfg.failed_after.as_secs_f64(),
            failure_modes(r)
        );
        return (HealthState::Failed, why, h.behind_since_ns);
    }
    if r.workers_alive == 0 {
        return (HealthState::Failed, "no datapath worker running".into(), 0);
    }
    if !r.enforcing {
        return (HealthState::Failed, "the datapath is not enforcing".into(), 0);
    }
    let mut why = Vec::new();
    if r.workers_alive < r.workers {
        why.push(format!("{} of {} workers running", r.workers_alive, r.workers));
    }
    let drops = r.ring_drops.saturating_add(r.table_drops);
    if drops > cfg.drop_threshold {
        why.push(format!(
            "{} ring and {} table drops since the last report (threshold {})",
            r.ring_drops, r.table_drops, cfg.drop_threshold
        ));
    }
    if let Some(t) = r.tables.iter().max_by_key(|t| t.percent())
        && t.capacity > 0
        && t.percent() >= cfg.table_percent
    {
        why.push(format!(
            "worker {} connection table {}% full ({} of {})",
            t.worker,
            t.percent(),
            t.connections,
            t.capacity
        ));
    }
    let behind_since = match r.controller_revision {
        Some(have) if have < current => match h.behind_since_ns {
            0 => now_ns,
            t => t,
        },
        _ => 0,
    };
    if behind_since != 0 && now_ns.saturating_sub(behind_since) > cfg.behind_after.as_nanos() as u64 {
        why.push(format!(
            "enforcing revision {}, the current one is {current}, for {:.0} s",
            r.controller_revision.unwrap_or(0),
            secs(now_ns - behind_since)
        ));
    }
    if r.status != "ok" {
        match &r.policy_error {
            Some(e) => why.push(format!("agent {}: {}", r.status, e.lines().next().unwrap_or(""))),
            None => why.push(format!("agent {}", r.status)),
        }
    }
    if why.is_empty() {
        (HealthState::Healthy, String::new(), behind_since)
    } else {
        (HealthState::Degraded, why.join("; "), behind_since)
    }
}

/// What the hooks are given: the host, why it failed, its VMs.
fn hook_payload(host: &str, h: &HostHealth, ev: &Evacuation) -> String {
    serde_json::json!({
        "host": host,
        "state": h.state.as_str(),
        "reason": h.reason,
        "since_ns": h.since_ns,
        "vms": ev.vms,
    })
    .to_string()
}

/// Run `cmd HOST VM…` with `payload` on stdin, for at most `timeout`.
fn run_command(cmd: &std::path::Path, host: &str, vms: &[String], payload: &str, timeout: Duration) -> String {
    let child = Command::new(cmd)
        .arg(host)
        .args(vms)
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return format!("command {}: cannot run: {e}", cmd.display()),
    };
    // Written from a thread: a hook that never reads its stdin must not stall this one.
    if let Some(mut stdin) = child.stdin.take() {
        let payload = payload.to_string();
        let _ = std::thread::Builder::new()
            .name("palisade-hook-stdin".into())
            .spawn(move || {
                let _ = stdin.write_all(payload.as_bytes());
            });
    }
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return format!("command {}: {status}", cmd.display()),
            Ok(None) if start.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return format!(
                    "command {}: timed out after {} s, killed",
                    cmd.display(),
                    timeout.as_secs_f64()
                );
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return format!("command {}: waiting: {e}", cmd.display()),
        }
    }
}

/// POST `payload` to `url`.
fn run_webhook(url: &str, payload: &str, timeout: Duration) -> String {
    let r = ureq::AgentBuilder::new()
        .timeout(timeout)
        .build()
        .post(url)
        .set("Content-Type", "application/json")
        .send_string(payload);
    match r {
        Ok(resp) => format!("webhook {url}: {}", resp.status()),
        Err(ureq::Error::Status(code, _)) => format!("webhook {url}: refused with {code}"),
        Err(e) => format!("webhook {url}: {e}"),
    }
}

impl Controller {
    /// Keep agent `host`'s health report, received now.
    pub fn health_report(&self, host: &str, report: HealthReport) -> Result<HostHealth, CoreError> {
        check_host(host)?;
        report.check(host)?;
        let key = health_key(host);
        let store = self.store();
        for _ in 0..CAS_RETRIES {
            let raw = store.get(&key)?;
            let t = now_ns();
            let mut h = match &raw {
                Some(b) => store::decode::<HostHealth>(&key, b)?,
                None => HostHealth {
                    state: HealthState::Unknown,
                    reason: "no report yet".into(),
                    since_ns: t,
                    last_report_ns: 0,
                    behind_since_ns: 0,
                    evacuation: None,
                    report: None,
                },
            };
            h.last_report_ns = t;
            h.report = Some(report.clone());
            let compare = Compare {
                key: key.clone(),
                value: raw,
            };
            let value = serde_json::to_vec(&h).unwrap_or_default();
            if store.txn(&[compare], &[(key.clone(), value)])? {
                return Ok(h);
            }
        }
        Err(CoreError::Conflict)
    }

    /// Every host's health, by host.
    pub fn host_health(&self) -> Result<Vec<(String, HostHealth)>, CoreError> {
        self.store()
            .list_prefix(HEALTH)?
            .into_iter()
            .map(|(k, b)| {
                let h = store::decode(&k, &b)?;
                Ok((k[HEALTH.len()..].to_string(), h))
            })
            .collect()
    }

    /// The VMs the inventory places on `host`.
    fn vms_on(&self, host: &str) -> Vec<String> {
        match self.hosts() {
            Ok(hosts) => hosts
                .into_iter()
                .find(|h| h.name == host)
                .map(|h| h.vms)
                .unwrap_or_default(),
            Err(e) => {
                eprintln!("palisade controller: the VMs of host {host}: {e}");
                Vec::new()
            }
        }
    }

    /// One look of the monitor at `now`: derive every host's state, commit
    /// the changes with their records, and return the evacuations this
    /// controller claimed (host, the health as committed), which the caller
    /// runs ([`Controller::evacuate`]).
    /// `watching_since` is when the monitor started (see [`derive()`]).
    pub fn health_tick(
        &self,
        cfg: &HealthConfig,
        now: u64,
        watching_since: u64,
    ) -> Result<Vec<(String, HostHealth)>, CoreError> {
        let current = self.current()?.revision;
        let mut claimed = Vec::new();
        for (host, _) in self.host_health()? {
            match self.health_step(&host, cfg, (now, watching_since), current) {
                Ok(Some(h)) => claimed.push((host, h)),
                Ok(None) => {}
                Err(e) => eprintln!("palisade controller: health of host {host}: {e}"),
            }
        }
        Ok(claimed)
    }

    fn health_step(
        &self,
        host: &str,
        cfg: &HealthConfig,
        (now, watching_since): (u64, u64),
        current: u64,
    ) -> Result<Option<HostHealth>, CoreError> {
        let key = health_key(host);
        let store = self.store().clone();
        for _ in 0..CAS_RETRIES {
            let Some(raw) = store.get(&key)? else { return Ok(None) };
            let old: HostHealth = store::decode(&key, &raw)?;
            let (state, reason, behind_since_ns) = derive(&old, now, current, cfg, watching_since);
            let compare = [Compare {
                key: key.clone(),
                value: Some(raw),
            }];
            let mut next = old.clone();
            // A failed host keeps the reason it failed for ("no report for
            // 15.2 s"), rather than a store write every second to count on.
            if !(state == HealthState::Failed && old.state == HealthState::Failed) {
                next.reason = reason;
            }
            next.behind_since_ns = behind_since_ns;
            if state != old.state {
                next.state = state;
                next.since_ns = now;
                next.evacuation = (state == HealthState::Failed).then(|| Evacuation {
                    status: EvacuationStatus::Pending,
                    vms: self.vms_on(host),
                    started_ns: 0,
                    outcome: String::new(),
                });
                let change = ChangeRecord {
                    time_ns: now,
                    actor: "controller".into(),
                    action: "host.health".into(),
                    resource: format!("host/{host}"),
                    diff: format!(
                        "{} -> {}{}{}",
                        old.state.as_str(),
                        state.as_str(),
                        if next.reason.is_empty() { "" } else { ": " },
                        next.reason
                    ),
                    policy_version: None,
                };
                let puts = vec![(key.clone(), serde_json::to_vec(&next).unwrap_or_default())];
                if !self.commit_change(&compare, puts, &change)? {
                    continue;
                }
                eprintln!("palisade controller: host {host}: {}", change.diff);
                return Ok(None);
            }
            // The same state: claim its evacuation if one is due.
            let stale = Duration::from_secs(60) + cfg.hook_timeout;
            let due = match &next.evacuation {
                Some(ev) if ev.status == EvacuationStatus::Pending => true,
                Some(ev) if ev.status == EvacuationStatus::Running => {
                    now.saturating_sub(ev.started_ns) > stale.as_nanos() as u64
                }
                _ => false,
            };
            let hooks = cfg.evacuate_command.is_some() || cfg.evacuate_webhook.is_some();
            if due && hooks {
                if let Some(ev) = &mut next.evacuation {
                    if ev.status == EvacuationStatus::Running {
                        eprintln!(
                            "palisade controller: host {host}: the evacuation claimed at {} never finished; running it again",
                            ev.started_ns
                        );
                    }
                    ev.status = EvacuationStatus::Running;
                    ev.started_ns = now;
                }
                if store.txn(
                    &compare,
                    &[(key.clone(), serde_json::to_vec(&next).unwrap_or_default())],
                )? {
                    return Ok(Some(next));
                }
                continue;
            }
            if next != old
                && !store.txn(
                    &compare,
                    &[(key.clone(), serde_json::to_vec(&next).unwrap_or_default())],
                )?
            {
                continue;
            }
            return Ok(None);
        }
        Err(CoreError::Conflict)
    }

    /// Run the hooks of the evacuation claimed in `h` and commit its outcome
    /// with a `host.evacuate` change record. Returns the outcome.
    pub fn evacuate(&self, cfg: &HealthConfig, host: &str, h: &HostHealth) -> Result<String, CoreError> {
        let Some(ev) = &h.evacuation else {
            return Ok(String::new());
        };
        let payload = hook_payload(host, h, ev);
        let mut outcome = Vec::new();
        if let Some(cmd) = &cfg.evacuate_command {
            outcome.push(run_command(cmd, host, &ev.vms, &payload, cfg.hook_timeout));
        }
        if let Some(url) = &cfg.evacuate_webhook {
            outcome.push(run_webhook(url, &payload, cfg.hook_timeout));
        }
        let outcome = outcome.join("; ");
        eprintln!(
            "palisade controller: host {host}: evacuation of {} VM(s): {outcome}",
            ev.vms.len()
        );
        let key = health_key(host);
        let store = self.store().clone();
        let change = ChangeRecord {
            time_ns: now_ns(),
            actor: "controller".into(),
            action: "host.evacuate".into(),
            resource: format!("host/{host}"),
            diff: format!("VMs [{}]: {outcome}", ev.vms.join(", ")),
            policy_version: None,
        };
        for _ in 0..CAS_RETRIES {
            let raw = store.get(&key)?;
            let mut puts = Vec::new();
            let compare = [Compare {
                key: key.clone(),
                value: raw.clone(),
            }];
            if let Some(b) = &raw {
                let mut now_h: HostHealth = store::decode(&key, b)?;
                // Still this failure's evacuation (not a recovery, or a later failure, meanwhile).
                if let Some(cur) = &mut now_h.evacuation
                    && cur.status == EvacuationStatus::Running
                    && cur.started_ns == ev.started_ns
                {
                    cur.status = EvacuationStatus::Done;
                    cur.outcome = outcome.clone();
                    puts.push((key.clone(), serde_json::to_vec(&now_h).unwrap_or_default()));
                }
            }
            if self.commit_change(&compare, puts, &change)? {
                return Ok(outcome);
            }
        }
        Err(CoreError::Conflict)
    }
}

/// The monitor: every `cfg.check_interval` until `stop`, a
/// [`Controller::health_tick`], each claimed evacuation run on its own thread.
pub fn monitor(ctl: Controller, cfg: HealthConfig, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::Ordering;
    let started = now_ns();
    while !stop.load(Ordering::Relaxed) {
        match ctl.health_tick(&cfg, now_ns(), started) {
            Ok(claimed) => {
                for (host, h) in claimed {
                    let (ctl, cfg) = (ctl.clone(), cfg.clone());
                    let spawned = std::thread::Builder::new()
                        .name("palisade-evacuate".into())
                        .spawn(move || {
                            if let Err(e) = ctl.evacuate(&cfg, &host, &h) {
                                eprintln!("palisade controller: host {host}: recording the evacuation: {e}");
                            }
                        });
                    if let Err(e) = spawned {
                        eprintln!("palisade controller: cannot start an evacuation thread: {e}");
                    }
                }
            }
            Err(e) => eprintln!("palisade controller: health monitor: {e}"),
        }
        let mut slept = Duration::ZERO;
        while slept < cfg.check_interval && !stop.load(Ordering::Relaxed) {
            let step = Duration::from_millis(50).min(cfg.check_interval - slept);
            std::thread::sleep(step);
            slept += step;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_api::health::TableFill;

    fn with(report: HealthReport, last: u64) -> HostHealth {
        HostHealth {
            state: HealthState::Healthy,
            reason: String::new(),
            since_ns: 0,
            last_report_ns: last,
            behind_since_ns: 0,
            evacuation: None,
            report: Some(report),
        }
    }

    fn good() -> HealthReport {
        HealthReport {
            host: "hv1".into(),
            status: "ok".into(),
            enforcing: true,
            workers: 2,
            workers_alive: 2,
            controller_revision: Some(5),
            tables: vec![TableFill {
                worker: 0,
                connections: 10,
                capacity: 100,
            }],
            ..Default::default()
        }
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_silent_host_says_which_zones_fail_open() {
        use palisade_api::health::FailureMode;
        let cfg = HealthConfig::default();
        let mut r = good();
        r.zones.insert("web".into(), FailureMode::Open);
        r.zones.insert("db".into(), FailureMode::Closed);
        r.fallback_planned = true;
        let (state, why, _) = derive(&with(r.clone(), 0), 100 * S, 5, &cfg, 0);
        assert_eq!(state, HealthState::Failed);
        assert!(
            why.contains("zone(s) web fail open if its fallback armed, the others closed"),
            "{why}"
        );
        // Without a plan nothing can arm: every zone is closed.
        r.fallback_planned = false;
        let (_, why, _) = derive(&with(r, 0), 100 * S, 5, &cfg, 0);
        assert!(why.ends_with("every zone fails closed"), "{why}");
    }

    #[test]
    fn states_from_reports() {
        let cfg = HealthConfig::default();
        let now = 100 * S;
        let state = |r: HealthReport, last: u64| derive(&with(r, last), now, 5, &cfg, 0).0;
        assert_eq!(state(good(), now - S), HealthState::Healthy);
        // The bound: 15 s of silence is still alive, past it failed.
        assert_eq!(state(good(), now - 15 * S), HealthState::Healthy);
        assert_eq!(state(good(), now - 15 * S - 1), HealthState::Failed);
        type Case = (&'static str, fn(&mut HealthReport), HealthState);
        let cases: Vec<Case> = vec![
            ("a worker dead", |r| r.workers_alive = 1, HealthState::Degraded),
            ("no worker", |r| r.workers_alive = 0, HealthState::Failed),
            ("not enforcing", |r| r.enforcing = false, HealthState::Failed),
            ("drops", |r| r.ring_drops = 1001, HealthState::Degraded),
            ("drops at threshold", |r| r.table_drops = 1000, HealthState::Healthy),
            ("table 90%", |r| r.tables[0].connections = 90, HealthState::Degraded),
            ("table 89%", |r| r.tables[0].connections = 89, HealthState::Healthy),
            ("policy error", |r| r.status = "degraded".into(), HealthState::Degraded),
        ];
        for (what, f, want) in cases {
            let mut r = good();
            f(&mut r);
            assert_eq!(state(r, now - S), want, "{what}");
        }
        assert_eq!(
            derive(
                &HostHealth {
                    report: None,
                    ..with(good(), 0)
                },
                now,
                5,
                &cfg,
                0
            )
            .0,
            HealthState::Unknown
        );
    }

    #[test]
    fn an_old_revision_degrades_only_after_the_bound() {
        let cfg = HealthConfig::default();
        let mut h = with(good(), 100 * S);
        // The controller moved on to revision 6.
        let (s, _, since) = derive(&h, 100 * S, 6, &cfg, 0);
        assert_eq!((s, since), (HealthState::Healthy, 100 * S));
        h.behind_since_ns = since;
        h.last_report_ns = 131 * S;
        let (s, why, _) = derive(&h, 131 * S, 6, &cfg, 0);
        assert_eq!(s, HealthState::Degraded, "{why}");
        assert!(why.contains("revision 5"), "{why}");
        // Caught up: the clock resets.
        h.report.as_mut().unwrap().controller_revision = Some(6);
        assert_eq!(
            derive(&h, 131 * S, 6, &cfg, 0),
            (HealthState::Healthy, String::new(), 0)
        );
    }

    #[test]
    fn a_controller_that_just_started_gives_agents_the_whole_bound() {
        let cfg = HealthConfig::default();
        // The last report is an hour old: the controller was down meanwhile.
        let h = with(good(), 100 * S);
        let started = 3700 * S;
        assert_eq!(derive(&h, started + S, 5, &cfg, started).0, HealthState::Healthy);
        assert_eq!(derive(&h, started + 15 * S, 5, &cfg, started).0, HealthState::Healthy);
        assert_eq!(derive(&h, started + 16 * S, 5, &cfg, started).0, HealthState::Failed);
        // Without the grace it would have failed at once.
        assert_eq!(derive(&h, started + S, 5, &cfg, 0).0, HealthState::Failed);
        // A host that was failed stays failed until it reports.
        let failed = HostHealth {
            state: HealthState::Failed,
            ..h.clone()
        };
        assert_eq!(derive(&failed, started + S, 5, &cfg, started).0, HealthState::Failed);
    }

    #[test]
    fn a_hook_command_gets_arguments_and_stdin_and_is_killed_at_its_timeout() {
        let dir = std::env::temp_dir().join(format!("palisade-hook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let hook = dir.join("hook");
        std::fs::write(
            &hook,
            format!("#!/bin/sh\necho \"$@\" > {0}\ncat >> {0}\nexit 3\n", out.display()),
        )
        .unwrap();
        std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let got = run_command(
            &hook,
            "hv1",
            &["a".into(), "b".into()],
            "{\"x\":1}",
            Duration::from_secs(10),
        );
        assert!(got.ends_with("exit status: 3"), "{got}");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "hv1 a b\n{\"x\":1}");
        std::fs::write(&hook, "#!/bin/sh\nexec sleep 30\n").unwrap();
        let t = Instant::now();
        let got = run_command(&hook, "hv1", &[], "{}", Duration::from_millis(300));
        assert!(got.contains("timed out"), "{got}");
        assert!(t.elapsed() < Duration::from_secs(5));
        let got = run_command(&dir.join("missing"), "hv1", &[], "{}", Duration::from_secs(1));
        assert!(got.contains("cannot run"), "{got}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

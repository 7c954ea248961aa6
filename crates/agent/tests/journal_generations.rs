//! The first snapshot after a crash is taken once the workers forward, not
//! before: the previous run's journal is kept as the older generation
//! (`host-N.journal.prev`) beside this run's fresh one until that snapshot
//! is written. A kill -9 at any point of that window (before the snapshot
//! starts, with its file half written, after it is renamed but before the
//! older generation is removed) resumes every connection; a damaged or torn
//! older generation is refused or cut with a counter, never trusted; a start
//! that finds an older generation already there (the run before crashed in
//! its window) snapshots before forwarding, so generations never chain.
//! Through `Agent::start` and `Agent::run`, without privileges (no ports).

mod support;
use support::agent_config as config;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use palisade_agent::journal::{self, Identity, Journal};
use palisade_agent::snapshot::blob_name;
use palisade_agent::{Agent, http};
use palisade_datapath::Results;
use palisade_datapath::host::HostEngine;

const VMS: usize = 4;

/// This agent's identity: host hv1, no vNICs.
fn me() -> Identity {
    Identity::new("hv1", [])
}

/// A state directory with the test policy; its `conntrack` directory.
fn state_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("policy")).unwrap();
    std::fs::write(tmp.path().join("policy/policy.yaml"), support::policy(VMS)).unwrap();
    let conntrack = tmp.path().join("state/conntrack");
    std::fs::create_dir_all(&conntrack).unwrap();
    (tmp, conntrack)
}

/// Open a connection vm-0 → vm-1:5432 from each source port in `engine`;
/// the events they made.
fn open(engine: &mut HostEngine, sports: &[u16]) -> Vec<palisade_datapath::FlowEvent> {
    let mut events = Vec::new();
    for (i, &sport) in sports.iter().enumerate() {
        let _ = engine.engine.process(
            u64::from(sport) + i as u64,
            engine.ports[0],
            &support::syn(0, 1, sport, 5432),
            &mut events,
            &mut Results::new(),
        );
    }
    events
}

/// A snapshot blob of this agent holding a connection per port of `sports`.
fn snapshot(sports: &[u16]) -> Vec<u8> {
    let c = support::compiler(VMS);
    let mut w = support::engine(&c);
    open(&mut w, sports);
    w.engine.export_all_named(&blob_name(&me()), 10)
}

/// A journal at `path` as a worker writes it: fresh, then one record per
/// connection of `sports` (rotated first if `rotated`: what a snapshot round
/// leaves, the records in the older half).
fn journal_of(path: &Path, sports: &[u16], rotated_after: bool) {
    let c = support::compiler(VMS);
    let mut w = support::engine(&c);
    let events = open(&mut w, sports);
    let mut j = Journal::create(path, me(), 0, 8).unwrap();
    let table = w.engine.conntrack();
    for ev in &events {
        j.note(ev, table.find(&ev.key).and_then(|s| table.get(s)), 30);
    }
    assert_eq!(j.stats.records, sports.len() as u64);
    if rotated_after {
        j.rotate();
    }
}

/// /health's `state` and connection count of a running or started agent.
fn health(dir: &Path) -> (serde_json::Value, u64) {
    let sock = dir.join("state/agent.sock");
    let health: serde_json::Value = serde_json::from_str(&http::get_unix(&sock, "/health").unwrap()).unwrap();
    (health["state"].clone(), health["connections"].as_u64().unwrap())
}

/// Start an agent on `dir`, read its /health, and kill it (dropped without
/// a stop: nothing more is written).
fn start_and_kill(dir: &Path) -> (serde_json::Value, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let agent = Agent::start(config(dir), stop.clone()).expect("the agent starts");
    let seen = health(dir);
    drop(agent);
    stop.store(true, Ordering::Relaxed);
    seen
}

fn records(path: &Path) -> usize {
    journal::read(path, &me()).unwrap().ops.len()
}

#[test]
fn a_kill_between_the_import_and_the_first_snapshot_resumes_every_connection() {
    let (tmp, conntrack) = state_dir();
    let (snap, cur, prev) = (
        conntrack.join("host-0.snapshot"),
        conntrack.join("host-0.journal"),
        conntrack.join("host-0.journal.prev"),
    );
    // What a crash left: a snapshot of two connections, a journal of two more.
    std::fs::write(&snap, snapshot(&[40000, 40001])).unwrap();
    journal_of(&cur, &[40002, 40003], false);
    let before = std::fs::read(&snap).unwrap();

    // Run A resumes all four and forwards before its first snapshot: the
    // snapshot is untouched, the journal kept as the older generation,
    // a fresh one opened.
    let (state, conns) = start_and_kill(tmp.path());
    assert_eq!(conns, 4, "{state}");
    assert_eq!(state["first_snapshot"], "after_forwarding", "{state}");
    assert_eq!(state["snapshots"]["written"], 0, "{state}");
    assert_eq!(state["older_journals_kept"], true, "{state}");
    assert_eq!(std::fs::read(&snap).unwrap(), before, "no snapshot before forwarding");
    assert_eq!(records(&prev), 2, "the last run's journal is the older generation");
    assert_eq!(records(&cur), 0, "this run's journal starts empty");

    // A was killed after its worker journaled a fifth connection.
    journal_of(&cur, &[40004], false);

    // Run B resumes all five from the snapshot and both generations; having
    // found an older generation it snapshots before forwarding and removes it.
    let (state, conns) = start_and_kill(tmp.path());
    assert_eq!(conns, 5, "{state}");
    assert_eq!(state["resumed"]["journal"]["records"], 3, "{state}");
    assert_eq!(state["refused_total"], 0, "{state}");
    assert_eq!(state["first_snapshot"], "before_forwarding", "{state}");
    assert_eq!(state["snapshots"]["written"], 1, "{state}");
    assert_eq!(state["older_journals_kept"], false, "{state}");
    assert!(
        !prev.exists(),
        "the older generation is gone once the snapshot holds it"
    );
    assert_eq!(records(&cur), 0);

    // Run C (B killed at once) finds everything in B's snapshot.
    let (state, conns) = start_and_kill(tmp.path());
    assert_eq!(conns, 5, "{state}");
    assert_eq!(state["resumed"]["journal"]["records"], 0, "{state}");
    assert_eq!(state["first_snapshot"], "after_forwarding", "{state}");
}

#[test]
fn a_kill_during_the_first_snapshot_resumes_every_connection() {
    // (what, the snapshot file, what lies beside it)
    type Case = (&'static str, Vec<u8>, Option<Vec<u8>>);
    let old = snapshot(&[40000, 40001]);
    let new = snapshot(&[40000, 40001, 40002, 40003, 40004]);
    let cases: Vec<Case> = vec![
        (
            "killed while the new snapshot was written (its temporary file half there)",
            old.clone(),
            Some(new[..new.len() / 2].to_vec()),
        ),
        (
            "killed after the new snapshot was renamed, before the older generation went",
            new,
            None,
        ),
    ];
    for (what, blob, tmp_file) in cases {
        let (tmp, conntrack) = state_dir();
        std::fs::write(conntrack.join("host-0.snapshot"), blob).unwrap();
        if let Some(t) = tmp_file {
            std::fs::write(conntrack.join("host-0.tmp"), t).unwrap();
        }
        journal_of(&conntrack.join("host-0.journal.prev"), &[40002, 40003], false);
        // This run's journal, rotated by the round (its record in the older half).
        journal_of(&conntrack.join("host-0.journal"), &[40004], true);
        let (state, conns) = start_and_kill(tmp.path());
        assert_eq!(conns, 5, "{what}: {state}");
        assert_eq!(state["refused_total"], 0, "{what}: {state}");
        assert_eq!(state["first_snapshot"], "before_forwarding", "{what}: {state}");
        assert!(!conntrack.join("host-0.journal.prev").exists(), "{what}");
    }
}

#[test]
fn a_damaged_or_torn_older_generation_is_refused_or_cut_and_counted() {
    // (what, damage to host-0.journal.prev, reason refused, connections resumed, torn records)
    type Damage = fn(&mut Vec<u8>);
    let cases: Vec<(&str, Damage, Option<&str>, u64, u64)> = vec![
        ("header bit flip", |b| b[12] ^= 1, Some("checksum"), 3, 0),
        ("cut short", |b| b.truncate(b.len() - 1), Some("truncated"), 3, 0),
        ("version 7", |b| b[7] = 7, Some("wrong_version"), 3, 0),
        (
            "last record torn",
            |b| {
                let at = journal::HEADER_LEN + journal::SLOT_LEN;
                b[at + 20..at + journal::SLOT_LEN].fill(0);
            },
            None,
            4,
            1,
        ),
    ];
    for (what, damage, reason, kept, torn) in cases {
        let (tmp, conntrack) = state_dir();
        std::fs::write(conntrack.join("host-0.snapshot"), snapshot(&[40000, 40001])).unwrap();
        let prev = conntrack.join("host-0.journal.prev");
        journal_of(&prev, &[40002, 40003], false);
        let mut bytes = std::fs::read(&prev).unwrap();
        damage(&mut bytes);
        std::fs::write(&prev, bytes).unwrap();
        journal_of(&conntrack.join("host-0.journal"), &[40004], false);
        let (state, conns) = start_and_kill(tmp.path());
        assert_eq!(conns, kept, "{what}: {state}");
        assert_eq!(state["resumed"]["journal"]["torn"], torn, "{what}: {state}");
        match reason {
            Some(r) => {
                assert_eq!(state["refused"][r], 1, "{what}: {state}");
                assert_eq!(state["refusals"][0]["file"], prev.display().to_string(), "{what}");
            }
            None => assert_eq!(state["refused_total"], 0, "{what}: {state}"),
        }
    }
    // Not a file: refused as such; the start keeps the journal beside it
    // and snapshots before forwarding rather than build on it.
    let (tmp, conntrack) = state_dir();
    std::fs::write(conntrack.join("host-0.snapshot"), snapshot(&[40000, 40001])).unwrap();
    let prev = conntrack.join("host-0.journal.prev");
    std::fs::create_dir(&prev).unwrap();
    std::fs::write(prev.join("x"), b"").unwrap();
    journal_of(&conntrack.join("host-0.journal"), &[40002, 40003], false);
    let (state, conns) = start_and_kill(tmp.path());
    assert_eq!(conns, 4, "{state}");
    assert_eq!(state["refused"]["not_regular"], 1, "{state}");
    assert_eq!(state["first_snapshot"], "before_forwarding", "{state}");
    assert_eq!(state["snapshots"]["written"], 1, "{state}");
}

#[test]
fn the_first_snapshot_taken_while_forwarding_removes_the_older_generation() {
    let (tmp, conntrack) = state_dir();
    std::fs::write(conntrack.join("host-0.snapshot"), snapshot(&[40000, 40001])).unwrap();
    journal_of(&conntrack.join("host-0.journal"), &[40002, 40003], false);
    let prev = conntrack.join("host-0.journal.prev");
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let config = config(tmp.path());
    let thread = std::thread::spawn(move || {
        let mut agent = Agent::start(config, s.clone()).unwrap_or_else(|e| panic!("{e}"));
        agent.run(&s).unwrap_or_else(|e| panic!("{e}"));
        // Killed, not stopped: nothing saved on the way out.
        drop(agent);
    });
    let t = Instant::now();
    let state = loop {
        // Empty until the first publish.
        let text = http::get_unix(&tmp.path().join("state/agent.sock"), "/health").unwrap_or_default();
        if let Ok(h) = serde_json::from_str::<serde_json::Value>(&text) {
            if h["state"]["snapshots"]["written"].as_u64() >= Some(1) {
                break h["state"].clone();
            }
        }
        assert!(t.elapsed() < Duration::from_secs(20), "a snapshot round while running");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(state["first_snapshot"], "after_forwarding", "{state}");
    assert_eq!(state["older_journals_kept"], false, "{state}");
    assert!(!prev.exists(), "removed once the snapshot holds it");
    stop.store(true, Ordering::Relaxed);
    thread.join().unwrap();
    let (state, conns) = start_and_kill(tmp.path());
    assert_eq!(conns, 4, "all four from the snapshot taken while forwarding: {state}");
    assert_eq!(state["resumed"]["journal"]["records"], 0, "{state}");
}

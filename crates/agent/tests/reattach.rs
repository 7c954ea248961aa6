//! Reattaching to the state a crash left: snapshot and crash-journal files
//! that are damaged, cut short, of another format version, another host's
//! or another vNIC set's, or not files at all are refused at start with a
//! message naming the file and the problem, counted by reason (metrics and
//! `/health`), and the agent starts without them; it never fails to start
//! for them. A journal whose last record a kill interrupted keeps every
//! record before it. Through `Agent::start`, without privileges (no ports).

mod support;
use support::agent_config as config;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use palisade_agent::journal::{Identity, Journal};
use palisade_agent::snapshot::blob_name;
use palisade_agent::{Agent, http};
use palisade_datapath::Results;

/// This agent's identity: host hv1, no vNICs.
fn me() -> Identity {
    Identity::new("hv1", [])
}

const VMS: usize = 4;

/// A snapshot blob named `name` holding two connections, and a journal
/// for `identity` holding two more (one record each).
fn state(name: &str, identity: &Identity, journal: &Path) -> Vec<u8> {
    let c = support::compiler(VMS);
    let mut w = support::engine(&c);
    let mut events = Vec::new();
    for (i, sport) in [40000, 40001].into_iter().enumerate() {
        let _ = w.engine.process(
            i as u64,
            w.ports[0],
            &support::syn(0, 1, sport, 5432),
            &mut events,
            &mut Results::new(),
        );
    }
    let blob = w.engine.export_all_named(name, 10);
    events.clear();
    let mut j = Journal::create(journal, identity.clone(), 0, 8).unwrap();
    for (i, sport) in [40002, 40003].into_iter().enumerate() {
        let _ = w.engine.process(
            20 + i as u64,
            w.ports[0],
            &support::syn(0, 1, sport, 5432),
            &mut events,
            &mut Results::new(),
        );
    }
    let table = w.engine.conntrack();
    for ev in &events {
        j.note(ev, table.find(&ev.key).and_then(|s| table.get(s)), 30);
    }
    assert_eq!(j.stats.records, 2);
    blob
}

/// What a start made of the state directory: /health's `state` and connections, and the metrics page.
fn start(dir: &Path) -> (serde_json::Value, u64, String) {
    let stop = Arc::new(AtomicBool::new(false));
    let agent = Agent::start(config(dir), stop.clone()).expect("the agent starts whatever its state files hold");
    let sock = dir.join("state/agent.sock");
    let health: serde_json::Value = serde_json::from_str(&http::get_unix(&sock, "/health").unwrap()).unwrap();
    let metrics = http::get_unix(&sock, "/metrics").unwrap();
    drop(agent);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let conns = health["connections"].as_u64().unwrap();
    (health["state"].clone(), conns, metrics)
}

/// Which file a case damages, and how.
enum Target {
    Snapshot,
    Journal,
}

#[test]
fn bad_state_files_are_refused_named_and_counted_and_the_agent_starts_without_them() {
    let other_vnics = Identity::new("hv1", ["web-1.0"]);
    let other_host = Identity::new("hv2", []);
    type Damage = fn(&mut Vec<u8>);
    let cases: Vec<(&str, Target, Option<Damage>, &str, &str)> = vec![
        // (what, which file, damage, reason, words its message must hold)
        (
            "empty snapshot",
            Target::Snapshot,
            Some(|b| b.clear()),
            "truncated",
            "truncated",
        ),
        (
            "snapshot cut short",
            Target::Snapshot,
            Some(|b| b.truncate(b.len() - 9)),
            "truncated",
            "truncated",
        ),
        (
            "snapshot bit flip",
            Target::Snapshot,
            Some(|b| b[40] ^= 4),
            "checksum",
            "checksum mismatch",
        ),
        (
            "snapshot version 9",
            Target::Snapshot,
            Some(|b| b[7] = 9),
            "wrong_version",
            "version 9",
        ),
        (
            "not a snapshot",
            Target::Snapshot,
            Some(|b| b[0] = b'X'),
            "bad_magic",
            "bad magic",
        ),
        (
            "journal cut short",
            Target::Journal,
            Some(|b| b.truncate(b.len() - 1)),
            "truncated",
            "truncated",
        ),
        (
            "journal header bit flip",
            Target::Journal,
            Some(|b| b[12] ^= 1),
            "checksum",
            "header checksum",
        ),
        (
            "journal version 7",
            Target::Journal,
            Some(|b| b[7] = 7),
            "wrong_version",
            "unsupported journal version 7",
        ),
        (
            "not a journal",
            Target::Journal,
            Some(|b| b[1] = b'?'),
            "bad_magic",
            "bad magic",
        ),
    ];
    for (what, target, damage, reason, words) in cases {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("policy")).unwrap();
        std::fs::write(tmp.path().join("policy/policy.yaml"), support::policy(VMS)).unwrap();
        let conntrack = tmp.path().join("state/conntrack");
        std::fs::create_dir_all(&conntrack).unwrap();
        let (snapshot, journal) = (conntrack.join("host-0.snapshot"), conntrack.join("host-0.journal"));
        let blob = state(&blob_name(&me()), &me(), &journal);
        std::fs::write(&snapshot, &blob).unwrap();
        let path = match target {
            Target::Snapshot => &snapshot,
            Target::Journal => &journal,
        };
        let mut bytes = std::fs::read(path).unwrap();
        if let Some(d) = damage {
            d(&mut bytes);
        }
        std::fs::write(path, &bytes).unwrap();
        let (state, conns, metrics) = start(tmp.path());
        assert_eq!(state["refused"][reason], 1, "{what}: {state}");
        assert_eq!(state["refused_total"], 1, "{what}: {state}");
        let refusal = &state["refusals"][0];
        assert_eq!(refusal["file"], path.display().to_string(), "{what}: {refusal}");
        assert!(
            refusal["message"].as_str().unwrap().contains(words),
            "{what}: {refusal}"
        );
        assert!(
            metrics.contains(&format!(
                "palisade_state_refused_total{{host=\"hv1\",reason=\"{reason}\"}} 1\n"
            )),
            "{what}"
        );
        // The other file still counts: two connections from whichever was whole.
        assert_eq!(conns, 2, "{what}: {state}");
    }

    // Another host's or another vNIC set's state, in either file, and files that are not files.
    /// Writes the snapshot and journal files of a case.
    type Make<'a> = Box<dyn Fn(&Path, &Path) + 'a>;
    let foreign: Vec<(&str, Make<'_>, &str, &str, u64)> = vec![
        (
            "snapshot of another host",
            Box::new(|s, j| std::fs::write(s, state(&blob_name(&other_host), &me(), j)).unwrap()),
            "foreign",
            "another host, \"hv2\"",
            2,
        ),
        (
            "snapshot of another vNIC set",
            Box::new(|s, j| std::fs::write(s, state(&blob_name(&other_vnics), &me(), j)).unwrap()),
            "foreign",
            "another vNIC set",
            2,
        ),
        (
            "a vNIC's migration blob as a snapshot",
            Box::new(|s, j| std::fs::write(s, state("web-1.0", &me(), j)).unwrap()),
            "foreign",
            "migration blob",
            2,
        ),
        (
            "journal of another host",
            Box::new(|s, j| std::fs::write(s, state(&blob_name(&me()), &other_host, j)).unwrap()),
            "foreign",
            "journal of host \"hv2\"",
            2,
        ),
        (
            "journal of another vNIC set",
            Box::new(|s, j| std::fs::write(s, state(&blob_name(&me()), &other_vnics, j)).unwrap()),
            "foreign",
            "another vNIC set",
            2,
        ),
        (
            "snapshot is a directory",
            Box::new(|s, j| {
                let _ = state(&blob_name(&me()), &me(), j);
                std::fs::create_dir(s).unwrap();
            }),
            "not_regular",
            "not a regular file",
            2,
        ),
        (
            "journal is a symlink",
            Box::new(|s, j| {
                std::fs::write(s, state(&blob_name(&me()), &me(), &j.with_extension("real"))).unwrap();
                std::os::unix::fs::symlink(j.with_extension("real"), j).unwrap();
            }),
            "not_regular",
            "not a regular file",
            2,
        ),
    ];
    for (what, make, reason, words, kept) in foreign {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("policy")).unwrap();
        std::fs::write(tmp.path().join("policy/policy.yaml"), support::policy(VMS)).unwrap();
        let conntrack = tmp.path().join("state/conntrack");
        std::fs::create_dir_all(&conntrack).unwrap();
        make(&conntrack.join("host-0.snapshot"), &conntrack.join("host-0.journal"));
        let (state, conns, _) = start(tmp.path());
        assert_eq!(state["refused"][reason], 1, "{what}: {state}");
        let message = state["refusals"][0]["message"].as_str().unwrap().to_string();
        assert!(message.contains(words), "{what}: {message}");
        assert_eq!(conns, kept, "{what}: {state}");
    }
}

#[test]
fn whole_state_resumes_and_a_torn_last_journal_record_is_dropped_and_counted() {
    for torn in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("policy")).unwrap();
        std::fs::write(tmp.path().join("policy/policy.yaml"), support::policy(VMS)).unwrap();
        let conntrack = tmp.path().join("state/conntrack");
        std::fs::create_dir_all(&conntrack).unwrap();
        let journal = conntrack.join("host-0.journal");
        std::fs::write(
            conntrack.join("host-0.snapshot"),
            state(&blob_name(&me()), &me(), &journal),
        )
        .unwrap();
        if torn {
            // The second record, cut after its generation: what a kill in the middle of its copy leaves.
            let mut b = std::fs::read(&journal).unwrap();
            let at = palisade_agent::journal::HEADER_LEN + palisade_agent::journal::SLOT_LEN;
            b[at + 20..at + palisade_agent::journal::SLOT_LEN].fill(0);
            std::fs::write(&journal, b).unwrap();
        }
        let (state, conns, _) = start(tmp.path());
        assert_eq!(state["refused_total"], 0, "{state}");
        let resumed = &state["resumed"];
        assert_eq!(resumed["from"], "snapshot", "{state}");
        if torn {
            assert_eq!(conns, 3, "the snapshot's two and the journal's first: {state}");
            assert_eq!(
                (&resumed["journal"]["records"], &resumed["journal"]["torn"]),
                (&1.into(), &1.into()),
                "{state}"
            );
        } else {
            assert_eq!(conns, 4, "the snapshot's two and the journal's two: {state}");
            assert_eq!(resumed["journal"]["records"], 2, "{state}");
        }
        // The start kept the journal as the older generation (its first
        // snapshot comes once it forwards) and opened a fresh one.
        assert_eq!(state["snapshots"]["written"], 0, "{state}");
        assert_eq!(state["older_journals_kept"], true, "{state}");
        let older = palisade_agent::journal::read(&journal.with_extension("journal.prev"), &me()).unwrap();
        assert_eq!(older.ops.len(), if torn { 1 } else { 2 });
        let fresh = palisade_agent::journal::read(&journal, &me()).unwrap();
        assert_eq!(fresh.ops.len(), 0);
    }
}

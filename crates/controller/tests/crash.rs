//! A controller killed (SIGKILL) between a change's commit and its append to
//! the audit trail (issue 22, item 4): after a restart the trail holds
//! every committed change exactly once, on the embedded store and on etcd.
//!
//! The controller runs in a child process (this test binary again, running
//! only [`crash_child`]), which makes changes until it is killed: either by
//! itself right after its Nth commit (`PALISADE_FAULT_KILL_AFTER_COMMIT`,
//! the fault-injection hook; the production path is otherwise the same), or
//! by the test at a random moment. The parent then starts a controller on
//! the same store and trail, as an operator's restart would.

mod common;

use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use palisade_api::roles::Role;
use palisade_api::{ApplyRequest, TagRequest};
use palisade_audit::record::{ChangeRecord, Record};
use palisade_controller::core::Controller;
use palisade_controller::server::{self, ServeOptions};
use palisade_controller::store::{EmbeddedStore, EtcdStore, Store};
use palisade_controller::trail::Trail;

const CHILD_DIR: &str = "PALISADE_CRASH_CHILD_DIR";
const CHILD_ETCD: &str = "PALISADE_CRASH_CHILD_ETCD";

fn open_store(dir: &Path, etcd: Option<&str>) -> Arc<dyn Store> {
    match etcd {
        Some(url) => Arc::new(EtcdStore::new(vec![url.to_string()], "/crash/")),
        None => Arc::new(EmbeddedStore::open(&dir.join("store.redb")).unwrap()),
    }
}

/// The child: a controller making every kind of change, round after round,
/// until it is killed (or, without a kill, for 2000 rounds).
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let dir = Path::new(&dir);
    let etcd = std::env::var(CHILD_ETCD).ok();
    let store = open_store(dir, etcd.as_deref());
    let trail = Arc::new(Trail::open(&dir.join("audit")).unwrap());
    let ctl = Controller::new(store).with_trail(trail);
    let pid = std::process::id();
    let apply = |p: &str| ApplyRequest {
        files: files(p),
        message: String::new(),
    };
    for round in 0..2000 {
        let name = format!("t{pid}-{round}");
        ctl.create_token("local", &name, Role::ReadOnly).unwrap();
        ctl.apply(
            "local",
            &apply(if round % 2 == 0 { POLICY_V2 } else { POLICY_V1 }),
            false,
        )
        .unwrap();
        let tag = TagRequest {
            set: [("round".to_string(), round.to_string())].into(),
            remove: Vec::new(),
        };
        ctl.tag("local", "web-1", &tag).unwrap();
        ctl.revoke_token("local", &name).unwrap();
    }
}

/// Run the child until it dies; `kill_after`: the commit after which it kills itself,
/// else the test kills it after `delay`.
fn run_child(dir: &Path, etcd: Option<&str>, kill_after: Option<u32>, delay: Duration) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "crash_child", "--nocapture", "--test-threads", "1"])
        .env(CHILD_DIR, dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("child.log")).unwrap());
    if let Some(url) = etcd {
        cmd.env(CHILD_ETCD, url);
    }
    if let Some(n) = kill_after {
        cmd.env("PALISADE_FAULT_KILL_AFTER_COMMIT", n.to_string());
    }
    let mut child = cmd.spawn().unwrap();
    let status = match kill_after {
        Some(_) => {
            // The hook kills it; give up (and fail) after a minute.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(s) = child.try_wait().unwrap() {
                    break s;
                }
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("the child was not killed after commit {kill_after:?}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        None => {
            std::thread::sleep(delay);
            child.kill().unwrap();
            child.wait().unwrap()
        }
    };
    let log = std::fs::read_to_string(dir.join("child.log")).unwrap_or_default();
    assert_eq!(
        status.signal(),
        Some(9),
        "the child must die by SIGKILL: {status:?}\n{log}"
    );
}

fn trail_changes(dir: &Path) -> Vec<ChangeRecord> {
    palisade_audit::LogReader::open(&dir.join("audit"))
        .unwrap()
        .query(&palisade_audit::Query::default())
        .unwrap()
        .into_iter()
        .filter_map(|(_, r)| match r {
            Record::Change(c) => Some(c),
            _ => None,
        })
        .collect()
}

/// Restart a controller on the store and trail (as `palisade controller`
/// does: the server's start brings the trail up to date), then check that
/// the trail holds exactly the store's change records, each once, and
/// verifies.
fn restart_and_check(dir: &Path, etcd: Option<&str>, what: &str) {
    let store = open_store(dir, etcd);
    let trail = Arc::new(Trail::open(&dir.join("audit")).unwrap());
    let ctl = Controller::new(store.clone()).with_trail(trail);
    let srv = server::spawn(ctl.clone(), ServeOptions::plain("127.0.0.1:0".parse().unwrap())).unwrap();
    srv.stop();
    let stored = ctl.changes().unwrap();
    drop(ctl);
    // The server's warm-up thread may still hold the controller (and its
    // trail's lock) for a moment after the server stops.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while let Err(palisade_controller::trail::TrailError::Locked(_)) = Trail::open(&dir.join("audit")) {
        assert!(std::time::Instant::now() < deadline, "{what}: the trail stays locked");
        std::thread::sleep(Duration::from_millis(20));
    }
    let logged = trail_changes(dir);
    let key = |c: &ChangeRecord| (c.time_ns, c.action.clone(), c.resource.clone(), c.diff.clone());
    let mut a = stored.clone();
    let mut b = logged.clone();
    a.sort_by_key(key);
    b.sort_by_key(key);
    let missing: Vec<_> = a
        .iter()
        .filter(|c| !b.contains(c))
        .map(|c| (&c.action, c.time_ns))
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: {} committed changes are not in the trail: {missing:?}",
        missing.len()
    );
    assert_eq!(a, b, "{what}: each stored change exactly once in the trail");
    let report = palisade_audit::verify(&dir.join("audit"), None).unwrap();
    assert!(report.is_ok(), "{what}: {:?}", report.problems);
}

fn crash_cycles(tag: &str, etcd: Option<&str>) {
    let dir = TempDir::new(tag);
    // At random moments, from outside.
    for cycle in 0..6u64 {
        let delay = Duration::from_millis(150 + (cycle * 97 + u64::from(std::process::id())) % 400);
        run_child(&dir.0, etcd, None, delay);
        restart_and_check(&dir.0, etcd, &format!("killed after {delay:?}"));
    }
    // Deterministic: killed right after commit N, for each kind of change
    // (commits 1..4 of a round are: token create, apply, tag, revoke).
    for n in 1..=6 {
        run_child(&dir.0, etcd, Some(n), Duration::ZERO);
        restart_and_check(&dir.0, etcd, &format!("killed after commit {n}"));
        // A second restart finds nothing to add: exactly once.
        restart_and_check(&dir.0, etcd, &format!("second restart after commit {n}"));
    }
}

#[test]
fn a_crash_between_commit_and_append_is_repaired_embedded() {
    crash_cycles("crash-embedded", None);
}

#[test]
fn a_crash_between_commit_and_append_is_repaired_etcd() {
    let Some(etcd) = TestEtcd::or_skip("crash", 23_821) else {
        return;
    };
    crash_cycles("crash-etcd", Some(&etcd.url));
}

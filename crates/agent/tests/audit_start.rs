//! The audit trail opens beside the agent's start, not before it (opening
//! checks the active segment's chain, which a restart does not wait for):
//! a trail that cannot open still stops the agent with the trail's error,
//! and one that opens is closed with the agent (its records signed). An
//! agent with no ports needs no privileges.

mod support;
use support::free_udp_port;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use palisade_agent::{Agent, AgentConfig, AgentError};

fn config(dir: &Path, audit: &Path) -> AgentConfig {
    let text = format!(
        "host = \"hv1\"\npolicy = \"{}\"\nstate_dir = \"{}\"\naudit = \"{}\"\nworkers = 1\n\
         [underlay]\nlocal = \"127.0.0.1\"\nport = {}\n",
        dir.join("policy").display(),
        dir.join("state").display(),
        audit.display(),
        free_udp_port()
    );
    AgentConfig::parse(&text, Path::new("hv1.toml")).unwrap()
}

fn setup() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("policy")).unwrap();
    std::fs::write(tmp.path().join("policy/policy.yaml"), support::policy(2)).unwrap();
    tmp
}

#[test]
fn a_trail_that_cannot_open_stops_the_agent_with_its_error() {
    let tmp = setup();
    // A regular file where the trail's directory should be.
    let not_a_dir = tmp.path().join("audit");
    std::fs::write(&not_a_dir, b"not a directory").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let agent =
        Agent::start(config(tmp.path(), &not_a_dir), stop.clone()).expect("the start does not wait for the trail");
    let e = agent.shutdown().expect_err("the trail's failure is the agent's");
    assert!(matches!(&e, AgentError::Audit { dir, .. } if *dir == not_a_dir), "{e}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}

#[test]
fn a_trail_opened_beside_the_start_is_closed_with_the_agent() {
    let tmp = setup();
    let audit = tmp.path().join("audit");
    let stop = Arc::new(AtomicBool::new(false));
    let config = config(tmp.path(), &audit);
    let retention = config.audit_retention();
    let agent = Agent::start(config, stop.clone()).unwrap();
    agent.shutdown().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // Its signing key was made, and the trail opens again, intact.
    assert!(tmp.path().join("state/audit.key").exists());
    let trail = palisade_agent::trail::Trail::open(
        &audit,
        retention,
        &tmp.path().join("state/audit.key"),
        &tmp.path().join("state/audit.head"),
    );
    assert!(trail.is_ok(), "{:?}", trail.err());
}

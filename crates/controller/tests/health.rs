//! Host health end to end: an agent that stops reporting is marked failed
//! within the bound, the evacuation hook runs once per failure with the
//! host's VMs (not again while it stays failed, nor after a controller
//! restart), recovery marks it healthy, and a second failure runs the hook
//! again. Every transition is a change record in the store and the trail.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use palisade_api::client::{Client, ClientAuth};
use palisade_api::health::{EvacuationStatus, HealthReport, HealthState, HostHealth};
use palisade_api::roles::Role;
use palisade_controller::core::Controller;
use palisade_controller::health::HealthConfig;
use palisade_controller::server::{self, RunningServer, ServeOptions};
use palisade_controller::store::{EmbeddedStore, Store};
use palisade_controller::trail::Trail;

const FAILED_AFTER: Duration = Duration::from_millis(1500);
const CHECK: Duration = Duration::from_millis(100);

fn start(dir: &Path, hook: &Path) -> (Controller, RunningServer) {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.join("store.redb")).unwrap());
    let trail = Arc::new(Trail::open(&dir.join("audit")).unwrap());
    let ctl = Controller::new(store).with_trail(trail);
    let mut opts = ServeOptions::plain("127.0.0.1:0".parse().unwrap());
    opts.health = HealthConfig {
        failed_after: FAILED_AFTER,
        check_interval: CHECK,
        evacuate_command: Some(hook.to_path_buf()),
        hook_timeout: Duration::from_secs(10),
        ..HealthConfig::default()
    };
    let srv = server::spawn(ctl.clone(), opts).unwrap();
    (ctl, srv)
}

fn report(host: &str) -> HealthReport {
    HealthReport {
        host: host.into(),
        interval_ms: 200,
        status: "ok".into(),
        enforcing: true,
        workers: 2,
        workers_alive: 2,
        ..Default::default()
    }
}

/// Reports hv1's health every 200 ms while `on` is set.
fn reporter(url: String, token: String, on: Arc<AtomicBool>, quit: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let client = Client::new(&url, ClientAuth::Token(token)).unwrap();
        while !quit.load(Ordering::Relaxed) {
            if on.load(Ordering::Relaxed) {
                client.push_health("hv1", &report("hv1")).unwrap();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}

fn state(client: &Client, host: &str) -> Option<HostHealth> {
    client.hosts().unwrap().into_iter().find(|h| h.name == host)?.health
}

fn wait_for(client: &Client, want: HealthState, within: Duration) -> Duration {
    let t = Instant::now();
    while t.elapsed() < within {
        if state(client, "hv1").is_some_and(|h| h.state == want) {
            return t.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("hv1 not {want:?} within {within:?}: {:?}", state(client, "hv1"));
}

fn calls(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn wait_calls(out: &Path, n: usize) {
    let t = Instant::now();
    while calls(out).len() < n {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "hook not called {n} times: {:?}",
            calls(out)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_silent_agent_fails_within_the_bound_and_is_evacuated_once_per_failure() {
    let dir = TempDir::new("health");
    let out = dir.0.join("hook.out");
    let hook = dir.0.join("hook.sh");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\nprintf '%s|%s\\n' \"$*\" \"$(cat)\" >> {}\n", out.display()),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let (ctl, srv) = start(&dir.0, &hook);
    let admin = ctl.create_token("local", "alice", Role::Admin).unwrap();
    let client = Client::new(&srv.url(), ClientAuth::Token(admin.clone())).unwrap();
    client.apply(&files(POLICY_V1), "v1", false).unwrap();

    let (on, quit) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicBool::new(false)));
    let rep = reporter(srv.url(), admin.clone(), on.clone(), quit.clone());
    wait_for(&client, HealthState::Healthy, Duration::from_secs(5));
    assert!(calls(&out).is_empty());

    // The agent goes silent: failed past the bound, not before.
    on.store(false, Ordering::Relaxed);
    let t = Instant::now();
    wait_for(&client, HealthState::Failed, Duration::from_secs(10));
    let took = t.elapsed();
    eprintln!("failed after {took:?} of silence (bound {FAILED_AFTER:?}, checked every {CHECK:?})");
    // Its last report came up to one interval (200 ms) before it went silent.
    assert!(took + Duration::from_millis(200) >= FAILED_AFTER, "{took:?}");
    assert!(took < FAILED_AFTER + 4 * CHECK + Duration::from_millis(500), "{took:?}");

    // The hook ran once, with hv1's VMs as arguments and as JSON on stdin.
    wait_calls(&out, 1);
    let c = calls(&out);
    let (args, stdin) = c[0].split_once('|').unwrap();
    assert_eq!(args, "hv1 web-1");
    let payload: serde_json::Value = serde_json::from_str(stdin).unwrap();
    assert_eq!(payload["host"], "hv1");
    assert_eq!(payload["vms"], serde_json::json!(["web-1"]));
    assert_eq!(payload["state"], "failed");
    let t = Instant::now();
    while state(&client, "hv1").and_then(|h| h.evacuation).map(|e| e.status) != Some(EvacuationStatus::Done) {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(20));
    }
    // Still failed a while later: not called again.
    std::thread::sleep(10 * CHECK);
    assert_eq!(calls(&out).len(), 1);

    // A controller restart does not call it again either.
    quit.store(true, Ordering::Relaxed);
    rep.join().unwrap();
    drop(client);
    srv.stop();
    drop(ctl);
    let (ctl, srv) = start(&dir.0, &hook);
    let client = Client::new(&srv.url(), ClientAuth::Token(admin.clone())).unwrap();
    std::thread::sleep(10 * CHECK);
    assert_eq!(state(&client, "hv1").unwrap().state, HealthState::Failed);
    assert_eq!(calls(&out).len(), 1, "called again after a restart");

    // Recovery, then a second failure: called again.
    let (on, quit) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicBool::new(false)));
    let rep = reporter(srv.url(), admin.clone(), on.clone(), quit.clone());
    wait_for(&client, HealthState::Healthy, Duration::from_secs(5));
    assert!(state(&client, "hv1").unwrap().evacuation.is_none());
    on.store(false, Ordering::Relaxed);
    wait_for(&client, HealthState::Failed, Duration::from_secs(10));
    wait_calls(&out, 2);
    std::thread::sleep(10 * CHECK);
    assert_eq!(calls(&out).len(), 2);
    quit.store(true, Ordering::Relaxed);
    rep.join().unwrap();

    // Every transition and evacuation is a change record, in the store and in the trail.
    let changes = client.changes().unwrap();
    let health: Vec<&str> = changes
        .iter()
        .filter(|c| c.action == "host.health" && c.resource == "host/hv1")
        .map(|c| c.diff.split(':').next().unwrap())
        .collect();
    assert_eq!(
        health,
        [
            "unknown -> healthy",
            "healthy -> failed",
            "failed -> healthy",
            "healthy -> failed"
        ]
    );
    let evacuations: Vec<&str> = changes
        .iter()
        .filter(|c| c.action == "host.evacuate")
        .map(|c| c.diff.as_str())
        .collect();
    assert_eq!(evacuations.len(), 2, "{evacuations:?}");
    assert!(
        evacuations
            .iter()
            .all(|d| d.contains("[web-1]") && d.contains("exit status: 0")),
        "{evacuations:?}"
    );
    let trail = ctl.flows(&palisade_api::FlowQuery {
        changes: true,
        ..Default::default()
    });
    let logged = trail
        .unwrap()
        .records
        .iter()
        .filter(|r| matches!(&r.record, palisade_audit::record::Record::Change(c) if c.action.starts_with("host.")))
        .count();
    assert_eq!(logged, 6);
    srv.stop();
}

#[test]
fn a_report_for_another_host_or_with_impossible_counts_is_refused() {
    let env = Env::start("health-refused");
    let client = Client::new(&env.url(), ClientAuth::Token(env.admin.clone())).unwrap();
    let err = client.push_health("hv2", &report("hv1")).unwrap_err();
    assert!(err.to_string().contains("not \"hv2\""), "{err}");
    let mut r = report("hv1");
    r.workers_alive = 3;
    assert!(client.push_health("hv1", &r).is_err());
    assert!(env.ctl.host_health().unwrap().is_empty(), "nothing stored");
    let reader = Client::new(&env.url(), ClientAuth::Token(env.reader.clone())).unwrap();
    assert!(
        reader.push_health("hv1", &report("hv1")).is_err(),
        "a read-only token is no agent"
    );
}

#[test]
fn a_controller_back_after_an_outage_does_not_fail_every_host_at_once() {
    let dir = TempDir::new("health-outage");
    let out = dir.0.join("hook.out");
    let hook = dir.0.join("hook.sh");
    std::fs::write(&hook, format!("#!/bin/sh\necho \"$*\" >> {}\n", out.display())).unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (ctl, srv) = start(&dir.0, &hook);
    let admin = ctl.create_token("local", "alice", Role::Admin).unwrap();
    let client = Client::new(&srv.url(), ClientAuth::Token(admin.clone())).unwrap();
    client.apply(&files(POLICY_V1), "v1", false).unwrap();
    client.push_health("hv1", &report("hv1")).unwrap();
    wait_for(&client, HealthState::Healthy, Duration::from_secs(5));
    // The controller is down for longer than the bound.
    drop(client);
    srv.stop();
    drop(ctl);
    std::thread::sleep(FAILED_AFTER + Duration::from_millis(500));
    let (_ctl, srv) = start(&dir.0, &hook);
    let client = Client::new(&srv.url(), ClientAuth::Token(admin)).unwrap();
    // The agent gets the whole bound to reach it again ...
    std::thread::sleep(FAILED_AFTER / 2);
    assert_eq!(state(&client, "hv1").unwrap().state, HealthState::Healthy);
    client.push_health("hv1", &report("hv1")).unwrap();
    std::thread::sleep(FAILED_AFTER * 3 / 4);
    assert_eq!(state(&client, "hv1").unwrap().state, HealthState::Healthy);
    assert!(calls(&out).is_empty());
    // ... and one that does not is failed as before.
    wait_for(&client, HealthState::Failed, Duration::from_secs(10));
    wait_calls(&out, 1);
    srv.stop();
}

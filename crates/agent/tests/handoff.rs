//! Connection state handed over a restart, through the agent's own entry
//! points: saved by `Agent::shutdown` one file per worker, and on
//! `Agent::start` each connection imported into the worker its flows are
//! steered to, whatever the number of workers before and after. An agent
//! with no ports needs no privileges (its underlay socket is plain UDP).

mod support;
use support::free_udp_port;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use palisade_agent::{Agent, AgentConfig, http};
use palisade_datapath::{Results, state};
use palisade_io::steer;
use palisade_wire::flow::FlowKey;

/// A port nothing listens on now.
fn config(dir: &Path, workers: usize) -> AgentConfig {
    let text = format!(
        "host = \"hv1\"\npolicy = \"{}\"\nstate_dir = \"{}\"\nworkers = {workers}\n\
         [underlay]\nlocal = \"127.0.0.1\"\nport = {}\n",
        dir.join("policy").display(),
        dir.join("state").display(),
        free_udp_port()
    );
    AgentConfig::parse(&text, Path::new("hv1.toml")).unwrap()
}

fn keys(blob: &[u8]) -> Vec<FlowKey> {
    state::decode(blob).unwrap().conns.into_iter().map(|c| c.key).collect()
}

#[test]
fn saved_connections_go_to_the_worker_their_flows_are_steered_to() {
    let tmp = tempfile::tempdir().unwrap();
    let vms = 8;
    std::fs::create_dir_all(tmp.path().join("policy")).unwrap();
    std::fs::write(tmp.path().join("policy/policy.yaml"), support::policy(vms)).unwrap();
    let conntrack = tmp.path().join("state/conntrack");
    std::fs::create_dir_all(&conntrack).unwrap();

    // An earlier run's two workers, with the connections split between them
    // regardless of steering (as after a change in the number of workers):
    // every web-tier VM to every db-tier VM, three source ports each.
    let c = support::compiler(vms);
    let mut before = [support::engine(&c), support::engine(&c)];
    let mut events = Vec::new();
    let mut n = 0u64;
    for from in (0..vms).step_by(2) {
        for to in (1..vms).step_by(2) {
            for sport in [40000, 40001, 40002] {
                let w = &mut before[(n % 2) as usize];
                let _ = w.engine.process(
                    n,
                    w.ports[from],
                    &support::syn(from, to, sport, 5432),
                    &mut events,
                    &mut Results::new(),
                );
                n += 1;
            }
        }
    }
    let saved: Vec<Vec<u8>> = before.iter().map(|w| w.engine.export_all(n)).collect();
    let all: BTreeSet<FlowKey> = saved.iter().flat_map(|b| keys(b)).collect();
    assert_eq!(all.len(), 48, "4 × 4 pairs × 3 ports");
    // The first as a single-threaded agent named its file, the second as a worker.
    std::fs::write(conntrack.join("host.state"), &saved[0]).unwrap();
    std::fs::write(conntrack.join("host-1.state"), &saved[1]).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let agent = Agent::start(config(tmp.path(), 3), stop.clone()).unwrap();
    // Three workers where the kernel keeps fanout groups from seeing their own frames (Linux 6.2), else one.
    let workers = agent.workers();
    assert_eq!(workers, if steer::fanout_ignores_outgoing() { 3 } else { 1 });
    assert_eq!((agent.ports(), agent.policy_version()), (0, support::VERSION));
    // Imported files are used up.
    assert!(!conntrack.join("host.state").exists() && !conntrack.join("host-1.state").exists());

    // The agent's own endpoint sees every connection.
    let sock = tmp.path().join("state/agent.sock");
    let health: serde_json::Value = serde_json::from_str(&http::get_unix(&sock, "/health").unwrap()).unwrap();
    assert_eq!(health["connections"], 48, "{health}");
    assert_eq!(health["workers"], workers, "{health}");
    assert_eq!(health["status"], "ok", "{health}");
    let metrics = http::get_unix(&sock, "/metrics").unwrap();
    assert!(metrics.contains("palisade_connections{host=\"hv1\"} 48\n"), "{metrics}");

    // Saved again, one file per worker, each holding exactly the connections steered to it.
    assert_eq!(agent.shutdown().unwrap(), 48);
    stop.store(true, Ordering::Relaxed);
    let mut again = BTreeSet::new();
    let mut used = 0;
    for i in 0..workers {
        let blob = std::fs::read(conntrack.join(format!("host-{i}.state"))).unwrap();
        for k in keys(&blob) {
            assert_eq!(
                steer::addresses_worker(k.src_addr(), k.dst_addr(), workers as u32),
                i as u32,
                "{k:?} saved by worker {i}"
            );
            assert!(again.insert(k), "{k:?} in two workers");
        }
        used += usize::from(!keys(&blob).is_empty());
    }
    assert_eq!(again, all, "no connection lost or made up");
    assert!(workers == 1 || used > 1, "the pairs spread over the workers");
    assert!(!conntrack.join(format!("host-{workers}.state")).exists());
}

#[test]
fn a_restart_with_fewer_workers_keeps_every_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let vms = 6;
    std::fs::create_dir_all(tmp.path().join("policy")).unwrap();
    std::fs::write(tmp.path().join("policy/policy.yaml"), support::policy(vms)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));

    // A first run saves what it imported from an engine's export; the second, with one worker, takes it all.
    let c = support::compiler(vms);
    let mut w = support::engine(&c);
    let mut events = Vec::new();
    for (i, (from, to)) in [(0, 1), (2, 3), (4, 5), (0, 3), (2, 5)].into_iter().enumerate() {
        let _ = w.engine.process(
            i as u64,
            w.ports[from],
            &support::syn(from, to, 40000, 5432),
            &mut events,
            &mut Results::new(),
        );
    }
    let conntrack = tmp.path().join("state/conntrack");
    std::fs::create_dir_all(&conntrack).unwrap();
    std::fs::write(conntrack.join("host-0.state"), w.engine.export_all(10)).unwrap();
    let first = Agent::start(config(tmp.path(), 2), stop.clone()).unwrap();
    assert_eq!(first.shutdown().unwrap(), 5);
    let second = Agent::start(config(tmp.path(), 1), stop.clone()).unwrap();
    assert_eq!(second.workers(), 1);
    assert_eq!(second.shutdown().unwrap(), 5);
    stop.store(true, Ordering::Relaxed);
    let blob = std::fs::read(conntrack.join("host-0.state")).unwrap();
    assert_eq!(keys(&blob).len(), 5);
    assert!(
        !conntrack.join("host-1.state").exists(),
        "a stale file of the earlier run is gone"
    );
}

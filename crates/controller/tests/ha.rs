//! Several controllers on one etcd: any serves the API and the agents, and an
//! agent whose controller stops moves to another and still sees the next change.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use palisade_api::client::{Client, ClientAuth};
use palisade_api::roles::Role;
use palisade_controller::core::Controller;
use palisade_controller::server::{self, RunningServer, ServeOptions};
use palisade_controller::store::{EtcdStore, Store};

fn controller(etcd: &TestEtcd) -> (Controller, RunningServer) {
    controller_polling(etcd, ServeOptions::plain("127.0.0.1:0".parse().unwrap()).poll_interval)
}

fn controller_polling(etcd: &TestEtcd, poll_interval: Duration) -> (Controller, RunningServer) {
    let store: Arc<dyn Store> = Arc::new(EtcdStore::new(vec![etcd.url.clone()], "/palisade/"));
    let ctl = Controller::new(store);
    let mut opts = ServeOptions::plain("127.0.0.1:0".parse().unwrap());
    opts.poll_interval = poll_interval;
    let srv = server::spawn(ctl.clone(), opts).unwrap();
    (ctl, srv)
}

#[test]
fn a_change_through_one_controller_wakes_the_agents_of_another() {
    // Polling once an hour: only etcd's watch can bring controller 1 the
    // change made through controller 0 within the agent's one wait.
    let Some(etcd) = TestEtcd::or_skip("watch", 23_803) else {
        return;
    };
    let hour = Duration::from_secs(3600);
    let (ctl0, srv0) = controller_polling(&etcd, hour);
    let (_ctl1, srv1) = controller_polling(&etcd, hour);
    let token = ctl0.create_token("local", "ops", Role::Admin).unwrap();
    let api = |s: &RunningServer| Client::new(&s.url(), ClientAuth::Token(token.clone())).unwrap();
    api(&srv0).apply(&files(POLICY_V1), "v1", false).unwrap();
    let agent = api(&srv1);
    agent.register("hv1", "t").unwrap();
    // Controller 1 had read the pointer before the apply: what it serves now
    // came through the watch.
    let held = agent
        .watch_policy("hv1", 0, Duration::from_secs(20))
        .unwrap()
        .expect("the first version reaches controller 1's agent");
    for change in 0..3 {
        let waiter = {
            let (url, token) = (srv1.url(), token.clone());
            let after = held.revision + change;
            std::thread::spawn(move || {
                let c = Client::new(&url, ClientAuth::Token(token)).unwrap();
                c.watch_policy("hv1", after, Duration::from_secs(20)).unwrap()
            })
        };
        // Let the long-poll park on controller 1 before the change.
        std::thread::sleep(Duration::from_millis(300));
        let req = palisade_api::TagRequest {
            set: [("round".to_string(), change.to_string())].into(),
            remove: vec![],
        };
        let rev = api(&srv0).tag("db-1", &req).unwrap().revision;
        let got = waiter
            .join()
            .unwrap()
            .expect("the tag reaches the agent within its wait");
        assert_eq!(got.revision, rev, "change {change}");
    }
    drop((srv0, srv1));
}

#[test]
fn three_controllers_one_etcd_failover() {
    let Some(etcd) = TestEtcd::or_skip("ha", 23_795) else {
        return;
    };
    let mut servers: Vec<Option<RunningServer>> = Vec::new();
    let mut ctls = Vec::new();
    for _ in 0..3 {
        let (c, s) = controller(&etcd);
        ctls.push(c);
        servers.push(Some(s));
    }
    let urls: Vec<String> = servers.iter().map(|s| s.as_ref().unwrap().url()).collect();
    // A token made through one controller works on all (it lives in etcd).
    let token = ctls[0].create_token("local", "ops", Role::Admin).unwrap();
    let api = |i: usize| Client::new(&urls[i], ClientAuth::Token(token.clone())).unwrap();
    assert_eq!(api(1).apply(&files(POLICY_V1), "via 1", false).unwrap().version, 1);
    assert_eq!(api(2).policy().unwrap().version, 1);

    // Concurrent applies through different controllers serialize into distinct versions.
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let (u, t) = (urls[i].clone(), token.clone());
            std::thread::spawn(move || {
                let c = Client::new(&u, ClientAuth::Token(t)).unwrap();
                c.apply(&files(POLICY_V2), &format!("race {i}"), false).unwrap().version
            })
        })
        .collect();
    let mut got: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    got.sort();
    assert_eq!(got, [2, 3, 4]);
    assert_eq!(api(0).versions().unwrap().len(), 4);

    // Six agents, each preferring a different controller first.
    let hosts: Vec<String> = (0..6).map(|i| format!("hv{i}")).collect();
    let agents: Vec<Client> = (0..6)
        .map(|i| {
            let order: Vec<String> = (0..3).map(|k| urls[(i + k) % 3].clone()).collect();
            Client::with_failover(order, ClientAuth::Token(token.clone())).unwrap()
        })
        .collect();
    let mut revs = Vec::new();
    for (a, h) in agents.iter().zip(&hosts) {
        a.register(h, "t").unwrap();
        revs.push(a.watch_policy(h, 0, Duration::from_secs(2)).unwrap().unwrap().revision);
    }
    assert!(revs.iter().all(|&r| r == 4), "{revs:?}");
    assert_eq!(api(2).agents().unwrap().len(), 6);

    // Every agent long-polls; controller 0 goes away while they wait.
    let waiters: Vec<_> = agents
        .into_iter()
        .zip(hosts.clone())
        .map(|(a, h)| {
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(30);
                while Instant::now() < deadline {
                    // A dropped connection is a transport error: the next call fails over.
                    if let Ok(Some(b)) = a.watch_policy(&h, 4, Duration::from_secs(10)) {
                        return Some((b.revision, a.current_url().to_string()));
                    }
                }
                None
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    servers[0].take().unwrap().stop();
    std::thread::sleep(Duration::from_millis(300));
    // The next change, made through controller 2, reaches every agent.
    let req = palisade_api::TagRequest {
        set: [("env".to_string(), "prod".to_string())].into(),
        remove: vec![],
    };
    assert_eq!(api(2).tag("db-1", &req).unwrap().revision, 5);
    for (i, w) in waiters.into_iter().enumerate() {
        let (rev, url) = w
            .join()
            .unwrap()
            .unwrap_or_else(|| panic!("agent {i} never saw revision 5"));
        assert_eq!(rev, 5, "agent {i}");
        assert_ne!(url, urls[0], "agent {i} must have left the stopped controller");
    }
    drop(servers);
}

/// The controller on a three-member etcd cluster survives the loss of one
/// member: the leader is killed (SIGKILL), the two left elect another, and
/// writes (a tag, an apply) and reads (the policy, an agent's watch)
/// through the controller succeed again within a bound: the time etcd
/// takes to elect a new leader (about a second with its defaults) and the
/// controller to move past the dead member. Every later request succeeds.
#[test]
fn the_controller_survives_the_loss_of_one_of_three_etcd_members() {
    let Some(mut etcd) = TestEtcdCluster::or_skip("quorum", 23_840) else {
        return;
    };
    // The leader is also the first endpoint: the controller's first try goes to the dead member.
    let leader = etcd.leader().expect("a leader");
    let mut endpoints = etcd.urls.clone();
    endpoints.rotate_left(leader);
    let store: Arc<dyn Store> = Arc::new(EtcdStore::new(endpoints, "/palisade/"));
    let ctl = Controller::new(store);
    let srv = server::spawn(ctl.clone(), ServeOptions::plain("127.0.0.1:0".parse().unwrap())).unwrap();
    let token = ctl.create_token("local", "ops", Role::Admin).unwrap();
    let api = Client::new(&srv.url(), ClientAuth::Token(token.clone())).unwrap();
    assert_eq!(api.apply(&files(POLICY_V1), "v1", false).unwrap().version, 1);
    api.register("hv1", "t").unwrap();
    let tag = |round: usize| palisade_api::TagRequest {
        set: [("round".to_string(), round.to_string())].into(),
        remove: vec![],
    };
    let before = api.tag("db-1", &tag(0)).unwrap().revision;

    etcd.kill(leader);
    let killed = Instant::now();
    // The first write that succeeds after the kill, retried as a client would.
    const BOUND: Duration = Duration::from_secs(10);
    let mut failures = Vec::new();
    let rev = loop {
        match api.tag("db-1", &tag(1)) {
            Ok(r) => break r.revision,
            Err(e) => failures.push(e.to_string()),
        }
        assert!(
            killed.elapsed() < BOUND,
            "no write succeeded within {BOUND:?} of losing the leader: {failures:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = killed.elapsed();
    eprintln!(
        "first write {took:?} after the leader (member {leader}) was killed; {} failed before it: {failures:?}",
        failures.len()
    );
    assert!(rev > before);
    // From then on, every request succeeds: writes, reads, an agent's watch.
    for round in 2..12 {
        let r = api.tag("db-1", &tag(round)).unwrap().revision;
        let seen = api
            .watch_policy("hv1", r - 1, Duration::from_secs(5))
            .unwrap()
            .expect("the agent sees the change");
        assert_eq!(seen.revision, r);
    }
    assert_eq!(
        api.apply(&files(POLICY_V2), "v2 with a member down", false)
            .unwrap()
            .version,
        2
    );
    assert_eq!(api.policy().unwrap().version, 2);
    assert_eq!(api.versions().unwrap().len(), 2);
    let new_leader = etcd.leader().expect("the two left elected a leader");
    assert_ne!(new_leader, leader);
    drop(srv);
}

//! How long a change takes to reach every agent: simulated agents long-poll
//! their host's policy from an in-process controller (plain HTTP on
//! loopback); one VM is tagged (or, with `PROP_CHANGE=version`, a new
//! version adds one VM); the time until each agent has received and decoded
//! the new bundle is recorded. Prints one JSON line with p50, p99 and the
//! maximum of that time (`to_all_agents_ms`), and of how long each agent
//! then took to resolve the bundle against the files it holds (`resolve_ms`:
//! a 10 MB copy, and for a new version the edits applied and the result's
//! digest checked, at 50,000 VMs; done by all agents at once on this
//! machine's cores after every agent has the change, since real agents do it
//! on their own hosts).
//!
//! `PROP_AGENTS` (default 100) agents, one per host, `PROP_ETCD=URL` to run
//! on etcd instead of the embedded store (`PROP_CONTROLLERS=N` to run N
//! controllers on it), and `PROP_VMS` (default 5,000) VMs spread over them.
//! #7's goal is 1,000 agents and 50,000 VMs with p99 under 1 s. Agents name
//! the version whose files they hold, so a tag change reaches them as the
//! revision and the overlay alone, and a new version as edits of the held
//! files: both sizes are printed (`bundle_bytes`, the whole bundle an agent
//! fetches when it starts, and `change_bytes`, what the change cost each
//! agent). Agents here stop at receiving and resolving the bundle; a real
//! agent then compiles its chains: that is timed once, for one agent, after
//! the others are done (`agent_resolve_ms`, its resolve again, alone;
//! `agent_install_ms`, compiling from the policy compiled for the held
//! bundle and with the loader that loaded it, as the agent does;
//! `agent_whole_compile_ms`, from scratch; `agent_kept_copy_ms`, the copy
//! the agent then keeps to recompile from). `installed_p99_ms` adds the
//! first two to the 99th percentile's arrival: when the change is
//! installed on 99% of agents, were each on its own host.

use std::fmt::Write as _;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use palisade_api::client::{Client, ClientAuth};
use palisade_api::roles::Role;
use palisade_api::{Files, TagRequest};
use palisade_controller::core::Controller;
use palisade_controller::server::{self, ServeOptions};
use palisade_controller::store::{EmbeddedStore, EtcdStore, Store};
use palisade_policy::load::Loader;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The `p` quantile of `sorted` (nearest rank).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize)
        .saturating_sub(1)
        .min(sorted.len() - 1)]
}

fn datacenter(agents: usize, vms: usize) -> Files {
    let mut inv = String::from("datacenter: { name: dc, default: deny }\nclusters:\n  - name: c\n    hosts: [");
    for h in 0..agents {
        let _ = write!(inv, "{}hv{h}", if h > 0 { ", " } else { "" });
    }
    inv.push_str("]\nzones: [{ name: z, vlan: 10 }]\nvms:\n");
    for i in 0..vms {
        let (a, b, c) = ((i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff);
        let _ = writeln!(
            inv,
            "  - {{ name: vm{i}, uuid: 00000000-0000-4000-8000-{i:012x}, cluster: c, host: hv{}, tags: {{ tier: web }}, \
             vnics: [{{ name: vm{i}.0, mac: \"02:00:00:{a:02x}:{b:02x}:{c:02x}\", ips: [10.{a}.{b}.{c}], zone: z }}] }}",
            i % agents.max(1)
        );
    }
    let policy = "version: 1\ngroups: { web: { tags: { tier: web } }, quarantined: { tags: { quarantine: \"true\" } } }\n\
                  rules:\n  datacenter:\n    - { id: q-in, from: any, to: quarantined, action: deny }\n    \
                  - { id: web-http, from: web, to: web, service: tcp/80, action: allow }\n";
    [
        ("inventory.yaml".to_string(), inv),
        ("policy.yaml".to_string(), policy.to_string()),
    ]
    .into()
}

fn main() {
    let agents = env("PROP_AGENTS", 100);
    let vms = env("PROP_VMS", 5000);
    let dir = std::env::temp_dir().join(format!("palisade-prop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    // `PROP_ETCD=URL`: on etcd (a fresh key prefix) instead of the embedded
    // store, and `PROP_CONTROLLERS=N` controllers on it, agents spread over
    // them; the change is made through the first, so the others learn of it
    // from etcd's watch, as `palisade controller --etcd` does.
    let controllers = env("PROP_CONTROLLERS", 1).max(1);
    // `PROP_CHANGE=version`: the change is a new version (one VM added)
    // instead of a tag.
    let new_version = match std::env::var("PROP_CHANGE").as_deref() {
        Ok("version") => true,
        Ok("tag") | Err(_) => false,
        Ok(other) => panic!("PROP_CHANGE is tag or version, not {other:?}"),
    };
    let etcd = std::env::var("PROP_ETCD").ok();
    assert!(
        controllers == 1 || etcd.is_some(),
        "PROP_CONTROLLERS > 1 needs PROP_ETCD: controllers share a store only on etcd"
    );
    let prefix = format!("/palisade-prop-{}/", std::process::id());
    let embedded: Option<Arc<dyn Store>> = match &etcd {
        Some(_) => None,
        None => Some(Arc::new(EmbeddedStore::open(&dir.join("store.redb")).expect("store"))),
    };
    let open_store = || -> Arc<dyn Store> {
        match (&etcd, &embedded) {
            (Some(url), _) => {
                let s = EtcdStore::new(vec![url.clone()], &prefix);
                s.ping().unwrap_or_else(|e| panic!("etcd at {url}: {e}"));
                Arc::new(s)
            }
            (None, Some(s)) => s.clone(),
            (None, None) => unreachable!("one of the two stores is made above"),
        }
    };
    let token = Controller::new(open_store())
        .create_token("bench", "bench", Role::Admin)
        .expect("token");
    let servers: Vec<_> = (0..controllers)
        .map(|_| {
            let mut opts = ServeOptions::plain("127.0.0.1:0".parse().expect("addr"));
            if etcd.is_some() {
                opts.poll_interval = Duration::from_millis(250);
            }
            server::spawn(Controller::new(open_store()), opts).expect("server")
        })
        .collect();
    let store_name = if etcd.is_some() { "etcd" } else { "embedded" };
    let urls: Vec<String> = servers.iter().map(|s| s.url()).collect();
    let url = urls[0].clone();
    let admin = Client::new(&url, ClientAuth::Token(token.clone())).expect("client");
    let files = datacenter(agents, vms);
    let t = Instant::now();
    admin.apply(&files, "bench", false).expect("apply");
    let apply_ms = t.elapsed().as_secs_f64() * 1e3;
    eprintln!("applied {vms} VMs on {agents} hosts in {apply_ms:.0} ms");

    let full = Arc::new(
        admin
            .watch_policy("hv0", 0, Duration::from_secs(30))
            .expect("watch")
            .expect("a policy"),
    );
    let bundle_bytes = serde_json::to_vec(&*full).map_or(0, |v| v.len());

    // Every agent fetches the current policy, then waits for the next one.
    // Each checks that it got the whole bundle and then holds one shared
    // copy: a thousand private copies (10 GB at 50,000 VMs) would put this
    // machine under memory pressure that real agents, each on its own host,
    // do not share.
    let ready = Arc::new(Barrier::new(agents + 1));
    let arrived = Arc::new(Barrier::new(agents));
    let threads: Vec<_> = (0..agents)
        .map(|h| {
            let url = urls[h % controllers].clone();
            let (token, ready, arrived, full) = (token.clone(), ready.clone(), arrived.clone(), full.clone());
            std::thread::spawn(move || {
                let c = Client::new(&url, ClientAuth::Token(token)).expect("client");
                let host = format!("hv{h}");
                // A thousand agents connecting at once overflow the listen
                // backlog: retry, as the agent does.
                let mut last_error = String::from("none");
                let first = (0..20)
                    .find_map(|_| match c.watch_policy(&host, 0, Duration::from_secs(30)) {
                        Ok(b) => b,
                        Err(e) => {
                            last_error = e.to_string();
                            std::thread::sleep(Duration::from_millis(500));
                            None
                        }
                    })
                    .unwrap_or_else(|| panic!("{host} got no first policy; last error: {last_error}"));
                assert_eq!(first, *full, "{host} got a different bundle");
                drop(first);
                let first = full;
                ready.wait();
                // As the agent does: name the version whose files they hold,
                // so a tag change arrives as the overlay alone. The request
                // is parked at the server before the change is made.
                let next = c
                    .watch_policy_having(&host, first.revision, Some(first.version), Duration::from_secs(120))
                    .expect("watch")
                    .expect("a new revision");
                let got = Instant::now();
                let raw = (h == 0).then(|| next.clone());
                // Resolving copies the held files: each real agent does that
                // on its own host, so here it waits until every agent has the
                // change, instead of taking the cores that answer the others.
                arrived.wait();
                let next = next.resolve(&first).expect("resolves against the held bundle");
                assert!(next.revision > first.revision, "hv{h} got no new revision");
                let resolved = got.elapsed();
                (got, resolved, raw.map(|raw| (raw, next)))
            })
        })
        .collect();
    ready.wait();
    eprintln!(
        "{agents} agents hold the first policy ({:.1} s after the apply)",
        t.elapsed().as_secs_f64()
    );
    // What agent 0 holds compiled, for timing its install at the end.
    // Its loader too: a new version then parses only the VMs it changed.
    let mut loader = Loader::new();
    let mut held_compiled = Some(full.compile_with(&mut loader).expect("the policy compiles"));
    // Every agent's long-poll is parked before the change: the time measured
    // is the change's, not a thousand requests arriving with it.
    let parked = Instant::now();
    let open = || servers.iter().map(|s| s.open_policy_requests()).sum::<usize>();
    while open() < agents {
        assert!(
            parked.elapsed() < Duration::from_secs(60),
            "only {} of {agents} long-polls reached the controllers",
            open()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Each request subscribes before its one store read: let those finish.
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    if new_version {
        // One VM more, on the first host: a new inventory line.
        let mut grown = files.clone();
        let vm = "  - { name: extra, uuid: 00000000-0000-4000-8000-ffffffffffff, cluster: c, host: hv0, tags: { tier: web }, \
                  vnics: [{ name: extra.0, mac: \"02:ff:00:00:00:01\", ips: [10.255.0.1], zone: z }] }\n";
        grown.get_mut("inventory.yaml").expect("inventory").push_str(vm);
        admin.apply(&grown, "bench: one VM more", false).expect("apply");
    } else {
        let req = TagRequest {
            set: [("quarantine".to_string(), "true".to_string())].into(),
            remove: Vec::new(),
        };
        admin.tag("vm0", &req).expect("tag");
    }
    let change_ms = t0.elapsed().as_secs_f64() * 1e3;
    let delta_bytes = admin
        .watch_policy_having("hv0", full.revision, Some(full.version), Duration::from_secs(30))
        .ok()
        .flatten()
        .map_or(0, |b| serde_json::to_vec(&b).map_or(0, |v| v.len()));
    let mut stamps = Vec::new();
    let mut sample = None;
    for t in threads {
        let (got, resolved, next) = t.join().expect("agent thread");
        stamps.push((got, resolved));
        sample = sample.or(next);
    }
    // One agent's install, uncontended: compiling the new revision from the
    // policy compiled for the bundle held, as the agent does (only what a
    // retagged VM affects), and for comparison from scratch.
    let (raw, sample) = sample.expect("agent 0's bundle");
    // Agent 0's resolve again, alone, as on its own host.
    let t = Instant::now();
    let again = raw.resolve(&full).expect("resolves against the held bundle");
    let resolve_alone_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(again, sample, "resolving twice gives one bundle");
    let t = Instant::now();
    let installed = sample
        .compile_from(&full, &mut held_compiled, &mut loader)
        .expect("compiles");
    let install_ms = t.elapsed().as_secs_f64() * 1e3;
    // The copy the agent keeps to recompile the next revision from (made
    // after the install is sent, off the change's path).
    let t = Instant::now();
    let kept = installed.clone();
    let copy_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(kept);
    let t = Instant::now();
    let whole = sample.compile().expect("compiles");
    let whole_compile_ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(installed.chains().eq(whole.chains()), "the incremental install differs");
    let since = |at: Instant| at.duration_since(t0).as_secs_f64() * 1e3;
    let summary = |mut ms: Vec<f64>| {
        ms.sort_by(f64::total_cmp);
        format!(
            "{{\"p50\":{:.1},\"p99\":{:.1},\"max\":{:.1}}}",
            percentile(&ms, 0.50),
            percentile(&ms, 0.99),
            ms[ms.len() - 1]
        )
    };
    let arrival: Vec<f64> = stamps.iter().map(|s| since(s.0)).collect();
    let mut sorted = arrival.clone();
    sorted.sort_by(f64::total_cmp);
    let p99 = percentile(&sorted, 0.99);
    // Were each agent on its own host: the 99th percentile's arrival, then
    // one agent's resolve and install, each measured alone.
    let installed_p99 = p99 + resolve_alone_ms + install_ms;
    let arrived = summary(arrival);
    let resolve = summary(stamps.iter().map(|s| s.1.as_secs_f64() * 1e3).collect());
    println!(
        "{{\"store\":\"{store_name}\",\"controllers\":{controllers},\"agents\":{agents},\"vms\":{vms},\"bundle_bytes\":{bundle_bytes},\"change\":\"{}\",\"change_bytes\":{delta_bytes},\"apply_ms\":{apply_ms:.1},\"change_ms\":{change_ms:.1},\
         \"to_all_agents_ms\":{arrived},\"resolve_ms\":{resolve},\
         \"agent_resolve_ms\":{resolve_alone_ms:.1},\"agent_install_ms\":{install_ms:.1},\"installed_p99_ms\":{installed_p99:.1},\"agent_whole_compile_ms\":{whole_compile_ms:.1},\"agent_kept_copy_ms\":{copy_ms:.1}}}",
        if new_version { "version" } else { "tag" }
    );
    for srv in servers {
        srv.stop();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

//! How long a change takes to reach every agent: simulated agents long-poll
//! their host's policy from an in-process controller (plain
//! HTTP on loopback); one VM is tagged; the time until each agent has received
//! and decoded the new bundle is recorded. Prints one JSON line with p50, p99
//! and the maximum.
//!
//! `PROP_AGENTS` (default 100) agents, one per host, `PROP_ETCD=URL` to run
//! on etcd instead of the embedded store, and `PROP_VMS` (default
//! 5,000) VMs spread over them. #7's goal is 1,000 agents and 50,000 VMs with
//! p99 under 1 s. Agents name the version whose files they hold, so a tag
//! change reaches them as the revision and the overlay alone: both sizes are
//! printed (`bundle_bytes`, what a new version costs each agent, and
//! `tag_delta_bytes`). Agents here stop at receiving and resolving the
//! bundle; a real agent then compiles its chains (`cargo bench -p
//! palisade-policy --bench compile`).

use std::fmt::Write as _;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use palisade_controller::api::{Files, TagRequest};
use palisade_controller::auth::Role;
use palisade_controller::client::{Client, ClientAuth};
use palisade_controller::core::Controller;
use palisade_controller::server::{self, ServeOptions};
use palisade_controller::store::{EmbeddedStore, EtcdStore, Store};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
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
    // `PROP_ETCD=URL`: on etcd (a fresh key prefix) instead of the embedded store.
    let store: Arc<dyn Store> = match std::env::var("PROP_ETCD") {
        Ok(url) => {
            let s = EtcdStore::new(vec![url.clone()], &format!("/palisade-prop-{}/", std::process::id()));
            s.ping().unwrap_or_else(|e| panic!("etcd at {url}: {e}"));
            Arc::new(s)
        }
        Err(_) => Arc::new(EmbeddedStore::open(&dir.join("store.redb")).expect("store")),
    };
    let store_name = if std::env::var_os("PROP_ETCD").is_some() {
        "etcd"
    } else {
        "embedded"
    };
    let ctl = Controller::new(store);
    let token = ctl.create_token("bench", "bench", Role::Admin).expect("token");
    let srv = server::spawn(ctl, ServeOptions::plain("127.0.0.1:0".parse().expect("addr"))).expect("server");
    let url = srv.url();
    let admin = Client::new(&url, ClientAuth::Token(token.clone())).expect("client");
    let files = datacenter(agents, vms);
    let t = Instant::now();
    admin.apply(&files, "bench", false).expect("apply");
    let apply_ms = t.elapsed().as_secs_f64() * 1e3;

    // Every agent fetches the current policy, then waits for the next one.
    let ready = Arc::new(Barrier::new(agents + 1));
    let go = Arc::new(Barrier::new(agents + 1));
    let threads: Vec<_> = (0..agents)
        .map(|h| {
            let (url, token, ready, go) = (url.clone(), token.clone(), ready.clone(), go.clone());
            std::thread::spawn(move || {
                let c = Client::new(&url, ClientAuth::Token(token)).expect("client");
                let host = format!("hv{h}");
                // A thousand agents connecting at once overflow the listen
                // backlog: retry, as the agent does.
                let first = (0..20)
                    .find_map(|_| match c.watch_policy(&host, 0, Duration::from_secs(30)) {
                        Ok(b) => b,
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(500));
                            None
                        }
                    })
                    .expect("a first policy");
                ready.wait();
                go.wait();
                // As the agent does: name the version whose files it holds,
                // so a tag change arrives as the overlay alone.
                let next = c
                    .watch_policy_having(&host, first.revision, Some(first.version), Duration::from_secs(60))
                    .expect("watch")
                    .expect("a new revision");
                let next = next.resolve(&first).expect("resolves against the held bundle");
                let got = Instant::now();
                assert!(next.revision > first.revision, "hv{h} got no new revision");
                got
            })
        })
        .collect();
    ready.wait();
    // Let every agent's long-poll reach the server before the change.
    std::thread::sleep(Duration::from_millis(500));
    let full = admin
        .watch_policy("hv0", 0, Duration::from_secs(30))
        .expect("watch")
        .expect("a policy");
    let bundle_bytes = serde_json::to_vec(&full).map_or(0, |v| v.len());
    go.wait();
    let t0 = Instant::now();
    let req = TagRequest {
        set: [("quarantine".to_string(), "true".to_string())].into(),
        remove: Vec::new(),
    };
    admin.tag("vm0", &req).expect("tag");
    let delta_bytes = admin
        .watch_policy_having("hv0", full.revision, Some(full.version), Duration::from_secs(30))
        .ok()
        .flatten()
        .map_or(0, |b| serde_json::to_vec(&b).map_or(0, |v| v.len()));
    let mut ms: Vec<f64> = threads
        .into_iter()
        .map(|t| t.join().expect("agent thread").duration_since(t0).as_secs_f64() * 1e3)
        .collect();
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        ms[((ms.len() as f64 * p).ceil() as usize)
            .saturating_sub(1)
            .min(ms.len() - 1)]
    };
    println!(
        "{{\"store\":\"{store_name}\",\"agents\":{agents},\"vms\":{vms},\"bundle_bytes\":{bundle_bytes},\"tag_delta_bytes\":{delta_bytes},\"apply_ms\":{apply_ms:.1},\
         \"tag_to_all_agents_ms\":{{\"p50\":{:.1},\"p99\":{:.1},\"max\":{:.1}}}}}",
        pct(0.50),
        pct(0.99),
        ms[ms.len() - 1]
    );
    srv.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

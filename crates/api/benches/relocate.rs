//! What a live migration costs every agent: the location overlay moves one
//! VM to another host (a new effective revision, same version, same files),
//! and each agent brings its compiled policy to it
//! (`PolicyBundle::compile_from`, as the agent's upstream thread does)
//! instead of compiling the policy whole.
//!
//! A synthetic datacenter of `RELOC_VMS` VMs (default 5,000) on 100 hosts,
//! one vNIC each, two tiers and a rule between them (the propagation
//! bench's). Timed, `RELOC_ROUNDS` times (default 5) each: the location
//! change from the compiled policy held (`relocate_ms`), and for comparison
//! the same bundle compiled whole (`whole_compile_ms`, what every agent
//! paid for a migration before). Checks that both give the same policy.
//! Prints one JSON line with the minimum and median of each.
//!
//! `cargo bench -p palisade-api --bench relocate` (`RELOC_VMS=50000` for
//! the 50,000-VM datacenter of issue 7).

use std::fmt::Write as _;
use std::time::Instant;

use palisade_api::bundle::PolicyBundle;
use palisade_api::sources::{Files, TagOverlay};
use palisade_policy::load::Loader;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn datacenter(hosts: usize, vms: usize) -> Files {
    let mut inv = String::from("datacenter: { name: dc, default: deny }\nclusters:\n  - name: c\n    hosts: [");
    for h in 0..hosts {
        let _ = write!(inv, "{}hv{h}", if h > 0 { ", " } else { "" });
    }
    inv.push_str("]\nzones: [{ name: z, vlan: 10 }]\nvms:\n");
    for i in 0..vms {
        let (a, b, c) = ((i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff);
        let tier = if i % 2 == 0 { "web" } else { "db" };
        let _ = writeln!(
            inv,
            "  - {{ name: vm{i}, uuid: 00000000-0000-4000-8000-{i:012x}, cluster: c, host: hv{}, tags: {{ tier: {tier} }}, \
             vnics: [{{ name: vm{i}.0, mac: \"02:00:00:{a:02x}:{b:02x}:{c:02x}\", ips: [10.{a}.{b}.{c}], zone: z }}] }}",
            i % hosts
        );
    }
    let policy = "version: 1\ngroups: { web: { tags: { tier: web } }, db: { tags: { tier: db } } }\n\
                  rules:\n  datacenter:\n    - { id: web-db, from: web, to: db, service: tcp/5432, action: allow }\n";
    [
        ("inventory.yaml".to_string(), inv),
        ("policy.yaml".to_string(), policy.to_string()),
    ]
    .into()
}

fn stats(mut ms: Vec<f64>) -> String {
    ms.sort_by(f64::total_cmp);
    format!("{{\"min\":{:.2},\"p50\":{:.2}}}", ms[0], ms[ms.len() / 2])
}

fn main() {
    let vms = env("RELOC_VMS", 5000).max(2);
    let rounds = env("RELOC_ROUNDS", 5).max(1);
    let hosts = 100;
    let held = PolicyBundle {
        revision: 1,
        version: 1,
        files: datacenter(hosts, vms),
        tags: TagOverlay::new(),
        locations: Default::default(),
        same_files: false,
        delta: None,
    };
    let mut loader = Loader::new();
    let compiled = held.compile_with(&mut loader).expect("compiles");
    let mut relocate = Vec::new();
    let mut whole = Vec::new();
    for round in 0..rounds {
        // VM `round` migrates to the next host.
        let mut next = held.clone();
        next.revision = 2 + round as u64;
        next.locations
            .insert(format!("vm{round}"), format!("hv{}", (round + 1) % hosts));
        let mut kept = Some(compiled.clone());
        let t = Instant::now();
        let got = next.compile_from(&held, &mut kept, &mut loader).expect("compiles");
        relocate.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(kept.is_none(), "the held policy was brought along, not compiled whole");
        let t = Instant::now();
        let fresh = next.compile_with(&mut loader).expect("compiles");
        whole.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(got.model(), fresh.model(), "round {round}: the models differ");
        assert!(got.chains().eq(fresh.chains()), "round {round}: the chains differ");
    }
    println!(
        "{{\"vms\":{vms},\"hosts\":{hosts},\"rounds\":{rounds},\"relocate_ms\":{},\"whole_compile_ms\":{}}}",
        stats(relocate),
        stats(whole)
    );
}

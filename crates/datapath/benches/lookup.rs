//! Chain lookup cost: ns per `decide` for the linear walk (`PolicyLookup`) and
//! the classifier (`ClassifiedLookup`) over the same flows, on the three-tier
//! example (every vNIC × direction × managed/external addresses × services)
//! and on a synthetic chain of 1000 port rules, where the walk's length shows.
//!
//! Prints one JSON object. Run with `cargo bench -p palisade-datapath --bench lookup`.

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Instant;

use palisade_datapath::ClassifiedLookup;
use palisade_datapath::{ChainLookup, PolicyLookup};
use palisade_policy::compile::Compiler;
use palisade_policy::eval::{Direction, Flow};
use palisade_policy::{DirSource, MemorySource, load};

const THREE_TIER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/three-tier");

/// The queries: (vNIC, direction, flow).
fn queries(c: &Compiler, services: &[(u8, u16)]) -> Vec<(String, Direction, Flow)> {
    let mut ips: Vec<IpAddr> = c.model().inventory.vnics().flat_map(|(_, n)| n.ips.clone()).collect();
    for s in ["10.255.0.7", "8.8.8.8", "203.0.113.9"] {
        ips.push(s.parse().expect("literal address"));
    }
    let names: Vec<String> = c.model().inventory.vnics().map(|(_, n)| n.name.clone()).collect();
    let mut out = Vec::new();
    for name in &names {
        for dir in [Direction::Egress, Direction::Ingress] {
            for &src in &ips {
                for &dst in ips.iter().filter(|d| d.is_ipv4() == src.is_ipv4()) {
                    for &(proto, dport) in services {
                        let src_port = if proto == 1 { 8 } else { 40000 };
                        let flow = Flow {
                            src,
                            dst,
                            proto,
                            src_port,
                            dst_port: dport,
                        };
                        out.push((name.clone(), dir, flow));
                    }
                }
            }
        }
    }
    out
}

/// Best of five passes over `qs`, in ns per decide.
fn measure(lookup: &dyn ChainLookup, qs: &[(String, Direction, Flow)]) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let mut rounds = 0u64;
        while t.elapsed().as_millis() < 200 {
            for (name, dir, flow) in qs {
                black_box(lookup.decide(black_box(name), *dir, black_box(flow)));
            }
            rounds += 1;
        }
        let ns = t.elapsed().as_nanos() as f64 / (rounds as f64 * qs.len() as f64);
        best = best.min(ns);
    }
    best
}
/// Two VMs and `n` allow rules on distinct TCP ports 1000.., so a flow to a high port walks far.
fn synthetic(n: u16) -> Compiler {
    let mut p = String::from(
        r#"
datacenter: { name: dc1, default: deny }
zones: [{ name: web, vlan: 100 }]
vms:
  - { name: a, uuid: 00000000-0000-4000-8000-00000000000a, vnics: [{ name: a.0, mac: "02:00:00:00:00:0a", ips: [10.0.0.10], zone: web }] }
  - { name: b, uuid: 00000000-0000-4000-8000-00000000000b, vnics: [{ name: b.0, mac: "02:00:00:00:00:0b", ips: [10.0.0.11], zone: web }] }
groups: { web: { zone: web } }
rules:
  datacenter:
"#,
    );
    for k in 0..n {
        p.push_str(&format!(
            "    - {{ id: r{k}, from: web, to: web, service: tcp/{}, action: allow }}\n",
            1000 + k
        ));
    }
    let loaded = load(&MemorySource::new().with("p.yaml", p)).expect("policy loads");
    assert!(!loaded.has_errors(), "{}", loaded.render());
    Compiler::new(loaded.model).expect("policy compiles")
}

fn run(case: &str, compiler: Compiler, ports: &[(u8, u16)]) {
    let qs = queries(&compiler, ports);
    let linear = PolicyLookup::new(compiler.clone());
    let build = Instant::now();
    let fast = ClassifiedLookup::new(compiler);
    let build_ms = build.elapsed().as_secs_f64() * 1e3;
    for (name, dir, flow) in &qs {
        assert_eq!(fast.decide(name, *dir, flow), linear.decide(name, *dir, flow));
    }
    let linear_ns = measure(&linear, &qs);
    let fast_ns = measure(&fast, &qs);
    println!(
        "{{\"case\": \"{case}\", \"queries\": {}, \"classifier_rules\": {}, \"fallback_chains\": {}, \
         \"build_ms\": {build_ms:.2}, \"policy_lookup_ns_per_decide\": {linear_ns:.1}, \
         \"classified_lookup_ns_per_decide\": {fast_ns:.1}}}",
        qs.len(),
        fast.rule_count(),
        fast.fallback_chains()
    );
}

fn main() {
    let loaded = load(&DirSource::new(THREE_TIER)).expect("example loads");
    assert!(!loaded.has_errors(), "{}", loaded.render());
    let services = [
        (6u8, 22u16),
        (6, 443),
        (6, 5432),
        (6, 8080),
        (17, 53),
        (6, 9999),
        (1, 0),
    ];
    run(
        "three-tier",
        Compiler::new(loaded.model).expect("example compiles"),
        &services,
    );
    let spread: Vec<(u8, u16)> = (0..20)
        .map(|i| (6, 1000 + i * 53))
        .chain([(17, 53), (6, 9999)])
        .collect();
    run("synthetic-1000", synthetic(1000), &spread);
}

//! Compile benchmark: a synthetic datacenter of 10,000 VMs, 200 groups and
//! 20,000 rules; full compile, then incremental recompiles after re-tagging one
//! VM (moving it to another application), and peak memory.
//!
//! Prints one JSON line. Run with `cargo bench -p palisade-policy`.
//!
//! The datacenter: 20 clusters of 500 VMs, 100 zones of 100 VMs, one vNIC per
//! VM. Tags: `app` (100 applications), `tier` (10), `env` (3). Groups: 100 per
//! application, 10 per tier, 30 application×tier, 19 per cluster, 20 per zone,
//! 20 partner IP sets, `external`. Rules: 100 datacenter (tiers, partners,
//! external), 1,000 cluster, 6,000 zone and 12,900 VM rules, mostly between
//! application groups, as micro-segmentation policies are written.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use palisade_policy::compile::Compiler;
use palisade_policy::model::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const VMS: usize = 10_000;
const CLUSTERS: usize = 20;
const ZONES: usize = 100;
const APPS: usize = 100;
const TIERS: usize = 10;

fn span() -> Span {
    Span::default()
}

fn tags(app: usize, tier: usize, env: usize) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app".to_string(), format!("a{app}")),
        ("tier".to_string(), format!("t{tier}")),
        ("env".to_string(), ["prod", "dev", "test"][env].to_string()),
    ])
}

fn datacenter() -> Model {
    let mut r = Rng(0x5eed);
    let clusters = (0..CLUSTERS)
        .map(|c| Cluster {
            name: format!("c{c}"),
            hosts: vec![],
            span: span(),
        })
        .collect();
    let zones = (0..ZONES)
        .map(|z| Zone {
            name: format!("z{z}"),
            segment: Segment::Vlan(100 + z as u16),
            default: None,
            on_failure: OnFailure::Closed,
            span: span(),
        })
        .collect();
    let vms = (0..VMS)
        .map(|i| {
            let ip = IpAddr::V4(Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8));
            Vm {
                name: format!("vm{i}"),
                uuid: String::new(),
                cluster: Some(format!("c{}", i % CLUSTERS)),
                host: None,
                tags: tags(r.below(APPS), r.below(TIERS), r.below(3)),
                vnics: vec![Vnic {
                    name: format!("vm{i}.0"),
                    mac: String::new(),
                    ips: vec![ip],
                    zone: format!("z{}", (i / CLUSTERS) % ZONES),
                    span: span(),
                }],
                span: span(),
            }
        })
        .collect();
    let mut groups = Vec::new();
    let sel = |tags: &[(&str, String)]| {
        GroupDef::Selector(Selector {
            tags: tags.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            ..Selector::default()
        })
    };
    for a in 0..APPS {
        groups.push(Group {
            name: format!("app{a}"),
            def: sel(&[("app", format!("a{a}"))]),
            span: span(),
        });
    }
    for t in 0..TIERS {
        groups.push(Group {
            name: format!("tier{t}"),
            def: sel(&[("tier", format!("t{t}"))]),
            span: span(),
        });
    }
    for k in 0..30 {
        let def = sel(&[("app", format!("a{}", k * 3)), ("tier", format!("t{}", k % TIERS))]);
        groups.push(Group {
            name: format!("app-tier{k}"),
            def,
            span: span(),
        });
    }
    for c in 0..19 {
        let def = GroupDef::Selector(Selector {
            cluster: Some(format!("c{c}")),
            ..Selector::default()
        });
        groups.push(Group {
            name: format!("cluster{c}"),
            def,
            span: span(),
        });
    }
    for z in 0..20 {
        let def = GroupDef::Selector(Selector {
            zone: Some(format!("z{z}")),
            ..Selector::default()
        });
        groups.push(Group {
            name: format!("zone{z}"),
            def,
            span: span(),
        });
    }
    for p in 0..20 {
        // Every literal is a valid CIDR.
        let net = format!("192.168.{p}.0/24").parse().expect("valid CIDR");
        groups.push(Group {
            name: format!("partner{p}"),
            def: GroupDef::Ips(vec![net]),
            span: span(),
        });
    }
    groups.push(Group {
        name: "internet".into(),
        def: GroupDef::External,
        span: span(),
    });
    assert_eq!(groups.len(), 200);

    let tcp = |p| ServiceEntry {
        proto: Some(proto::TCP),
        dst_ports: Some((p, p)),
        ..ServiceEntry::ANY
    };
    let services: Vec<Service> = (0..10)
        .map(|s| {
            let mut entries = vec![tcp(8000 + s as u16)];
            if s % 3 == 0 {
                entries.push(ServiceEntry {
                    proto: Some(proto::UDP),
                    dst_ports: Some((9000, 9100)),
                    ..ServiceEntry::ANY
                });
            }
            Service {
                name: format!("svc{s}"),
                entries,
                span: span(),
            }
        })
        .collect();

    let mut rules = Vec::new();
    let mut rule = |level: Level, scope: Option<String>, from: &str, to: &str, r: &mut Rng| {
        let action = [Action::Allow, Action::Allow, Action::Allow, Action::Deny, Action::Pass][r.below(5)];
        rules.push(Rule {
            id: format!("r{}", rules.len()),
            level,
            scope,
            from: vec![Peer::Group(from.to_string())],
            to: vec![Peer::Group(to.to_string())],
            service: vec![ServiceRef::Named(format!("svc{}", r.below(10)))],
            action,
            log: r.below(4) == 0,
            inspect: None,
            applied_to: None,
            span: span(),
            redirect: None,
        });
    };
    let app = |r: &mut Rng| format!("app{}", r.below(APPS));
    for _ in 0..100 {
        let (from, to) = match r.below(3) {
            0 => ("internet".to_string(), format!("tier{}", r.below(TIERS))),
            1 => (format!("partner{}", r.below(20)), format!("tier{}", r.below(TIERS))),
            _ => (format!("tier{}", r.below(TIERS)), format!("tier{}", r.below(TIERS))),
        };
        rule(Level::Datacenter, None, &from, &to, &mut r);
    }
    for c in 0..CLUSTERS {
        for _ in 0..50 {
            let (from, to) = (app(&mut r), app(&mut r));
            rule(Level::Cluster, Some(format!("c{c}")), &from, &to, &mut r);
        }
    }
    for z in 0..ZONES {
        for _ in 0..60 {
            let (from, to) = match r.below(4) {
                0 => (format!("app-tier{}", r.below(30)), app(&mut r)),
                _ => (app(&mut r), app(&mut r)),
            };
            rule(Level::Zone, Some(format!("z{z}")), &from, &to, &mut r);
        }
    }
    for _ in 0..12_900 {
        let vm = r.below(VMS);
        let (from, to) = (app(&mut r), app(&mut r));
        rule(Level::Vm, Some(format!("vm{vm}")), &from, &to, &mut r);
    }
    rules.sort_by_key(|r| r.level);
    Model {
        inventory: Inventory {
            datacenter: Datacenter {
                name: "dc".into(),
                default: Action::Deny,
            },
            clusters,
            zones,
            vms,
        },
        policy: Policy {
            version: 1,
            groups,
            services,
            profiles: vec![],
            inspection_defaults: Default::default(),
            rules,
            service_chains: vec![],
        },
    }
}

fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not, and
    // should not spend a minute on a debug-build benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        println!("compile benchmark: run with `cargo bench -p palisade-policy`");
        return;
    }
    let model = datacenter();
    let (vms, groups, rules) = (
        model.inventory.vms.len(),
        model.policy.groups.len(),
        model.policy.rules.len(),
    );
    let t = Instant::now();
    let mut compiler = Compiler::new(model.clone()).expect("synthetic model is consistent");
    let full_ms = t.elapsed().as_secs_f64() * 1e3;
    let entries: usize = compiler.chains().map(|c| c.entries.len()).sum();

    let mut r = Rng(0xbeef);
    let mut samples = Vec::new();
    for _ in 0..21 {
        let vm = r.below(VMS);
        let name = format!("vm{vm}");
        let mut tags = model.inventory.vms[vm].tags.clone();
        tags.insert("app".into(), format!("a{}", r.below(APPS)));
        let t = Instant::now();
        let changes = compiler.retag(&name, tags).expect("VM exists");
        samples.push((
            t.elapsed().as_secs_f64() * 1e3,
            changes.recompiled.len(),
            changes.changed.len(),
        ));
    }
    samples.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (median, recompiled, changed) = samples[samples.len() / 2];
    let max = samples.last().map_or(0.0, |s| s.0);
    println!(
        "{{\"vms\":{vms},\"vnics\":{vms},\"groups\":{groups},\"rules\":{rules},\"chain_entries\":{entries},\
         \"full_compile_ms\":{full_ms:.1},\"incremental_ms\":{median:.2},\"incremental_max_ms\":{max:.2},\
         \"incremental_samples\":{},\"recompiled_vnics\":{recompiled},\"changed_vnics\":{changed},\
         \"peak_rss_bytes\":{}}}",
        samples.len(),
        peak_rss()
    );
}

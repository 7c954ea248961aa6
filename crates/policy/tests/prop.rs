//! Property tests: on random inventories, policies and flows, the compiled
//! chains decide exactly as the reference evaluator; incremental retagging
//! gives the same chains as compiling from scratch.
//!
//! Models are built from a proptest-chosen seed by a small deterministic
//! generator (a failing seed reproduces exactly); names, tags, addresses and
//! ports come from small alphabets so that rules, groups and flows collide
//! often enough to exercise overlaps, `pass`, `applied_to` and defaults.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use palisade_policy::compile::Compiler;
use palisade_policy::eval::{Direction, Flow, evaluate, evaluate_related_error};
use palisade_policy::model::*;
use proptest::prelude::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

const TIERS: [&str; 3] = ["web", "app", "db"];
const ENVS: [&str; 2] = ["prod", "dev"];

fn random_tags(r: &mut Rng) -> BTreeMap<String, String> {
    let mut t = BTreeMap::new();
    if r.chance(80) {
        t.insert("tier".to_string(), r.pick(&TIERS).to_string());
    }
    if r.chance(60) {
        t.insert("env".to_string(), r.pick(&ENVS).to_string());
    }
    t
}

fn action(r: &mut Rng) -> Action {
    *r.pick(&[Action::Allow, Action::Allow, Action::Deny, Action::Reject, Action::Pass])
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn random_model(seed: u64) -> Model {
    let mut r = Rng(seed | 1);
    let zones: Vec<Zone> = (0..1 + r.below(3))
        .map(|i| Zone {
            name: format!("z{i}"),
            segment: Segment::Vlan(100 + i as u16),
            default: *r.pick(&[None, Some(Action::Allow), Some(Action::Deny)]),
            on_failure: OnFailure::Closed,
            span: Span::default(),
        })
        .collect();
    let clusters: Vec<Cluster> = (0..2)
        .map(|i| Cluster {
            name: format!("c{i}"),
            hosts: vec![],
            span: Span::default(),
        })
        .collect();
    let mut vms = Vec::new();
    for v in 0..1 + r.below(6) {
        let mut vnics = Vec::new();
        for n in 0..1 + r.below(2) {
            let mut ips: Vec<IpAddr> = vec![format!("10.0.{v}.{}", n + 1).parse().unwrap()];
            if r.chance(25) {
                ips.push(format!("fd00::{v}:{}", n + 1).parse().unwrap());
            }
            vnics.push(Vnic {
                name: format!("vm{v}.{n}"),
                mac: format!("02:00:00:00:{v:02x}:{n:02x}"),
                ips,
                zone: r.pick(&zones).name.clone(),
                span: Span::default(),
            });
        }
        vms.push(Vm {
            name: format!("vm{v}"),
            uuid: String::new(),
            cluster: r.chance(80).then(|| r.pick(&clusters).name.clone()),
            host: None,
            tags: random_tags(&mut r),
            vnics,
            span: Span::default(),
        });
    }
    let mut groups = Vec::new();
    for g in 0..1 + r.below(5) {
        let def = match r.below(6) {
            0 => GroupDef::External,
            1 => GroupDef::Ips(
                [
                    net("10.0.1.0/24"),
                    net("10.0.0.0/16"),
                    net("192.168.0.0/24"),
                    net("fd00::/16"),
                    net("10.0.2.1/32"),
                ]
                .into_iter()
                .filter(|_| r.chance(40))
                .collect(),
            ),
            _ => GroupDef::Selector(Selector {
                tags: random_tags(&mut r).into_iter().filter(|_| r.chance(70)).collect(),
                name: r.chance(20).then(|| r.pick(&["vm1*", "vm?", "*2", "vm3"]).to_string()),
                zone: r.chance(20).then(|| r.pick(&zones).name.clone()),
                cluster: r.chance(15).then(|| r.pick(&clusters).name.clone()),
            }),
        };
        groups.push(Group {
            name: format!("g{g}"),
            def,
            span: Span::default(),
        });
    }
    let tcp = |lo, hi| ServiceEntry {
        proto: Some(proto::TCP),
        dst_ports: Some((lo, hi)),
        ..ServiceEntry::ANY
    };
    let udp = |p| ServiceEntry {
        proto: Some(proto::UDP),
        dst_ports: Some((p, p)),
        ..ServiceEntry::ANY
    };
    let services = vec![
        Service {
            name: "http".into(),
            entries: vec![tcp(80, 80)],
            span: Span::default(),
        },
        Service {
            name: "dns".into(),
            entries: vec![udp(53), tcp(53, 53)],
            span: Span::default(),
        },
        Service {
            name: "range".into(),
            entries: vec![tcp(1000, 2000)],
            span: Span::default(),
        },
        Service {
            name: "ping".into(),
            entries: vec![ServiceEntry {
                proto: Some(proto::ICMP),
                icmp_type: Some(8),
                ..ServiceEntry::ANY
            }],
            span: Span::default(),
        },
        Service {
            name: "unreach".into(),
            entries: vec![ServiceEntry {
                proto: Some(proto::ICMP),
                icmp_type: Some(3),
                ..ServiceEntry::ANY
            }],
            span: Span::default(),
        },
        Service {
            name: "all-icmp".into(),
            entries: vec![ServiceEntry {
                proto: Some(proto::ICMP),
                ..ServiceEntry::ANY
            }],
            span: Span::default(),
        },
        Service {
            name: "unreach-port".into(),
            entries: vec![ServiceEntry {
                proto: Some(proto::ICMP),
                icmp_type: Some(3),
                icmp_code: Some(3),
                ..ServiceEntry::ANY
            }],
            span: Span::default(),
        },
    ];
    let peer = |r: &mut Rng| match r.below(8) {
        0 => Peer::Any,
        1 => Peer::Net(*r.pick(&[
            net("10.0.0.0/24"),
            net("10.0.1.1/32"),
            net("0.0.0.0/0"),
            net("192.168.0.0/16"),
        ])),
        _ => Peer::Group(r.pick(&groups).name.clone()),
    };
    let peers = |r: &mut Rng| (0..1 + r.below(2)).map(|_| peer(r)).collect::<Vec<_>>();
    let mut rules = Vec::new();
    for i in 0..r.below(14) {
        let level = *r.pick(&Level::ALL);
        let scope = match level {
            Level::Datacenter => None,
            Level::Cluster => Some(r.pick(&clusters).name.clone()),
            Level::Zone => Some(r.pick(&zones).name.clone()),
            Level::Vm => Some(r.pick(&vms).name.clone()),
        };
        let service = match r.below(5) {
            0 => vec![ServiceRef::Any],
            1 => vec![ServiceRef::Inline(tcp(53, 80))],
            _ => (0..1 + r.below(2))
                .map(|_| ServiceRef::Named(r.pick(&services).name.clone()))
                .collect(),
        };
        let action = action(&mut r);
        // Allowed flows are steered now and then, through one of two chains,
        // so that evaluator and compiler must agree on which.
        let redirect = (action == Action::Allow && r.chance(25)).then(|| format!("chain{}", r.next() % 2));
        rules.push(Rule {
            id: format!("r{i}"),
            level,
            scope,
            from: peers(&mut r),
            to: peers(&mut r),
            service,
            action,
            log: r.chance(30),
            inspect: None,
            applied_to: r.chance(20).then(|| peers(&mut r)),
            span: Span::default(),
            redirect,
        });
    }
    rules.sort_by_key(|r| r.level);
    Model {
        inventory: Inventory {
            datacenter: Datacenter {
                name: "dc".into(),
                default: *r.pick(&[Action::Allow, Action::Deny]),
            },
            clusters,
            zones,
            vms,
        },
        policy: Policy {
            version: r.next() % 100,
            groups,
            services,
            profiles: vec![],
            inspection_defaults: InspectionDefaults {
                north_south: Some("full".into()),
                inter_zone: Some("critical".into()),
                intra_zone: None,
            },
            rules,
            service_chains: vec![],
        },
    }
}

fn random_flows(model: &Model, seed: u64, n: usize) -> Vec<Flow> {
    let mut r = Rng(seed.rotate_left(17) | 1);
    let mut addrs: Vec<IpAddr> = model
        .inventory
        .vnics()
        .flat_map(|(_, n)| n.ips.iter().copied())
        .collect();
    addrs.extend(
        ["8.8.8.8", "10.0.0.200", "192.168.0.5", "10.0.2.1", "fd00::99"]
            .iter()
            .map(|s| s.parse::<IpAddr>().unwrap()),
    );
    (0..n)
        .map(|_| {
            let (proto, sp, dp) = *r.pick(&[
                (proto::TCP, 40000, 80),
                (proto::TCP, 40000, 53),
                (proto::UDP, 40000, 53),
                (proto::TCP, 40000, 1500),
                (proto::TCP, 40000, 2001),
                (proto::ICMP, 8, 0),
                (proto::ICMP, 3, 3),
                (proto::ICMP, 3, 1),
                (proto::ICMP, 3, 4),
                (proto::ICMP, 11, 0),
                (proto::ICMP, 0, 0),
                (47, 0, 0),
            ]);
            Flow {
                src: *r.pick(&addrs),
                dst: *r.pick(&addrs),
                proto,
                src_port: sp,
                dst_port: dp,
            }
        })
        .collect()
}

const EXAMPLE_INVENTORY: &str = include_str!("../../../examples/three-tier/inventory.yaml");
const EXAMPLE_POLICY: &str = include_str!("../../../examples/three-tier/policy.yaml");

/// Apply `edits` random character edits (delete a run, insert YAML-significant characters).
fn mutate(text: &str, seed: u64, edits: usize) -> String {
    let mut r = Rng(seed | 1);
    let mut chars: Vec<char> = text.chars().collect();
    let alphabet: Vec<char> = "[]{}:,-'\"\n #&*!|>0123456789abcz/.".chars().collect();
    for _ in 0..edits {
        let at = r.below(chars.len().max(1));
        if r.chance(50) && !chars.is_empty() {
            let len = (1 + r.below(8)).min(chars.len() - at);
            chars.drain(at..at + len);
        } else {
            for _ in 0..1 + r.below(4) {
                chars.insert(at.min(chars.len()), *r.pick(&alphabet));
            }
        }
    }
    chars.into_iter().collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Untrusted policy text never panics the loader, and whatever loads
    /// without errors compiles and analyzes.
    #[test]
    fn mangled_files_never_panic(seed in any::<u64>(), edits in 1usize..6) {
        let inv = mutate(EXAMPLE_INVENTORY, seed, edits);
        let pol = mutate(EXAMPLE_POLICY, seed.rotate_left(7), edits);
        let src = palisade_policy::MemorySource::new().with("inventory.yaml", inv).with("policy.yaml", pol);
        let loaded = palisade_policy::load(&src).unwrap();
        let _ = loaded.render();
        if !loaded.has_errors() {
            let c = Compiler::new(loaded.model.clone()).unwrap();
            let _ = palisade_policy::analyze::analyze(&loaded.model, &c);
        }
    }

    #[test]
    fn compiled_chains_decide_like_the_reference(seed in any::<u64>()) {
        let model = random_model(seed);
        let compiler = Compiler::new(model.clone()).unwrap();
        for flow in random_flows(&model, seed, 40) {
            let reference = evaluate(&model, &flow);
            let compiled = compiler.decide(&flow);
            prop_assert_eq!(reference, compiled, "flow {}", flow);
        }
    }

    /// ICMP errors related to a tracked connection: the compiled chains'
    /// walk over the entries naming the type decides as the reference does.
    #[test]
    fn compiled_chains_decide_related_errors_like_the_reference(seed in any::<u64>()) {
        let model = random_model(seed);
        let compiler = Compiler::new(model.clone()).unwrap();
        for flow in random_flows(&model, seed, 40) {
            let mut reference = evaluate_related_error(&model, &flow);
            // The compiled walk records no steps.
            for t in reference.iter_mut().flat_map(|d| [&mut d.egress, &mut d.ingress]).flatten() {
                t.steps.clear();
            }
            prop_assert_eq!(reference, compiler.decide_related(&flow), "flow {}", flow);
        }
    }

    #[test]
    fn incremental_retag_equals_full_compile(seed in any::<u64>()) {
        let model = random_model(seed);
        let mut r = Rng(seed.rotate_left(31) | 1);
        let mut inc = Compiler::new(model.clone()).unwrap();
        let before: Vec<_> = inc.chains().cloned().collect();
        let vm = r.pick(&model.inventory.vms).name.clone();
        let tags = random_tags(&mut r);
        let changes = inc.retag(&vm, tags.clone()).unwrap();

        let mut updated = model.clone();
        updated.inventory.vms.iter_mut().find(|v| v.name == vm).unwrap().tags = tags;
        let full = Compiler::new(updated.clone()).unwrap();
        let after_inc: Vec<_> = inc.chains().cloned().collect();
        let after_full: Vec<_> = full.chains().cloned().collect();
        prop_assert_eq!(&after_inc, &after_full);
        // Every chain that differs is reported changed; changed ⊆ recompiled.
        for (old, new) in before.iter().zip(&after_full) {
            if old != new {
                prop_assert!(changes.changed.contains(&new.vnic), "{} changed but not reported", new.vnic);
            }
        }
        for c in &changes.changed {
            prop_assert!(changes.recompiled.contains(c));
        }
        // And the retagged model still decides like the reference.
        for flow in random_flows(&updated, seed, 20) {
            prop_assert_eq!(evaluate(&updated, &flow), inc.decide(&flow));
        }
        let _ = Direction::Egress;
    }
}

//! Analysis on small hand-written policies: each finding kind, across levels,
//! and the cases that must not be reported.

use palisade_policy::analyze::{Finding, FindingKind, analyze};
use palisade_policy::compile::Compiler;
use palisade_policy::{MemorySource, load};

const INVENTORY: &str = r#"datacenter: { name: dc1, default: deny }
clusters: [{ name: prod }]
zones: [{ name: web, vlan: 100 }, { name: db, vlan: 300 }]
vms:
  - { name: web-1, uuid: 00000000-0000-4000-8000-000000000001, cluster: prod, tags: { tier: web },
      vnics: [{ name: web-1.0, mac: "02:00:00:00:00:01", ips: [10.0.1.11], zone: web }] }
  - { name: db-1, uuid: 00000000-0000-4000-8000-000000000002, cluster: prod, tags: { tier: db },
      vnics: [{ name: db-1.0, mac: "02:00:00:00:00:02", ips: [10.0.3.31], zone: db }] }
groups: { web: { tags: { tier: web } }, db: { tags: { tier: db } }, internet: external, nets: { ips: [10.0.0.0/16] } }
services: { pg: tcp/5432, pgs: tcp/5000-5999, dns: [udp/53, tcp/53] }
"#;

fn findings(rules: &str) -> Vec<Finding> {
    let src = MemorySource::new()
        .with("inv.yaml", INVENTORY)
        .with("rules.yaml", rules);
    let l = load(&src).unwrap();
    assert!(!l.has_errors(), "{}", l.render());
    let c = Compiler::new(l.model.clone()).unwrap();
    analyze(&l.model, &c)
}

fn summary(f: &[Finding]) -> Vec<(FindingKind, &str, Option<&str>)> {
    f.iter()
        .map(|f| (f.kind, f.rule_id.as_str(), f.by.as_deref()))
        .collect()
}

#[test]
fn redundant_same_action() {
    let f = findings(
        "rules:\n  datacenter:\n    - { id: a, from: web, to: db, service: pgs, action: allow }\n    - { id: b, from: web, to: db, service: pg, action: allow }\n",
    );
    assert_eq!(summary(&f), [(FindingKind::Redundant, "b", Some("a"))]);
}

#[test]
fn shadowed_across_levels() {
    let f = findings(
        "rules:\n  datacenter:\n    - { id: dc, from: any, to: db, action: deny }\n  vm:db-1:\n    - { id: v, from: web, to: db, service: pg, action: allow }\n",
    );
    assert_eq!(summary(&f), [(FindingKind::Shadowed, "v", Some("dc"))]);
}

#[test]
fn pass_hides_the_rest_of_its_level_only() {
    let f = findings(
        "rules:\n  datacenter:\n    - { id: p, from: web, to: db, action: pass }\n    - { id: hidden, from: web, to: db, service: pg, action: deny }\n  zone:db:\n    - { id: reached, from: web, to: db, service: pg, action: allow }\n",
    );
    assert_eq!(summary(&f), [(FindingKind::Shadowed, "hidden", Some("p"))]);
}

#[test]
fn a_pass_before_the_hider_prevents_the_claim() {
    // `deny-all` covers `z`, but `p` may jump flows past it: no finding for `z`.
    let f = findings(
        "rules:\n  datacenter:\n    - { id: p, from: web, to: db, service: pg, action: pass }\n    - { id: deny-all, from: any, to: any, action: deny }\n  zone:db:\n    - { id: z, from: web, to: db, service: pg, action: allow }\n",
    );
    assert!(summary(&f).iter().all(|(_, id, _)| *id != "z"), "{f:#?}");
}

#[test]
fn partial_overlap_is_a_conflict_but_an_exception_first_is_not() {
    let f = findings(
        "rules:\n  datacenter:\n    - { id: a, from: nets, to: db, service: pg, action: allow }\n    - { id: b, from: any, to: db, service: pgs, action: deny }\n    - { id: c, from: web, to: any, service: pgs, action: deny }\n",
    );
    // b covers a (exception first): not reported. c overlaps a partially (a's
    // destination is db only, c's source web only): a conflict.
    assert_eq!(summary(&f), [(FindingKind::Conflict, "c", Some("a"))]);
}

#[test]
fn service_elements_are_checked_one_by_one() {
    let f = findings(
        "rules:\n  datacenter:\n    - { id: u, from: web, to: db, service: udp/53, action: allow }\n    - { id: t, from: web, to: db, service: tcp/53, action: allow }\n    - { id: d, from: web, to: db, service: dns, action: allow }\n",
    );
    assert_eq!(summary(&f), [(FindingKind::Redundant, "d", Some("u"))]);
}

#[test]
fn coverage_by_a_union_of_rules_is_not_claimed() {
    // 5000-5499 and 5500-5999 together cover pgs, but neither alone: sound, not complete.
    let f = findings(
        "rules:\n  datacenter:\n    - { id: lo, from: web, to: db, service: tcp/5000-5499, action: allow }\n    - { id: hi, from: web, to: db, service: tcp/5500-5999, action: allow }\n    - { id: all, from: web, to: db, service: pgs, action: allow }\n",
    );
    assert!(f.is_empty(), "{f:#?}");
}

#[test]
fn unused_rule() {
    // A vm-level rule for db-1 whose `from` and `to` do not contain db-1.
    let f = findings("rules:\n  vm:db-1:\n    - { id: lost, from: web, to: internet, action: allow }\n");
    assert_eq!(summary(&f), [(FindingKind::Unused, "lost", None)]);
}

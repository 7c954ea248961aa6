//! The shipped examples: they load cleanly, decide the scenarios their comments
//! promise, and compile to the committed snapshots.
//!
//! Snapshots live in `tests/snapshots/`; after an intended change, regenerate
//! them with `UPDATE_SNAPSHOTS=1 cargo test -p palisade-policy --test examples`
//! and review the diff like any other code change.

use std::collections::BTreeMap;
use std::path::PathBuf;

use palisade_policy::analyze::{FindingKind, analyze};
use palisade_policy::compile::Compiler;
use palisade_policy::eval::{Direction, Flow, evaluate, explain, flow_for, render_explanation, resolve_endpoint};
use palisade_policy::model::{Action, Level};
use palisade_policy::{DirSource, Loaded, load};

fn example(name: &str) -> Loaded {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name);
    load(&DirSource::new(dir)).unwrap()
}

fn three_tier() -> Loaded {
    let l = example("three-tier");
    assert!(!l.has_errors(), "{}", l.render());
    l
}

fn snapshot(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(name);
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_SNAPSHOTS=1 to create it)", path.display()));
    assert!(
        expected == actual,
        "{name} differs from the snapshot; run with UPDATE_SNAPSHOTS=1 and review the diff"
    );
}

fn flow(l: &Loaded, from: &str, to: &str, service: &str) -> Flow {
    let inv = &l.model.inventory;
    let src = resolve_endpoint(inv, from).unwrap();
    let dst = resolve_endpoint(inv, to).unwrap();
    flow_for(&l.model.policy, src, dst, service).unwrap()
}

/// (from, to, service, expected action, deciding rule ids, inspect)
type Scenario = (
    &'static str,
    &'static str,
    &'static str,
    Action,
    &'static [&'static str],
    Option<&'static str>,
);

const SCENARIOS: &[Scenario] = &[
    (
        "203.0.113.7",
        "web-1",
        "https",
        Action::Allow,
        &["web-from-internet"],
        Some("full"),
    ),
    (
        "203.0.113.7",
        "web-2",
        "tcp/80",
        Action::Allow,
        &["web-from-internet"],
        Some("full"),
    ),
    ("203.0.113.7", "app-1", "https", Action::Deny, &["default"], None),
    (
        "203.0.113.7",
        "web-1",
        "ssh",
        Action::Deny,
        &["dc-deny-internet-ssh"],
        None,
    ),
    (
        "web-1",
        "app-2",
        "app-api",
        Action::Allow,
        &["web-to-app", "app-from-web"],
        Some("critical"),
    ),
    ("web-1", "app-2", "tcp/9000", Action::Deny, &["default"], None),
    (
        "app-1",
        "db-1",
        "postgres",
        Action::Allow,
        &["app-to-db", "db-from-app"],
        Some("critical"),
    ),
    ("web-2", "db-1", "postgres", Action::Deny, &["prod-no-web-to-db"], None),
    (
        "bastion-1",
        "db-1",
        "ssh",
        Action::Allow,
        &["dc-bastion-ssh", "dc-bastion-ssh"],
        Some("critical"),
    ),
    ("bastion-1", "web-1", "telnet", Action::Deny, &["dc-deny-telnet"], None),
    (
        "10.255.0.9",
        "bastion-1",
        "ssh",
        Action::Allow,
        &["dc-vpn-to-bastion"],
        Some("full"),
    ),
    (
        "web-1",
        "dns-1",
        "dns",
        Action::Allow,
        &["dc-dns", "dc-dns"],
        Some("critical"),
    ),
    (
        "bastion-1",
        "198.51.100.1",
        "https",
        Action::Allow,
        &["mgmt-updates"],
        Some("full"),
    ),
    ("db-1", "198.51.100.1", "https", Action::Deny, &["default"], None),
    (
        "fd00:1::11",
        "app-1",
        "app-api",
        Action::Allow,
        &["web-to-app", "app-from-web"],
        Some("critical"),
    ),
];

#[test]
fn three_tier_scenarios() {
    let l = three_tier();
    let compiler = Compiler::new(l.model.clone()).unwrap();
    for (from, to, svc, action, rules, inspect) in SCENARIOS {
        let f = flow(&l, from, to, svc);
        let d = evaluate(&l.model, &f).unwrap();
        let ids: Vec<&str> = d.provenance.iter().map(|p| &*p.rule_id).collect();
        assert_eq!(
            (d.action, ids.as_slice(), d.inspect.as_deref()),
            (*action, *rules, *inspect),
            "{from} -> {to} {svc}"
        );
        assert_eq!(
            compiler.decide(&f).as_ref(),
            Some(&d),
            "compiled differs for {from} -> {to} {svc}"
        );
    }
}

#[test]
fn quarantine_by_retagging_with_forensic_pass() {
    let l = three_tier();
    let mut compiler = Compiler::new(l.model.clone()).unwrap();
    let mut tags: BTreeMap<String, String> = l.model.inventory.vm("app-1").unwrap().tags.clone();
    tags.insert("quarantine".into(), "true".into());
    let changes = compiler.retag("app-1", tags).unwrap();
    // dc-quarantine-in (from any) sits on every vNIC's egress chain and its
    // destination set gained app-1: every vNIC's chain changes.
    let all: Vec<String> = l
        .model
        .inventory
        .vnics()
        .map(|(_, n)| n.name.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(changes.changed, all);
    assert_eq!(changes.recompiled, all);

    let model = compiler.model().clone();
    let f = flow(&l, "web-1", "app-1", "app-api");
    let d = evaluate(&model, &f).unwrap();
    assert_eq!(d.action, Action::Deny);
    assert_eq!(&*d.provenance[0].rule_id, "dc-quarantine-in");
    assert_eq!(compiler.decide(&f), Some(d));

    let out = flow(&l, "app-1", "db-1", "postgres");
    assert_eq!(
        compiler.decide(&out).unwrap().provenance[0].rule_id.as_ref(),
        "dc-quarantine-out"
    );

    // The bastion's SSH passes the quarantine at datacenter level, and is
    // allowed at cluster level by prod-forensics-ssh, on both chains.
    let ssh = flow(&l, "bastion-1", "app-1", "ssh");
    let d = evaluate(&model, &ssh).unwrap();
    assert_eq!(d.action, Action::Allow);
    let ids: Vec<&str> = d.provenance.iter().map(|p| &*p.rule_id).collect();
    assert_eq!(ids, ["prod-forensics-ssh", "prod-forensics-ssh"]);
    // Other bastion traffic to it stays quarantined.
    let ping = flow(&l, "bastion-1", "app-1", "ping");
    assert_eq!(
        evaluate(&model, &ping).unwrap().provenance[0].rule_id.as_ref(),
        "dc-quarantine-in"
    );
    assert_eq!(compiler.decide(&ssh), Some(d));
    let e = explain(&model, &ssh);
    let text = render_explanation(&e);
    assert!(
        text.contains("dc-forensics-ssh             MATCH pass: skip to next level"),
        "{text}"
    );
}

#[test]
fn retag_without_group_change_recompiles_only_the_vm() {
    let l = three_tier();
    let mut compiler = Compiler::new(l.model.clone()).unwrap();
    let before: Vec<_> = compiler.chains().cloned().collect();
    let mut tags = l.model.inventory.vm("web-2").unwrap().tags.clone();
    tags.insert("owner".into(), "shop-team".into());
    let changes = compiler.retag("web-2", tags).unwrap();
    assert_eq!(changes.recompiled, vec!["web-2.0".to_string()]);
    assert!(changes.changed.is_empty());
    assert!(before.iter().eq(compiler.chains()));

    // web-2 moves to the app tier: the web and app groups change, so does
    // every chain holding a rule that names them.
    let mut tags = l.model.inventory.vm("web-2").unwrap().tags.clone();
    tags.insert("tier".into(), "app".into());
    let changes = compiler.retag("web-2", tags).unwrap();
    assert!(changes.changed.contains(&"web-2.0".to_string()));
    assert!(
        changes.changed.contains(&"db-1.0".to_string()),
        "db-1's ingress names web-servers: {changes:?}"
    );
    // No rule on the bastion's or the DNS server's chains names a web or app group.
    for untouched in ["dns-1.0", "bastion-1.0"] {
        assert!(
            !changes.recompiled.contains(&untouched.to_string()),
            "{untouched}: {changes:?}"
        );
    }
    let fresh = Compiler::new(compiler.model().clone()).unwrap();
    assert!(fresh.chains().eq(compiler.chains()));
}

#[test]
fn analysis_finds_the_leftover_debug_rule() {
    let l = three_tier();
    let compiler = Compiler::new(l.model.clone()).unwrap();
    let findings = analyze(&l.model, &compiler);
    assert_eq!(findings.len(), 1, "{findings:#?}");
    let f = &findings[0];
    assert_eq!(
        (f.kind, f.rule_id.as_str(), f.level),
        (FindingKind::Shadowed, "web-1-telnet-debug", Level::Vm)
    );
    assert_eq!(
        (f.by.as_deref(), f.by_level),
        (Some("dc-deny-telnet"), Some(Level::Datacenter))
    );
    snapshot(
        "three-tier.analysis.json",
        &serde_json::to_string_pretty(&findings).unwrap(),
    );
}

#[test]
fn three_tier_compiled_snapshot() {
    let l = three_tier();
    let compiler = Compiler::new(l.model.clone()).unwrap();
    let chains: Vec<_> = compiler.chains().collect();
    assert_eq!(chains.len(), 2 * 7);
    snapshot(
        "three-tier.chains.json",
        &(serde_json::to_string_pretty(&chains).unwrap() + "\n"),
    );
    let text: String = chains.iter().map(|c| c.render() + "\n").collect();
    snapshot("three-tier.chains.txt", &text);
    let db_in = compiler.chain("db-1.0", Direction::Ingress).unwrap();
    assert!(db_in.entries.iter().any(|e| &*e.provenance.rule_id == "db-from-app"));
}

#[test]
fn explain_snapshot() {
    let l = three_tier();
    let e = explain(&l.model, &flow(&l, "web-2", "db-1", "postgres"));
    snapshot("three-tier.explain-web2-db1.txt", &render_explanation(&e));
}

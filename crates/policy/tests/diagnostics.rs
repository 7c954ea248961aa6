//! One case per diagnostic kind, each checking the exact line and column.
//!
//! Every case loads a fixed, valid `base.yaml` plus a small `x.yaml` holding
//! the mistake, so line numbers below refer to `x.yaml` and are easy to count.

use palisade_policy::diag::{DiagnosticKind as K, Severity};
use palisade_policy::{MemorySource, load};

const BASE: &str = r#"datacenter: { name: dc1, default: deny }
clusters: [{ name: prod, hosts: [h1] }]
zones: [{ name: web, vlan: 100 }]
vms:
  - name: web-1
    uuid: 00000000-0000-4000-8000-000000000001
    cluster: prod
    tags: { tier: web }
    vnics: [{ name: web-1.0, mac: "02:00:00:00:00:01", ips: [10.0.1.11], zone: web }]
groups: { web-servers: { tags: { tier: web } } }
services: { https: tcp/443 }
profiles: { full: { signatures: [all] } }
"#;

fn diags(x: &str) -> Vec<palisade_policy::Diagnostic> {
    let src = MemorySource::new().with("base.yaml", BASE).with("x.yaml", x);
    load(&src).unwrap().diagnostics
}

#[test]
fn base_is_clean() {
    assert_eq!(diags(""), vec![]);
}

/// 65 block sequences, one inside the other: one level past the limit.
const DEEP: &str = "- - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - x\n";

/// (kind, x.yaml, line, column, severity)
const CASES: &[(K, &str, u32, u32, Severity)] = {
    use Severity::*;
    &[
        // At the `[` left open (the parser stops at 3:2).
        (K::YamlSyntax, "groups:\n  a: [1, 2\nb: 3\n", 2, 6, Error),
        // The 65th nested collection (the parser marks a nested block
        // sequence at its first entry).
        (K::LimitExceeded, DEEP, 1, 129, Error),
        (
            K::BadCharacter,
            "groups: { \"a\\u200Bb\": { ips: [10.0.0.0/8] } }\n",
            1,
            11,
            Error,
        ),
        (K::UnsupportedTag, "version: !!int 7\n", 1, 16, Error),
        (
            K::HostBitsSet,
            "groups: { g: { ips: [10.9.0.77/16] } }\n",
            1,
            22,
            Warning,
        ),
        (
            K::UnknownKey,
            "groups:\n  g: { tags: { tier: web }, zones: web }\n",
            2,
            29,
            Error,
        ),
        (
            K::MissingField,
            "rules:\n  datacenter:\n    - { id: r1, from: any, action: allow }\n",
            3,
            7,
            Error,
        ),
        (K::WrongType, "version: [1]\n", 1, 10, Error),
        (
            K::UnknownGroup,
            "rules:\n  datacenter:\n    - { id: r1, from: web-srv, to: any, action: allow }\n",
            3,
            23,
            Error,
        ),
        (
            K::UnknownService,
            "rules:\n  datacenter:\n    - { id: r1, from: any, to: any, service: htps, action: allow }\n",
            3,
            46,
            Error,
        ),
        (K::UnknownZone, "groups:\n  g: { zone: dmz }\n", 2, 14, Error),
        (K::UnknownCluster, "groups:\n  g: { cluster: test }\n", 2, 17, Error),
        (
            K::UnknownVm,
            "rules:\n  vm:web-9:\n    - { id: r1, from: any, to: any, action: allow }\n",
            2,
            3,
            Error,
        ),
        (
            K::UnknownProfile,
            "rules:\n  datacenter:\n    - { id: r1, from: any, to: any, action: allow, inspect: deep }\n",
            3,
            61,
            Error,
        ),
        (K::PortOutOfRange, "services:\n  big: tcp/70000\n", 2, 8, Error),
        (K::PortOutOfRange, "services:\n  rev: tcp/90-80\n", 2, 8, Error),
        (K::BadCidr, "groups:\n  g: { ips: [10.0.0.300/24] }\n", 2, 14, Error),
        (
            K::OverlappingCidr,
            "groups:\n  g: { ips: [10.0.0.0/16, 10.0.1.0/24] }\n",
            2,
            27,
            Error,
        ),
        (
            K::DuplicateRuleId,
            "rules:\n  datacenter:\n    - { id: r1, from: any, to: any, action: allow }\n    - { id: r1, from: any, to: any, action: deny }\n",
            4,
            13,
            Error,
        ),
        (
            K::DuplicateName,
            "vms:\n  - name: web-1\n    uuid: 00000000-0000-4000-8000-000000000002\n    vnics: []\n",
            2,
            11,
            Error,
        ),
        (K::DuplicateName, "zones:\n  - { name: web, vlan: 101 }\n", 2, 13, Error),
        (
            K::DuplicateName,
            "vms:\n  - name: web-2\n    uuid: 00000000-0000-4000-8000-000000000002\n    vnics: [{ name: web-1.0, mac: \"02:00:00:00:00:02\", ips: [10.0.1.12], zone: web }]\n",
            4,
            21,
            Error,
        ),
        (
            K::DuplicateIp,
            "vms:\n  - name: web-2\n    uuid: 00000000-0000-4000-8000-000000000002\n    vnics: [{ name: web-2.0, mac: \"02:00:00:00:00:02\", ips: [10.0.1.11], zone: web }]\n",
            4,
            21,
            Error,
        ),
        (
            K::DuplicateMac,
            "vms:\n  - name: web-2\n    uuid: 00000000-0000-4000-8000-000000000002\n    vnics: [{ name: web-2.0, mac: \"02:00:00:00:00:01\", ips: [10.0.1.12], zone: web }]\n",
            4,
            21,
            Error,
        ),
        (K::VlanOutOfRange, "zones: [{ name: z2, vlan: 5000 }]\n", 1, 27, Error),
        (K::VlanOutOfRange, "zones: [{ name: z2, vlan: 0 }]\n", 1, 27, Error),
        (K::VniOutOfRange, "zones: [{ name: z2, vni: 16777216 }]\n", 1, 26, Error),
        (
            K::EmptySelector,
            "groups:\n  nobody: { tags: { tier: nope } }\n",
            2,
            3,
            Warning,
        ),
        (
            K::InvalidAction,
            "rules:\n  datacenter:\n    - { id: r1, from: any, to: any, action: permit }\n",
            3,
            45,
            Error,
        ),
        (
            K::InvalidAction,
            "zones: [{ name: z2, vlan: 7, default: pass }]\n",
            1,
            39,
            Error,
        ),
        (
            K::InvalidValue,
            "vms:\n  - name: web-2\n    uuid: 00000000-0000-4000-8000-000000000002\n    vnics: [{ name: web-2.0, mac: \"02:00\", ips: [10.0.1.12], zone: web }]\n",
            4,
            35,
            Error,
        ),
    ]
};

#[test]
fn each_kind_at_its_line_and_column() {
    let mut failures = Vec::new();
    for (kind, text, line, column, severity) in CASES {
        let all = diags(text);
        let found = all.iter().find(|d| d.kind == *kind && d.file == "x.yaml");
        match found {
            Some(d) if d.line == *line && d.column == *column && d.severity == *severity => {}
            _ => failures.push(format!(
                "{kind}: expected x.yaml:{line}:{column} ({severity:?}), got {all:#?}"
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn every_kind_is_covered() {
    use std::collections::BTreeSet;
    let covered: BTreeSet<_> = CASES.iter().map(|c| c.0).collect();
    // Keep this list in sync with DiagnosticKind: a new kind needs a case above.
    let all = [
        K::YamlSyntax,
        K::UnknownKey,
        K::MissingField,
        K::WrongType,
        K::InvalidValue,
        K::UnknownGroup,
        K::UnknownService,
        K::UnknownZone,
        K::UnknownCluster,
        K::UnknownVm,
        K::UnknownProfile,
        K::PortOutOfRange,
        K::BadCidr,
        K::OverlappingCidr,
        K::DuplicateRuleId,
        K::DuplicateName,
        K::DuplicateIp,
        K::DuplicateMac,
        K::VlanOutOfRange,
        K::VniOutOfRange,
        K::EmptySelector,
        K::InvalidAction,
        K::LimitExceeded,
        K::BadCharacter,
        K::UnsupportedTag,
        K::HostBitsSet,
    ];
    for k in all {
        assert!(covered.contains(&k), "no case for {k}");
    }
}

#[test]
fn all_errors_in_one_run() {
    let text = "groups:\n  g: { zone: dmz }\n  h: { ips: [10.0.0.300/24] }\nservices:\n  big: tcp/70000\nrules:\n  datacenter:\n    - { id: r1, from: web-srv, to: any, action: permit }\n";
    let all = diags(text);
    let kinds: Vec<K> = all.iter().filter(|d| d.is_error()).map(|d| d.kind).collect();
    for k in [
        K::UnknownZone,
        K::BadCidr,
        K::PortOutOfRange,
        K::InvalidAction,
        K::UnknownGroup,
    ] {
        assert!(kinds.contains(&k), "missing {k} in {kinds:?}");
    }
}

#[test]
fn rendered_like_rustc_with_hint() {
    let src = MemorySource::new().with("base.yaml", BASE).with(
        "x.yaml",
        "rules:\n  datacenter:\n    - { id: r1, from: web-srv, to: any, action: allow }\n",
    );
    let loaded = load(&src).unwrap();
    let out = loaded.render();
    let expected = "x.yaml:3:23: error[unknown-group]: group \"web-srv\" is not defined\n  |\n3 |     - { id: r1, from: web-srv, to: any, action: allow }\n  |                       ^\n  = hint: did you mean \"web-servers\"?\n";
    assert_eq!(out, expected);
}

#[test]
fn unknown_key_suggests() {
    let d = diags("groups:\n  g: { tags: { tier: web }, zones: web }\n");
    let d = d.iter().find(|d| d.kind == K::UnknownKey).unwrap();
    assert_eq!(d.hint.as_deref(), Some("did you mean \"zone\"?"));
}

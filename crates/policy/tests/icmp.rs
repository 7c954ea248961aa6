//! ICMP's roles in the reference semantics (`DESIGN.md`, "ICMP"): which
//! rules decide an error related to a tracked connection, and what
//! `explain` says about each case.

use palisade_policy::compile::Compiler;
use palisade_policy::eval::{Flow, IcmpRole, evaluate, evaluate_related_error, explain, render_explanation};
use palisade_policy::model::{Action, Model};
use palisade_policy::{MemorySource, load};

fn model(rules: &str) -> Model {
    let text = format!(
        r#"
version: 3
datacenter: {{ name: dc1, default: deny }}
zones: [{{ name: web, vlan: 100 }}]
vms:
  - {{ name: a, uuid: 00000000-0000-4000-8000-00000000000a, vnics: [{{ name: a.0, mac: "02:00:00:00:00:0a", ips: [10.0.0.10], zone: web }}] }}
  - {{ name: b, uuid: 00000000-0000-4000-8000-00000000000b, vnics: [{{ name: b.0, mac: "02:00:00:00:00:0b", ips: [10.0.0.11], zone: web }}] }}
services:
  unreachable: icmp/3
rules:
  datacenter:
{rules}
"#
    );
    let loaded = load(&MemorySource::new().with("p.yaml", text)).unwrap();
    assert!(!loaded.has_errors(), "{}", loaded.render());
    loaded.model
}

fn flow(service: &str) -> Flow {
    Flow::to_service("10.0.0.11".parse().unwrap(), "10.0.0.10".parse().unwrap(), service).unwrap()
}

#[test]
fn roles_by_type() {
    let cases = [
        ("icmp/echo-request", IcmpRole::EchoRequest),
        ("icmp/echo-reply", IcmpRole::EchoReply),
        ("icmp/3/4", IcmpRole::Error),
        ("icmp/11", IcmpRole::Error),
        ("icmp/13", IcmpRole::Plain),
        ("icmpv6/128", IcmpRole::EchoRequest),
        ("icmpv6/129", IcmpRole::EchoReply),
        ("icmpv6/2", IcmpRole::Error),
        ("icmpv6/135", IcmpRole::Link),
        ("icmpv6/134", IcmpRole::Link),
        ("tcp/3", IcmpRole::Plain),
        ("udp/8", IcmpRole::Plain),
    ];
    for (service, role) in cases {
        let f = if service.starts_with("icmpv6") {
            flow6(service)
        } else {
            flow(service)
        };
        assert_eq!(IcmpRole::of_flow(&f), role, "{service}");
    }
    // Each over its own IP version only: elsewhere it is just a protocol number.
    assert_eq!(IcmpRole::of_flow(&flow6("icmp/echo-reply")), IcmpRole::Plain);
    assert_eq!(IcmpRole::of_flow(&flow("icmpv6/2")), IcmpRole::Plain);
}

fn flow6(service: &str) -> Flow {
    Flow::to_service("fd00::b".parse().unwrap(), "fd00::a".parse().unwrap(), service).unwrap()
}

/// Related errors: only rules naming the type decide, `pass` included;
/// `any` and `icmp` without a type do not; no decision means it passes.
#[test]
fn related_errors_are_decided_by_rules_naming_their_type() {
    let m = model(
        r#"    - { id: all-icmp, from: any, to: any, service: icmp, action: deny }
    - { id: no-host-unreach, from: any, to: any, service: icmp/3/1, action: deny }
    - { id: frag-needed, from: any, to: any, service: unreachable, action: allow }
    - { id: everything, from: any, to: any, action: deny }"#,
    );
    let related = |s: &str| evaluate_related_error(&m, &flow(s)).unwrap();
    // icmp/3/1: the rule naming 3/1 denies it (on both chains: b's egress is first).
    let d = related("icmp/3/1");
    assert_eq!(d.action, Action::Deny);
    assert_eq!(&*d.provenance[0].rule_id, "no-host-unreach");
    // icmp/3/4: `unreachable` (icmp/3) allows it, on both chains.
    let d = related("icmp/3/4");
    assert_eq!(d.action, Action::Allow);
    assert_eq!(d.provenance.len(), 2);
    assert!(d.provenance.iter().all(|p| &*p.rule_id == "frag-needed"));
    // icmp/11/0: no rule names type 11; `icmp`, `any` and the default do not apply.
    let d = related("icmp/11/0");
    assert_eq!(d.action, Action::Allow);
    assert!(d.provenance.is_empty());
    assert!(d.egress.unwrap().verdict.is_none());
    // Unrelated, the same errors are decided like any flow: the first match.
    assert_eq!(
        evaluate(&m, &flow("icmp/3/4")).unwrap().provenance[0].rule_id.as_ref(),
        "all-icmp"
    );
    // The compiled chains agree.
    let c = Compiler::new(m.clone()).unwrap();
    for s in ["icmp/3/1", "icmp/3/4", "icmp/11/0", "icmp/3/3"] {
        let mut reference = evaluate_related_error(&m, &flow(s));
        for t in reference
            .iter_mut()
            .flat_map(|d| [&mut d.egress, &mut d.ingress])
            .flatten()
        {
            t.steps.clear();
        }
        assert_eq!(c.decide_related(&flow(s)), reference, "{s}");
    }
    // A `pass` naming the type skips the rest of its level; one that does not is ignored.
    let m = model(
        r#"    - { id: skip-any, from: any, to: any, action: pass }
    - { id: skip-unreach, from: any, to: any, service: icmp/3, action: pass }
    - { id: deny-unreach, from: any, to: any, service: icmp/3, action: deny }"#,
    );
    assert_eq!(
        evaluate_related_error(&m, &flow("icmp/3/3")).unwrap().action,
        Action::Allow
    );
    let m = model(
        r#"    - { id: skip-any, from: any, to: any, action: pass }
    - { id: deny-unreach, from: any, to: any, service: icmp/3, action: deny }"#,
    );
    assert_eq!(
        evaluate_related_error(&m, &flow("icmp/3/3")).unwrap().action,
        Action::Deny
    );
}

#[test]
fn explain_says_which_icmp_case_applies() {
    let m = model(r#"    - { id: pmtud, from: any, to: any, service: icmp/3/4, action: allow }"#);
    let text = render_explanation(&explain(&m, &flow("icmp/3/4")));
    for needle in [
        "ICMP error: unrelated to any tracked connection",
        "verdict if unrelated: allow",
        "related to a tracked connection, egress chain of b.0",
        "pmtud                        MATCH allow",
        "verdict if related: allow",
    ] {
        assert!(text.contains(needle), "{needle:?} in:\n{text}");
    }
    let text = render_explanation(&explain(&m, &flow("icmp/3/3")));
    for needle in [
        "verdict if unrelated: deny",
        "does not apply: its service names not this ICMP type",
        "=> allow: no rule names its type (defaults do not apply)",
        "verdict if related: allow (no rule names its type)",
    ] {
        assert!(text.contains(needle), "{needle:?} in:\n{text}");
    }
    let text = render_explanation(&explain(&m, &flow("icmp/echo-reply")));
    assert!(text.contains("unsolicited reply, which opens no connection"), "{text}");
    assert!(!text.contains("verdict if"), "{text}");
    let e = explain(&m, &flow("icmp/echo-request"));
    assert_eq!(e.icmp, IcmpRole::EchoRequest);
    assert!(e.related_error.is_none());
    let json = serde_json::to_value(explain(&m, &flow("icmp/3/3"))).unwrap();
    assert_eq!(json["icmp"], "error");
    assert_eq!(json["related_error"]["action"], "allow");
}

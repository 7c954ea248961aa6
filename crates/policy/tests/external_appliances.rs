//! External appliances: service-chain instances reached over the underlay
//! (`external: { address, vni_in, vni_out }`), loaded with positioned
//! diagnostics and shown by `explain`.

#[path = "support/chain_policy.rs"]
mod chain_policy;

use palisade_policy::Loaded;
use palisade_policy::diag::DiagnosticKind;
use palisade_policy::eval::{Flow, explain, render_explanation};
use palisade_policy::model::ExternalAppliance;

fn load_with(policy: &str) -> Loaded {
    let vms = [chain_policy::WEB_1, &chain_policy::appliance_vm("ips-1", 3)];
    chain_policy::load_with(&chain_policy::inventory("vni: 5000", &vms), policy)
}

const GOOD: &str = r#"
service_chains:
  ns-ext:
    on_failure: closed
    stages:
      - appliances: [{ vm: ips-1, in: ips-1.in, out: ips-1.out }]
      - appliances:
          - { external: { address: 192.0.2.10, vni_in: 7001, vni_out: 7002 } }
          - { external: { address: 192.0.2.11, vni_in: 7001, vni_out: 7002 } }
rules:
  zone:web:
    - { id: web-in, from: internet, to: web, service: tcp/80, action: allow, redirect: ns-ext }
"#;

#[test]
fn an_external_instance_loads_with_its_address_and_vnis_and_names_made_from_them() {
    let l = load_with(GOOD);
    assert!(!l.has_errors(), "{}", l.render());
    let chain = l.model.policy.service_chain("ns-ext").unwrap();
    assert_eq!(chain.stages.len(), 2);
    assert_eq!(chain.stages[0].appliances[0].external, None, "a VM instance stays one");
    let ext: Vec<_> = chain.stages[1].appliances.iter().collect();
    assert_eq!(
        ext[0].external,
        Some(ExternalAppliance {
            address: "192.0.2.10".parse().unwrap(),
            vni_in: 7001,
            vni_out: 7002,
        })
    );
    // The same VNIs at another address are another instance.
    assert_eq!(ext[1].external.unwrap().address.to_string(), "192.0.2.11");
    assert_eq!(
        (ext[0].vm.as_str(), ext[0].vnic_in.as_str(), ext[0].vnic_out.as_str()),
        ("192.0.2.10", "192.0.2.10 vni 7001", "192.0.2.10 vni 7002")
    );
    // What the model serialises (the JSON forms): the external block, and no
    // external key on a VM instance.
    let json = serde_json::to_value(chain).unwrap();
    assert_eq!(
        json["stages"][1]["appliances"][0]["external"],
        serde_json::json!({ "address": "192.0.2.10", "vni_in": 7001, "vni_out": 7002 })
    );
    assert!(json["stages"][0]["appliances"][0].get("external").is_none());
}

#[test]
fn explain_shows_an_external_instance_by_address_and_vnis() {
    let l = load_with(GOOD);
    let f = Flow::to_service("203.0.113.9".parse().unwrap(), "10.0.0.1".parse().unwrap(), "tcp/80").unwrap();
    let text = render_explanation(&explain(&l.model, &f));
    assert!(
        text.contains(
            "stage 2: one of [external 192.0.2.10 (vni 7001 -> vni 7002), external 192.0.2.11 (vni 7001 -> vni 7002)]"
        ),
        "{text}"
    );
}

/// Each bad external appliance, the diagnostic kind it must produce, and
/// where: the line of pol.yaml and the text the column must point at.
#[test]
fn bad_external_appliances_are_refused_where_they_are_written() {
    let chain = |body: &str| format!("service_chains:\n  c:\n    appliances:\n      - {body}\n");
    let cases: Vec<(&str, String, DiagnosticKind, (u32, &str))> = vec![
        (
            "not an address",
            chain("{ external: { address: fw.example, vni_in: 7001, vni_out: 7002 } }"),
            DiagnosticKind::InvalidValue,
            (4, "fw.example"),
        ),
        (
            "an IPv6 address",
            chain("{ external: { address: \"2001:db8::1\", vni_in: 7001, vni_out: 7002 } }"),
            DiagnosticKind::InvalidValue,
            (4, "\"2001:db8::1\""),
        ),
        (
            "a multicast address",
            chain("{ external: { address: 239.1.1.1, vni_in: 7001, vni_out: 7002 } }"),
            DiagnosticKind::InvalidValue,
            (4, "239.1.1.1"),
        ),
        (
            "the unspecified address",
            chain("{ external: { address: 0.0.0.0, vni_in: 7001, vni_out: 7002 } }"),
            DiagnosticKind::InvalidValue,
            (4, "0.0.0.0"),
        ),
        (
            "VNI past 24 bits",
            chain("{ external: { address: 192.0.2.10, vni_in: 16777216, vni_out: 7002 } }"),
            DiagnosticKind::InvalidValue,
            (4, "16777216"),
        ),
        (
            "VNI zero",
            chain("{ external: { address: 192.0.2.10, vni_in: 7001, vni_out: 0 } }"),
            DiagnosticKind::InvalidValue,
            (4, "0 }"),
        ),
        (
            "a VNI that is a VNI zone's",
            chain("{ external: { address: 192.0.2.10, vni_in: 5000, vni_out: 7002 } }"),
            DiagnosticKind::InvalidValue,
            (4, "5000"),
        ),
        (
            "a VNI that is a VLAN zone's id",
            chain("{ external: { address: 192.0.2.10, vni_in: 7001, vni_out: 100 } }"),
            DiagnosticKind::InvalidValue,
            (4, "100"),
        ),
        (
            "in and out the same VNI",
            chain("{ external: { address: 192.0.2.10, vni_in: 7001, vni_out: 7001 } }"),
            DiagnosticKind::InvalidValue,
            (4, "7001 }"),
        ),
        (
            "the same instance twice",
            "service_chains:\n  c:\n    appliances:\n      - { external: { address: 192.0.2.10, vni_in: 7001, vni_out: 7002 } }\n      - { external: { address: 192.0.2.10, vni_in: 7001, vni_out: 7002 } }\n".to_string(),
            DiagnosticKind::InvalidValue,
            (5, "7001"),
        ),
        (
            "an (address, VNI) in two chains",
            "service_chains:\n  a: { appliances: [{ external: { address: 192.0.2.10, vni_in: 7001, vni_out: 7002 } }] }\n  b: { appliances: [{ external: { address: 192.0.2.10, vni_in: 7003, vni_out: 7001 } }] }\n".to_string(),
            DiagnosticKind::InvalidValue,
            (3, "7001"),
        ),
        (
            "both a VM and external",
            chain("{ vm: ips-1, external: { address: 192.0.2.10, vni_in: 7001, vni_out: 7002 } }"),
            DiagnosticKind::InvalidValue,
            (4, "ips-1"),
        ),
        (
            "no vni_out",
            chain("{ external: { address: 192.0.2.10, vni_in: 7001 } }"),
            DiagnosticKind::MissingField,
            (4, "{ address"),
        ),
        (
            "unknown key",
            chain("{ external: { address: 192.0.2.10, vni_in: 7001, vni_out: 7002, port: 4789 } }"),
            DiagnosticKind::UnknownKey,
            (4, "port"),
        ),
    ];
    for (what, policy, kind, (line, token)) in &cases {
        chain_policy::assert_refused_at(&load_with(policy), what, policy, *kind, (*line, token));
    }
    // Distinct VNIs at one address, and one VNI at two addresses, are fine.
    let l = load_with(&chain(
        "{ external: { address: 192.0.2.10, vni_in: 7001, vni_out: 7002 } }\n      - { external: { address: 192.0.2.10, vni_in: 7003, vni_out: 7004 } }",
    ));
    assert!(!l.has_errors(), "{}", l.render());
}

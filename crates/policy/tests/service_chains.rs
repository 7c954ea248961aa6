//! Service chains: `service_chains:` and a rule's `redirect`, loaded with
//! positioned diagnostics, compiled into the entries, and shown by `explain`.

#[path = "support/chain_policy.rs"]
mod chain_policy;

use palisade_policy::Loaded;
use palisade_policy::compile::Compiler;
use palisade_policy::diag::DiagnosticKind;
use palisade_policy::eval::{Flow, evaluate, explain, render_explanation};
use palisade_policy::model::OnFailure;

fn load_with(policy: &str) -> Loaded {
    let ips = chain_policy::appliance_vm("ips-1", 3);
    let fw = chain_policy::appliance_vm("fw-1", 5);
    let vms = [chain_policy::WEB_1, chain_policy::WEB_2, &ips, &fw];
    chain_policy::load_with(&chain_policy::inventory("vlan: 900", &vms), policy)
}

const GOOD: &str = r#"
service_chains:
  ns-ips:
    on_failure: open
    appliances:
      - { vm: ips-1, in: ips-1.in, out: ips-1.out }
rules:
  zone:web:
    - { id: web-in, from: internet, to: web, service: tcp/80, action: allow, redirect: ns-ips }
    - { id: web-east-west, from: web, to: web, service: tcp/80, action: allow }
"#;

fn flow(src: &str, dst: &str) -> Flow {
    Flow::to_service(src.parse().unwrap(), dst.parse().unwrap(), "tcp/80").unwrap()
}

#[test]
fn chains_load_and_redirect_compiles_into_the_entries() {
    let l = load_with(GOOD);
    assert!(!l.has_errors(), "{}", l.render());
    let chain = l.model.policy.service_chain("ns-ips").unwrap();
    assert_eq!(chain.on_failure, OnFailure::Open);
    assert_eq!(chain.stages.len(), 1, "the one-stage form");
    assert_eq!(chain.stages[0].appliances.len(), 1);
    assert_eq!(
        (
            chain.stages[0].appliances[0].vnic_in.as_str(),
            chain.stages[0].appliances[0].vnic_out.as_str()
        ),
        ("ips-1.in", "ips-1.out")
    );
    let c = Compiler::new(l.model.clone()).unwrap();
    let ingress = c.chain("web-1.0", palisade_policy::eval::Direction::Ingress).unwrap();
    let steered: Vec<_> = ingress
        .entries
        .iter()
        .filter_map(|e| e.redirect.as_deref().map(|r| (&*e.provenance.rule_id, r)))
        .collect();
    assert_eq!(steered, [("web-in", "ns-ips")]);
    assert!(ingress.render().contains("redirect=ns-ips"), "{}", ingress.render());

    // North-south is steered, east-west is not; evaluator and compiler agree.
    let ns = flow("203.0.113.9", "10.0.0.1");
    let ew = flow("10.0.0.2", "10.0.0.1");
    for f in [ns, ew] {
        assert_eq!(evaluate(&l.model, &f), c.decide(&f), "{f:?}");
    }
    assert_eq!(evaluate(&l.model, &ns).unwrap().redirect.as_deref(), Some("ns-ips"));
    assert_eq!(evaluate(&l.model, &ew).unwrap().redirect, None);
}

#[test]
fn explain_names_the_chain_and_its_instances() {
    let l = load_with(GOOD);
    let e = explain(&l.model, &flow("203.0.113.9", "10.0.0.1"));
    assert_eq!(e.chain.as_ref().map(|c| c.name.as_str()), Some("ns-ips"));
    let text = render_explanation(&e);
    assert!(
        text.contains("redirect: through service chain ns-ips, one of [ips-1 (ips-1.in -> ips-1.out)]"),
        "{text}"
    );
    assert!(text.contains("on_failure open"), "{text}");
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["decision"]["redirect"], "ns-ips");
    assert_eq!(json["chain"]["on_failure"], "open");
    // A flow that is not steered says nothing of chains.
    let e = explain(&l.model, &flow("10.0.0.2", "10.0.0.1"));
    assert!(!render_explanation(&e).contains("redirect"));
    assert!(serde_json::to_value(&e).unwrap().get("chain").is_none());
}

/// Each bad policy, the diagnostic kind it must produce, and where: the
/// line of pol.yaml and the text the diagnostic's column must point at.
#[test]
fn bad_chains_are_refused_where_they_are_written() {
    let cases: &[(&str, &str, DiagnosticKind, (u32, &str))] = &[
        (
            "unknown chain",
            "rules:\n  zone:web:\n    - { id: r, from: internet, to: web, action: allow, redirect: nope }\n",
            DiagnosticKind::UnknownServiceChain,
            (3, "nope"),
        ),
        (
            "a deny that redirects",
            "service_chains:\n  c: { appliances: [{ vm: ips-1, in: ips-1.in, out: ips-1.out }] }\nrules:\n  zone:web:\n    - { id: r, from: internet, to: web, action: deny, redirect: c }\n",
            DiagnosticKind::InvalidValue,
            (5, "c }"),
        ),
        (
            "appliance VM missing",
            "service_chains:\n  c: { appliances: [{ vm: ghost, in: g.0, out: g.1 }] }\n",
            DiagnosticKind::UnknownVm,
            (2, "ghost"),
        ),
        (
            "vNIC of another VM",
            "service_chains:\n  c: { appliances: [{ vm: ips-1, in: web-1.0, out: ips-1.out }] }\n",
            DiagnosticKind::InvalidValue,
            (2, "web-1.0"),
        ),
        (
            "in and out the same",
            "service_chains:\n  c: { appliances: [{ vm: ips-1, in: ips-1.in, out: ips-1.in }] }\n",
            DiagnosticKind::InvalidValue,
            (2, "ips-1.in }"),
        ),
        (
            "a vNIC in two chains",
            "service_chains:\n  a: { appliances: [{ vm: ips-1, in: ips-1.in, out: ips-1.out }] }\n  b: { appliances: [{ vm: ips-1, in: ips-1.in, out: ips-1.out }] }\n",
            DiagnosticKind::InvalidValue,
            (3, "ips-1.in"),
        ),
        (
            "no appliance",
            "service_chains:\n  c: { appliances: [] }\n",
            DiagnosticKind::MissingField,
            (2, "[]"),
        ),
        (
            "bad on_failure",
            "service_chains:\n  c: { on_failure: maybe, appliances: [{ vm: ips-1, in: ips-1.in, out: ips-1.out }] }\n",
            DiagnosticKind::InvalidValue,
            (2, "maybe"),
        ),
        (
            "probe interval too short",
            "service_chains:\n  c: { probe: { interval_ms: 10 }, appliances: [{ vm: ips-1, in: ips-1.in, out: ips-1.out }] }\n",
            DiagnosticKind::InvalidValue,
            (2, "10 }"),
        ),
        (
            "probe down_after zero",
            "service_chains:\n  c: { probe: { down_after: 0 }, appliances: [{ vm: ips-1, in: ips-1.in, out: ips-1.out }] }\n",
            DiagnosticKind::InvalidValue,
            (2, "0 }"),
        ),
        (
            "unknown key in a probe",
            "service_chains:\n  c: { probe: { every: 3 }, appliances: [{ vm: ips-1, in: ips-1.in, out: ips-1.out }] }\n",
            DiagnosticKind::UnknownKey,
            (2, "every"),
        ),
        (
            "unknown key in an appliance",
            "service_chains:\n  c: { appliances: [{ vm: ips-1, in: ips-1.in, out: ips-1.out, port: 3 }] }\n",
            DiagnosticKind::UnknownKey,
            (2, "port"),
        ),
        (
            "both stages and appliances",
            "service_chains:\n  c: { appliances: [{ vm: ips-1, in: ips-1.in, out: ips-1.out }], stages: [] }\n",
            DiagnosticKind::InvalidValue,
            (2, "[{ vm"),
        ),
        (
            "neither stages nor appliances",
            "service_chains:\n  c: { on_failure: open }\n",
            DiagnosticKind::MissingField,
            (2, "{ on_failure"),
        ),
        (
            "no stage",
            "service_chains:\n  c: { stages: [] }\n",
            DiagnosticKind::MissingField,
            (2, "[]"),
        ),
        (
            "a stage without appliances",
            "service_chains:\n  c:\n    stages:\n      - { appliances: [{ vm: fw-1, in: fw-1.in, out: fw-1.out }] }\n      - { appliances: [] }\n",
            DiagnosticKind::MissingField,
            (5, "[]"),
        ),
        (
            "a stage with no appliances key",
            "service_chains:\n  c: { stages: [{ description: x }] }\n",
            DiagnosticKind::MissingField,
            (2, "{ description"),
        ),
        (
            "unknown key in a stage",
            "service_chains:\n  c: { stages: [{ appliances: [{ vm: fw-1, in: fw-1.in, out: fw-1.out }], name: x }] }\n",
            DiagnosticKind::UnknownKey,
            (2, "name"),
        ),
        (
            "five stages",
            "service_chains:\n  c:\n    stages:\n      - { appliances: [{ vm: g1, in: a, out: b }] }\n      - { appliances: [{ vm: g2, in: a, out: b }] }\n      - { appliances: [{ vm: g3, in: a, out: b }] }\n      - { appliances: [{ vm: g4, in: a, out: b }] }\n      - { appliances: [{ vm: g5, in: a, out: b }] }\n",
            DiagnosticKind::InvalidValue,
            (8, "{ appliances"),
        ),
        (
            "a vNIC in two stages of one chain",
            "service_chains:\n  c:\n    stages:\n      - { appliances: [{ vm: ips-1, in: ips-1.in, out: ips-1.out }] }\n      - { appliances: [{ vm: ips-1, in: ips-1.in, out: ips-1.out }] }\n",
            DiagnosticKind::InvalidValue,
            (5, "ips-1.in"),
        ),
        (
            "chain declared twice",
            "service_chains:\n  c: { appliances: [{ vm: ips-1, in: ips-1.in, out: ips-1.out }] }\n---\nservice_chains:\n  c: { appliances: [{ vm: web-2, in: web-2.0, out: web-2.0 }] }\n",
            DiagnosticKind::DuplicateName,
            (5, "c:"),
        ),
    ];
    // An appliance side with addresses: legal, but its own traffic cannot pass.
    let l = load_with("service_chains:\n  c: { appliances: [{ vm: web-1, in: web-1.0, out: web-1.0 }] }\n");
    assert!(
        l.diagnostics
            .iter()
            .any(|d| !d.is_error() && d.message.contains("appliance vNIC \"web-1.0\" has addresses")),
        "{}",
        l.render()
    );
    for (what, policy, kind, (line, token)) in cases {
        chain_policy::assert_refused_at(&load_with(policy), what, policy, *kind, (*line, token));
    }
}

#[test]
fn a_chain_is_probed_by_default_and_its_probe_can_be_tuned_or_turned_off() {
    use palisade_policy::model::ChainProbe;
    let l = load_with(GOOD);
    assert_eq!(
        l.model.policy.service_chain("ns-ips").unwrap().probe,
        Some(ChainProbe::default())
    );
    let tuned = GOOD.replace(
        "    on_failure: open\n",
        "    on_failure: open\n    probe: { interval_ms: 200, down_after: 5 }\n",
    );
    let l = load_with(&tuned);
    assert!(!l.has_errors(), "{}", l.render());
    assert_eq!(
        l.model.policy.service_chain("ns-ips").unwrap().probe,
        Some(ChainProbe {
            interval_ms: 200,
            down_after: 5,
            up_after: 2
        })
    );
    let off = GOOD.replace("    on_failure: open\n", "    on_failure: open\n    probe: off\n");
    let l = load_with(&off);
    assert!(!l.has_errors(), "{}", l.render());
    assert_eq!(l.model.policy.service_chain("ns-ips").unwrap().probe, None);
    assert!(explain_text(&off).contains("probe: off"));
    assert!(explain_text(&tuned).contains("probed every 200 ms"));
}

fn explain_text(policy: &str) -> String {
    let l = load_with(policy);
    let e = explain(&l.model, &flow("203.0.113.9", "10.0.0.1"));
    render_explanation(&e)
}

const TWO_STAGES: &str = r#"
service_chains:
  ns:
    on_failure: open
    stages:
      - appliances: [{ vm: fw-1, in: fw-1.in, out: fw-1.out }]
      - appliances: [{ vm: ips-1, in: ips-1.in, out: ips-1.out }]
rules:
  zone:web:
    - { id: web-in, from: internet, to: web, service: tcp/80, action: allow, redirect: ns }
"#;

#[test]
fn stages_load_in_order_and_the_one_stage_form_is_one_stage() {
    let l = load_with(TWO_STAGES);
    assert!(!l.has_errors(), "{}", l.render());
    let chain = l.model.policy.service_chain("ns").unwrap();
    let vms: Vec<Vec<&str>> = chain
        .stages
        .iter()
        .map(|s| s.appliances.iter().map(|a| a.vm.as_str()).collect())
        .collect();
    assert_eq!(vms, [["fw-1"], ["ips-1"]]);
    assert_eq!(
        chain.appliances().map(|a| a.vm.as_str()).collect::<Vec<_>>(),
        ["fw-1", "ips-1"]
    );
    // `appliances:` alone and a `stages:` of one are the same chain.
    let flat = load_with(GOOD);
    let staged = load_with(&GOOD.replace(
        "    appliances:\n      - { vm: ips-1, in: ips-1.in, out: ips-1.out }\n",
        "    stages:\n      - appliances: [{ vm: ips-1, in: ips-1.in, out: ips-1.out }]\n",
    ));
    assert!(!staged.has_errors(), "{}", staged.render());
    let shape = |l: &Loaded| -> Vec<Vec<(String, String, String)>> {
        l.model
            .policy
            .service_chain("ns-ips")
            .unwrap()
            .stages
            .iter()
            .map(|s| {
                s.appliances
                    .iter()
                    .map(|a| (a.vm.clone(), a.vnic_in.clone(), a.vnic_out.clone()))
                    .collect()
            })
            .collect()
    };
    assert_eq!(shape(&flat), shape(&staged));
    assert_eq!(shape(&flat).len(), 1);
    // Four stages are allowed (five are refused, above).
    let four: String = (1..=4)
        .map(|n| format!("      - {{ appliances: [{{ vm: g{n}, in: a, out: b }}] }}\n"))
        .collect();
    let l = load_with(&format!("service_chains:\n  c:\n    stages:\n{four}"));
    assert_eq!(l.model.policy.service_chain("c").unwrap().stages.len(), 4);
    assert!(
        !l.diagnostics.iter().any(|d| d.message.contains("stages")),
        "{}",
        l.render()
    );
}

#[test]
fn explain_lists_the_stages_in_order() {
    let l = load_with(TWO_STAGES);
    let e = explain(&l.model, &flow("203.0.113.9", "10.0.0.1"));
    let text = render_explanation(&e);
    assert!(
        text.contains(
            "redirect: through service chain ns, 2 stages, in this order for the initiator's packets and in \
             reverse for the responder's: stage 1: one of [fw-1 (fw-1.in -> fw-1.out)]; stage 2: one of \
             [ips-1 (ips-1.in -> ips-1.out)]"
        ),
        "{text}"
    );
    assert!(text.contains("on_failure open: that stage is skipped"), "{text}");
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["chain"]["stages"][1]["appliances"][0]["vm"], "ips-1");
}

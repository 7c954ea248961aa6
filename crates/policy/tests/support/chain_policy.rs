//! What the service-chain tests (`service_chains.rs`,
//! `external_appliances.rs`) share: their inventory, built from the web
//! VMs and the appliance VMs each needs, loaded with a policy, and the check
//! that a bad policy is refused with a diagnostic where it is written.

// Each test file uses a part of this.
#![allow(dead_code)]

use palisade_policy::diag::DiagnosticKind;
use palisade_policy::{Loaded, MemorySource, load};

/// web-1 and web-2, in zone `web`.
pub const WEB_1: &str = r#"  - { name: web-1, uuid: 00000000-0000-4000-8000-000000000001, tags: { tier: web }, vnics: [{ name: web-1.0, mac: "02:00:00:00:00:01", ips: [10.0.0.1], zone: web }] }
"#;
pub const WEB_2: &str = r#"  - { name: web-2, uuid: 00000000-0000-4000-8000-000000000002, tags: { tier: web }, vnics: [{ name: web-2.0, mac: "02:00:00:00:00:02", ips: [10.0.0.2], zone: web }] }
"#;

/// An appliance VM `name` with two vNICs `name.in` and `name.out` in zone
/// `svc`, without addresses; `n` (odd, from 3) numbers its UUID and its MACs
/// (`n` and `n + 1`).
pub fn appliance_vm(name: &str, n: u8) -> String {
    format!(
        r#"  - name: {name}
    uuid: 00000000-0000-4000-8000-{n:012x}
    vnics:
      - {{ name: {name}.in, mac: "02:00:00:00:00:{n:02x}", ips: [], zone: svc }}
      - {{ name: {name}.out, mac: "02:00:00:00:00:{:02x}", ips: [], zone: svc }}
"#,
        n + 1
    )
}

/// An inventory of zone `web` (VLAN 100) and zone `svc` (its segment
/// `svc_segment`, such as `vlan: 900`), the VMs `vms` (entries of a `vms:`
/// list), group `web` (tier web) and group `internet` (external).
pub fn inventory(svc_segment: &str, vms: &[&str]) -> String {
    format!(
        "\nversion: 4\ndatacenter: {{ name: dc1, default: deny }}\nzones: [{{ name: web, vlan: 100 }}, {{ name: svc, {svc_segment} }}]\n\
         vms:\n{}groups:\n  web: {{ tags: {{ tier: web }} }}\n  internet: external\n",
        vms.concat()
    )
}

/// `inventory` as inv.yaml and `policy` as pol.yaml, loaded.
pub fn load_with(inventory: &str, policy: &str) -> Loaded {
    load(&MemorySource::new().with("inv.yaml", inventory).with("pol.yaml", policy)).unwrap()
}

/// `loaded` (of pol.yaml `policy`) has an error of `kind` in pol.yaml at
/// line `line`, its column at the first `token` of that line; `what` names
/// the case in a failure.
pub fn assert_refused_at(loaded: &Loaded, what: &str, policy: &str, kind: DiagnosticKind, (line, token): (u32, &str)) {
    let text = policy.lines().nth(line as usize - 1).unwrap();
    let column = text.find(token).unwrap() as u32 + 1;
    let found = loaded
        .diagnostics
        .iter()
        .find(|d| d.kind == kind && d.file == "pol.yaml" && d.is_error());
    let Some(d) = found else {
        panic!("{what}: no {kind:?} error in\n{}", loaded.render());
    };
    assert_eq!((d.line, d.column), (line, column), "{what}: {}", loaded.render());
}

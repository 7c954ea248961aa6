//! Agent configuration files and generated lab policies.
//!
//! The agent configuration format is fixed by the agent (`palisade agent
//! --config FILE`), so it is written by hand here rather than through a TOML
//! library: the output is small, and its exact shape is part of the contract.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::plan::{Plan, VXLAN_PORT, VnicPlan};

/// Quote a TOML basic string.
fn tq(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(o, "\\u{:04X}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// A TOML key: bare when it can be, quoted otherwise.
fn tk(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        s.to_string()
    } else {
        tq(s)
    }
}

/// Turn a standalone agent configuration into one that takes its policy from
/// the controller at `url` over mutual TLS (certificates `<ca_dir>/<host>.pem`/`.key`).
pub fn with_controller(config: &str, url: &str, ca: &Path, ca_dir: &Path, host: &str) -> String {
    let mut out = String::new();
    for line in config.lines() {
        if line.starts_with("policy = ") {
            continue;
        }
        if line == "[underlay]" {
            let _ = writeln!(out, "[controller]");
            let _ = writeln!(out, "servers = [{}]", tq(url));
            let _ = writeln!(out, "ca = {}", tq(&ca.to_string_lossy()));
            let _ = writeln!(
                out,
                "cert = {}",
                tq(&ca_dir.join(format!("{host}.pem")).to_string_lossy())
            );
            let _ = writeln!(
                out,
                "key = {}",
                tq(&ca_dir.join(format!("{host}.key")).to_string_lossy())
            );
            let _ = writeln!(out);
        }
        let _ = writeln!(out, "{line}");
    }
    out
}

/// The link to a QEMU guest's QMP socket by which `host`'s agent finds it:
/// `<state_dir>/qemu/<vm>@<host>.qmp`.
pub fn qmp_link(state_dir: &Path, vm: &str, host: &str) -> PathBuf {
    state_dir.join("qemu").join(format!("{vm}@{host}.qmp"))
}

/// Where a destination QEMU started for a migration to `to` listens:
/// `<state_dir>/qemu/<vm>@<to>.incoming` (a Unix socket both hosts'
/// namespaces reach: they share the file system).
pub fn incoming_socket(state_dir: &Path, vm: &str, to: &str) -> PathBuf {
    state_dir.join("qemu").join(format!("{vm}@{to}.incoming"))
}

/// The `[migration]` section of `host`'s agent in a lab with a controller:
/// the agent drives its guests' QEMU over QMP ([`qmp_link`]), migrates to
/// the destination's [`incoming_socket`] and hands the state to the
/// destination agent's control socket.
pub fn migration_section(state_dir: &Path, host: &str) -> String {
    let qdir = state_dir.join("qemu");
    let d = |p: PathBuf| p.to_string_lossy().into_owned();
    format!(
        "\n[migration]\nqmp = {}\nincoming = {}\npeer_control = {}\n",
        tq(&d(qdir.join(format!("{{vm}}@{host}.qmp")))),
        tq(&format!("unix:{}", d(qdir.join("{vm}@{to}.incoming")))),
        tq(&d(state_dir.join("{to}").join("agent.sock"))),
    )
}

/// The port each lab agent takes migration state from its peers on
/// (mutual TLS, on its underlay address).
pub const MIGRATION_PORT: u16 = 7430;

/// The agent-to-agent state channel's lines of `host`'s `[migration]`
/// section (after [`migration_section`]): it listens on its underlay
/// address, and names every other host's listener, so migrations between
/// lab hosts move the state over mutual TLS (pre-copy and delta).
pub fn migration_channel(plan: &Plan, host: &str) -> String {
    let mut o = String::new();
    if let Some(h) = plan.host(host) {
        let _ = writeln!(o, "listen = {}", tq(&format!("{}:{MIGRATION_PORT}", h.underlay_ip)));
    }
    let peers: Vec<String> = plan
        .hosts
        .iter()
        .filter(|p| p.name != host)
        .map(|p| {
            format!(
                "{} = {}",
                tk(&p.name),
                tq(&format!("{}:{MIGRATION_PORT}", p.underlay_ip))
            )
        })
        .collect();
    let _ = writeln!(o, "peers = {{ {} }}", peers.join(", "));
    o
}

/// Datapath workers of each lab agent.
pub const LAB_WORKERS: usize = 2;

/// Queue pairs of a QEMU guest's vhost-user NIC in the lab (its one CPU drives one).
pub const QEMU_QUEUE_PAIRS: u16 = 1;

/// The vhost-user socket of a QEMU guest's vNIC: `<state_dir>/vhost/<host_if>.sock`
/// (the host-side name is unique per host, and short).
pub fn vhost_user_socket(state_dir: &Path, nic: &VnicPlan) -> PathBuf {
    state_dir.join("vhost").join(format!("{}.sock", nic.host_if))
}

/// The vhost-user socket of `nic` on `host`, for a VM whose inventory host
/// is `home`: the usual one there ([`vhost_user_socket`]), and
/// `<state_dir>/vhost/<host>-<host_if>.sock` on a host the vNIC is
/// pre-staged on, so the two agents never share a path.
pub fn vhost_user_socket_on(state_dir: &Path, nic: &VnicPlan, home: &str, host: &str) -> PathBuf {
    if home == host {
        vhost_user_socket(state_dir, nic)
    } else {
        state_dir.join("vhost").join(format!("{host}-{}.sock", nic.host_if))
    }
}

/// An agent configuration's `[inspect]` section naming `rules`.
pub fn inspect_section(rules: &Path) -> String {
    format!("\n[inspect]\nrules = {}\n", tq(&rules.to_string_lossy()))
}

/// The configuration of `host`'s agent, or `None` if the plan has no such host.
pub fn agent_config(plan: &Plan, host: &str, policy_dir: &Path, state_dir: &Path) -> Option<String> {
    let h = plan.host(host)?;
    let mut o = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(o, "host = {}", tq(&h.name));
    let _ = writeln!(o, "policy = {}", tq(&policy_dir.to_string_lossy()));
    let _ = writeln!(o, "state_dir = {}", tq(&state_dir.join(&h.name).to_string_lossy()));
    let _ = writeln!(o, "metrics = {}", tq(&h.metrics));
    let _ = writeln!(
        o,
        "audit = {}",
        tq(&state_dir.join(&h.name).join("audit").to_string_lossy())
    );
    // The trail's key and its published head live beside it, never in it.
    let _ = writeln!(
        o,
        "audit_key = {}",
        tq(&state_dir.join(&h.name).join("audit.key").to_string_lossy())
    );
    let _ = writeln!(
        o,
        "audit_head = {}",
        tq(&state_dir.join(&h.name).join("audit.head").to_string_lossy())
    );
    // Two datapath workers whatever the machine: the kernel's flow steering
    // between workers is exercised everywhere, and a lab on a many-core
    // machine does not start a worker per core on every host.
    let _ = writeln!(o, "workers = {LAB_WORKERS}");
    let _ = writeln!(o, "\n[underlay]");
    let _ = writeln!(o, "local = {}", tq(&h.underlay_ip.to_string()));
    let _ = writeln!(o, "port = {VXLAN_PORT}");
    let peers: Vec<String> = plan
        .hosts
        .iter()
        .filter(|p| p.name != h.name)
        .map(|p| format!("{} = {}", tk(&p.name), tq(&p.underlay_ip.to_string())))
        .collect();
    if peers.is_empty() {
        let _ = writeln!(o, "peers = {{}}");
    } else {
        let _ = writeln!(o, "peers = {{ {} }}", peers.join(", "));
    }
    // The VMs of this host, then those pre-staged here (they may migrate in).
    let here = plan.vms.iter().filter(|v| v.host == h.name);
    let staged = plan.vms.iter().filter(|v| v.standby.contains(&h.name));
    for vm in here.chain(staged) {
        for nic in &vm.vnics {
            let _ = writeln!(o, "\n[[vnic]]");
            let _ = writeln!(o, "name = {}", tq(&nic.name));
            if plan.on_vhost_user(vm) {
                let socket = vhost_user_socket_on(state_dir, nic, &vm.host, &h.name);
                let _ = writeln!(o, "vhost_user = {}", tq(&socket.to_string_lossy()));
                // One pair, as the guest has one CPU; the agent's other
                // worker takes its frames through the agent's hand-off.
                let _ = writeln!(o, "queue_pairs = {QEMU_QUEUE_PAIRS}");
            } else {
                let _ = writeln!(o, "interface = {}", tq(&nic.host_if));
            }
        }
    }
    for z in plan.zones.iter().filter(|z| z.host == h.name) {
        let _ = writeln!(o, "\n[[appliance]]");
        let _ = writeln!(o, "name = {}", tq(&z.appliance));
        let _ = writeln!(o, "interface = {}", tq(&z.host_if));
        let _ = writeln!(o, "zone = {}", tq(&z.name));
        let _ = writeln!(o, "mac = {}", tq(&z.mac));
    }
    Some(o)
}

/// Zones of generated labs: name, VLAN, third octet of `10.X.0.0/24`.
const GEN_ZONES: [(&str, u16, u8); 2] = [("blue", 10, 10), ("green", 20, 20)];

/// The inventory and policy YAML of a generated lab: `hosts` hosts `hv1…`,
/// `vms_per_host` VMs on each (`vm1…`, host by host), alternating between
/// zones `blue` (VLAN 10, 10.10.0.0/24) and `green` (VLAN 20, 10.20.0.0/24).
/// The policy allows ICMP and tcp/80 between all lab VMs, within and across
/// zones; the datacenter default denies everything else. Both zones fail
/// closed (`on_failure: closed`).
pub fn generated_yaml(hosts: usize, vms_per_host: usize) -> Result<(String, String), String> {
    generated_yaml_with(hosts, vms_per_host, &[])
}

/// [`generated_yaml`], the zones named in `open_zones` (`blue`, `green`)
/// failing open (`on_failure: open`) instead.
pub fn generated_yaml_with(hosts: usize, vms_per_host: usize, open_zones: &[&str]) -> Result<(String, String), String> {
    if let Some(z) = open_zones.iter().find(|z| !GEN_ZONES.iter().any(|(n, _, _)| n == *z)) {
        return Err(format!("zone {z:?}: a generated lab has zones blue and green"));
    }
    if hosts == 0 || hosts > 250 {
        return Err(format!("{hosts} hosts: use 1 to 250"));
    }
    let total = hosts * vms_per_host;
    // Each zone holds about half the VMs, at .10 upwards of its /24.
    if total.div_ceil(2) > 240 {
        return Err(format!("{total} VMs: at most 480 (240 per zone)"));
    }
    let mut inv = String::new();
    let _ = writeln!(
        inv,
        "# Generated by `palisade lab up --hosts {hosts} --vms {vms_per_host}`."
    );
    let _ = writeln!(inv, "datacenter: {{ name: lab, default: deny }}");
    let host_list: Vec<String> = (1..=hosts).map(|h| format!("hv{h}")).collect();
    let _ = writeln!(inv, "clusters:\n  - {{ name: lab, hosts: [{}] }}", host_list.join(", "));
    let _ = writeln!(inv, "zones:");
    for (name, vlan, _) in GEN_ZONES {
        let mode = if open_zones.contains(&name) { "open" } else { "closed" };
        let _ = writeln!(
            inv,
            "  - {{ name: {name}, vlan: {vlan}, default: deny, on_failure: {mode} }}"
        );
    }
    let _ = writeln!(inv, "vms:");
    let mut per_zone = [0u32; 2];
    for i in 0..total {
        let z = i % 2;
        let (zone, _, octet) = GEN_ZONES[z];
        let k = per_zone[z] + 10;
        per_zone[z] += 1;
        let host = i / vms_per_host.max(1) + 1;
        let _ = writeln!(inv, "  - name: vm{}", i + 1);
        let _ = writeln!(inv, "    uuid: 00000000-0000-4000-8000-{:012x}", i + 1);
        let _ = writeln!(inv, "    cluster: lab\n    host: hv{host}");
        let _ = writeln!(inv, "    tags: {{ zone: {zone} }}");
        let _ = writeln!(
            inv,
            "    vnics:\n      - {{ name: vm{n}.0, mac: \"02:00:0a:{octet:02x}:00:{k:02x}\", ips: [10.{octet}.0.{k}], zone: {zone} }}",
            n = i + 1
        );
    }
    let policy = "\
# Generated lab policy: ICMP and HTTP between lab VMs, within and across
# zones; the datacenter default (deny) drops everything else.
version: 1
groups:
  lab-vms: { cluster: lab }
services:
  icmp-any: icmp
  http: tcp/80
rules:
  datacenter:
    - { id: lab-icmp, from: lab-vms, to: lab-vms, service: icmp-any, action: allow }
    - { id: lab-http, from: lab-vms, to: lab-vms, service: http, action: allow }
"
    .to_string();
    Ok((inv, policy))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_quoting() {
        assert_eq!(tq("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(tq("x\ny"), "\"x\\u000Ay\"");
        assert_eq!(tk("hv-1_a"), "hv-1_a");
        assert_eq!(tk("hv.1"), "\"hv.1\"");
    }

    #[test]
    fn generated_policy_loads() {
        let (inv, pol) = generated_yaml(2, 3).unwrap();
        let src = palisade_policy::MemorySource::new()
            .with("inventory.yaml", &inv)
            .with("policy.yaml", &pol);
        let loaded = palisade_policy::load(&src).unwrap();
        assert!(!loaded.has_errors(), "{}", loaded.render());
        let m = &loaded.model;
        assert_eq!(m.inventory.vms.len(), 6);
        let zones: Vec<&str> = m.inventory.vms.iter().map(|v| v.vnics[0].zone.as_str()).collect();
        assert_eq!(zones, ["blue", "green", "blue", "green", "blue", "green"]);
        let hosts: Vec<&str> = m.inventory.vms.iter().filter_map(|v| v.host.as_deref()).collect();
        assert_eq!(hosts, ["hv1", "hv1", "hv1", "hv2", "hv2", "hv2"]);
        // ICMP and HTTP allowed across zones, anything else denied.
        use palisade_policy::eval::{Flow, evaluate};
        let a = "10.10.0.10".parse().unwrap();
        let b = "10.20.0.11".parse().unwrap();
        let verdict = |svc| evaluate(m, &Flow::to_service(a, b, svc).unwrap()).unwrap().action;
        assert_eq!(verdict("tcp/80"), palisade_policy::model::Action::Allow);
        assert_eq!(verdict("icmp/echo-request"), palisade_policy::model::Action::Allow);
        assert_eq!(verdict("tcp/22"), palisade_policy::model::Action::Deny);
        assert!(generated_yaml(0, 1).is_err());
        assert!(generated_yaml(1, 500).is_err());
        use palisade_policy::model::OnFailure;
        assert!(m.inventory.zones.iter().all(|z| z.on_failure == OnFailure::Closed));
    }

    #[test]
    fn generated_zones_fail_open_when_asked() {
        use palisade_policy::model::OnFailure;
        let (inv, pol) = generated_yaml_with(2, 2, &["blue"]).unwrap();
        let src = palisade_policy::MemorySource::new()
            .with("inventory.yaml", &inv)
            .with("policy.yaml", &pol);
        let m = palisade_policy::load(&src).unwrap().model;
        let mode = |z| m.inventory.zone(z).unwrap().on_failure;
        assert_eq!((mode("blue"), mode("green")), (OnFailure::Open, OnFailure::Closed));
        assert!(generated_yaml_with(2, 2, &["red"]).unwrap_err().contains("red"));
    }

    #[test]
    fn qemu_guests_on_vhost_user_get_a_socket_and_others_keep_their_interface() {
        let (inv, pol) = generated_yaml(1, 2).unwrap();
        let src = palisade_policy::MemorySource::new()
            .with("inventory.yaml", &inv)
            .with("policy.yaml", &pol);
        let inv = palisade_policy::load(&src).unwrap().model.inventory;
        let qemu = crate::plan::QemuMode::Vms(vec!["vm1".into()]);
        let mut plan = Plan::new("pl", &inv, &qemu).unwrap();
        let text = |plan: &Plan| agent_config(plan, "hv1", Path::new("/p"), Path::new("/s")).unwrap();
        // Tap (a state file from before vhost-user reads as this): interfaces only.
        let tap = text(&plan);
        assert_eq!(tap.matches("interface = ").count(), 2 + plan.zones.len(), "{tap}");
        assert!(!tap.contains("vhost_user"), "{tap}");
        plan.qemu_nic = crate::plan::QemuNic::VhostUser;
        let vhost = text(&plan);
        let nic = &plan.vms[0].vnics[0];
        let socket = vhost_user_socket(Path::new("/s"), nic);
        assert_eq!(socket, Path::new("/s/vhost").join(format!("{}.sock", nic.host_if)));
        assert!(
            vhost.contains(&format!("vhost_user = \"{}\"\nqueue_pairs = 1\n", socket.display())),
            "{vhost}"
        );
        assert!(!vhost.contains(&format!("interface = \"{}\"", nic.host_if)), "{vhost}");
        // vm2, a namespace VM, keeps its veth.
        assert!(
            vhost.contains(&format!("interface = \"{}\"", plan.vms[1].vnics[0].host_if)),
            "{vhost}"
        );
    }

    #[test]
    fn a_standby_vnic_is_attached_on_its_host_through_a_tap_of_its_own() {
        let (inv, pol) = generated_yaml(2, 1).unwrap();
        let src = palisade_policy::MemorySource::new()
            .with("inventory.yaml", &inv)
            .with("policy.yaml", &pol);
        let inv = palisade_policy::load(&src).unwrap().model.inventory;
        let qemu = crate::plan::QemuMode::Vms(vec!["vm1".into()]);
        let mut plan = Plan::new("pl", &inv, &qemu).unwrap();
        let refused = [("vm2", "hv1"), ("vm1", "hv1"), ("vm1", "hv9"), ("vm9", "hv2")];
        for (vm, host) in refused {
            assert!(plan.add_standby(vm, host).is_err(), "{vm}@{host}");
        }
        plan.add_standby("vm1", "hv2").unwrap();
        plan.add_standby("vm1", "hv2").unwrap();
        assert_eq!(plan.vm("vm1").unwrap().standby, ["hv2"]);
        let tap = &plan.vm("vm1").unwrap().vnics[0].host_if;
        let hv1 = agent_config(&plan, "hv1", Path::new("/p"), Path::new("/s")).unwrap();
        let hv2 = agent_config(&plan, "hv2", Path::new("/p"), Path::new("/s")).unwrap();
        let entry = format!("name = \"vm1.0\"\ninterface = \"{tap}\"");
        assert!(hv1.contains(&entry), "{hv1}");
        assert!(hv2.contains(&entry), "{hv2}");
        assert!(hv2.contains("name = \"vm2.0\""), "{hv2}");
        // vhost-user sockets of a pre-staged vNIC would not collide either.
        let nic = plan.vm("vm1").unwrap().vnics[0].clone();
        let s = Path::new("/s");
        assert_eq!(vhost_user_socket_on(s, &nic, "hv1", "hv1"), vhost_user_socket(s, &nic));
        assert_ne!(vhost_user_socket_on(s, &nic, "hv1", "hv2"), vhost_user_socket(s, &nic));
        // On vhost-user, each host's agent listens on a socket of its own for the vNIC.
        plan.qemu_nic = crate::plan::QemuNic::VhostUser;
        let hv2 = agent_config(&plan, "hv2", Path::new("/p"), Path::new("/s")).unwrap();
        let socket = vhost_user_socket_on(s, &nic, "hv1", "hv2");
        let entry = format!("name = \"vm1.0\"\nvhost_user = \"{}\"", socket.display());
        assert!(hv2.contains(&entry), "{hv2}");
    }
}

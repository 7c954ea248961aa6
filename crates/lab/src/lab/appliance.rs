//! Service-chain appliances in the lab: the one writer of an appliance's
//! bridge and nftables ruleset.
//!
//! A lab appliance is a bump in the wire: its two sides bridged (`br0`) and
//! a bridge-family nftables table whose forward chain first lets the agent's
//! health probes (UDP to [`PROBE_PORT`]) pass uncounted, then applies the
//! caller's rules, by default [`counting_rules`] (count everything, drop the
//! marked request "GET /X-EVIL"). The two kinds share that ruleset:
//!
//! - a VM appliance ([`Lab::bridge_appliance`]): a VM whose two vNICs the
//!   policy's service chain names (`in`, `out`), bridged inside the VM;
//! - the external appliance ([`Lab::external_appliance`]): a namespace
//!   `<lab>-xapp` behind the edge router at [`EXTERNAL_APPLIANCE`], reached
//!   over the underlay by VXLAN-GBP on [`EXTERNAL_VNIS`], bridging two Linux
//!   VXLAN devices.
//!
//! The end-to-end tests and `bench/service-chain.sh` (through `palisade lab
//! appliance`) both build their appliances here, so a change of the ruleset
//! is made once. [`Lab::appliance_counters`] reads the counters back, and
//! [`write_chain_policy`] writes the policy both run them with: the
//! three-tier example with appliance VMs and the web tier's internet rule
//! redirected through a chain.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::{Lab, LabError, sys};

/// The UDP port of the agent's appliance health probes (accepted uncounted).
pub const PROBE_PORT: u16 = 3785;

/// The external appliance's address (behind the edge router, on
/// 198.51.100.0/24, whose .1 is the router's side).
pub const EXTERNAL_APPLIANCE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

/// The external appliance's VNIs: traffic in, traffic out.
pub const EXTERNAL_VNIS: (u32, u32) = (7001, 7002);

/// The nftables match of a TCP payload starting "GET /X-EVIL" (the marked
/// request the default ruleset drops).
pub const MARKED_REQUEST: &str = "'@ih,0,88 0x474554202f582d4556494c'";

/// How long one appliance setup or counter read may take.
const EXEC_TIMEOUT: Duration = Duration::from_secs(10);

/// The default rules after the probes' accept: count everything, then count
/// and drop the marked request. [`Lab::appliance_counters`] reads them back
/// in this order.
pub fn counting_rules() -> Vec<String> {
    vec!["counter".to_string(), format!("{MARKED_REQUEST} counter drop")]
}

/// The shell script that bridges interfaces `a` and `b` as `br0` and loads
/// the bridge-family table `table` (the probes' accept, then `rules`, each
/// an nftables rule's text).
pub fn bridge_script(a: &str, b: &str, table: &str, rules: &[String]) -> String {
    let mut s = format!(
        "ip link add br0 type bridge && ip link set {a} master br0 && ip link set {b} master br0 && \
         ip link set {a} up && ip link set {b} up && ip link set br0 up && \
         nft add table bridge {table} && \
         nft add chain bridge {table} filt '{{ type filter hook forward priority 0; }}' && \
         nft add rule bridge {table} filt ether type ip udp dport {PROBE_PORT} accept"
    );
    for r in rules {
        s.push_str(&format!(" && nft add rule bridge {table} filt {r}"));
    }
    s
}

/// The packet counts in `nft list table` output, in rule order.
pub fn parse_counters(listing: &str) -> Vec<u64> {
    listing
        .split("packets ")
        .skip(1)
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .collect()
}

/// The service chains of [`write_chain_policy`], each over the lab's
/// appliances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chain {
    /// `ns-ips`: one stage, the VM `ips-1`.
    Vm,
    /// `ns-two`: two stages, `fw-1` then `ips-1` (replies the other way round).
    TwoStage,
    /// `ns-ext`: the external appliance over the underlay.
    External,
}

impl Chain {
    /// The chain's name in the policy.
    pub fn name(self) -> &'static str {
        match self {
            Chain::Vm => "ns-ips",
            Chain::TwoStage => "ns-two",
            Chain::External => "ns-ext",
        }
    }

    /// The appliance VMs it goes through.
    pub fn vms(self) -> &'static [&'static str] {
        match self {
            Chain::Vm => &["ips-1"],
            Chain::TwoStage => &["fw-1", "ips-1"],
            Chain::External => &[],
        }
    }

    /// Its `service_chains:` entry.
    fn declaration(self, on_failure: &str) -> String {
        let vm = |v: &str| format!("{{ vm: {v}, in: {v}.in, out: {v}.out }}");
        let body = match self {
            Chain::Vm => format!("    appliances:\n      - {}\n", vm("ips-1")),
            Chain::TwoStage => format!(
                "    stages:\n      - appliances: [{}]\n      - appliances: [{}]\n",
                vm("fw-1"),
                vm("ips-1")
            ),
            Chain::External => {
                let (vi, vo) = EXTERNAL_VNIS;
                format!(
                    "    appliances:\n      - {{ external: {{ address: {EXTERNAL_APPLIANCE}, vni_in: {vi}, vni_out: {vo} }} }}\n"
                )
            }
        };
        format!(
            "\nservice_chains:\n  {}:\n    on_failure: {on_failure}\n{body}",
            self.name()
        )
    }
}

/// The appliance VMs a chain policy may add to the inventory, in this
/// order: name, role tag, and the last byte of its UUID and first MAC.
const APPLIANCE_VMS: [(&str, &str, u8); 2] = [("ips-1", "ips", 0x41), ("fw-1", "fw", 0x51)];

/// What [`write_chain_policy`] writes.
#[derive(Clone, Copy, Debug)]
pub struct ChainPolicy<'a> {
    /// The chain declared.
    pub chain: Chain,
    /// Whether the web tier's internet rule is redirected through it (else
    /// it is declared and unused).
    pub redirect: bool,
    /// Appliance VMs in the inventory besides the chain's own (`ips-1`, `fw-1`).
    pub extra_vms: &'a [&'a str],
    /// The chain's `on_failure`: `open` or `closed`.
    pub on_failure: &'a str,
    /// The policy's version.
    pub version: u32,
}

/// Write into `dir` the three-tier example (from `example`) with the
/// appliance VMs (on hv1, two vNICs each in the web zone, no address) and
/// `spec`'s chain. The policy file is replaced whole (written aside, then
/// renamed), so an agent watching it never reads half of it.
pub fn write_chain_policy(example: &Path, dir: &Path, spec: &ChainPolicy<'_>) -> Result<(), LabError> {
    let read = |f: &str| {
        let p = example.join(f);
        std::fs::read_to_string(&p).map_err(LabError::io(format!("reading {}", p.display())))
    };
    let write = |f: &str, text: String| {
        let p = dir.join(f);
        let tmp = dir.join(format!(".{f}.tmp"));
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &p))
            .map_err(LabError::io(format!("writing {}", p.display())))
    };
    for v in spec.extra_vms {
        if !APPLIANCE_VMS.iter().any(|(n, ..)| n == v) {
            return Err(LabError::Unknown {
                kind: "appliance VM",
                name: v.to_string(),
            });
        }
    }
    std::fs::create_dir_all(dir).map_err(LabError::io(format!("creating {}", dir.display())))?;
    let mut inv = read("inventory.yaml")?;
    for (name, role, n) in APPLIANCE_VMS {
        if spec.chain.vms().contains(&name) || spec.extra_vms.contains(&name) {
            inv.push_str(&format!(
                "\n  - name: {name}\n    uuid: 6d1f3c2a-8b7e-4c59-9a1d-0f2e3b4c5d{n:02x}\n    cluster: prod\n    host: hv1\n    \
                 tags: {{ role: {role} }}\n    vnics:\n      \
                 - {{ name: {name}.in, mac: \"02:00:0a:00:01:{n:02x}\", ips: [], zone: web }}\n      \
                 - {{ name: {name}.out, mac: \"02:00:0a:00:01:{:02x}\", ips: [], zone: web }}\n",
                n + 1
            ));
        }
    }
    let pol = read("policy.yaml")?;
    // The web tier's internet rule, which the redirect joins.
    let rule = "      action: allow\n      inspect: full\n    - { id: web-to-app";
    if !pol.contains(rule) {
        return Err(LabError::Invalid(format!(
            "{}: the web tier's internet rule is not the three-tier example's",
            example.display()
        )));
    }
    let mut pol = pol.replace("version: 1\n", &format!("version: {}\n", spec.version));
    if spec.redirect {
        let redirected = format!("inspect: full\n      redirect: {}\n", spec.chain.name());
        pol = pol.replace(rule, &rule.replace("inspect: full\n", &redirected));
    }
    pol.push_str(&spec.chain.declaration(spec.on_failure));
    write("inventory.yaml", inv)?;
    write("policy.yaml", pol)
}

/// Where an appliance's table lives: in a VM, or in a namespace of the lab's
/// (the external appliance's).
#[derive(Clone, Copy, Debug)]
pub enum ApplianceAt<'a> {
    /// A VM of the lab.
    Vm(&'a str),
    /// A network namespace.
    Netns(&'a str),
}

impl Lab {
    /// Make VM `vm` an appliance: bridge its first two vNICs and load table
    /// `table` with `rules` ([`counting_rules`] when empty).
    pub fn bridge_appliance(&self, vm: &str, table: &str, rules: &[String]) -> Result<(), LabError> {
        let v = self
            .plan()
            .vm(vm)
            .ok_or_else(|| LabError::Unknown {
                kind: "vm",
                name: vm.to_string(),
            })?
            .clone();
        let [a, b, ..] = v.vnics.as_slice() else {
            return Err(LabError::Invalid(format!(
                "appliance {vm}: needs two vNICs, has {}",
                v.vnics.len()
            )));
        };
        let rules = if rules.is_empty() {
            counting_rules()
        } else {
            rules.to_vec()
        };
        let script = bridge_script(&a.guest_if, &b.guest_if, table, &rules);
        checked(self.exec(vm, &["sh", "-c", &script], EXEC_TIMEOUT)?, &script, vm)
    }

    /// Build the external appliance for zone `zone`'s north-south flows:
    /// the namespace `<lab>-xapp` (removed with the lab) on a link of its
    /// own behind the edge router, the edge router given a leg on the
    /// hosts' underlay (192.168.100.254) and every host a route to
    /// 198.51.100.0/24 through it; in it two VXLAN-GBP devices (VNIs
    /// [`EXTERNAL_VNIS`], both to the VTEP of the host that owns `zone`'s
    /// edge leg, where north-south flows are classified and steered),
    /// bridged with table `table` and `rules` ([`counting_rules`] when
    /// empty). Returns the namespace's name.
    pub fn external_appliance(&self, zone: &str, table: &str, rules: &[String]) -> Result<String, LabError> {
        let plan = self.plan().clone();
        let z = plan
            .zones
            .iter()
            .find(|z| z.name == zone)
            .ok_or_else(|| LabError::Unknown {
                kind: "zone",
                name: zone.to_string(),
            })?;
        let vtep = plan
            .host(&z.host)
            .ok_or_else(|| LabError::Unknown {
                kind: "host",
                name: z.host.clone(),
            })?
            .underlay_ip;
        let ns = format!("{}-xapp", plan.name);
        sys::ip(&["netns", "add", &ns])?;
        let (e, u) = (&plan.edge_ns, &plan.underlay_ns);
        // The edge router on the underlay, and its outside link to the appliance.
        self.sh_ns(
            e,
            &format!(
                "ip link add ul1 mtu 1600 type veth peer name edge-ul mtu 1600 netns {u} && \
                 ip addr add 192.168.100.254/24 dev ul1 && ip link set ul1 up && \
                 ip link add xapp0 mtu 1600 type veth peer name eth0 mtu 1600 netns {ns} && \
                 ip addr add 198.51.100.1/24 dev xapp0 && ip link set xapp0 up"
            ),
        )?;
        self.sh_ns(u, "ip link set edge-ul master br0 up")?;
        for h in &plan.hosts {
            self.sh_ns(&h.ns, "ip route add 198.51.100.0/24 via 192.168.100.254")?;
        }
        let (vi, vo) = EXTERNAL_VNIS;
        let x = EXTERNAL_APPLIANCE;
        // `gbp`: Palisade's VXLAN header is VXLAN-GBP (the G bit set), which a
        // Linux VXLAN device without it drops as malformed. GRO off on the
        // VXLAN devices: with it the kernel merges the inner TCP segments, the
        // bridge forwards the merged packet and the other device sends it as
        // one tunnel-GSO packet, which crosses the veths and the edge router
        // whole and reaches the agent's UDP socket as one oversized datagram
        // (the kernel segments UDP-GSO for a socket, not tunnel-GSO); a real
        // appliance's NIC sends wire-sized packets. Measured: a 2 MB download
        // stalled at 168 kB with it, passed with it off.
        let rules = if rules.is_empty() {
            counting_rules()
        } else {
            rules.to_vec()
        };
        self.sh_ns(
            &ns,
            &format!(
                "sysctl -w net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 >/dev/null && \
                 ip link set lo up && ip addr add {x}/24 dev eth0 && ip link set eth0 up && \
                 ip route add default via 198.51.100.1 && \
                 ip link add vx-in mtu 1500 type vxlan id {vi} remote {vtep} local {x} dstport 4789 gbp nolearning && \
                 ip link add vx-out mtu 1500 type vxlan id {vo} remote {vtep} local {x} dstport 4789 gbp nolearning && \
                 ethtool -K vx-in gro off && ethtool -K vx-out gro off && {}",
                bridge_script("vx-in", "vx-out", table, &rules)
            ),
        )?;
        Ok(ns)
    }

    /// The packet counts of the appliance's table `table`, in rule order
    /// (the probes' accept has no counter).
    pub fn appliance_counters(&self, at: ApplianceAt<'_>, table: &str) -> Result<Vec<u64>, LabError> {
        let argv = ["nft", "list", "table", "bridge", table];
        let (out, place) = match at {
            ApplianceAt::Vm(vm) => (self.exec(vm, &argv, EXEC_TIMEOUT)?, vm),
            ApplianceAt::Netns(ns) => (self.exec_ns(ns, &argv, EXEC_TIMEOUT)?, ns),
        };
        checked(out.clone(), &argv.join(" "), place)?;
        Ok(parse_counters(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Run shell `script` in namespace `ns`; fail with its stderr unless it succeeds.
    fn sh_ns(&self, ns: &str, script: &str) -> Result<(), LabError> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, "sh", "-c", script]);
        checked(sys::output_timeout(cmd, EXEC_TIMEOUT, ns)?, script, ns)
    }
}

/// `Ok` when `out` succeeded, else the command's failure with its stderr.
fn checked(out: std::process::Output, script: &str, place: &str) -> Result<(), LabError> {
    if out.status.success() {
        return Ok(());
    }
    Err(LabError::Command {
        command: format!("in {place}: {script}"),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_accepts_probes_before_the_rules_in_their_order() {
        let s = bridge_script("a0", "b0", "ips", &counting_rules());
        let probe = s.find("udp dport 3785 accept").expect("probe accept");
        let count = s.find("filt counter").expect("counter");
        let drop = s.find("counter drop").expect("marked drop");
        assert!(probe < count && count < drop, "{s}");
        assert!(s.starts_with("ip link add br0 type bridge && ip link set a0 master br0"));
        // No rule: the table accepts probes and nothing else is added.
        assert!(bridge_script("a0", "b0", "t", &[]).ends_with("udp dport 3785 accept"));
    }

    #[test]
    fn chain_policies_load_with_their_appliances_and_redirect() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/three-tier");
        let dir = std::env::temp_dir().join(format!("palisade-lab-chain-policy-{}", std::process::id()));
        for chain in [Chain::Vm, Chain::TwoStage, Chain::External] {
            for redirect in [true, false] {
                let spec = ChainPolicy {
                    chain,
                    redirect,
                    extra_vms: &["fw-1"],
                    on_failure: "open",
                    version: 3,
                };
                write_chain_policy(&example, &dir, &spec).unwrap();
                let l = crate::lab::load_inventory(&dir).unwrap();
                assert!(l.vm("fw-1").is_some(), "{chain:?}");
                assert_eq!(l.vm("ips-1").is_some(), chain != Chain::External, "{chain:?}");
                let pol = std::fs::read_to_string(dir.join("policy.yaml")).unwrap();
                let loaded = palisade_policy::load(&palisade_policy::DirSource::new(&dir)).unwrap();
                assert!(!loaded.has_errors(), "{chain:?}: {}", loaded.render());
                let model = loaded.model;
                assert_eq!(model.policy.version, 3);
                assert!(model.policy.service_chain(chain.name()).is_some(), "{chain:?}");
                assert_eq!(
                    pol.contains(&format!("redirect: {}", chain.name())),
                    redirect,
                    "{chain:?}"
                );
            }
        }
        let bad = ChainPolicy {
            chain: Chain::Vm,
            redirect: true,
            extra_vms: &["ghost"],
            on_failure: "open",
            version: 1,
        };
        assert!(write_chain_policy(&example, &dir, &bad).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn counters_are_read_in_rule_order() {
        let listing = "table bridge ips {\n\tchain filt {\n\t\ttype filter hook forward priority filter; policy accept;\n\
                       \t\tether type ip udp dport 3785 accept\n\t\tcounter packets 12 bytes 900\n\
                       \t\t@ih,0,88 0x474554202f582d4556494c counter packets 1 bytes 80 drop\n\t}\n}\n";
        assert_eq!(parse_counters(listing), vec![12, 1]);
        assert!(parse_counters("table bridge ips {}").is_empty());
    }
}

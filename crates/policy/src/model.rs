//! The typed policy model: inventory, groups, services, profiles and rules.
//!
//! These types are what the loader builds from YAML and what the evaluator,
//! compiler and analyzer read. They can also be built directly (the property
//! tests do), so nothing here depends on a file format; the [`Span`]s only
//! point back to the source when there is one.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

/// Where a model element was written: file, 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize)]
pub struct Span {
    /// The file, as given by the [`PolicySource`](crate::source::PolicySource).
    pub file: Arc<str>,
    /// 1-based line.
    pub line: u32,
    /// 1-based column, in characters.
    pub column: u32,
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// A rule's (or a default's) action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let the flow through.
    Allow,
    /// Drop silently.
    Deny,
    /// Drop and tell the sender (TCP RST / ICMP unreachable).
    Reject,
    /// Skip the rest of this level and continue at the next one.
    Pass,
}

impl Action {
    /// The keyword used in policy files.
    pub const fn name(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Reject => "reject",
            Action::Pass => "pass",
        }
    }

    /// Parse a policy-file keyword.
    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "allow" => Some(Action::Allow),
            "deny" => Some(Action::Deny),
            "reject" => Some(Action::Reject),
            "pass" => Some(Action::Pass),
            _ => None,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The four rule levels, in evaluation order (`Ord` follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Rules for every vNIC of the datacenter.
    Datacenter,
    /// Rules for the vNICs of VMs in one cluster.
    Cluster,
    /// Rules for the vNICs attached to one zone.
    Zone,
    /// Rules for the vNICs of one VM.
    Vm,
}

impl Level {
    /// All levels in evaluation order.
    pub const ALL: [Level; 4] = [Level::Datacenter, Level::Cluster, Level::Zone, Level::Vm];

    /// The keyword used in policy files.
    pub const fn name(self) -> &'static str {
        match self {
            Level::Datacenter => "datacenter",
            Level::Cluster => "cluster",
            Level::Zone => "zone",
            Level::Vm => "vm",
        }
    }

    /// Position in evaluation order (0 = datacenter).
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A zone's L2 segment identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Segment {
    /// An 802.1Q VLAN id (1..=4094), local to a host's switch.
    Vlan(u16),
    /// A VXLAN network identifier (24 bits), across hosts.
    Vni(u32),
}

/// What a zone's enforcement does when inspection or the agent cannot keep up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Forward without inspection (availability first).
    Open,
    /// Drop (security first).
    Closed,
}

/// The datacenter: the root of the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Datacenter {
    /// Name.
    pub name: String,
    /// Default action for flows no rule decides, unless the zone sets its own.
    pub default: Action,
}

/// A cluster of hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cluster {
    /// Name.
    pub name: String,
    /// Host names.
    pub hosts: Vec<String>,
    /// Where it was declared.
    #[serde(skip)]
    pub span: Span,
}

/// A security zone (port group): a named L2 segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Zone {
    /// Name.
    pub name: String,
    /// VLAN id or VNI.
    pub segment: Segment,
    /// Default action for this zone's vNICs (falls back to the datacenter's).
    pub default: Option<Action>,
    /// Failure mode.
    pub on_failure: OnFailure,
    /// Where it was declared.
    #[serde(skip)]
    pub span: Span,
}

/// A virtual NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vnic {
    /// Name, unique in the inventory (e.g. `web-1.0`).
    pub name: String,
    /// MAC address, lowercase `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// IP addresses (v4 and v6).
    pub ips: Vec<IpAddr>,
    /// The zone it is attached to.
    pub zone: String,
    /// Where it was declared.
    #[serde(skip)]
    pub span: Span,
}

/// A virtual machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vm {
    /// Name, unique in the inventory.
    pub name: String,
    /// UUID (kept as written).
    pub uuid: String,
    /// Cluster it runs in.
    pub cluster: Option<String>,
    /// Host it runs on.
    pub host: Option<String>,
    /// Identity tags.
    pub tags: BTreeMap<String, String>,
    /// Its vNICs.
    pub vnics: Vec<Vnic>,
    /// Where it was declared.
    #[serde(skip)]
    pub span: Span,
}

/// The declared inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inventory {
    /// The datacenter.
    pub datacenter: Datacenter,
    /// Clusters.
    pub clusters: Vec<Cluster>,
    /// Zones.
    pub zones: Vec<Zone>,
    /// VMs.
    pub vms: Vec<Vm>,
}

impl Inventory {
    /// The zone named `name`.
    pub fn zone(&self, name: &str) -> Option<&Zone> {
        self.zones.iter().find(|z| z.name == name)
    }

    /// The VM named `name`.
    pub fn vm(&self, name: &str) -> Option<&Vm> {
        self.vms.iter().find(|v| v.name == name)
    }

    /// The vNIC named `name` and its VM.
    pub fn vnic(&self, name: &str) -> Option<(&Vm, &Vnic)> {
        self.vms
            .iter()
            .find_map(|vm| vm.vnics.iter().find(|n| n.name == name).map(|n| (vm, n)))
    }

    /// The vNIC that owns address `ip`, if any (addresses are unique once validated).
    pub fn owner(&self, ip: IpAddr) -> Option<(&Vm, &Vnic)> {
        self.vms
            .iter()
            .find_map(|vm| vm.vnics.iter().find(|n| n.ips.contains(&ip)).map(|n| (vm, n)))
    }

    /// Every vNIC with its VM, in declaration order.
    pub fn vnics(&self) -> impl Iterator<Item = (&Vm, &Vnic)> {
        self.vms.iter().flat_map(|vm| vm.vnics.iter().map(move |n| (vm, n)))
    }

    /// The default action of a zone's vNICs and the level that set it.
    pub fn zone_default(&self, zone: &str) -> (Action, Level) {
        match self.zone(zone).and_then(|z| z.default) {
            Some(a) => (a, Level::Zone),
            None => (self.datacenter.default, Level::Datacenter),
        }
    }
}

/// A VM selector: every given criterion must hold (they AND together).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Selector {
    /// Tags the VM must carry with these values.
    pub tags: BTreeMap<String, String>,
    /// Glob on the VM name (`*` any run, `?` one character).
    pub name: Option<String>,
    /// Zone the vNIC must be attached to.
    pub zone: Option<String>,
    /// Cluster the VM must run in.
    pub cluster: Option<String>,
}

/// What a group contains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupDef {
    /// The vNICs of VMs matching a selector (membership follows tags).
    Selector(Selector),
    /// Fixed address blocks; a vNIC is a member if one of its addresses is inside.
    Ips(Vec<IpNet>),
    /// Every address that does not belong to a managed vNIC.
    External,
}

/// A named group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Group {
    /// Name.
    pub name: String,
    /// Definition.
    pub def: GroupDef,
    /// Where it was declared.
    #[serde(skip)]
    pub span: Span,
}

/// IP protocol numbers used by services.
pub mod proto {
    /// ICMP for IPv4.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// SCTP.
    pub const SCTP: u8 = 132;

    /// Whether `p` carries ICMP type/code instead of ports.
    pub const fn is_icmp(p: u8) -> bool {
        p == ICMP || p == ICMPV6
    }

    /// Whether `p` carries ports.
    pub const fn has_ports(p: u8) -> bool {
        p == TCP || p == UDP || p == SCTP
    }
}

/// One protocol/port element of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct ServiceEntry {
    /// IP protocol number; `None` for any protocol.
    pub proto: Option<u8>,
    /// Destination port range (inclusive) for TCP/UDP/SCTP; `None` = any port.
    pub dst_ports: Option<(u16, u16)>,
    /// ICMP type for ICMP/ICMPv6; `None` = any type.
    pub icmp_type: Option<u8>,
    /// ICMP code; `None` = any code.
    pub icmp_code: Option<u8>,
}

impl ServiceEntry {
    /// Any protocol, any port.
    pub const ANY: ServiceEntry = ServiceEntry {
        proto: None,
        dst_ports: None,
        icmp_type: None,
        icmp_code: None,
    };
}

impl fmt::Display for ServiceEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(p) = self.proto else { return f.write_str("any") };
        match p {
            proto::TCP => f.write_str("tcp")?,
            proto::UDP => f.write_str("udp")?,
            proto::SCTP => f.write_str("sctp")?,
            proto::ICMP => f.write_str("icmp")?,
            proto::ICMPV6 => f.write_str("icmpv6")?,
            n => write!(f, "ip/{n}")?,
        }
        if let Some((lo, hi)) = self.dst_ports {
            if lo == hi {
                write!(f, "/{lo}")?
            } else {
                write!(f, "/{lo}-{hi}")?
            }
        }
        if let Some(t) = self.icmp_type {
            write!(f, "/{t}")?;
            if let Some(c) = self.icmp_code {
                write!(f, "/{c}")?;
            }
        }
        Ok(())
    }
}

/// A named service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    /// Name.
    pub name: String,
    /// Elements (a flow matches the service if it matches any).
    pub entries: Vec<ServiceEntry>,
    /// Where it was declared.
    #[serde(skip)]
    pub span: Span,
}

/// An inspection profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Profile {
    /// Name.
    pub name: String,
    /// Signature sets it runs (empty = no inspection).
    pub signatures: Vec<String>,
    /// Where it was declared.
    #[serde(skip)]
    pub span: Span,
}

/// Default inspection profile per traffic class.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct InspectionDefaults {
    /// Traffic with an external end.
    pub north_south: Option<String>,
    /// Between two zones.
    pub inter_zone: Option<String>,
    /// Within one zone.
    pub intra_zone: Option<String>,
}

/// A `from`/`to`/`applied_to` element.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Peer {
    /// Every address, every vNIC.
    Any,
    /// A named group.
    Group(String),
    /// A literal address block (a vNIC is a member if one of its addresses is inside).
    Net(IpNet),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Any => f.write_str("any"),
            Peer::Group(g) => f.write_str(g),
            Peer::Net(n) => write!(f, "{n}"),
        }
    }
}

/// A `service` element.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceRef {
    /// Any protocol and port.
    Any,
    /// A named service.
    Named(String),
    /// An inline element such as `tcp/8443`.
    Inline(ServiceEntry),
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceRef::Any => f.write_str("any"),
            ServiceRef::Named(n) => f.write_str(n),
            ServiceRef::Inline(e) => write!(f, "{e}"),
        }
    }
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// Identifier, unique in the policy.
    pub id: String,
    /// Level it is written at.
    pub level: Level,
    /// The cluster, zone or VM it is scoped to (`None` at datacenter level).
    pub scope: Option<String>,
    /// Sources (union).
    pub from: Vec<Peer>,
    /// Destinations (union).
    pub to: Vec<Peer>,
    /// Services (union).
    pub service: Vec<ServiceRef>,
    /// Action.
    pub action: Action,
    /// Whether matching flows are logged.
    pub log: bool,
    /// Inspection profile for allowed flows (else the traffic-class default).
    pub inspect: Option<String>,
    /// If set, the rule is installed only on vNICs that are members of one of these.
    pub applied_to: Option<Vec<Peer>>,
    /// Where it was declared.
    #[serde(skip)]
    pub span: Span,
    /// The service chain an allowed flow is steered through before delivery
    /// (`redirect: CHAIN`; only on `allow` rules).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect: Option<String>,
}

/// One instance of a service chain: an appliance VM in bump-in-the-wire
/// mode. Steered packets enter it on one of its vNICs and leave it,
/// unchanged in their addresses, on the other: the initiator's direction
/// in on `vnic_in` and out on `vnic_out`, the responder's the other way.
///
/// Or an external appliance ([`Appliance::external`]), reached over the
/// underlay: the two sides are then two VNIs at one underlay address, and
/// `vm`, `vnic_in` and `vnic_out` are names made from them
/// ([`ExternalAppliance::name`], [`ExternalAppliance::side_name`]), so
/// that every consumer that names an instance by them (records, metrics,
/// the probe monitor) names an external one too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Appliance {
    /// The appliance VM (for an external appliance, its address).
    pub vm: String,
    /// The vNIC the initiator's packets enter it on (and the responder's leave it on).
    pub vnic_in: String,
    /// The vNIC the initiator's packets leave it on (and the responder's enter it on).
    pub vnic_out: String,
    /// Where it was declared (its `vm`, or its `external`).
    #[serde(skip)]
    pub span: Span,
    /// Where `in` and `out` were written (for an external appliance,
    /// `vni_in` and `vni_out`).
    #[serde(skip)]
    pub vnic_spans: [Span; 2],
    /// An appliance outside the virtual network, reached over the underlay
    /// (`None`: a VM's vNIC pair).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalAppliance>,
}

/// An external appliance (`external: { address, vni_in, vni_out }`): a
/// box (or a VM of another network) at an underlay address that takes
/// steered packets VXLAN-encapsulated, the initiator's direction in VNI
/// `vni_in` and the responder's in `vni_out`, and sends each back, to the
/// host that sent it, in the other side's VNI (a bridge between two VXLAN
/// interfaces, bump in the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ExternalAppliance {
    /// Its underlay (tunnel endpoint) address.
    pub address: Ipv4Addr,
    /// The VNI of its `in` side: the initiator's packets enter it in this
    /// VNI (and the responder's come back from it in it).
    pub vni_in: u32,
    /// The VNI of its `out` side.
    pub vni_out: u32,
}

impl ExternalAppliance {
    /// The largest VNI (24 bits).
    pub const MAX_VNI: u32 = 0x00ff_ffff;

    /// The name it goes by where a VM's name would be: its address.
    pub fn name(&self) -> String {
        self.address.to_string()
    }

    /// The name of one side where a vNIC's would be: `ADDRESS vni N`.
    pub fn side_name(&self, vni: u32) -> String {
        format!("{} vni {vni}", self.address)
    }
}

/// One stage of a service chain: interchangeable instances of one
/// appliance, of which a flow meets exactly one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainStage {
    /// Its instances (at least one).
    pub appliances: Vec<Appliance>,
    /// Where it was declared (its item in `stages:`, or the chain's
    /// `appliances:` for the one-stage form).
    #[serde(skip)]
    pub span: Span,
}

/// A named service chain (`service_chains:`): the appliances a redirected
/// flow goes through, in stages. At each stage a flow meets one instance,
/// chosen by a symmetric hash of its addresses and ports over that stage's
/// healthy instances, and both of its directions go through that instance,
/// so a stateful appliance sees the whole connection. The initiator's
/// packets cross the stages in order, the responder's in reverse order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceChain {
    /// Name.
    pub name: String,
    /// What the chain's flows do at a stage with no healthy instance:
    /// `open` skips that stage, `closed` drops them.
    pub on_failure: OnFailure,
    /// Its stages, in the initiator's order (at least one, at most
    /// [`ServiceChain::MAX_STAGES`]). The one-stage form, `appliances:`
    /// directly under the chain, is one stage.
    pub stages: Vec<ChainStage>,
    /// The health probe sent through each instance (`None`: `probe: off`,
    /// link state is the only health signal).
    pub probe: Option<ChainProbe>,
    /// Where it was declared.
    #[serde(skip)]
    pub span: Span,
}

/// A service chain's health probe (`probe:`): every `interval_ms`, a
/// probe frame enters each instance on each side and must come out of the
/// other; `down_after` rounds in a row with a probe lost take the instance
/// out of service, `up_after` rounds in a row with both back return it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ChainProbe {
    /// Milliseconds between rounds (at least [`ChainProbe::MIN_INTERVAL_MS`]).
    pub interval_ms: u32,
    /// Rounds lost in a row that make an instance down (at least 1).
    pub down_after: u32,
    /// Rounds answered in a row that make a down instance up again (at least 1).
    pub up_after: u32,
}

impl ServiceChain {
    /// The most stages a chain may have (each steered connection records
    /// its instance of every stage).
    pub const MAX_STAGES: usize = 4;

    /// Every instance of every stage, stage by stage.
    pub fn appliances(&self) -> impl Iterator<Item = &Appliance> {
        self.stages.iter().flat_map(|s| s.appliances.iter())
    }
}

impl ChainProbe {
    /// The shortest interval accepted: probes are housekeeping, not traffic.
    pub const MIN_INTERVAL_MS: u32 = 50;
    /// The longest interval accepted (a minute).
    pub const MAX_INTERVAL_MS: u32 = 60_000;
    /// The most rounds `down_after` and `up_after` may count.
    pub const MAX_ROUNDS: u32 = 100;
}

impl Default for ChainProbe {
    /// Every 500 ms; down after 3 lost rounds (1.5 s), up after 2 answered.
    fn default() -> Self {
        ChainProbe {
            interval_ms: 500,
            down_after: 3,
            up_after: 2,
        }
    }
}

/// The policy proper: everything but the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Policy {
    /// Version, stamped on every verdict's provenance.
    pub version: u64,
    /// Groups.
    pub groups: Vec<Group>,
    /// Services.
    pub services: Vec<Service>,
    /// Inspection profiles.
    pub profiles: Vec<Profile>,
    /// Default profile per traffic class.
    pub inspection_defaults: InspectionDefaults,
    /// Rules, sorted by level (stable: file order within a level and scope).
    pub rules: Vec<Rule>,
    /// Service chains that rules may `redirect` allowed flows through.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_chains: Vec<ServiceChain>,
}

impl Policy {
    /// The group named `name`.
    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// The service named `name`.
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    /// The service chain named `name`.
    pub fn service_chain(&self, name: &str) -> Option<&ServiceChain> {
        self.service_chains.iter().find(|c| c.name == name)
    }
}

/// Inventory and policy together: what the evaluator and the compiler read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Model {
    /// The inventory.
    pub inventory: Inventory,
    /// The policy.
    pub policy: Policy,
}

/// Whether `name` matches `glob` (`*` any run of characters, `?` exactly one).
pub fn glob_match(glob: &str, name: &str) -> bool {
    let g: Vec<char> = glob.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Classic iterative wildcard match with backtracking to the last star.
    let (mut gi, mut ni) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if gi < g.len() && (g[gi] == '?' || g[gi] == n[ni]) {
            gi += 1;
            ni += 1;
        } else if gi < g.len() && g[gi] == '*' {
            star = Some((gi, ni));
            gi += 1;
        } else if let Some((sg, sn)) = star {
            gi = sg + 1;
            ni = sn + 1;
            star = Some((sg, sn + 1));
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|&c| c == '*')
}

impl Selector {
    /// Whether vNIC `nic` of `vm` is selected.
    pub fn matches(&self, vm: &Vm, nic: &Vnic) -> bool {
        self.tags.iter().all(|(k, v)| vm.tags.get(k) == Some(v))
            && self.name.as_deref().is_none_or(|g| glob_match(g, &vm.name))
            && self.zone.as_deref().is_none_or(|z| z == nic.zone)
            && self.cluster.as_deref().is_none_or(|c| vm.cluster.as_deref() == Some(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("web-*", "web-1"));
        assert!(glob_match("*", ""));
        assert!(glob_match("w?b-*1", "web-11"));
        assert!(!glob_match("web-?", "web-10"));
        assert!(!glob_match("app-*", "web-1"));
        assert!(glob_match("*-db-*", "prod-db-2"));
    }

    #[test]
    fn levels_are_ordered() {
        assert!(Level::Datacenter < Level::Cluster && Level::Cluster < Level::Zone && Level::Zone < Level::Vm);
        assert_eq!(Level::Vm.index(), 3);
    }

    #[test]
    fn service_entry_display() {
        let e = ServiceEntry {
            proto: Some(proto::TCP),
            dst_ports: Some((8000, 8080)),
            ..ServiceEntry::ANY
        };
        assert_eq!(e.to_string(), "tcp/8000-8080");
        assert_eq!(ServiceEntry::ANY.to_string(), "any");
    }
}

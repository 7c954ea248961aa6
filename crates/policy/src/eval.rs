//! The reference evaluator: DESIGN.md's semantics, written as plainly as possible.
//!
//! This is the oracle the compiler is tested against, so it works straight
//! from the model (selectors are tested on the VM, `external` means "no vNIC
//! owns this address") and shares nothing with the compiler but the model
//! types. For one vNIC and one direction:
//!
//! 1. the levels are walked in order datacenter, cluster, zone, vm;
//! 2. at each level the rules *in scope* are those of the datacenter, of the
//!    VM's cluster, of the vNIC's zone, or of the VM itself;
//! 3. a rule is *installed* on the chain if the vNIC is a member of its `from`
//!    (egress) or `to` (ingress), and of its `applied_to` when given;
//! 4. an installed rule *matches* a flow if the source address is in `from`,
//!    the destination in `to`, and the protocol/ports in `service`;
//! 5. the first matching rule decides with `allow`, `deny` or `reject`; `pass`
//!    abandons the rest of its level; with no decision, the vNIC's zone default
//!    (else the datacenter default) applies.
//!
//! A flow is decided by the source vNIC's egress chain and the destination
//! vNIC's ingress chain, each evaluated when its end is managed; it is allowed
//! iff every evaluated chain allows it. Two vNICs of one VM (or a vNIC talking
//! to itself) are treated like any two managed vNICs: both chains apply, since
//! the traffic crosses the virtual switch like any other.
//!
//! ICMP has roles beyond its flow ([`IcmpRole`], `DESIGN.md` "ICMP"): an echo
//! request is decided as above and opens a connection, whose echo replies
//! pass as part of it; an unsolicited echo reply is decided as above (a rule
//! on `icmp/echo-reply`) and opens nothing. An error *unrelated* to any
//! tracked connection is decided as above; an error *related* to one
//! ([`evaluate_related_error`]) is decided by the rules that name its ICMP
//! type only, the defaults do not apply, and with no such rule it passes.
//! ICMPv6 neighbour discovery and multicast listener messages are link
//! infrastructure, switched with anti-spoofing checks and not decided by
//! rules.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::model::*;

/// A flow's 5-tuple. For ICMP/ICMPv6, as in Open vSwitch, `src_port` holds
/// the ICMP type and `dst_port` the code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Flow {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// Source port (ICMP type).
    pub src_port: u16,
    /// Destination port (ICMP code).
    pub dst_port: u16,
}

impl Flow {
    /// A flow to `service` written as in policy files (`tcp/443`, `udp/53`,
    /// `icmp/echo-request`, `icmp/3/4`, `ip/47`); TCP/UDP/SCTP get source port 49152.
    pub fn to_service(src: IpAddr, dst: IpAddr, service: &str) -> Option<Flow> {
        let mut parts = service.split('/');
        let p = parts.next()?;
        let rest: Vec<&str> = parts.collect();
        let proto = match p {
            "tcp" => proto::TCP,
            "udp" => proto::UDP,
            "sctp" => proto::SCTP,
            "icmp" => proto::ICMP,
            "icmpv6" => proto::ICMPV6,
            "ip" => {
                return Some(Flow {
                    src,
                    dst,
                    proto: rest.first()?.parse().ok()?,
                    src_port: 0,
                    dst_port: 0,
                });
            }
            _ => return None,
        };
        if proto::is_icmp(proto) {
            let ty = match rest.first().copied() {
                None => 0,
                Some("echo-request") => {
                    if proto == proto::ICMP {
                        8
                    } else {
                        128
                    }
                }
                Some("echo-reply") => {
                    if proto == proto::ICMP {
                        0
                    } else {
                        129
                    }
                }
                Some(t) => t.parse().ok()?,
            };
            let code = match rest.get(1) {
                Some(c) => c.parse().ok()?,
                None => 0,
            };
            return Some(Flow {
                src,
                dst,
                proto,
                src_port: ty,
                dst_port: code,
            });
        }
        let [port] = rest.as_slice() else { return None };
        Some(Flow {
            src,
            dst,
            proto,
            src_port: 49152,
            dst_port: port.parse().ok()?,
        })
    }
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} proto {} {}->{}",
            self.src, self.dst, self.proto, self.src_port, self.dst_port
        )
    }
}

/// What an ICMP or ICMPv6 message is to the datapath, by its type (a flow's
/// `src_port` for ICMP): see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IcmpRole {
    /// Not ICMP, or an ICMP message with no role of its own (timestamp,
    /// router advertisement, unassigned types…): decided like any flow.
    Plain,
    /// An echo request: decided like any flow; it opens a connection.
    EchoRequest,
    /// An echo reply: passes as part of the connection its request opened;
    /// an unsolicited one is decided like any flow and opens nothing.
    EchoReply,
    /// An error (ICMP destination unreachable, source quench, redirect, time
    /// exceeded, parameter problem; ICMPv6 types 1 to 4): related to a
    /// tracked connection, only rules naming its type decide
    /// ([`evaluate_related_error`]); unrelated, like any flow.
    Error,
    /// ICMPv6 neighbour discovery and multicast listener messages (types 130
    /// to 143): link infrastructure, not decided by rules.
    Link,
}

impl IcmpRole {
    /// The role of an ICMP message of type `ty` over protocol `proto` (`Plain` unless ICMP or ICMPv6).
    pub const fn of(proto: u8, ty: u8) -> IcmpRole {
        match (proto, ty) {
            (proto::ICMP, 8) | (proto::ICMPV6, 128) => IcmpRole::EchoRequest,
            (proto::ICMP, 0) | (proto::ICMPV6, 129) => IcmpRole::EchoReply,
            (proto::ICMP, 3 | 4 | 5 | 11 | 12) | (proto::ICMPV6, 1..=4) => IcmpRole::Error,
            (proto::ICMPV6, 130..=143) => IcmpRole::Link,
            _ => IcmpRole::Plain,
        }
    }

    /// The role of `flow`: ICMP over IPv4 and ICMPv6 over IPv6 only (the
    /// datapath reads neither over the other version, where they are just
    /// another protocol number); ICMP types above 255 cannot occur.
    pub fn of_flow(flow: &Flow) -> IcmpRole {
        let own_version = match flow.proto {
            proto::ICMP => flow.src.is_ipv4(),
            proto::ICMPV6 => flow.src.is_ipv6(),
            _ => true,
        };
        match u8::try_from(flow.src_port) {
            Ok(ty) if own_version => IcmpRole::of(flow.proto, ty),
            _ => IcmpRole::Plain,
        }
    }
}

/// Which chain of a vNIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic the vNIC sends.
    Egress,
    /// Traffic the vNIC receives.
    Ingress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        })
    }
}

/// Where a verdict comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Provenance {
    /// Level of the deciding rule (or of the default that applied).
    pub level: Level,
    /// Rule id, or `default` when no rule decided.
    pub rule_id: Arc<str>,
    /// Policy version.
    pub policy_version: u64,
    /// Cluster, zone or VM name the rule is scoped to; zone or datacenter name for a default.
    pub scope: Option<Arc<str>>,
}

impl fmt::Display for Provenance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.scope {
            Some(s) => write!(f, "{}:{}/{} (v{})", self.level, s, self.rule_id, self.policy_version),
            None => write!(f, "{}/{} (v{})", self.level, self.rule_id, self.policy_version),
        }
    }
}

/// The provenance of a rule.
pub fn rule_provenance(rule: &Rule, version: u64) -> Provenance {
    Provenance {
        level: rule.level,
        rule_id: rule.id.as_str().into(),
        policy_version: version,
        scope: rule.scope.as_deref().map(Into::into),
    }
}

/// The default action of a zone's chains and its provenance.
pub fn default_verdict(inv: &Inventory, zone: &str, version: u64) -> (Action, Provenance) {
    let (action, level) = inv.zone_default(zone);
    let scope: Arc<str> = match level {
        Level::Zone => zone.into(),
        _ => inv.datacenter.name.as_str().into(),
    };
    (
        action,
        Provenance {
            level,
            rule_id: "default".into(),
            policy_version: version,
            scope: Some(scope),
        },
    )
}

/// One chain's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainVerdict {
    /// The vNIC whose chain decided.
    pub vnic: String,
    /// Which of its chains.
    pub direction: Direction,
    /// `allow`, `deny` or `reject` (never `pass`).
    pub action: Action,
    /// Where it comes from.
    pub provenance: Provenance,
    /// Whether the deciding rule asks for logging.
    pub log: bool,
    /// The deciding rule's inspection profile.
    pub inspect: Option<String>,
    /// The service chain the deciding rule redirects to (`allow` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect: Option<String>,
}

/// The decision for a flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The source vNIC's egress verdict (absent when the source is external).
    pub egress: Option<ChainVerdict>,
    /// The destination vNIC's ingress verdict (absent when the destination is external).
    pub ingress: Option<ChainVerdict>,
    /// The combined action: `allow` iff every evaluated chain allows.
    pub action: Action,
    /// The deciding provenance: the denying chain's, or both when allowed (egress first).
    pub provenance: Vec<Provenance>,
    /// Inspection profile for an allowed flow: the rule's, else the traffic-class default.
    pub inspect: Option<String>,
    /// The service chain an allowed flow is steered through: the egress
    /// rule's `redirect`, else the ingress rule's (one chain per flow).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect: Option<String>,
}

/// Why a rule did or did not decide, for `explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "detail")]
pub enum RuleOutcome {
    /// The vNIC's VM is not in the rule's `from` (egress) or `to` (ingress).
    NotInstalled(String),
    /// The vNIC is not in `applied_to`.
    NotAppliedHere,
    /// The source address is not in `from`.
    SourceMismatch,
    /// The destination address is not in `to`.
    DestinationMismatch,
    /// The protocol or port is not in `service`.
    ServiceMismatch,
    /// For an ICMP error related to a tracked connection: no element of
    /// `service` names the error's ICMP type (and code, when it gives one),
    /// so the rule does not apply.
    NotForThisIcmpType,
    /// The rule matched with this action.
    Matched(Action),
}

/// One rule consulted while evaluating a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleStep {
    /// Level.
    pub level: Level,
    /// Scope name.
    pub scope: Option<String>,
    /// Rule id.
    pub rule_id: String,
    /// What happened.
    #[serde(flatten)]
    pub outcome: RuleOutcome,
}

/// A chain evaluation with every step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainTrace {
    /// The verdict.
    pub verdict: ChainVerdict,
    /// Every rule consulted, in order.
    pub steps: Vec<RuleStep>,
}

/// Whether vNIC `nic` of `vm` belongs to `peer`.
pub fn vnic_in_peer(pol: &Policy, vm: &Vm, nic: &Vnic, peer: &Peer) -> bool {
    match peer {
        Peer::Any => true,
        Peer::Net(n) => nic.ips.iter().any(|ip| n.contains(ip)),
        Peer::Group(g) => match pol.group(g).map(|g| &g.def) {
            Some(GroupDef::Selector(s)) => s.matches(vm, nic),
            Some(GroupDef::Ips(nets)) => nic.ips.iter().any(|ip| nets.iter().any(|n| n.contains(ip))),
            Some(GroupDef::External) | None => false,
        },
    }
}

/// Whether address `ip` belongs to `peer`.
pub fn addr_in_peer(inv: &Inventory, pol: &Policy, ip: IpAddr, peer: &Peer) -> bool {
    match peer {
        Peer::Any => true,
        Peer::Net(n) => n.contains(&ip),
        Peer::Group(g) => match pol.group(g).map(|g| &g.def) {
            Some(GroupDef::Selector(s)) => inv.owner(ip).is_some_and(|(vm, nic)| s.matches(vm, nic)),
            Some(GroupDef::Ips(nets)) => nets.iter().any(|n| n.contains(&ip)),
            Some(GroupDef::External) => inv.owner(ip).is_none(),
            None => false,
        },
    }
}

/// Whether a flow's protocol and ports are in a service element.
pub fn entry_matches(e: &ServiceEntry, flow: &Flow) -> bool {
    let Some(p) = e.proto else { return true };
    p == flow.proto
        && e.dst_ports.is_none_or(|(lo, hi)| (lo..=hi).contains(&flow.dst_port))
        && e.icmp_type.is_none_or(|t| u16::from(t) == flow.src_port)
        && e.icmp_code.is_none_or(|c| u16::from(c) == flow.dst_port)
}

/// Whether a service element names `flow`'s ICMP type (and code, when it
/// gives one): the rules that decide an ICMP error related to a tracked
/// connection ([`evaluate_related_error`]). `any`, a protocol without a type
/// (`icmp`) and other protocols do not.
pub fn entry_names_icmp_type(e: &ServiceEntry, flow: &Flow) -> bool {
    e.proto == Some(flow.proto) && proto::is_icmp(flow.proto) && e.icmp_type.is_some() && entry_matches(e, flow)
}

/// The service elements a rule's `service` lists (named services resolved).
fn service_entries<'a>(pol: &'a Policy, refs: &'a [ServiceRef]) -> impl Iterator<Item = Option<&'a ServiceEntry>> {
    refs.iter().flat_map(move |r| -> Vec<Option<&'a ServiceEntry>> {
        match r {
            ServiceRef::Any => vec![None],
            ServiceRef::Inline(e) => vec![Some(e)],
            ServiceRef::Named(n) => pol
                .service(n)
                .map_or(Vec::new(), |s| s.entries.iter().map(Some).collect()),
        }
    })
}

fn service_matches(pol: &Policy, refs: &[ServiceRef], flow: &Flow) -> bool {
    service_entries(pol, refs).any(|e| e.is_none_or(|e| entry_matches(e, flow)))
}

fn service_names_icmp_type(pol: &Policy, refs: &[ServiceRef], flow: &Flow) -> bool {
    service_entries(pol, refs).any(|e| e.is_some_and(|e| entry_names_icmp_type(e, flow)))
}

/// Which rules a chain walk considers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    /// Every rule: a flow that starts (or an unrelated ICMP error).
    All,
    /// Only rules naming the ICMP type: an ICMP error related to a tracked connection.
    RelatedError,
}

/// Whether a rule's scope covers vNIC `nic` of `vm`.
pub fn in_scope(rule: &Rule, vm: &Vm, nic: &Vnic) -> bool {
    let scope = rule.scope.as_deref();
    match rule.level {
        Level::Datacenter => true,
        Level::Cluster => vm.cluster.as_deref() == scope,
        Level::Zone => Some(nic.zone.as_str()) == scope,
        Level::Vm => Some(vm.name.as_str()) == scope,
    }
}

/// Evaluate one chain of one vNIC, recording every rule consulted.
pub fn trace_chain(model: &Model, vm: &Vm, nic: &Vnic, dir: Direction, flow: &Flow) -> ChainTrace {
    let (steps, decided) = walk_chain(model, vm, nic, dir, flow, Walk::All);
    let verdict = decided.unwrap_or_else(|| {
        let (action, provenance) = default_verdict(&model.inventory, &nic.zone, model.policy.version);
        ChainVerdict {
            vnic: nic.name.clone(),
            direction: dir,
            action,
            provenance,
            log: false,
            inspect: None,
            redirect: None,
        }
    });
    ChainTrace { verdict, steps }
}

/// Walk one chain: every rule consulted, and the deciding rule's verdict
/// (`None` when no rule decided: the default applies to a [`Walk::All`]).
fn walk_chain(
    model: &Model,
    vm: &Vm,
    nic: &Vnic,
    dir: Direction,
    flow: &Flow,
    walk: Walk,
) -> (Vec<RuleStep>, Option<ChainVerdict>) {
    let (inv, pol) = (&model.inventory, &model.policy);
    let mut steps = Vec::new();
    for level in Level::ALL {
        for rule in pol.rules.iter().filter(|r| r.level == level && in_scope(r, vm, nic)) {
            let side = if dir == Direction::Egress { &rule.from } else { &rule.to };
            let outcome = if !side.iter().any(|p| vnic_in_peer(pol, vm, nic, p)) {
                let which = if dir == Direction::Egress { "from" } else { "to" };
                RuleOutcome::NotInstalled(format!("{} is not in `{which}`", vm.name))
            } else if rule
                .applied_to
                .as_ref()
                .is_some_and(|a| !a.iter().any(|p| vnic_in_peer(pol, vm, nic, p)))
            {
                RuleOutcome::NotAppliedHere
            } else if !rule.from.iter().any(|p| addr_in_peer(inv, pol, flow.src, p)) {
                RuleOutcome::SourceMismatch
            } else if !rule.to.iter().any(|p| addr_in_peer(inv, pol, flow.dst, p)) {
                RuleOutcome::DestinationMismatch
            } else if walk == Walk::RelatedError && !service_names_icmp_type(pol, &rule.service, flow) {
                RuleOutcome::NotForThisIcmpType
            } else if !service_matches(pol, &rule.service, flow) {
                RuleOutcome::ServiceMismatch
            } else {
                RuleOutcome::Matched(rule.action)
            };
            let decided = matches!(outcome, RuleOutcome::Matched(_));
            steps.push(RuleStep {
                level,
                scope: rule.scope.clone(),
                rule_id: rule.id.clone(),
                outcome,
            });
            if decided {
                if rule.action == Action::Pass {
                    break;
                }
                let verdict = ChainVerdict {
                    vnic: nic.name.clone(),
                    direction: dir,
                    action: rule.action,
                    provenance: rule_provenance(rule, pol.version),
                    log: rule.log,
                    inspect: rule.inspect.clone(),
                    redirect: rule.redirect.clone(),
                };
                return (steps, Some(verdict));
            }
        }
    }
    (steps, None)
}

/// One chain's walk for an ICMP error related to a tracked connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RelatedTrace {
    /// The vNIC.
    pub vnic: String,
    /// Which of its chains.
    pub direction: Direction,
    /// The rule naming the error's type that decided; `None`: no such rule
    /// matched (the error passes this chain; no default applies).
    pub verdict: Option<ChainVerdict>,
    /// Every rule consulted, in order.
    pub steps: Vec<RuleStep>,
}

/// The decision for an ICMP error related to a tracked connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RelatedErrorDecision {
    /// The error's sender's egress walk, when the sender is a managed vNIC.
    pub egress: Option<RelatedTrace>,
    /// The error's receiver's ingress walk, when the receiver is a managed vNIC.
    pub ingress: Option<RelatedTrace>,
    /// `allow` unless a chain's deciding rule denies or rejects it (then that action).
    pub action: Action,
    /// The deciding rules' provenance: the denying one, or every allowing one
    /// (empty when no rule names the type).
    pub provenance: Vec<Provenance>,
}

/// Decide an ICMP error (`flow`: the error's own addresses, type and code)
/// that quotes a packet of a tracked connection: each managed end's chain is
/// walked with only the rules whose service names the error's ICMP type; the
/// first such rule to match decides (`pass` skips the rest of its level, as
/// always); with none, the chain lets it pass: defaults do not apply to
/// related errors. It passes iff no chain denies or rejects it. `None` when
/// neither end is managed.
pub fn evaluate_related_error(model: &Model, flow: &Flow) -> Option<RelatedErrorDecision> {
    let inv = &model.inventory;
    let trace = |ip: IpAddr, dir: Direction| {
        inv.owner(ip).map(|(vm, nic)| {
            let (steps, verdict) = walk_chain(model, vm, nic, dir, flow, Walk::RelatedError);
            RelatedTrace {
                vnic: nic.name.clone(),
                direction: dir,
                verdict,
                steps,
            }
        })
    };
    combine_related(trace(flow.src, Direction::Egress), trace(flow.dst, Direction::Ingress))
}

/// Combine the two chains' walks for a related ICMP error (shared with the
/// compiled path, like [`combine`]): `None` when neither end is managed.
pub fn combine_related(egress: Option<RelatedTrace>, ingress: Option<RelatedTrace>) -> Option<RelatedErrorDecision> {
    if egress.is_none() && ingress.is_none() {
        return None;
    }
    let verdicts = || {
        [&egress, &ingress]
            .into_iter()
            .flatten()
            .filter_map(|t| t.verdict.as_ref())
    };
    let (action, provenance) = match verdicts().find(|v| v.action != Action::Allow) {
        Some(v) => (v.action, vec![v.provenance.clone()]),
        None => (Action::Allow, verdicts().map(|v| v.provenance.clone()).collect()),
    };
    Some(RelatedErrorDecision {
        egress,
        ingress,
        action,
        provenance,
    })
}

/// The full explanation of a flow: both chains' traces and the decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The flow.
    pub flow: Flow,
    /// Source vNIC name, or `None` for external.
    pub src_vnic: Option<String>,
    /// Destination vNIC name, or `None` for external.
    pub dst_vnic: Option<String>,
    /// Egress trace, when the source is managed.
    pub egress: Option<ChainTrace>,
    /// Ingress trace, when the destination is managed.
    pub ingress: Option<ChainTrace>,
    /// The decision; `None` when neither end is managed (Palisade does not see the flow).
    /// For an ICMP error, this is the decision when it is unrelated to any
    /// tracked connection (see `related_error`).
    pub decision: Option<Decision>,
    /// The flow's ICMP role (`plain` for other protocols).
    pub icmp: IcmpRole,
    /// For an ICMP error: the decision when it is related to a tracked connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub related_error: Option<RelatedErrorDecision>,
    /// The service chain an allowed flow is redirected through, as declared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain: Option<ServiceChain>,
}

/// Evaluate a flow with a trace of every rule consulted.
pub fn explain(model: &Model, flow: &Flow) -> Explanation {
    let inv = &model.inventory;
    let src = inv.owner(flow.src);
    let dst = inv.owner(flow.dst);
    let egress = src.map(|(vm, nic)| trace_chain(model, vm, nic, Direction::Egress, flow));
    let ingress = dst.map(|(vm, nic)| trace_chain(model, vm, nic, Direction::Ingress, flow));
    let decision = combine(
        model,
        egress.as_ref().map(|t| t.verdict.clone()),
        ingress.as_ref().map(|t| t.verdict.clone()),
        src.map(|(_, n)| n.zone.as_str()),
        dst.map(|(_, n)| n.zone.as_str()),
    );
    let icmp = IcmpRole::of_flow(flow);
    let related_error = if icmp == IcmpRole::Error {
        evaluate_related_error(model, flow)
    } else {
        None
    };
    let chain = decision
        .as_ref()
        .and_then(|d| d.redirect.as_deref())
        .and_then(|c| model.policy.service_chain(c))
        .cloned();
    Explanation {
        flow: *flow,
        src_vnic: src.map(|(_, n)| n.name.clone()),
        dst_vnic: dst.map(|(_, n)| n.name.clone()),
        egress,
        ingress,
        decision,
        icmp,
        related_error,
        chain,
    }
}

/// Evaluate a flow: the reference decision.
pub fn evaluate(model: &Model, flow: &Flow) -> Option<Decision> {
    explain(model, flow).decision
}

/// Combine the two chain verdicts (shared by the compiled path so that both
/// agree on inspection and provenance rules by construction; the verdicts
/// themselves come from independent code).
pub fn combine(
    model: &Model,
    egress: Option<ChainVerdict>,
    ingress: Option<ChainVerdict>,
    src_zone: Option<&str>,
    dst_zone: Option<&str>,
) -> Option<Decision> {
    if egress.is_none() && ingress.is_none() {
        return None;
    }
    let denier = [&egress, &ingress]
        .into_iter()
        .flatten()
        .find(|v| v.action != Action::Allow);
    let (action, provenance, inspect, redirect) = match denier {
        Some(v) => (v.action, vec![v.provenance.clone()], None, None),
        None => {
            let prov = [&egress, &ingress]
                .into_iter()
                .flatten()
                .map(|v| v.provenance.clone())
                .collect();
            let explicit = [&egress, &ingress].map(|v| v.as_ref().and_then(|v| v.inspect.as_deref()));
            let inspect = inspection_profile(model, explicit, src_zone, dst_zone).map(str::to_string);
            let redirect = [&egress, &ingress]
                .into_iter()
                .flatten()
                .find_map(|v| v.redirect.clone());
            (Action::Allow, prov, inspect, redirect)
        }
    };
    Some(Decision {
        egress,
        ingress,
        action,
        provenance,
        inspect,
        redirect,
    })
}

/// The inspection profile of an allowed flow: the first deciding rule's
/// `inspect` (egress, then ingress), else the traffic class's default
/// (`intra_zone` for two ends in one zone, `inter_zone` for two zones,
/// `north_south` when an end is external). [`combine`] and the datapath's
/// classification both resolve it here, so they agree by construction.
pub fn inspection_profile<'m>(
    model: &'m Model,
    explicit: [Option<&'m str>; 2],
    src_zone: Option<&str>,
    dst_zone: Option<&str>,
) -> Option<&'m str> {
    if let Some(p) = explicit.into_iter().flatten().next() {
        return Some(p);
    }
    let d = &model.policy.inspection_defaults;
    let class = match (src_zone, dst_zone) {
        (Some(a), Some(b)) if a == b => &d.intra_zone,
        (Some(_), Some(_)) => &d.inter_zone,
        _ => &d.north_south,
    };
    class.as_deref()
}

/// Render an explanation for people: every rule consulted at each level.
pub fn render_explanation(e: &Explanation) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let end = |v: &Option<String>, ip: IpAddr| match v {
        Some(n) => format!("{ip} (vNIC {n})"),
        None => format!("{ip} (external)"),
    };
    let _ = writeln!(
        out,
        "flow: {} -> {}  proto {} ports {}->{}",
        end(&e.src_vnic, e.flow.src),
        end(&e.dst_vnic, e.flow.dst),
        e.flow.proto,
        e.flow.src_port,
        e.flow.dst_port
    );
    if e.icmp == IcmpRole::Error {
        let _ = writeln!(
            out,
            "\nICMP error: unrelated to any tracked connection, it is decided like any flow (below);"
        );
        let _ = writeln!(
            out,
            "related to one, only rules naming its type decide and defaults do not apply (after that)."
        );
    }
    for (name, t) in [("egress", &e.egress), ("ingress", &e.ingress)] {
        let Some(t) = t else {
            let _ = writeln!(out, "\n{name}: not evaluated (that end is external)");
            continue;
        };
        let _ = writeln!(out, "\n{name} chain of {}:", t.verdict.vnic);
        render_steps(&mut out, &t.steps);
        let v = &t.verdict;
        let _ = writeln!(out, "  => {} by {}", v.action, v.provenance);
    }
    let head = if e.icmp == IcmpRole::Error {
        "verdict if unrelated"
    } else {
        "verdict"
    };
    match &e.decision {
        Some(d) => {
            let provs: Vec<String> = d.provenance.iter().map(ToString::to_string).collect();
            let _ = write!(out, "\n{head}: {} ({})", d.action, provs.join(", "));
            if let Some(p) = &d.inspect {
                let _ = write!(out, " inspect: {p}");
            }
            out.push('\n');
            if let Some(c) = &d.redirect {
                let _ = writeln!(out, "{}", render_redirect(e.chain.as_ref(), c));
            }
        }
        None => {
            let _ = writeln!(out, "\n{head}: none (neither end is a managed vNIC)");
        }
    }
    if let Some(r) = &e.related_error {
        for t in [&r.egress, &r.ingress].into_iter().flatten() {
            let _ = writeln!(
                out,
                "\nrelated to a tracked connection, {} chain of {} (rules naming ICMP type {}):",
                t.direction, t.vnic, e.flow.src_port
            );
            render_steps(&mut out, &t.steps);
            match &t.verdict {
                Some(v) => {
                    let _ = writeln!(out, "  => {} by {}", v.action, v.provenance);
                }
                None => out.push_str("  => allow: no rule names its type (defaults do not apply)\n"),
            }
        }
        let provs: Vec<String> = r.provenance.iter().map(ToString::to_string).collect();
        let by = if provs.is_empty() {
            "no rule names its type".to_string()
        } else {
            provs.join(", ")
        };
        let _ = writeln!(out, "\nverdict if related: {} ({by})", r.action);
    }
    let note = match e.icmp {
        IcmpRole::EchoRequest => Some("an echo request opens a connection; its echo replies pass as part of it"),
        IcmpRole::EchoReply => Some(
            "an echo reply passes as part of the connection its request opened; the verdict above is for an \
             unsolicited reply, which opens no connection",
        ),
        IcmpRole::Link => Some(
            "neighbour discovery and multicast listener messages are link infrastructure: the datapath \
             switches them with its anti-spoofing checks, rules do not apply to them",
        ),
        IcmpRole::Plain | IcmpRole::Error => None,
    };
    if let Some(note) = note {
        let _ = writeln!(out, "ICMP: {note}");
    }
    out
}

/// The steering line of an allowed flow's verdict: the chain and its
/// appliances, or a note that the chain is not declared (a model that did
/// not pass validation).
fn render_redirect(chain: Option<&ServiceChain>, name: &str) -> String {
    let Some(c) = chain else {
        return format!("redirect: through service chain {name} (not declared)");
    };
    let stages: Vec<String> = c
        .stages
        .iter()
        .map(|st| {
            let instances: Vec<String> = st
                .appliances
                .iter()
                .map(|a| match &a.external {
                    Some(e) => format!("external {} (vni {} -> vni {})", e.address, e.vni_in, e.vni_out),
                    None => format!("{} ({} -> {})", a.vm, a.vnic_in, a.vnic_out),
                })
                .collect();
            instances.join(", ")
        })
        .collect();
    let health = match c.probe {
        Some(p) => format!(
            "probed every {} ms, down after {} lost, up after {} answered",
            p.interval_ms, p.down_after, p.up_after
        ),
        None => "probe: off, link state only".to_string(),
    };
    if let [instances] = stages.as_slice() {
        let on_failure = match c.on_failure {
            OnFailure::Open => "open: delivered without it",
            OnFailure::Closed => "closed: dropped",
        };
        return format!(
            "redirect: through service chain {name}, one of [{instances}] by a symmetric hash of the flow; both \
             directions meet the same instance (no healthy instance: on_failure {on_failure}; {health})"
        );
    }
    let on_failure = match c.on_failure {
        OnFailure::Open => "open: that stage is skipped",
        OnFailure::Closed => "closed: dropped",
    };
    let listed: Vec<String> = stages
        .iter()
        .enumerate()
        .map(|(n, instances)| format!("stage {}: one of [{instances}]", n + 1))
        .collect();
    format!(
        "redirect: through service chain {name}, {} stages, in this order for the initiator's packets and in \
         reverse for the responder's: {}; at each stage one instance by a symmetric hash of the flow, both \
         directions meet the same instance (a stage with no healthy instance: on_failure {on_failure}; {health})",
        stages.len(),
        listed.join("; ")
    )
}

/// The rules consulted in one chain, by level.
fn render_steps(out: &mut String, steps: &[RuleStep]) {
    use std::fmt::Write as _;
    let mut last: Option<(Level, Option<String>)> = None;
    for s in steps {
        let head = (s.level, s.scope.clone());
        if last.as_ref() != Some(&head) {
            match &s.scope {
                Some(sc) => {
                    let _ = writeln!(out, "  level {} ({sc}):", s.level);
                }
                None => {
                    let _ = writeln!(out, "  level {}:", s.level);
                }
            }
            last = Some(head);
        }
        let why = match &s.outcome {
            RuleOutcome::NotInstalled(r) => format!("not installed: {r}"),
            RuleOutcome::NotAppliedHere => "not installed: vNIC not in applied_to".to_string(),
            RuleOutcome::SourceMismatch => "no match: source not in from".to_string(),
            RuleOutcome::DestinationMismatch => "no match: destination not in to".to_string(),
            RuleOutcome::NotForThisIcmpType => "does not apply: its service names not this ICMP type".to_string(),
            RuleOutcome::ServiceMismatch => "no match: service".to_string(),
            RuleOutcome::Matched(Action::Pass) => "MATCH pass: skip to next level".to_string(),
            RuleOutcome::Matched(a) => format!("MATCH {a}"),
        };
        let _ = writeln!(out, "    {:<28} {why}", s.rule_id);
    }
}

/// An endpoint written by a person: a VM name (its first vNIC's first
/// address), a vNIC name (its first address), or an IP address.
pub fn resolve_endpoint(inv: &Inventory, s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(vm) = inv.vm(s) {
        return vm.vnics.iter().find_map(|n| n.ips.first().copied());
    }
    inv.vnic(s).and_then(|(_, n)| n.ips.first().copied())
}

/// A flow to a service given as `tcp/443`-style text or as a service name
/// (its first element).
pub fn flow_for(pol: &Policy, src: IpAddr, dst: IpAddr, service: &str) -> Option<Flow> {
    if let Some(f) = Flow::to_service(src, dst, service) {
        return Some(f);
    }
    let e = pol.service(service)?.entries.first()?;
    let mut f = Flow::to_service(src, dst, &e.to_string())?;
    if let Some((lo, _)) = e.dst_ports {
        f.dst_port = lo;
    }
    Some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn flows_from_service_text() {
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        let f = Flow::to_service(a, b, "tcp/443").unwrap();
        assert_eq!((f.proto, f.dst_port), (proto::TCP, 443));
        let f = Flow::to_service(a, b, "icmp/echo-request").unwrap();
        assert_eq!((f.proto, f.src_port, f.dst_port), (proto::ICMP, 8, 0));
        let f = Flow::to_service(a, b, "icmpv6/1/4").unwrap();
        assert_eq!((f.proto, f.src_port, f.dst_port), (proto::ICMPV6, 1, 4));
        assert_eq!(Flow::to_service(a, b, "ip/47").unwrap().proto, 47);
        assert!(Flow::to_service(a, b, "tcp").is_none());
        assert!(Flow::to_service(a, b, "tcp/99999").is_none());
        assert!(Flow::to_service(a, b, "https").is_none());
    }

    #[test]
    fn service_entry_matching() {
        let f = Flow {
            src: ip("10.0.0.1"),
            dst: ip("10.0.0.2"),
            proto: proto::ICMP,
            src_port: 3,
            dst_port: 4,
        };
        let e = ServiceEntry {
            proto: Some(proto::ICMP),
            icmp_type: Some(3),
            ..ServiceEntry::ANY
        };
        assert!(entry_matches(&e, &f));
        assert!(!entry_matches(
            &ServiceEntry {
                icmp_code: Some(3),
                ..e
            },
            &f
        ));
        assert!(entry_matches(&ServiceEntry::ANY, &f));
        let tcp = ServiceEntry {
            proto: Some(proto::TCP),
            dst_ports: Some((1, 10)),
            ..ServiceEntry::ANY
        };
        assert!(!entry_matches(&tcp, &f));
    }
}

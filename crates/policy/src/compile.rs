//! The compiler: hierarchical policy → flat, prioritized per-vNIC chains.
//!
//! Every vNIC gets an egress and an ingress [`CompiledChain`]: the rules the
//! reference evaluator would consult for it ([`crate::eval`]), already filtered
//! by scope, direction and `applied_to`, with groups expanded to address sets
//! and services to protocol/port ranges, one [`ChainEntry`] per service element,
//! each carrying its [`Provenance`].
//!
//! **`pass`.** An entry compiled from a `pass` rule is [`EntryAction::Pass`]
//! with the priority of the first entry of the next level (or one past the last
//! entry): a first-match walker that hits it jumps there. With that one rule,
//! first-match over the flat chain ([`CompiledChain::decide`]) decides exactly
//! as the hierarchical evaluator; `tests/prop.rs` checks it on random models.
//!
//! **Address sets.** An [`AddrSet`] is a list of CIDR blocks minus a list of
//! excepted blocks; only `external` (everything minus the managed addresses)
//! uses the exception list, which keeps it a few entries long instead of
//! ~32 blocks per managed address. [`AddrSet::to_prefixes`] gives the plain
//! CIDR list when a consumer needs one.
//!
//! **Incremental.** [`Compiler`] keeps group memberships (bitsets over
//! vNICs), an index from each group to the rules that reference it, and the
//! chains. [`Compiler::retag`] recomputes the memberships of the retagged VM's
//! vNICs only, and recompiles just the chains that can change: the VM's own,
//! and those holding a rule whose `from`/`to` references a group whose
//! membership changed. The [`ChangeSet`] says which were recompiled and which
//! actually changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

use crate::eval::{
    ChainVerdict, Decision, Direction, Flow, Provenance, RelatedErrorDecision, RelatedTrace, combine, combine_related,
    default_verdict, rule_provenance,
};
use crate::model::*;

/// Compiling failed: the model has a dangling reference (validation would have said so).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// A rule references an undefined group.
    #[error("rule {rule}: group \"{group}\" is not defined")]
    UnknownGroup {
        /// Rule id.
        rule: String,
        /// Group name.
        group: String,
    },
    /// A rule references an undefined service.
    #[error("rule {rule}: service \"{service}\" is not defined")]
    UnknownService {
        /// Rule id.
        rule: String,
        /// Service name.
        service: String,
    },
    /// No VM of that name.
    #[error("VM \"{0}\" is not in the inventory")]
    UnknownVm(String),
}

/// Any IPv4 or IPv6 address.
fn any_nets() -> Vec<IpNet> {
    // Both literals are valid prefixes; the parse cannot fail.
    vec!["0.0.0.0/0".parse().expect("valid"), "::/0".parse().expect("valid")]
}

/// A set of addresses: in one of `nets` and in none of `except`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize)]
pub struct AddrSet {
    /// Included blocks (aggregated, sorted).
    pub nets: Vec<IpNet>,
    /// Excluded blocks (aggregated, sorted); empty except for `external`.
    pub except: Vec<IpNet>,
}

impl AddrSet {
    /// Every address.
    pub fn any() -> AddrSet {
        AddrSet {
            nets: any_nets(),
            except: Vec::new(),
        }
    }

    /// The union of `nets`.
    pub fn from_nets(nets: &[IpNet]) -> AddrSet {
        AddrSet {
            nets: IpNet::aggregate(&nets.to_vec()),
            except: Vec::new(),
        }
    }

    /// Whether `ip` is in the set.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(&ip)) && !self.except.iter().any(|n| n.contains(&ip))
    }

    /// Whether the set is everything.
    pub fn is_any(&self) -> bool {
        self.except.is_empty() && self.nets == any_nets()
    }

    /// The set as disjoint CIDR blocks (the exceptions subtracted).
    pub fn to_prefixes(&self) -> Vec<IpNet> {
        fn subtract(net: IpNet, except: &[IpNet], out: &mut Vec<IpNet>) {
            if except.iter().any(|e| e.contains(&net)) {
                return;
            }
            // Only exceptions inside this block matter below it: pass them down,
            // so the work is about (prefix length × exceptions), not its square.
            let inside: Vec<IpNet> = except.iter().filter(|e| net.contains(*e)).copied().collect();
            if inside.is_empty() {
                out.push(net);
                return;
            }
            // Some exception lies strictly inside: split and recurse. A /32 or
            // /128 cannot strictly contain anything, so `subnets` has halves.
            if let Ok(halves) = net.subnets(net.prefix_len() + 1) {
                for h in halves {
                    subtract(h, &inside, out);
                }
            }
        }
        let mut out = Vec::new();
        for n in &self.nets {
            subtract(*n, &self.except, &mut out);
        }
        IpNet::aggregate(&out)
    }

    /// Whether every address of `other` is in `self` (exact).
    pub fn covers(&self, other: &AddrSet) -> bool {
        if self.is_any() {
            return true;
        }
        if self.except.is_empty() && other.except.is_empty() {
            // Both aggregated: a block inside the union lies inside one block.
            return other.nets.iter().all(|p| self.nets.iter().any(|m| m.contains(p)));
        }
        // Aggregated prefixes: a block inside the union lies inside one of them.
        let mine = self.to_prefixes();
        other.to_prefixes().iter().all(|p| mine.iter().any(|m| m.contains(p)))
    }

    /// Whether `self` and `other` share an address (exact).
    pub fn intersects(&self, other: &AddrSet) -> bool {
        if self.except.is_empty() && other.except.is_empty() {
            return other
                .nets
                .iter()
                .any(|p| self.nets.iter().any(|m| m.contains(p) || p.contains(m)));
        }
        let a = self.to_prefixes();
        other
            .to_prefixes()
            .iter()
            .any(|p| a.iter().any(|m| m.contains(p) || p.contains(m)))
    }
}

impl std::fmt::Display for AddrSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_any() {
            return f.write_str("any");
        }
        if self.nets.is_empty() {
            return f.write_str("none");
        }
        let show = |v: &[IpNet]| {
            let mut s: Vec<String> = v.iter().take(4).map(ToString::to_string).collect();
            if v.len() > 4 {
                s.push(format!("+{} more", v.len() - 4));
            }
            s.join(",")
        };
        if self.except.is_empty() {
            f.write_str(&show(&self.nets))
        } else if self.nets == any_nets() {
            write!(f, "any except {}", show(&self.except))
        } else {
            write!(f, "{} except {}", show(&self.nets), show(&self.except))
        }
    }
}

/// A compiled entry's action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryAction {
    /// Allow.
    Allow,
    /// Deny.
    Deny,
    /// Reject.
    Reject,
    /// Jump to the first entry whose priority is at least `next` (the next level).
    Pass {
        /// Priority to continue at.
        next: u32,
    },
}

impl EntryAction {
    /// The policy action it came from.
    pub fn action(self) -> Action {
        match self {
            EntryAction::Allow => Action::Allow,
            EntryAction::Deny => Action::Deny,
            EntryAction::Reject => Action::Reject,
            EntryAction::Pass { .. } => Action::Pass,
        }
    }
}

/// One entry of a compiled chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainEntry {
    /// Position: lower is consulted first; unique within a chain.
    pub priority: u32,
    /// Source addresses.
    pub src: Arc<AddrSet>,
    /// Destination addresses.
    pub dst: Arc<AddrSet>,
    /// IP protocol; `None` = any.
    pub proto: Option<u8>,
    /// Source port ranges (inclusive); empty = any.
    pub src_ports: Vec<(u16, u16)>,
    /// Destination port ranges (inclusive); empty = any.
    pub dst_ports: Vec<(u16, u16)>,
    /// ICMP type (matched against the flow's `src_port`); `None` = any.
    pub icmp_type: Option<u8>,
    /// ICMP code (matched against the flow's `dst_port`); `None` = any.
    pub icmp_code: Option<u8>,
    /// Action.
    pub action: EntryAction,
    /// Where it comes from.
    pub provenance: Provenance,
    /// Log matching flows.
    pub log: bool,
    /// Inspection profile.
    pub inspect: Option<Arc<str>>,
    /// The service chain an allowed flow is steered through (`redirect`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Arc<str>>,
}

impl ChainEntry {
    /// Whether `flow` matches the entry.
    pub fn matches(&self, flow: &Flow) -> bool {
        let in_ranges = |r: &[(u16, u16)], p: u16| r.is_empty() || r.iter().any(|&(lo, hi)| (lo..=hi).contains(&p));
        self.proto.is_none_or(|p| p == flow.proto)
            && in_ranges(&self.src_ports, flow.src_port)
            && in_ranges(&self.dst_ports, flow.dst_port)
            && self.icmp_type.is_none_or(|t| u16::from(t) == flow.src_port)
            && self.icmp_code.is_none_or(|c| u16::from(c) == flow.dst_port)
            && self.src.contains(flow.src)
            && self.dst.contains(flow.dst)
    }

    /// Whether the entry names `flow`'s ICMP type (and code, when it gives
    /// one) and matches it: the entries that decide an ICMP error related to
    /// a tracked connection (see [`crate::eval::evaluate_related_error`]).
    pub fn names_icmp_type_of(&self, flow: &Flow) -> bool {
        self.icmp_type.is_some() && proto::is_icmp(flow.proto) && self.proto == Some(flow.proto) && self.matches(flow)
    }
}

/// The outcome of walking a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainDecision<'a> {
    /// `allow`, `deny` or `reject`.
    pub action: Action,
    /// The deciding entry's provenance, or the default's.
    pub provenance: &'a Provenance,
    /// The deciding entry; `None` when the default applied.
    pub entry: Option<&'a ChainEntry>,
}

/// A vNIC's compiled chain for one direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompiledChain {
    /// The vNIC.
    pub vnic: String,
    /// The direction.
    pub direction: Direction,
    /// Entries by ascending priority.
    pub entries: Vec<ChainEntry>,
    /// What applies when no entry decides.
    pub default: (Action, Provenance),
}

impl CompiledChain {
    /// First match, honouring `pass` jumps.
    pub fn decide(&self, flow: &Flow) -> ChainDecision<'_> {
        let mut skip_below = 0u32;
        for e in &self.entries {
            if e.priority < skip_below || !e.matches(flow) {
                continue;
            }
            match e.action {
                EntryAction::Pass { next } => skip_below = next,
                a => {
                    return ChainDecision {
                        action: a.action(),
                        provenance: &e.provenance,
                        entry: Some(e),
                    };
                }
            }
        }
        ChainDecision {
            action: self.default.0,
            provenance: &self.default.1,
            entry: None,
        }
    }

    /// The walk for an ICMP error related to a tracked connection: only
    /// entries naming its ICMP type ([`ChainEntry::names_icmp_type_of`]),
    /// first match honouring `pass` jumps; `None` when none decides (the
    /// error passes: the default does not apply to related errors).
    pub fn decide_related(&self, flow: &Flow) -> Option<ChainDecision<'_>> {
        let mut skip_below = 0u32;
        for e in &self.entries {
            // Only entries with an ICMP type can name one: the rest are skipped
            // before the full match.
            if e.icmp_type.is_none() || e.priority < skip_below || !e.names_icmp_type_of(flow) {
                continue;
            }
            match e.action {
                EntryAction::Pass { next } => skip_below = next,
                a => {
                    return Some(ChainDecision {
                        action: a.action(),
                        provenance: &e.provenance,
                        entry: Some(e),
                    });
                }
            }
        }
        None
    }

    /// A human-readable table.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{} {} ({} entries)", self.vnic, self.direction, self.entries.len());
        for e in &self.entries {
            let svc = ServiceEntry {
                proto: e.proto,
                dst_ports: e.dst_ports.first().copied(),
                icmp_type: e.icmp_type,
                icmp_code: e.icmp_code,
            };
            let act = match e.action {
                EntryAction::Pass { next } => format!("pass->{next}"),
                a => a.action().to_string(),
            };
            let mut flags = String::new();
            if e.log {
                flags.push_str(" log");
            }
            if let Some(p) = &e.inspect {
                let _ = write!(flags, " inspect={p}");
            }
            if let Some(c) = &e.redirect {
                let _ = write!(flags, " redirect={c}");
            }
            let _ = writeln!(
                out,
                "  {:>4}  {:<10} src={} dst={} svc={}  [{}]{flags}",
                e.priority, act, e.src, e.dst, svc, e.provenance
            );
        }
        let _ = writeln!(out, "  dflt  {:<10} [{}]", self.default.0.to_string(), self.default.1);
        out
    }
}

/// Which chains a [`Compiler::retag`] touched (vNIC names, sorted).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ChangeSet {
    /// vNICs with at least one chain recompiled.
    pub recompiled: Vec<String>,
    /// vNICs with at least one chain that differs from before.
    pub changed: Vec<String>,
}

#[derive(Debug, Clone)]
struct BitSet(Vec<u64>);

impl BitSet {
    fn new(n: usize) -> BitSet {
        BitSet(vec![0; n.div_ceil(64)])
    }
    fn get(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1)
    }
    fn set(&mut self, i: usize, v: bool) {
        if let Some(w) = self.0.get_mut(i / 64) {
            if v {
                *w |= 1 << (i % 64);
            } else {
                *w &= !(1 << (i % 64));
            }
        }
    }
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0
            .iter()
            .enumerate()
            .flat_map(|(wi, &w)| (0..64).filter(move |b| w >> b & 1 == 1).map(move |b| wi * 64 + b))
    }
}

#[derive(Debug, Clone)]
enum CPeer {
    Any,
    Group(usize),
    Net(IpNet),
}

#[derive(Debug, Clone)]
struct CRule {
    from: Vec<CPeer>,
    to: Vec<CPeer>,
    applied_to: Option<Vec<CPeer>>,
    src: Arc<AddrSet>,
    dst: Arc<AddrSet>,
    services: Vec<ServiceEntry>,
    action: Action,
    log: bool,
    inspect: Option<Arc<str>>,
    redirect: Option<Arc<str>>,
    provenance: Provenance,
}

/// The compiler, holding the last result for incremental updates.
#[derive(Debug, Clone)]
pub struct Compiler {
    model: Model,
    /// vNIC index → (VM index, vNIC index in the VM).
    vnics: Vec<(usize, usize)>,
    // Read for every new flow the datapath classifies (twice each): the
    // fast hasher, not SipHash. The keys come from the policy, not from
    // traffic, so no packet can make them collide.
    vnic_by_ip: foldhash::HashMap<IpAddr, usize>,
    vnic_by_name: foldhash::HashMap<String, usize>,
    vm_by_name: HashMap<String, usize>,
    vm_vnics: Vec<Vec<usize>>,
    cluster_vnics: HashMap<String, Vec<usize>>,
    zone_vnics: HashMap<String, Vec<usize>>,
    managed: Vec<IpAddr>,
    groups: Vec<GroupDef>,
    members: Vec<BitSet>,
    group_addrs: Vec<Arc<AddrSet>>,
    rules: Vec<CRule>,
    /// Group → rules that reference it (deduplicated).
    by_group: Vec<Vec<usize>>,
    /// Rules by level scope, each in policy order.
    dc_rules: Vec<usize>,
    scoped: [HashMap<String, Vec<usize>>; 3],
    /// Per vNIC: its cluster, zone and VM rule lists, resolved once (the
    /// lookups by name would otherwise dominate an incremental recompile).
    vnic_scopes: Vec<[Arc<[usize]>; 3]>,
    /// Per vNIC: its chains' default.
    defaults: Vec<(Action, Provenance)>,
    chains: Vec<[CompiledChain; 2]>,
}

impl Compiler {
    /// Compile every chain of `model`.
    pub fn new(model: Model) -> Result<Compiler, CompileError> {
        let inv = &model.inventory;
        let mut vnics = Vec::new();
        let mut vm_vnics = Vec::new();
        let mut vnic_by_ip = foldhash::HashMap::default();
        let mut vnic_by_name = foldhash::HashMap::default();
        let mut cluster_vnics: HashMap<String, Vec<usize>> = HashMap::new();
        let mut zone_vnics: HashMap<String, Vec<usize>> = HashMap::new();
        let mut managed = Vec::new();
        for (vi, vm) in inv.vms.iter().enumerate() {
            let mut mine = Vec::new();
            for (ni, nic) in vm.vnics.iter().enumerate() {
                let idx = vnics.len();
                vnics.push((vi, ni));
                mine.push(idx);
                vnic_by_name.insert(nic.name.clone(), idx);
                for ip in &nic.ips {
                    vnic_by_ip.entry(*ip).or_insert(idx);
                    managed.push(*ip);
                }
                if let Some(c) = &vm.cluster {
                    cluster_vnics.entry(c.clone()).or_default().push(idx);
                }
                zone_vnics.entry(nic.zone.clone()).or_default().push(idx);
            }
            vm_vnics.push(mine);
        }
        managed.sort();
        managed.dedup();
        let vm_by_name = inv.vms.iter().enumerate().map(|(i, v)| (v.name.clone(), i)).collect();
        let group_idx: HashMap<String, usize> = model
            .policy
            .groups
            .iter()
            .enumerate()
            .map(|(i, g)| (g.name.clone(), i))
            .collect();
        let groups: Vec<GroupDef> = model.policy.groups.iter().map(|g| g.def.clone()).collect();

        // The model moves in (at 50,000 VMs a copy took longer than many a
        // recompile); the rules are read from it by index below.
        let mut c = Compiler {
            vnics,
            vnic_by_ip,
            vnic_by_name,
            vm_by_name,
            vm_vnics,
            cluster_vnics,
            zone_vnics,
            managed,
            members: Vec::new(),
            group_addrs: Vec::new(),
            rules: Vec::new(),
            by_group: vec![Vec::new(); groups.len()],
            groups,
            dc_rules: Vec::new(),
            scoped: Default::default(),
            vnic_scopes: Vec::new(),
            defaults: Vec::new(),
            chains: Vec::new(),
            model,
        };
        for gi in 0..c.groups.len() {
            let m = c.compute_members(gi);
            c.members.push(m);
        }
        for gi in 0..c.groups.len() {
            let a = Arc::new(c.compute_group_addrs(gi));
            c.group_addrs.push(a);
        }
        for ri in 0..c.model.policy.rules.len() {
            let policy = &c.model.policy;
            let rule = &policy.rules[ri];
            let mut refs = BTreeSet::new();
            let mut peers = |list: &[Peer]| -> Result<Vec<CPeer>, CompileError> {
                list.iter()
                    .map(|p| {
                        Ok(match p {
                            Peer::Any => CPeer::Any,
                            Peer::Net(n) => CPeer::Net(*n),
                            Peer::Group(g) => {
                                let gi = *group_idx.get(g.as_str()).ok_or_else(|| CompileError::UnknownGroup {
                                    rule: rule.id.clone(),
                                    group: g.clone(),
                                })?;
                                refs.insert(gi);
                                CPeer::Group(gi)
                            }
                        })
                    })
                    .collect()
            };
            let from = peers(&rule.from)?;
            let to = peers(&rule.to)?;
            let applied_to = rule.applied_to.as_deref().map(&mut peers).transpose()?;
            let mut services = Vec::new();
            for s in &rule.service {
                match s {
                    ServiceRef::Any => services.push(ServiceEntry::ANY),
                    ServiceRef::Inline(e) => services.push(*e),
                    ServiceRef::Named(n) => {
                        let svc = policy.service(n).ok_or_else(|| CompileError::UnknownService {
                            rule: rule.id.clone(),
                            service: n.clone(),
                        })?;
                        services.extend(svc.entries.iter().copied());
                    }
                }
            }
            // A service listed twice (directly or through two names) would only add dead entries.
            let mut seen = Vec::new();
            services.retain(|s| {
                let new = !seen.contains(s);
                seen.push(*s);
                new
            });
            let (action, log, inspect) = (rule.action, rule.log, rule.inspect.as_deref().map(Into::into));
            let redirect = rule.redirect.as_deref().map(Into::into);
            let provenance = rule_provenance(rule, policy.version);
            let scope = match (rule.level, &rule.scope) {
                (Level::Datacenter, _) | (_, None) => None,
                (level, Some(s)) => Some((level.index() - 1, s.clone())),
            };
            for gi in refs {
                c.by_group[gi].push(ri);
            }
            let src = c.peer_addrs(&from);
            let dst = c.peer_addrs(&to);
            c.rules.push(CRule {
                from,
                to,
                applied_to,
                src,
                dst,
                services,
                action,
                log,
                inspect,
                redirect,
                provenance,
            });
            match scope {
                None => c.dc_rules.push(ri),
                Some((level, s)) => c.scoped[level].entry(s).or_default().push(ri),
            }
        }
        let shared = |m: &HashMap<String, Vec<usize>>| -> HashMap<String, Arc<[usize]>> {
            m.iter().map(|(k, v)| (k.clone(), Arc::from(v.as_slice()))).collect()
        };
        let (by_cluster, by_zone, by_vm) = (shared(&c.scoped[0]), shared(&c.scoped[1]), shared(&c.scoped[2]));
        let none: Arc<[usize]> = Arc::from(Vec::new());
        for &(vi, ni) in &c.vnics {
            let vm = &c.model.inventory.vms[vi];
            let nic = &vm.vnics[ni];
            let get = |m: &HashMap<String, Arc<[usize]>>, k: Option<&String>| {
                k.and_then(|k| m.get(k)).cloned().unwrap_or_else(|| none.clone())
            };
            c.vnic_scopes.push([
                get(&by_cluster, vm.cluster.as_ref()),
                get(&by_zone, Some(&nic.zone)),
                get(&by_vm, Some(&vm.name)),
            ]);
            c.defaults
                .push(default_verdict(&c.model.inventory, &nic.zone, c.model.policy.version));
        }
        c.chains = (0..c.vnics.len())
            .map(|v| {
                [
                    c.build_chain(v, Direction::Egress),
                    c.build_chain(v, Direction::Ingress),
                ]
            })
            .collect();
        Ok(c)
    }

    /// The model as last compiled (with retags applied).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Every chain pair (egress, ingress), in inventory order.
    pub fn chains(&self) -> impl Iterator<Item = &CompiledChain> {
        self.chains.iter().flat_map(|c| c.iter())
    }

    /// One chain.
    pub fn chain(&self, vnic: &str, dir: Direction) -> Option<&CompiledChain> {
        let v = *self.vnic_by_name.get(vnic)?;
        self.chains.get(v).map(|c| &c[dir as usize])
    }

    /// Decide a flow through the compiled chains (what the datapath will do).
    pub fn decide(&self, flow: &Flow) -> Option<Decision> {
        let verdict = |ip: IpAddr, dir: Direction| {
            let v = *self.vnic_by_ip.get(&ip)?;
            let chain = &self.chains.get(v)?[dir as usize];
            let d = chain.decide(flow);
            let zone = self.nic(v).zone.as_str();
            let cv = ChainVerdict {
                vnic: chain.vnic.clone(),
                direction: dir,
                action: d.action,
                provenance: d.provenance.clone(),
                log: d.entry.is_some_and(|e| e.log),
                inspect: d.entry.and_then(|e| e.inspect.as_deref().map(str::to_string)),
                redirect: d.entry.and_then(|e| e.redirect.as_deref().map(str::to_string)),
            };
            Some((cv, zone))
        };
        let e = verdict(flow.src, Direction::Egress);
        let i = verdict(flow.dst, Direction::Ingress);
        let (sz, dz) = (e.as_ref().map(|x| x.1), i.as_ref().map(|x| x.1));
        combine(&self.model, e.map(|x| x.0), i.map(|x| x.0), sz, dz)
    }

    /// Decide an ICMP error related to a tracked connection through the
    /// compiled chains ([`CompiledChain::decide_related`] on each managed
    /// end); what [`crate::eval::evaluate_related_error`] decides.
    pub fn decide_related(&self, flow: &Flow) -> Option<RelatedErrorDecision> {
        let trace = |ip: IpAddr, dir: Direction| {
            let v = *self.vnic_by_ip.get(&ip)?;
            let chain = &self.chains.get(v)?[dir as usize];
            let verdict = chain.decide_related(flow).map(|d| ChainVerdict {
                vnic: chain.vnic.clone(),
                direction: dir,
                action: d.action,
                provenance: d.provenance.clone(),
                log: d.entry.is_some_and(|e| e.log),
                inspect: d.entry.and_then(|e| e.inspect.as_deref().map(str::to_string)),
                redirect: d.entry.and_then(|e| e.redirect.as_deref().map(str::to_string)),
            });
            Some(RelatedTrace {
                vnic: chain.vnic.clone(),
                direction: dir,
                verdict,
                steps: Vec::new(),
            })
        };
        combine_related(trace(flow.src, Direction::Egress), trace(flow.dst, Direction::Ingress))
    }

    /// Place VM `vm` on `host` (a live migration moved it): only the
    /// model changes. No chain depends on where a VM runs (selectors match
    /// tags, names, zones and clusters; the defaults come from zones), so
    /// nothing is recompiled: the result is what compiling the relocated
    /// model whole gives.
    pub fn relocate(&mut self, vm: &str, host: Option<String>) -> Result<(), CompileError> {
        let vi = *self
            .vm_by_name
            .get(vm)
            .ok_or_else(|| CompileError::UnknownVm(vm.to_string()))?;
        self.model.inventory.vms[vi].host = host;
        Ok(())
    }

    /// Change a VM's tags and recompile what that affects.
    pub fn retag(&mut self, vm: &str, tags: BTreeMap<String, String>) -> Result<ChangeSet, CompileError> {
        let vi = *self
            .vm_by_name
            .get(vm)
            .ok_or_else(|| CompileError::UnknownVm(vm.to_string()))?;
        self.model.inventory.vms[vi].tags = tags;
        let own = self.vm_vnics[vi].clone();
        let mut changed_groups = Vec::new();
        for gi in 0..self.groups.len() {
            let GroupDef::Selector(sel) = &self.groups[gi] else {
                continue;
            };
            let mut changed = false;
            for &v in &own {
                let (vi, ni) = self.vnics[v];
                let vmref = &self.model.inventory.vms[vi];
                let now = sel.matches(vmref, &vmref.vnics[ni]);
                if now != self.members[gi].get(v) {
                    self.members[gi].set(v, now);
                    changed = true;
                }
            }
            if changed {
                changed_groups.push(gi);
            }
        }
        for &gi in &changed_groups {
            self.group_addrs[gi] = Arc::new(self.compute_group_addrs(gi));
        }
        let mut affected_rules = BTreeSet::new();
        for &gi in &changed_groups {
            affected_rules.extend(self.by_group[gi].iter().copied());
        }
        let n = self.vnics.len();
        let mut todo = [BitSet::new(n), BitSet::new(n)];
        for &v in &own {
            todo[0].set(v, true);
            todo[1].set(v, true);
        }
        for &ri in &affected_rules {
            let src = self.peer_addrs(&self.rules[ri].from);
            let dst = self.peer_addrs(&self.rules[ri].to);
            let addrs_changed = src != self.rules[ri].src || dst != self.rules[ri].dst;
            self.rules[ri].src = src;
            self.rules[ri].dst = dst;
            if !addrs_changed {
                // Only membership (from/to/applied_to) changed, and only for the retagged VM's vNICs.
                continue;
            }
            for v in self.scope_vnics(ri) {
                for dir in [Direction::Egress, Direction::Ingress] {
                    if self.installed(ri, v, dir) {
                        todo[dir as usize].set(v, true);
                    }
                }
            }
        }
        let mut recompiled = BTreeSet::new();
        let mut changed = BTreeSet::new();
        for dir in [Direction::Egress, Direction::Ingress] {
            let list: Vec<usize> = todo[dir as usize].iter().collect();
            for v in list {
                let chain = self.build_chain(v, dir);
                let name = chain.vnic.clone();
                if chain != self.chains[v][dir as usize] {
                    self.chains[v][dir as usize] = chain;
                    changed.insert(name.clone());
                }
                recompiled.insert(name);
            }
        }
        Ok(ChangeSet {
            recompiled: recompiled.into_iter().collect(),
            changed: changed.into_iter().collect(),
        })
    }

    fn nic(&self, v: usize) -> &Vnic {
        let (vi, ni) = self.vnics[v];
        &self.model.inventory.vms[vi].vnics[ni]
    }

    fn scope_vnics(&self, ri: usize) -> Vec<usize> {
        let rule = &self.model.policy.rules[ri];
        let empty = Vec::new();
        match (rule.level, rule.scope.as_deref()) {
            (Level::Datacenter, _) | (_, None) => (0..self.vnics.len()).collect(),
            (Level::Cluster, Some(s)) => self.cluster_vnics.get(s).unwrap_or(&empty).clone(),
            (Level::Zone, Some(s)) => self.zone_vnics.get(s).unwrap_or(&empty).clone(),
            (Level::Vm, Some(s)) => self
                .vm_by_name
                .get(s)
                .map(|&vi| self.vm_vnics[vi].clone())
                .unwrap_or_default(),
        }
    }

    fn compute_members(&self, gi: usize) -> BitSet {
        let mut b = BitSet::new(self.vnics.len());
        for (v, &(vi, ni)) in self.vnics.iter().enumerate() {
            let vm = &self.model.inventory.vms[vi];
            let nic = &vm.vnics[ni];
            let m = match &self.groups[gi] {
                GroupDef::Selector(s) => s.matches(vm, nic),
                GroupDef::Ips(nets) => nic.ips.iter().any(|ip| nets.iter().any(|n| n.contains(ip))),
                GroupDef::External => false,
            };
            b.set(v, m);
        }
        b
    }

    fn compute_group_addrs(&self, gi: usize) -> AddrSet {
        match &self.groups[gi] {
            GroupDef::Selector(_) => {
                let mut nets = Vec::new();
                for v in self.members[gi].iter() {
                    nets.extend(self.nic(v).ips.iter().map(|ip| IpNet::from(*ip)));
                }
                AddrSet::from_nets(&nets)
            }
            GroupDef::Ips(nets) => AddrSet::from_nets(nets),
            GroupDef::External => {
                let hosts: Vec<IpNet> = self.managed.iter().map(|ip| IpNet::from(*ip)).collect();
                AddrSet {
                    nets: any_nets(),
                    except: IpNet::aggregate(&hosts),
                }
            }
        }
    }

    fn peer_addrs(&self, peers: &[CPeer]) -> Arc<AddrSet> {
        if let [CPeer::Group(g)] = peers {
            return self.group_addrs[*g].clone();
        }
        if peers.iter().any(|p| matches!(p, CPeer::Any)) {
            return Arc::new(AddrSet::any());
        }
        let mut nets = Vec::new();
        let mut external = false;
        for p in peers {
            match p {
                CPeer::Net(n) => nets.push(*n),
                CPeer::Group(g) if matches!(self.groups[*g], GroupDef::External) => external = true,
                CPeer::Group(g) => nets.extend(self.group_addrs[*g].nets.iter().copied()),
                CPeer::Any => {}
            }
        }
        if external {
            // (any − managed) ∪ X = any − (managed − X): exact because `managed` is host addresses.
            let except: Vec<IpNet> = self
                .managed
                .iter()
                .filter(|ip| !nets.iter().any(|n| n.contains(*ip)))
                .map(|ip| IpNet::from(*ip))
                .collect();
            return Arc::new(AddrSet {
                nets: any_nets(),
                except: IpNet::aggregate(&except),
            });
        }
        Arc::new(AddrSet::from_nets(&nets))
    }

    fn peer_has(&self, peer: &CPeer, v: usize) -> bool {
        match peer {
            CPeer::Any => true,
            CPeer::Group(g) => self.members[*g].get(v),
            CPeer::Net(n) => self.nic(v).ips.iter().any(|ip| n.contains(ip)),
        }
    }

    fn installed(&self, ri: usize, v: usize, dir: Direction) -> bool {
        let r = &self.rules[ri];
        let side = if dir == Direction::Egress { &r.from } else { &r.to };
        side.iter().any(|p| self.peer_has(p, v))
            && r.applied_to
                .as_ref()
                .is_none_or(|a| a.iter().any(|p| self.peer_has(p, v)))
    }

    fn build_chain(&self, v: usize, dir: Direction) -> CompiledChain {
        let (vi, ni) = self.vnics[v];
        let vm = &self.model.inventory.vms[vi];
        let nic = &vm.vnics[ni];
        let [cluster, zone, own] = &self.vnic_scopes[v];
        let lists: [&[usize]; 4] = [&self.dc_rules, cluster, zone, own];
        let mut entries: Vec<ChainEntry> = Vec::new();
        for list in lists {
            let level_start = entries.len();
            for &ri in list {
                if !self.installed(ri, v, dir) {
                    continue;
                }
                let r = &self.rules[ri];
                let action = match r.action {
                    Action::Allow => EntryAction::Allow,
                    Action::Deny => EntryAction::Deny,
                    Action::Reject => EntryAction::Reject,
                    Action::Pass => EntryAction::Pass { next: 0 },
                };
                for s in &r.services {
                    entries.push(ChainEntry {
                        priority: entries.len() as u32,
                        src: r.src.clone(),
                        dst: r.dst.clone(),
                        proto: s.proto,
                        src_ports: Vec::new(),
                        dst_ports: s.dst_ports.into_iter().collect(),
                        icmp_type: s.icmp_type,
                        icmp_code: s.icmp_code,
                        action,
                        provenance: r.provenance.clone(),
                        log: r.log,
                        inspect: r.inspect.clone(),
                        redirect: r.redirect.clone(),
                    });
                }
            }
            let next = entries.len() as u32;
            for e in &mut entries[level_start..] {
                if let EntryAction::Pass { next: n } = &mut e.action {
                    *n = next;
                }
            }
        }
        CompiledChain {
            vnic: nic.name.clone(),
            direction: dir,
            entries,
            default: self.defaults[v].clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn addr_set_ops() {
        let ext = AddrSet {
            nets: any_nets(),
            except: vec![net("10.0.0.1/32")],
        };
        assert!(ext.contains("8.8.8.8".parse().unwrap()));
        assert!(!ext.contains("10.0.0.1".parse().unwrap()));
        let p = ext.to_prefixes();
        assert_eq!(p.len(), 32 + 1);
        assert!(AddrSet::any().covers(&ext));
        assert!(!ext.covers(&AddrSet::any()));
        let a = AddrSet::from_nets(&[net("10.0.0.0/25"), net("10.0.0.128/25")]);
        assert_eq!(a.nets, vec![net("10.0.0.0/24")]);
        assert!(a.covers(&AddrSet::from_nets(&[net("10.0.0.7/32")])));
        assert!(a.intersects(&ext));
        assert!(!AddrSet::from_nets(&[net("10.0.0.1/32")]).intersects(&ext));
    }

    #[test]
    fn bitset() {
        let mut b = BitSet::new(130);
        b.set(0, true);
        b.set(129, true);
        b.set(64, true);
        b.set(64, false);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 129]);
        assert!(!b.get(500));
    }
}

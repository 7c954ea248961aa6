//! The rule lookup the engine classifies new flows with.
//!
//! The engine asks one question per chain: what does this vNIC's egress (or
//! ingress) chain say about this flow? [`PolicyLookup`] answers it with the
//! policy compiler's chains (a linear walk); [`crate::ClassifiedLookup`]
//! answers the same trait with one multi-field classifier per policy level,
//! and the engine does not know which it has.

use core::net::IpAddr;
use std::collections::HashMap;
use std::sync::Arc;

use palisade_policy::compile::Compiler;
use palisade_policy::eval::{Direction, Flow};
use palisade_policy::model::{Action, Level, ServiceChain};

use crate::port::canonical_ip;

/// One chain's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainVerdict {
    /// `allow`, `deny` or `reject`.
    pub action: Action,
    /// The deciding rule's id (`default` when the chain default applied).
    pub rule: Arc<str>,
    /// The level of the deciding rule (or of the default that applied).
    pub level: Level,
    /// The policy version that decided.
    pub policy_version: u64,
    /// The deciding rule's inspection profile (`None` for a default, or a
    /// rule without `inspect`).
    pub inspect: Option<Arc<str>>,
    /// The service chain the deciding rule steers an allowed flow through.
    pub redirect: Option<Arc<str>>,
}

/// Rule lookup per vNIC chain.
pub trait ChainLookup {
    /// The managed vNIC that owns `ip`, if any.
    fn vnic_of(&self, ip: IpAddr) -> Option<&str>;
    /// The verdict of `vnic`'s `direction` chain on `flow`; `None` when the vNIC has no chains.
    fn decide(&self, vnic: &str, direction: Direction, flow: &Flow) -> Option<ChainVerdict>;
    /// The verdict of `vnic`'s `direction` chain on an ICMP error related to
    /// a tracked connection (`flow`: the error's own addresses, type and
    /// code): the first matching rule that names its ICMP type decides
    /// ([`palisade_policy::compile::CompiledChain::decide_related`]); `None`
    /// when none does (the error passes: defaults do not apply) or the vNIC
    /// has no chains.
    fn decide_related(&self, vnic: &str, direction: Direction, flow: &Flow) -> Option<ChainVerdict>;
    /// The policy version this lookup implements.
    fn version(&self) -> u64;
    /// The inspection profile of a flow both chains allowed (`src`/`dst`:
    /// the managed vNICs of its ends, `verdicts`: their egress and ingress
    /// verdicts), resolved as the reference evaluator resolves it
    /// ([`palisade_policy::eval::inspection_profile`]); `None` when the flow
    /// is not inspected (no profile, or one that runs no signatures). The
    /// default inspects nothing.
    fn inspection(
        &self,
        src: Option<&str>,
        dst: Option<&str>,
        verdicts: [Option<&ChainVerdict>; 2],
    ) -> Option<Arc<str>> {
        let _ = (src, dst, verdicts);
        None
    }

    /// The service chains the policy declares (rules `redirect` to them by name).
    fn service_chains(&self) -> &[ServiceChain] {
        &[]
    }
}

/// One lookup shared by several engines (one per datapath worker): the
/// compiled policy is read-only once built, so the workers need one copy of
/// it, not one each.
impl<T: ChainLookup + ?Sized> ChainLookup for Arc<T> {
    fn vnic_of(&self, ip: IpAddr) -> Option<&str> {
        (**self).vnic_of(ip)
    }

    fn decide(&self, vnic: &str, direction: Direction, flow: &Flow) -> Option<ChainVerdict> {
        (**self).decide(vnic, direction, flow)
    }

    fn decide_related(&self, vnic: &str, direction: Direction, flow: &Flow) -> Option<ChainVerdict> {
        (**self).decide_related(vnic, direction, flow)
    }

    fn version(&self) -> u64 {
        (**self).version()
    }

    fn inspection(
        &self,
        src: Option<&str>,
        dst: Option<&str>,
        verdicts: [Option<&ChainVerdict>; 2],
    ) -> Option<Arc<str>> {
        (**self).inspection(src, dst, verdicts)
    }

    fn service_chains(&self) -> &[ServiceChain] {
        (**self).service_chains()
    }
}

/// [`ChainLookup`] over the policy compiler's chains.
#[derive(Debug, Clone)]
pub struct PolicyLookup {
    // Shared, so a holder that keeps the compiled policy to recompile from
    // (the agent's controller watcher) need not copy it first.
    compiler: Arc<Compiler>,
    /// Read twice for every new flow: the fast hasher (the keys come from
    /// the policy, so traffic cannot make them collide).
    owners: HashMap<IpAddr, String, foldhash::fast::RandomState>,
    /// Each managed vNIC's zone (read once per allowed new flow, for its
    /// inspection profile's traffic class).
    zones: HashMap<String, String, foldhash::fast::RandomState>,
    /// The policy's profiles that run signatures, shared so that resolving
    /// a flow's profile allocates nothing.
    profiles: Vec<Arc<str>>,
}

impl PolicyLookup {
    /// Wrap a compiler (owned, or shared as an `Arc`).
    pub fn new(compiler: impl Into<Arc<Compiler>>) -> Self {
        let compiler = compiler.into();
        let owners = compiler
            .model()
            .inventory
            .vnics()
            .flat_map(|(_, n)| n.ips.iter().map(|ip| (canonical_ip(*ip), n.name.clone())))
            .collect();
        let model = compiler.model();
        let zones = model
            .inventory
            .vnics()
            .map(|(_, n)| (n.name.clone(), n.zone.clone()))
            .collect();
        let profiles = model
            .policy
            .profiles
            .iter()
            .filter(|p| !p.signatures.is_empty())
            .map(|p| Arc::from(p.name.as_str()))
            .collect();
        PolicyLookup {
            compiler,
            owners,
            zones,
            profiles,
        }
    }

    /// The compiler.
    pub fn compiler(&self) -> &Compiler {
        &self.compiler
    }
}

impl ChainLookup for PolicyLookup {
    fn vnic_of(&self, ip: IpAddr) -> Option<&str> {
        self.owners.get(&canonical_ip(ip)).map(String::as_str)
    }

    fn decide(&self, vnic: &str, direction: Direction, flow: &Flow) -> Option<ChainVerdict> {
        let d = self.compiler.chain(vnic, direction)?.decide(flow);
        Some(ChainVerdict {
            action: d.action,
            rule: d.provenance.rule_id.clone(),
            level: d.provenance.level,
            policy_version: d.provenance.policy_version,
            inspect: d.entry.and_then(|e| e.inspect.clone()),
            redirect: d.entry.and_then(|e| e.redirect.clone()),
        })
    }

    fn decide_related(&self, vnic: &str, direction: Direction, flow: &Flow) -> Option<ChainVerdict> {
        let d = self.compiler.chain(vnic, direction)?.decide_related(flow)?;
        Some(ChainVerdict {
            action: d.action,
            rule: d.provenance.rule_id.clone(),
            level: d.provenance.level,
            policy_version: d.provenance.policy_version,
            inspect: d.entry.and_then(|e| e.inspect.clone()),
            redirect: None,
        })
    }

    fn version(&self) -> u64 {
        self.compiler.model().policy.version
    }

    fn inspection(
        &self,
        src: Option<&str>,
        dst: Option<&str>,
        verdicts: [Option<&ChainVerdict>; 2],
    ) -> Option<Arc<str>> {
        let zone = |v: Option<&str>| v.and_then(|v| self.zones.get(v)).map(String::as_str);
        let explicit = verdicts.map(|v| v.and_then(|v| v.inspect.as_deref()));
        let name = palisade_policy::eval::inspection_profile(self.compiler.model(), explicit, zone(src), zone(dst))?;
        // A profile that runs no signatures (or none the policy declares) inspects nothing.
        self.profiles.iter().find(|p| &***p == name).cloned()
    }

    fn service_chains(&self) -> &[ServiceChain] {
        &self.compiler.model().policy.service_chains
    }
}

//! The engine's policy decision.
//!
//! A flow is classified once against the source vNIC's egress chain and the
//! destination vNIC's ingress chain (through [`ChainLookup`]); an ICMP error
//! related to a connection by the rules naming its type only. Also the one
//! conversion of a flow key into the policy's [`Flow`] ([`policy_flow`]),
//! which `palisade policy what-if` uses too.

use core::num::NonZeroU8;
use std::sync::Arc;

use palisade_policy::eval::{Direction, Flow};
use palisade_policy::model::Action;
use palisade_wire::flow::FlowKey;
use palisade_wire::ip::IpProtocol;

use crate::lookup::ChainVerdict;
use crate::verdict::{DropReason, InspectProfile};

use super::{Engine, canonical};

/// Rule-registry indices of the egress and ingress verdicts of a flow.
pub(super) type RuleRefs = [Option<u32>; 2];

/// An allowed flow's classification: its deciding rules, its inspection
/// profile and the service chain it is steered through.
#[derive(Debug, Clone, Copy)]
pub(super) struct Classified {
    pub rules: RuleRefs,
    pub inspect: Option<InspectProfile>,
    pub chain: Option<u16>,
}

/// What both ends' chains decided on a new flow (`None` where that end is
/// not managed: no vNIC here, or no chains).
struct EndDecisions<'a> {
    /// The source's vNIC.
    src: Option<&'a str>,
    /// The destination's vNIC.
    dst: Option<&'a str>,
    /// The source vNIC's egress chain's verdict.
    egress: Option<ChainVerdict>,
    /// The destination vNIC's ingress chain's verdict.
    ingress: Option<ChainVerdict>,
}

impl EndDecisions<'_> {
    /// At least one end's chain decided.
    fn managed(&self) -> bool {
        self.egress.is_some() || self.ingress.is_some()
    }

    /// No deciding chain denies or rejects.
    fn allowed(&self) -> bool {
        [&self.egress, &self.ingress]
            .into_iter()
            .flatten()
            .all(|v| v.action == Action::Allow)
    }
}

impl Engine {
    /// Classify a flow once: the source's egress chain and the destination's
    /// ingress chain. Returns the deciding rules' counter indices, the
    /// inspection profile and the service chain an allowed flow is steered
    /// through (the egress rule's `redirect`, else the ingress rule's), or
    /// the rules with the drop reason when denied.
    pub(super) fn classify(&mut self, key: &FlowKey) -> Result<Classified, (RuleRefs, DropReason)> {
        self.counters.classifications += 1;
        let ends = self.decide_ends(key);
        if !ends.managed() {
            // Neither end is managed: nothing here may forward it.
            return Err(([None; 2], DropReason::PolicyDeny));
        }
        // Resolved once, here, for the connection's life: the fast path
        // only copies the number the connection keeps.
        let inspect = self.inspection_name(&ends);
        let redirect = [&ends.egress, &ends.ingress]
            .into_iter()
            .flatten()
            .find_map(|v| v.redirect.clone());
        let EndDecisions { egress, ingress, .. } = ends;
        let rules = self.rule_verdicts([egress, ingress])?;
        let inspect = inspect.and_then(|name| self.inspect_profile_id(name));
        // A chain this engine does not know (none declared under that name)
        // steers nothing: validation refuses such a policy.
        let chain = redirect.and_then(|c| self.services.index_of(&c));
        Ok(Classified { rules, inspect, chain })
    }

    /// The inspection profile of a connection whose initiator's cache entry
    /// is gone (imported with a current verdict, or evicted), so that it is
    /// not classified again: the profile [`Engine::classify`] would give it,
    /// decided by the same code, nothing counted.
    pub(super) fn inspection_of(&mut self, key: &FlowKey) -> Option<InspectProfile> {
        let ends = self.decide_ends(key);
        let name = self.inspection_name(&ends)?;
        self.inspect_profile_id(name)
    }

    /// Both ends' chains on a new flow: the source vNIC's egress chain and
    /// the destination vNIC's ingress chain.
    fn decide_ends(&self, key: &FlowKey) -> EndDecisions<'_> {
        let flow = policy_flow(key);
        let src = self.lookup.vnic_of(flow.src);
        let dst = self.lookup.vnic_of(flow.dst);
        EndDecisions {
            src,
            dst,
            egress: src.and_then(|v| self.lookup.decide(v, Direction::Egress, &flow)),
            ingress: dst.and_then(|v| self.lookup.decide(v, Direction::Ingress, &flow)),
        }
    }

    /// The one decision of a flow's inspection profile (its name): none
    /// unless an end is managed and every managed end's chain allows the
    /// flow; then the deciding rule's `inspect`, egress first, else the
    /// traffic class's default ([`ChainLookup::inspection`]).
    ///
    /// [`ChainLookup::inspection`]: crate::lookup::ChainLookup::inspection
    fn inspection_name(&self, ends: &EndDecisions<'_>) -> Option<Arc<str>> {
        if !ends.managed() || !ends.allowed() {
            return None;
        }
        self.lookup
            .inspection(ends.src, ends.dst, [ends.egress.as_ref(), ends.ingress.as_ref()])
    }

    /// The number of inspection profile `name`, numbering it if new.
    /// Names are few (a policy's profiles); past [`InspectProfile::MAX`]
    /// the numbering starts over at the next policy change, and until then
    /// an unnumbered profile is the first one's (inspected, never skipped).
    fn inspect_profile_id(&mut self, name: Arc<str>) -> Option<InspectProfile> {
        let at = match self.inspect_names.iter().position(|n| *n == name) {
            Some(i) => i,
            None if self.inspect_names.len() < InspectProfile::MAX => {
                self.inspect_names.push(name);
                self.inspect_names.len() - 1
            }
            None => 0,
        };
        NonZeroU8::new(u8::try_from(at + 1).ok()?).map(InspectProfile)
    }

    /// Decide an ICMP error related to a tracked connection: each managed
    /// end's chain by its rules naming the error's type only; no such rule,
    /// no objection (defaults do not apply to related errors). A deny or a
    /// reject drops it as [`DropReason::PolicyDeny`]: nothing answers an error.
    pub(super) fn classify_related(&mut self, key: &FlowKey) -> Result<RuleRefs, (RuleRefs, DropReason)> {
        let flow = policy_flow(key);
        let src = self.lookup.vnic_of(flow.src);
        let dst = self.lookup.vnic_of(flow.dst);
        let eg = src.and_then(|v| self.lookup.decide_related(v, Direction::Egress, &flow));
        let ig = dst.and_then(|v| self.lookup.decide_related(v, Direction::Ingress, &flow));
        self.rule_verdicts([eg, ig])
            .map_err(|(rules, _)| (rules, DropReason::PolicyDeny))
    }

    /// Count the chains' deciding rules and combine their verdicts: allowed
    /// iff no chain denies or rejects.
    pub(super) fn rule_verdicts(
        &mut self,
        verdicts: [Option<ChainVerdict>; 2],
    ) -> Result<RuleRefs, (RuleRefs, DropReason)> {
        let mut rules = [None; 2];
        let mut denied = None;
        for (slot, v) in rules.iter_mut().zip(verdicts) {
            let Some(v) = v else { continue };
            let idx = self.rule_counter(&v.rule, v.level);
            if let Some(r) = self.rules.get_mut(idx as usize) {
                r.tally.hits += 1;
            }
            *slot = Some(idx);
            if denied.is_none() && v.action != Action::Allow {
                denied = Some(if v.action == Action::Reject {
                    DropReason::PolicyReject
                } else {
                    DropReason::PolicyDeny
                });
            }
        }
        match denied {
            Some(r) => Err((rules, r)),
            None => Ok(rules),
        }
    }
}

/// The policy's view of a flow key (ICMP: type and code in the ports, as
/// the policy's flows carry them).
pub fn policy_flow(key: &FlowKey) -> Flow {
    let (src_port, dst_port) = if key.protocol == IpProtocol::ICMP || key.protocol == IpProtocol::ICMPV6 {
        (u16::from(key.icmp_type), u16::from(key.icmp_code))
    } else {
        (key.src_port, key.dst_port)
    };
    Flow {
        src: canonical(key.src_addr()),
        dst: canonical(key.dst_addr()),
        proto: key.protocol.0,
        src_port,
        dst_port,
    }
}

#[cfg(test)]
mod tests {
    use palisade_wire::flow::{self, Segment};

    use super::*;

    #[test]
    fn policy_flows_of_icmp_keys_carry_type_and_code() {
        let mut q = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];
        q.extend_from_slice(&[0, 0, 0, 0, 0x12, 0x34, 0, 1]);
        let reply = flow::extract_quoted(&q, Segment::vlan(1)).unwrap();
        assert_eq!((reply.src_port, reply.dst_port), (0x1234, 0x1234));
        let f = policy_flow(&reply);
        assert_eq!((f.src_port, f.dst_port), (0, 0), "an echo reply is type 0");
        let f = policy_flow(&reply.reversed());
        assert_eq!((f.src_port, f.dst_port), (8, 0), "its request is type 8");
        q[20..22].copy_from_slice(&[13, 1]);
        let f = policy_flow(&flow::extract_quoted(&q, Segment::vlan(1)).unwrap());
        assert_eq!((f.src_port, f.dst_port), (13, 1));
    }
}

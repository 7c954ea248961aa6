//! The engine's counters: engine-wide, per port (packets, bytes,
//! connections started, drops by reason) and per rule (the registry of
//! rules that decided flows here, each with its classifications, packets
//! and bytes, which flow events refer to by index).

use std::sync::Arc;

use palisade_policy::model::Level;

use crate::port::PortId;
use crate::verdict::{Counters, DropReason, Tally};

use super::{Engine, Packet, RULES_BY_ADDRESS, RuleRefs};

/// A rule that decided flows on this engine (see [`Engine::rule_info`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    /// The rule id (`default` for a zone or datacenter default).
    pub rule: Arc<str>,
    /// Its level.
    pub level: Level,
    /// Packets, bytes and flows it decided.
    pub tally: Tally,
}

impl Engine {
    /// Engine counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Packets and bytes received from a port, and connections it started.
    pub fn port_tally(&self, port: PortId) -> Tally {
        self.port_tallies.get(usize::from(port.0)).copied().unwrap_or_default()
    }

    /// Drops for `reason` of frames received from `port`.
    pub fn port_dropped(&self, port: PortId, reason: DropReason) -> u64 {
        self.port_drops
            .get(usize::from(port.0))
            .map_or(0, |d| d[reason.index()])
    }

    /// A rule's tally: classifications it decided (`hits`), packets and bytes of its flows.
    /// (A rule id names one rule; `default` sums the defaults of every level.)
    pub fn rule_tally(&self, rule: &str) -> Tally {
        self.rules
            .iter()
            .filter(|r| &*r.rule == rule)
            .fold(Tally::default(), |a, r| Tally {
                packets: a.packets + r.tally.packets,
                bytes: a.bytes + r.tally.bytes,
                hits: a.hits + r.tally.hits,
            })
    }

    /// The rule behind a registry index of a [`crate::FlowEvent`]'s `rules`.
    pub fn rule_info(&self, index: u32) -> Option<&RuleInfo> {
        self.rules.get(index as usize)
    }

    /// Every rule that has decided a flow on this engine, with its tally.
    pub fn rules(&self) -> &[RuleInfo] {
        &self.rules
    }

    pub(super) fn rule_counter(&mut self, rule: &Arc<str>, level: Level) -> u32 {
        let address = (Arc::as_ptr(rule).cast::<u8>() as usize, level);
        if let Some(&(_, i)) = self.rules_by_address.get(&address) {
            return i;
        }
        let key = (rule.clone(), level);
        let i = match self.rule_index.get(&key) {
            Some(&i) => i,
            None => {
                let i = self.rules.len() as u32;
                self.rules.push(RuleInfo {
                    rule: rule.clone(),
                    level,
                    tally: Tally::default(),
                });
                self.rule_index.insert(key, i);
                i
            }
        };
        if self.rules_by_address.len() >= RULES_BY_ADDRESS {
            // A lookup that makes a new id per verdict would otherwise grow it without end.
            self.rules_by_address.clear();
        }
        self.rules_by_address.insert(address, (rule.clone(), i));
        i
    }

    /// Count the packet for the rules that decided its flow (once: not again on a routed flow's second leg).
    #[inline(always)]
    pub(super) fn tally_rules(&mut self, pkt: &Packet, rules: RuleRefs) {
        if pkt.second_leg {
            return;
        }
        let (packets, bytes) = (pkt.packets, pkt.len as u64);
        // One rule deciding both chains carries the packet once.
        let second = if rules[1] == rules[0] { None } else { rules[1] };
        for i in [rules[0], second].into_iter().flatten() {
            if let Some(r) = self.rules.get_mut(i as usize) {
                r.tally.add_n(packets, bytes);
            }
        }
    }
}

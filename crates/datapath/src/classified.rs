//! A [`ChainLookup`] backed by the classify layer's decision trees.
//!
//! [`PolicyLookup`] walks a compiled chain entry by entry; under a SYN flood
//! or a port scan every packet is a new flow, so that walk bounds the packet
//! rate. [`ClassifiedLookup`] gives the same answers with one
//! [`SplitClassifier`] lookup per `pass` level instead.
//!
//! **Levels.** A `pass` entry jumps to the first entry whose priority is at
//! least its `next`. Cutting a chain at every `pass` target gives levels in
//! which first match is plain first match: within a level the best-priority
//! matching entry decides, a `pass` continues at the level starting at its
//! target, and no match continues with the following level. That holds as
//! long as every `pass` jumps forward (`next` above its own priority), which
//! the compiler guarantees and construction checks; a chain where it does not
//! hold keeps [`PolicyLookup`]'s linear walk (see
//! [`ClassifiedLookup::fallback_chains`]).
//!
//! **Rules.** Each entry becomes one classifier rule per source prefix ×
//! destination prefix of the same family × source port range × destination
//! port range, the ICMP type and code folded into the source and destination
//! port ranges (the flow carries them there). The rule's action is the
//! entry's index, so a match finds the entry's outcome directly.
//!
//! **Mixed families.** A classifier key has one family; a flow whose source
//! and destination families differ (no real packet does) is answered by the
//! linear walk, which is what it means for the compiled chain.

use core::net::IpAddr;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use palisade_classify::{Classifier, Key, Prefix, Rule, SplitClassifier};
use palisade_policy::compile::{ChainEntry, CompiledChain, Compiler, EntryAction};
use palisade_policy::eval::{Direction, Flow};

use crate::lookup::{ChainLookup, ChainVerdict, PolicyLookup};

/// A chain that would expand to more classifier rules than this keeps the
/// linear walk: the expansion is a cross product and must stay bounded.
pub const MAX_RULES_PER_CHAIN: usize = 1 << 20;

/// What a matching entry does.
#[derive(Debug, Clone)]
enum Step {
    /// Allow, deny or reject: the chain's answer.
    Decide(ChainVerdict),
    /// `pass`: continue at this level index (`levels.len()` = the default).
    Jump(usize),
}

/// The entries of one `pass` level, as a classifier.
#[derive(Debug, Clone)]
struct Level {
    classifier: SplitClassifier,
}

/// One chain, classified.
#[derive(Debug, Clone)]
struct FastChain {
    levels: Vec<Level>,
    /// Per chain entry index.
    steps: Vec<Step>,
    default: ChainVerdict,
    rules: usize,
}

#[derive(Debug, Clone)]
enum Table {
    Fast(Box<FastChain>),
    /// The chain's shape defeats the level scheme: walk it.
    Linear,
}

/// [`ChainLookup`] over per-level [`SplitClassifier`]s; answers exactly as [`PolicyLookup`].
#[derive(Debug, Clone)]
pub struct ClassifiedLookup {
    linear: PolicyLookup,
    /// Per vNIC name: `[egress, ingress]`, indexed by `Direction as usize`.
    tables: HashMap<String, [Table; 2]>,
    fallbacks: usize,
    rules: usize,
}

impl ClassifiedLookup {
    /// Build classifiers for every chain of `compiler`.
    pub fn new(compiler: Compiler) -> Self {
        let mut tables = HashMap::new();
        let mut fallbacks = 0;
        let mut rules = 0;
        for chain in compiler.chains() {
            let table = match FastChain::build(chain) {
                Some(f) => {
                    rules += f.rules;
                    Table::Fast(Box::new(f))
                }
                None => {
                    fallbacks += 1;
                    Table::Linear
                }
            };
            let slot = tables
                .entry(chain.vnic.clone())
                .or_insert_with(|| [Table::Linear, Table::Linear]);
            slot[chain.direction as usize] = table;
        }
        ClassifiedLookup {
            linear: PolicyLookup::new(compiler),
            tables,
            fallbacks,
            rules,
        }
    }

    /// The compiler.
    pub fn compiler(&self) -> &Compiler {
        self.linear.compiler()
    }

    /// How many chains (vNIC × direction) kept the linear walk.
    pub fn fallback_chains(&self) -> usize {
        self.fallbacks
    }

    /// Classifier rules installed over all chains.
    pub fn rule_count(&self) -> usize {
        self.rules
    }
}

impl ChainLookup for ClassifiedLookup {
    fn vnic_of(&self, ip: IpAddr) -> Option<&str> {
        self.linear.vnic_of(ip)
    }

    fn decide(&self, vnic: &str, direction: Direction, flow: &Flow) -> Option<ChainVerdict> {
        let tables = self.tables.get(vnic)?;
        // The table exists for both directions of every vNIC with chains.
        let Table::Fast(fast) = &tables[direction as usize] else {
            return self.linear.decide(vnic, direction, flow);
        };
        match key_of(flow) {
            Some(key) => Some(fast.decide(&key)),
            None => self.linear.decide(vnic, direction, flow),
        }
    }

    /// Related ICMP errors are rare and decided by the few entries naming
    /// an ICMP type: the compiled chain's own walk over them.
    fn decide_related(&self, vnic: &str, direction: Direction, flow: &Flow) -> Option<ChainVerdict> {
        self.linear.decide_related(vnic, direction, flow)
    }

    fn inspection(
        &self,
        src: Option<&str>,
        dst: Option<&str>,
        verdicts: [Option<&ChainVerdict>; 2],
    ) -> Option<Arc<str>> {
        self.linear.inspection(src, dst, verdicts)
    }

    fn version(&self) -> u64 {
        self.linear.version()
    }

    fn service_chains(&self) -> &[palisade_policy::model::ServiceChain] {
        self.linear.service_chains()
    }
}

/// The classifier key of `flow`; `None` when its addresses' families differ.
fn key_of(flow: &Flow) -> Option<Key> {
    match (flow.src, flow.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Some(Key::v4(
            u32::from(s),
            u32::from(d),
            flow.src_port,
            flow.dst_port,
            flow.proto,
            0,
        )),
        (IpAddr::V6(s), IpAddr::V6(d)) => Some(Key::v6(
            u128::from(s),
            u128::from(d),
            flow.src_port,
            flow.dst_port,
            flow.proto,
            0,
        )),
        _ => None,
    }
}

impl FastChain {
    /// Classify `chain`; `None` when the level scheme does not apply or the rules overflow.
    fn build(chain: &CompiledChain) -> Option<FastChain> {
        let entries = &chain.entries;
        // Level starts: the chain start and every pass target.
        let mut starts = BTreeSet::from([0u32]);
        for e in entries {
            if let EntryAction::Pass { next } = e.action {
                // A backward or in-place jump would re-enter a level: not first match per level.
                if next <= e.priority {
                    return None;
                }
                starts.insert(next);
            }
        }
        // Priorities ascend, so each entry's level is the last start at or below it.
        let starts: Vec<u32> = starts.into_iter().collect();
        let mut per_level: Vec<Vec<Rule>> = vec![Vec::new(); starts.len()];
        let mut rules = 0usize;
        for (i, e) in entries.iter().enumerate() {
            if i > 0 && entries[i - 1].priority >= e.priority {
                return None;
            }
            let level = starts.partition_point(|&s| s <= e.priority) - 1;
            let index = u32::try_from(i).ok()?;
            let before = per_level[level].len();
            expand(e, index, &mut per_level[level]);
            rules += per_level[level].len() - before;
            if rules > MAX_RULES_PER_CHAIN {
                return None;
            }
        }
        // Drop empty levels; a jump goes to the first kept level starting at or after its target.
        let mut kept_starts = Vec::new();
        let mut levels = Vec::new();
        for (start, rs) in starts.iter().zip(per_level) {
            if rs.is_empty() {
                continue;
            }
            kept_starts.push(*start);
            levels.push(Level {
                classifier: SplitClassifier::from_rules(&rs).ok()?,
            });
        }
        let verdict = |p: &palisade_policy::eval::Provenance,
                       action,
                       inspect: Option<Arc<str>>,
                       redirect: Option<&Arc<str>>| ChainVerdict {
            action,
            rule: p.rule_id.clone(),
            level: p.level,
            policy_version: p.policy_version,
            inspect,
            redirect: redirect.cloned(),
        };
        let steps = entries
            .iter()
            .map(|e| match e.action {
                EntryAction::Pass { next } => Step::Jump(kept_starts.partition_point(|&s| s < next)),
                a => Step::Decide(verdict(
                    &e.provenance,
                    a.action(),
                    e.inspect.clone(),
                    e.redirect.as_ref(),
                )),
            })
            .collect();
        Some(FastChain {
            levels,
            steps,
            default: verdict(&chain.default.1, chain.default.0, None, None),
            rules,
        })
    }

    fn decide(&self, key: &Key) -> ChainVerdict {
        let mut level = 0;
        while let Some(l) = self.levels.get(level) {
            let Some(m) = l.classifier.lookup(key) else {
                level += 1;
                continue;
            };
            // Actions are entry indices, set at construction.
            match self.steps.get(m.action as usize) {
                Some(Step::Decide(v)) => return v.clone(),
                // Jumps go strictly forward (checked at construction), so this terminates.
                Some(Step::Jump(next)) => level = *next,
                None => level += 1,
            }
        }
        self.default.clone()
    }
}

/// Push the classifier rules of entry `index` onto `out`.
fn expand(e: &ChainEntry, index: u32, out: &mut Vec<Rule>) {
    let ranges = |r: &[(u16, u16)], point: Option<u8>| -> Vec<(u16, u16)> {
        let all = [(0, u16::MAX)];
        let r = if r.is_empty() { &all[..] } else { r };
        match point {
            None => r.to_vec(),
            Some(p) => {
                let p = u16::from(p);
                r.iter()
                    .filter(|&&(lo, hi)| lo <= p && p <= hi)
                    .map(|_| (p, p))
                    .take(1)
                    .collect()
            }
        }
    };
    let sports = ranges(&e.src_ports, e.icmp_type);
    let dports = ranges(&e.dst_ports, e.icmp_code);
    if sports.is_empty() || dports.is_empty() {
        return;
    }
    let prefixes = |set: &palisade_policy::compile::AddrSet| -> Vec<Prefix> {
        set.to_prefixes()
            .iter()
            .filter_map(|n| match n.network() {
                IpAddr::V4(a) => Prefix::v4(u32::from(a), n.prefix_len()).ok(),
                IpAddr::V6(a) => Prefix::v6(u128::from(a), n.prefix_len()).ok(),
            })
            .collect()
    };
    let (srcs, dsts) = (prefixes(&e.src), prefixes(&e.dst));
    for src in &srcs {
        for dst in dsts.iter().filter(|d| d.family() == src.family()) {
            for &sp in &sports {
                for &dp in &dports {
                    out.push(Rule {
                        // Entry order is priority order within the chain.
                        priority: index,
                        src: *src,
                        dst: *dst,
                        src_ports: sp,
                        dst_ports: dp,
                        proto: e.proto,
                        tcp_flags: (0, 0),
                        meta: (0, 0),
                        action: index,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_classify::Family;
    use palisade_policy::compile::AddrSet;
    use palisade_policy::eval::Provenance;
    use palisade_policy::model::{Action, Level};
    use std::sync::Arc;

    #[test]
    fn families_are_kept_apart_in_keys() {
        let f = Flow {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            proto: 6,
            src_port: 1,
            dst_port: 2,
        };
        let k = key_of(&f).unwrap();
        assert_eq!(k.family, Family::V4);
        assert_eq!(k.src, 0x0a00_0001);
        let mixed = Flow {
            dst: "::1".parse().unwrap(),
            ..f
        };
        assert!(key_of(&mixed).is_none());
    }

    fn entry(priority: u32, proto: Option<u8>, dst_ports: Vec<(u16, u16)>, action: EntryAction) -> ChainEntry {
        ChainEntry {
            priority,
            src: Arc::new(AddrSet::any()),
            dst: Arc::new(AddrSet::from_nets(&[
                "10.0.0.0/8".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ])),
            proto,
            src_ports: Vec::new(),
            dst_ports,
            icmp_type: None,
            icmp_code: None,
            action,
            provenance: Provenance {
                level: Level::Datacenter,
                rule_id: format!("r{priority}").into(),
                policy_version: 7,
                scope: None,
            },
            log: false,
            inspect: None,
            // Every third entry steers, so the classifier must carry the chain too.
            redirect: (priority % 3 == 0).then(|| Arc::from("chain")),
        }
    }

    fn chain(entries: Vec<ChainEntry>) -> CompiledChain {
        let default = Provenance {
            level: Level::Datacenter,
            rule_id: "default".into(),
            policy_version: 7,
            scope: None,
        };
        CompiledChain {
            vnic: "v".into(),
            direction: Direction::Egress,
            entries,
            default: (Action::Deny, default),
        }
    }

    #[test]
    fn pass_skips_whole_levels_and_the_rest_of_its_own() {
        let ssh = vec![(22, 22)];
        let c = chain(vec![
            // Level 0: SSH jumps over level 10 straight to 20; UDP goes to 10.
            entry(0, Some(6), ssh.clone(), EntryAction::Pass { next: 20 }),
            entry(1, Some(17), Vec::new(), EntryAction::Pass { next: 10 }),
            entry(2, Some(6), vec![(20, 30)], EntryAction::Deny),
            // Level 10.
            entry(10, Some(6), Vec::new(), EntryAction::Allow),
            entry(11, None, Vec::new(), EntryAction::Reject),
            // Level 20, and a pass past the end.
            entry(20, Some(6), ssh, EntryAction::Reject),
            entry(21, Some(17), vec![(53, 53)], EntryAction::Pass { next: 99 }),
            entry(22, None, vec![(0, 100)], EntryAction::Allow),
        ]);
        let fast = FastChain::build(&c).unwrap();
        assert_eq!(fast.levels.len(), 3);
        let mut checked = 0;
        for dst in ["10.1.2.3", "11.0.0.1", "fd00::1", "fe80::1"] {
            for proto in [1u8, 6, 17, 47] {
                for port in [0u16, 20, 22, 25, 30, 53, 99, 100, 101, 65535] {
                    let src: IpAddr = if dst.contains(':') { "::1" } else { "1.1.1.1" }.parse().unwrap();
                    let flow = Flow {
                        src,
                        dst: dst.parse().unwrap(),
                        proto,
                        src_port: 1000,
                        dst_port: port,
                    };
                    let d = c.decide(&flow);
                    let want = ChainVerdict {
                        action: d.action,
                        rule: d.provenance.rule_id.clone(),
                        level: d.provenance.level,
                        policy_version: d.provenance.policy_version,
                        inspect: d.entry.and_then(|e| e.inspect.clone()),
                        redirect: d.entry.and_then(|e| e.redirect.clone()),
                    };
                    assert_eq!(fast.decide(&key_of(&flow).unwrap()), want, "{flow:?}");
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 160);
    }

    #[test]
    fn backward_pass_keeps_the_linear_walk() {
        let c = chain(vec![
            entry(0, None, Vec::new(), EntryAction::Deny),
            entry(5, Some(6), Vec::new(), EntryAction::Pass { next: 5 }),
        ]);
        assert!(FastChain::build(&c).is_none());
    }

    #[test]
    fn icmp_type_and_code_narrow_the_port_ranges() {
        let mut e = entry(0, Some(1), Vec::new(), EntryAction::Allow);
        e.icmp_type = Some(8);
        e.icmp_code = Some(0);
        let mut rules = Vec::new();
        expand(&e, 0, &mut rules);
        // One destination prefix per family, source `any` in both.
        assert_eq!(rules.len(), 2);
        assert!(rules.iter().all(|r| r.src_ports == (8, 8) && r.dst_ports == (0, 0)));
        // A type outside the entry's source ranges leaves nothing to match.
        e.src_ports = vec![(100, 200)];
        rules.clear();
        expand(&e, 0, &mut rules);
        assert!(rules.is_empty());
    }
}

//! Analysis: rules that can never decide, and rules whose order matters.
//!
//! Works on the compiled chains, so it sees exactly what the datapath will run,
//! across levels: a `vm` rule hidden by a `datacenter` rule is found the same
//! way as one hidden by the rule above it.
//!
//! An entry *i* is hidden by an earlier entry *j* of the same chain when *j*
//! covers it (source set ⊇, destination set ⊇, same or any protocol, port and
//! ICMP ranges ⊇) and is reachable for those flows: *j* is final (allow, deny,
//! reject), or *j* is a `pass` of *i*'s own level; and no `pass` before *j* in
//! *j*'s level overlaps *i* (such a pass could jump flows past *j*; this is
//! conservative: a hider is not claimed when it might be jumped over).
//! Address containment is exact (CIDR arithmetic), and so are protocol, port
//! and ICMP containment. Services are compared element by element (each
//! element is its own entry), so `dns: [udp/53, tcp/53]` is found redundant
//! after one rule for `udp/53` and another for `tcp/53`. What is not detected
//! is one entry covered only by the *union* of several earlier entries (ports
//! 5000-5499 and 5500-5999 together covering 5000-5999; two groups together
//! covering a third): findings are sound (never claimed falsely) but not complete.
//!
//! A rule is reported when *every* entry it has in *every* chain is hidden:
//! *shadowed* if some hider's action differs (it would have decided otherwise),
//! *redundant* if all hiders do the same thing. A rule installed on no chain is
//! *unused*. A *conflict* is an earlier rule with a different final action
//! that overlaps a later one partially (neither covers the other): their order
//! decides some flows. A later rule that covers an earlier one with another
//! action (an exception written before the general rule) is the intended
//! pattern and is not reported.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::compile::{ChainEntry, CompiledChain, Compiler, EntryAction};
use crate::model::{Action, Level, Model};

/// What was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FindingKind {
    /// Never decides, and an earlier rule with a different action decides instead.
    Shadowed,
    /// Never decides, and an earlier rule with the same action makes it unnecessary.
    Redundant,
    /// Overlaps an earlier rule with a different action: order matters.
    Conflict,
    /// Installed on no vNIC's chain.
    Unused,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Kind.
    pub kind: FindingKind,
    /// The rule concerned.
    pub rule_id: String,
    /// Its level.
    pub level: Level,
    /// The earlier rule that hides it or conflicts with it.
    pub by: Option<String>,
    /// The hider's level.
    pub by_level: Option<Level>,
    /// An example vNIC chain where it happens.
    pub example: Option<String>,
    /// Explanation.
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            FindingKind::Shadowed => "shadowed",
            FindingKind::Redundant => "redundant",
            FindingKind::Conflict => "conflict",
            FindingKind::Unused => "unused",
        };
        write!(f, "{kind}: rule {} ({}): {}", self.rule_id, self.level, self.message)
    }
}

fn ranges_cover(outer: &[(u16, u16)], inner: &[(u16, u16)]) -> bool {
    if outer.is_empty() {
        return true;
    }
    if inner.is_empty() {
        return false;
    }
    inner
        .iter()
        .all(|&(lo, hi)| outer.iter().any(|&(a, b)| a <= lo && hi <= b))
}

fn ranges_meet(a: &[(u16, u16)], b: &[(u16, u16)]) -> bool {
    a.is_empty() || b.is_empty() || a.iter().any(|&(lo, hi)| b.iter().any(|&(c, d)| lo <= d && c <= hi))
}

fn opt_cover<T: PartialEq>(outer: Option<T>, inner: Option<T>) -> bool {
    outer.is_none() || outer == inner
}

fn opt_meet<T: PartialEq>(a: Option<T>, b: Option<T>) -> bool {
    a.is_none() || b.is_none() || a == b
}

/// Whether every flow matching `i` matches `j`.
pub fn covers(j: &ChainEntry, i: &ChainEntry) -> bool {
    opt_cover(j.proto, i.proto)
        && ranges_cover(&j.src_ports, &i.src_ports)
        && ranges_cover(&j.dst_ports, &i.dst_ports)
        && opt_cover(j.icmp_type, i.icmp_type)
        && opt_cover(j.icmp_code, i.icmp_code)
        && j.src.covers(&i.src)
        && j.dst.covers(&i.dst)
}

/// Whether some flow could match both (exact on addresses, ports and protocol).
pub fn overlaps(a: &ChainEntry, b: &ChainEntry) -> bool {
    opt_meet(a.proto, b.proto)
        && ranges_meet(&a.src_ports, &b.src_ports)
        && ranges_meet(&a.dst_ports, &b.dst_ports)
        && opt_meet(a.icmp_type, b.icmp_type)
        && opt_meet(a.icmp_code, b.icmp_code)
        && a.src.intersects(&b.src)
        && a.dst.intersects(&b.dst)
}

#[derive(Default)]
struct RuleStats {
    level: Option<Level>,
    entries: usize,
    hidden: usize,
    hiders: Vec<(String, Level, Action)>,
    example: Option<String>,
}

/// The earlier entry hiding entry `i` of `chain`, if any.
fn hider(chain: &CompiledChain, i: usize) -> Option<&ChainEntry> {
    let e = &chain.entries[i];
    for j in 0..i {
        let h = &chain.entries[j];
        if h.provenance.rule_id == e.provenance.rule_id && h.provenance.level == e.provenance.level {
            continue;
        }
        let reachable = match h.action {
            EntryAction::Pass { .. } => h.provenance.level == e.provenance.level,
            _ => true,
        };
        if !reachable || !covers(h, e) {
            continue;
        }
        let jumped = chain.entries[..j].iter().any(|k| {
            matches!(k.action, EntryAction::Pass { .. }) && k.provenance.level == h.provenance.level && overlaps(k, e)
        });
        if !jumped {
            return Some(h);
        }
    }
    None
}

/// Analyze every rule of `model` through its compiled chains.
pub fn analyze(model: &Model, compiler: &Compiler) -> Vec<Finding> {
    let mut stats: BTreeMap<(Level, String), RuleStats> = BTreeMap::new();
    let mut conflict_example: BTreeMap<(Level, String, Level, String), String> = BTreeMap::new();
    for chain in compiler.chains() {
        for i in 0..chain.entries.len() {
            let e = &chain.entries[i];
            let key = (e.provenance.level, e.provenance.rule_id.to_string());
            let st = stats.entry(key.clone()).or_default();
            st.level = Some(e.provenance.level);
            if e.src.nets.is_empty() || e.dst.nets.is_empty() {
                // Dormant: a group it names is empty right now (validation warns
                // about empty selectors); it matches nothing, hides nothing.
                continue;
            }
            st.entries += 1;
            if let Some(h) = hider(chain, i) {
                st.hidden += 1;
                let hk = (h.provenance.rule_id.to_string(), h.provenance.level, h.action.action());
                if !st.hiders.contains(&hk) {
                    st.hiders.push(hk);
                }
                st.example
                    .get_or_insert_with(|| format!("{} {}", chain.vnic, chain.direction));
                continue;
            }
            // Partial overlap with an earlier final entry of another action, outside pass semantics.
            let Some(act) = final_action(e.action) else { continue };
            for h in &chain.entries[..i] {
                let Some(hact) = final_action(h.action) else { continue };
                // A later rule covering an earlier one entirely is the usual
                // "exception first, then the general rule" pattern (a generalization),
                // and an earlier one covering this one was handled as hiding (or
                // declined because a pass may jump it): only partial overlap is a conflict.
                if hact != act
                    && h.provenance.rule_id != e.provenance.rule_id
                    && overlaps(h, e)
                    && !covers(e, h)
                    && !covers(h, e)
                {
                    let ck = (
                        e.provenance.level,
                        key.1.clone(),
                        h.provenance.level,
                        h.provenance.rule_id.to_string(),
                    );
                    conflict_example
                        .entry(ck)
                        .or_insert_with(|| format!("{} {}", chain.vnic, chain.direction));
                }
            }
        }
    }
    let mut out = Vec::new();
    for rule in &model.policy.rules {
        let key = (rule.level, rule.id.clone());
        let Some(st) = stats.get(&key) else {
            out.push(Finding {
                kind: FindingKind::Unused,
                rule_id: rule.id.clone(),
                level: rule.level,
                by: None,
                by_level: None,
                example: None,
                message: "installed on no vNIC: no VM in its scope is in its `from` (egress) or `to` (ingress) \
                          and `applied_to`"
                    .into(),
            });
            continue;
        };
        if st.entries > 0 && st.hidden == st.entries {
            let differs = st.hiders.iter().find(|(_, _, a)| *a != rule.action);
            let (kind, (by, by_level, by_action)) = match differs {
                Some(h) => (FindingKind::Shadowed, h.clone()),
                None => (FindingKind::Redundant, st.hiders[0].clone()),
            };
            let message = match kind {
                FindingKind::Shadowed => format!(
                    "can never decide: {by_level} rule {by} ({by_action}) matches all its flows first, in every chain it is installed on"
                ),
                _ => format!(
                    "unnecessary: {by_level} rule {by} already {by_action}s all its flows, in every chain it is installed on"
                ),
            };
            out.push(Finding {
                kind,
                rule_id: rule.id.clone(),
                level: rule.level,
                by: Some(by),
                by_level: Some(by_level),
                example: st.example.clone(),
                message,
            });
        }
    }
    for ((level, id, hl, hid), ex) in conflict_example {
        let reported = out.iter().any(|f| f.rule_id == id && f.level == level);
        if reported {
            continue;
        }
        out.push(Finding {
            kind: FindingKind::Conflict,
            rule_id: id.clone(),
            level,
            by: Some(hid.clone()),
            by_level: Some(hl),
            example: Some(ex),
            message: format!(
                "overlaps earlier {hl} rule {hid} with a different action: that rule wins where they overlap"
            ),
        });
    }
    out
}

fn final_action(a: EntryAction) -> Option<Action> {
    match a {
        EntryAction::Pass { .. } => None,
        a => Some(a.action()),
    }
}

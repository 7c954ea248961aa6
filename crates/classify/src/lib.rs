//! Palisade's classify layer: multi-field packet classifiers with priorities.
//!
//! The datapath asks a classifier one question for the first packet of every
//! flow: which rule, of those whose fields all match this header, has the best
//! priority? Under a SYN flood or a port scan every packet is a new flow, so
//! this lookup bounds the firewall's packet rate.
//!
//! A [`Rule`] matches on source and destination prefixes (IPv4 or IPv6),
//! source and destination port ranges, an optional protocol, a value/mask on
//! the TCP flags and a value/mask on a 32-bit metadata word that carries the
//! vNIC-level fields the policy compiler emits (segment id, vNIC id). The
//! crate knows nothing about policy: the datapath turns compiled chains into
//! rules. Lower [`Rule::priority`] wins; ties go to the lower [`RuleId`].
//!
//! Two implementations share the [`Classifier`] trait:
//! - [`LinearScan`], the oracle: obviously correct, slow;
//! - [`SplitClassifier`], the fast one: partitioned decision trees with
//!   batched, prefetching lookups and log-structured incremental updates
//!   (see its module for the design).
//!
//! The [`classbench`] module loads ClassBench rule and trace files, the
//! standard workload for comparing packet classifiers.

pub mod bench;
pub mod classbench;
mod error;
mod linear;
mod rule;
mod split;

pub use error::RuleError;
pub use linear::LinearScan;
pub use rule::{Family, Key, Match, Prefix, Rule, RuleId};
pub use split::SplitClassifier;

/// A multi-field packet classifier with priorities and incremental updates.
pub trait Classifier {
    /// Adds a rule and returns the id that names it from now on.
    ///
    /// Ids are reused after removal, so an id names a rule only while that
    /// rule is installed.
    fn insert(&mut self, rule: Rule) -> Result<RuleId, RuleError>;

    /// Removes the rule `id` names; false if no such rule is installed.
    fn remove(&mut self, id: RuleId) -> bool;

    /// The best-priority rule that matches `key`, if any.
    fn lookup(&self, key: &Key) -> Option<Match>;

    /// Looks up many keys at once: `out[i]` receives the answer for `keys[i]`.
    ///
    /// Implementations interleave the keys to hide memory latency, so this is
    /// the fast path under load. Only `min(keys.len(), out.len())` keys are
    /// looked up.
    fn lookup_batch(&self, keys: &[Key], out: &mut [Option<Match>]) {
        for (key, slot) in keys.iter().zip(out.iter_mut()) {
            *slot = self.lookup(key);
        }
    }

    /// The number of rules installed.
    fn len(&self) -> usize;

    /// True when no rule is installed.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Heap bytes held by the classifier's structures (capacities, not lengths).
    fn memory_bytes(&self) -> usize;
}

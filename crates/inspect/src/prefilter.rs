//! The multi-pattern prefilter: which signatures may match this data?
//!
//! Every signature with a content picks one as its fast pattern (the one the
//! rule marks `fast_pattern`, else its longest positive content). One
//! Aho-Corasick automaton per buffer kind holds the fast patterns of the
//! signatures inspecting that buffer, matched ASCII-case-insensitively (a
//! case-sensitive pattern then gets a few extra candidates, which full
//! evaluation discards). Scanning data once yields the candidate signatures;
//! only those are evaluated in full. Signatures without a usable fast
//! pattern (only negated contents, only pcre, only bsize) are evaluated on
//! every buffer of their kind; the ruleset reports how many there are.
//!
//! Why Aho-Corasick and not Vectorscan: measured, see the crate README.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, AhoCorasickKind, MatchKind};
use std::collections::HashMap;

/// Signature ids are dense indexes into the ruleset.
pub type SigId = u32;

/// A prefilter over one buffer kind.
#[derive(Debug, Clone)]
pub struct Prefilter {
    automaton: AhoCorasick,
    /// Pattern index → signatures using it.
    sigs: Vec<Vec<SigId>>,
}

/// Candidate collection with de-duplication, reused across scans.
#[derive(Debug, Default, Clone)]
pub struct Candidates {
    /// Generation stamp per signature: seen in this scan when equal to `generation`.
    stamp: Vec<u32>,
    generation: u32,
    /// The candidates of the current scan, unsorted.
    pub list: Vec<SigId>,
}

impl Candidates {
    /// Starts a new candidate set for a ruleset of `n` signatures.
    pub fn reset(&mut self, n: usize) {
        if self.stamp.len() < n {
            self.stamp.resize(n, 0);
        }
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.stamp.iter_mut().for_each(|s| *s = 0);
            self.generation = 1;
        }
        self.list.clear();
    }

    /// Adds a signature once.
    pub fn add(&mut self, id: SigId) {
        let slot = &mut self.stamp[id as usize];
        if *slot != self.generation {
            *slot = self.generation;
            self.list.push(id);
        }
    }

    /// Sorts the candidates into evaluation order.
    pub fn sort(&mut self) {
        self.list.sort_unstable();
    }
}

impl Prefilter {
    /// Builds a prefilter from (pattern, signature) pairs. `None` when there are no patterns.
    pub fn build(patterns: impl IntoIterator<Item = (Vec<u8>, SigId)>) -> Option<Prefilter> {
        let mut index: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut pats: Vec<Vec<u8>> = Vec::new();
        let mut sigs: Vec<Vec<SigId>> = Vec::new();
        for (p, id) in patterns {
            let key = p.to_ascii_lowercase();
            let i = *index.entry(key.clone()).or_insert_with(|| {
                pats.push(key);
                sigs.push(Vec::new());
                pats.len() - 1
            });
            sigs[i].push(id);
        }
        if pats.is_empty() {
            return None;
        }
        let automaton = AhoCorasickBuilder::new()
            .ascii_case_insensitive(true)
            .match_kind(MatchKind::Standard)
            .kind(if pats.len() <= 4096 {
                Some(AhoCorasickKind::DFA)
            } else {
                None
            })
            .build(&pats)
            .expect("literal patterns always build");
        Some(Prefilter { automaton, sigs })
    }

    /// Adds the signatures whose fast pattern occurs in `data` to `out`.
    pub fn scan(&self, data: &[u8], out: &mut Candidates) {
        for m in self.automaton.find_overlapping_iter(data) {
            for &id in &self.sigs[m.pattern().as_usize()] {
                out.add(id);
            }
        }
    }

    /// Number of distinct patterns.
    pub fn patterns(&self) -> usize {
        self.sigs.len()
    }

    /// Heap bytes of the automaton and tables.
    pub fn memory_usage(&self) -> usize {
        self.automaton.memory_usage() + self.sigs.iter().map(|s| s.capacity() * 4 + 24).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_find_every_signature_whose_pattern_occurs() {
        let p = Prefilter::build([
            (b"abc".to_vec(), 0),
            (b"ABC".to_vec(), 1),
            (b"bcd".to_vec(), 2),
            (b"zzz".to_vec(), 3),
        ])
        .unwrap();
        assert_eq!(p.patterns(), 3);
        let mut c = Candidates::default();
        c.reset(4);
        p.scan(b"xxAbcdxx", &mut c);
        c.sort();
        assert_eq!(c.list, vec![0, 1, 2]);
        c.reset(4);
        p.scan(b"abcabcabc", &mut c);
        assert_eq!(c.list.len(), 2, "each signature once");
        assert!(Prefilter::build(std::iter::empty()).is_none());
    }
}

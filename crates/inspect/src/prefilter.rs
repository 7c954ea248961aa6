//! The multi-pattern prefilter: which signatures may match this data?
//!
//! Every signature with a content picks one as its fast pattern (the one the
//! rule marks `fast_pattern`, else its longest positive content). One
//! literal database per buffer kind holds the fast patterns of the
//! signatures inspecting that buffer, matched ASCII-case-insensitively (a
//! case-sensitive pattern then gets a few extra candidates, which full
//! evaluation discards). Scanning data once yields the candidate signatures;
//! only those are evaluated in full. Signatures without a usable fast
//! pattern (only negated contents, only pcre, only bsize) are evaluated on
//! every buffer of their kind; the ruleset reports how many there are.
//!
//! The database is Vectorscan's, chosen over the `aho-corasick` crate by
//! measurement (crate README, "Prefilter": 5 to 7 times the scan rate on
//! the benchmark's traffic, a fraction of the memory). The Aho-Corasick
//! automaton remains as the fallback: when Vectorscan refuses to compile a
//! pattern set (the reason is kept, [`Prefilter::fallback_reason`]), and
//! under Miri, which cannot call into C. Both give the same answers; a test
//! checks it on random data.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, AhoCorasickKind, MatchKind};
use std::collections::HashMap;

#[cfg(not(miri))]
use crate::vectorscan;

/// Signature ids are dense indexes into the ruleset.
pub type SigId = u32;

/// Which matcher a prefilter uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefilterKind {
    /// Vectorscan (libhs).
    Vectorscan,
    /// The `aho-corasick` crate.
    AhoCorasick,
}

#[derive(Debug)]
enum Matcher {
    #[cfg(not(miri))]
    Vectorscan(vectorscan::Database),
    AhoCorasick(AhoCorasick),
}

/// A prefilter over one buffer kind.
#[derive(Debug)]
pub struct Prefilter {
    matcher: Matcher,
    /// Pattern index → signatures using it.
    sigs: Vec<Vec<SigId>>,
    fallback_reason: Option<String>,
    /// Signatures whose fast pattern the matcher cannot hold (see `build_with`): always candidates.
    unfiltered: Vec<SigId>,
}

/// Per-thread scan state: the Vectorscan scratch (fitted to every database
/// the thread scans with) and a buffer of pattern ids.
#[derive(Debug, Default)]
pub struct ScanScratch {
    #[cfg(not(miri))]
    hs: vectorscan::Scratch,
    found: Vec<u32>,
    /// Scans that failed (every signature of the prefilter was made a candidate instead).
    pub failures: u64,
}

impl ScanScratch {
    /// Fits the scratch to `p`'s database (needed once per prefilter, before scanning with it).
    pub fn fit(&mut self, p: &Prefilter) {
        #[cfg(not(miri))]
        if let Matcher::Vectorscan(db) = &p.matcher
            && self.hs.fit(db).is_err()
        {
            // A scan with an unfitted scratch fails and falls back to all candidates: counted.
            self.failures += 1;
        }
        #[cfg(miri)]
        let _ = p;
    }
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

/// The literals given to Vectorscan. Its literal API refuses a literal that
/// starts with a NUL byte (it takes it for an empty string), so leading NULs
/// are cut: a pattern's suffix occurs wherever the pattern does, so the
/// prefilter stays complete, only less selective. A pattern of NULs only
/// keeps a one-byte placeholder that never reports, and its signatures are
/// made candidates of every scan instead.
#[cfg(not(miri))]
fn vectorscan_literals(pats: &[Vec<u8>], sigs: &[Vec<SigId>], unfiltered: &mut Vec<SigId>) -> Vec<Vec<u8>> {
    pats.iter()
        .zip(sigs)
        .map(|(p, s)| match p.iter().position(|&b| b != 0) {
            Some(i) => p[i..].to_vec(),
            None => {
                unfiltered.extend_from_slice(s);
                // Never present in data that matters: any literal works, it is never consulted.
                vec![0xff, 0x00, 0xfe, 0x01, 0xfd]
            }
        })
        .collect()
}

fn aho_corasick(patterns: &[Vec<u8>]) -> AhoCorasick {
    AhoCorasickBuilder::new()
        .ascii_case_insensitive(true)
        .match_kind(MatchKind::Standard)
        .kind(if patterns.len() <= 4096 {
            Some(AhoCorasickKind::DFA)
        } else {
            None
        })
        .build(patterns)
        .expect("literal patterns always build")
}

impl Prefilter {
    /// Builds a prefilter from (pattern, signature) pairs with the preferred
    /// matcher. `None` when there are no patterns.
    pub fn build(patterns: impl IntoIterator<Item = (Vec<u8>, SigId)>) -> Option<Prefilter> {
        Self::build_with(patterns, PrefilterKind::Vectorscan)
    }

    /// Builds a prefilter with the given matcher (Vectorscan falls back to
    /// Aho-Corasick if it cannot compile the patterns, or under Miri).
    pub fn build_with(patterns: impl IntoIterator<Item = (Vec<u8>, SigId)>, kind: PrefilterKind) -> Option<Prefilter> {
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
        let mut fallback_reason = None;
        let mut unfiltered = Vec::new();
        let matcher = match kind {
            #[cfg(not(miri))]
            PrefilterKind::Vectorscan => {
                match vectorscan::Database::literals(&vectorscan_literals(&pats, &sigs, &mut unfiltered)) {
                    Ok(db) => Matcher::Vectorscan(db),
                    Err(e) => {
                        fallback_reason = Some(e.to_string());
                        Matcher::AhoCorasick(aho_corasick(&pats))
                    }
                }
            }
            #[cfg(miri)]
            PrefilterKind::Vectorscan => {
                fallback_reason = Some("Miri cannot call Vectorscan".into());
                Matcher::AhoCorasick(aho_corasick(&pats))
            }
            PrefilterKind::AhoCorasick => Matcher::AhoCorasick(aho_corasick(&pats)),
        };
        Some(Prefilter {
            matcher,
            sigs,
            fallback_reason,
            unfiltered,
        })
    }

    /// The matcher in use.
    pub fn kind(&self) -> PrefilterKind {
        match self.matcher {
            #[cfg(not(miri))]
            Matcher::Vectorscan(_) => PrefilterKind::Vectorscan,
            Matcher::AhoCorasick(_) => PrefilterKind::AhoCorasick,
        }
    }

    /// Why Vectorscan was not used, if it was asked for and refused.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    /// Adds the signatures whose fast pattern occurs in `data` to `out`.
    pub fn scan(&self, data: &[u8], scratch: &mut ScanScratch, out: &mut Candidates) {
        self.unfiltered.iter().for_each(|&id| out.add(id));
        match &self.matcher {
            #[cfg(not(miri))]
            Matcher::Vectorscan(db) => {
                scratch.found.clear();
                if db.scan(&mut scratch.hs, data, &mut scratch.found).is_err() {
                    // Never miss a signature: all of them are candidates.
                    scratch.failures += 1;
                    self.sigs.iter().flatten().for_each(|&id| out.add(id));
                    return;
                }
                for &p in &scratch.found {
                    for &id in &self.sigs[p as usize] {
                        out.add(id);
                    }
                }
            }
            Matcher::AhoCorasick(ac) => {
                let _ = scratch;
                for m in ac.find_overlapping_iter(data) {
                    for &id in &self.sigs[m.pattern().as_usize()] {
                        out.add(id);
                    }
                }
            }
        }
    }

    /// Number of distinct patterns.
    pub fn patterns(&self) -> usize {
        self.sigs.len()
    }

    /// Heap bytes of the matcher and tables.
    pub fn memory_usage(&self) -> usize {
        let m = match &self.matcher {
            #[cfg(not(miri))]
            Matcher::Vectorscan(db) => db.size(),
            Matcher::AhoCorasick(ac) => ac.memory_usage(),
        };
        m + self.sigs.iter().map(|s| s.capacity() * 4 + 24).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_find_every_signature_whose_pattern_occurs() {
        for kind in [PrefilterKind::Vectorscan, PrefilterKind::AhoCorasick] {
            let p = Prefilter::build_with(
                [
                    (b"abc".to_vec(), 0),
                    (b"ABC".to_vec(), 1),
                    (b"bcd".to_vec(), 2),
                    (b"zzz".to_vec(), 3),
                ],
                kind,
            )
            .unwrap();
            assert_eq!(p.patterns(), 3);
            let mut s = ScanScratch::default();
            s.fit(&p);
            let mut c = Candidates::default();
            c.reset(4);
            p.scan(b"xxAbcdxx", &mut s, &mut c);
            c.sort();
            assert_eq!(c.list, vec![0, 1, 2], "{kind:?}");
            c.reset(4);
            p.scan(b"abcabcabc", &mut s, &mut c);
            assert_eq!(c.list.len(), 2, "each signature once");
        }
        assert!(Prefilter::build(std::iter::empty()).is_none());
    }

    /// The two matchers agree on random patterns and data.
    #[test]
    fn vectorscan_and_aho_corasick_agree() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // A small alphabet so patterns occur often and overlap (NUL bytes: see below).
        let mut word = |len: usize| {
            (0..len)
                .map(|_| b"abAB\x01\xff"[(next() % 6) as usize])
                .collect::<Vec<u8>>()
        };
        let patterns: Vec<(Vec<u8>, SigId)> = (0..300).map(|i| (word(1 + i % 6), i as SigId)).collect();
        let vs = Prefilter::build_with(patterns.clone(), PrefilterKind::Vectorscan).unwrap();
        let ac = Prefilter::build_with(patterns, PrefilterKind::AhoCorasick).unwrap();
        let mut s = ScanScratch::default();
        s.fit(&vs);
        for len in [0, 1, 5, 17, 100, 3000] {
            let data = word(len);
            let (mut a, mut b) = (Candidates::default(), Candidates::default());
            a.reset(300);
            b.reset(300);
            vs.scan(&data, &mut s, &mut a);
            ac.scan(&data, &mut s, &mut b);
            a.sort();
            b.sort();
            assert_eq!(a.list, b.list, "data of {len} bytes");
        }
        assert_eq!(s.failures, 0);
    }

    /// Patterns starting with NUL bytes stay complete under Vectorscan (a
    /// superset of the exact answer), and all-NUL ones are always candidates.
    #[test]
    fn leading_nul_patterns_are_never_missed() {
        let patterns = vec![
            (b"\x00\x00ab".to_vec(), 0),
            (b"\x00\x00".to_vec(), 1),
            (b"cd".to_vec(), 2),
        ];
        let vs = Prefilter::build_with(patterns.clone(), PrefilterKind::Vectorscan).unwrap();
        let ac = Prefilter::build_with(patterns, PrefilterKind::AhoCorasick).unwrap();
        let mut s = ScanScratch::default();
        s.fit(&vs);
        for data in [&b"\x00\x00ab"[..], b"xab", b"\x00\x00", b"cd", b""] {
            let (mut a, mut b) = (Candidates::default(), Candidates::default());
            a.reset(3);
            b.reset(3);
            vs.scan(data, &mut s, &mut a);
            ac.scan(data, &mut s, &mut b);
            for id in &b.list {
                assert!(a.list.contains(id), "{data:?}: {id} missed");
            }
            assert!(a.list.contains(&1), "all-NUL pattern always a candidate");
        }
    }
}

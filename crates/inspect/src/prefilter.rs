//! The multi-pattern prefilter: which signatures may match this data?
//!
//! Every signature with a content picks the buffer of its fast pattern (the
//! content the rule marks `fast_pattern`, else its longest positive one).
//! One literal database per buffer kind holds *every* positive content those
//! signatures have in that buffer (up to `MAX_LITERAL` bytes of each),
//! matched ASCII-case-insensitively; scanning data once tells which literals
//! occur, and a signature is a candidate only when all of its literals do,
//! a necessary condition for a match whatever the placement keywords say.
//! Only candidates are evaluated in full. Compared with one fast pattern per
//! rule, this keeps rules that share a common fast pattern (`HTTP/1.1`,
//! `Host: `) from all being evaluated on every request. Signatures without a
//! positive content (only negated contents, only pcre, only bsize) are
//! evaluated on every buffer of their kind; the ruleset reports how many.
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
    /// Pattern index → members (indexes into `members`) needing it.
    pat_members: Vec<Vec<u32>>,
    /// The signatures, by member index.
    members: Vec<SigId>,
    /// Distinct literals each member needs.
    required: Vec<u8>,
    fallback_reason: Option<String>,
    /// Patterns the matcher cannot hold (see `vectorscan_literals`): taken as present.
    always: Vec<u32>,
}

/// Per-thread scan state: the Vectorscan scratch (fitted to every database
/// the thread scans with) and a buffer of pattern ids.
#[derive(Debug, Default)]
pub struct ScanScratch {
    #[cfg(not(miri))]
    hs: vectorscan::Scratch,
    found: Vec<u32>,
    generation: u32,
    pat_stamp: Vec<u32>,
    member_stamp: Vec<u32>,
    counts: Vec<u8>,
    /// Scans that failed (every signature of the prefilter was made a candidate instead).
    pub failures: u64,
}

impl ScanScratch {
    /// A new stamp, with the per-pattern and per-member tables grown to size.
    fn next_generation(&mut self, patterns: usize, members: usize) -> u32 {
        if self.pat_stamp.len() < patterns {
            self.pat_stamp.resize(patterns, 0);
        }
        if self.member_stamp.len() < members {
            self.member_stamp.resize(members, 0);
            self.counts.resize(members, 0);
        }
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.pat_stamp.iter_mut().for_each(|s| *s = 0);
            self.member_stamp.iter_mut().for_each(|s| *s = 0);
            self.generation = 1;
        }
        self.generation
    }

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
/// taken as present on every scan instead.
#[cfg(not(miri))]
fn vectorscan_literals(pats: &[Vec<u8>], always: &mut Vec<u32>) -> Vec<Vec<u8>> {
    pats.iter()
        .enumerate()
        .map(|(i, p)| match p.iter().position(|&b| b != 0) {
            Some(at) => p[at..].to_vec(),
            None => {
                always.push(i as u32);
                // A placeholder: the pattern is taken as present on every scan,
                // whatever the matcher reports for it.
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

/// Longest literal given to the matcher; longer contents are represented by
/// their prefix (whose presence is still necessary).
pub const MAX_LITERAL: usize = 64;

impl Prefilter {
    /// Builds a prefilter from signatures and the literals each one needs
    /// (every positive content of the buffer: a signature is a candidate
    /// only when all of them occur), with the preferred matcher. `None`
    /// when there is nothing to match.
    pub fn build(entries: impl IntoIterator<Item = (SigId, Vec<Vec<u8>>)>) -> Option<Prefilter> {
        Self::build_with(entries, PrefilterKind::Vectorscan)
    }

    /// Builds a prefilter with the given matcher (Vectorscan falls back to
    /// Aho-Corasick if it cannot compile the patterns, or under Miri).
    pub fn build_with(
        entries: impl IntoIterator<Item = (SigId, Vec<Vec<u8>>)>,
        kind: PrefilterKind,
    ) -> Option<Prefilter> {
        let mut index: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut pats: Vec<Vec<u8>> = Vec::new();
        let mut pat_members: Vec<Vec<u32>> = Vec::new();
        let mut members = Vec::new();
        let mut required = Vec::new();
        for (id, literals) in entries {
            let mut mine: Vec<Vec<u8>> = literals
                .iter()
                .filter(|l| !l.is_empty())
                .map(|l| l[..l.len().min(MAX_LITERAL)].to_ascii_lowercase())
                .collect();
            mine.sort_unstable();
            mine.dedup();
            if mine.is_empty() {
                continue;
            }
            let m = members.len() as u32;
            members.push(id);
            required.push(mine.len().min(usize::from(u8::MAX)) as u8);
            for key in mine {
                let i = *index.entry(key.clone()).or_insert_with(|| {
                    pats.push(key);
                    pat_members.push(Vec::new());
                    pats.len() - 1
                });
                pat_members[i].push(m);
            }
        }
        if pats.is_empty() {
            return None;
        }
        let mut fallback_reason = None;
        let mut always = Vec::new();
        let matcher = match kind {
            #[cfg(not(miri))]
            PrefilterKind::Vectorscan => match vectorscan::Database::literals(&vectorscan_literals(&pats, &mut always))
            {
                Ok(db) => Matcher::Vectorscan(db),
                Err(e) => {
                    fallback_reason = Some(e.to_string());
                    always.clear();
                    Matcher::AhoCorasick(aho_corasick(&pats))
                }
            },
            #[cfg(miri)]
            PrefilterKind::Vectorscan => {
                fallback_reason = Some("Miri cannot call Vectorscan".into());
                Matcher::AhoCorasick(aho_corasick(&pats))
            }
            PrefilterKind::AhoCorasick => Matcher::AhoCorasick(aho_corasick(&pats)),
        };
        Some(Prefilter {
            matcher,
            pat_members,
            members,
            required,
            fallback_reason,
            always,
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

    /// Adds to `out` the signatures all of whose literals occur in `data`.
    pub fn scan(&self, data: &[u8], scratch: &mut ScanScratch, out: &mut Candidates) {
        scratch.found.clear();
        scratch.found.extend_from_slice(&self.always);
        match &self.matcher {
            #[cfg(not(miri))]
            Matcher::Vectorscan(db) => {
                if db.scan(&mut scratch.hs, data, &mut scratch.found).is_err() {
                    // Never miss a signature: all of them are candidates.
                    scratch.failures += 1;
                    self.members.iter().for_each(|&id| out.add(id));
                    return;
                }
            }
            Matcher::AhoCorasick(ac) => {
                // Overlapping search reports a pattern at every occurrence: keep each once.
                let g = scratch.next_generation(self.pat_members.len(), 0);
                for m in ac.find_overlapping_iter(data) {
                    let p = m.pattern().as_usize();
                    if scratch.pat_stamp[p] != g {
                        scratch.pat_stamp[p] = g;
                        scratch.found.push(p as u32);
                    }
                }
            }
        }
        let g = scratch.next_generation(0, self.members.len());
        let ScanScratch {
            found,
            member_stamp,
            counts,
            ..
        } = scratch;
        for &p in found.iter() {
            for &m in &self.pat_members[p as usize] {
                let m = m as usize;
                if member_stamp[m] != g {
                    member_stamp[m] = g;
                    counts[m] = 0;
                }
                counts[m] = counts[m].saturating_add(1);
                if counts[m] == self.required[m] {
                    out.add(self.members[m]);
                }
            }
        }
    }

    /// Number of distinct literals.
    pub fn patterns(&self) -> usize {
        self.pat_members.len()
    }

    /// Heap bytes of the matcher and tables.
    pub fn memory_usage(&self) -> usize {
        let m = match &self.matcher {
            #[cfg(not(miri))]
            Matcher::Vectorscan(db) => db.size(),
            Matcher::AhoCorasick(ac) => ac.memory_usage(),
        };
        m + self.pat_members.iter().map(|s| s.capacity() * 4 + 24).sum::<usize>() + self.members.capacity() * 5
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lits(l: &[&[u8]]) -> Vec<Vec<u8>> {
        l.iter().map(|x| x.to_vec()).collect()
    }

    #[test]
    fn candidates_need_every_literal() {
        for kind in [PrefilterKind::Vectorscan, PrefilterKind::AhoCorasick] {
            let p = Prefilter::build_with(
                [
                    (0, lits(&[b"abc"])),
                    (1, lits(&[b"ABC", b"xyz"])),
                    (2, lits(&[b"bcd", b"bcd"])),
                    (3, lits(&[b"zzz"])),
                ],
                kind,
            )
            .unwrap();
            assert_eq!(p.patterns(), 4);
            let mut s = ScanScratch::default();
            s.fit(&p);
            let mut c = Candidates::default();
            c.reset(4);
            p.scan(b"xxAbcdxx", &mut s, &mut c);
            c.sort();
            assert_eq!(c.list, vec![0, 2], "{kind:?}: 1 also needs xyz");
            c.reset(4);
            p.scan(b"abcabc..XYZ", &mut s, &mut c);
            c.sort();
            assert_eq!(c.list, vec![0, 1], "each signature once, both literals of 1 present");
        }
        assert!(Prefilter::build(std::iter::empty()).is_none());
        assert!(Prefilter::build([(0, vec![])]).is_none());
    }

    /// The two matchers agree on random literals and data.
    #[test]
    fn vectorscan_and_aho_corasick_agree() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // A small alphabet so literals occur often and overlap (NUL bytes: see below).
        let mut word = |len: usize| {
            (0..len)
                .map(|_| b"abAB\x01\xff"[(next() % 6) as usize])
                .collect::<Vec<u8>>()
        };
        let entries: Vec<(SigId, Vec<Vec<u8>>)> = (0..300)
            .map(|i| (i as SigId, (0..1 + i % 3).map(|k| word(1 + (i + k) % 6)).collect()))
            .collect();
        let vs = Prefilter::build_with(entries.clone(), PrefilterKind::Vectorscan).unwrap();
        let ac = Prefilter::build_with(entries, PrefilterKind::AhoCorasick).unwrap();
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

    /// Literals starting with NUL bytes stay complete under Vectorscan (a
    /// superset of the exact answer), and all-NUL ones count as present.
    #[test]
    fn leading_nul_literals_are_never_missed() {
        let entries = vec![
            (0, lits(&[b"\x00\x00ab"])),
            (1, lits(&[b"\x00\x00"])),
            (2, lits(&[b"cd", b"\x00"])),
        ];
        let vs = Prefilter::build_with(entries.clone(), PrefilterKind::Vectorscan).unwrap();
        let ac = Prefilter::build_with(entries, PrefilterKind::AhoCorasick).unwrap();
        let mut s = ScanScratch::default();
        s.fit(&vs);
        for data in [&b"\x00\x00ab"[..], b"xab", b"\x00\x00", b"cd\x00", b""] {
            let (mut a, mut b) = (Candidates::default(), Candidates::default());
            a.reset(3);
            b.reset(3);
            vs.scan(data, &mut s, &mut a);
            ac.scan(data, &mut s, &mut b);
            for id in &b.list {
                assert!(a.list.contains(id), "{data:?}: {id} missed");
            }
            assert!(a.list.contains(&1), "all-NUL literal always present");
        }
    }

    #[test]
    fn long_contents_are_represented_by_their_prefix() {
        let long = vec![b'q'; 200];
        let p = Prefilter::build([(0, vec![long.clone()])]).unwrap();
        let mut s = ScanScratch::default();
        s.fit(&p);
        let mut c = Candidates::default();
        c.reset(1);
        p.scan(&long[..MAX_LITERAL], &mut s, &mut c);
        assert_eq!(c.list, vec![0]);
    }
}

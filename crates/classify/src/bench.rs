//! The side-by-side benchmark behind `palisade bench classify`.
//!
//! It lives here rather than in the binary so that the figures the CLI prints
//! come from the same code the tests exercise. Every figure is measured on
//! the fast classifier after checking it against the oracle on the whole
//! trace, so a fast wrong answer cannot go unnoticed.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use crate::classbench::TraceEntry;
use crate::{Classifier, Key, LinearScan, Match, Rule, RuleError, SplitClassifier};

/// Keys per `lookup_batch` call in the throughput measurement.
pub const BATCH: usize = 64;

/// What one benchmark run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Rules in the set.
    pub rules: usize,
    /// Trace headers checked.
    pub trace: usize,
    /// Time to build the classifier from all rules, in milliseconds.
    pub build_ms: f64,
    /// Heap bytes of the built classifier.
    pub memory_bytes: usize,
    /// Single-key lookups, millions per second, one core.
    pub mpps_single: f64,
    /// Batched lookups, millions of keys per second, one core.
    pub mpps_batch: f64,
    /// Removes and inserts per second.
    pub updates_per_s: f64,
    /// Headers whose answer differs from the oracle's (single, batched, and after updates).
    pub mismatches: usize,
}

/// How long each throughput measurement runs at least.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Minimum time per lookup measurement.
    pub min_time: Duration,
    /// Rules removed and re-inserted in the update measurement (at most all).
    pub updates: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            min_time: Duration::from_millis(500),
            updates: 2000,
        }
    }
}

/// The answers of the oracle for every distinct header of `keys`.
pub fn oracle_answers(rules: &[Rule], keys: &[Key]) -> Result<Vec<Option<Match>>, RuleError> {
    let oracle = LinearScan::from_rules(rules.iter().copied())?;
    let mut memo: HashMap<Key, Option<Match>> = HashMap::new();
    Ok(keys
        .iter()
        .map(|k| *memo.entry(*k).or_insert_with(|| oracle.lookup(k)))
        .collect())
}

/// Builds, checks and measures the fast classifier on `rules` and `trace`.
pub fn run(rules: &[Rule], trace: &[TraceEntry], opts: Options) -> Result<Report, RuleError> {
    let keys: Vec<Key> = trace.iter().map(|t| t.key).collect();
    let t0 = Instant::now();
    let mut fast = SplitClassifier::from_rules(rules)?;
    let build_ms = t0.elapsed().as_secs_f64() * 1e3;
    let memory_bytes = fast.memory_bytes();

    let want = oracle_answers(rules, &keys)?;
    let mut mismatches = keys.iter().zip(&want).filter(|(k, w)| fast.lookup(k) != **w).count();
    let mut got = vec![None; keys.len()];
    fast.lookup_batch(&keys, &mut got);
    mismatches += got.iter().zip(&want).filter(|(g, w)| g != w).count();

    let mpps_single = if keys.is_empty() {
        0.0
    } else {
        measure(opts.min_time, keys.len(), || single(&fast, &keys))
    };
    let mut out = vec![None; BATCH];
    let mpps_batch = if keys.is_empty() {
        0.0
    } else {
        measure(opts.min_time, keys.len(), || {
            let mut sum = 0u64;
            for chunk in keys.chunks(BATCH) {
                fast.lookup_batch(chunk, &mut out);
                sum += out[..chunk.len()]
                    .iter()
                    .flatten()
                    .map(|m| u64::from(m.priority))
                    .sum::<u64>();
            }
            sum
        })
    };

    // Remove and re-insert a spread-out sample; the answers (priority and
    // action; the ids change) must be the same afterwards.
    let n = opts.updates.min(rules.len());
    let step = rules.len().checked_div(n).unwrap_or(1);
    let sample: Vec<usize> = (0..n).map(|i| i * step).collect();
    let t0 = Instant::now();
    for &i in &sample {
        // `from_rules` gave rule `i` the id `i`; re-inserted ones get fresh ids.
        fast.remove(crate::RuleId(i as u32));
    }
    for &i in &sample {
        fast.insert(rules[i])?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let updates_per_s = if n == 0 || secs == 0.0 {
        0.0
    } else {
        (2 * n) as f64 / secs
    };
    let strip = |m: &Option<Match>| m.map(|m| (m.priority, m.action));
    mismatches += keys
        .iter()
        .zip(&want)
        .filter(|(k, w)| strip(&fast.lookup(k)) != strip(w))
        .count();

    Ok(Report {
        rules: rules.len(),
        trace: keys.len(),
        build_ms,
        memory_bytes,
        mpps_single,
        mpps_batch,
        updates_per_s,
        mismatches,
    })
}

fn single(c: &SplitClassifier, keys: &[Key]) -> u64 {
    keys.iter()
        .map(|k| black_box(c).lookup(k).map_or(0, |m| u64::from(m.priority)))
        .sum()
}

/// Runs `pass` (which looks up `per_pass` keys) until `min_time` has passed; Mpps.
fn measure(min_time: Duration, per_pass: usize, mut pass: impl FnMut() -> u64) -> f64 {
    black_box(pass()); // warm the caches
    let t0 = Instant::now();
    let mut passes = 0u64;
    while t0.elapsed() < min_time {
        black_box(pass());
        passes += 1;
    }
    (passes as f64 * per_pass as f64) / t0.elapsed().as_secs_f64() / 1e6
}

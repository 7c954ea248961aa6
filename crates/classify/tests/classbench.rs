//! The fast classifier against the linear-scan oracle on the shared ClassBench
//! rule sets and traces.
//!
//! The 1k and 10k sets run in every `cargo test`; the 100k sets are `#[ignore]`d
//! (minutes in a debug build) and are checked by `palisade bench classify`,
//! which counts mismatches on every header before it measures anything.

use std::collections::HashMap;
use std::path::PathBuf;

use palisade_classify::classbench::{TraceEntry, load_rules, load_trace};
use palisade_classify::{Classifier, Key, LinearScan, Match, Rule, SplitClassifier};

fn data_dir() -> PathBuf {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/classbench"));
    assert!(
        dir.join("acl1_1k").is_file(),
        "ClassBench data not found at {}: these tests need the shared/ directory beside the repository",
        dir.display()
    );
    dir
}

fn load(set: &str) -> (Vec<Rule>, Vec<TraceEntry>) {
    let dir = data_dir();
    let rules = load_rules(dir.join(set)).unwrap_or_else(|e| panic!("{e}"));
    let trace = load_trace(dir.join(format!("{set}_trace"))).unwrap_or_else(|e| panic!("{e}"));
    assert!(!rules.is_empty() && !trace.is_empty(), "{set}: empty rule set or trace");
    (rules, trace)
}

/// Checks every distinct header of the trace, single and batched.
fn check(set: &str) {
    let (rules, trace) = load(set);
    // The loader's reading of the trace (0-based filter ids, flags in the high
    // half) is confirmed by every header matching the rule it came from.
    for (n, t) in trace.iter().enumerate() {
        let own = rules
            .get(t.filter_id as usize)
            .unwrap_or_else(|| panic!("{set}_trace:{}: bad filter id", n + 1));
        assert!(
            own.matches(&t.key),
            "{set}_trace:{}: header does not match its own rule",
            n + 1
        );
    }
    let mut seen = HashMap::new();
    let keys: Vec<Key> = trace
        .iter()
        .map(|t| t.key)
        .filter(|k| seen.insert(*k, ()).is_none())
        .collect();
    let oracle = LinearScan::from_rules(rules.iter().copied()).unwrap();
    let fast = SplitClassifier::from_rules(&rules).unwrap();
    assert_eq!(fast.len(), rules.len());
    let want: Vec<Option<Match>> = keys.iter().map(|k| oracle.lookup(k)).collect();
    let mut got = vec![None; keys.len()];
    fast.lookup_batch(&keys, &mut got);
    let mut bad = 0;
    for (i, k) in keys.iter().enumerate() {
        let single = fast.lookup(k);
        if single != want[i] || got[i] != want[i] {
            if bad < 5 {
                eprintln!(
                    "{set}: {k:?}: oracle {:?}, single {single:?}, batch {:?}",
                    want[i], got[i]
                );
            }
            bad += 1;
        }
    }
    assert_eq!(
        bad,
        0,
        "{set}: {bad} of {} distinct headers differ from the oracle",
        keys.len()
    );
    assert!(
        want.iter().any(Option::is_some),
        "{set}: the trace matches nothing: a vacuous test"
    );
}

#[test]
fn acl1_1k() {
    check("acl1_1k");
}

#[test]
fn fw1_1k() {
    check("fw1_1k");
}

#[test]
fn ipc1_1k() {
    check("ipc1_1k");
}

#[test]
fn acl1_10k() {
    check("acl1_10k");
}

#[test]
fn fw1_10k() {
    check("fw1_10k");
}

#[test]
fn ipc1_10k() {
    check("ipc1_10k");
}

#[test]
#[ignore = "minutes in a debug build; `palisade bench classify` checks it in release"]
fn acl1_100k() {
    check("acl1_100k");
}

#[test]
#[ignore = "minutes in a debug build; `palisade bench classify` checks it in release"]
fn fw1_100k() {
    check("fw1_100k");
}

#[test]
#[ignore = "minutes in a debug build; `palisade bench classify` checks it in release"]
fn ipc1_100k() {
    check("ipc1_100k");
}

/// Incremental updates on a real rule set: remove every third rule, check,
/// put them back, check again.
#[test]
fn fw1_1k_updates() {
    let (rules, trace) = load("fw1_1k");
    let mut oracle = LinearScan::from_rules(rules.iter().copied()).unwrap();
    let mut fast = SplitClassifier::from_rules(&rules).unwrap();
    let strip = |m: Option<Match>| m.map(|m| (m.priority, m.action));
    let compare = |oracle: &LinearScan, fast: &SplitClassifier, what: &str| {
        for t in trace.iter().step_by(3) {
            assert_eq!(
                strip(fast.lookup(&t.key)),
                strip(oracle.lookup(&t.key)),
                "{what}: {:?}",
                t.key
            );
        }
    };
    let gone: Vec<usize> = (0..rules.len()).step_by(3).collect();
    for &i in &gone {
        let id = palisade_classify::RuleId(i as u32);
        assert!(oracle.remove(id));
        assert!(fast.remove(id));
        assert!(!fast.remove(id), "removing twice must fail");
    }
    compare(&oracle, &fast, "after removes");
    for &i in &gone {
        oracle.insert(rules[i]).unwrap();
        fast.insert(rules[i]).unwrap();
    }
    assert_eq!(fast.len(), rules.len());
    compare(&oracle, &fast, "after re-inserts");
    fast.compact();
    assert_eq!(fast.levels(), (1, 0));
    compare(&oracle, &fast, "after compact");
}

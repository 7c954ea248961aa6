//! Property tests: random insert/remove sequences on small rule sets, IPv4 and
//! IPv6, the fast classifier answering like the oracle after every step.

use palisade_classify::{Classifier, Family, Key, LinearScan, Match, Prefix, Rule, RuleId, SplitClassifier};
use proptest::prelude::*;

/// Addresses from a small pool so that prefixes overlap and keys hit rules.
fn addr(family: Family) -> impl Strategy<Value = u128> {
    let pool: Vec<u128> = match family {
        Family::V4 => vec![0x0a00_0001, 0x0a00_0102, 0x0a01_0000, 0xc0a8_0101, 0xffff_ffff, 0],
        Family::V6 => vec![
            0x2001_0db8_0000_0000_0000_0000_0000_0001,
            0x2001_0db8_0000_0000_0000_0000_0000_0101,
            0x2001_0db8_0001_0000_0000_0000_0000_0001,
            0x2001_0db9_0000_0000_0000_0000_0000_0001,
            0xfe80_0000_0000_0000_0000_0000_0000_0001,
            0,
        ],
    };
    let bits = u32::from(family.bits());
    (prop::sample::select(pool), any::<u8>()).prop_map(move |(a, noise)| {
        // Flip one low bit now and then so that host parts differ.
        if noise % 3 == 0 {
            a ^ (1u128 << (noise as u32 % bits.min(8)))
        } else {
            a
        }
    })
}

fn prefix(family: Family) -> impl Strategy<Value = Prefix> {
    let lens: Vec<u8> = match family {
        Family::V4 => vec![0, 8, 16, 24, 31, 32],
        Family::V6 => vec![0, 16, 32, 33, 48, 64, 127, 128],
    };
    (addr(family), prop::sample::select(lens)).prop_map(move |(a, l)| Prefix::new(family, a, l).unwrap())
}

fn ports() -> impl Strategy<Value = (u16, u16)> {
    prop_oneof![
        Just((0, u16::MAX)),
        (0u16..4).prop_map(|p| (p * 100, p * 100)),
        (0u16..400, 0u16..400).prop_map(|(a, b)| (a.min(b), a.max(b))),
        Just((1024, u16::MAX)),
    ]
}

fn rule(family: Family) -> impl Strategy<Value = Rule> {
    (
        prefix(family),
        prefix(family),
        ports(),
        ports(),
        prop_oneof![Just(None), Just(Some(6u8)), Just(Some(17u8))],
        prop_oneof![Just((0u16, 0u16)), Just((0x02, 0x12)), Just((0x10, 0x10))],
        prop_oneof![Just((0u32, 0u32)), (0u32..3).prop_map(|v| (v, 0xff))],
    )
        .prop_map(|(src, dst, sp, dp, proto, flags, meta)| Rule {
            priority: 0,
            src,
            dst,
            src_ports: sp,
            dst_ports: dp,
            proto,
            tcp_flags: flags,
            meta,
            action: 0,
        })
}

fn key(family: Family) -> impl Strategy<Value = Key> {
    (
        addr(family),
        addr(family),
        prop_oneof![
            (0u16..4).prop_map(|p| p * 100),
            0u16..500,
            Just(u16::MAX),
            1024u16..1100
        ],
        prop_oneof![(0u16..4).prop_map(|p| p * 100), 0u16..500, Just(u16::MAX)],
        prop_oneof![Just(6u8), Just(17u8), Just(1u8)],
        prop_oneof![Just(0u16), Just(0x02), Just(0x12), Just(0x10)],
        0u32..3,
    )
        .prop_map(move |(src, dst, sport, dport, proto, flags, meta)| Key {
            family,
            src,
            dst,
            sport,
            dport,
            proto,
            flags,
            meta,
        })
}

#[derive(Debug, Clone)]
enum Op {
    Insert(Rule),
    /// Remove the n-th (mod count) rule inserted so far.
    Remove(usize),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let any_rule = prop_oneof![rule(Family::V4), rule(Family::V6)];
    prop::collection::vec(
        prop_oneof![3 => any_rule.prop_map(Op::Insert), 1 => any::<usize>().prop_map(Op::Remove)],
        1..400,
    )
}

fn strip(m: Option<Match>) -> Option<(u32, u32)> {
    m.map(|m| (m.priority, m.action))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn updates_match_the_oracle(
        ops in ops(),
        keys in prop::collection::vec(prop_oneof![key(Family::V4), key(Family::V6)], 64),
        seed in any::<u64>(),
    ) {
        let mut oracle = LinearScan::new();
        let mut fast = SplitClassifier::new();
        // Installed rules: (oracle id, fast id).
        let mut live: Vec<(RuleId, RuleId)> = Vec::new();
        let mut next = 0u32;
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Insert(mut r) => {
                    // Distinct priorities, not in insertion order, so ties cannot blur the comparison.
                    next += 1;
                    r.priority = next.wrapping_mul(2_654_435_761) ^ (seed as u32);
                    r.action = next;
                    live.push((oracle.insert(r).unwrap(), fast.insert(r).unwrap()));
                }
                Op::Remove(n) if !live.is_empty() => {
                    let (o, f) = live.swap_remove(n % live.len());
                    prop_assert!(oracle.remove(o));
                    prop_assert!(fast.remove(f));
                    prop_assert!(!fast.remove(f));
                }
                Op::Remove(_) => {}
            }
            prop_assert_eq!(fast.len(), oracle.len());
            // Checking after every step is slow in debug; every 16th and the end suffice
            // to cross buffer flushes, merges and tombstone rebuilds.
            if step % 16 == 0 {
                for k in &keys {
                    prop_assert_eq!(strip(fast.lookup(k)), strip(oracle.lookup(k)), "step {} key {:?}", step, k);
                }
            }
        }
        let mut got = vec![None; keys.len()];
        fast.lookup_batch(&keys, &mut got);
        for (k, g) in keys.iter().zip(&got) {
            prop_assert_eq!(strip(*g), strip(oracle.lookup(k)), "batch {:?}", k);
            prop_assert_eq!(strip(fast.lookup(k)), strip(oracle.lookup(k)), "single {:?}", k);
        }
        fast.compact();
        for k in &keys {
            prop_assert_eq!(strip(fast.lookup(k)), strip(oracle.lookup(k)), "compacted {:?}", k);
        }
    }

    #[test]
    fn bulk_build_matches_the_oracle(
        rules in prop::collection::vec(prop_oneof![rule(Family::V4), rule(Family::V6)], 0..300),
        keys in prop::collection::vec(prop_oneof![key(Family::V4), key(Family::V6)], 128),
    ) {
        let rules: Vec<Rule> = rules.into_iter().enumerate().map(|(i, mut r)| { r.priority = i as u32; r.action = i as u32; r }).collect();
        let oracle = LinearScan::from_rules(rules.iter().copied()).unwrap();
        let fast = SplitClassifier::from_rules(&rules).unwrap();
        let mut got = vec![None; keys.len()];
        fast.lookup_batch(&keys, &mut got);
        for (k, g) in keys.iter().zip(&got) {
            let want = oracle.lookup(k);
            prop_assert_eq!(fast.lookup(k), want, "single {:?}", k);
            prop_assert_eq!(*g, want, "batch {:?}", k);
        }
    }
}

#[test]
fn rejects_bad_rules() {
    let mut fast = SplitClassifier::new();
    let mut r = Rule::any(Family::V4, 0, 0);
    r.dst = Prefix::any(Family::V6);
    assert!(fast.insert(r).is_err());
    let mut r = Rule::any(Family::V4, 0, 0);
    r.src_ports = (9, 3);
    assert!(fast.insert(r).is_err());
    assert!(Prefix::v4(0, 33).is_err());
    assert!(Prefix::v6(0, 129).is_err());
    assert!(fast.is_empty());
    assert!(!fast.remove(RuleId(0)));
}

#[test]
fn ties_go_to_the_lower_id_and_families_stay_apart() {
    let mut fast = SplitClassifier::new();
    let a = fast.insert(Rule::any(Family::V4, 5, 1)).unwrap();
    let _b = fast.insert(Rule::any(Family::V4, 5, 2)).unwrap();
    let k4 = Key::v4(1, 2, 3, 4, 6, 0);
    assert_eq!(fast.lookup(&k4).map(|m| m.id), Some(a));
    assert_eq!(fast.lookup(&Key::v6(1, 2, 3, 4, 6, 0)), None);
    let c = fast.insert(Rule::any(Family::V6, 9, 3)).unwrap();
    assert_eq!(fast.lookup(&Key::v6(1, 2, 3, 4, 6, 0)).map(|m| m.id), Some(c));
}

/// A batch overwrites every slot, also for keys of a family with no rules at
/// all (whose engine the batch skips), whatever `out` held before.
#[test]
fn batch_overwrites_stale_slots_of_an_empty_family() {
    let mut fast = SplitClassifier::new();
    let a = fast.insert(Rule::any(Family::V4, 5, 1)).unwrap();
    let keys = [
        Key::v6(1, 2, 3, 4, 6, 0),
        Key::v4(1, 2, 3, 4, 6, 0),
        Key::v6(5, 6, 7, 8, 17, 0),
    ];
    let stale = Some(Match {
        id: RuleId(77),
        priority: 0,
        action: 0,
    });
    let mut out = [stale; 3];
    fast.lookup_batch(&keys, &mut out);
    assert_eq!(out.map(|m| m.map(|m| m.id)), [None, Some(a), None]);
}

/// Fill several levels, empty them (tombstones, then level rebuilds and
/// removals), and refill: every step answers like the oracle.
#[test]
fn drain_and_refill() {
    let mut oracle = LinearScan::new();
    let mut fast = SplitClassifier::new();
    let rule = |i: u32| {
        let mut r = Rule::any(Family::V4, 1000 - i, i);
        r.dst = Prefix::v4(0x0a00_0000 | (i << 8), 24).unwrap();
        r.dst_ports = (i as u16, i as u16 + 10);
        r
    };
    let keys: Vec<Key> = (0..400)
        .map(|i| Key::v4(7, 0x0a00_0000 | (i << 8) | 9, 1, i as u16 + 5, 6, 0))
        .collect();
    let check = |oracle: &LinearScan, fast: &SplitClassifier, what: &str| {
        for k in &keys {
            assert_eq!(strip(fast.lookup(k)), strip(oracle.lookup(k)), "{what}: {k:?}");
        }
    };
    let mut ids = Vec::new();
    for i in 0..400 {
        ids.push((oracle.insert(rule(i)).unwrap(), fast.insert(rule(i)).unwrap()));
    }
    assert!(fast.levels().0 >= 2, "several levels expected, got {:?}", fast.levels());
    check(&oracle, &fast, "filled");
    for (n, (o, f)) in ids.drain(..).enumerate() {
        assert!(oracle.remove(o) && fast.remove(f));
        if n % 37 == 0 {
            check(&oracle, &fast, "draining");
        }
    }
    assert!(fast.is_empty());
    assert!(keys.iter().all(|k| fast.lookup(k).is_none()));
    for i in 0..150 {
        oracle.insert(rule(i)).unwrap();
        fast.insert(rule(i)).unwrap();
    }
    check(&oracle, &fast, "refilled");
}

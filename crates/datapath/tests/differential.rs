//! The engine against the reference evaluator over the whole service space:
//! the properties of `support/agree.rs` on generated programs (random
//! policies, flows of every protocol, both directions, with and without
//! connection state), and on every input the `differential` fuzz target
//! ever failed on (`fuzz/regressions/differential/`).

#[path = "support/agree.rs"]
mod agree;

use agree::Coverage;

/// Programs from a fixed generator: every verdict agrees with the
/// semantics, and together they cover the protocols, the ICMP roles and the
/// scenarios the check is for, so it is known not to stop short.
#[test]
fn the_engine_decides_every_flow_as_the_policy_says() {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut total = Coverage::default();
    let programs = 1500;
    for _ in 0..programs {
        let len = 64 + (next() % 1024) as usize;
        let program: Vec<u8> = (0..len).map(|_| (next() >> 24) as u8).collect();
        match agree::check(&program) {
            Ok(c) => total.merge(&c),
            Err(e) => panic!("{e}\nprogram: {program:?}"),
        }
    }
    let icmp: Vec<_> = total.cases.iter().filter(|c| c.0 == 1).collect();
    let icmpv6: Vec<_> = total.cases.iter().filter(|c| c.0 == 58).collect();
    println!(
        "{programs} policies, {} flows, {} packets; {} distinct (protocol, type, code) cases: \
         {} ICMP, {} ICMPv6, {} other; scenarios {:?}; verdicts {:?}",
        total.flows,
        total.packets,
        total.cases.len(),
        icmp.len(),
        icmpv6.len(),
        total.cases.len() - icmp.len() - icmpv6.len(),
        total.scenarios,
        total.verdicts
    );
    for p in [6, 17, 132, 47, 50] {
        assert!(total.cases.contains(&(p, 0, 0)), "protocol {p} never generated");
    }
    assert!(
        icmp.len() > 200 && icmpv6.len() > 200,
        "{} ICMP, {} ICMPv6 cases",
        icmp.len(),
        icmpv6.len()
    );
    for s in ["fresh", "reverse-first", "unrelated-error", "related-error"] {
        assert!(total.scenarios.contains(s), "scenario {s} never ran");
    }
    for v in [
        "forward",
        "policy-deny",
        "policy-reject",
        "icmp-error-unrelated",
        "fragment",
        "tcp-no-connection",
        "inspected",
        "uninspected",
    ] {
        assert!(total.verdicts.contains(v), "no {v} verdict: {:?}", total.verdicts);
    }
}

#[test]
fn every_committed_fuzz_input_agrees() {
    palisade_testkit::assert_regressions_pass("differential", |data| agree::check(data).map(|_| ()));
}

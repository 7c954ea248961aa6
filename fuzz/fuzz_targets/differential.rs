//! Fuzz the engine against the reference evaluator: the input is a program
//! (a random policy, a zone mode, flows of every protocol the policy
//! language names), each flow's packets sent in both directions with and
//! without connection state; every verdict must be what the policy and
//! DESIGN.md's ICMP semantics say (crates/datapath/tests/support/agree.rs).
#![no_main]

#[path = "../../crates/datapath/tests/support/agree.rs"]
#[allow(dead_code)]
mod agree;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = agree::check(data) {
        panic!("{e}");
    }
});

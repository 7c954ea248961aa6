//! Audit recovery under damage (the property of the `audit_recovery` fuzz
//! target, `support/recovery.rs`): every input the fuzzer ever failed on,
//! committed in `fuzz/regressions/audit_recovery/` (each `NAME` described in
//! `NAME.txt`), and a few hundred generated inputs on every test run.

#[path = "support/recovery.rs"]
mod recovery;

#[test]
fn every_committed_audit_recovery_fuzz_input_passes() {
    palisade_testkit::assert_regressions_pass("audit_recovery", recovery::check);
}

#[test]
fn recovery_holds_on_generated_damage() {
    // xorshift64*, fixed seed: the same inputs on every run.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut failures = Vec::new();
    for i in 0..300 {
        let input: Vec<u8> = (0..160)
            .map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
            })
            .collect();
        if let Err(e) = recovery::check(&input) {
            failures.push(format!(
                "input {i} ({}): {e}",
                palisade_audit::checkpoint::to_hex(&input)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 300 fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

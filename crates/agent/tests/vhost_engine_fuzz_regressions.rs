//! Replays every input committed for the `vhost_engine` fuzz target (in
//! `fuzz/regressions/vhost_engine/`, each with a one-line `NAME.txt`)
//! through the same checks the target runs, and runs a few generated
//! programs so the checks themselves are exercised on every test run.

mod vhost_engine_fuzz;

#[test]
fn every_committed_vhost_engine_input_passes() {
    palisade_testkit::assert_regressions_pass("vhost_engine", |data| vhost_engine_fuzz::check(data).map(|_| ()));
}

/// A program that makes the guest talk to the local VM on allowed and
/// denied services and receive answers: frames reach the guest's buffers and
/// are compared, so the comparison is not vacuous.
#[test]
fn a_plain_program_delivers_frames_the_engine_allowed_to_the_guest() {
    // Ring size 8, no optional feature, 8 frames per call.
    let mut program = vec![0u8, 0, 8];
    // Post eight 2 KiB receive buffers.
    program.extend([5, 7, 0x00, 0x08, 1]);
    for dport in 0..8u8 {
        // A TCP SYN from the local VM (b) to the guest, from port 40000 to
        // 443, 22, 23, 80, 53, 69, 40000, 40001: only 443 is allowed.
        program.extend([8, 0, 1, 0, 6, dport, 0x02, 0, 0, 0]);
    }
    // Published.
    program.push(9);
    // The guest sends to b: UDP to port 53, then a TCP SYN to 22; the worker takes them.
    program.extend([0, 0, 1, 6, 4, 0, 0, 0]);
    program.extend([0, 0, 0, 6, 1, 0x02, 0, 0, 0, 0, 0]);
    program.extend([6, 31, 9]);
    let compared = vhost_engine_fuzz::check(&program).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        compared, 1,
        "the one allowed SYN reached the guest's buffers and was compared"
    );
}

//! Replays every input committed for the `virtqueue` fuzz target (in
//! `fuzz/regressions/virtqueue/`, each with a one-line `NAME.txt`) through
//! the same checks the target runs. Also runs under Miri.

mod virtqueue_fuzz;

#[test]
fn every_committed_virtqueue_input_passes() {
    palisade_testkit::assert_regressions_pass("virtqueue", virtqueue_fuzz::check);
}

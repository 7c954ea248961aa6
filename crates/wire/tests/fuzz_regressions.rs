//! Replays every input the fuzzers ever found a failure with, plus the seed
//! frames committed beside them, through the same checks the fuzz targets run.
//!
//! Inputs live in `fuzz/regressions/<target>/`; each file `NAME` has a
//! one-line description in `NAME.txt` saying what it broke and how it was fixed.

#[test]
fn every_committed_fuzz_input_passes() {
    palisade_testkit::assert_regressions_pass("dissect", palisade_testkit::check_frame);
}

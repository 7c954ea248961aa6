//! Replays every input the engine fuzz target ever found a failure with
//! through the checks it runs (`palisade_testkit::check_engine`).
//!
//! Inputs live in `fuzz/regressions/engine/`; each file `NAME` has a
//! one-line description in `NAME.txt` saying what it broke and how it was fixed.

#[test]
fn every_committed_engine_fuzz_input_passes() {
    palisade_testkit::assert_regressions_pass("engine", |data| palisade_testkit::check_engine(data).map(drop));
}

//! Replays every input the engine fuzz target ever found a failure with
//! through the checks it runs (`palisade_datapath::fuzzing::check_engine`).
//!
//! Inputs live in `fuzz/regressions/engine/`; each file `NAME` has a
//! one-line description in `NAME.txt` saying what it broke and how it was fixed.

use std::path::Path;

#[test]
fn every_committed_engine_fuzz_input_passes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/engine");
    let mut checked = 0;
    let mut failures = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "txt") {
            continue;
        }
        let described = path.with_file_name(format!("{}.txt", path.file_name().unwrap().to_string_lossy()));
        assert!(
            described.is_file(),
            "{} has no one-line description ({})",
            path.display(),
            described.display()
        );
        let data = std::fs::read(&path).unwrap();
        if let Err(e) = palisade_datapath::fuzzing::check_engine(&data) {
            failures.push(format!("{}: {e}", path.display()));
        }
        checked += 1;
    }
    assert!(checked > 0, "no regression inputs found in {}", dir.display());
    assert!(
        failures.is_empty(),
        "{} of {checked} inputs fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

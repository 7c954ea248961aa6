//! Replaying the inputs fuzz targets once failed on: every one committed
//! under `fuzz/regressions/<target>/` runs again in a normal test.

use std::path::Path;

/// Run `check` over every input committed in `fuzz/regressions/<target>/`
/// (the inputs a fuzz target ever failed on, each `NAME` with a one-line
/// description in `NAME.txt` of what it broke and how it was fixed), for the
/// tests that replay them.
///
/// # Panics
///
/// When an input has no description, when there are no inputs, or when
/// `check` fails on any (all failures are listed): it is an assertion.
pub fn assert_regressions_pass(target: &str, check: impl Fn(&[u8]) -> Result<(), String>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regressions")
        .join(target);
    let mut checked = 0;
    let mut failures = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap_or_else(|e| panic!("{}: {e}", dir.display())).path();
        if path.extension().is_some_and(|e| e == "txt") {
            continue;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let described = path.with_file_name(format!("{name}.txt"));
        assert!(
            described.is_file(),
            "{} has no one-line description ({})",
            path.display(),
            described.display()
        );
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Err(e) = check(&data) {
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

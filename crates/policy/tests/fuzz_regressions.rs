//! The `policy_yaml` fuzz target's property, replayed on every input it
//! ever failed with (`fuzz/regressions/policy_yaml/NAME`, each described in
//! `NAME.txt`) and run on programs generated here, on a small stack.

#[path = "support/yaml_program.rs"]
mod yaml_program;

/// Check `program`'s text on a thread with a 256 KiB stack: the loader
/// must not recurse per level of anything.
fn check_program(program: Vec<u8>) -> Result<(), String> {
    std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(move || {
            let text = yaml_program::build(&program);
            yaml_program::check(&text).map_err(|e| format!("{e}\n  text: {:?}", clip(&text)))
        })
        .expect("spawn")
        .join()
        .map_err(|_| "the loader panicked".to_string())?
}

fn clip(s: &str) -> String {
    s.chars().take(400).collect()
}

#[test]
fn every_committed_fuzz_input_passes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/policy_yaml");
    let mut failures = Vec::new();
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.extension().is_some_and(|e| e == "txt") {
            continue;
        }
        let described = path.with_file_name(format!("{}.txt", path.file_name().unwrap().to_string_lossy()));
        assert!(described.exists(), "{} has no description", path.display());
        if let Err(e) = check_program(std::fs::read(&path).expect("input")) {
            failures.push(format!("{}: {e}", path.display()));
        }
        checked += 1;
    }
    assert!(checked > 0, "no inputs in {}", dir.display());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Deterministic programs (xorshift), a few hundred bytes each, with long
/// repeats: deep nesting of every kind, alias chains, odd characters.
#[test]
fn generated_programs_hold_the_properties() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut failures = Vec::new();
    for case in 0..300 {
        let len = 16 + (next() % 400) as usize;
        let program: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if let Err(e) = check_program(program.clone()) {
            failures.push(format!("case {case} {program:?}: {e}"));
        }
    }
    // The shapes the limits are for, written out.
    let mut laughs = vec![0, 6, 2, 0xf0, 9, 5, 0, 4];
    for _ in 0..8 {
        laughs.extend([6, 2, 0xf0, 9, 7, 1, 4]);
    }
    let shapes: Vec<Vec<u8>> = vec![
        // 4,096 nested block sequences, then a scalar.
        vec![0xff, 0xff, 0, 0, 5, 0],
        // Block mappings, flow sequences, flow mappings likewise.
        vec![0xff, 0xff, 1, 0, 5, 0],
        vec![0xff, 0xff, 2, 0, 5, 0],
        vec![0xff, 0xff, 3, 0, 5, 0],
        // A billion laughs in a block list: ten scalars anchored, then
        // eight lists of ten aliases to the anchor before, each anchored.
        laughs,
    ];
    for (i, program) in shapes.into_iter().enumerate() {
        if let Err(e) = check_program(program) {
            failures.push(format!("shape {i}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

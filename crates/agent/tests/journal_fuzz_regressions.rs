//! The crash journal's fuzz property (`journal_fuzz/mod.rs`, the
//! `journal_replay` fuzz target's): every input committed under
//! `fuzz/regressions/journal_replay/` (each with a `NAME.txt` saying what it
//! found), then a few hundred generated programs, so that the property
//! runs in every test run and not only under the fuzzer.

mod journal_fuzz;

#[test]
fn every_committed_journal_replay_input_passes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/journal_replay");
    // No input has failed the property yet: the directory comes with the first.
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("no input committed under {}", dir.display());
        return;
    };
    let mut failures = Vec::new();
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "txt") {
            continue;
        }
        assert!(
            path.with_extension("txt").exists()
                || path
                    .with_file_name(format!("{}.txt", path.file_name().unwrap().to_string_lossy()))
                    .exists(),
            "{} has no .txt saying what it found",
            path.display()
        );
        if let Err(e) = journal_fuzz::check(&std::fs::read(&path).unwrap()) {
            failures.push(format!("{}: {e}", path.display()));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn generated_journal_programs_pass() {
    // xorshift64, fixed seed: the same programs every run.
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for i in 0..300 {
        let len = (next() % 200) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if let Some(b) = data.first_mut() {
            // Mostly writer programs, some raw files.
            if i % 10 != 0 {
                *b &= 0x7f;
            }
        }
        if let Err(e) = journal_fuzz::check(&data) {
            panic!("program {i} ({data:?}): {e}");
        }
    }
}

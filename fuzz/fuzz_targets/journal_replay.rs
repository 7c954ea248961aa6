//! Fuzz the crash journal (`palisade_agent::journal`): programs of
//! connection events, snapshot rotations and crash points written by the
//! real writer into a mapped file, read back against a model, then damaged
//! (bit flips, cuts, appended bytes) and read again; or any bytes read as a
//! journal file. The properties are in `crates/agent/tests/journal_fuzz/mod.rs`.
#![no_main]

#[path = "../../crates/agent/tests/journal_fuzz/mod.rs"]
mod journal_fuzz;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = journal_fuzz::check(data) {
        panic!("{e}");
    }
});

//! Fuzz audit recovery: a trail built by the real writer, random damage
//! (flips, truncations, zeroed or inserted bytes, deleted, duplicated or
//! swapped files, a consistent tail cut, an older copy put back), recovery
//! (open with or without the head publisher, one append), then verify with
//! the key pinned, without and with the published head: no acknowledged
//! record lost, no tampering reported as intact. The property lives in
//! `crates/audit/tests/support/recovery.rs`, which the replay test uses too.
#![no_main]

#[path = "../../crates/audit/tests/support/recovery.rs"]
mod recovery;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = recovery::check(data) {
        panic!("{e}");
    }
});

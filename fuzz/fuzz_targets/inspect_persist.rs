//! Fuzz target: see `crates/inspect/tests/props/mod.rs`, `persist`.
#![no_main]

#[path = "../../crates/inspect/tests/props/mod.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::persist(data));

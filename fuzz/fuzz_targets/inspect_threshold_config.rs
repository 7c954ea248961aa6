//! Fuzz target: see `crates/inspect/tests/props/mod.rs`, `threshold_config`.
#![no_main]

#[path = "../../crates/inspect/tests/props/mod.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::threshold_config(data));

//! Fuzz a hostile guest's vhost-user queue pair wired to a real firewall
//! engine: descriptor chains, lengths, addresses and ring indices from the
//! guest, its frames through the engine, the engine's frames into its
//! receive queue; the properties are in
//! `crates/agent/tests/vhost_engine_fuzz/mod.rs`.
#![no_main]

#[path = "../../crates/agent/tests/vhost_engine_fuzz/mod.rs"]
mod vhost_engine_fuzz;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = vhost_engine_fuzz::check(data) {
        panic!("{e}");
    }
});

//! Fuzz the vhost-user queue pair's data path (`palisade_io::vhost_user::NetRings`)
//! with programs of guest memory writes, descriptor chains, ring indices,
//! receives, sends, flushes and ring restarts over a two-region guest memory;
//! the properties are in `crates/io/tests/virtqueue_fuzz/mod.rs`.
#![no_main]

#[path = "../../crates/io/tests/virtqueue_fuzz/mod.rs"]
mod virtqueue_fuzz;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = virtqueue_fuzz::check(data) {
        panic!("{e}");
    }
});

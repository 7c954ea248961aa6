//! Fuzz the decoder of a live migration's inspection section
//! (`palisade_agent::inspection::carry`): any bytes, with the checksum made
//! right half the time so that the decoder behind it is reached. The
//! property is `crates/agent/tests/section_check/mod.rs`.
#![no_main]

#[path = "../../crates/agent/tests/section_check/mod.rs"]
mod section_check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut b = rest.to_vec();
    if mode & 1 == 1 && b.len() >= 4 {
        let at = b.len() - 4;
        let crc = palisade_datapath::state::crc32(&b[..at]);
        b[at..].copy_from_slice(&crc.to_be_bytes());
    }
    if let Err(e) = section_check::check_section(&b) {
        panic!("{e}");
    }
});

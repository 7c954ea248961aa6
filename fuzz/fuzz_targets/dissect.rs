//! Fuzz the whole wire layer: dissection, emit round trip, flow-key extraction.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = palisade_testkit::check_frame(data) {
        panic!("{e}");
    }
});

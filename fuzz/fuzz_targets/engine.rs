//! Fuzz the datapath engine with programs of frames, time and policy changes:
//! batched and one-at-a-time processing agree, counts add up, tables hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = palisade_testkit::check_engine(data) {
        panic!("{e}");
    }
});

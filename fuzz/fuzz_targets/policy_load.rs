//! Fuzz the policy loader with arbitrary file text: loading, validation and
//! diagnostics rendering never panic; a policy without errors compiles.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let src = palisade_policy::MemorySource::new().with("p.yaml", text);
    let Ok(loaded) = palisade_policy::load(&src) else {
        return;
    };
    let _ = loaded.render();
    if !loaded.has_errors() {
        let _ = palisade_policy::compile::Compiler::new(loaded.model);
    }
});

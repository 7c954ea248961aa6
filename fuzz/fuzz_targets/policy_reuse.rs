//! Fuzz the loader's reuse of `vms:` entries: two policy texts (split at the
//! first NUL) are loaded one after the other by one `Loader`, and the second
//! load must equal a fresh `load` of the second text: the same model,
//! positions included, and the same diagnostics, whatever the texts.
#![no_main]

use palisade_policy::MemorySource;
use palisade_policy::load::{Loader, load};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (first, second) = text.split_once('\0').unwrap_or((text, text));
    let mut loader = Loader::new();
    for t in [first, second] {
        let src = MemorySource::new().with("p.yaml", t);
        let (Ok(reused), Ok(fresh)) = (loader.load(&src), load(&src)) else {
            return;
        };
        assert_eq!(reused.model, fresh.model, "models differ for {t:?}");
        assert_eq!(reused.diagnostics, fresh.diagnostics, "diagnostics differ for {t:?}");
    }
});

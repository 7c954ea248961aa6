//! The property an inspection section's decoder keeps, for the tests and
//! the fuzz target (`fuzz/fuzz_targets/inspection_section.rs`): any bytes
//! decode without a panic, to a section or a refusal; a section this
//! build's format (version 2) accepts is exactly what encoding its contents
//! writes, so nothing in it was skipped or read two ways; and a section
//! names each flow at most once, removals only in a delta.

use palisade_agent::inspection::carry::{self, SectionKind};

/// Check `bytes` as a section sent for vNIC `a.0`.
pub fn check_section(bytes: &[u8]) -> Result<(), String> {
    let Ok(section) = carry::decode(bytes, "a.0") else {
        return Ok(());
    };
    if section.kind != SectionKind::Delta && !section.removed.is_empty() {
        return Err(format!("a {:?} with removals", section.kind));
    }
    let version = bytes.get(6..8).map(|v| u16::from_be_bytes([v[0], v[1]]));
    if version == Some(carry::VERSION) {
        let again = carry::encode_section("a.0", section.kind, &section.flows, &section.removed);
        if again != bytes {
            return Err(format!(
                "accepted {} bytes that encode back as {} different bytes",
                bytes.len(),
                again.len()
            ));
        }
    }
    Ok(())
}

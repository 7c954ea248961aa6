//! Properties the fuzz targets check, shared with the test that replays every
//! committed crash input (`crates/wire/tests/fuzz_regressions.rs`).
//!
//! Not part of the stable API: hidden from the documentation.

use std::path::Path;

use crate::flow;
use crate::frame::Dissection;

/// Run every parser on `data` as an Ethernet frame and as a raw IP packet, and
/// check the structural properties that must hold for any input:
/// - nothing panics;
/// - a frame the dissector accepts emits to bytes that dissect to the same headers;
/// - for a frame with valid checksums, the emitted bytes equal the input;
/// - the fast-path extractor accepts every frame the dissector accepts whole,
///   and they agree on addresses and protocol.
///
/// Returns a description of the first property that fails.
pub fn check_frame(data: &[u8]) -> Result<(), String> {
    let _ = Dissection::ip(data);
    let _ = flow::extract_ip(data, flow::Segment::UNTAGGED);
    let fast = flow::extract(data);
    if let Some(quick) = flow::extract_quick(data)
        && fast != Ok(Some(quick))
    {
        return Err(format!("quick flow extraction {quick:?} disagrees with {fast:?}"));
    }
    let d = Dissection::ethernet(data);
    let Some(len) = d.buffer_len() else { return Ok(()) };
    let mut out = vec![0u8; len];
    d.emit(&mut out).ok_or("emit refused a buffer of its own buffer_len")?;
    let again = Dissection::ethernet(&out);
    if again.error.is_some() || again.network != d.network || again.transport != d.transport {
        return Err(format!("emitted frame dissects differently: {again:?} vs {d:?}"));
    }
    if d.checksums_valid() && out != data {
        let at = out
            .iter()
            .zip(data)
            .position(|(a, b)| a != b)
            .unwrap_or(out.len().min(data.len()));
        return Err(format!(
            "round trip differs at byte {at} (lengths {} and {})",
            out.len(),
            data.len()
        ));
    }
    match fast {
        Ok(Some(info)) => {
            if let Some((src, dst)) = d.addresses()
                && (info.key.src_addr() != src || info.key.dst_addr() != dst)
            {
                return Err(format!("flow key addresses {:?} disagree with dissection", info.key));
            }
        }
        Ok(None) => {
            if d.addresses().is_some() {
                return Err("dissection found IP but the flow extractor did not".into());
            }
        }
        Err(e) => return Err(format!("flow extractor rejected ({e}) a frame the dissector accepted")),
    }
    Ok(())
}

/// Run `check` over every input committed in `fuzz/regressions/<target>/`
/// (the inputs a fuzz target ever failed on, each `NAME` with a one-line
/// description in `NAME.txt` of what it broke and how it was fixed), for the
/// tests that replay them.
///
/// # Panics
///
/// When an input has no description, when there are no inputs, or when
/// `check` fails on any (all failures are listed): it is an assertion.
pub fn assert_regressions_pass(target: &str, check: impl Fn(&[u8]) -> Result<(), String>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regressions")
        .join(target);
    let mut checked = 0;
    let mut failures = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap_or_else(|e| panic!("{}: {e}", dir.display())).path();
        if path.extension().is_some_and(|e| e == "txt") {
            continue;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let described = path.with_file_name(format!("{name}.txt"));
        assert!(
            described.is_file(),
            "{} has no one-line description ({})",
            path.display(),
            described.display()
        );
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Err(e) = check(&data) {
            failures.push(format!("{}: {e}", path.display()));
        }
        checked += 1;
    }
    assert!(checked > 0, "no regression inputs found in {}", dir.display());
    assert!(
        failures.is_empty(),
        "{} of {checked} inputs fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

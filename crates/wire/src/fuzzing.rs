//! Properties the fuzz targets check, shared with the test that replays every
//! committed crash input (`crates/wire/tests/fuzz_regressions.rs`).
//!
//! Not part of the stable API: hidden from the documentation.

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

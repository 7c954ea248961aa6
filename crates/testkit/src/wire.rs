//! The wire layer's properties, which the `dissect` fuzz target checks and
//! `crates/wire/tests/fuzz_regressions.rs` replays over every committed crash
//! input.

use palisade_wire::flow;
use palisade_wire::frame::{Dissection, Transport};
use palisade_wire::ip::IpProtocol;

/// Run every parser on `data` as an Ethernet frame and as a raw IP packet, and
/// check the structural properties that must hold for any input:
/// - nothing panics;
/// - a frame the dissector accepts emits to bytes that dissect to the same headers;
/// - for a frame with valid checksums, the emitted bytes equal the input;
/// - the fast-path extractor accepts every frame the dissector accepts whole,
///   and they agree on addresses, and on the ports of TCP, UDP and SCTP and
///   the type and code of ICMP;
/// - the packet's first bytes, read as an ICMP error would quote them (the
///   IP header and 8 bytes of transport), give the packet's own flow key
///   ([`flow::extract_quoted`]), unless no key can be quoted (a non-first
///   fragment, an ICMP error).
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
            let k = &info.key;
            let dissected = match d.transport {
                Transport::Tcp(t) => Some((t.src_port, t.dst_port)),
                Transport::Udp(u) => Some((u.src_port, u.dst_port)),
                Transport::Sctp(s) => Some((s.src_port, s.dst_port)),
                Transport::Icmpv4(_) | Transport::Icmpv6(_) => info.icmp.map(|_| (k.src_port, k.dst_port)),
                _ => None,
            };
            if dissected.is_some_and(|p| p != (k.src_port, k.dst_port)) {
                return Err(format!(
                    "flow key ports {k:?} disagree with dissection {:?}",
                    d.transport
                ));
            }
            check_quoted(data, &info)?;
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

/// The packet of `frame` that `info` describes, quoted as an ICMP error
/// quotes it, gives `info`'s key back.
fn check_quoted(frame: &[u8], info: &flow::FlowInfo) -> Result<(), String> {
    let k = &info.key;
    let v6 = k.protocol == IpProtocol::ICMPV6;
    if info.fragment == flow::Fragment::NonFirst || info.icmp.is_some_and(|(ty, _)| flow::is_icmp_error(v6, ty)) {
        return Ok(());
    }
    let (l3, l4) = (usize::from(info.l3_offset), usize::from(info.l4_offset));
    // The IP layer's own end (the extractor accepted its length fields).
    let end = match frame.get(l3).map(|b| b >> 4) {
        Some(4) => frame
            .get(l3 + 2..l3 + 4)
            .map(|b| l3 + usize::from(u16::from_be_bytes([b[0], b[1]]))),
        _ => frame
            .get(l3 + 4..l3 + 6)
            .map(|b| l3 + 40 + usize::from(u16::from_be_bytes([b[0], b[1]]))),
    };
    let Some(quote) = end.and_then(|end| frame.get(l3..(l4 + 8).min(end))) else {
        return Err(format!("the packet of key {k:?} is not within its frame"));
    };
    match flow::extract_quoted(quote, k.segment) {
        Some(q) if q == *k => Ok(()),
        other => Err(format!("the quoted packet's key {other:?} differs from its own {k:?}")),
    }
}

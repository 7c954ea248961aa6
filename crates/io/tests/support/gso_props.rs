//! Properties of software segmentation and coalescing (`palisade_io::gso`),
//! shared by the property tests (`tests/gso_props.rs`) and the fuzz target
//! (`fuzz/fuzz_targets/gso.rs`).
//!
//! - [`build`] makes a TCP (or UDP) super-frame from a [`Spec`];
//! - [`check_segment`]: every segment is a valid packet (the wire crate's
//!   dissector, checksums included), sequence numbers, IP identifications,
//!   lengths and flags are what the kernel's GSO would write, and the
//!   payloads put together are the super-frame's;
//! - [`check_coalesce`]: whatever packets go in, every merged super-frame is
//!   well formed (its partial checksum completes to a valid one) and cut up
//!   again gives back exactly the packets it was made of; per flow, the
//!   packets that come out (merged ones cut up) are the packets that went in,
//!   in the same order;
//! - [`check_round_trip`]: a super-frame the coalescer may merge, cut up and
//!   merged again, is the super-frame (checksum field aside) with the same
//!   offload state;
//! - [`Program`]: bytes read as a super-frame or two, cut up, then reordered,
//!   dropped, duplicated, corrupted, re-flagged, interleaved with other
//!   packets, fed to the coalescer.
#![allow(dead_code)]

use palisade_io::Offload;
use palisade_io::gso::{self, Coalescer, GsoError};
use palisade_wire::checksum;
use palisade_wire::frame::{Dissection, Network, Transport};
use palisade_wire::virtio_net::{Gso, GsoKind, PartialChecksum};

/// TCP flag bits.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;
pub const URG: u8 = 0x20;
pub const ECE: u8 = 0x40;
pub const CWR: u8 = 0x80;

/// A super-frame to build.
#[derive(Debug, Clone)]
pub struct Spec {
    /// IPv6 (else IPv4).
    pub v6: bool,
    /// UDP segmentation (else TCP).
    pub udp: bool,
    /// VLAN tags, 0 to 2.
    pub tags: u8,
    /// IPv4 option words (0 to 10), NOP-filled.
    pub ip_option_words: u8,
    /// TCP option words (0 to 10): a timestamp option first, then NOPs.
    pub tcp_option_words: u8,
    /// TCP flags.
    pub flags: u8,
    /// Segment size (payload bytes per packet), at least 1.
    pub segment_size: u16,
    /// Payload bytes, at least 1.
    pub payload_len: usize,
    /// Initial sequence number.
    pub seq: u32,
    /// Acknowledgment number.
    pub ack: u32,
    /// IPv4 identification of the first segment.
    pub ident: u16,
    /// IPv4 TOS / IPv6 traffic class.
    pub tos: u8,
    /// TTL / hop limit.
    pub ttl: u8,
    /// TCP window.
    pub window: u16,
    /// The port pair's low bytes (several flows in one program).
    pub flow: u8,
    /// The 8-byte prefix (VXLAN header).
    pub prefix: [u8; 8],
    /// Payload byte pattern seed.
    pub seed: u8,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            v6: false,
            udp: false,
            tags: 0,
            ip_option_words: 0,
            tcp_option_words: 3,
            flags: ACK,
            segment_size: 1448,
            payload_len: 65_000,
            seq: 1_000,
            ack: 77,
            ident: 0x1234,
            tos: 0,
            ttl: 64,
            window: 501,
            flow: 1,
            prefix: [0x88, 0, 0x01, 0x02, 0, 0, 0x0a, 0],
            seed: 3,
        }
    }
}

impl Spec {
    /// Whether the coalescer may merge this super-frame's segments back into it.
    pub fn mergeable(&self) -> bool {
        !self.udp
            && self.ip_option_words == 0
            && self.flags & ACK != 0
            && self.flags & !(ACK | PSH | ECE | CWR) == 0
            && self.payload_len.div_ceil(usize::from(self.segment_size)) <= gso::MAX_SEGMENTS
    }

    /// Clamp every field to what [`build`] can make (lengths within an IP datagram).
    pub fn clamp(mut self) -> Spec {
        self.tags = self.tags.min(2);
        self.ip_option_words = if self.v6 { 0 } else { self.ip_option_words.min(10) };
        self.tcp_option_words = self.tcp_option_words.min(10);
        self.segment_size = self.segment_size.max(1);
        let headers = self.l4_header_len()
            + if self.v6 {
                0
            } else {
                20 + 4 * usize::from(self.ip_option_words)
            };
        self.payload_len = self.payload_len.clamp(1, 65_535 - headers);
        self
    }

    fn l4_header_len(&self) -> usize {
        if self.udp {
            8
        } else {
            20 + 4 * usize::from(self.tcp_option_words)
        }
    }

    /// The GSO kind this super-frame asks for.
    pub fn kind(&self) -> GsoKind {
        match (self.udp, self.v6) {
            (true, _) => GsoKind::UdpL4,
            (false, false) => GsoKind::TcpV4,
            (false, true) => GsoKind::TcpV6,
        }
    }
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// The super-frame `spec` describes, with its offload state (partial
/// checksum holding the pseudo-header sum, as Linux writes it).
pub fn build(spec: &Spec) -> (Vec<u8>, Offload) {
    let s = spec.clone().clamp();
    let mut f = vec![0x02, 0, 0, 0, 0, 0x0b, 0x02, 0, 0, 0, 0, 0x0a];
    for t in 0..s.tags {
        f.extend_from_slice(&[0x81, 0x00, 0, 10 + t]);
    }
    let l3 = f.len() + 2;
    let l4_len = s.l4_header_len() + s.payload_len;
    let proto = if s.udp { 17 } else { 6 };
    let (src, dst): (Vec<u8>, Vec<u8>) = if s.v6 {
        f.extend_from_slice(&[0x86, 0xdd]);
        let mut h = vec![0x60 | (s.tos >> 4), s.tos << 4, 0x12, 0x34, 0, 0, proto, s.ttl];
        put16(&mut h, 4, l4_len as u16);
        let src = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a].to_vec();
        let dst = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0b].to_vec();
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        f.extend_from_slice(&h);
        (src, dst)
    } else {
        f.extend_from_slice(&[0x08, 0x00]);
        let ihl = 5 + s.ip_option_words;
        let mut h = vec![
            0x40 | ihl,
            s.tos,
            0,
            0,
            0,
            0,
            0x40,
            0,
            s.ttl,
            proto,
            0,
            0,
            10,
            0,
            0,
            10,
            10,
            0,
            0,
            11,
        ];
        h.extend(std::iter::repeat_n(1u8, 4 * usize::from(s.ip_option_words)));
        let total = (h.len() + l4_len) as u16;
        put16(&mut h, 2, total);
        put16(&mut h, 4, s.ident);
        let c = checksum::checksum(&h);
        put16(&mut h, 10, c);
        f.extend_from_slice(&h);
        (vec![10, 0, 0, 10], vec![10, 0, 0, 11])
    };
    let l4 = f.len();
    let (sport, dport) = (0x9c00 | u16::from(s.flow), 0x1400 | u16::from(s.flow));
    if s.udp {
        let mut u = vec![0; 8];
        put16(&mut u, 0, sport);
        put16(&mut u, 2, dport);
        put16(&mut u, 4, l4_len as u16);
        f.extend_from_slice(&u);
    } else {
        let mut t = vec![0; 20];
        put16(&mut t, 0, sport);
        put16(&mut t, 2, dport);
        t[4..8].copy_from_slice(&s.seq.to_be_bytes());
        t[8..12].copy_from_slice(&s.ack.to_be_bytes());
        t[12] = (5 + s.tcp_option_words) << 4;
        t[13] = s.flags;
        put16(&mut t, 14, s.window);
        let mut opts = Vec::new();
        if s.tcp_option_words >= 3 {
            opts.extend_from_slice(&[1, 1, 8, 10, 0, 0, 1, 2, 0, 0, 3, 4]);
        }
        opts.resize(4 * usize::from(s.tcp_option_words), 1);
        t.extend_from_slice(&opts);
        f.extend_from_slice(&t);
    }
    let hdr_len = f.len();
    f.extend((0..s.payload_len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(s.seed)));
    // The checksum field holds the pseudo-header sum, as a sender with offloads leaves it.
    let pseudo = if s.v6 {
        let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
        a.copy_from_slice(&src);
        b.copy_from_slice(&dst);
        checksum::pseudo_header_v6(a, b, proto, l4_len as u32)
    } else {
        checksum::pseudo_header_v4([10, 0, 0, 10], [10, 0, 0, 11], proto, l4_len as u16)
    };
    let csum_at = if s.udp { 6 } else { 16 };
    put16(&mut f, l4 + csum_at, checksum::fold(pseudo));
    let offload = Offload {
        csum: Some(PartialChecksum {
            start: l4 as u16,
            offset: csum_at as u16,
        }),
        csum_valid: false,
        gso: Some(Gso {
            kind: s.kind(),
            ecn: s.flags & CWR != 0,
            size: s.segment_size,
            header_len: hdr_len as u16,
        }),
    };
    let _ = l3;
    (f, offload)
}

/// Where the headers of an untagged-or-tagged Ethernet frame lie: (l3, l4, header end), by the dissector.
fn offsets(frame: &[u8]) -> Option<(usize, usize, usize)> {
    let d = Dissection::ethernet(frame);
    if d.error.is_some() {
        return None;
    }
    let l3 = 14 + 4 * d.tags().count();
    let l4 = match d.network {
        Network::Ipv4(ip) => l3 + ip.buffer_len(),
        Network::Ipv6(_) => l3 + 40 + d.ext_headers.iter().map(|h| h.buffer_len()).sum::<usize>(),
        _ => return None,
    };
    let end = match d.transport {
        Transport::Tcp(t) => l4 + t.header_len(),
        Transport::Udp(_) => l4 + 8,
        _ => return None,
    };
    Some((l3, l4, end))
}

/// Cut `frame` with `prefix` and check every segment; returns the segments.
pub fn check_segment(frame: &[u8], offload: &Offload, prefix: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = vec![0xee; 3];
    // Room for any spec [`Spec::clamp`] allows: up to 65,535 one-byte
    // segments, each with its prefix and headers of up to ~150 bytes (4 MiB
    // was not: 62,602 one-byte segments with 67 bytes each were refused).
    // The refusal over a limit has a test of its own.
    let segs = match gso::segment(frame, offload, prefix, &mut out, 16 << 20) {
        Ok(s) => s,
        Err(e) => return Err(format!("segment refused: {e}")),
    };
    if out[..3] != [0xee; 3] || segs.start != 3 {
        return Err("bytes before the segments were touched".into());
    }
    let layout = gso::layout(frame, offload).map_err(|e| e.to_string())?;
    let (l3, l4, hdr_end) = offsets(frame).ok_or("the super-frame does not dissect")?;
    if (layout.l3, layout.l4, layout.header_len) != (l3, l4, hdr_end) {
        return Err(format!(
            "layout {layout:?} disagrees with the dissector ({l3}, {l4}, {hdr_end})"
        ));
    }
    let payload = &frame[hdr_end..];
    let size = layout.segment_size;
    let n = payload.len().div_ceil(size);
    if segs.count != n || out.len() != 3 + segs.total_len() {
        return Err(format!("{} segments, {} expected", segs.count, n));
    }
    let tcp = !matches!(layout.kind, GsoKind::UdpL4);
    let flags = if tcp { frame[l4 + 13] } else { 0 };
    let seq0 = u32::from_be_bytes([frame[l4 + 4], frame[l4 + 5], frame[l4 + 6], frame[l4 + 7]]);
    let id0 = u16::from_be_bytes([frame[l3 + 4], frame[l3 + 5]]);
    let mut joined = Vec::new();
    let all: Vec<Vec<u8>> = segs.iter(&out).map(<[u8]>::to_vec).collect();
    for (i, seg) in all.iter().enumerate() {
        if !seg.starts_with(prefix) {
            return Err(format!("segment {i}: prefix missing"));
        }
        let p = &seg[prefix.len()..];
        let d = Dissection::ethernet(p);
        if let Some(e) = d.error {
            return Err(format!("segment {i} does not dissect: {e}"));
        }
        if !d.trailer.is_empty() {
            return Err(format!("segment {i}: {} bytes past the IP datagram", d.trailer.len()));
        }
        if !d.checksums_valid() {
            return Err(format!("segment {i}: bad checksum"));
        }
        let chunk = &payload[i * size..((i + 1) * size).min(payload.len())];
        if p.len() != hdr_end + chunk.len() || &p[hdr_end..] != chunk {
            return Err(format!(
                "segment {i}: payload is not bytes {}.. of the super-frame",
                i * size
            ));
        }
        // The headers are the super-frame's, but for the fields GSO rewrites.
        let mut want = frame[..hdr_end].to_vec();
        let mut got = p[..hdr_end].to_vec();
        let mut mask = |at: usize, len: usize| {
            want[at..at + len].fill(0);
            got[at..at + len].fill(0);
        };
        if layout.v6 {
            mask(l3 + 4, 2);
        } else {
            mask(l3 + 2, 4);
            mask(l3 + 10, 2);
            let id = u16::from_be_bytes([p[l3 + 4], p[l3 + 5]]);
            if id != id0.wrapping_add(i as u16) {
                return Err(format!(
                    "segment {i}: IP id {id:#x}, {:#x} expected",
                    id0.wrapping_add(i as u16)
                ));
            }
        }
        if tcp {
            mask(l4 + 4, 4);
            mask(l4 + 13, 1);
            mask(l4 + 16, 2);
            let seq = u32::from_be_bytes([p[l4 + 4], p[l4 + 5], p[l4 + 6], p[l4 + 7]]);
            if seq != seq0.wrapping_add((i * size) as u32) {
                return Err(format!("segment {i}: seq {seq}"));
            }
            let (first, last) = (i == 0, i + 1 == n);
            let mut f = flags;
            if !last {
                f &= !(FIN | PSH);
            }
            if !first {
                f &= !CWR;
            }
            if p[l4 + 13] != f {
                return Err(format!("segment {i}: flags {:#x}, {f:#x} expected", p[l4 + 13]));
            }
        } else {
            mask(l4 + 4, 4);
        }
        if want != got {
            return Err(format!("segment {i}: headers differ beyond the rewritten fields"));
        }
        joined.extend_from_slice(chunk);
    }
    if joined != payload {
        return Err("the payloads do not make the super-frame's".into());
    }
    check_gathered(frame, offload, prefix, &all)?;
    Ok(all)
}

/// The headers [`gso::segment_headers`] writes, each followed by its payload
/// slice of the super-frame, are byte for byte the segments [`gso::segment`]
/// made (`segments`), with nothing written outside its own output.
fn check_gathered(frame: &[u8], offload: &Offload, prefix: &[u8], segments: &[Vec<u8>]) -> Result<(), String> {
    let mut hdrs = vec![0xdd; 5];
    let h = gso::segment_headers(frame, offload, prefix, &mut hdrs, 16 << 20)
        .map_err(|e| format!("segment_headers refused what segment took: {e}"))?;
    if hdrs[..5] != [0xdd; 5] || h.start != 5 || hdrs.len() != 5 + h.count() * h.header_stride {
        return Err(format!(
            "segment_headers wrote {} bytes from {}",
            hdrs.len() - 5,
            h.start
        ));
    }
    if h.count() != segments.len() {
        return Err(format!(
            "segment_headers: {} segments, {} expected",
            h.count(),
            segments.len()
        ));
    }
    for (i, want) in segments.iter().enumerate() {
        let (head, payload) = h.segment(i, &hdrs, frame);
        if [head, payload].concat() != *want {
            return Err(format!("gathered segment {i} differs from the copied one"));
        }
    }
    Ok(())
}

/// A key grouping packets by flow the way the test sees it: TCP packets by
/// prefix, Ethernet header, addresses and ports; anything else in one group.
fn flow_of(packet: &[u8], prefix_len: usize) -> Vec<u8> {
    let Some(inner) = packet.get(prefix_len..) else {
        return Vec::new();
    };
    let d = Dissection::ethernet(inner);
    let (Some((l3, l4, _)), Transport::Tcp(_)) = (offsets(inner), d.transport) else {
        return Vec::new();
    };
    let mut k = packet[..prefix_len + l3].to_vec();
    match d.network {
        Network::Ipv4(_) => k.extend_from_slice(&inner[l3 + 12..l3 + 20]),
        _ => k.extend_from_slice(&inner[l3 + 8..l3 + 40]),
    }
    k.extend_from_slice(&inner[l4..l4 + 4]);
    k
}

/// `packet` with its IPv4 header and TCP checksum fields zeroed (a valid
/// checksum has two encodings; both sides are checked valid separately).
fn without_checksums(packet: &[u8], prefix_len: usize) -> Vec<u8> {
    let mut p = packet.to_vec();
    let Some(inner) = packet.get(prefix_len..) else {
        return p;
    };
    let d = Dissection::ethernet(inner);
    if let (Some((l3, l4, _)), Transport::Tcp(_)) = (offsets(inner), d.transport) {
        if matches!(d.network, Network::Ipv4(_)) {
            p[prefix_len + l3 + 10..prefix_len + l3 + 12].fill(0);
        }
        p[prefix_len + l4 + 16..prefix_len + l4 + 18].fill(0);
    }
    p
}

/// What the coalescer made of `packets`: (bytes, offload state) in order.
pub fn coalesce(packets: &[Vec<u8>], prefix_len: usize) -> Vec<(Vec<u8>, Offload)> {
    let mut c = Coalescer::new(prefix_len);
    let mut out = Vec::new();
    for p in packets {
        c.push(p, &mut |b, o| out.push((b.to_vec(), *o)));
    }
    c.flush(&mut |b, o| out.push((b.to_vec(), *o)));
    out
}

/// Feed `packets` to a coalescer and check the properties in the module documentation.
pub fn check_coalesce(packets: &[Vec<u8>], prefix_len: usize) -> Result<Vec<(Vec<u8>, Offload)>, String> {
    let out = coalesce(packets, prefix_len);
    let mut expanded: Vec<Vec<u8>> = Vec::new();
    let mut merged_from: Vec<usize> = Vec::new();
    for (k, (bytes, offload)) in out.iter().enumerate() {
        if offload.gso.is_none() {
            expanded.push(bytes.clone());
            continue;
        }
        let (prefix, inner) = bytes.split_at(prefix_len);
        let g = offload.gso.ok_or("unreachable")?;
        let csum = offload
            .csum
            .ok_or(format!("output {k}: a super-frame without NEEDS_CSUM"))?;
        let (_, l4, hdr_end) = offsets(inner).ok_or(format!("output {k}: merged frame does not dissect"))?;
        if usize::from(csum.start) != l4 || csum.offset != 16 || usize::from(g.header_len) != hdr_end {
            return Err(format!(
                "output {k}: offload {offload:?} does not point at its TCP header"
            ));
        }
        if !g.kind.is_tcp() || g.size == 0 {
            return Err(format!("output {k}: offload {offload:?}"));
        }
        let mut completed = inner.to_vec();
        csum.complete(&mut completed).map_err(|e| format!("output {k}: {e}"))?;
        let d = Dissection::ethernet(&completed);
        if d.error.is_some() || !d.checksums_valid() || !d.trailer.is_empty() {
            return Err(format!(
                "output {k}: merged frame invalid once its checksum is completed"
            ));
        }
        let segs = check_segment(inner, offload, prefix).map_err(|e| format!("output {k}: {e}"))?;
        if segs.len() < 2 || segs.len() > gso::MAX_SEGMENTS {
            return Err(format!("output {k}: merged {} segments", segs.len()));
        }
        for s in segs {
            merged_from.push(expanded.len());
            expanded.push(s);
        }
    }
    if expanded.len() != packets.len() {
        return Err(format!(
            "{} packets in, {} out once cut up",
            packets.len(),
            expanded.len()
        ));
    }
    // Per flow, the same packets in the same order.
    let mut flows: Vec<Vec<u8>> = packets.iter().map(|p| flow_of(p, prefix_len)).collect();
    flows.sort();
    flows.dedup();
    for flow in flows {
        let a: Vec<Vec<u8>> = packets
            .iter()
            .filter(|p| flow_of(p, prefix_len) == flow)
            .map(|p| without_checksums(p, prefix_len))
            .collect();
        let b: Vec<Vec<u8>> = expanded
            .iter()
            .filter(|p| flow_of(p, prefix_len) == flow)
            .map(|p| without_checksums(p, prefix_len))
            .collect();
        if a != b {
            let first = a
                .iter()
                .zip(&b)
                .position(|(x, y)| x != y)
                .unwrap_or(a.len().min(b.len()));
            return Err(format!(
                "flow {flow:02x?}: {} packets in, {} out, first difference at {first}",
                a.len(),
                b.len()
            ));
        }
    }
    Ok(out)
}

/// Cut the super-frame of `spec` and merge it again: with a mergeable spec,
/// one frame comes out equal to the super-frame (TCP checksum field aside)
/// with the same offload state; with any spec, [`check_coalesce`] holds.
pub fn check_round_trip(spec: &Spec) -> Result<(), String> {
    let spec = spec.clone().clamp();
    let (frame, offload) = build(&spec);
    let segs = check_segment(&frame, &offload, &spec.prefix)?;
    let out = check_coalesce(&segs, spec.prefix.len())?;
    if !spec.mergeable() {
        return Ok(());
    }
    if segs.len() == 1 {
        return if out.len() == 1 && out[0].0 == segs[0] {
            Ok(())
        } else {
            Err("one segment did not come out as it went in".into())
        };
    }
    if out.len() != 1 {
        return Err(format!(
            "{} segments merged into {} frames, 1 expected",
            segs.len(),
            out.len()
        ));
    }
    let (bytes, o) = &out[0];
    let want = [&spec.prefix[..], &frame].concat();
    if without_checksums(bytes, 8) != without_checksums(&want, 8) {
        return Err("merged frame differs from the super-frame".into());
    }
    if o != &offload {
        return Err(format!("offload {o:?}, {offload:?} expected"));
    }
    Ok(())
}

/// A reader of fuzz bytes: every read succeeds (zeros past the end).
pub struct Bytes<'a>(pub &'a [u8]);

impl Bytes<'_> {
    /// The next byte, or 0.
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    /// The next two bytes, big-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    /// The next four bytes, big-endian.
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    /// Whether bytes remain.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A spec from fuzz bytes.
pub fn spec_from(b: &mut Bytes<'_>) -> Spec {
    let shape = b.u8();
    let flag_choice = [
        ACK,
        ACK | PSH,
        ACK | CWR,
        ACK | ECE,
        ACK | FIN,
        ACK | PSH | FIN,
        ACK | CWR | ECE | PSH,
        b.0.first().copied().unwrap_or(0),
    ];
    let flags = flag_choice[usize::from(b.u8() % 8)];
    Spec {
        v6: shape & 1 != 0,
        udp: shape & 0x80 != 0 && shape & 0x40 != 0,
        tags: (shape >> 1) & 3,
        ip_option_words: if shape & 8 != 0 { b.u8() % 11 } else { 0 },
        tcp_option_words: (shape >> 4) & 3 | if shape & 0x40 != 0 { 4 } else { 0 },
        flags,
        segment_size: b.u16() % 2048 + 1,
        payload_len: usize::from(b.u16()),
        seq: b.u32(),
        ack: b.u32(),
        ident: b.u16(),
        tos: b.u8(),
        ttl: b.u8(),
        window: b.u16(),
        flow: b.u8() % 4,
        prefix: [0x88, 0, 0, b.u8() % 2, 0, 0, 0x0a, 0],
        seed: b.u8(),
    }
    .clamp()
    .bounded(200)
}

impl Spec {
    /// The same with a segment size large enough for at most `segments` segments
    /// (keeps a fuzz run's work per input small).
    pub fn bounded(mut self, segments: usize) -> Spec {
        let min = self.payload_len.div_ceil(segments).min(usize::from(u16::MAX));
        self.segment_size = self.segment_size.max(min as u16);
        self
    }
}

/// Recompute the IPv4 header and TCP checksums of `packet` (after a
/// deliberate change that must not make it look corrupt).
pub fn fix_checksums(packet: &mut [u8], prefix_len: usize) {
    let Some(inner) = packet.get(prefix_len..) else { return };
    let Some((l3, l4, _)) = offsets(inner) else { return };
    let v4 = inner[l3] >> 4 == 4;
    let p = &mut packet[prefix_len..];
    if v4 {
        p[l3 + 10..l3 + 12].fill(0);
        let c = checksum::checksum(&p[l3..l4]);
        put16(p, l3 + 10, c);
    }
    if p.len() < l4 + 18 {
        return;
    }
    p[l4 + 16..l4 + 18].fill(0);
    let len = p.len() - l4;
    let pseudo = if v4 {
        let mut s = [0u8; 4];
        let mut d = [0u8; 4];
        s.copy_from_slice(&p[l3 + 12..l3 + 16]);
        d.copy_from_slice(&p[l3 + 16..l3 + 20]);
        checksum::pseudo_header_v4(s, d, 6, len as u16)
    } else {
        let mut s = [0u8; 16];
        let mut d = [0u8; 16];
        s.copy_from_slice(&p[l3 + 8..l3 + 24]);
        d.copy_from_slice(&p[l3 + 24..l3 + 40]);
        checksum::pseudo_header_v6(s, d, 6, len as u32)
    };
    let c = !checksum::fold(checksum::combine(&[pseudo, checksum::sum(&p[l4..])]));
    put16(p, l4 + 16, c);
}

/// Run a fuzz program: one or two super-frames, cut up, mixed and damaged by
/// the remaining bytes, then coalesced; every property checked.
pub fn run_program(data: &[u8]) -> Result<(), String> {
    let mut b = Bytes(data);
    let first = spec_from(&mut b);
    let (frame, offload) = build(&first);
    // Segmenting arbitrary specs: refusals are typed, never a panic; accepted ones check out.
    let mut packets = match check_segment(&frame, &offload, &first.prefix) {
        Ok(s) => s,
        Err(e) if e.starts_with("segment refused") => {
            let refused = gso::segment(&frame, &offload, &first.prefix, &mut Vec::new(), 4 << 20).unwrap_err();
            return match refused {
                GsoError::Flags(_) | GsoError::NoPayload | GsoError::TooLarge { .. } => Ok(()),
                other => Err(format!("unexpected refusal {other} of {first:?}")),
            };
        }
        Err(e) => return Err(e),
    };
    if first.mergeable() {
        check_round_trip(&first)?;
    }
    if b.u8() & 1 == 1 {
        let mut second = spec_from(&mut b);
        second.prefix = first.prefix;
        let (f2, o2) = build(&second);
        if let Ok(more) = check_segment(&f2, &o2, &second.prefix) {
            // Interleave: take from each in turn by the next bytes.
            let mut mixed = Vec::new();
            let (mut i, mut j) = (0, 0);
            while i < packets.len() || j < more.len() {
                if j >= more.len() || (i < packets.len() && b.u8() & 1 == 0) {
                    mixed.push(packets[i].clone());
                    i += 1;
                } else {
                    mixed.push(more[j].clone());
                    j += 1;
                }
            }
            packets = mixed;
        }
    }
    // Damage: up to 16 operations.
    for _ in 0..b.u8() % 17 {
        if packets.is_empty() || b.is_empty() {
            break;
        }
        let op = b.u8() % 8;
        let i = usize::from(b.u16()) % packets.len();
        match op {
            0 if i + 1 < packets.len() => packets.swap(i, i + 1),
            1 => {
                packets.remove(i);
            }
            2 => {
                let p = packets[i].clone();
                packets.insert(i, p);
            }
            // (A packet cut to nothing by an earlier operation has no byte to change.)
            3 if !packets[i].is_empty() => {
                // A flipped byte, checksums left as they were: a corrupt packet.
                let at = usize::from(b.u16()) % packets[i].len();
                packets[i][at] ^= b.u8() | 1;
            }
            4 => {
                // Other TCP flags, checksums fixed: a different but valid packet.
                // (At the flags' offset for TCP; a UDP datagram may be shorter.)
                if let Some((_, l4, _)) = packets[i].get(8..).and_then(offsets)
                    && let Some(flags) = packets[i].get_mut(8 + l4 + 13)
                {
                    *flags ^= b.u8();
                    fix_checksums(&mut packets[i], 8);
                }
            }
            5 if !packets[i].is_empty() => {
                // A byte of the headers changed, checksums fixed.
                let at = usize::from(b.u8()) % packets[i].len().min(80);
                packets[i][at] ^= b.u8() | 1;
                fix_checksums(&mut packets[i], 8);
            }
            6 => packets.insert(
                i,
                vec![
                    0x88, 0, 0, 0, 0, 0, 0x0a, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1, 0x08, 0x06, 0,
                    1,
                ],
            ),
            7 => {
                let at = usize::from(b.u16()) % packets[i].len().max(1);
                packets[i].truncate(at);
            }
            _ => {}
        }
    }
    check_coalesce(&packets, 8).map(drop)
}

//! Segmentation offload in software: cutting super-frames into packets, and
//! merging packets back into super-frames.
//!
//! A super-frame (a frame with [`Offload::gso`] set: TSO from a guest, GSO
//! from a veth, a TAP with `IFF_VNET_HDR`) stands for many packets: one copy
//! of the headers, up to 64 KiB of payload, and a segment size. Whoever
//! sends it to a destination that cannot take it whole has to cut it up the
//! way the kernel's GSO (`tcp_gso_segment`, `__udp_gso_segment`) does.
//! [`segment`] does that into one buffer, each segment preceded by an optional
//! prefix (the 8-byte VXLAN(-GBP) header: the result is then laid out for one
//! `UDP_SEGMENT` send on the underlay, see
//! [`crate::UdpOverlay::send_segments`]). Per segment it rewrites:
//! - IPv4: total length, identification (the first segment's plus the segment
//!   index, wrapping), header checksum; IPv6: payload length;
//! - TCP: sequence number (the first's plus the bytes before), flags (FIN and
//!   PSH only on the last segment, CWR only on the first; the rest on all),
//!   and a complete checksum; UDP (USO): length and a complete checksum.
//!
//! It refuses (typed [`GsoError`], nothing written) what it cannot cut
//! without changing meaning: SYN, RST or URG on a TCP super-frame, IP
//! fragments, IPv6 routing headers with segments left, a GSO type that does
//! not match the packet, lengths that disagree with the frame, more output
//! than the caller allows.
//!
//! [`Coalescer`] goes the other way, for what arrives from the underlay (a
//! `UDP_GRO` batch, or consecutive datagrams): consecutive, in-order TCP
//! segments of one flow behind identical VXLAN and Ethernet headers become
//! one super-frame with a TCP GSO offload and a partial checksum, which a
//! vNIC with offloads takes whole. The rules (after Linux's `tcp_gro_receive`
//! and `inet_gro_receive`), each there so that merging never changes what a
//! receiver would make of the packets:
//! - the same prefix (VXLAN header: VNI, group policy id and flags), the same
//!   Ethernet header and VLAN tags;
//! - IPv4 without options (IHL 5), not a fragment, the same TOS/ECN, TTL,
//!   DF bit, addresses, and identifications increasing by one; or IPv6 with
//!   TCP as next header (no extension headers), the same traffic class, flow
//!   label, hop limit and addresses;
//! - the same ports, acknowledgment number, window, urgent pointer, data
//!   offset and options (byte for byte, timestamps included); the sequence
//!   number exactly where the previous segment ended;
//! - flags: ACK set, nothing but ACK, PSH, ECE and CWR; ECE as the first
//!   segment; CWR only on a run's first segment; PSH ends a run (its segment is
//!   the last); FIN, SYN, RST, URG are never merged (such a packet goes on as
//!   it came, after the run of its flow);
//! - every segment carries payload, none more than the first; a shorter one
//!   ends the run; at most 64 segments and 65,535 bytes of IP datagram;
//! - the IPv4 header checksum and the TCP checksum of every segment verify:
//!   a corrupt segment must not acquire a valid checksum by being merged.
//!
//! Anything else is handed on unchanged, in order with the other packets of
//! its flow (packets of different flows may be reordered, as GRO does).
//! Merged frames carry the first segment's headers with the lengths of the
//! whole, and the pseudo-header sum in the TCP checksum field (what Linux
//! writes for `CHECKSUM_PARTIAL`). Segmenting a merged frame gives back the
//! segments it was made of.

use palisade_wire::checksum;
use palisade_wire::ip::IpProtocol;
use palisade_wire::tcp::TcpFlags;
use palisade_wire::virtio_net::{Gso, GsoKind, Offload, PartialChecksum};

use crate::csum::{self, CsumSkip};

/// Bits of the TCP flags byte (offset 13 of the header).
mod tcp_flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;
}

/// Offsets inside the headers that segmentation rewrites.
mod at {
    pub const IPV4_TOTAL_LEN: usize = 2;
    pub const IPV4_IDENT: usize = 4;
    pub const IPV4_CHECKSUM: usize = 10;
    pub const IPV6_PAYLOAD_LEN: usize = 4;
    pub const TCP_SEQ: usize = 4;
    pub const TCP_FLAGS: usize = 13;
    pub const TCP_CHECKSUM: usize = 16;
    pub const UDP_LEN: usize = 4;
    pub const UDP_CHECKSUM: usize = 6;
}

const TCP_MIN_HEADER: usize = 20;
const UDP_HEADER: usize = 8;
const IPV4_MIN_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
/// Most bytes of an IP datagram (IPv4 total length; IPv6 payload length without jumbograms).
const MAX_IP_LEN: usize = 65_535;

/// Why a frame could not be segmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GsoError {
    /// The offload state asks for no segmentation.
    #[error("not a super-frame (no GSO request)")]
    NotGso,
    /// Segmentation of this kind is not done in software (UFO: IPv4 fragmentation of one datagram).
    #[error("{0:?} segmentation is not supported")]
    Unsupported(GsoKind),
    /// The GSO type does not match the packet (e.g. TCPv4 on an IPv6 packet, TCP on UDP).
    #[error("GSO type {kind:?} does not match a {found} packet")]
    Mismatch {
        /// The kind the offload state asked for.
        kind: GsoKind,
        /// What the frame holds.
        found: &'static str,
    },
    /// TCP flags that cannot be repeated or spread over segments (SYN, RST, URG).
    #[error("TCP flags {0} cannot be segmented")]
    Flags(TcpFlags),
    /// The super-frame has headers but no payload to cut.
    #[error("the super-frame has no payload")]
    NoPayload,
    /// A length field disagrees with the frame (IP length, trailing bytes).
    #[error("the IP length does not match the frame's {frame_len} bytes")]
    Length {
        /// The frame's length.
        frame_len: usize,
    },
    /// The segments would take more bytes than the caller allows.
    #[error("{needed} bytes of segments exceed the limit of {limit}")]
    TooLarge {
        /// Bytes the segments need.
        needed: usize,
        /// The caller's limit.
        limit: usize,
    },
    /// The frame cannot be segmented at all (not IP, a fragment, routed IPv6, malformed).
    #[error("cannot segment: {0}")]
    Frame(CsumSkip),
}

impl From<CsumSkip> for GsoError {
    fn from(e: CsumSkip) -> Self {
        GsoError::Frame(e)
    }
}

/// Where the headers of a super-frame lie, and how it divides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The segmentation asked for.
    pub kind: GsoKind,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP or UDP header.
    pub l4: usize,
    /// Bytes every segment repeats: through the end of the TCP or UDP header.
    pub header_len: usize,
    /// Bytes of payload after the headers.
    pub payload_len: usize,
    /// Payload bytes per segment (all but the last are this long).
    pub segment_size: usize,
    /// IPv6 (else IPv4).
    pub v6: bool,
}

impl Layout {
    /// How many packets the super-frame stands for.
    pub fn segments(&self) -> usize {
        self.payload_len.div_ceil(self.segment_size)
    }
}

/// Check `frame` against its segmentation request and find its headers.
///
/// `offload.gso.header_len` is a hint from the sender and is not trusted:
/// the headers are parsed.
pub fn layout(frame: &[u8], offload: &Offload) -> Result<Layout, GsoError> {
    let Some(Gso { kind, size, .. }) = offload.gso else {
        return Err(GsoError::NotGso);
    };
    if size == 0 {
        return Err(GsoError::NotGso);
    }
    let seg = csum::locate(frame)?;
    let ip_end = seg.start + seg.len;
    if ip_end != frame.len() {
        return Err(GsoError::Length { frame_len: frame.len() });
    }
    let found = match (seg.v6, seg.protocol) {
        (false, IpProtocol::TCP) => "TCP/IPv4",
        (true, IpProtocol::TCP) => "TCP/IPv6",
        (false, IpProtocol::UDP) => "UDP/IPv4",
        (true, IpProtocol::UDP) => "UDP/IPv6",
        _ => "non-TCP/UDP",
    };
    let matches = match kind {
        GsoKind::TcpV4 => !seg.v6 && seg.protocol == IpProtocol::TCP,
        GsoKind::TcpV6 => seg.v6 && seg.protocol == IpProtocol::TCP,
        GsoKind::UdpL4 => seg.protocol == IpProtocol::UDP,
        GsoKind::Ufo => return Err(GsoError::Unsupported(kind)),
    };
    if !matches {
        return Err(GsoError::Mismatch { kind, found });
    }
    let l4_len = if kind.is_tcp() {
        let Some(&offset_byte) = frame.get(seg.start + 12) else {
            return Err(GsoError::Frame(CsumSkip::Malformed(palisade_wire::Error::new(
                palisade_wire::Layer::Tcp,
                palisade_wire::ErrorKind::Truncated,
            ))));
        };
        let doff = usize::from(offset_byte >> 4) * 4;
        if doff < TCP_MIN_HEADER || seg.start + doff > frame.len() {
            return Err(GsoError::Frame(CsumSkip::Malformed(palisade_wire::Error::new(
                palisade_wire::Layer::Tcp,
                palisade_wire::ErrorKind::BadHeaderLength,
            ))));
        }
        let flags = frame[seg.start + at::TCP_FLAGS];
        let bad = flags & (tcp_flag::SYN | tcp_flag::RST | tcp_flag::URG);
        if bad != 0 {
            return Err(GsoError::Flags(TcpFlags(u16::from(bad))));
        }
        doff
    } else {
        if seg.start + UDP_HEADER > frame.len() {
            return Err(GsoError::Frame(CsumSkip::Malformed(palisade_wire::Error::new(
                palisade_wire::Layer::Udp,
                palisade_wire::ErrorKind::Truncated,
            ))));
        }
        UDP_HEADER
    };
    let header_len = seg.start + l4_len;
    let payload_len = frame.len() - header_len;
    if payload_len == 0 {
        return Err(GsoError::NoPayload);
    }
    Ok(Layout {
        kind,
        l3: seg.l3,
        l4: seg.start,
        header_len,
        payload_len,
        segment_size: usize::from(size),
        v6: seg.v6,
    })
}

/// How many packets `frame` stands for: its segments when it is a super-frame
/// that [`layout`] accepts, else 1.
pub fn packet_count(frame: &[u8], offload: &Offload) -> usize {
    layout(frame, offload).map_or(1, |l| l.segments())
}

/// Where [`segment`] put its segments in the output buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segments {
    /// Offset of the first segment in the buffer.
    pub start: usize,
    /// Number of segments.
    pub count: usize,
    /// Length of every segment but the last (prefix included): the `UDP_SEGMENT` size.
    pub stride: usize,
    /// Length of the last segment (prefix included), at most `stride`.
    pub last_len: usize,
}

impl Segments {
    /// Bytes of all segments together.
    pub fn total_len(&self) -> usize {
        if self.count == 0 {
            0
        } else {
            (self.count - 1) * self.stride + self.last_len
        }
    }

    /// The byte range of all segments in the buffer.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.start..self.start + self.total_len()
    }

    /// The segments, each with its prefix, from the buffer [`segment`] wrote.
    pub fn iter<'a>(&self, buf: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        let all = &buf[self.range()];
        all.chunks(self.stride.max(1))
    }
}

/// Cut super-frame `frame` into packets, appending each, preceded by
/// `prefix`, to `out`; `out` may not grow by more than `limit` bytes.
///
/// Every segment but the last is `prefix.len() + header_len + segment_size`
/// bytes (the [`Segments::stride`]). A super-frame whose payload fits one
/// segment gives one packet, with its checksums completed. On an error
/// nothing is appended.
pub fn segment(
    frame: &[u8],
    offload: &Offload,
    prefix: &[u8],
    out: &mut Vec<u8>,
    limit: usize,
) -> Result<Segments, GsoError> {
    let cut = Cutter::new(frame, offload)?;
    let l = cut.layout;
    let count = l.segments();
    let stride = prefix.len() + l.header_len + l.segment_size;
    let needed = count * (prefix.len() + l.header_len) + l.payload_len;
    if needed > limit {
        return Err(GsoError::TooLarge { needed, limit });
    }
    let start = out.len();
    out.reserve(needed);
    let headers = &frame[..l.header_len];
    let mut last_len = stride;
    for (i, chunk) in cut.chunks(frame).enumerate() {
        let s = out.len();
        out.extend_from_slice(prefix);
        out.extend_from_slice(headers);
        out.extend_from_slice(chunk);
        let h = s + prefix.len();
        cut.rewrite(&mut out[h..h + l.header_len], i, chunk);
        last_len = out.len() - s;
    }
    Ok(Segments {
        start,
        count,
        stride,
        last_len,
    })
}

/// Where [`segment_headers`] put the segments' headers, and where their payloads lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeaders {
    /// The super-frame's layout: segment `i`'s payload is
    /// `frame[header_len + i * segment_size..]`, at most `segment_size` bytes.
    pub layout: Layout,
    /// Offset of the first segment's headers (prefix included) in the buffer.
    pub start: usize,
    /// Bytes of each segment's headers, prefix included.
    pub header_stride: usize,
}

impl SegmentHeaders {
    /// Number of segments.
    pub fn count(&self) -> usize {
        self.layout.segments()
    }

    /// Segment `i`'s headers (prefix included) in the buffer [`segment_headers`]
    /// wrote, and its payload in the super-frame.
    pub fn segment<'b, 'f>(&self, i: usize, buf: &'b [u8], frame: &'f [u8]) -> (&'b [u8], &'f [u8]) {
        let h = self.start + i * self.header_stride;
        let l = &self.layout;
        let p = l.header_len + i * l.segment_size;
        let end = (p + l.segment_size).min(frame.len());
        (&buf[h..h + self.header_stride], &frame[p..end])
    }
}

/// Cut super-frame `frame` as [`segment`] does, but append only each
/// segment's prefix and headers to `out` (growing it by at most `limit`
/// bytes): the payloads stay where they are in `frame`, and segment `i` is
/// its headers followed by `frame`'s `i`-th payload slice
/// ([`SegmentHeaders::segment`]), byte for byte what [`segment`] writes.
/// For a gathering send (`sendmsg` with an iovec per piece): the payload is
/// not copied, only read once for its checksum. On an error nothing is appended.
pub fn segment_headers(
    frame: &[u8],
    offload: &Offload,
    prefix: &[u8],
    out: &mut Vec<u8>,
    limit: usize,
) -> Result<SegmentHeaders, GsoError> {
    let cut = Cutter::new(frame, offload)?;
    let l = cut.layout;
    let header_stride = prefix.len() + l.header_len;
    let needed = l.segments() * header_stride;
    if needed > limit {
        return Err(GsoError::TooLarge { needed, limit });
    }
    let start = out.len();
    out.reserve(needed);
    let headers = &frame[..l.header_len];
    for (i, chunk) in cut.chunks(frame).enumerate() {
        out.extend_from_slice(prefix);
        let h = out.len();
        out.extend_from_slice(headers);
        cut.rewrite(&mut out[h..], i, chunk);
    }
    Ok(SegmentHeaders {
        layout: l,
        start,
        header_stride,
    })
}

/// What rewriting each segment's headers needs, read once from the super-frame.
struct Cutter {
    layout: Layout,
    count: usize,
    tcp: bool,
    proto: u8,
    src: [u8; 16],
    dst: [u8; 16],
    ident: u16,
    seq: u32,
    flags: u8,
}

impl Cutter {
    fn new(frame: &[u8], offload: &Offload) -> Result<Cutter, GsoError> {
        let l = layout(frame, offload)?;
        let tcp = l.kind.is_tcp();
        let (src, dst) = addresses(frame, &l);
        Ok(Cutter {
            layout: l,
            count: l.segments(),
            tcp,
            proto: if tcp { IpProtocol::TCP.0 } else { IpProtocol::UDP.0 },
            src,
            dst,
            ident: if l.v6 { 0 } else { be16(frame, l.l3 + at::IPV4_IDENT) },
            seq: if tcp { be32(frame, l.l4 + at::TCP_SEQ) } else { 0 },
            flags: if tcp { frame[l.l4 + at::TCP_FLAGS] } else { 0 },
        })
    }

    /// The payload slices of the segments, in order.
    fn chunks<'f>(&self, frame: &'f [u8]) -> std::slice::Chunks<'f, u8> {
        frame[self.layout.header_len..].chunks(self.layout.segment_size)
    }

    /// Rewrite `hdr`, a copy of the super-frame's headers (`header_len`
    /// bytes), for segment `i` carrying `chunk`: lengths, identification,
    /// sequence number, flags, and complete checksums (the TCP or UDP one
    /// summed over `hdr` and `chunk` apart: the L4 header's length is even,
    /// so the two sums add up to the packet's).
    fn rewrite(&self, hdr: &mut [u8], i: usize, chunk: &[u8]) {
        let l = &self.layout;
        let l4_len = l.header_len - l.l4 + chunk.len();
        if l.v6 {
            let plen = l.header_len - l.l3 - IPV6_HEADER + chunk.len();
            put16(hdr, l.l3 + at::IPV6_PAYLOAD_LEN, plen as u16);
        } else {
            let ihl = l.l4 - l.l3;
            put16(
                hdr,
                l.l3 + at::IPV4_TOTAL_LEN,
                (l.header_len - l.l3 + chunk.len()) as u16,
            );
            put16(hdr, l.l3 + at::IPV4_IDENT, self.ident.wrapping_add(i as u16));
            put16(hdr, l.l3 + at::IPV4_CHECKSUM, 0);
            let c = checksum::checksum(&hdr[l.l3..l.l3 + ihl]);
            put16(hdr, l.l3 + at::IPV4_CHECKSUM, c);
        }
        let csum_at = if self.tcp {
            put32(
                hdr,
                l.l4 + at::TCP_SEQ,
                self.seq.wrapping_add((i * l.segment_size) as u32),
            );
            let mut f = self.flags;
            if i + 1 != self.count {
                f &= !(tcp_flag::FIN | tcp_flag::PSH);
            }
            if i != 0 {
                f &= !tcp_flag::CWR;
            }
            hdr[l.l4 + at::TCP_FLAGS] = f;
            at::TCP_CHECKSUM
        } else {
            put16(hdr, l.l4 + at::UDP_LEN, l4_len as u16);
            at::UDP_CHECKSUM
        };
        put16(hdr, l.l4 + csum_at, 0);
        let pseudo = pseudo_sum(&self.src, &self.dst, l.v6, self.proto, l4_len);
        let sums = [pseudo, checksum::sum(&hdr[l.l4..l.header_len]), checksum::sum(chunk)];
        let mut c = !checksum::fold(checksum::combine(&sums));
        if c == 0 && !self.tcp {
            c = 0xffff;
        }
        put16(hdr, l.l4 + csum_at, c);
    }
}

/// The pseudo-header addresses of a located frame.
fn addresses(frame: &[u8], l: &Layout) -> ([u8; 16], [u8; 16]) {
    let (mut src, mut dst) = ([0u8; 16], [0u8; 16]);
    if l.v6 {
        src.copy_from_slice(&frame[l.l3 + 8..l.l3 + 24]);
        dst.copy_from_slice(&frame[l.l3 + 24..l.l3 + 40]);
    } else {
        src[..4].copy_from_slice(&frame[l.l3 + 12..l.l3 + 16]);
        dst[..4].copy_from_slice(&frame[l.l3 + 16..l.l3 + 20]);
    }
    (src, dst)
}

fn pseudo_sum(src: &[u8; 16], dst: &[u8; 16], v6: bool, proto: u8, len: usize) -> u32 {
    if v6 {
        checksum::pseudo_header_v6(*src, *dst, proto, len as u32)
    } else {
        let (mut s, mut d) = ([0u8; 4], [0u8; 4]);
        s.copy_from_slice(&src[..4]);
        d.copy_from_slice(&dst[..4]);
        checksum::pseudo_header_v4(s, d, proto, len as u16)
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Most runs (flows being merged) open at once; a new flow beyond them closes the oldest.
pub const MAX_RUNS: usize = 8;
/// Most segments merged into one super-frame (as Linux GRO).
pub const MAX_SEGMENTS: usize = 64;

/// Counters of a [`Coalescer`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoalesceStats {
    /// Packets fed in.
    pub packets_in: u64,
    /// Super-frames made (each of two or more packets).
    pub merged_frames: u64,
    /// Packets that went into those super-frames.
    pub merged_packets: u64,
    /// Packets handed on as they came (not TCP, not mergeable, alone in their run).
    pub passed: u64,
    /// TCP segments refused because a checksum did not verify.
    pub bad_checksums: u64,
}

/// One flow's segments being merged.
#[derive(Debug)]
struct Run {
    /// The merged bytes so far: prefix, the first segment's headers, the payloads.
    buf: Vec<u8>,
    key: u64,
    l3: usize,
    l4: usize,
    hdr_end: usize,
    v6: bool,
    /// Payload bytes of the first segment: every later one has at most these.
    seg_size: usize,
    count: usize,
    next_seq: u32,
    next_id: u16,
    /// The last segment had PSH.
    psh: bool,
    /// Order of creation, for closing the oldest run when all are taken.
    age: u64,
}

/// What the coalescer makes of a packet.
enum Parsed {
    /// A TCP segment that may be merged.
    Candidate(Candidate),
    /// A packet of TCP flow `key` that may not be merged.
    Flow(u64),
    /// A packet that may belong to a TCP flow whose ports cannot be read
    /// here (IP fragments, IPv6 extension headers, a cut TCP header): every
    /// run is closed before it, so that it overtakes none of its flow.
    Unknown,
    /// Anything else (not TCP).
    Other,
}

#[derive(Clone, Copy)]
struct Candidate {
    key: u64,
    l3: usize,
    l4: usize,
    hdr_end: usize,
    v6: bool,
    seq: u32,
    id: u16,
    flags: u8,
}

/// Merges consecutive in-order TCP segments of one flow into super-frames;
/// see the module documentation for the rules.
///
/// Each packet fed in starts with a fixed-length prefix (8 for VXLAN
/// payloads, 0 for Ethernet frames) that must be identical for packets to
/// merge; the Ethernet frame follows. The [`Offload`] handed out with a
/// merged packet describes the frame after the prefix. Buffers for
/// [`MAX_RUNS`] runs of up to 64 KiB are allocated on first use and reused.
///
/// A caller that sends a batch of merged frames at once, from where they
/// lie, asks the coalescer to [`hold`](Coalescer::hold) them: the buffers
/// of the runs closed from then on are kept, in the order their frames were
/// emitted ([`Coalescer::held`]), until [`Coalescer::release`] gives them
/// back for reuse.
#[derive(Debug)]
pub struct Coalescer {
    prefix_len: usize,
    runs: Vec<Run>,
    spare: Vec<Vec<u8>>,
    /// Buffers of the runs closed while holding, in the order emitted.
    held: Vec<Vec<u8>>,
    holding: bool,
    clock: u64,
    stats: CoalesceStats,
}

impl Coalescer {
    /// A coalescer for packets behind a `prefix_len`-byte prefix.
    pub fn new(prefix_len: usize) -> Coalescer {
        Coalescer {
            prefix_len,
            runs: Vec::with_capacity(MAX_RUNS),
            spare: Vec::new(),
            held: Vec::new(),
            holding: false,
            clock: 0,
            stats: CoalesceStats::default(),
        }
    }

    /// Counters since the coalescer was made.
    pub fn stats(&self) -> CoalesceStats {
        self.stats
    }

    /// The prefix length this coalescer was made for.
    pub fn prefix_len(&self) -> usize {
        self.prefix_len
    }

    /// Keep the frames emitted from now on where they lie: every frame
    /// `emit` is handed that is not the packet just fed in (a run's
    /// buffer, merged or of one packet) stays, unchanged, at
    /// [`Coalescer::held`]`[i]` (`i` counting those frames in the order
    /// emitted) until [`Coalescer::release`]. Each costs one buffer of up
    /// to 64 KiB while held: release often.
    pub fn hold(&mut self) {
        self.holding = true;
    }

    /// The frames kept since [`Coalescer::hold`], in the order emitted.
    pub fn held(&self) -> &[Vec<u8>] {
        &self.held
    }

    /// Stop holding: the held frames' buffers are reused from now on.
    pub fn release(&mut self) {
        self.holding = false;
        self.spare.append(&mut self.held);
    }

    /// Feed one packet; whatever is complete (runs closed by it, or the packet
    /// itself when it cannot merge) is handed to `emit`, with its offload state.
    pub fn push(&mut self, packet: &[u8], emit: &mut dyn FnMut(&[u8], &Offload)) {
        self.stats.packets_in += 1;
        match self.parse(packet) {
            Parsed::Other => {
                self.stats.passed += 1;
                emit(packet, &Offload::NONE);
            }
            Parsed::Flow(key) => {
                self.close_key(key, emit);
                self.stats.passed += 1;
                emit(packet, &Offload::NONE);
            }
            Parsed::Unknown => {
                self.flush(emit);
                self.stats.passed += 1;
                emit(packet, &Offload::NONE);
            }
            Parsed::Candidate(c) => {
                if let Some(i) = self.runs.iter().position(|r| r.key == c.key) {
                    if self.appendable(i, &c, packet) {
                        let r = &mut self.runs[i];
                        let payload = &packet[c.hdr_end..];
                        r.buf.extend_from_slice(payload);
                        r.count += 1;
                        r.next_seq = r.next_seq.wrapping_add(payload.len() as u32);
                        r.next_id = r.next_id.wrapping_add(1);
                        r.psh = c.flags & tcp_flag::PSH != 0;
                        if r.psh || payload.len() < r.seg_size || r.count >= MAX_SEGMENTS {
                            self.close(i, emit);
                        }
                        return;
                    }
                    self.close(i, emit);
                }
                self.open(c, packet, emit);
            }
        }
    }

    /// Hand every open run to `emit` (at the end of a batch).
    pub fn flush(&mut self, emit: &mut dyn FnMut(&[u8], &Offload)) {
        while !self.runs.is_empty() {
            self.close(0, emit);
        }
    }

    fn close_key(&mut self, key: u64, emit: &mut dyn FnMut(&[u8], &Offload)) {
        if let Some(i) = self.runs.iter().position(|r| r.key == key) {
            self.close(i, emit);
        }
    }

    /// Start a run with `c`; when all run slots are taken, close the oldest first.
    fn open(&mut self, c: Candidate, packet: &[u8], emit: &mut dyn FnMut(&[u8], &Offload)) {
        if self.runs.len() == MAX_RUNS
            && let Some((i, _)) = self.runs.iter().enumerate().min_by_key(|(_, r)| r.age)
        {
            self.close(i, emit);
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.reserve(self.prefix_len + 22 + MAX_IP_LEN);
        buf.extend_from_slice(packet);
        self.clock += 1;
        let psh = c.flags & tcp_flag::PSH != 0;
        let seg_size = packet.len() - c.hdr_end;
        self.runs.push(Run {
            buf,
            key: c.key,
            l3: c.l3,
            l4: c.l4,
            hdr_end: c.hdr_end,
            v6: c.v6,
            seg_size,
            count: 1,
            next_seq: c.seq.wrapping_add(seg_size as u32),
            next_id: c.id.wrapping_add(1),
            psh,
            age: self.clock,
        });
        if psh {
            let i = self.runs.len() - 1;
            self.close(i, emit);
        }
    }

    /// Whether `c` (from `packet`) continues run `i`.
    fn appendable(&self, i: usize, c: &Candidate, packet: &[u8]) -> bool {
        let r = &self.runs[i];
        let payload = packet.len() - c.hdr_end;
        if c.l3 != r.l3 || c.l4 != r.l4 || c.hdr_end != r.hdr_end || c.v6 != r.v6 {
            return false;
        }
        // The IP length field must hold the whole: IPv4's counts its header, IPv6's does not.
        let ip_len = r.buf.len() + payload - r.l3 - if r.v6 { IPV6_HEADER } else { 0 };
        if payload > r.seg_size || c.seq != r.next_seq || ip_len > MAX_IP_LEN {
            return false;
        }
        // CWR only on a run's first segment; everything else but PSH as the first.
        if c.flags & tcp_flag::CWR != 0 {
            return false;
        }
        let first_flags = r.buf[r.l4 + at::TCP_FLAGS];
        if c.flags & !tcp_flag::PSH != first_flags & !(tcp_flag::PSH | tcp_flag::CWR) {
            return false;
        }
        let h = &r.buf;
        let p = packet;
        // Prefix, Ethernet header and tags.
        if h[..r.l3] != p[..r.l3] {
            return false;
        }
        let l3 = r.l3;
        if r.v6 {
            // Version, traffic class, flow label; next header, hop limit, addresses.
            if h[l3..l3 + 4] != p[l3..l3 + 4] || h[l3 + 6..l3 + 40] != p[l3 + 6..l3 + 40] {
                return false;
            }
        } else {
            if c.id != r.next_id {
                return false;
            }
            // Version/IHL and TOS; flags, TTL and protocol; addresses.
            if h[l3..l3 + 2] != p[l3..l3 + 2]
                || h[l3 + 6..l3 + 10] != p[l3 + 6..l3 + 10]
                || h[l3 + 12..l3 + 20] != p[l3 + 12..l3 + 20]
            {
                return false;
            }
        }
        let l4 = r.l4;
        // Ports; acknowledgment; data offset byte (with NS and reserved bits); window;
        // urgent pointer; options.
        h[l4..l4 + 4] == p[l4..l4 + 4]
            && h[l4 + 8..l4 + 13] == p[l4 + 8..l4 + 13]
            && h[l4 + 14..l4 + 16] == p[l4 + 14..l4 + 16]
            && h[l4 + 18..r.hdr_end] == p[l4 + 18..c.hdr_end]
    }

    /// Emit run `i` (merged, or as it came when it holds one packet) and free its slot.
    fn close(&mut self, i: usize, emit: &mut dyn FnMut(&[u8], &Offload)) {
        let mut r = self.runs.swap_remove(i);
        if r.count == 1 {
            self.stats.passed += 1;
            emit(
                &r.buf,
                &Offload {
                    csum_valid: true,
                    ..Offload::NONE
                },
            );
        } else {
            self.stats.merged_frames += 1;
            self.stats.merged_packets += r.count as u64;
            let first_flags = r.buf[r.l4 + at::TCP_FLAGS];
            let b = &mut r.buf;
            let (src, dst) = addresses(
                b,
                &Layout {
                    kind: GsoKind::TcpV4,
                    l3: r.l3,
                    l4: r.l4,
                    header_len: r.hdr_end,
                    payload_len: 0,
                    segment_size: 1,
                    v6: r.v6,
                },
            );
            let len = b.len();
            if r.v6 {
                put16(b, r.l3 + at::IPV6_PAYLOAD_LEN, (len - r.l3 - IPV6_HEADER) as u16);
            } else {
                put16(b, r.l3 + at::IPV4_TOTAL_LEN, (len - r.l3) as u16);
                put16(b, r.l3 + at::IPV4_CHECKSUM, 0);
                let c = checksum::checksum(&b[r.l3..r.l4]);
                put16(b, r.l3 + at::IPV4_CHECKSUM, c);
            }
            if r.psh {
                b[r.l4 + at::TCP_FLAGS] |= tcp_flag::PSH;
            }
            let l4_len = b.len() - r.l4;
            let pseudo = checksum::fold(pseudo_sum(&src, &dst, r.v6, IpProtocol::TCP.0, l4_len));
            put16(b, r.l4 + at::TCP_CHECKSUM, pseudo);
            let p = self.prefix_len;
            let offload = Offload {
                csum: Some(PartialChecksum {
                    start: (r.l4 - p) as u16,
                    offset: at::TCP_CHECKSUM as u16,
                }),
                csum_valid: false,
                gso: Some(Gso {
                    kind: if r.v6 { GsoKind::TcpV6 } else { GsoKind::TcpV4 },
                    ecn: first_flags & tcp_flag::CWR != 0,
                    size: r.seg_size as u16,
                    header_len: (r.hdr_end - p) as u16,
                }),
            };
            emit(&r.buf, &offload);
        }
        if self.holding {
            self.held.push(r.buf);
        } else {
            self.spare.push(r.buf);
        }
    }

    /// Classify `p`: a mergeable segment, a TCP packet of a flow that is not, or other.
    fn parse(&mut self, p: &[u8]) -> Parsed {
        let mut e = self.prefix_len;
        if p.len() < e + 14 {
            return Parsed::Other;
        }
        let mut ethertype = be16(p, e + 12);
        let mut tags = 0;
        while matches!(ethertype, 0x8100 | 0x88a8 | 0x9100) {
            if tags == 2 || p.len() < e + 18 {
                return Parsed::Other;
            }
            ethertype = be16(p, e + 16);
            e += 4;
            tags += 1;
        }
        let l3 = e + 14;
        let (v6, l4, mergeable_ip, id) = match ethertype {
            0x0800 => {
                if p.len() < l3 + IPV4_MIN_HEADER || p[l3] >> 4 != 4 {
                    return Parsed::Unknown;
                }
                let ihl = usize::from(p[l3] & 0x0f) * 4;
                let frag = be16(p, l3 + 6);
                if p[l3 + 9] != IpProtocol::TCP.0 {
                    return Parsed::Other;
                }
                if ihl < IPV4_MIN_HEADER || p.len() < l3 + ihl || frag & 0x3fff != 0 {
                    return Parsed::Unknown;
                }
                let exact = usize::from(be16(p, l3 + at::IPV4_TOTAL_LEN)) == p.len() - l3;
                let ok = ihl == IPV4_MIN_HEADER && exact && frag & 0x8000 == 0;
                (false, l3 + ihl, ok, be16(p, l3 + at::IPV4_IDENT))
            }
            0x86dd => {
                if p.len() < l3 + IPV6_HEADER || p[l3] >> 4 != 6 {
                    return Parsed::Unknown;
                }
                match IpProtocol(p[l3 + 6]) {
                    IpProtocol::TCP => {}
                    IpProtocol::UDP | IpProtocol::ICMPV6 | IpProtocol::IPV6_NONXT => return Parsed::Other,
                    // An extension header: TCP may follow it.
                    _ => return Parsed::Unknown,
                }
                let exact = usize::from(be16(p, l3 + at::IPV6_PAYLOAD_LEN)) == p.len() - l3 - IPV6_HEADER;
                (true, l3 + IPV6_HEADER, exact, 0)
            }
            _ => return Parsed::Other,
        };
        if p.len() < l4 + TCP_MIN_HEADER {
            return if p.len() >= l4 + 4 {
                Parsed::Flow(flow_key(p, l3, l4, v6))
            } else {
                Parsed::Unknown
            };
        }
        let key = flow_key(p, l3, l4, v6);
        let doff = usize::from(p[l4 + 12] >> 4) * 4;
        let hdr_end = l4 + doff;
        let flags = p[l4 + at::TCP_FLAGS];
        let allowed = tcp_flag::ACK | tcp_flag::PSH | tcp_flag::ECE | tcp_flag::CWR;
        if !mergeable_ip
            || doff < TCP_MIN_HEADER
            || hdr_end >= p.len()
            || flags & tcp_flag::ACK == 0
            || flags & !allowed != 0
        {
            return Parsed::Flow(key);
        }
        // Checksums last: only for what would otherwise merge.
        if !v6 && checksum::checksum(&p[l3..l4]) != 0 {
            self.stats.bad_checksums += 1;
            return Parsed::Flow(key);
        }
        let (src, dst) = addresses(
            p,
            &Layout {
                kind: GsoKind::TcpV4,
                l3,
                l4,
                header_len: hdr_end,
                payload_len: 0,
                segment_size: 1,
                v6,
            },
        );
        let pseudo = pseudo_sum(&src, &dst, v6, IpProtocol::TCP.0, p.len() - l4);
        if checksum::fold(checksum::combine(&[pseudo, checksum::sum(&p[l4..])])) != 0xffff {
            self.stats.bad_checksums += 1;
            return Parsed::Flow(key);
        }
        Parsed::Candidate(Candidate {
            key,
            l3,
            l4,
            hdr_end,
            v6,
            seq: be32(p, l4 + at::TCP_SEQ),
            id,
            flags,
        })
    }
}

/// A hash of what identifies a TCP flow here: prefix and Ethernet header,
/// addresses, ports. Equal keys are checked byte for byte before merging.
///
/// It runs for every datagram from the underlay, so it mixes eight bytes
/// at a time (a multiply and a rotation per word), not one, and reads a
/// part's last bytes as one overlapping word rather than assembling them
/// in memory (a store-forwarding stall): byte by byte it took 6-7 % of a
/// receiving agent's cycles on a single TCP stream (bench/README.md).
fn flow_key(p: &[u8], l3: usize, l4: usize, v6: bool) -> u64 {
    let addrs = if v6 { &p[l3 + 8..l3 + 40] } else { &p[l3 + 12..l3 + 20] };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [&p[..l3], addrs, &p[l4..l4 + 4]] {
        let n = part.len();
        if n >= 8 {
            let mut words = part.chunks_exact(8);
            for w in &mut words {
                h = mix(h, le64(w));
            }
            if !words.remainder().is_empty() {
                h = mix(h, le64(&part[n - 8..]));
            }
        } else if n >= 4 {
            h = mix(h, u64::from(le32(&part[..4])) | u64::from(le32(&part[n - 4..])) << 32);
        } else {
            for &b in part {
                h = mix(h, u64::from(b));
            }
        }
        // The length keeps parts that differ only in where they end apart.
        h = mix(h, n as u64);
    }
    h
}

/// One step of [`flow_key`]'s hash.
fn mix(h: u64, word: u64) -> u64 {
    (h ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(31)
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An untagged TCP/IPv4 super-frame with timestamps, `payload` bytes, flags `flags`.
    fn tcp4(payload: usize, flags: u8) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        let total = 20 + 32 + payload;
        f.extend_from_slice(&[
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0x12,
            0x34,
            0x40,
            0,
            64,
            6,
            0,
            0,
        ]);
        f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        let c = checksum::checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&[
            0x9c, 0x40, 0x14, 0x51, 0, 0, 0x10, 0, 0, 0, 0, 7, 0x80, flags, 0x01, 0xf5, 0, 0, 0, 0,
        ]);
        f.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        f.extend((0..payload).map(|i| (i * 7 + 3) as u8));
        f
    }

    fn tso(size: u16) -> Offload {
        Offload {
            csum: Some(PartialChecksum { start: 34, offset: 16 }),
            csum_valid: false,
            gso: Some(Gso {
                kind: GsoKind::TcpV4,
                ecn: false,
                size,
                header_len: 66,
            }),
        }
    }

    #[test]
    fn refusals_are_typed() {
        let cases: Vec<(&str, Vec<u8>, Offload, GsoError)> = vec![
            ("plain", tcp4(100, 0x10), Offload::NONE, GsoError::NotGso),
            ("syn", tcp4(100, 0x12), tso(10), GsoError::Flags(TcpFlags::SYN)),
            ("no payload", tcp4(0, 0x10), tso(10), GsoError::NoPayload),
            (
                "v6 kind on v4",
                tcp4(100, 0x10),
                Offload {
                    gso: Some(Gso {
                        kind: GsoKind::TcpV6,
                        ecn: false,
                        size: 10,
                        header_len: 0,
                    }),
                    ..Offload::NONE
                },
                GsoError::Mismatch {
                    kind: GsoKind::TcpV6,
                    found: "TCP/IPv4",
                },
            ),
            (
                "trailing byte",
                [tcp4(100, 0x10), vec![0]].concat(),
                tso(10),
                GsoError::Length { frame_len: 167 },
            ),
        ];
        for (what, frame, offload, want) in cases {
            let mut out = vec![9];
            assert_eq!(segment(&frame, &offload, &[], &mut out, 1 << 20), Err(want), "{what}");
            assert_eq!(out, [9], "{what}: nothing written");
        }
        let e = segment(&tcp4(1000, 0x10), &tso(100), &[], &mut Vec::new(), 500).unwrap_err();
        assert_eq!(
            e,
            GsoError::TooLarge {
                needed: 1660,
                limit: 500
            }
        );
    }

    #[test]
    fn a_small_super_frame_is_one_complete_packet() {
        let frame = tcp4(50, 0x18);
        let mut out = Vec::new();
        let s = segment(&frame, &tso(1448), &[], &mut out, 1 << 20).unwrap();
        assert_eq!((s.count, s.last_len), (1, frame.len()));
        let d = palisade_wire::frame::Dissection::ethernet(&out);
        assert!(d.error.is_none() && d.checksums_valid());
        assert_eq!(packet_count(&frame, &tso(1448)), 1);
        assert_eq!(packet_count(&frame, &tso(7)), 8);
        assert_eq!(packet_count(&frame, &Offload::NONE), 1);
    }

    #[test]
    fn held_frames_stay_where_they_were_emitted_until_released() {
        let mut packets = Vec::new();
        let s = segment(&tcp4(4000, 0x10), &tso(1000), &[], &mut packets, 1 << 20).unwrap();
        let packets: Vec<Vec<u8>> = s.iter(&packets).map(<[u8]>::to_vec).collect();
        assert_eq!(packets.len(), 4);
        let arp = [vec![0xff; 6], vec![2; 6], vec![0x08, 0x06], vec![0; 28]].concat();
        let mut c = Coalescer::new(0);
        // Each emitted frame: (where it lay, its bytes, whether it was the packet fed in).
        let mut emitted: Vec<(*const u8, Vec<u8>, bool)> = Vec::new();
        c.hold();
        for _ in 0..2 {
            for p in &packets {
                c.push(p, &mut |f, _| {
                    emitted.push((f.as_ptr(), f.to_vec(), std::ptr::eq(f, &p[..])))
                });
            }
            c.push(&arp, &mut |f, _| {
                emitted.push((f.as_ptr(), f.to_vec(), std::ptr::eq(f, &arp[..])))
            });
            c.flush(&mut |f, _| emitted.push((f.as_ptr(), f.to_vec(), false)));
        }
        // The ARP frame passes as it came (first, the run still open), then the merged run; twice.
        let from_runs: Vec<_> = emitted.iter().filter(|e| !e.2).collect();
        assert_eq!(emitted.len(), 4);
        assert_eq!(from_runs.len(), 2);
        assert_eq!(c.held().len(), 2, "both merged frames are held");
        for (held, (at, bytes, _)) in c.held().iter().zip(&from_runs) {
            assert_eq!(held.as_ptr(), *at, "held where it was emitted");
            assert_eq!(held, bytes, "and unchanged");
        }
        assert_ne!(from_runs[0].0, from_runs[1].0, "a held buffer is not reused");
        let was_held: Vec<*const u8> = c.held().iter().map(|b| b.as_ptr()).collect();
        c.release();
        assert!(c.held().is_empty());
        // Released buffers are reused: the next run is made in one of them.
        let mut next = None;
        for p in &packets {
            c.push(p, &mut |f, _| next = Some(f.as_ptr()));
        }
        c.flush(&mut |f, _| next = Some(f.as_ptr()));
        assert!(was_held.contains(&next.unwrap()));
        assert!(c.held().is_empty(), "not holding after release");
    }
}

//! A TSO/GSO super-frame through the engine is the packets it stands for.
//!
//! Two engines, the same policy and history: one is handed a super-frame
//! with its offload state ([`Engine::process_offloaded`],
//! [`Engine::process_overlay_offloaded`]), the other the packets
//! `palisade_io::gso::segment` cuts it into, one by one. Over random flows
//! (a local or a remote destination, allowed, denied or rejected services,
//! with or without a handshake, a tagged or untagged sender), segment sizes,
//! payload sizes, FIN or not, partial-checksum-only frames, in strict and
//! liberal zones, they must agree on: each packet's disposition (all the
//! super-frame's), the engine counters (all but the flow-cache hits and
//! misses and the classifications, which count the work done: one lookup
//! for a super-frame; a segment dropped without a connection is classified
//! again), every connection
//! (state, windows, packets, bytes), port and rule tallies, the flow events
//! (a denial's or a start's tells of the packets its classification
//! decided: all of a super-frame's, one segment's),
//! and the bytes on the wire: the super-frame rendered with the offload
//! state the decision carries, then segmented (or its checksum completed),
//! gives exactly the frames the segments render to. A rejected super-frame
//! is answered once, with the reply each of its segments gets.
//!
//! Windows are kept open (the flows stay within what the receiver allowed):
//! a super-frame reaching past the window is refused whole, where some of
//! its packets alone would pass, by design (the engine cannot forward part
//! of a frame).

use core::net::{IpAddr, Ipv4Addr};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use palisade_datapath::port::{self, PortId, UPLINK, UplinkConfig};
use palisade_datapath::{
    Counters, Disposition, Engine, EngineConfig, EventKind, FlowEvent, PolicyLookup, Processed, Results,
};
use palisade_datapath::{
    render, render_in_place, render_offload, render_overlay, render_overlay_header, render_overlay_in_place,
    render_overlay_offload, render_reply,
};
use palisade_io::gso;
use palisade_policy::compile::Compiler;
use palisade_policy::{MemorySource, load};
use palisade_wire::checksum;
use palisade_wire::ethernet::{self, EtherType, EthernetAddress, EthernetRepr};
use palisade_wire::ip::IpProtocol;
use palisade_wire::ipv4::{self, Ipv4Repr};
use palisade_wire::tcp::{self, TcpFlags, TcpRepr};
use palisade_wire::virtio_net::{Gso, GsoKind, Offload, PartialChecksum};
use palisade_wire::{vlan, vxlan};

const POLICY: &str = r#"
version: 1
datacenter: { name: dc1, default: deny }
zones: [{ name: web, vlan: 100 }]
vms:
  - { name: a, uuid: 00000000-0000-4000-8000-00000000000a, host: h1, vnics: [{ name: a.0, mac: "02:00:00:00:00:0a", ips: [10.0.0.10], zone: web }] }
  - { name: b, uuid: 00000000-0000-4000-8000-00000000000b, host: h1, vnics: [{ name: b.0, mac: "02:00:00:00:00:0b", ips: [10.0.0.11], zone: web }] }
  - { name: c, uuid: 00000000-0000-4000-8000-00000000000c, host: h2, vnics: [{ name: c.0, mac: "02:00:00:00:00:0c", ips: [10.0.0.12], zone: web }] }
groups: { web: { zone: web } }
rules:
  datacenter:
    - { id: web-https, from: web, to: web, service: tcp/443, action: allow }
    - { id: web-ssh, from: web, to: web, service: tcp/22, action: allow }
    - { id: web-reject, from: web, to: web, service: tcp/23, action: reject }
"#;

/// The services a flow may go to: allowed, allowed, denied (the default), rejected.
const SERVICES: [u16; 4] = [443, 22, 8080, 23];

fn engine(strict: bool) -> Engine {
    let loaded = load(&MemorySource::new().with("p.yaml", POLICY)).unwrap();
    assert!(!loaded.has_errors(), "{}", loaded.render());
    let compiler = Compiler::new(loaded.model).unwrap();
    let model = compiler.model().clone();
    let uplink = UplinkConfig {
        local_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 1]),
        local_ip: Ipv4Addr::new(192, 168, 0, 1),
        gateway_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 0xfe]),
        flood: vec![Ipv4Addr::new(192, 168, 0, 2)],
    };
    let mut e = Engine::new(EngineConfig::new(uplink), Box::new(PolicyLookup::new(compiler)));
    let zones: Vec<String> = if strict { vec!["web".into()] } else { vec![] };
    for nic in ["a.0", "b.0"] {
        e.add_vnic(port::vnic_from_model(&model, nic, &zones, 1000).unwrap())
            .unwrap();
    }
    e
}

/// A small deterministic generator (xorshift64*), seeded per case.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

/// One TCP segment (or super-frame) between VMs 10.0.0.`from` and 10.0.0.`to`.
struct Seg {
    from: u8,
    to: u8,
    tag: Option<u16>,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: TcpFlags,
    payload: Vec<u8>,
}

/// Where the TCP header starts in a frame with `tag`.
fn l4_at(tag: Option<u16>) -> usize {
    14 + tag.map_or(0, |_| vlan::HEADER_LEN) + ipv4::HEADER_LEN
}

/// The frame of `s`, with complete checksums.
fn frame(s: &Seg) -> Vec<u8> {
    let (src, dst) = (Ipv4Addr::new(10, 0, 0, s.from), Ipv4Addr::new(10, 0, 0, s.to));
    let repr = TcpRepr {
        src_port: s.sport,
        dst_port: s.dport,
        seq_number: s.seq,
        ack_number: s.ack,
        flags: s.flags,
        window_len: 65_535,
        urgent_pointer: 0,
        options: &[],
        payload: &s.payload,
    };
    let mut l4 = vec![0; tcp::HEADER_LEN + s.payload.len()];
    repr.emit(
        &mut tcp::Packet::new_unchecked(&mut l4[..]),
        IpAddr::V4(src),
        IpAddr::V4(dst),
    );
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        protocol: IpProtocol::TCP,
        payload_len: l4.len(),
        ttl: 64,
        dscp: 0,
        ecn: 0,
        ident: 7,
        dont_frag: true,
        more_frags: false,
        frag_offset: 0,
        options: &[],
    };
    let mut packet = vec![0; ipv4::HEADER_LEN + l4.len()];
    ip.emit(&mut ipv4::Packet::new_unchecked(&mut packet[..]));
    packet[ipv4::HEADER_LEN..].copy_from_slice(&l4);
    let hdr = 14 + s.tag.map_or(0, |_| vlan::HEADER_LEN);
    let mut f = vec![0; hdr + packet.len()];
    EthernetRepr {
        src_addr: EthernetAddress([2, 0, 0, 0, 0, s.from]),
        dst_addr: EthernetAddress([2, 0, 0, 0, 0, s.to]),
        ethertype: if s.tag.is_some() {
            EtherType::VLAN
        } else {
            EtherType::IPV4
        },
    }
    .emit(&mut ethernet::Frame::new_unchecked(&mut f[..]));
    if let Some(vid) = s.tag {
        vlan::VlanRepr {
            pcp: 0,
            dei: false,
            vid,
            ethertype: EtherType::IPV4,
        }
        .emit(&mut vlan::Packet::new_unchecked(&mut f[14..18]));
    }
    f[hdr..].copy_from_slice(&packet);
    f
}

/// `frame` as a sender with checksum offload hands it over: the TCP
/// checksum field holds the pseudo-header sum only.
fn partial(mut frame: Vec<u8>, tag: Option<u16>) -> (Vec<u8>, PartialChecksum) {
    let at = l4_at(tag);
    let ip = at - ipv4::HEADER_LEN;
    let (mut src, mut dst) = ([0; 4], [0; 4]);
    src.copy_from_slice(&frame[ip + 12..ip + 16]);
    dst.copy_from_slice(&frame[ip + 16..ip + 20]);
    let len = (frame.len() - at) as u16;
    let pseudo = checksum::fold(checksum::pseudo_header_v4(src, dst, IpProtocol::TCP.0, len));
    frame[at + 16..at + 18].copy_from_slice(&pseudo.to_be_bytes());
    (
        frame,
        PartialChecksum {
            start: at as u16,
            offset: 16,
        },
    )
}

/// A frame from the other host: VXLAN-GBP (policy applied there) and the frame.
fn from_overlay(inner: &[u8]) -> Vec<u8> {
    let mut p = vec![0; vxlan::HEADER_LEN + inner.len()];
    vxlan::VxlanRepr {
        vni: 100,
        gbp: Some(vxlan::GbpRepr {
            dont_learn: false,
            policy_applied: true,
            group_id: 1,
        }),
    }
    .emit(&mut vxlan::Packet::new_unchecked(&mut p[..vxlan::HEADER_LEN]));
    p[vxlan::HEADER_LEN..].copy_from_slice(inner);
    p
}

/// Where a rendered frame goes: a port, or another host.
type Dest = (u16, Option<Ipv4Addr>);

/// What both engines sent, by destination, in order; and the replies.
#[derive(Default, Debug, PartialEq)]
struct Wire {
    out: BTreeMap<Dest, Vec<Vec<u8>>>,
    replies: Vec<Vec<u8>>,
}

/// Put `bytes` (with offload `off`, behind `prefix`) on the wire as the
/// ports do: a super-frame segmented, a partial checksum completed.
fn on_wire(wire: &mut Wire, dest: Dest, prefix: &[u8], bytes: &[u8], off: &Offload) {
    let list = wire.out.entry(dest).or_default();
    if off.is_gso() {
        let mut buf = Vec::new();
        let segs = gso::segment(bytes, off, prefix, &mut buf, usize::MAX).expect("segments");
        list.extend(segs.iter(&buf).map(<[u8]>::to_vec));
    } else {
        let mut f = bytes.to_vec();
        if let Some(c) = off.csum {
            c.complete(&mut f).unwrap();
        }
        list.push([prefix, &f].concat());
    }
}

/// Copies whose frame the agent may send from where it arrived
/// ([`render_in_place`], [`render_overlay_in_place`]), counted by [`send`].
static IN_PLACE: AtomicUsize = AtomicUsize::new(0);

/// Render every output of `p` and its reply, as the agent sends them; and
/// check that a copy the agent sends from where its frame lies instead
/// (the frame in place, behind a VXLAN header written apart) is the same
/// bytes as the rendered one.
fn send(wire: &mut Wire, p: &Processed<'_>) {
    let mut buf = vec![0; 70_000];
    for out in p.outputs {
        match out.encap {
            Some(e) => {
                let n = render_overlay(p, &e, &mut buf).unwrap();
                if let Some(frame) = render_overlay_in_place(p) {
                    let mut head = [0; vxlan::HEADER_LEN];
                    assert_eq!(render_overlay_header(&e, &mut head), Ok(vxlan::HEADER_LEN));
                    assert_eq!(&head[..], &buf[..vxlan::HEADER_LEN], "VXLAN header written apart");
                    assert_eq!(frame, &buf[vxlan::HEADER_LEN..n], "an overlay copy in place");
                    IN_PLACE.fetch_add(1, Ordering::Relaxed);
                }
                let off = render_overlay_offload(p).expect("an overlay copy carries its offload");
                on_wire(
                    wire,
                    (0, Some(e.remote)),
                    &buf[..vxlan::HEADER_LEN],
                    &buf[vxlan::HEADER_LEN..n],
                    &off,
                );
            }
            None => {
                let n = render(p, out, &mut buf).unwrap();
                if let Some(frame) = render_in_place(p, out) {
                    assert_eq!(frame, &buf[..n], "a local copy in place");
                    IN_PLACE.fetch_add(1, Ordering::Relaxed);
                }
                let off = render_offload(p, out).expect("a local copy carries its offload");
                on_wire(wire, (out.port.0, None), &[], &buf[..n], &off);
            }
        }
    }
    if let Some(r) = p.reply() {
        let n = render_reply(&r, &mut buf).unwrap();
        let reply = buf[..n].to_vec();
        // One reply answers the super-frame; each segment gets the same one.
        if !wire.replies.contains(&reply) {
            wire.replies.push(reply);
        }
    }
}

/// The two engines and what they have done.
struct Pair {
    whole: Engine,
    cut: Engine,
    whole_events: Vec<FlowEvent>,
    cut_events: Vec<FlowEvent>,
    whole_wire: Wire,
    cut_wire: Wire,
    results: Results,
    now: u64,
}

impl Pair {
    /// A plain segment to both, from vNIC `a`, `b` or (`to_c == false`) the other host.
    fn plain(&mut self, s: &Seg) {
        self.now += 1_000;
        let f = frame(s);
        let (engines, events, wires) = (
            [&mut self.whole, &mut self.cut],
            [&mut self.whole_events, &mut self.cut_events],
            [&mut self.whole_wire, &mut self.cut_wire],
        );
        let mut ds = Vec::new();
        for ((e, ev), w) in engines.into_iter().zip(events).zip(wires) {
            let p = match s.from {
                10 => e.process(self.now, PortId(1), &f, ev, &mut self.results),
                11 => e.process(self.now, PortId(2), &f, ev, &mut self.results),
                _ => {
                    let payload = from_overlay(&f);
                    let p = e.process_overlay(self.now, Ipv4Addr::new(192, 168, 0, 2), &payload, ev, &mut self.results);
                    let d = p.disposition;
                    send(w, &p);
                    ds.push(d);
                    continue;
                }
            };
            ds.push(p.disposition);
            send(w, &p);
        }
        assert_eq!(ds[0], ds[1]);
    }

    /// `s` from vNIC `a` as one super-frame of `mss`-byte segments to one
    /// engine, and as those segments to the other (`gso == false`: a
    /// frame with only a partial checksum, to the other completed).
    fn offloaded(&mut self, s: &Seg, mss: u16, gso: bool, case: u64) {
        self.now += 1_000;
        let (f, csum) = partial(frame(s), s.tag);
        let off = Offload {
            csum: Some(csum),
            csum_valid: false,
            gso: gso.then_some(Gso {
                kind: GsoKind::TcpV4,
                ecn: false,
                size: mss,
                header_len: (l4_at(s.tag) + tcp::HEADER_LEN) as u16,
            }),
        };
        let p = self
            .whole
            .process_offloaded(self.now, PortId(1), &f, off, &mut self.whole_events, &mut self.results);
        let whole = p.disposition;
        assert_eq!(p.offload(), off);
        send(&mut self.whole_wire, &p);
        let pieces: Vec<Vec<u8>> = if gso {
            let mut buf = Vec::new();
            let segs = gso::segment(&f, &off, &[], &mut buf, usize::MAX).unwrap();
            segs.iter(&buf).map(<[u8]>::to_vec).collect()
        } else {
            let mut g = f.clone();
            csum.complete(&mut g).unwrap();
            vec![g]
        };
        // As many packets as the segmentation makes.
        let before = self.cut.counters().packets;
        for piece in &pieces {
            let p = self
                .cut
                .process(self.now, PortId(1), piece, &mut self.cut_events, &mut self.results);
            assert_eq!(
                p.disposition, whole,
                "case {case}: a segment decided otherwise than its super-frame"
            );
            send(&mut self.cut_wire, &p);
        }
        assert_eq!(self.cut.counters().packets - before, pieces.len() as u64);
    }

    /// Compare the engines. `picked_up`: a connection may have been picked
    /// up mid-stream in a liberal zone, where until the other side is seen
    /// every segment but the first fails a window check and passes without
    /// being taken in (as in Linux): the segments leave the sender's end at
    /// the first one's, the super-frame, taken in once, at its own end.
    /// Their window state and the count of such passes then differ; all
    /// else must not.
    fn check(&self, case: u64, picked_up: bool) {
        let lookups = |c: &Counters| Counters {
            cache_hits: 0,
            cache_misses: 0,
            classifications: 0,
            tcp_window_liberal: if picked_up { 0 } else { c.tcp_window_liberal },
            ..c.clone()
        };
        assert_eq!(
            lookups(self.whole.counters()),
            lookups(self.cut.counters()),
            "case {case}: counters"
        );
        let conns = |e: &Engine| {
            e.conntrack()
                .iter()
                .map(|(_, c)| {
                    let mut c = c.clone();
                    if picked_up {
                        c.tcp = Default::default();
                    }
                    c
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(conns(&self.whole), conns(&self.cut), "case {case}: connections");
        for port in [UPLINK, PortId(1), PortId(2)] {
            assert_eq!(
                self.whole.port_tally(port),
                self.cut.port_tally(port),
                "case {case}: port {port:?}"
            );
        }
        // A rule's hits are classifications, work as above; its packets and bytes are traffic.
        let rules = |e: &Engine| {
            e.rules()
                .iter()
                .map(|r| (r.rule.clone(), r.level, r.tally.packets, r.tally.bytes))
                .collect::<Vec<_>>()
        };
        assert_eq!(rules(&self.whole), rules(&self.cut), "case {case}: rule tallies");
        // A denial's or a start's event tells of the packet that was
        // classified: the super-frame's all its packets, the first
        // segment's one (the others come after the event, counted above
        // and in the connection's later events).
        let events = |ev: &[FlowEvent]| {
            ev.iter()
                .map(|e| match e.kind {
                    EventKind::Denied(_) | EventKind::Start => FlowEvent {
                        packets: 0,
                        bytes: 0,
                        ..*e
                    },
                    _ => *e,
                })
                .map(|e| format!("{e:?}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            events(&self.whole_events),
            events(&self.cut_events),
            "case {case}: flow events"
        );
        assert_eq!(self.whole_wire, self.cut_wire, "case {case}: bytes on the wire");
    }
}

fn run_case(case: u64) {
    let mut rng = Rng(case.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let strict = rng.coin();
    let mut pair = Pair {
        whole: engine(strict),
        cut: engine(strict),
        whole_events: Vec::new(),
        cut_events: Vec::new(),
        whole_wire: Wire::default(),
        cut_wire: Wire::default(),
        results: Results::new(),
        now: 1_000_000,
    };
    let to = if rng.coin() { 11 } else { 12 };
    let tag = rng.coin().then_some(100);
    let dport = SERVICES[rng.below(4) as usize];
    let sport = 40_000 + rng.below(20_000) as u16;
    let handshake = rng.below(4) != 0;
    let mss = 500 + rng.below(961) as u16;
    let (mut seq, ack) = (1_000_u32.wrapping_add(rng.next() as u32), 7_000_u32);
    let seg = |from, to, seq, ack, flags, payload: Vec<u8>| Seg {
        from,
        to,
        tag: if from == 10 { tag } else { None },
        sport: if from == 10 { sport } else { dport },
        dport: if from == 10 { dport } else { sport },
        seq,
        ack,
        flags,
        payload,
    };
    if handshake {
        pair.plain(&seg(10, to, seq, 0, TcpFlags::SYN, vec![]));
        pair.plain(&seg(
            to,
            10,
            ack,
            seq.wrapping_add(1),
            TcpFlags::SYN | TcpFlags::ACK,
            vec![],
        ));
        seq = seq.wrapping_add(1);
        pair.plain(&seg(10, to, seq, ack.wrapping_add(1), TcpFlags::ACK, vec![]));
    }
    let peer_seq = ack.wrapping_add(1);
    for round in 0..2 {
        let len = match rng.below(4) {
            0 => 1 + rng.below(u64::from(mss)) as usize,
            _ => 1 + rng.below(30_000) as usize,
        };
        let payload: Vec<u8> = (0..len).map(|i| (i as u64 ^ case) as u8).collect();
        let fin = round == 1 && rng.coin();
        let mut flags = TcpFlags::ACK | TcpFlags::PSH;
        if fin {
            flags |= TcpFlags::FIN;
        }
        let gso = len > usize::from(mss) || rng.coin();
        pair.offloaded(&seg(10, to, seq, peer_seq, flags, payload), mss, gso, case);
        seq = seq.wrapping_add(len as u32 + u32::from(fin));
        // The other end acknowledges it all.
        pair.plain(&seg(to, 10, peer_seq, seq, TcpFlags::ACK, vec![]));
    }
    // Without an allowed SYN, a connection is picked up mid-stream: by
    // `a`'s data, or by the other host's acknowledgment (trusted there).
    let opened = handshake && matches!(dport, 443 | 22);
    pair.check(case, !opened);
}

/// 400 cases; `GSO_CASE=n` runs case `n` alone.
#[test]
fn a_super_frame_is_the_packets_it_stands_for() {
    for case in std::env::var("GSO_CASE").map_or(0..400, |c| {
        let c: u64 = c.parse().unwrap();
        c..c + 1
    }) {
        run_case(case);
    }
    // Untagged frames to a local port or another host were sent in place (and checked).
    assert!(IN_PLACE.load(Ordering::Relaxed) > 0, "no copy could be sent in place");
}

/// Requests a super-frame cannot make are refused, typed, and counted once.
#[test]
fn a_super_frame_that_does_not_fit_its_packet_is_refused() {
    use palisade_datapath::DropReason;
    let mut e = engine(false);
    let mut results = Results::new();
    let mut ev = Vec::new();
    let s = Seg {
        from: 10,
        to: 11,
        tag: None,
        sport: 40_000,
        dport: 443,
        seq: 1,
        ack: 0,
        flags: TcpFlags::SYN,
        payload: vec![0; 3000],
    };
    let (f, csum) = partial(frame(&s), None);
    let gso = |kind| Offload {
        csum: Some(csum),
        csum_valid: false,
        gso: Some(Gso {
            kind,
            ecn: false,
            size: 1000,
            header_len: 54,
        }),
    };
    // A SYN cannot be cut; nor can TCP be cut as UDP or as IPv6.
    for off in [
        gso(GsoKind::TcpV4),
        gso(GsoKind::UdpL4),
        gso(GsoKind::TcpV6),
        gso(GsoKind::Ufo),
    ] {
        let p = e.process_offloaded(1, PortId(1), &f, off, &mut ev, &mut results);
        assert_eq!(p.disposition, Disposition::Drop(DropReason::BadOffload), "{off:?}");
    }
    // A partial checksum starting in the Ethernet header.
    let bad = Offload {
        csum: Some(PartialChecksum { start: 4, offset: 16 }),
        ..Offload::NONE
    };
    let p = e.process_offloaded(1, PortId(1), &f, bad, &mut ev, &mut results);
    assert_eq!(p.disposition, Disposition::Drop(DropReason::BadOffload));
    // Bytes after the datagram.
    let mut padded = f.clone();
    padded.extend_from_slice(&[0; 4]);
    let mut data = Seg {
        flags: TcpFlags::ACK,
        ..s
    };
    data.payload = vec![1; 3000];
    let (f2, _) = partial(frame(&data), None);
    let mut f2p = f2.clone();
    f2p.extend_from_slice(&[0; 4]);
    let p = e.process_offloaded(1, PortId(1), &f2p, gso(GsoKind::TcpV4), &mut ev, &mut results);
    assert_eq!(p.disposition, Disposition::Drop(DropReason::BadOffload));
    assert_eq!(e.counters().drops[DropReason::BadOffload.index()], 6);
    assert_eq!(e.counters().packets, 6);
    assert!(ev.is_empty());
}

//! The engine held to the reference evaluator across the whole service
//! space: random policies, random flows over every protocol the policy
//! language names, each flow's packets sent through a fresh engine in both
//! directions, with and without connection state, every verdict checked
//! against `palisade_policy::eval` under the semantics of `DESIGN.md` and
//! the policy README:
//!
//! - a packet that starts a flow (a TCP SYN, a UDP, SCTP or other datagram,
//!   an ICMP message that is no error) is decided by the policy: allow
//!   forwards it, deny and reject drop it (`policy-deny`, `policy-reject`);
//! - a packet of a connection an earlier allowed packet opened (its reply,
//!   its retransmission) passes: TCP, UDP, SCTP, other protocols, ICMP echo
//!   (a request opens, its reply passes as part of it);
//! - an echo reply without its request is decided by the policy (rules on
//!   echo-reply) and opens nothing: the other side's request is decided on
//!   its own;
//! - an ICMP error quoting a packet of a tracked connection and travelling
//!   back to that packet's sender passes unless a rule naming its type
//!   denies or rejects it (`policy-deny`: nothing answers an error); an
//!   unrelated one is decided like any flow (`icmp-error-unrelated` when
//!   denied);
//! - ICMPv6 neighbour discovery and multicast listener messages are never
//!   dropped by the policy (anti-spoofing may drop them);
//! - a TCP segment that is no SYN and has no connection is dropped;
//! - a non-first fragment is dropped (`fragment`: no reassembly); a first
//!   fragment is decided as its packet would be.
//!
//! Used by `tests/differential.rs` (generated inputs, the committed fuzz
//! regressions) and by the `differential` fuzz target
//! (`fuzz/fuzz_targets/differential.rs`), which includes this file: the
//! input bytes are the generator's choices.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::collections::BTreeSet;

use std::sync::Arc;

use palisade_datapath::ClassifiedLookup;
use palisade_datapath::DropReason;
use palisade_datapath::FlowEvent;
use palisade_datapath::port::{self, PortId, UPLINK, UplinkConfig};
use palisade_datapath::{ChainLookup, PolicyLookup};
use palisade_datapath::{Disposition, Engine, EngineConfig, Results};
use palisade_policy::compile::Compiler;
use palisade_policy::eval::{Flow, IcmpRole, evaluate, evaluate_related_error};
use palisade_policy::model::{Action, Model};
use palisade_policy::{MemorySource, load};
use palisade_wire::ethernet::{self, EtherType, EthernetAddress, EthernetRepr};
use palisade_wire::ip::IpProtocol;
use palisade_wire::ipv4::{self, Ipv4Repr};
use palisade_wire::ipv6::{self, Ipv6Repr};
use palisade_wire::sctp::{self, SctpRepr};
use palisade_wire::tcp::{self, TcpFlags, TcpRepr};
use palisade_wire::udp::{self, UdpRepr};
use palisade_wire::{icmpv4, icmpv6};

/// The generator's choices, read from bytes (zeros once they run out).
pub struct Choices<'a> {
    data: &'a [u8],
}

impl<'a> Choices<'a> {
    /// Choices read from `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Choices { data }
    }

    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn below(&mut self, n: usize) -> usize {
        let v = u16::from_be_bytes([self.byte(), self.byte()]);
        usize::from(v) % n.max(1)
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }

    fn chance(&mut self, percent: u8) -> bool {
        self.byte() % 100 < percent
    }

    fn exhausted(&self) -> bool {
        self.data.is_empty()
    }
}

/// What a run covered.
#[derive(Debug, Default, Clone)]
pub struct Coverage {
    /// Flows generated.
    pub flows: usize,
    /// Packets sent and checked.
    pub packets: usize,
    /// Distinct (IP protocol, ICMP type, ICMP code) of the flows (type and code 0 for non-ICMP).
    pub cases: BTreeSet<(u8, u8, u8)>,
    /// Distinct scenarios run, by name.
    pub scenarios: BTreeSet<&'static str>,
    /// Verdicts seen, by name (`forward` or the drop reason).
    pub verdicts: BTreeSet<&'static str>,
}

impl Coverage {
    /// Add another run's coverage.
    pub fn merge(&mut self, o: &Coverage) {
        self.flows += o.flows;
        self.packets += o.packets;
        self.cases.extend(&o.cases);
        self.scenarios.extend(&o.scenarios);
        self.verdicts.extend(&o.verdicts);
    }
}

/// An endpoint: a VM on this host (a, b), a VM on another host (c), or an
/// external address (e).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct End {
    name: &'static str,
    mac: [u8; 6],
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    /// The zone's VLAN (for e: none; frames from it carry the receiver's).
    vlan: u16,
    /// The local vNIC's name, for a and b.
    vnic: Option<&'static str>,
}

const A: End = End {
    name: "a",
    mac: [2, 0, 0, 0, 0, 0x0a],
    v4: Ipv4Addr::new(10, 1, 0, 10),
    v6: Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x0a),
    vlan: 101,
    vnic: Some("a.0"),
};
const B: End = End {
    name: "b",
    mac: [2, 0, 0, 0, 0, 0x0b],
    v4: Ipv4Addr::new(10, 2, 0, 11),
    v6: Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 0x0b),
    vlan: 102,
    vnic: Some("b.0"),
};
const C: End = End {
    name: "c",
    mac: [2, 0, 0, 0, 0, 0x0c],
    v4: Ipv4Addr::new(10, 1, 0, 12),
    v6: Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x0c),
    vlan: 101,
    vnic: None,
};
const E: End = End {
    name: "e",
    mac: [2, 0, 0, 0, 0, 0xee],
    v4: Ipv4Addr::new(203, 0, 113, 7),
    v6: Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7),
    vlan: 0,
    vnic: None,
};

impl End {
    fn ip(&self, v6: bool) -> IpAddr {
        if v6 { self.v6.into() } else { self.v4.into() }
    }
}

/// The pairs a flow may take: at least one end on this host (a frame
/// between two others would have nowhere to go here).
const PAIRS: [(End, End); 9] = [(A, B), (B, A), (A, C), (C, A), (A, E), (E, A), (B, E), (E, B), (C, B)];

/// The policy: zones z1 (VLAN 101: a on h1, c on h2) and z2 (VLAN 102: b on
/// h1), random defaults, random rules over every protocol.
/// A second generator for the inspection settings, seeded from the input
/// without consuming its choices: the committed inputs keep their policies
/// and flows, and gain profiles.
struct Aux(u64);

impl Aux {
    fn of(data: &[u8]) -> Aux {
        let mut h = 0xcbf2_9ce4_8422_2325_u64;
        for b in data {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        Aux(h | 1)
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        xs[(self.0 % xs.len() as u64) as usize]
    }
}

/// The profiles every generated policy declares (`none` runs nothing).
const PROFILES: &str =
    "profiles:\n  full: { signatures: [all] }\n  crit: { signatures: [critical] }\n  none: { signatures: [] }\n";

fn policy(ch: &mut Choices<'_>, aux: &mut Aux) -> String {
    let default = |ch: &mut Choices<'_>| ch.pick(&["allow", "deny"]);
    let zone_default = |ch: &mut Choices<'_>| ch.pick(&["", ", default: allow", ", default: deny"]);
    let profile = ["", "full", "crit", "none"];
    let class = |aux: &mut Aux| aux.pick(&profile);
    let defaults = [
        ("north_south", class(aux)),
        ("inter_zone", class(aux)),
        ("intra_zone", class(aux)),
    ]
    .iter()
    .filter(|(_, p)| !p.is_empty())
    .map(|(c, p)| format!("{c}: {p}"))
    .collect::<Vec<_>>()
    .join(", ");
    let mut text = format!(
        r#"version: 1
datacenter: {{ name: dc, default: {} }}
zones:
  - {{ name: z1, vlan: 101{} }}
  - {{ name: z2, vlan: 102{} }}
vms:
  - {{ name: a, uuid: 00000000-0000-4000-8000-00000000000a, host: h1, tags: {{ t: x }}, vnics: [{{ name: a.0, mac: "02:00:00:00:00:0a", ips: [10.1.0.10, "fd00:1::a"], zone: z1 }}] }}
  - {{ name: b, uuid: 00000000-0000-4000-8000-00000000000b, host: h1, vnics: [{{ name: b.0, mac: "02:00:00:00:00:0b", ips: [10.2.0.11, "fd00:2::b"], zone: z2 }}] }}
  - {{ name: c, uuid: 00000000-0000-4000-8000-00000000000c, host: h2, tags: {{ t: x }}, vnics: [{{ name: c.0, mac: "02:00:00:00:00:0c", ips: [10.1.0.12, "fd00:1::c"], zone: z1 }}] }}
groups:
  tagged: {{ tags: {{ t: x }} }}
  z2: {{ zone: z2 }}
  outside: external
  nets: {{ ips: [10.1.0.0/16, "fd00:2::/32"] }}
rules:
"#,
        default(ch),
        zone_default(ch),
        zone_default(ch)
    );
    let peers = [
        "any",
        "tagged",
        "z2",
        "outside",
        "nets",
        "10.2.0.11",
        "10.1.0.10",
        "fd00:1::c",
        "203.0.113.7",
    ];
    let fixed = [
        "any",
        "tcp",
        "tcp/80",
        "tcp/1000-2000",
        "udp/53",
        "udp",
        "sctp/5000",
        "sctp",
        "icmp",
        "icmp/echo-request",
        "icmp/echo-reply",
        "icmp/3",
        "icmp/3/4",
        "icmp/11/0",
        "icmp/13",
        "icmpv6",
        "icmpv6/echo-request",
        "icmpv6/echo-reply",
        "icmpv6/1",
        "icmpv6/2/0",
        "icmpv6/135",
        "ip/47",
        "ip/50",
    ];
    let levels = ["datacenter", "zone:z1", "zone:z2", "vm:a", "vm:b", "vm:c"];
    let mut by_level: Vec<Vec<String>> = vec![Vec::new(); levels.len()];
    for i in 0..ch.below(9) {
        let service = if ch.chance(25) {
            // A random ICMP or ICMPv6 type, and maybe code.
            let proto = ch.pick(&["icmp", "icmpv6"]);
            let ty = ch.pick(&interesting_types(proto == "icmpv6"));
            if ch.chance(50) {
                format!("{proto}/{ty}/{}", ch.below(5))
            } else {
                format!("{proto}/{ty}")
            }
        } else {
            ch.pick(&fixed).to_string()
        };
        let services = if ch.chance(20) {
            format!("[{service}, {}]", ch.pick(&fixed))
        } else {
            service
        };
        let inspect = match aux.pick(&profile) {
            "" => String::new(),
            p => format!(", inspect: {p}"),
        };
        let rule = format!(
            "    - {{ id: r{i}, from: {}, to: {}, service: {services}, action: {}{inspect} }}",
            ch.pick(&peers),
            ch.pick(&peers),
            ch.pick(&["allow", "allow", "deny", "reject", "pass"])
        );
        by_level[ch.below(levels.len())].push(rule);
    }
    let rules_at = text.rfind("rules:\n").unwrap_or(text.len());
    let mut head = PROFILES.to_string();
    if !defaults.is_empty() {
        head.push_str(&format!("inspection_defaults: {{ {defaults} }}\n"));
    }
    text.insert_str(rules_at, &head);
    for (level, rules) in levels.iter().zip(by_level) {
        if !rules.is_empty() {
            text.push_str(&format!("  {level}:\n"));
            for r in rules {
                text.push_str(&r);
                text.push('\n');
            }
        }
    }
    text
}

/// ICMP types worth a case of their own (plus any type at random).
fn interesting_types(v6: bool) -> Vec<u8> {
    if v6 {
        vec![1, 2, 3, 4, 128, 129, 130, 133, 135, 136, 139, 144, 200]
    } else {
        vec![0, 3, 4, 5, 8, 9, 10, 11, 12, 13, 14, 17, 18, 30, 42]
    }
}

/// What a flow carries.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Tcp {
        sport: u16,
        dport: u16,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Sctp {
        sport: u16,
        dport: u16,
    },
    /// Another IP protocol (no ports).
    Other(u8),
    /// ICMP or ICMPv6 (by the flow's family).
    Icmp {
        ty: u8,
        code: u8,
        id: u16,
    },
}

/// How the packet is framed at the IP layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Plain,
    /// IPv6: hop-by-hop and destination options before the upper layer.
    ExtHeaders,
    /// IPv6: a fragment header of an unfragmented packet (RFC 6946).
    AtomicFragment,
    /// The first fragment (whole transport header, more to come).
    FirstFragment,
    /// A later fragment (no transport header).
    LaterFragment,
}

#[derive(Debug, Clone, Copy)]
struct FlowSpec {
    from: End,
    to: End,
    v6: bool,
    kind: Kind,
    shape: Shape,
}

impl FlowSpec {
    fn reversed(&self) -> FlowSpec {
        let kind = match self.kind {
            Kind::Tcp { sport, dport } => Kind::Tcp {
                sport: dport,
                dport: sport,
            },
            Kind::Udp { sport, dport } => Kind::Udp {
                sport: dport,
                dport: sport,
            },
            Kind::Sctp { sport, dport } => Kind::Sctp {
                sport: dport,
                dport: sport,
            },
            k => k,
        };
        FlowSpec {
            from: self.to,
            to: self.from,
            kind,
            ..*self
        }
    }

    fn icmp_proto(&self) -> u8 {
        if self.v6 { 58 } else { 1 }
    }

    fn proto(&self) -> u8 {
        match self.kind {
            Kind::Tcp { .. } => 6,
            Kind::Udp { .. } => 17,
            Kind::Sctp { .. } => 132,
            Kind::Other(p) => p,
            Kind::Icmp { .. } => self.icmp_proto(),
        }
    }

    /// The flow the policy sees.
    fn policy_flow(&self) -> Flow {
        let (src_port, dst_port) = match self.kind {
            Kind::Tcp { sport, dport } | Kind::Udp { sport, dport } | Kind::Sctp { sport, dport } => (sport, dport),
            Kind::Other(_) => (0, 0),
            Kind::Icmp { ty, code, .. } => (u16::from(ty), u16::from(code)),
        };
        Flow {
            src: self.from.ip(self.v6),
            dst: self.to.ip(self.v6),
            proto: self.proto(),
            src_port,
            dst_port,
        }
    }

    fn role(&self) -> IcmpRole {
        match self.kind {
            Kind::Icmp { ty, .. } => IcmpRole::of(self.icmp_proto(), ty),
            _ => IcmpRole::Plain,
        }
    }

    fn case(&self) -> (u8, u8, u8) {
        match self.kind {
            Kind::Icmp { ty, code, .. } => (self.icmp_proto(), ty, code),
            _ => (self.proto(), 0, 0),
        }
    }
}

fn flow_spec(ch: &mut Choices<'_>) -> FlowSpec {
    let (from, to) = ch.pick(&PAIRS);
    let v6 = ch.chance(40);
    let port = |ch: &mut Choices<'_>| ch.pick(&[53u16, 80, 443, 1500, 2500, 5000, 40000, 40001]);
    let kind = match ch.below(8) {
        0 | 1 => Kind::Tcp {
            sport: port(ch),
            dport: port(ch),
        },
        2 => Kind::Udp {
            sport: port(ch),
            dport: port(ch),
        },
        3 => Kind::Sctp {
            sport: port(ch),
            dport: port(ch),
        },
        // Other IP protocols: GRE, ESP, L2TP, OSPF, an unassigned one, and
        // the other family's ICMP (to it, just another protocol).
        4 => Kind::Other(ch.pick(&[47, 50, 115, 89, 253, if v6 { 1 } else { 58 }])),
        _ => {
            let ty = if ch.chance(70) {
                ch.pick(&interesting_types(v6))
            } else {
                ch.byte()
            };
            let code = if ch.chance(60) { 0 } else { ch.byte() % 16 };
            Kind::Icmp {
                ty,
                code,
                id: u16::from(ch.byte()),
            }
        }
    };
    let shape = match ch.below(10) {
        0 if v6 => Shape::ExtHeaders,
        1 if v6 => Shape::AtomicFragment,
        2 => Shape::FirstFragment,
        3 => Shape::LaterFragment,
        _ => Shape::Plain,
    };
    FlowSpec {
        from,
        to,
        v6,
        kind,
        shape,
    }
}

// ---------------------------------------------------------------------------
// Frames.
// ---------------------------------------------------------------------------

/// The transport bytes of a packet of `f`: `tcp` gives TCP's flags, seq and
/// ack; `quote` is an ICMP error's quoted packet.
fn transport(f: &FlowSpec, tcp: (TcpFlags, u32, u32), quote: &[u8]) -> Vec<u8> {
    let (src, dst) = (f.from.ip(f.v6), f.to.ip(f.v6));
    match f.kind {
        Kind::Tcp { sport, dport } => {
            let repr = TcpRepr {
                src_port: sport,
                dst_port: dport,
                seq_number: tcp.1,
                ack_number: tcp.2,
                flags: tcp.0,
                window_len: 64000,
                urgent_pointer: 0,
                options: &[],
                payload: b"",
            };
            let mut t = vec![0; repr.buffer_len()];
            repr.emit(&mut tcp::Packet::new_unchecked(&mut t[..]), src, dst);
            t
        }
        Kind::Udp { sport, dport } => {
            let repr = UdpRepr {
                src_port: sport,
                dst_port: dport,
                payload: b"datagram",
            };
            let mut u = vec![0; repr.buffer_len()];
            repr.emit(&mut udp::Packet::new_unchecked(&mut u[..]), src, dst);
            u
        }
        Kind::Sctp { sport, dport } => {
            let init = [
                sctp::chunk::INIT,
                0,
                0,
                20,
                0,
                0,
                0,
                1,
                0,
                1,
                0,
                0,
                0,
                10,
                0,
                10,
                0,
                0,
                0,
                1,
            ];
            let repr = SctpRepr {
                src_port: sport,
                dst_port: dport,
                verification_tag: 0,
                payload: &init,
            };
            let mut s = vec![0; repr.buffer_len()];
            repr.emit(&mut sctp::Packet::new_unchecked(&mut s[..]));
            s
        }
        Kind::Other(_) => b"opaque payload..".to_vec(),
        Kind::Icmp { ty, code, id } => {
            let mut m = vec![ty, code, 0, 0];
            match f.role() {
                IcmpRole::Error => {
                    m.extend_from_slice(&[0; 4]);
                    m.extend_from_slice(quote);
                }
                _ => {
                    m.extend_from_slice(&id.to_be_bytes());
                    m.extend_from_slice(&[0, 1]);
                    m.extend_from_slice(b"ping data");
                }
            }
            match (src, dst) {
                (IpAddr::V6(s), IpAddr::V6(d)) => icmpv6::Packet::new_unchecked(&mut m[..]).fill_checksum(s, d),
                _ => icmpv4::Packet::new_unchecked(&mut m[..]).fill_checksum(),
            }
            m
        }
    }
}

/// The IP packet of `f` around `l4` (shaped as `f.shape` says), and where its transport starts.
fn ip_packet(f: &FlowSpec, l4: &[u8]) -> (Vec<u8>, usize) {
    let proto = IpProtocol(f.proto());
    let later = f.shape == Shape::LaterFragment;
    // A later fragment carries 16 bytes of the middle of the datagram.
    let body: &[u8] = if later { &[0x5a; 16] } else { l4 };
    if !f.v6 {
        let first = f.shape == Shape::FirstFragment;
        let repr = Ipv4Repr {
            src_addr: f.from.v4,
            dst_addr: f.to.v4,
            protocol: proto,
            payload_len: body.len(),
            ttl: 64,
            dscp: 0,
            ecn: 0,
            ident: 7,
            dont_frag: !first && !later,
            more_frags: first || later,
            frag_offset: if later { 8 } else { 0 },
            options: &[],
        };
        let mut p = vec![0; 20 + body.len()];
        repr.emit(&mut ipv4::Packet::new_unchecked(&mut p[..]));
        p[20..].copy_from_slice(body);
        return (p, 20);
    }
    // Extension headers, each 8 bytes: (kind, bytes with its next header first).
    let mut ext: Vec<(u8, [u8; 8])> = Vec::new();
    match f.shape {
        Shape::ExtHeaders => {
            ext.push((0, [0, 0, 1, 4, 0, 0, 0, 0]));
            ext.push((60, [0, 0, 1, 4, 0, 0, 0, 0]));
        }
        Shape::AtomicFragment => ext.push((44, [0, 0, 0, 0, 0, 0, 0x12, 0x34])),
        Shape::FirstFragment => ext.push((44, [0, 0, 0, 1, 0, 0, 0x12, 0x35])),
        Shape::LaterFragment => ext.push((44, [0, 0, 0, 8 << 3 | 1, 0, 0, 0x12, 0x36])),
        Shape::Plain => {}
    }
    let mut chain = Vec::new();
    for (i, (_, bytes)) in ext.iter().enumerate() {
        let mut h = *bytes;
        h[0] = ext.get(i + 1).map_or(proto.0, |n| n.0);
        chain.extend_from_slice(&h);
    }
    let first = ext.first().map_or(proto.0, |e| e.0);
    let repr = Ipv6Repr {
        src_addr: f.from.v6,
        dst_addr: f.to.v6,
        next_header: IpProtocol(first),
        payload_len: chain.len() + body.len(),
        hop_limit: 64,
        traffic_class: 0,
        flow_label: 0,
    };
    let mut p = vec![0; 40];
    repr.emit(&mut ipv6::Packet::new_unchecked(&mut p[..]));
    p.extend_from_slice(&chain);
    let l4_at = p.len();
    p.extend_from_slice(body);
    (p, l4_at)
}

/// The Ethernet frame of an IP packet sent by `from` to `to`: from a local
/// vNIC untagged; from the uplink tagged with the receiver's zone VLAN.
fn frame(from: &End, to: &End, v6: bool, ip: &[u8]) -> Vec<u8> {
    let tag = if from.vnic.is_some() {
        None
    } else {
        Some(if to.vlan != 0 { to.vlan } else { from.vlan })
    };
    let ethertype = if v6 { EtherType::IPV6 } else { EtherType::IPV4 };
    let hdr = 14 + if tag.is_some() { 4 } else { 0 };
    let mut f = vec![0; hdr + ip.len()];
    EthernetRepr {
        src_addr: EthernetAddress(from.mac),
        dst_addr: EthernetAddress(to.mac),
        ethertype: if tag.is_some() { EtherType::VLAN } else { ethertype },
    }
    .emit(&mut ethernet::Frame::new_unchecked(&mut f[..]));
    if let Some(vid) = tag {
        f[14..16].copy_from_slice(&vid.to_be_bytes());
        f[16..18].copy_from_slice(&ethertype.0.to_be_bytes());
    }
    f[hdr..].copy_from_slice(ip);
    f
}

/// A packet of flow `f`, and what an ICMP error would quote of it.
struct Sent {
    frame: Vec<u8>,
    quote: Vec<u8>,
}

fn packet(f: &FlowSpec, tcp: (TcpFlags, u32, u32), quote: &[u8]) -> Sent {
    let l4 = transport(f, tcp, quote);
    let (ip, l4_at) = ip_packet(f, &l4);
    let quote = ip[..(l4_at + 8).min(ip.len())].to_vec();
    Sent {
        frame: frame(&f.from, &f.to, f.v6, &ip),
        quote,
    }
}

// ---------------------------------------------------------------------------
// The engine and the expectations.
// ---------------------------------------------------------------------------

fn engine(world: &World) -> Engine {
    let (compiler, strict) = (&world.compiler, world.strict);
    let mut cfg = EngineConfig::new(UplinkConfig {
        local_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 1]),
        local_ip: Ipv4Addr::new(192, 168, 0, 1),
        gateway_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 0xfe]),
        flood: vec![Ipv4Addr::new(192, 168, 0, 2)],
    });
    cfg.flow_capacity = 64;
    cfg.conn_capacity = 64;
    let model = compiler.model().clone();
    let lookup: Box<dyn ChainLookup + Send> = match &world.classified {
        Some(c) => Box::new(c.clone()),
        None => Box::new(PolicyLookup::new(compiler.clone())),
    };
    let mut e = Engine::new(cfg, lookup);
    let strict_zones: Vec<String> = if strict {
        vec!["z1".into(), "z2".into()]
    } else {
        Vec::new()
    };
    for nic in ["a.0", "b.0"] {
        if let Ok(v) = port::vnic_from_model(&model, nic, &strict_zones, 1000) {
            let _ = e.add_vnic(v);
        }
    }
    e
}

/// Process one frame: its disposition and, forwarded, its flow's inspection profile.
fn send(e: &mut Engine, now: u64, from: &End, frame: &[u8]) -> (Disposition, Option<String>) {
    let port: PortId = match from.vnic {
        Some(n) => e.port_of(n).unwrap_or(UPLINK),
        None => UPLINK,
    };
    let mut events: Vec<FlowEvent> = Vec::new();
    let mut results = Results::new();
    let p = e.process(now, port, frame, &mut events, &mut results);
    let (disposition, id) = (p.disposition, p.inspection());
    let profile = id.map(|id| e.inspection_profile_name(id).unwrap_or("<unnamed>").to_string());
    (disposition, profile)
}

/// What a packet's verdict must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Forward,
    Drop(DropReason),
    /// Dropped, for a reason the semantics does not fix (a TCP segment that
    /// cannot start a connection may also be denied by the policy first).
    AnyDrop,
    /// Not dropped by the policy (link infrastructure; anti-spoofing may drop it).
    NotByPolicy,
}

fn decided(action: Action) -> Expect {
    match action {
        Action::Allow => Expect::Forward,
        Action::Reject => Expect::Drop(DropReason::PolicyReject),
        _ => Expect::Drop(DropReason::PolicyDeny),
    }
}

fn holds(expect: Expect, got: Disposition) -> bool {
    match (expect, got) {
        (Expect::Forward, Disposition::Forward) => true,
        (Expect::Drop(r), Disposition::Drop(g)) => r == g,
        (Expect::AnyDrop, Disposition::Drop(_)) => true,
        (Expect::NotByPolicy, Disposition::Drop(r)) => !matches!(
            r,
            DropReason::PolicyDeny | DropReason::PolicyReject | DropReason::IcmpErrorUnrelated
        ),
        (Expect::NotByPolicy, Disposition::Forward) => true,
        _ => false,
    }
}

/// The world of one input: a policy and its compiled form.
struct World {
    text: String,
    model: Model,
    compiler: Compiler,
    strict: bool,
    /// The classifier-backed lookup the engine uses, when not the compiled chains' walk.
    classified: Option<Arc<ClassifiedLookup>>,
}

impl World {
    /// The policy's decision for a packet of `f` that starts a flow (or is
    /// an unrelated error): the semantics above.
    fn fresh(&self, f: &FlowSpec) -> Expect {
        if f.shape == Shape::LaterFragment {
            return Expect::Drop(DropReason::Fragment);
        }
        let action = evaluate(&self.model, &f.policy_flow()).map_or(Action::Deny, |d| d.action);
        match f.role() {
            IcmpRole::Link => Expect::NotByPolicy,
            IcmpRole::Error => match action {
                Action::Allow => Expect::Forward,
                _ => Expect::Drop(DropReason::IcmpErrorUnrelated),
            },
            _ => decided(action),
        }
    }

    /// The inspection profile the reference evaluator gives an allowed
    /// flow `f`, as the datapath carries it: `None` for a profile that runs
    /// no signatures.
    fn inspection(&self, f: &FlowSpec) -> Option<String> {
        let name = evaluate(&self.model, &f.policy_flow())?.inspect?;
        let p = self.model.policy.profiles.iter().find(|p| p.name == name)?;
        (!p.signatures.is_empty()).then_some(name)
    }

    /// An ICMP error related to a tracked connection.
    fn related(&self, f: &FlowSpec) -> Expect {
        if f.shape == Shape::LaterFragment {
            return Expect::Drop(DropReason::Fragment);
        }
        match evaluate_related_error(&self.model, &f.policy_flow()).map_or(Action::Allow, |d| d.action) {
            Action::Allow => Expect::Forward,
            _ => Expect::Drop(DropReason::PolicyDeny),
        }
    }

    /// Whether a packet of `f` that was forwarded opened a connection its
    /// replies pass through.
    fn opens(&self, f: &FlowSpec, forwarded: bool) -> bool {
        forwarded
            && f.shape != Shape::LaterFragment
            && matches!(f.role(), IcmpRole::Plain | IcmpRole::EchoRequest)
            && !matches!(f.kind, Kind::Icmp { .. } if f.role() == IcmpRole::Plain)
    }
}

/// One scenario's packets, checked as they go.
struct Run<'w> {
    world: &'w World,
    engine: Engine,
    now: u64,
    name: &'static str,
    cov: &'w mut Coverage,
    /// The inspection profile of the last frame checked (forwarded).
    profile: Option<String>,
}

impl<'w> Run<'w> {
    /// A scenario on a fresh engine.
    fn start(world: &'w World, name: &'static str, cov: &'w mut Coverage) -> Run<'w> {
        cov.scenarios.insert(name);
        Run {
            world,
            engine: engine(world),
            now: 0,
            name,
            cov,
            profile: None,
        }
    }

    fn check(&mut self, what: &str, f: &FlowSpec, sent: &Sent, expect: Expect) -> Result<Disposition, String> {
        self.now += 1_000;
        let (got, profile) = send(&mut self.engine, self.now, &f.from, &sent.frame);
        self.profile = profile;
        self.cov.packets += 1;
        self.cov.verdicts.insert(match got {
            Disposition::Forward => "forward",
            Disposition::Drop(r) => r.name(),
        });
        if holds(expect, got) {
            Ok(got)
        } else {
            Err(format!(
                "scenario {}, {what}: {f:?}\n  expected {expect:?}, engine {got:?}\n  policy flow {}\n  frame {:02x?}\n  strict: {}, classified lookup: {}\npolicy:\n{}",
                self.name,
                f.policy_flow(),
                sent.frame,
                self.world.strict,
                self.world.classified.is_some(),
                self.world.text
            ))
        }
    }
}

const SYN: TcpFlags = TcpFlags::SYN;

/// The echo reply (or request) answering (or asked by) `f`.
fn echo_answer(f: &FlowSpec) -> FlowSpec {
    let mut r = f.reversed();
    if let Kind::Icmp { ty, code, id } = f.kind {
        let answer = match (f.v6, ty) {
            (false, 8) => 0,
            (false, 0) => 8,
            (true, 128) => 129,
            (true, 129) => 128,
            _ => ty,
        };
        r.kind = Kind::Icmp { ty: answer, code, id };
    }
    r
}

/// Run every scenario for flow `f`.
fn scenarios(world: &World, f: &FlowSpec, ch: &mut Choices<'_>, cov: &mut Coverage) -> Result<(), String> {
    let tcp = matches!(f.kind, Kind::Tcp { .. });

    let first = packet(f, (SYN, 1000, 0), &[]);
    // 1. Without state: the packet alone, then again (the cached verdict).
    let role = f.role();
    if role != IcmpRole::Error {
        let mut r = Run::start(world, "fresh", &mut *cov);
        let expect = world.fresh(f);
        let got = r.check("first packet", f, &first, expect)?;
        let profile = r.profile.clone();
        r.check("the same again", f, &first, expect)?;
        if got == Disposition::Forward && role != IcmpRole::Link {
            // The inspection profile: the reference's, resolved once and kept.
            let want = world.inspection(f);
            if profile != want || r.profile != want {
                return Err(format!(
                    "inspection profile of {f:?}: engine {profile:?}, then {:?} from the cache; reference {want:?}\npolicy:\n{}",
                    r.profile, world.text
                ));
            }
            r.cov
                .verdicts
                .insert(if want.is_some() { "inspected" } else { "uninspected" });
        }
        // 2. The answer, after it.
        let back = echo_answer(f);
        let opened = world.opens(f, got == Disposition::Forward);
        let answer = if tcp {
            packet(&back, (SYN | TcpFlags::ACK, 9000, 1001), &[])
        } else {
            packet(&back, (SYN, 0, 0), &[])
        };
        let expect = if back.shape == Shape::LaterFragment {
            Expect::Drop(DropReason::Fragment)
        } else if opened {
            Expect::Forward
        } else if tcp {
            // A SYN-ACK cannot start a connection.
            Expect::AnyDrop
        } else {
            world.fresh(&back)
        };
        r.check("the answer", &back, &answer, expect)?;
        // 3. The other way first: the answer's packet starts, then this
        // flow's (its reply when the other way opened a connection, else its
        // own start), then, if only this one opened, the other way again, as
        // its reply (a verdict cached for the first attempt must not stand).
        let mut r = Run::start(world, "reverse-first", &mut *cov);
        let start = if tcp {
            packet(&back, (SYN, 5000, 0), &[])
        } else {
            answer
        };
        let expect_back = world.fresh(&back);
        let got = r.check("the other side first", &back, &start, expect_back)?;
        let back_opened = world.opens(&back, got == Disposition::Forward);
        let (then, expect) = if back_opened {
            let reply = if tcp {
                packet(f, (SYN | TcpFlags::ACK, 7000, 5001), &[])
            } else {
                packet(f, (SYN, 0, 0), &[])
            };
            (reply, Expect::Forward)
        } else {
            (packet(f, (SYN, 1000, 0), &[]), world.fresh(f))
        };
        let got = r.check("then this side", f, &then, expect)?;
        if !back_opened && world.opens(f, got == Disposition::Forward) {
            let reply = if tcp {
                packet(&back, (SYN | TcpFlags::ACK, 9000, 1001), &[])
            } else {
                packet(&back, (SYN, 0, 0), &[])
            };
            r.check("the other side again, answering", &back, &reply, Expect::Forward)?;
        }
        return Ok(());
    }
    // An ICMP error from f.from to f.to. 4. Unrelated: nothing tracked.
    let mut r = Run::start(world, "unrelated-error", &mut *cov);
    let stray = FlowSpec {
        from: f.to,
        to: f.from,
        v6: f.v6,
        kind: Kind::Udp {
            sport: 33333,
            dport: 33334,
        },
        shape: Shape::Plain,
    };
    let quote = packet(&stray, (SYN, 0, 0), &[]).quote;
    let expect = world.fresh(f);
    r.check("an unrelated error", f, &packet(f, (SYN, 0, 0), &quote), expect)?;
    r.check("again", f, &packet(f, (SYN, 0, 0), &quote), expect)?;
    // 5. Related: the receiver opened a connection to the sender; the error quotes its packet.
    let mut r = Run::start(world, "related-error", &mut *cov);
    let base_kind = match ch.below(5) {
        0 => Kind::Tcp {
            sport: 40100,
            dport: ch.pick(&[80, 443, 1500]),
        },
        1 => Kind::Udp {
            sport: 40101,
            dport: ch.pick(&[53, 2500]),
        },
        2 => Kind::Sctp {
            sport: 40102,
            dport: 5000,
        },
        3 => Kind::Icmp {
            ty: if f.v6 { 128 } else { 8 },
            code: 0,
            id: 77,
        },
        _ => Kind::Other(ch.pick(&[47, 50])),
    };
    let base = FlowSpec {
        from: f.to,
        to: f.from,
        v6: f.v6,
        kind: base_kind,
        shape: Shape::Plain,
    };
    let sent = packet(&base, (SYN, 100, 0), &[]);
    let expect_base = world.fresh(&base);
    let got = r.check("the connection the error is about", &base, &sent, expect_base)?;
    let tracked = world.opens(&base, got == Disposition::Forward);
    let expect = if tracked { world.related(f) } else { world.fresh(f) };
    let error = packet(f, (SYN, 0, 0), &sent.quote);
    r.check(
        if tracked {
            "a related error"
        } else {
            "an error about a denied packet"
        },
        f,
        &error,
        expect,
    )?;
    r.check("again", f, &error, expect)?;
    Ok(())
}

/// Run the program `data` encodes: a policy, a zone mode, the engine's rule
/// lookup (the compiled chains' walk, or the classifier trees), then flows, each
/// through every scenario. Returns what it covered, or the first
/// disagreement between the engine and the semantics.
pub fn check(data: &[u8]) -> Result<Coverage, String> {
    let mut ch = Choices::new(data);
    let text = policy(&mut ch, &mut Aux::of(data));
    let strict = ch.chance(50);
    let classified = ch.chance(30);
    let loaded = load(&MemorySource::new().with("policy.yaml", text.clone())).map_err(|e| format!("{e}"))?;
    if loaded.has_errors() {
        return Err(format!("the generated policy has errors:\n{}\n{text}", loaded.render()));
    }
    let compiler = Compiler::new(loaded.model.clone()).map_err(|e| format!("{e}"))?;
    let classified = classified.then(|| Arc::new(ClassifiedLookup::new(compiler.clone())));
    let world = World {
        text,
        model: loaded.model,
        compiler,
        strict,
        classified,
    };
    let mut cov = Coverage::default();
    for _ in 0..1 + ch.below(12) {
        let f = flow_spec(&mut ch);
        cov.flows += 1;
        cov.cases.insert(f.case());
        scenarios(&world, &f, &mut ch, &mut cov)?;
        if ch.exhausted() {
            break;
        }
    }
    Ok(cov)
}

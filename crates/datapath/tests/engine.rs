//! End-to-end tests of the engine: hand-built frames, injected time, counter deltas.

use core::net::{IpAddr, Ipv4Addr};

use palisade_datapath::PolicyLookup;
use palisade_datapath::StateError;
use palisade_datapath::port::{self, PortId, UPLINK, UplinkConfig};
use palisade_datapath::{ConnState, FullPolicy};
use palisade_datapath::{Counters, DropReason};
use palisade_datapath::{
    Disposition, Engine, EngineConfig, Output, Processed, Results, render, render_overlay, render_reply,
};
use palisade_datapath::{EndReason, EventKind, FlowEvent};
use palisade_policy::compile::Compiler;
use palisade_policy::{DirSource, MemorySource, load};
use palisade_wire::arp::{self, ArpRepr, Operation};
use palisade_wire::ethernet::{self, EtherType, EthernetAddress, EthernetRepr};
use palisade_wire::flow::FlowKey;
use palisade_wire::ip::IpProtocol;
use palisade_wire::ipv4::{self, Ipv4Repr};
use palisade_wire::ipv6::{self, Ipv6Repr};
use palisade_wire::tcp::{self, TcpFlags, TcpRepr};
use palisade_wire::udp::{self, UdpRepr};
use palisade_wire::{icmpv4, icmpv6, vlan, vxlan};

const MS: u64 = 1_000_000;

fn policy(ssh: bool) -> String {
    format!(
        r#"
version: {version}
datacenter: {{ name: dc1, default: deny }}
zones: [{{ name: web, vlan: 100 }}]
vms:
  - {{ name: a, uuid: 00000000-0000-4000-8000-00000000000a, host: h1, vnics: [{{ name: a.0, mac: "02:00:00:00:00:0a", ips: [10.0.0.10, "fd00::a"], zone: web }}] }}
  - {{ name: b, uuid: 00000000-0000-4000-8000-00000000000b, host: h1, vnics: [{{ name: b.0, mac: "02:00:00:00:00:0b", ips: [10.0.0.11], zone: web }}] }}
  - {{ name: c, uuid: 00000000-0000-4000-8000-00000000000c, host: h2, vnics: [{{ name: c.0, mac: "02:00:00:00:00:0c", ips: [10.0.0.12], zone: web }}] }}
groups: {{ web: {{ zone: web }}, internet: external }}
rules:
  datacenter:
    - {{ id: web-https, from: web, to: web, service: tcp/443, action: allow }}
    - {{ id: web-dns, from: web, to: web, service: udp/53, action: allow }}
    - {{ id: web-ping, from: web, to: web, service: icmp/echo-request, action: allow }}
    {ssh_rule}
    - {{ id: web-out, from: web, to: internet, service: tcp/443, action: allow }}
    - {{ id: web-reject, from: web, to: web, service: [tcp/23, udp/69], action: reject }}
"#,
        version = if ssh { 1 } else { 2 },
        ssh_rule = if ssh {
            "- { id: web-ssh, from: web, to: web, service: tcp/22, action: allow }"
        } else {
            ""
        }
    )
}

fn compile_mem(text: String) -> Compiler {
    let loaded = load(&MemorySource::new().with("p.yaml", text)).unwrap();
    assert!(!loaded.has_errors(), "{}", loaded.render());
    Compiler::new(loaded.model).unwrap()
}

fn uplink(host: u8) -> UplinkConfig {
    UplinkConfig {
        local_mac: EthernetAddress([0x0e, 0, 0, 0, 0, host]),
        local_ip: Ipv4Addr::new(192, 168, 0, host),
        gateway_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 0xfe]),
        flood: vec![Ipv4Addr::new(192, 168, 0, 3 - host)],
    }
}

/// An engine for `host` with that host's vNICs attached.
fn host(compiler: Compiler, name: &str, hostno: u8, strict: &[&str], tweak: impl FnOnce(&mut EngineConfig)) -> Engine {
    let mut cfg = EngineConfig::new(uplink(hostno));
    tweak(&mut cfg);
    let model = compiler.model().clone();
    let mut e = Engine::new(cfg, Box::new(PolicyLookup::new(compiler)));
    let strict: Vec<String> = strict.iter().map(|s| s.to_string()).collect();
    for vm in model.inventory.vms.iter().filter(|v| v.host.as_deref() == Some(name)) {
        for nic in &vm.vnics {
            e.add_vnic(port::vnic_from_model(&model, &nic.name, &strict, 1000).unwrap())
                .unwrap();
        }
    }
    e
}

fn h1() -> Engine {
    host(compile_mem(policy(true)), "h1", 1, &[], |_| {})
}

fn mac(last: u8) -> [u8; 6] {
    [2, 0, 0, 0, 0, last]
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, last)
}

fn eth(src: [u8; 6], dst: [u8; 6], tag: Option<u16>, ethertype: EtherType, payload: &[u8]) -> Vec<u8> {
    let hdr = 14 + if tag.is_some() { 4 } else { 0 };
    let mut f = vec![0; hdr + payload.len()];
    let repr = EthernetRepr {
        src_addr: EthernetAddress(src),
        dst_addr: EthernetAddress(dst),
        ethertype: if tag.is_some() { EtherType::VLAN } else { ethertype },
    };
    repr.emit(&mut ethernet::Frame::new_unchecked(&mut f[..]));
    if let Some(vid) = tag {
        let t = vlan::VlanRepr {
            pcp: 0,
            dei: false,
            vid,
            ethertype,
        };
        t.emit(&mut vlan::Packet::new_unchecked(&mut f[14..18]));
    }
    f[hdr..].copy_from_slice(payload);
    f
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: IpProtocol, l4: &[u8]) -> Vec<u8> {
    let repr = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        protocol: proto,
        payload_len: l4.len(),
        ttl: 64,
        dscp: 0,
        ecn: 0,
        ident: 1,
        dont_frag: true,
        more_frags: false,
        frag_offset: 0,
        options: &[],
    };
    let mut p = vec![0; 20 + l4.len()];
    repr.emit(&mut ipv4::Packet::new_unchecked(&mut p[..]));
    p[20..].copy_from_slice(l4);
    p
}

/// A TCP segment in an IPv4 packet; `(seq, ack)` its sequence and acknowledgement numbers.
fn tcp_ip(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    (seq, ack): (u32, u32),
    flags: TcpFlags,
    data: &[u8],
) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: sport,
        dst_port: dport,
        seq_number: seq,
        ack_number: ack,
        flags,
        window_len: 64000,
        urgent_pointer: 0,
        options: &[],
        payload: data,
    };
    let mut t = vec![0; repr.buffer_len()];
    repr.emit(&mut tcp::Packet::new_unchecked(&mut t[..]), src.into(), dst.into());
    ipv4(src, dst, IpProtocol::TCP, &t)
}

/// A TCP frame between two VMs of the in-memory policy (by last octet/MAC byte).
fn tcp(from: u8, to: u8, sport: u16, dport: u16, (seq, ack): (u32, u32), flags: TcpFlags, data: &[u8]) -> Vec<u8> {
    eth(
        mac(from),
        mac(to),
        None,
        EtherType::IPV4,
        &tcp_ip(ip(from), ip(to), sport, dport, (seq, ack), flags, data),
    )
}

fn udp(from: u8, to: u8, sport: u16, dport: u16) -> Vec<u8> {
    let repr = UdpRepr {
        src_port: sport,
        dst_port: dport,
        payload: b"query",
    };
    let mut u = vec![0; repr.buffer_len()];
    repr.emit(
        &mut udp::Packet::new_unchecked(&mut u[..]),
        ip(from).into(),
        ip(to).into(),
    );
    eth(
        mac(from),
        mac(to),
        None,
        EtherType::IPV4,
        &ipv4(ip(from), ip(to), IpProtocol::UDP, &u),
    )
}

fn icmp(from: u8, to: u8, ty: u8, code: u8, rest: [u8; 4], data: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(data);
    icmpv4::Packet::new_unchecked(&mut m[..]).fill_checksum();
    eth(
        mac(from),
        mac(to),
        None,
        EtherType::IPV4,
        &ipv4(ip(from), ip(to), IpProtocol::ICMP, &m),
    )
}

fn arp_frame(from_mac: [u8; 6], sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
    let repr = ArpRepr {
        operation: Operation::REQUEST,
        source_hardware_addr: EthernetAddress(from_mac),
        source_protocol_addr: sender_ip,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target_ip,
    };
    let mut a = vec![0; repr.buffer_len()];
    repr.emit(&mut arp::Packet::new_unchecked(&mut a[..]));
    eth(from_mac, [0xff; 6], None, EtherType::ARP, &a)
}

fn delta(before: &Counters, after: &Counters, f: impl Fn(&Counters) -> u64) -> u64 {
    f(after) - f(before)
}

fn port(e: &Engine, name: &str) -> PortId {
    e.port_of(name).unwrap()
}

/// What processing a frame gave: its disposition, its outputs, each output
/// rendered (for its port, and for the underlay socket when it goes to
/// another host), and the reply to a rejected frame rendered.
#[derive(Debug)]
struct Seen {
    disposition: Disposition,
    outputs: Vec<Output>,
    rendered: Vec<Vec<u8>>,
    overlay: Vec<Option<Vec<u8>>>,
    reply: Option<Vec<u8>>,
}

impl PartialEq<Disposition> for Seen {
    fn eq(&self, other: &Disposition) -> bool {
        self.disposition == *other
    }
}

impl Seen {
    fn of(p: &Processed<'_>) -> Seen {
        let mut buf = vec![0; 2048];
        let mut rendered = Vec::new();
        let mut overlay = Vec::new();
        for o in p.outputs {
            let n = render(p, o, &mut buf).unwrap();
            rendered.push(buf[..n].to_vec());
            overlay.push(o.encap.map(|enc| {
                let n = render_overlay(p, &enc, &mut buf).unwrap();
                buf[..n].to_vec()
            }));
        }
        let reply = p.reply().map(|r| {
            let n = render_reply(&r, &mut buf).unwrap();
            buf[..n].to_vec()
        });
        Seen {
            disposition: p.disposition,
            outputs: p.outputs.to_vec(),
            rendered,
            overlay,
            reply,
        }
    }

    /// Output 0 as it leaves its port.
    fn out0(&self) -> Vec<u8> {
        self.rendered[0].clone()
    }

    /// Output 0 for the underlay socket: its tunnel endpoint and the UDP payload.
    fn overlay0(&self) -> (Ipv4Addr, Vec<u8>) {
        let remote = self.outputs[0].encap.unwrap().remote;
        (remote, self.overlay[0].clone().unwrap())
    }
}

/// Process a frame and render what it gave.
fn run(e: &mut Engine, now: u64, from: PortId, frame: &[u8], ev: &mut Vec<FlowEvent>) -> Seen {
    Seen::of(&e.process(now, from, frame, ev, &mut Results::new()))
}

/// Process a frame from the underlay socket and render what it gave.
fn run_overlay(e: &mut Engine, now: u64, remote: Ipv4Addr, payload: &[u8], ev: &mut Vec<FlowEvent>) -> Seen {
    Seen::of(&e.process_overlay(now, remote, payload, ev, &mut Results::new()))
}

/// Run a frame and assert it is forwarded to exactly `to`; returns what it gave.
fn fwd(e: &mut Engine, now: u64, from: PortId, frame: &[u8], to: PortId, ev: &mut Vec<FlowEvent>) -> Seen {
    let seen = run(e, now, from, frame, ev);
    assert_eq!(seen, Disposition::Forward);
    let outs: Vec<PortId> = seen.outputs.iter().map(|o| o.port).collect();
    assert_eq!(outs, vec![to]);
    seen
}

fn handshake(e: &mut Engine, ev: &mut Vec<FlowEvent>, sport: u16, dport: u16, t: u64) {
    let (a, b) = (port(e, "a.0"), port(e, "b.0"));
    fwd(
        e,
        t,
        a,
        &tcp(10, 11, sport, dport, (1000, 0), TcpFlags::SYN, b""),
        b,
        ev,
    );
    fwd(
        e,
        t + 1,
        b,
        &tcp(11, 10, dport, sport, (9000, 1001), TcpFlags::SYN | TcpFlags::ACK, b""),
        a,
        ev,
    );
    fwd(
        e,
        t + 2,
        a,
        &tcp(10, 11, sport, dport, (1001, 9001), TcpFlags::ACK, b""),
        b,
        ev,
    );
}

#[test]
fn tcp_handshake_data_and_fin_teardown_classified_once() {
    let mut e = h1();
    let mut ev = Vec::new();
    let (a, b) = (port(&e, "a.0"), port(&e, "b.0"));
    let before = e.counters().clone();
    handshake(&mut e, &mut ev, 40000, 443, 0);
    fwd(
        &mut e,
        10 * MS,
        a,
        &tcp(
            10,
            11,
            40000,
            443,
            (1001, 9001),
            TcpFlags::ACK | TcpFlags::PSH,
            b"GET /",
        ),
        b,
        &mut ev,
    );
    fwd(
        &mut e,
        11 * MS,
        b,
        &tcp(
            11,
            10,
            443,
            40000,
            (9001, 1006),
            TcpFlags::ACK | TcpFlags::PSH,
            b"200 OK",
        ),
        a,
        &mut ev,
    );
    fwd(
        &mut e,
        12 * MS,
        a,
        &tcp(10, 11, 40000, 443, (1006, 9007), TcpFlags::FIN | TcpFlags::ACK, b""),
        b,
        &mut ev,
    );
    fwd(
        &mut e,
        13 * MS,
        b,
        &tcp(11, 10, 443, 40000, (9007, 1007), TcpFlags::FIN | TcpFlags::ACK, b""),
        a,
        &mut ev,
    );
    fwd(
        &mut e,
        14 * MS,
        a,
        &tcp(10, 11, 40000, 443, (1007, 9008), TcpFlags::ACK, b""),
        b,
        &mut ev,
    );
    let after = e.counters().clone();
    // One evaluation for both ends, for the whole connection.
    assert_eq!(delta(&before, &after, |c| c.classifications), 1);
    assert_eq!(
        e.rule_tally("web-https").hits,
        2,
        "egress and ingress chains in that one evaluation"
    );
    assert_eq!(delta(&before, &after, |c| c.forwarded), 8);
    // SYN and the first reply miss the cache; the rest hit it.
    assert_eq!(delta(&before, &after, |c| c.cache_misses), 2);
    assert_eq!(delta(&before, &after, |c| c.cache_hits), 6);
    assert_eq!(delta(&before, &after, |c| c.conns_ended), 1);
    let kinds: Vec<_> = ev.iter().map(|e| (e.kind, e.state)).collect();
    assert_eq!(
        kinds,
        vec![
            (EventKind::Start, ConnState::SynSent),
            (EventKind::Update, ConnState::SynReceived),
            (EventKind::Update, ConnState::Established),
            (EventKind::Update, ConnState::FinWait),
            (EventKind::Update, ConnState::LastAck),
            (EventKind::End(EndReason::Closed), ConnState::TimeWait),
        ]
    );
    assert_eq!(
        ev.last().unwrap().packets,
        8,
        "the last ACK (after both FINs) ends it, and is counted"
    );
    assert_eq!(e.port_tally(a).hits, 1);
    assert_eq!(e.port_tally(a).packets, 5);
}

#[test]
fn rst_ends_the_connection() {
    let mut e = h1();
    let mut ev = Vec::new();
    let (a, b) = (port(&e, "a.0"), port(&e, "b.0"));
    handshake(&mut e, &mut ev, 40001, 443, 0);
    assert_eq!(e.conntrack().len(), 1);
    fwd(
        &mut e,
        5,
        b,
        &tcp(11, 10, 443, 40001, (9001, 1001), TcpFlags::RST | TcpFlags::ACK, b""),
        a,
        &mut ev,
    );
    assert_eq!(ev.last().unwrap().kind, EventKind::End(EndReason::Reset));
    let n = ev.len();
    // Segments still in flight from either side are the dead connection's
    // late packets: forwarded, not classified as new flows, no new events.
    let before = e.counters().classifications;
    let late_data = tcp(10, 11, 40001, 443, (1001, 9001), TcpFlags::ACK, b"late");
    fwd(&mut e, 6, a, &late_data, b, &mut ev);
    let late_rst = tcp(11, 10, 443, 40001, (9001, 1005), TcpFlags::RST, b"");
    fwd(&mut e, 7, b, &late_rst, a, &mut ev);
    assert_eq!(e.counters().classifications, before);
    assert_eq!(ev.len(), n, "one end event only");
    // It lingers (closed), then expires. A new SYN on the same ports after
    // a reset from the *other* side passes as the old connection's, as in
    // Linux: the reset may have been out of sync, and the answer will tell.
    assert_eq!(e.conntrack().len(), 1);
    let syn = tcp(10, 11, 40001, 443, (5000, 0), TcpFlags::SYN, b"");
    fwd(&mut e, 8, a, &syn, b, &mut ev);
    assert_eq!(ev.len(), n);
    // After a reset from its own side, a new SYN opens a new connection.
    let own_rst = tcp(10, 11, 40001, 443, (1005, 9001), TcpFlags::RST | TcpFlags::ACK, b"");
    fwd(&mut e, 9, a, &own_rst, b, &mut ev);
    let syn = tcp(10, 11, 40001, 443, (7000, 0), TcpFlags::SYN, b"");
    fwd(&mut e, 10, a, &syn, b, &mut ev);
    assert_eq!(ev.last().unwrap().kind, EventKind::Start);
    assert_eq!(ev.last().unwrap().state, ConnState::SynSent);
    assert_eq!(e.counters().classifications, before + 1);
}

#[test]
fn strict_zone_drops_out_of_window_and_liberal_counts_it() {
    let mut strict = host(compile_mem(policy(true)), "h1", 1, &["web"], |_| {});
    let mut liberal = h1();
    for (e, strict) in [(&mut strict, true), (&mut liberal, false)] {
        let mut ev = Vec::new();
        let a = port(e, "a.0");
        handshake(e, &mut ev, 40002, 443, 0);
        let before = e.counters().clone();
        let far = tcp(10, 11, 40002, 443, (1001 + 3_000_000, 9001), TcpFlags::ACK, b"x");
        let d = e.process(10, a, &far, &mut ev, &mut Results::new()).disposition;
        let after = e.counters().clone();
        if strict {
            assert_eq!(d, Disposition::Drop(DropReason::TcpOutOfWindow));
            assert_eq!(delta(&before, &after, |c| c.dropped(DropReason::TcpOutOfWindow)), 1);
            // Strict zones also refuse mid-stream pickup.
            let stray = tcp(10, 11, 40003, 443, (5, 5), TcpFlags::ACK, b"");
            assert_eq!(
                e.process(11, a, &stray, &mut ev, &mut Results::new()),
                Disposition::Drop(DropReason::TcpNoConnection)
            );
        } else {
            assert_eq!(d, Disposition::Forward);
            assert_eq!(delta(&before, &after, |c| c.tcp_window_liberal), 1);
        }
    }
}

/// What an agent taking over after a fail-open episode counts: a
/// connection met mid-stream that the policy allows is picked up (its start
/// event marked `midstream`, its state `Established`, not `SynSent`); one it
/// denies makes a denial marked `midstream` (a segment, not an opening),
/// where a denied SYN or a stray reset is not. A denial's state is `New`
/// either way: there is no connection.
#[test]
fn a_connection_met_mid_stream_is_picked_up_or_denied_as_such() {
    let mut e = h1();
    let mut ev = Vec::new();
    let (a, b) = (port(&e, "a.0"), port(&e, "b.0"));
    // Allowed (tcp/443), met by a plain ACK with data: picked up.
    let mid = tcp(10, 11, 40010, 443, (5000, 9000), TcpFlags::ACK | TcpFlags::PSH, b"data");
    fwd(&mut e, 1, a, &mid, b, &mut ev);
    let start = ev.last().unwrap();
    assert_eq!(
        (start.kind, start.state, start.midstream),
        (EventKind::Start, ConnState::Established, true)
    );
    // Allowed, opened by a SYN: not a pickup.
    let syn = tcp(10, 11, 40011, 443, (7000, 0), TcpFlags::SYN, b"");
    fwd(&mut e, 2, a, &syn, b, &mut ev);
    let start = ev.last().unwrap();
    assert_eq!(
        (start.kind, start.state, start.midstream),
        (EventKind::Start, ConnState::SynSent, false)
    );
    // Their later events are not marked.
    assert!(ev.iter().all(|e| e.kind == EventKind::Start || !e.midstream));
    // Denied (tcp/2222): a segment of a connection, and a SYN.
    let n = ev.len();
    let denied_mid = tcp(10, 11, 40012, 2222, (5000, 9000), TcpFlags::ACK, b"x");
    assert_eq!(
        e.process(3, a, &denied_mid, &mut ev, &mut Results::new()).disposition,
        Disposition::Drop(DropReason::PolicyDeny)
    );
    let denied_syn = tcp(10, 11, 40013, 2222, (5000, 0), TcpFlags::SYN, b"");
    assert_eq!(
        e.process(4, a, &denied_syn, &mut ev, &mut Results::new()).disposition,
        Disposition::Drop(DropReason::PolicyDeny)
    );
    let denied_rst = tcp(10, 11, 40014, 2222, (5000, 0), TcpFlags::RST, b"");
    e.process(5, a, &denied_rst, &mut ev, &mut Results::new());
    let got: Vec<_> = ev[n..]
        .iter()
        .map(|e| (e.kind, e.key.src_port, e.state, e.midstream))
        .collect();
    let deny = EventKind::Denied(DropReason::PolicyDeny);
    assert_eq!(
        got,
        vec![
            (deny, 40012, ConnState::New, true),
            (deny, 40013, ConnState::New, false),
            (deny, 40014, ConnState::New, false),
        ]
    );
}

#[test]
fn icmp_echo_and_related_errors() {
    let mut e = h1();
    let mut ev = Vec::new();
    let (a, b) = (port(&e, "a.0"), port(&e, "b.0"));
    let before = e.counters().clone();
    fwd(
        &mut e,
        0,
        a,
        &icmp(10, 11, 8, 0, [0x12, 0x34, 0, 1], b"ping"),
        b,
        &mut ev,
    );
    fwd(
        &mut e,
        1,
        b,
        &icmp(11, 10, 0, 0, [0x12, 0x34, 0, 1], b"ping"),
        a,
        &mut ev,
    );
    assert_eq!(ev.last().unwrap().state, ConnState::Replied);
    // UDP to b, answered with port unreachable quoting the datagram.
    let query = udp(10, 11, 5353, 53);
    fwd(&mut e, 2, a, &query, b, &mut ev);
    let quoted = &query[14..14 + 28];
    fwd(&mut e, 3, b, &icmp(11, 10, 3, 3, [0; 4], quoted), a, &mut ev);
    // An error quoting a datagram nobody sent is not forwarded.
    let other = udp(10, 11, 6000, 53);
    let d = e
        .process(
            4,
            b,
            &icmp(11, 10, 3, 3, [0; 4], &other[14..42]),
            &mut ev,
            &mut Results::new(),
        )
        .disposition;
    assert_eq!(d, Disposition::Drop(DropReason::IcmpErrorUnrelated));
    let after = e.counters().clone();
    assert_eq!(
        delta(&before, &after, |c| c.classifications),
        3,
        "ping, the UDP flow, and the unrelated error (decided by the policy like any flow)"
    );
    assert_eq!(delta(&before, &after, |c| c.icmp_related), 1);
    assert_eq!(delta(&before, &after, |c| c.dropped(DropReason::IcmpErrorUnrelated)), 1);
    // An ICMP query no service names (timestamp) is denied.
    let d = e
        .process(
            5,
            a,
            &icmp(10, 11, 13, 0, [0; 4], &[0; 12]),
            &mut ev,
            &mut Results::new(),
        )
        .disposition;
    assert_eq!(d, Disposition::Drop(DropReason::PolicyDeny));
}

#[test]
fn spoofing_is_dropped_with_reasons() {
    let mut e = h1();
    let mut ev = Vec::new();
    let (a, b) = (port(&e, "a.0"), port(&e, "b.0"));
    let before = e.counters().clone();
    // Source MAC of b.
    let mut f = tcp(10, 11, 1, 443, (1, 0), TcpFlags::SYN, b"");
    f[6..12].copy_from_slice(&mac(11));
    assert_eq!(
        e.process(0, a, &f, &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::SpoofedMac)
    );
    // Own MAC, b's address.
    let f = eth(
        mac(10),
        mac(11),
        None,
        EtherType::IPV4,
        &tcp_ip(ip(11), ip(10), 1, 443, (1, 0), TcpFlags::SYN, b""),
    );
    assert_eq!(
        e.process(0, a, &f, &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::SpoofedIp)
    );
    // ARP claiming b's address; then an honest ARP, flooded in the segment.
    let f = arp_frame(mac(10), ip(11), ip(12));
    assert_eq!(
        e.process(0, a, &f, &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::SpoofedArp)
    );
    let f = arp_frame(mac(10), ip(10), ip(11));
    let seen = run(&mut e, 0, a, &f, &mut ev);
    assert_eq!(seen, Disposition::Forward);
    let outs: Vec<PortId> = seen.outputs.iter().map(|o| o.port).collect();
    assert_eq!(
        outs,
        vec![b, UPLINK],
        "flooded to the segment's other port and the peer host"
    );
    let after = e.counters().clone();
    for r in [DropReason::SpoofedMac, DropReason::SpoofedIp, DropReason::SpoofedArp] {
        assert_eq!(delta(&before, &after, |c| c.dropped(r)), 1, "{r}");
    }
    assert_eq!(
        delta(&before, &after, |c| c.classifications),
        0,
        "spoofed frames never reach the classifier"
    );
    assert_eq!(
        e.port_dropped(a, DropReason::SpoofedArp),
        1,
        "charged to the sending vNIC"
    );
    assert_eq!(e.port_dropped(b, DropReason::SpoofedArp), 0);
}

#[test]
fn policy_change_cuts_one_flow_and_keeps_another() {
    let mut e = h1();
    let mut ev = Vec::new();
    let (a, b) = (port(&e, "a.0"), port(&e, "b.0"));
    handshake(&mut e, &mut ev, 40010, 22, 0);
    handshake(&mut e, &mut ev, 40011, 443, 0);
    assert_eq!(e.conntrack().len(), 2);
    let before = e.counters().clone();
    e.update_policy(Box::new(PolicyLookup::new(compile_mem(policy(false)))));
    let ssh = tcp(10, 11, 40010, 22, (1001, 9001), TcpFlags::ACK | TcpFlags::PSH, b"ls");
    assert_eq!(
        e.process(10, a, &ssh, &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::PolicyRevoked)
    );
    assert_eq!(ev.last().unwrap().kind, EventKind::End(EndReason::PolicyRevoked));
    let https = tcp(10, 11, 40011, 443, (1001, 9001), TcpFlags::ACK | TcpFlags::PSH, b"GET");
    fwd(&mut e, 11, a, &https, b, &mut ev);
    fwd(
        &mut e,
        12,
        b,
        &tcp(11, 10, 443, 40011, (9001, 1004), TcpFlags::ACK, b""),
        a,
        &mut ev,
    );
    // The cut flow stays cut: a retransmission is now a new, denied flow.
    assert_eq!(
        e.process(13, a, &ssh, &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::PolicyDeny)
    );
    let after = e.counters().clone();
    assert_eq!(delta(&before, &after, |c| c.revalidations), 2);
    assert_eq!(
        delta(&before, &after, |c| c.classifications),
        3,
        "two re-validations and the retransmission"
    );
    assert_eq!(delta(&before, &after, |c| c.dropped(DropReason::PolicyRevoked)), 1);
    assert_eq!(delta(&before, &after, |c| c.forwarded), 2);
    assert_eq!(e.conntrack().len(), 1);
    assert_eq!(e.conntrack().iter().next().unwrap().1.policy_version, 2);
}

#[test]
fn full_tables_and_vnic_limits() {
    let c = compile_mem(policy(true));
    let mut refuse = host(c.clone(), "h1", 1, &[], |cfg| {
        cfg.conn_capacity = 2;
        cfg.flow_capacity = 3;
        cfg.full_policy = FullPolicy::Refuse;
    });
    let mut ev = Vec::new();
    let (a, b) = (port(&refuse, "a.0"), port(&refuse, "b.0"));
    fwd(&mut refuse, 0, a, &udp(10, 11, 1000, 53), b, &mut ev);
    fwd(&mut refuse, 0, a, &udp(10, 11, 1001, 53), b, &mut ev);
    let before = refuse.counters().clone();
    assert_eq!(
        refuse.process(0, a, &udp(10, 11, 1002, 53), &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::ConntrackFull)
    );
    // Existing flows are unaffected; the cache (3 entries) evicts to admit the replies.
    fwd(&mut refuse, 1, b, &udp(11, 10, 53, 1000), a, &mut ev);
    fwd(&mut refuse, 1, b, &udp(11, 10, 53, 1001), a, &mut ev);
    let after = refuse.counters().clone();
    assert_eq!(delta(&before, &after, |c| c.dropped(DropReason::ConntrackFull)), 1);
    assert!(delta(&before, &after, |c| c.cache_evictions) >= 1);
    assert!(refuse.flow_table().len() <= 3);

    let mut evict = host(c.clone(), "h1", 1, &[], |cfg| cfg.conn_capacity = 2);
    fwd(&mut evict, 0, a, &udp(10, 11, 1000, 53), b, &mut ev);
    fwd(&mut evict, 0, a, &udp(10, 11, 1001, 53), b, &mut ev);
    fwd(&mut evict, 0, a, &udp(10, 11, 1002, 53), b, &mut ev);
    assert_eq!(evict.counters().conns_evicted, 1);
    assert_eq!(
        ev.iter()
            .filter(|e| e.kind == EventKind::End(EndReason::Evicted))
            .count(),
        1
    );

    // Per-vNIC limit: a vNIC allowed one connection.
    let model = c.model().clone();
    let mut limited = Engine::new(EngineConfig::new(uplink(1)), Box::new(PolicyLookup::new(c)));
    let a = limited
        .add_vnic(port::vnic_from_model(&model, "a.0", &[], 1).unwrap())
        .unwrap();
    let b = limited
        .add_vnic(port::vnic_from_model(&model, "b.0", &[], 100).unwrap())
        .unwrap();
    fwd(&mut limited, 0, a, &udp(10, 11, 1000, 53), b, &mut ev);
    assert_eq!(
        limited.process(0, a, &udp(10, 11, 1001, 53), &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::VnicConnLimit)
    );
    assert_eq!(limited.conntrack().port_conns(a), 1);
}

#[test]
fn state_export_import_continues_without_classification() {
    let c = compile_mem(policy(true));
    let mut src = host(c.clone(), "h1", 1, &["web"], |_| {});
    let mut ev = Vec::new();
    handshake(&mut src, &mut ev, 40020, 443, 0);
    let a = port(&src, "a.0");
    let blob = src.export_vnic(a, 100, true, &mut ev).unwrap();
    assert_eq!(src.conntrack().len(), 0);
    assert_eq!(ev.last().unwrap().kind, EventKind::End(EndReason::Exported));

    // The destination host: a fresh engine where a.0 (and b.0) now live.
    let model = c.model().clone();
    let mut dst = Engine::new(EngineConfig::new(uplink(2)), Box::new(PolicyLookup::new(c)));
    let a2 = dst
        .add_vnic(port::vnic_from_model(&model, "a.0", &["web".into()], 100).unwrap())
        .unwrap();
    let b2 = dst
        .add_vnic(port::vnic_from_model(&model, "b.0", &["web".into()], 100).unwrap())
        .unwrap();
    assert_eq!(dst.import_vnic(a2, &blob, 5_000, &mut ev), Ok(1));
    let before = dst.counters().clone();
    // Strict zone: a mid-stream segment would be refused without the imported state.
    let data = tcp(10, 11, 40020, 443, (1001, 9001), TcpFlags::ACK | TcpFlags::PSH, b"more");
    fwd(&mut dst, 5_001, a2, &data, b2, &mut ev);
    fwd(
        &mut dst,
        5_002,
        b2,
        &tcp(11, 10, 443, 40020, (9001, 1005), TcpFlags::ACK, b""),
        a2,
        &mut ev,
    );
    let after = dst.counters().clone();
    assert_eq!(delta(&before, &after, |c| c.classifications), 0);
    assert_eq!(delta(&before, &after, |c| c.forwarded), 2);
    // The window state came along: a segment far outside it is still refused.
    let far = tcp(10, 11, 40020, 443, (1005 + 3_000_000, 9001), TcpFlags::ACK, b"x");
    assert_eq!(
        dst.process(5_003, a2, &far, &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::TcpOutOfWindow)
    );

    // Corrupt and foreign blobs are refused, and nothing already stored is lost.
    let mut bad = blob.clone();
    bad[30] ^= 1;
    assert!(matches!(
        dst.import_vnic(a2, &bad, 6_000, &mut ev),
        Err(StateError::BadChecksum { .. })
    ));
    assert_eq!(
        dst.import_vnic(b2, &blob, 6_000, &mut ev).unwrap_err().to_string(),
        "state blob is for vNIC \"a.0\", not \"b.0\""
    );
    assert_eq!(dst.import_vnic(a2, b"junk", 6_000, &mut ev), Err(StateError::Truncated));
    assert_eq!(dst.conntrack().len(), 1);
}

#[test]
fn cross_host_flow_is_classified_once_in_total() {
    let c = compile_mem(policy(true));
    let mut h1 = host(c.clone(), "h1", 1, &[], |_| {});
    let mut h2 = host(c, "h2", 2, &[], |_| {});
    let mut ev = Vec::new();
    let a = port(&h1, "a.0");
    let cc = port(&h2, "c.0");
    // c announces itself (ARP, flooded to h1 over VXLAN); h1 learns where c's MAC lives.
    let arp = arp_frame(mac(12), ip(12), ip(10));
    let seen = run(&mut h2, 0, cc, &arp, &mut ev);
    assert_eq!(seen, Disposition::Forward);
    let out = seen.outputs[0];
    assert_eq!(out.port, UPLINK);
    assert!(!out.encap.unwrap().policy_applied, "ARP carries no verdict");
    let wire = seen.out0();
    assert_eq!(
        h1.process(1, UPLINK, &wire, &mut ev, &mut Results::new()),
        Disposition::Forward
    );
    // A frame from outside claiming a local vNIC's MAC is an impersonation.
    let mut fake = wire.clone();
    fake[50 + 6..50 + 12].copy_from_slice(&mac(10));
    assert_eq!(
        h1.process(1, UPLINK, &fake, &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::SpoofedMac)
    );
    let (b1, b2) = (h1.counters().clone(), h2.counters().clone());

    // a → c: classified on h1, encapsulated with the policy-applied bit and a's group.
    let syn = tcp(10, 12, 40030, 443, (1, 0), TcpFlags::SYN, b"");
    let seen = run(&mut h1, 2, a, &syn, &mut ev);
    assert_eq!(seen, Disposition::Forward);
    let enc = seen.outputs[0].encap.unwrap();
    assert!(enc.policy_applied);
    assert_eq!(enc.remote, Ipv4Addr::new(192, 168, 0, 2));
    assert_eq!(enc.group_id, h1.vnic(a).unwrap().group_id);
    let wire = seen.out0();
    let vx = vxlan::Packet::new_checked(&wire[42..]).unwrap();
    assert!(vx.policy_applied() && vx.has_gbp());
    assert_eq!(vx.vni(), 100);
    assert_eq!(&wire[50..], &syn[..], "the inner frame is the VM's frame");
    // The outer UDP source port: from the ephemeral range, by flow (RFC 7348).
    let outer_sport = |w: &[u8]| u16::from_be_bytes([w[34], w[35]]);
    let syn_sport = outer_sport(&wire);
    assert!(syn_sport >= 49152, "{syn_sport}");
    let seen = fwd(&mut h2, 3, UPLINK, &wire, cc, &mut ev);
    assert_eq!(seen.out0(), syn);

    // The reply goes back the same way, trusted on h1 too.
    let synack = tcp(12, 10, 443, 40030, (100, 2), TcpFlags::SYN | TcpFlags::ACK, b"");
    let seen = run(&mut h2, 4, cc, &synack, &mut ev);
    assert_eq!(seen, Disposition::Forward);
    assert!(seen.outputs[0].encap.unwrap().policy_applied);
    let wire = seen.out0();
    assert_eq!(
        outer_sport(&wire),
        syn_sport,
        "both directions of a flow take one underlay path"
    );
    fwd(&mut h1, 5, UPLINK, &wire, a, &mut ev);
    let ack = tcp(10, 12, 40030, 443, (2, 101), TcpFlags::ACK, b"");
    let seen = run(&mut h1, 6, a, &ack, &mut ev);
    assert_eq!(seen, Disposition::Forward);
    fwd(&mut h2, 7, UPLINK, &seen.out0(), cc, &mut ev);

    let (a1, a2) = (h1.counters().clone(), h2.counters().clone());
    let total = delta(&b1, &a1, |c| c.classifications) + delta(&b2, &a2, |c| c.classifications);
    assert_eq!(total, 1, "one evaluation across both hosts");
    assert_eq!(delta(&b2, &a2, |c| c.trusted), 2);
    assert_eq!(delta(&b1, &a1, |c| c.trusted), 1);

    // Without the policy-applied bit, the receiving host evaluates the flow itself.
    let syn2 = tcp(10, 12, 40031, 22, (1, 0), TcpFlags::SYN, b"");
    let seen = run(&mut h1, 8, a, &syn2, &mut ev);
    assert_eq!(seen, Disposition::Forward);
    let mut wire = seen.out0();
    assert_ne!(outer_sport(&wire), syn_sport, "another flow, another port");
    vxlan::Packet::new_unchecked(&mut wire[42..50]).set_policy_applied(false);
    let before = h2.counters().classifications;
    fwd(&mut h2, 9, UPLINK, &wire, cc, &mut ev);
    assert_eq!(h2.counters().classifications - before, 1);
}

#[test]
fn three_tier_vlan_tagged_north_south() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/three-tier");
    let loaded = load(&DirSource::new(dir)).unwrap();
    assert!(!loaded.has_errors(), "{}", loaded.render());
    let mut e = host(Compiler::new(loaded.model).unwrap(), "hv1", 1, &[], |_| {});
    let mut ev = Vec::new();
    let web = port(&e, "web-1.0");
    let router = [0x0e, 0, 0, 0, 0, 0x99];
    let web_mac = [0x02, 0x00, 0x0a, 0x00, 0x01, 0x0b];
    let client = Ipv4Addr::new(203, 0, 113, 5);
    let web_ip = Ipv4Addr::new(10, 0, 1, 11);
    // From the physical network, tagged VLAN 100: https allowed (zone rule), to web-1 untagged.
    let syn = eth(
        router,
        web_mac,
        Some(100),
        EtherType::IPV4,
        &tcp_ip(client, web_ip, 50000, 443, (7, 0), TcpFlags::SYN, b""),
    );
    let out = fwd(&mut e, 0, UPLINK, &syn, web, &mut ev).out0();
    assert_eq!(out.len(), syn.len() - 4);
    assert_eq!(&out[12..14], &[0x08, 0x00]);
    assert_eq!(e.rule_tally("web-from-internet").hits, 1);
    // The reply leaves on the uplink, re-tagged with the zone's VLAN.
    let synack = eth(
        web_mac,
        router,
        None,
        EtherType::IPV4,
        &tcp_ip(web_ip, client, 443, 50000, (70, 8), TcpFlags::SYN | TcpFlags::ACK, b""),
    );
    let out = fwd(&mut e, 1, web, &synack, UPLINK, &mut ev).out0();
    assert_eq!(out, eth(web_mac, router, Some(100), EtherType::IPV4, &synack[14..]));
    // SSH from the internet is denied by the datacenter guard rail, and counted against it.
    let ssh = eth(
        router,
        web_mac,
        Some(100),
        EtherType::IPV4,
        &tcp_ip(client, web_ip, 50001, 22, (7, 0), TcpFlags::SYN, b""),
    );
    assert_eq!(
        e.process(2, UPLINK, &ssh, &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::PolicyDeny)
    );
    assert_eq!(
        e.process(3, UPLINK, &ssh, &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::PolicyDeny)
    );
    let t = e.rule_tally("dc-deny-internet-ssh");
    assert_eq!((t.hits, t.packets), (1, 2), "the second attempt hits the cached deny");
    // A VM may not tag its frames into another VLAN.
    let tagged = eth(web_mac, router, Some(200), EtherType::IPV4, &synack[14..]);
    assert_eq!(
        e.process(4, web, &tagged, &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::VlanMismatch)
    );
    // Garbage is a typed drop, never a panic.
    for n in 0..syn.len() {
        let d = e
            .process(5, UPLINK, &syn[..n], &mut ev, &mut Results::new())
            .disposition;
        assert!(matches!(d, Disposition::Drop(_)), "{n}: {d:?}");
    }
    let _: IpAddr = web_ip.into();
}

#[test]
fn timeouts_expire_connections() {
    let mut e = h1();
    let mut ev = Vec::new();
    let (a, b) = (port(&e, "a.0"), port(&e, "b.0"));
    fwd(&mut e, 0, a, &udp(10, 11, 7000, 53), b, &mut ev);
    assert_eq!(e.expire(10 * 1_000 * MS, 100, &mut ev), 0);
    assert_eq!(e.expire(31 * 1_000 * MS, 100, &mut ev), 1);
    assert_eq!(ev.last().unwrap().kind, EventKind::End(EndReason::Timeout));
    // A late reply is now a new flow from b (source port 53 to 7000), which no rule allows.
    assert_eq!(
        e.process(32 * 1_000 * MS, b, &udp(11, 10, 53, 7000), &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::PolicyDeny)
    );
}

#[test]
fn a_stepped_sweep_expires_as_the_whole_sweep_does() {
    // Two engines with the same connections; one swept whole, one in steps of a slot.
    let run = |stepped: bool| {
        let mut e = h1();
        let mut ev = Vec::new();
        let (a, b) = (port(&e, "a.0"), port(&e, "b.0"));
        for (i, sport) in (7000..7010).enumerate() {
            fwd(&mut e, i as u64 * 1_000 * MS, a, &udp(10, 11, sport, 53), b, &mut ev);
        }
        ev.clear();
        // At 35 s the first five (seen at 0-4 s, unreplied: 30 s) are due.
        let now = 35 * 1_000 * MS;
        let mut updates = Vec::new();
        if stepped {
            let mut sweep = palisade_datapath::Sweep::new();
            sweep.start(Some(0));
            let mut steps = 0;
            while sweep.is_active() {
                let step = e.sweep_step(&mut sweep, now, 1, &mut ev, &mut updates);
                assert!(step.scanned <= 1 && step.expired <= 1);
                steps += 1;
            }
            assert_eq!(steps, 10);
        } else {
            e.expire(now, usize::MAX, &mut ev);
        }
        (ev, updates, e.conntrack().len())
    };
    let (whole, _, left) = run(false);
    let (steps, updates, left_stepped) = run(true);
    assert_eq!(whole.len(), 5);
    assert!(whole.iter().all(|e| e.kind == EventKind::End(EndReason::Timeout)));
    assert_eq!(whole, steps);
    assert_eq!((left, left_stepped), (5, 5));
    // The survivors are reported as updates (seen since 0).
    assert_eq!(updates.len(), 5);
    assert!(updates.iter().all(|e| e.kind == EventKind::Update));
}

/// A neighbour advertisement from a's MAC for `target`, with target link-layer address `tlla`.
fn neighbor_advert(target: &str, tlla: [u8; 6]) -> Vec<u8> {
    let src: core::net::Ipv6Addr = "fd00::a".parse().unwrap();
    let dst: core::net::Ipv6Addr = "ff02::1".parse().unwrap();
    let target: core::net::Ipv6Addr = target.parse().unwrap();
    let mut m = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    m.extend_from_slice(&target.octets());
    m.extend_from_slice(&[2, 1]);
    m.extend_from_slice(&tlla);
    icmpv6::Packet::new_unchecked(&mut m[..]).fill_checksum(src, dst);
    let ip = Ipv6Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::ICMPV6,
        payload_len: m.len(),
        hop_limit: 255,
        traffic_class: 0,
        flow_label: 0,
    };
    let mut p = vec![0; 40 + m.len()];
    ip.emit(&mut ipv6::Packet::new_unchecked(&mut p[..]));
    p[40..].copy_from_slice(&m);
    eth(mac(10), [0x33, 0x33, 0, 0, 0, 1], None, EtherType::IPV6, &p)
}

#[test]
fn neighbour_discovery_spoofing_is_dropped() {
    let mut e = h1();
    let mut ev = Vec::new();
    let a = port(&e, "a.0");
    assert_eq!(
        e.process(0, a, &neighbor_advert("fd00::a", mac(10)), &mut ev, &mut Results::new()),
        Disposition::Forward
    );
    assert_eq!(
        e.process(0, a, &neighbor_advert("fd00::b", mac(10)), &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::SpoofedNd),
        "advertising another address"
    );
    assert_eq!(
        e.process(0, a, &neighbor_advert("fd00::a", mac(11)), &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::SpoofedNd),
        "advertising another link-layer address"
    );
    assert_eq!(e.counters().dropped(DropReason::SpoofedNd), 2);
    assert_eq!(e.counters().classifications, 0, "neighbour discovery is not a flow");
}

#[test]
fn mutated_frames_never_panic() {
    let mut e = h1();
    let mut ev = Vec::new();
    let (a, b) = (port(&e, "a.0"), port(&e, "b.0"));
    handshake(&mut e, &mut ev, 40100, 443, 0);
    let mut seeds = vec![
        tcp(10, 11, 40100, 443, (1001, 9001), TcpFlags::ACK, b"data"),
        udp(10, 11, 5000, 53),
        icmp(11, 10, 3, 3, [0; 4], &udp(10, 11, 5000, 53)[14..42]),
        arp_frame(mac(10), ip(10), ip(11)),
        neighbor_advert("fd00::a", mac(10)),
        tcp(10, 11, 40101, 23, (1, 0), TcpFlags::SYN, b""),
        udp(10, 11, 6001, 69),
    ];
    // A VXLAN packet for the uplink, too.
    let syn = tcp(12, 10, 1, 443, (1, 0), TcpFlags::SYN, b"");
    let mut h2 = host(compile_mem(policy(true)), "h2", 2, &[], |_| {});
    let c = port(&h2, "c.0");
    seeds.push(run(&mut h2, 0, c, &syn, &mut ev).out0());
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..20_000u64 {
        let mut f = seeds[(next() % seeds.len() as u64) as usize].clone();
        for _ in 0..(next() % 4) {
            let at = (next() % f.len() as u64) as usize;
            f[at] = next() as u8;
        }
        f.truncate((next() % (f.len() as u64 + 1)) as usize);
        let from = [a, b, UPLINK][(next() % 3) as usize];
        // Every output and every reply renders (`Seen::of` unwraps each).
        let seen = run(&mut e, i, from, &f, &mut ev);
        if seen == Disposition::Drop(DropReason::PolicyReject) {
            assert!(seen.reply.is_some(), "a rejected IP frame is answered");
        }
    }
    assert_eq!(e.counters().packets, 20_000 + 3);
}

/// A TCP frame between two VMs over IPv6 (`fd00::<from>` → `fd00::<to>`).
fn tcp6(from: u8, to: u8, sport: u16, dport: u16, (seq, ack): (u32, u32), flags: TcpFlags, data: &[u8]) -> Vec<u8> {
    let src: core::net::Ipv6Addr = format!("fd00::{from:x}").parse().unwrap();
    let dst: core::net::Ipv6Addr = format!("fd00::{to:x}").parse().unwrap();
    let repr = TcpRepr {
        src_port: sport,
        dst_port: dport,
        seq_number: seq,
        ack_number: ack,
        flags,
        window_len: 64000,
        urgent_pointer: 0,
        options: &[3, 3, 7, 1],
        payload: data,
    };
    let mut t = vec![0; repr.buffer_len()];
    repr.emit(&mut tcp::Packet::new_unchecked(&mut t[..]), src.into(), dst.into());
    let ip = Ipv6Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::TCP,
        payload_len: t.len(),
        hop_limit: 64,
        traffic_class: 0,
        flow_label: 0,
    };
    let mut p = vec![0; 40 + t.len()];
    ip.emit(&mut ipv6::Packet::new_unchecked(&mut p[..]));
    p[40..].copy_from_slice(&t);
    eth(mac(from), mac(to), None, EtherType::IPV6, &p)
}

#[test]
fn ipv6_tcp_with_window_scaling_in_a_strict_zone() {
    let text = policy(true).replace(r#"ips: [10.0.0.11], zone"#, r#"ips: [10.0.0.11, "fd00::b"], zone"#);
    let mut e = host(compile_mem(text), "h1", 1, &["web"], |_| {});
    let mut ev = Vec::new();
    let (a, b) = (port(&e, "a.0"), port(&e, "b.0"));
    fwd(
        &mut e,
        0,
        a,
        &tcp6(10, 11, 40200, 443, (1000, 0), TcpFlags::SYN, b""),
        b,
        &mut ev,
    );
    fwd(
        &mut e,
        1,
        b,
        &tcp6(11, 10, 443, 40200, (9000, 1001), TcpFlags::SYN | TcpFlags::ACK, b""),
        a,
        &mut ev,
    );
    fwd(
        &mut e,
        2,
        a,
        &tcp6(10, 11, 40200, 443, (1001, 9001), TcpFlags::ACK, b""),
        b,
        &mut ev,
    );
    // The SYN-ACK's window is never scaled, so 5 MB ahead is out of window until b advertises a scaled one.
    let ahead = tcp6(10, 11, 40200, 443, (1001 + 5_000_000, 9001), TcpFlags::ACK, b"x");
    assert_eq!(
        e.process(3, a, &ahead, &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::TcpOutOfWindow)
    );
    fwd(
        &mut e,
        3,
        b,
        &tcp6(11, 10, 443, 40200, (9001, 1001), TcpFlags::ACK, b""),
        a,
        &mut ev,
    );
    // With a window scale of 7 on both sides, 64000 << 7 bytes may be in flight: 5 MB ahead is fine.
    let ahead = tcp6(10, 11, 40200, 443, (1001 + 5_000_000, 9001), TcpFlags::ACK, b"x");
    fwd(&mut e, 3, a, &ahead, b, &mut ev);
    // Beyond b's window by more than a window (Linux lets a segment overshoot
    // by up to one: some stacks send a little too much).
    let beyond = tcp6(10, 11, 40200, 443, (1001 + 20_000_000, 9001), TcpFlags::ACK, b"x");
    assert_eq!(
        e.process(4, a, &beyond, &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::TcpOutOfWindow)
    );
    assert_eq!(e.counters().classifications, 1);
    assert_eq!(ev[2].state, ConnState::Established);
}

#[test]
fn dispatch_keys_put_a_connection_and_its_errors_on_one_shard() {
    // The symmetric hash a host steers flows by, modulo its workers.
    let shard_of = |k: &FlowKey, n: u64| k.symmetric_hash() % n;
    let e = h1();
    let (a, b) = (port(&e, "a.0"), port(&e, "b.0"));
    for sport in 1000..1100 {
        let query = udp(10, 11, sport, 53);
        let reply = udp(11, 10, 53, sport);
        let error = icmp(11, 10, 3, 3, [0; 4], &query[14..42]);
        let k = e.dispatch_key(a, &query).unwrap();
        assert_eq!(e.dispatch_key(b, &reply).unwrap(), k.reversed());
        assert_eq!(e.dispatch_key(b, &error).unwrap(), k);
        for n in [2, 4, 7] {
            assert_eq!(shard_of(&k, n), shard_of(&e.dispatch_key(b, &reply).unwrap(), n));
        }
    }
    assert_eq!(e.dispatch_key(a, &arp_frame(mac(10), ip(10), ip(11))), None);
}

#[test]
fn reply_packets_count_against_the_deciding_rule() {
    let mut e = h1();
    let mut ev = Vec::new();
    handshake(&mut e, &mut ev, 40300, 443, 0);
    let t = e.rule_tally("web-https");
    assert_eq!(
        (t.hits, t.packets),
        (2, 3),
        "two chain decisions; the three packets are counted once each"
    );
}

#[test]
fn rejected_flows_get_a_reset_or_an_icmp_error() {
    let mut e = h1();
    let mut ev = Vec::new();
    let a = port(&e, "a.0");
    let syn = tcp(10, 11, 40400, 23, (5000, 0), TcpFlags::SYN, b"");
    let seen = run(&mut e, 0, a, &syn, &mut ev);
    assert_eq!(seen, Disposition::Drop(DropReason::PolicyReject));
    let buf = seen.reply.unwrap();
    let n = buf.len();
    let f = ethernet::Frame::new_checked(&buf[..n]).unwrap();
    assert_eq!(
        (f.dst_addr(), f.src_addr()),
        (EthernetAddress(mac(10)), EthernetAddress(mac(11)))
    );
    let hdr = ipv4::Packet::new_checked(&buf[14..n]).unwrap();
    assert!(hdr.verify_checksum());
    assert_eq!((hdr.src_addr(), hdr.dst_addr()), (ip(11), ip(10)));
    let t = tcp::Packet::new_checked(&buf[34..n]).unwrap();
    assert!(t.verify_checksum(ip(11).into(), ip(10).into()));
    assert_eq!((t.src_port(), t.dst_port()), (23, 40400));
    assert_eq!((t.flags(), t.ack_number()), (TcpFlags::RST | TcpFlags::ACK, 5001));
    assert_eq!(e.rule_tally("web-reject").hits, 2);

    let tftp = udp(10, 11, 6000, 69);
    let seen = run(&mut e, 1, a, &tftp, &mut ev);
    assert_eq!(seen, Disposition::Drop(DropReason::PolicyReject));
    let buf = seen.reply.unwrap();
    let n = buf.len();
    let m = icmpv4::Packet::new_checked(&buf[34..n]).unwrap();
    assert!(m.verify_checksum());
    assert_eq!((m.msg_type().0, m.msg_code()), (3, 13));
    assert_eq!(&buf[42..n], &tftp[14..42], "quotes the IP header and 8 bytes");
    assert_eq!(e.counters().dropped(DropReason::PolicyReject), 2);
}

#[test]
fn import_is_all_or_nothing_and_replaces_duplicates() {
    let c = compile_mem(policy(true));
    let mut src = h1();
    let mut ev = Vec::new();
    handshake(&mut src, &mut ev, 40500, 443, 0);
    handshake(&mut src, &mut ev, 40501, 443, 0);
    let a = port(&src, "a.0");
    let blob = src.export_vnic(a, 10, false, &mut ev).unwrap();
    assert_eq!(src.conntrack().len(), 2, "exporting without removing keeps the state");

    let mut small = host(c, "h1", 1, &[], |cfg| cfg.conn_capacity = 1);
    let a2 = port(&small, "a.0");
    assert_eq!(
        small.import_vnic(a2, &blob, 20, &mut ev),
        Err(StateError::NoRoom { needed: 2, free: 1 })
    );
    assert_eq!(small.conntrack().len(), 0);

    // Importing over live state replaces the duplicates and keeps the per-vNIC charge right.
    assert_eq!(src.import_vnic(a, &blob, 20, &mut ev), Ok(2));
    assert_eq!(src.conntrack().len(), 2);
    assert_eq!(src.conntrack().port_conns(a), 2);
}

#[test]
fn overlay_socket_path_matches_the_uplink_path() {
    // The agent's UDP socket sees only the VXLAN payload: rendering for it and
    // processing what it receives must behave like the full uplink frames.
    let c = compile_mem(policy(true));
    let mut h1 = host(c.clone(), "h1", 1, &[], |_| {});
    let mut h2 = host(c, "h2", 2, &[], |_| {});
    let mut ev = Vec::new();
    let a = port(&h1, "a.0");
    let cc = port(&h2, "c.0");
    let arp = arp_frame(mac(12), ip(12), ip(10));
    let seen = run(&mut h2, 0, cc, &arp, &mut ev);
    assert_eq!(seen, Disposition::Forward);
    let (remote, payload) = seen.overlay0();
    assert_eq!(remote, Ipv4Addr::new(192, 168, 0, 1));
    assert_eq!(
        &payload[8..],
        &seen.out0()[50..],
        "same inner frame as the uplink rendering"
    );
    assert_eq!(&payload[..8], &seen.out0()[42..50], "same VXLAN-GBP header");
    assert_eq!(
        h1.process_overlay(1, Ipv4Addr::new(192, 168, 0, 2), &payload, &mut ev, &mut Results::new()),
        Disposition::Forward
    );

    let before = (h1.counters().classifications, h2.counters().classifications);
    let syn = tcp(10, 12, 40030, 443, (1, 0), TcpFlags::SYN, b"");
    let seen = run(&mut h1, 2, a, &syn, &mut ev);
    assert_eq!(seen, Disposition::Forward);
    let (remote, payload) = seen.overlay0();
    assert_eq!(remote, Ipv4Addr::new(192, 168, 0, 2), "learned from the ARP's sender");
    let seen = run_overlay(&mut h2, 3, Ipv4Addr::new(192, 168, 0, 1), &payload, &mut ev);
    assert_eq!(seen, Disposition::Forward);
    assert_eq!(seen.outputs[0].port, cc);
    assert_eq!(seen.out0(), syn, "delivered unchanged");
    let after = (h1.counters().classifications, h2.counters().classifications);
    assert_eq!(
        (after.0 - before.0) + (after.1 - before.1),
        1,
        "one evaluation in total"
    );
    assert_eq!(h2.counters().trusted, 1);

    // A local output has no overlay rendering; garbage from the socket is a typed drop.
    assert!(seen.outputs[0].encap.is_none() && seen.overlay[0].is_none());
    assert_eq!(
        h2.process_overlay(
            4,
            Ipv4Addr::new(192, 168, 0, 1),
            &payload[..6],
            &mut ev,
            &mut Results::new()
        ),
        Disposition::Drop(DropReason::Malformed)
    );
    let mut other_vni = payload.clone();
    other_vni[4..7].copy_from_slice(&[0, 0x0f, 0xff]);
    assert_eq!(
        h2.process_overlay(
            5,
            Ipv4Addr::new(192, 168, 0, 1),
            &other_vni,
            &mut ev,
            &mut Results::new()
        ),
        Disposition::Drop(DropReason::UnknownVni)
    );
}

#[test]
fn events_carry_direction_counts_and_the_deciding_rules() {
    let mut e = h1();
    let mut ev = Vec::new();
    let (a, b) = (port(&e, "a.0"), port(&e, "b.0"));
    handshake(&mut e, &mut ev, 40100, 443, 0);
    let data = tcp(
        10,
        11,
        40100,
        443,
        (1001, 9001),
        TcpFlags::ACK | TcpFlags::PSH,
        b"hello",
    );
    fwd(&mut e, 10, a, &data, b, &mut ev);
    let fin = tcp(10, 11, 40100, 443, (1006, 9001), TcpFlags::FIN | TcpFlags::ACK, b"");
    fwd(&mut e, 11, a, &fin, b, &mut ev);
    let finack = tcp(11, 10, 443, 40100, (9001, 1007), TcpFlags::FIN | TcpFlags::ACK, b"");
    fwd(&mut e, 12, b, &finack, a, &mut ev);
    let last = tcp(10, 11, 40100, 443, (1007, 9002), TcpFlags::ACK, b"");
    fwd(&mut e, 13, a, &last, b, &mut ev);
    let end = ev.iter().rfind(|x| matches!(x.kind, EventKind::End(_))).unwrap();
    // Initiator: SYN, ACK, data, FIN, last ACK; responder: SYN-ACK, FIN-ACK.
    assert_eq!((end.packets, end.reply_packets), (7, 2));
    assert_eq!(end.reply_bytes, (syn_ack_len() + finack.len()) as u64);
    let names: Vec<_> = end
        .rules
        .iter()
        .map(|r| r.map(|i| e.rule_info(i).unwrap().rule.to_string()))
        .collect();
    assert_eq!(names, [Some("web-https".to_string()), Some("web-https".to_string())]);
    assert_eq!(
        e.rule_info(end.rules[0].unwrap()).unwrap().level,
        palisade_policy::model::Level::Datacenter
    );
    assert_eq!(end.owners, [Some(a), Some(b)]);
    assert_eq!(end.policy_version, 1);

    // A denied flow makes exactly one Denied event, with the rule that denied it.
    let n = ev.len();
    let smtp = tcp(10, 11, 40101, 25, (1, 0), TcpFlags::SYN, b"");
    for t in 20..23 {
        assert_eq!(
            e.process(t, a, &smtp, &mut ev, &mut Results::new()),
            Disposition::Drop(DropReason::PolicyDeny)
        );
    }
    assert_eq!(ev.len(), n + 1, "later packets hit the cached verdict silently");
    let d = ev[n];
    assert_eq!(d.kind, EventKind::Denied(DropReason::PolicyDeny));
    assert_eq!(d.key.dst_port, 25);
    let rule = |i: Option<u32>| i.map(|i| e.rule_info(i).unwrap().rule.to_string());
    assert_eq!(rule(d.rules[0]).as_deref(), Some("default"));
}

fn syn_ack_len() -> usize {
    tcp(11, 10, 443, 40100, (100, 2), TcpFlags::SYN | TcpFlags::ACK, b"").len()
}

#[test]
fn appliance_ports_may_send_from_any_address_but_not_any_mac() {
    let (mut e, gw) = with_gateway(h1());
    let mut ev = Vec::new();
    let a = port(&e, "a.0");
    // The internet (203.0.113.10) reaches a's HTTPS through the router leg: decided by a's ingress chain.
    let inbound = |dport| {
        let ip = tcp_ip(
            Ipv4Addr::new(203, 0, 113, 10),
            ip(10),
            50000,
            dport,
            (1, 0),
            TcpFlags::SYN,
            b"",
        );
        eth(mac(0xfe), mac(10), None, EtherType::IPV4, &ip)
    };
    assert_eq!(
        e.process(1, gw, &inbound(443), &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::PolicyDeny)
    );
    // The same from a VM port is spoofing.
    let mut spoof = inbound(443);
    spoof[6..12].copy_from_slice(&mac(11));
    let b = port(&e, "b.0");
    assert_eq!(
        e.process(2, b, &spoof, &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::SpoofedIp)
    );
    // A's traffic to the internet through the router is allowed by web-out (a's egress chain).
    let out = tcp_ip(
        ip(10),
        Ipv4Addr::new(203, 0, 113, 10),
        40200,
        443,
        (1, 0),
        TcpFlags::SYN,
        b"",
    );
    fwd(
        &mut e,
        3,
        a,
        &eth(mac(10), mac(0xfe), None, EtherType::IPV4, &out),
        gw,
        &mut ev,
    );
    // The router leg's MAC is still checked.
    let mut wrong_mac = inbound(443);
    wrong_mac[6..12].copy_from_slice(&mac(0xfd));
    assert_eq!(
        e.process(4, gw, &wrong_mac, &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::SpoofedMac)
    );
}

fn with_gateway(mut e: Engine) -> (Engine, PortId) {
    let seg = e.vnic(port(&e, "a.0")).unwrap().segment;
    let gw = e
        .add_vnic(port::VnicPort {
            name: "edge-web".into(),
            vm: "edge".into(),
            mac: EthernetAddress(mac(0xfe)),
            ips: vec![],
            zone: "web".into(),
            segment: seg,
            group_id: 0,
            strict: false,
            max_conns: u32::MAX,
            any_source: true,
        })
        .unwrap();
    (e, gw)
}

/// A host with two workers hands each saved connection to one of them: the
/// filtered imports split the blob with nothing lost or doubled.
#[test]
fn a_saved_host_state_splits_between_workers() {
    let (_, blob) = two_connections_saved();
    let mut ev = Vec::new();
    let inet = IpAddr::V4(INTERNET_HOST);
    let to_internet = |k: &FlowKey| k.dst_addr() == inet || k.src_addr() == inet;
    let (mut w0, _) = with_gateway(h1());
    let (mut w1, _) = with_gateway(h1());
    assert_eq!(w0.import_all_where(&blob, 20, &mut ev, to_internet).unwrap(), 1);
    assert_eq!(w1.import_all_where(&blob, 20, &mut ev, |k| !to_internet(k)).unwrap(), 1);
    assert!(w0.conntrack().iter().all(|(_, c)| to_internet(&c.key)));
    assert!(w1.conntrack().iter().all(|(_, c)| !to_internet(&c.key)));
}

/// The internet host of [`two_connections_saved`].
const INTERNET_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

/// An engine with a connection from a to the internet through the router
/// leg and a VM-to-VM one, and its `export_all`.
fn two_connections_saved() -> (Engine, Vec<u8>) {
    let (mut e, gw) = with_gateway(h1());
    let mut ev = Vec::new();
    let a = port(&e, "a.0");
    let out = tcp_ip(ip(10), INTERNET_HOST, 40300, 443, (1, 0), TcpFlags::SYN, b"");
    fwd(
        &mut e,
        1,
        a,
        &eth(mac(10), mac(0xfe), None, EtherType::IPV4, &out),
        gw,
        &mut ev,
    );
    handshake(&mut e, &mut ev, 40301, 443, 2);
    let blob = e.export_all(10);
    (e, blob)
}

#[test]
fn a_restart_keeps_every_connection_including_transit_ones() {
    let (mut e, blob) = two_connections_saved();
    let mut ev = Vec::new();
    let a = port(&e, "a.0");
    let inet = INTERNET_HOST;
    assert!(e.export_vnic(a, 10, false, &mut ev).is_some());

    let (mut fresh, gw2) = with_gateway(h1());
    assert_eq!(fresh.import_all(&blob, 20, &mut ev).unwrap(), 2);
    let vnic_blob = e.export_vnic(a, 10, false, &mut ev).unwrap();
    assert!(
        fresh.import_all(&vnic_blob, 20, &mut ev).is_err(),
        "a vNIC blob is not a host blob"
    );
    assert!(
        fresh.import_vnic(a, &blob, 20, &mut ev).is_err(),
        "and the other way round"
    );
    // The internet's reply comes back through the router: part of the saved connection, not classified.
    let before = fresh.counters().classifications;
    let reply = tcp_ip(inet, ip(10), 443, 40300, (500, 2), TcpFlags::SYN | TcpFlags::ACK, b"");
    fwd(
        &mut fresh,
        21,
        gw2,
        &eth(mac(0xfe), mac(10), None, EtherType::IPV4, &reply),
        a,
        &mut ev,
    );
    let b = port(&fresh, "b.0");
    let data = tcp(11, 10, 443, 40301, (9001, 1001), TcpFlags::ACK, b"x");
    fwd(&mut fresh, 22, b, &data, a, &mut ev);
    assert_eq!(fresh.counters().classifications, before);
}

#[test]
fn a_routed_flow_is_one_connection_classified_once_and_counted_once() {
    // Two zones on one host and a router appliance with a leg in each: a
    // VM-to-VM flow between zones crosses the switch twice (VM → router,
    // router → VM). Both legs are one connection in the routing domain.
    let text = r#"
version: 1
datacenter: { name: dc1, default: deny }
zones: [{ name: web, vlan: 100 }, { name: app, vlan: 200 }]
vms:
  - { name: w, uuid: 00000000-0000-4000-8000-00000000000a, host: h1, vnics: [{ name: w.0, mac: "02:00:00:00:00:0a", ips: [10.0.1.10], zone: web }] }
  - { name: p, uuid: 00000000-0000-4000-8000-00000000000b, host: h1, vnics: [{ name: p.0, mac: "02:00:00:00:00:0b", ips: [10.0.2.11], zone: app }] }
groups: { web: { zone: web }, app: { zone: app } }
rules:
  datacenter:
    - { id: web-to-app, from: web, to: app, service: tcp/8080, action: allow }
"#;
    let mut e = host(compile_mem(text.to_string()), "h1", 1, &[], |_| {});
    let mut ev = Vec::new();
    let (w, p) = (port(&e, "w.0"), port(&e, "p.0"));
    let leg = |e: &mut Engine, zone: &str, last: u8| {
        let segment = e.vnic(if zone == "web" { w } else { p }).unwrap().segment;
        e.add_vnic(port::VnicPort {
            name: format!("gw-{zone}"),
            vm: "router".into(),
            mac: EthernetAddress(mac(last)),
            ips: vec![],
            zone: zone.into(),
            segment,
            group_id: 0,
            strict: false,
            max_conns: u32::MAX,
            any_source: true,
        })
        .unwrap()
    };
    let (gw_web, gw_app) = (leg(&mut e, "web", 0xfe), leg(&mut e, "app", 0xfd));
    let (wip, pip) = (Ipv4Addr::new(10, 0, 1, 10), Ipv4Addr::new(10, 0, 2, 11));
    let syn = tcp_ip(wip, pip, 40000, 8080, (1, 0), TcpFlags::SYN, b"");
    let synack = tcp_ip(pip, wip, 8080, 40000, (100, 2), TcpFlags::SYN | TcpFlags::ACK, b"");
    // SYN: w → router (web leg), router → p (app leg).
    fwd(
        &mut e,
        1,
        w,
        &eth(mac(10), mac(0xfe), None, EtherType::IPV4, &syn),
        gw_web,
        &mut ev,
    );
    fwd(
        &mut e,
        2,
        gw_app,
        &eth(mac(0xfd), mac(11), None, EtherType::IPV4, &syn),
        p,
        &mut ev,
    );
    // SYN-ACK: p → router (app leg), router → w (web leg).
    fwd(
        &mut e,
        3,
        p,
        &eth(mac(11), mac(0xfd), None, EtherType::IPV4, &synack),
        gw_app,
        &mut ev,
    );
    fwd(
        &mut e,
        4,
        gw_web,
        &eth(mac(0xfe), mac(10), None, EtherType::IPV4, &synack),
        w,
        &mut ev,
    );
    assert_eq!(e.counters().classifications, 1, "one evaluation for both legs");
    assert_eq!(e.conntrack().len(), 1, "one connection");
    let starts = ev.iter().filter(|x| x.kind == EventKind::Start).count();
    assert_eq!(starts, 1);
    let (_, conn) = e.conntrack().iter().next().unwrap();
    assert_eq!((conn.packets, conn.reply_packets), (2, 1), "each packet counted once");
    assert_eq!(e.rule_tally("web-to-app").packets, 2);
    // The internet through the same router is not a second leg: it is decided and counted.
    let inet = tcp_ip(
        Ipv4Addr::new(203, 0, 113, 9),
        pip,
        50000,
        8080,
        (1, 0),
        TcpFlags::SYN,
        b"",
    );
    assert_eq!(
        e.process(
            5,
            gw_app,
            &eth(mac(0xfd), mac(11), None, EtherType::IPV4, &inet),
            &mut ev,
            &mut Results::new()
        ),
        Disposition::Drop(DropReason::PolicyDeny)
    );
    assert_eq!(e.counters().classifications, 2);
}

/// `process_batch` is an optimisation only: with enough flows cached that it
/// looks ahead, over a stream that opens, hits, denies, spoofs, cuts and
/// re-opens flows, in batches that do and do not fill its look-ahead groups,
/// every disposition, output, rendered frame, event and counter equals
/// frame-by-frame processing.
#[test]
fn batch_processing_matches_frame_by_frame() {
    let (a, b) = (10, 11);
    let mut from_a = Vec::new();
    for i in 0..40u16 {
        from_a.push(udp(a, b, 5000 + i % 7, 53));
        from_a.push(tcp(
            a,
            b,
            40000 + i % 5,
            443,
            (1000 + u32::from(i), 0),
            TcpFlags::SYN,
            b"",
        ));
        from_a.push(tcp(a, b, 41000 + i % 3, 22 + i % 2, (7, 0), TcpFlags::SYN, b""));
        if i % 9 == 0 {
            from_a.push(udp(b, a, 5000, 53)); // spoofed: b's MAC from a's port
            from_a.push(arp_frame(mac(a), ip(a), ip(b)));
            from_a.push(udp(a, b, 5000, 53)[..30].to_vec()); // truncated
            from_a.push(icmp(a, b, 8, 0, [0, 1, 0, u8::try_from(i).unwrap()], b"ping"));
        }
    }
    let from_b: Vec<Vec<u8>> = (0..7).map(|i| udp(b, a, 53, 5000 + i)).collect();
    let run = |batched: bool| {
        let mut e = h1();
        let (pa, pb) = (port(&e, "a.0"), port(&e, "b.0"));
        let mut ev = Vec::new();
        let mut seen = Vec::new();
        let mut results = Results::new();
        let mut record = |p: &Processed<'_>| {
            let outs: Vec<_> = p.outputs.iter().map(|o| (*o, render_one(p, o))).collect();
            seen.push((p.disposition, outs));
        };
        // A warm cache (denied flows), so that looking ahead finds entries
        // (the default flow-cache capacity is past the look-ahead threshold).
        for p in 0..8300u16 {
            let syn = tcp(a, b, 10_000 + p, 25, (1, 0), TcpFlags::SYN, b"");
            assert_eq!(
                e.process(0, pa, &syn, &mut ev, &mut Results::new()),
                Disposition::Drop(DropReason::PolicyDeny)
            );
        }
        let mut t = 0;
        for (round, size) in [5usize, 17, 1, 40, 3, 1000].into_iter().enumerate() {
            t += 10 * MS;
            if round == 3 {
                // A policy change between batches: cached verdicts go stale.
                e.update_policy(Box::new(PolicyLookup::new(compile_mem(policy(false)))));
            }
            let start = (round * 13) % from_a.len();
            let chunk: Vec<&[u8]> = from_a.iter().cycle().skip(start).take(size).map(|f| &f[..]).collect();
            for (p, frames) in [
                (pa, &chunk[..]),
                (pb, &from_b.iter().map(|f| &f[..]).collect::<Vec<_>>()[..]),
            ] {
                if batched {
                    e.process_batch(t, p, frames, &mut ev, &mut results);
                    assert_eq!(results.len(), frames.len());
                    results.iter(frames).for_each(|p| record(&p));
                } else {
                    for f in frames {
                        record(&e.process(t, p, f, &mut ev, &mut results));
                    }
                }
            }
        }
        (
            seen,
            ev,
            e.counters().clone(),
            e.rule_tally("web-dns"),
            e.port_tally(pa),
        )
    };
    let (one, many) = (run(false), run(true));
    assert!(one.0.iter().any(|(d, _)| *d == Disposition::Forward));
    assert!(
        one.0
            .iter()
            .any(|(d, _)| *d == Disposition::Drop(DropReason::SpoofedMac))
    );
    assert!(one.2.cache_hits > 100, "the stream exercises the cache: {:?}", one.2);
    assert_eq!(one.0.len(), many.0.len());
    for (i, (x, y)) in one.0.iter().zip(&many.0).enumerate() {
        assert_eq!(x, y, "frame {i}");
    }
    assert_eq!(one.1, many.1, "events");
    assert_eq!(one.2, many.2, "counters");
    assert_eq!((one.3, one.4), (many.3, many.4), "tallies");
}

fn render_one(p: &Processed<'_>, o: &Output) -> Vec<u8> {
    let mut buf = vec![0; 2048];
    let n = render(p, o, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

#[test]
fn a_flow_follows_its_peer_mac_to_another_host() {
    // A cached flow's packets skip the MAC table while their port's last
    // destination still holds; a MAC that moves (VM c migrated from h2 to a
    // third host) must take the flow's next packet with it.
    let c = compile_mem(policy(true));
    let mut h1 = host(c.clone(), "h1", 1, &[], |_| {});
    let mut h2 = host(c, "h2", 2, &[], |_| {});
    let mut ev = Vec::new();
    let a = port(&h1, "a.0");
    let cc = port(&h2, "c.0");
    let arp = arp_frame(mac(12), ip(12), ip(10));
    let seen = run(&mut h2, 0, cc, &arp, &mut ev);
    assert_eq!(seen, Disposition::Forward);
    let (_, announce) = seen.overlay0();
    let (h2_ip, h3_ip) = (Ipv4Addr::new(192, 168, 0, 2), Ipv4Addr::new(192, 168, 0, 3));
    assert_eq!(
        h1.process_overlay(1, h2_ip, &announce, &mut ev, &mut Results::new()),
        Disposition::Forward
    );
    let remote_of = |s: &Seen| s.outputs.first().and_then(|o| o.encap).map(|enc| enc.remote);
    let send = |e: &mut Engine, t: u64, _: u32| run(e, t, a, &udp(10, 12, 40030, 53), &mut Vec::new());
    let sent = send(&mut h1, 2, 1);
    assert_eq!(sent, Disposition::Forward);
    assert_eq!(remote_of(&sent), Some(h2_ip));
    let sent = send(&mut h1, 3, 2);
    assert_eq!(sent, Disposition::Forward);
    assert_eq!(remote_of(&sent), Some(h2_ip), "still on h2");
    // c's MAC now arrives from h3: the next packet of the cached flow goes there.
    assert_eq!(
        h1.process_overlay(4, h3_ip, &announce, &mut ev, &mut Results::new()),
        Disposition::Forward
    );
    let hits = h1.counters().cache_hits;
    let sent = send(&mut h1, 5, 3);
    assert_eq!(sent, Disposition::Forward);
    assert_eq!(h1.counters().cache_hits, hits + 1, "a cached flow");
    assert_eq!(remote_of(&sent), Some(h3_ip), "followed the move");
    // And a frame to a MAC nobody has announced is flooded, not sent to c's host.
    let mut stranger = udp(10, 12, 40030, 53);
    stranger[..6].copy_from_slice(&mac(99));
    let (flooded, encapsulated) = (h1.counters().flooded, h1.counters().encapsulated);
    assert_eq!(
        h1.process(6, a, &stranger, &mut ev, &mut Results::new()),
        Disposition::Forward
    );
    assert_eq!(h1.counters().flooded, flooded + 1);
    assert_eq!(h1.counters().encapsulated, encapsulated, "not sent to one host");
}

#[test]
fn a_frame_with_nowhere_to_go_opens_no_connection() {
    // Found by the engine fuzz target: a VM addressing itself through the
    // switch (its own MAC and IP) had a connection opened, charged twice
    // against its limit, for frames that were then dropped as going back
    // out of their own port.
    let mut e = h1();
    let a = port(&e, "a.0");
    let mut ev = Vec::new();
    for sport in 0..3 {
        let own = tcp(10, 10, 40_000 + sport, 443, (1, 0), TcpFlags::SYN, b"");
        assert_eq!(
            e.process(0, a, &own, &mut ev, &mut Results::new()),
            Disposition::Drop(DropReason::NoRoute)
        );
    }
    assert_eq!(e.conntrack().len(), 0, "no connection for frames that never left");
    assert_eq!(e.counters().classifications, 0);
    assert!(ev.is_empty(), "{ev:?}");
}

#[test]
fn a_frame_towards_a_quiesced_vnic_opens_no_connection_until_it_resumes() {
    // Found by the live-migration lab test: after a VM moved away, a peer
    // that had not yet learned its new host kept sending to the old one,
    // whose engine opened a connection for frames the agent then discarded
    // at the quiesced port: stale state left behind on the source.
    let mut e = h1();
    let (a, b) = (port(&e, "a.0"), port(&e, "b.0"));
    let mut ev = Vec::new();
    assert!(e.set_port_quiesced(b, true));
    assert!(e.is_quiesced(b) && !e.is_quiesced(a));
    let syn = tcp(10, 11, 40_000, 22, (1000, 0), TcpFlags::SYN, b"");
    assert_eq!(
        run(&mut e, 0, a, &syn, &mut ev),
        Disposition::Drop(DropReason::VnicMigrating)
    );
    assert_eq!(e.conntrack().len(), 0, "nothing opened towards the quiesced port");
    assert_eq!(e.counters().classifications, 0);
    assert_eq!(e.counters().drops[DropReason::VnicMigrating.index()], 1);
    assert!(ev.is_empty(), "{ev:?}");
    // Resumed (a migration that failed): the same flow opens as usual.
    assert!(e.set_port_quiesced(b, false));
    handshake(&mut e, &mut ev, 40_000, 22, 10);
    assert_eq!(e.conntrack().len(), 1);
    // An unknown port is refused, not grown into.
    assert!(!e.set_port_quiesced(PortId(999), true));
}

/// Host h2's engine under `c` with a.0 (strict zone) and b.0 attached:
/// where a.0 arrives in a migration.
fn destination(c: Compiler) -> (Engine, PortId, PortId) {
    let model = c.model().clone();
    let mut dst = Engine::new(EngineConfig::new(uplink(2)), Box::new(PolicyLookup::new(c)));
    let a2 = dst
        .add_vnic(port::vnic_from_model(&model, "a.0", &["web".into()], 100).unwrap())
        .unwrap();
    let b2 = dst
        .add_vnic(port::vnic_from_model(&model, "b.0", &["web".into()], 100).unwrap())
        .unwrap();
    (dst, a2, b2)
}

#[test]
fn a_connection_a_policy_change_revokes_before_the_export_stays_revoked_after_the_import() {
    let mut src = h1();
    let mut ev = Vec::new();
    handshake(&mut src, &mut ev, 40010, 22, 0);
    handshake(&mut src, &mut ev, 40011, 443, 0);
    // The new policy drops ssh; neither connection has had a packet since.
    src.update_policy(Box::new(PolicyLookup::new(compile_mem(policy(false)))));
    let a = port(&src, "a.0");
    let blob = src.export_vnic(a, 100, false, &mut ev).unwrap();
    let changes = src.export_vnic_changes(a, 100, None).unwrap();
    assert_eq!(changes.policy_version, 2);
    assert!(changes.conns.iter().all(|c| c.revalidate), "{:?}", changes.conns);
    // The destination runs the new policy too: the blob says version 2,
    // but neither verdict was reached under it, so both are decided again.
    let (mut dst, a2, b2) = destination(compile_mem(policy(false)));
    assert_eq!(dst.import_vnic(a2, &blob, 5_000, &mut ev), Ok(2));
    let ssh = tcp(10, 11, 40010, 22, (1001, 9001), TcpFlags::ACK | TcpFlags::PSH, b"ls");
    assert_eq!(
        dst.process(5_001, a2, &ssh, &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::PolicyRevoked)
    );
    let https = tcp(10, 11, 40011, 443, (1001, 9001), TcpFlags::ACK | TcpFlags::PSH, b"GET");
    fwd(&mut dst, 5_002, a2, &https, b2, &mut ev);
}

#[test]
fn a_delta_holds_what_was_created_changed_or_removed_since_the_precopy() {
    let mut src = h1();
    let mut ev = Vec::new();
    let (a, b) = (port(&src, "a.0"), port(&src, "b.0"));
    handshake(&mut src, &mut ev, 40030, 443, 0); // advances after the pre-copy
    handshake(&mut src, &mut ev, 40031, 443, 0); // untouched
    handshake(&mut src, &mut ev, 40033, 22, 0); // revoked (removed) after the pre-copy
    let pre = src.export_vnic_changes(a, 10, None).unwrap();
    assert!(pre.full && pre.removed.is_empty());
    assert_eq!(pre.conns.len(), 3);
    assert!(pre.conns.iter().all(|c| !c.revalidate));
    // Nothing happened: an empty delta.
    let none = src.export_vnic_changes(a, 11, Some(pre.mark)).unwrap();
    assert!(
        !none.full && none.conns.is_empty() && none.removed.is_empty(),
        "{none:?}"
    );

    let data = tcp(10, 11, 40030, 443, (1001, 9001), TcpFlags::ACK | TcpFlags::PSH, b"more");
    fwd(&mut src, 20, a, &data, b, &mut ev);
    handshake(&mut src, &mut ev, 40035, 443, 21);
    src.update_policy(Box::new(PolicyLookup::new(compile_mem(policy(false)))));
    let ssh = tcp(10, 11, 40033, 22, (1001, 9001), TcpFlags::ACK | TcpFlags::PSH, b"ls");
    assert_eq!(
        src.process(22, a, &ssh, &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::PolicyRevoked)
    );
    // The delta is taken against the pre-copy's mark, not the empty one's.
    let delta = src.export_vnic_changes(a, 30, Some(pre.mark)).unwrap();
    assert!(!delta.full);
    assert_eq!(delta.policy_version, 2);
    let mut ports: Vec<u16> = delta.conns.iter().map(|c| c.key.src_port).collect();
    ports.sort_unstable();
    assert_eq!(ports, [40030, 40035]);
    let advanced = delta.conns.iter().find(|c| c.key.src_port == 40030).unwrap();
    assert_eq!(advanced.tcp.peers[0].end, 1005, "the window state moved on");
    assert_eq!(delta.removed.iter().map(|k| k.src_port).collect::<Vec<_>>(), [40033]);
    // Connections of another vNIC are in neither.
    assert!(
        src.export_vnic_changes(b, 31, Some(delta.mark))
            .unwrap()
            .conns
            .is_empty()
    );
    // Once the migration is over the removals are no longer kept: a later
    // delta cannot be told apart from a pre-copy and comes back whole.
    src.end_vnic_changes();
    let whole = src.export_vnic_changes(a, 40, Some(delta.mark)).unwrap();
    assert!(whole.full);
    assert_eq!(whole.conns.len(), 3);
}

/// Process `frame` from `port` with `sink`: its disposition and output ports.
fn go(
    e: &mut Engine,
    port: PortId,
    frame: &[u8],
    sink: &mut dyn palisade_datapath::EventSink,
) -> (Disposition, Vec<PortId>) {
    let mut results = Results::new();
    let p = e.process(0, port, frame, sink, &mut results);
    (p.disposition, p.outputs.iter().map(|o| o.port).collect())
}

/// Keeps the announcements (and drops flow events).
#[derive(Default)]
struct Announced(Vec<palisade_datapath::announce::Announcement>);

impl palisade_datapath::EventSink for Announced {
    fn event(&mut self, _: &FlowEvent) {}
    fn announced(&mut self, a: &palisade_datapath::announce::Announcement) {
        self.0.push(*a);
    }
}

/// QEMU's post-migration announce for `mac`: broadcast RARP request, 60 bytes.
fn rarp_frame(src: [u8; 6], announced: [u8; 6]) -> Vec<u8> {
    let repr = ArpRepr {
        operation: Operation::REVERSE_REQUEST,
        source_hardware_addr: EthernetAddress(announced),
        source_protocol_addr: Ipv4Addr::UNSPECIFIED,
        target_hardware_addr: EthernetAddress(announced),
        target_protocol_addr: Ipv4Addr::UNSPECIFIED,
    };
    let mut a = vec![0; 46];
    repr.emit(&mut arp::Packet::new_unchecked(&mut a[..]));
    eth(src, [0xff; 6], None, EtherType::RARP, &a)
}

#[test]
fn a_guests_announcement_is_reported_switched_and_never_for_another_mac() {
    use palisade_datapath::announce::AnnounceKind;
    let mut e = h1();
    let (a, b) = (port(&e, "a.0"), port(&e, "b.0"));
    let mut sink = Announced::default();
    let before = e.counters().clone();

    // QEMU's RARP from a's vNIC: reported, and flooded like ARP so switches learn.
    let p = go(&mut e, a, &rarp_frame(mac(10), mac(10)), &mut sink);
    assert_eq!(p.0, Disposition::Forward);
    assert_eq!(p.1, vec![b, UPLINK]);
    // A gratuitous ARP for a's own address: reported too.
    let p = go(&mut e, a, &arp_frame(mac(10), ip(10), ip(10)), &mut sink);
    assert_eq!(p.0, Disposition::Forward);
    // An ordinary ARP request: switched, not an announcement.
    let p = go(&mut e, a, &arp_frame(mac(10), ip(10), ip(11)), &mut sink);
    assert_eq!(p.0, Disposition::Forward);
    assert_eq!(
        sink.0,
        [
            palisade_datapath::announce::Announcement {
                port: a,
                mac: EthernetAddress(mac(10)),
                kind: AnnounceKind::Rarp
            },
            palisade_datapath::announce::Announcement {
                port: a,
                mac: EthernetAddress(mac(10)),
                kind: AnnounceKind::Garp
            },
        ]
    );

    // a announcing b's MAC (inside the RARP, its own on the frame): spoofed, nothing reported.
    sink.0.clear();
    let p = go(&mut e, a, &rarp_frame(mac(10), mac(11)), &mut sink);
    assert_eq!(p.0, Disposition::Drop(DropReason::SpoofedArp));
    // A gratuitous ARP for b's address from a: spoofed.
    let p = go(&mut e, a, &arp_frame(mac(10), ip(11), ip(11)), &mut sink);
    assert_eq!(p.0, Disposition::Drop(DropReason::SpoofedArp));
    // A RARP that is no announcement (a reply) stays unsupported.
    let mut reply = rarp_frame(mac(10), mac(10));
    reply[21] = 4;
    let p = go(&mut e, a, &reply, &mut sink);
    assert_eq!(p.0, Disposition::Drop(DropReason::UnsupportedEthertype));
    // From the uplink a RARP is not this host's guest announcing itself.
    let p = go(&mut e, UPLINK, &rarp_frame(mac(12), mac(12)), &mut sink);
    assert!(matches!(p.0, Disposition::Drop(_)), "{:?}", p.0);
    assert!(sink.0.is_empty(), "{:?}", sink.0);
    // Counted per port for callers that poll.
    assert_eq!(e.announcements(a), (2, Some(AnnounceKind::Garp)));
    assert_eq!(e.announcements(b), (0, None));
    let after = e.counters().clone();
    assert_eq!(delta(&before, &after, |c| c.dropped(DropReason::SpoofedArp)), 2);
}

#[test]
fn an_announcement_on_a_standby_port_quiesces_it_at_once() {
    let mut e = h1();
    let (a, b) = (port(&e, "a.0"), port(&e, "b.0"));
    let mut sink = Announced::default();
    assert!(e.set_port_standby(a, true));
    assert!(!e.set_port_standby(UPLINK, true), "only vNIC ports");
    // Before the announcement the port forwards as usual.
    let f = arp_frame(mac(10), ip(10), ip(11));
    assert_eq!(run(&mut e, 0, a, &f, &mut Vec::new()), Disposition::Forward);
    assert!(!e.is_quiesced(a));
    // The guest's RARP: switched (the network learns where it is), reported,
    // and from then on nothing from or to the port is decided.
    let p = go(&mut e, a, &rarp_frame(mac(10), mac(10)), &mut sink);
    assert_eq!(p.0, Disposition::Forward);
    assert_eq!(sink.0.len(), 1);
    assert!(e.is_quiesced(a) && !e.is_standby(a));
    let from_guest = tcp(10, 11, 1000, 443, (1, 0), TcpFlags::SYN, b"");
    assert_eq!(
        go(&mut e, a, &from_guest, &mut Vec::new()).0,
        Disposition::Drop(DropReason::VnicMigrating)
    );
    let to_guest = tcp(11, 10, 2000, 443, (1, 0), TcpFlags::SYN, b"");
    assert_eq!(
        go(&mut e, b, &to_guest, &mut Vec::new()).0,
        Disposition::Drop(DropReason::VnicMigrating)
    );
    assert_eq!(e.conntrack().len(), 0, "nothing opened while held");
    // Resumed (the state arrived): it forwards, and a later announcement holds nothing.
    e.set_port_quiesced(a, false);
    assert_eq!(run(&mut e, 0, a, &from_guest, &mut Vec::new()), Disposition::Forward);
    let _ = go(&mut e, a, &rarp_frame(mac(10), mac(10)), &mut sink);
    assert!(!e.is_quiesced(a));
    // A port not standby is never held by an announcement.
    let _ = go(&mut e, b, &rarp_frame(mac(11), mac(11)), &mut sink);
    assert!(!e.is_quiesced(b));
}

/// A small deterministic generator (xorshift64*), so a failing seed replays.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// What a connection is, less its change stamp: what a delta must carry when it differs.
fn essence(c: &palisade_datapath::Conn) -> String {
    let mut c = c.clone();
    c.changed = 0;
    format!("{c:?}")
}

/// Random opens, data, resets and evictions (a small table) between a
/// pre-copy and its deltas: each delta holds exactly the vNIC's connections
/// a walk of the whole table finds changed since the mark (the change log
/// is a shortcut, never another answer), every connection that differs from
/// the pre-copy's or is new is among them, and every key the pre-copy held
/// that is gone is among the removed.
#[test]
fn a_delta_holds_exactly_the_connections_changed_since_its_mark() {
    use std::collections::{HashMap, HashSet};
    for seed in 1..=40u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut e = host(compile_mem(policy(true)), "h1", 1, &[], |cfg| cfg.conn_capacity = 24);
        let mut ev = Vec::new();
        let (a, b) = (port(&e, "a.0"), port(&e, "b.0"));
        let mut sports: Vec<u16> = Vec::new();
        let mut now = 0u64;
        let mut op = |e: &mut Engine, rng: &mut Rng, sports: &mut Vec<u16>, now: &mut u64| {
            *now += 3;
            let t = *now;
            let pick = |rng: &mut Rng, s: &[u16]| s[rng.below(s.len() as u64) as usize];
            match rng.below(6) {
                0 | 1 => {
                    let sp = 30_000 + rng.below(60) as u16;
                    run(e, t, a, &tcp(10, 11, sp, 443, (1000, 0), TcpFlags::SYN, b""), &mut ev);
                    let synack = tcp(11, 10, 443, sp, (9000, 1001), TcpFlags::SYN | TcpFlags::ACK, b"");
                    run(e, t + 1, b, &synack, &mut ev);
                    run(
                        e,
                        t + 2,
                        a,
                        &tcp(10, 11, sp, 443, (1001, 9001), TcpFlags::ACK, b""),
                        &mut ev,
                    );
                    sports.push(sp);
                }
                2 | 3 if !sports.is_empty() => {
                    let sp = pick(rng, sports);
                    let data = tcp(10, 11, sp, 443, (1001, 9001), TcpFlags::ACK | TcpFlags::PSH, b"more");
                    run(e, t, a, &data, &mut ev);
                }
                4 if !sports.is_empty() => {
                    let sp = pick(rng, sports);
                    run(
                        e,
                        t,
                        a,
                        &tcp(10, 11, sp, 443, (1005, 9001), TcpFlags::RST, b""),
                        &mut ev,
                    );
                }
                _ => {}
            }
        };
        for _ in 0..30 {
            op(&mut e, &mut rng, &mut sports, &mut now);
        }
        let pre = e.export_vnic_changes(a, now, None).unwrap();
        assert!(pre.full);
        let before: HashMap<FlowKey, String> = e.conntrack().iter().map(|(_, c)| (c.key, essence(c))).collect();
        let mut mark = pre.mark;
        for round in 0..4 {
            for _ in 0..rng.below(25) {
                op(&mut e, &mut rng, &mut sports, &mut now);
            }
            // Against the pre-copy's mark in the first round, the previous delta's after.
            let since = mark;
            let walked: HashSet<FlowKey> = e
                .conntrack()
                .iter()
                .filter(|(_, c)| c.changed > since && c.owners.contains(&Some(a)))
                .map(|(_, c)| c.key)
                .collect();
            let delta = e.export_vnic_changes(a, now, Some(since)).unwrap();
            assert!(!delta.full, "seed {seed} round {round}: the log kept up");
            let got: HashSet<FlowKey> = delta.conns.iter().map(|c| c.key).collect();
            assert_eq!(got.len(), delta.conns.len(), "seed {seed}: a connection twice");
            assert_eq!(got, walked, "seed {seed} round {round}");
            if round == 0 {
                for (_, c) in e.conntrack().iter() {
                    if before.get(&c.key) != Some(&essence(c)) {
                        assert!(
                            got.contains(&c.key),
                            "seed {seed}: {:?} changed, not in the delta",
                            c.key
                        );
                    }
                }
                let removed: HashSet<FlowKey> = delta.removed.iter().copied().collect();
                for k in before.keys() {
                    if e.conntrack().find(k).is_none() {
                        assert!(removed.contains(k), "seed {seed}: {k:?} gone, not removed");
                    }
                }
            }
            mark = delta.mark;
        }
        e.end_vnic_changes();
    }
}

/// A guest that left with its state leaves its port quiesced here (for
/// stragglers); if it comes back through a migration made without the
/// controller, its announcement is still counted (and the frame dropped),
/// so the agent reports the arrival; nothing else on the port is, nor an
/// announcement for another MAC.
#[test]
fn a_quiesced_ports_guest_announcing_itself_is_counted_and_dropped() {
    let mut e = h1();
    let (a, b) = (port(&e, "a.0"), port(&e, "b.0"));
    let mut sink = Announced::default();
    assert!(e.set_port_quiesced(a, true));
    let p = go(&mut e, a, &rarp_frame(mac(10), mac(10)), &mut sink);
    assert_eq!(p.0, Disposition::Drop(DropReason::VnicMigrating));
    assert_eq!(e.announcements(a).0, 1);
    let p = go(&mut e, a, &arp_frame(mac(10), ip(10), ip(10)), &mut sink);
    assert_eq!(p.0, Disposition::Drop(DropReason::VnicMigrating));
    assert_eq!(e.announcements(a).0, 2);
    // Another MAC's RARP, an ordinary ARP request, a TCP segment: not announcements.
    go(&mut e, a, &rarp_frame(mac(10), mac(11)), &mut sink);
    go(&mut e, a, &rarp_frame(mac(11), mac(11)), &mut sink);
    go(&mut e, a, &arp_frame(mac(10), ip(10), ip(11)), &mut sink);
    go(
        &mut e,
        a,
        &tcp(10, 11, 40000, 443, (1000, 0), TcpFlags::SYN, b""),
        &mut sink,
    );
    assert_eq!(e.announcements(a).0, 2);
    assert_eq!(sink.0.len(), 2);
    assert_eq!(e.announcements(b).0, 0);
    assert_eq!(e.conntrack().len(), 0, "nothing opened from the quiesced port");
}

/// What a kernel fast path forwarded, folded in (`fold_kernel_forwarded`),
/// leaves the connection, its rule, its port and the engine counted as if
/// the engine had forwarded those packets itself; the kernel's TCP marks
/// move the tracker on, so the next segment (back in user space) is in
/// its window; a fold for a connection that is gone is refused.
#[test]
fn kernel_forwarded_packets_fold_in_as_if_the_engine_had_seen_them() {
    let mut seen = h1();
    let mut folded = h1();
    let mut ev = Vec::new();
    handshake(&mut seen, &mut ev, 40000, 443, 0);
    handshake(&mut folded, &mut ev, 40000, 443, 0);
    let (a, b) = (port(&seen, "a.0"), port(&seen, "b.0"));
    // Three data segments server -> client: the engine forwards them on
    // `seen`; on `folded` the kernel does, and the agent folds its counts.
    let mut bytes = 0;
    for i in 0..3u32 {
        let f = tcp(
            11,
            10,
            443,
            40000,
            (9001 + i * 100, 1001),
            TcpFlags::ACK | TcpFlags::PSH,
            &[7; 100],
        );
        bytes += f.len() as u64;
        fwd(&mut seen, (10 + u64::from(i)) * MS, b, &f, a, &mut ev);
    }
    let before = folded.counters().clone();
    let key_of = |frame: &[u8]| palisade_wire::flow::extract(frame).unwrap().unwrap().key;
    let key = key_of(&tcp(11, 10, 443, 40000, (0, 0), TcpFlags::ACK, b""));
    let forwarded = palisade_datapath::KernelForwarded {
        packets: 3,
        bytes,
        last_seen: 12 * MS,
        tcp: Some(palisade_datapath::KernelTcpMarks {
            seq_end: 9301,
            ack: 1001,
            limit: 1001 + 65535,
            max_win: 65535,
        }),
    };
    assert!(folded.fold_kernel_forwarded(b, &key, &forwarded));
    let conn = |e: &Engine| e.conntrack().iter().next().unwrap().1.clone();
    let (s, f) = (conn(&seen), conn(&folded));
    assert_eq!(
        (f.packets, f.bytes, f.reply_packets, f.reply_bytes, f.last_seen),
        (s.packets, s.bytes, s.reply_packets, s.reply_bytes, s.last_seen)
    );
    assert_eq!(f.tcp.peers[1].end, s.tcp.peers[1].end, "the server's sequence end");
    assert_eq!(
        folded.rule_tally("web-https").packets,
        seen.rule_tally("web-https").packets
    );
    assert_eq!(folded.rule_tally("web-https").bytes, seen.rule_tally("web-https").bytes);
    assert_eq!(folded.port_tally(b).packets, seen.port_tally(b).packets);
    assert_eq!(folded.port_tally(b).bytes, seen.port_tally(b).bytes);
    assert_eq!(delta(&before, folded.counters(), |c| c.forwarded), 3);
    // The next segment, in user space again, continues where the kernel left off.
    fwd(
        &mut folded,
        13 * MS,
        b,
        &tcp(
            11,
            10,
            443,
            40000,
            (9301, 1001),
            TcpFlags::ACK | TcpFlags::PSH,
            &[7; 100],
        ),
        a,
        &mut ev,
    );
    // No such connection: nothing to fold into.
    let other = key_of(&tcp(11, 10, 443, 40001, (0, 0), TcpFlags::ACK, b""));
    assert!(!folded.fold_kernel_forwarded(b, &other, &forwarded));
}

/// In a strict zone, a stream the kernel carried far past the tracker's
/// window continues in user space once the kernel's marks of both
/// directions are folded in; without them the same segment is out of window.
#[test]
fn kernel_tcp_marks_keep_a_strict_zone_s_window_with_the_stream() {
    let key_of = |frame: &[u8]| palisade_wire::flow::extract(frame).unwrap().unwrap().key;
    let far = 9001u32 + 3_000_000;
    let next = tcp(
        11,
        10,
        443,
        40000,
        (far, 1001),
        TcpFlags::ACK | TcpFlags::PSH,
        &[7; 100],
    );
    for fold in [true, false] {
        let mut e = host(compile_mem(policy(true)), "h1", 1, &["web"], |_| {});
        let mut ev = Vec::new();
        handshake(&mut e, &mut ev, 40000, 443, 0);
        let (a, b) = (port(&e, "a.0"), port(&e, "b.0"));
        if fold {
            let server = key_of(&tcp(11, 10, 443, 40000, (0, 0), TcpFlags::ACK, b""));
            let client = key_of(&tcp(10, 11, 40000, 443, (0, 0), TcpFlags::ACK, b""));
            let marks = |seq_end, ack| palisade_datapath::KernelForwarded {
                packets: 1,
                bytes: 66,
                last_seen: 5 * MS,
                tcp: Some(palisade_datapath::KernelTcpMarks {
                    seq_end,
                    ack,
                    limit: ack.wrapping_add(65535),
                    max_win: 65535,
                }),
            };
            assert!(e.fold_kernel_forwarded(b, &server, &marks(far, 1001)));
            assert!(e.fold_kernel_forwarded(a, &client, &marks(1001, far)));
        }
        let d = e.process(10 * MS, b, &next, &mut ev, &mut Results::new()).disposition;
        if fold {
            assert_eq!(d, Disposition::Forward);
        } else {
            assert_eq!(d, Disposition::Drop(DropReason::TcpOutOfWindow));
        }
    }
}

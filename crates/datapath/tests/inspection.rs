//! The inspection profile the engine hands with forwarded frames, and the
//! inline drop that inspection turns a flow's verdict into.

use core::net::{IpAddr, Ipv4Addr};

use palisade_datapath::port::{self, UplinkConfig};
use palisade_datapath::{
    Disposition, DropReason, EndReason, Engine, EngineConfig, EventKind, FlowEvent, PolicyLookup, Results, render_reply,
};
use palisade_policy::compile::Compiler;
use palisade_policy::eval::{Flow, evaluate};
use palisade_policy::model::Model;
use palisade_policy::{MemorySource, load};
use palisade_testkit::engine::tcp_v4_frame;
use palisade_wire::ethernet::EthernetAddress;
use palisade_wire::flow;
use palisade_wire::tcp::{self, TcpFlags};

const POLICY: &str = r#"
version: 1
datacenter: { name: dc1, default: deny }
zones: [{ name: web, vlan: 100 }, { name: app, vlan: 200 }]
vms:
  - { name: a, uuid: 00000000-0000-4000-8000-00000000000a, host: h1, vnics: [{ name: a.0, mac: "02:00:00:00:00:0a", ips: [10.0.0.10], zone: web }] }
  - { name: b, uuid: 00000000-0000-4000-8000-00000000000b, host: h1, vnics: [{ name: b.0, mac: "02:00:00:00:00:0b", ips: [10.0.0.11], zone: web }] }
  - { name: c, uuid: 00000000-0000-4000-8000-00000000000c, host: h2, vnics: [{ name: c.0, mac: "02:00:00:00:00:0c", ips: [10.0.0.12], zone: app }] }
groups:
  web: { zone: web }
  app: { zone: app }
  internet: external
  only-a: { ips: [10.0.0.10/32] }
  only-b: { ips: [10.0.0.11/32] }
profiles:
  full: { signatures: [all] }
  critical: { signatures: [critical] }
  none: { signatures: [] }
inspection_defaults: { north_south: full, inter_zone: critical, intra_zone: none }
rules:
  datacenter:
    - { id: to-b-9000, from: any, to: only-b, service: tcp/9000, action: allow, inspect: full, applied_to: [only-b] }
    - { id: from-a-9000, from: only-a, to: any, service: tcp/9000, action: allow, inspect: critical, applied_to: [only-a] }
    - { id: web-web, from: web, to: web, service: tcp/80, action: allow }
    - { id: web-web-8080, from: web, to: web, service: tcp/8080, action: allow, inspect: full }
    - { id: web-web-8443, from: web, to: web, service: tcp/8443, action: allow, inspect: none }
    - { id: web-app, from: web, to: app, service: tcp/80, action: allow }
    - { id: web-out, from: web, to: internet, service: tcp/80, action: allow }
"#;

const MS: u64 = 1_000_000;

fn model_and_engine() -> (Model, Engine) {
    let loaded = load(&MemorySource::new().with("p.yaml", POLICY.to_string())).unwrap();
    assert!(!loaded.has_errors(), "{}", loaded.render());
    let model = loaded.model.clone();
    let compiler = Compiler::new(loaded.model).unwrap();
    let cfg = EngineConfig::new(UplinkConfig {
        local_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 1]),
        local_ip: Ipv4Addr::new(192, 168, 0, 1),
        gateway_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 0xfe]),
        flood: vec![Ipv4Addr::new(192, 168, 0, 2)],
    });
    let mut e = Engine::new(cfg, Box::new(PolicyLookup::new(compiler)));
    for nic in ["a.0", "b.0"] {
        e.add_vnic(port::vnic_from_model(&model, nic, &[], 1000).unwrap())
            .unwrap();
    }
    (model, e)
}

/// An IPv4 TCP frame with a correct checksum.
fn tcp_frame(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    mac: (u8, u8),
    seq: u32,
    ack: u32,
    flags: TcpFlags,
    data: &[u8],
) -> Vec<u8> {
    let end = |(ip, port): (Ipv4Addr, u16), last| ([2, 0, 0, 0, 0, last], ip, port);
    tcp_v4_frame(end(src, mac.0), end(dst, mac.1), (seq, ack), flags, data)
}

const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const C: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 12);
const OUT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);

/// Send a frame from vNIC `from` at `now`: its disposition and its flow's profile name.
fn send(e: &mut Engine, from: &str, now: u64, frame: &[u8]) -> (Disposition, Option<String>) {
    let port = e.port_of(from).unwrap();
    let mut events: Vec<FlowEvent> = Vec::new();
    let mut results = Results::new();
    let p = e.process(now, port, frame, &mut events, &mut results);
    let name = p
        .inspection()
        .map(|id| e.inspection_profile_name(id).unwrap().to_string());
    (p.disposition, name)
}

/// The reference evaluator's profile of an allowed flow, as the engine carries it.
fn reference(model: &Model, src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> Option<String> {
    let flow = Flow {
        src: IpAddr::V4(src),
        dst: IpAddr::V4(dst),
        proto: 6,
        src_port: 40000,
        dst_port: port,
    };
    let name = evaluate(model, &flow)?.inspect?;
    let p = model.policy.profiles.iter().find(|p| p.name == name)?;
    (!p.signatures.is_empty()).then_some(name)
}

#[test]
fn a_flow_carries_the_deciding_rules_profile_else_its_traffic_class_default() {
    // (what, to, dst MAC, port, profile)
    let cases: [(&str, Ipv4Addr, u8, u16, Option<&str>); 6] = [
        ("intra-zone default: none", B, 0x0b, 80, None),
        ("a rule's inspect: full", B, 0x0b, 8080, Some("full")),
        ("a rule's inspect: none overrides the default", B, 0x0b, 8443, None),
        (
            "the egress rule's before the ingress rule's",
            B,
            0x0b,
            9000,
            Some("critical"),
        ),
        ("inter-zone default", C, 0x0c, 80, Some("critical")),
        ("north-south default", OUT, 0xfe, 80, Some("full")),
    ];
    for (what, to, mac, dport, want) in cases {
        let (model, mut e) = model_and_engine();
        assert_eq!(
            reference(&model, A, to, dport).as_deref(),
            want,
            "{what}: the reference"
        );
        let syn = tcp_frame((A, 40000), (to, dport), (0x0a, mac), 1000, 0, TcpFlags::SYN, &[]);
        let (d, got) = send(&mut e, "a.0", MS, &syn);
        assert_eq!(d, Disposition::Forward, "{what}");
        assert_eq!(got.as_deref(), want, "{what}: first packet");
        // Again, now from the flow cache.
        let (_, again) = send(&mut e, "a.0", 2 * MS, &syn);
        assert_eq!(again.as_deref(), want, "{what}: from the cache");
        if to == B {
            // The reply carries its connection's profile.
            let synack = tcp_frame(
                (B, dport),
                (A, 40000),
                (0x0b, 0x0a),
                5000,
                1001,
                TcpFlags::SYN | TcpFlags::ACK,
                &[],
            );
            let (d, back) = send(&mut e, "b.0", 3 * MS, &synack);
            assert_eq!(d, Disposition::Forward, "{what}: reply");
            assert_eq!(back.as_deref(), want, "{what}: reply");
        }
    }
}

/// Open a→b:8080 (inspected in full) and send one data segment each way.
fn open(e: &mut Engine) {
    let f = |src, dst, mac, seq, ack, flags, data: &[u8]| tcp_frame(src, dst, mac, seq, ack, flags, data);
    let ab = ((A, 40000), (B, 8080), (0x0a, 0x0b));
    let ba = ((B, 8080), (A, 40000), (0x0b, 0x0a));
    for (from, frame) in [
        ("a.0", f(ab.0, ab.1, ab.2, 1000, 0, TcpFlags::SYN, &[])),
        (
            "b.0",
            f(ba.0, ba.1, ba.2, 5000, 1001, TcpFlags::SYN | TcpFlags::ACK, &[]),
        ),
        ("a.0", f(ab.0, ab.1, ab.2, 1001, 5001, TcpFlags::ACK, &[])),
        (
            "a.0",
            f(
                ab.0,
                ab.1,
                ab.2,
                1001,
                5001,
                TcpFlags::ACK | TcpFlags::PSH,
                b"GET / HTTP/1.0\r\n\r\n",
            ),
        ),
    ] {
        let (d, p) = send(e, from, MS, &frame);
        assert_eq!((d, p.as_deref()), (Disposition::Forward, Some("full")));
    }
}

#[test]
fn an_inspection_drop_drops_every_later_packet_of_the_flow_both_ways() {
    let (_, mut e) = model_and_engine();
    open(&mut e);
    let before = e.counters().clone();
    let data = tcp_frame(
        (A, 40000),
        (B, 8080),
        (0x0a, 0x0b),
        1019,
        5001,
        TcpFlags::ACK | TcpFlags::PSH,
        b"evil",
    );
    let port = e.port_of("a.0").unwrap();
    let key = flow::extract(&data[..]).unwrap().unwrap().key;
    let mut events: Vec<FlowEvent> = Vec::new();
    // The caller forwarded nothing of the frame inspection dropped.
    assert_eq!(send(&mut e, "a.0", 2 * MS, &data).0, Disposition::Forward);
    assert!(e.inspection_drop(&key, 2 * MS, port, 1, &mut events));
    assert!(
        events.iter().any(|ev| ev.kind == EventKind::End(EndReason::Inspection)),
        "{events:?}"
    );
    assert_eq!(
        e.counters().forwarded,
        before.forwarded,
        "the frame is not counted forwarded"
    );
    assert_eq!(e.counters().dropped(DropReason::Inspection), 1);
    assert_eq!(e.conntrack().len(), 0, "the connection ended");
    // Later packets, either way, are dropped from the cache.
    let again = tcp_frame((A, 40000), (B, 8080), (0x0a, 0x0b), 1023, 5001, TcpFlags::ACK, b"more");
    let back = tcp_frame(
        (B, 8080),
        (A, 40000),
        (0x0b, 0x0a),
        5001,
        1023,
        TcpFlags::ACK,
        b"answer",
    );
    let hits = e.counters().cache_hits;
    assert_eq!(
        send(&mut e, "a.0", 3 * MS, &again),
        (Disposition::Drop(DropReason::Inspection), None)
    );
    assert_eq!(
        send(&mut e, "b.0", 3 * MS, &back),
        (Disposition::Drop(DropReason::Inspection), None)
    );
    assert_eq!(e.counters().cache_hits, hits + 2, "on the fast path");
    assert_eq!(e.counters().dropped(DropReason::Inspection), 3);
}

#[test]
fn a_frame_inspection_rejects_gets_a_reset_back() {
    let (_, mut e) = model_and_engine();
    open(&mut e);
    let data = tcp_frame(
        (A, 40000),
        (B, 8080),
        (0x0a, 0x0b),
        1019,
        5001,
        TcpFlags::ACK | TcpFlags::PSH,
        b"evil",
    );
    let port = e.port_of("a.0").unwrap();
    let mut events: Vec<FlowEvent> = Vec::new();
    let mut results = Results::new();
    let p = e.process(2 * MS, port, &data, &mut events, &mut results);
    assert_eq!(p.disposition, Disposition::Forward);
    assert!(p.reply().is_none(), "a forwarded frame has no policy reply");
    let reply = p.reject_reply().expect("an IP frame can be rejected");
    let mut buf = [0u8; 256];
    let n = render_reply(&reply, &mut buf).unwrap();
    let info = flow::extract(&buf[..n]).unwrap().unwrap();
    assert_eq!(
        info.key.reversed(),
        flow::extract(&data[..]).unwrap().unwrap().key,
        "back to the sender"
    );
    let t = tcp::Packet::new_checked(&buf[34..n]).unwrap();
    assert!(t.flags().contains(TcpFlags::RST));
    assert_eq!(t.seq_number(), 5001, "in the sender's window: what it acknowledged");
}

#[test]
fn an_imported_connection_keeps_its_profile() {
    let (_, mut e) = model_and_engine();
    open(&mut e);
    let blob = e.export_all(2 * MS);
    let (_, mut fresh) = model_and_engine();
    let mut events: Vec<FlowEvent> = Vec::new();
    assert_eq!(fresh.import_all(&blob, 2 * MS, &mut events).unwrap(), 1);
    let data = tcp_frame((A, 40000), (B, 8080), (0x0a, 0x0b), 1019, 5001, TcpFlags::ACK, b"after");
    assert_eq!(
        send(&mut fresh, "a.0", 3 * MS, &data),
        (Disposition::Forward, Some("full".to_string())),
        "a connection taken over is inspected as before"
    );
}

/// A routed flow crosses the engine twice (VM → router leg, router leg →
/// VM): handed on for inspection on its first leg only.
#[test]
fn a_routed_flow_is_handed_to_inspection_once() {
    let (_, mut e) = model_and_engine();
    let seg = e.vnic(e.port_of("a.0").unwrap()).unwrap().segment;
    e.add_vnic(port::VnicPort {
        name: "edge-web".into(),
        vm: "edge".into(),
        mac: EthernetAddress([2, 0, 0, 0, 0, 0xfe]),
        ips: vec![],
        zone: "web".into(),
        segment: seg,
        group_id: 0,
        strict: false,
        max_conns: u32::MAX,
        any_source: true,
    })
    .unwrap();
    let syn = |mac| tcp_frame((A, 40000), (B, 8080), mac, 1000, 0, TcpFlags::SYN, &[]);
    // First leg: a → the router's MAC.
    assert_eq!(
        send(&mut e, "a.0", MS, &syn((0x0a, 0xfe))),
        (Disposition::Forward, Some("full".to_string()))
    );
    // Second leg: the router → b, a's address as the source.
    assert_eq!(
        send(&mut e, "edge-web", 2 * MS, &syn((0xfe, 0x0b))),
        (Disposition::Forward, None),
        "inspected on its first leg"
    );
}

//! The engine the service-chain tests (`service_chain.rs`,
//! `service_chain_stages.rs`, `service_chain_external.rs`) build from their
//! policy: host h1's uplink, the policy's vNICs added by name, and the edge
//! router's leg in the web zone (VLAN 100), an appliance port that may send
//! from any address; the north-south client and web VMs they share, the
//! client's segments and web-1's answers, one frame processed, and one round
//! of the appliance health probes' monitor.

// Each test file uses a part of this.
#![allow(dead_code)]

use core::net::Ipv4Addr;

use palisade_datapath::port::{self, PortId, UplinkConfig, VnicPort};
use palisade_datapath::probe::{ProbeChange, ProbeFrame, ProbeMonitor};
use palisade_datapath::{Disposition, Engine, EngineConfig, EventSink, FlowEvent, PolicyLookup, Results};
use palisade_policy::compile::Compiler;
use palisade_policy::model::{Model, Segment as ZoneSegment};
use palisade_policy::{MemorySource, load};
use palisade_testkit::engine::tcp_v4_frame;
use palisade_wire::ethernet::EthernetAddress;
use palisade_wire::tcp::TcpFlags;

/// The tests' clock is in milliseconds; the engine's in nanoseconds.
pub const MS: u64 = 1_000_000;

/// The edge router's leg, the north-south client behind it, and the web VMs.
pub const ROUTER_MAC: [u8; 6] = [2, 0, 0, 0, 0xee, 1];
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
pub const WEB1_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
pub const WEB2_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
pub const WEB1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const WEB2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

/// Flow events, not looked at.
pub struct NoEvents;
impl EventSink for NoEvents {
    fn event(&mut self, _: &FlowEvent) {}
}

/// An engine on `yaml`, a policy that must load without errors, and its model.
pub fn engine(yaml: String) -> (Engine, Model) {
    let loaded = load(&MemorySource::new().with("p.yaml", yaml)).unwrap();
    assert!(!loaded.has_errors(), "{}", loaded.render());
    let model = loaded.model;
    let uplink = UplinkConfig {
        local_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 1]),
        local_ip: Ipv4Addr::new(192, 168, 0, 1),
        gateway_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 0xfe]),
        flood: vec![],
    };
    let e = Engine::new(
        EngineConfig::new(uplink),
        Box::new(PolicyLookup::new(Compiler::new(model.clone()).unwrap())),
    );
    (e, model)
}

/// The port of the policy's vNIC `name`.
pub fn add_vnic(e: &mut Engine, model: &Model, name: &str) -> PortId {
    e.add_vnic(port::vnic_from_model(model, name, &[], 1000).unwrap())
        .unwrap()
}

/// The edge router's leg in the web zone, with MAC `mac`.
pub fn add_router_leg(e: &mut Engine, mac: [u8; 6]) -> PortId {
    e.add_vnic(VnicPort {
        name: "edge-web".into(),
        vm: "edge".into(),
        mac: EthernetAddress(mac),
        ips: vec![],
        zone: "web".into(),
        segment: port::zone_segment(ZoneSegment::Vlan(100)),
        group_id: 0,
        strict: false,
        max_conns: 1000,
        any_source: true,
    })
    .unwrap()
}

/// A TCP frame without payload `src:sport -> dst:dport` between the two MACs.
pub fn tcp(
    src: ([u8; 6], Ipv4Addr, u16),
    dst: ([u8; 6], Ipv4Addr, u16),
    seq_ack: (u32, u32),
    flags: TcpFlags,
) -> Vec<u8> {
    tcp_v4_frame(src, dst, seq_ack, flags, &[])
}

/// The client's segment `(seq, ack)` with `flags`, as the router's leg
/// hands it to `web` (its MAC and address), port 80.
pub fn inbound_to(web: ([u8; 6], Ipv4Addr), sport: u16, seq_ack: (u32, u32), flags: TcpFlags) -> Vec<u8> {
    tcp((ROUTER_MAC, CLIENT, sport), (web.0, web.1, 80), seq_ack, flags)
}

/// The client's segment to web-1, as the router's leg hands it.
pub fn inbound(sport: u16, seq_ack: (u32, u32), flags: TcpFlags) -> Vec<u8> {
    inbound_to((WEB1_MAC, WEB1), sport, seq_ack, flags)
}

/// web-1's answer to the client, towards the router's leg.
pub fn outbound(sport: u16, seq_ack: (u32, u32), flags: TcpFlags) -> Vec<u8> {
    tcp((WEB1_MAC, WEB1, 80), (ROUTER_MAC, CLIENT, sport), seq_ack, flags)
}

/// Process `frame` on `port` at `now` ms: its disposition and the ports it goes to.
pub fn send(e: &mut Engine, results: &mut Results, now: u64, port: PortId, frame: &[u8]) -> (Disposition, Vec<PortId>) {
    let p = e.process(now * MS, port, frame, &mut NoEvents, results);
    (p.disposition, p.outputs.iter().map(|o| o.port).collect())
}

/// The monitor's side of a probe round at `now` ms, once the probes that
/// came back have been handed to the engine: the returns taken, the
/// monitor's tick, each health change applied to the engine. Returns the
/// changes and the next round's probes.
pub fn probe_tick(e: &mut Engine, monitor: &mut ProbeMonitor, now: u64) -> (Vec<ProbeChange>, Vec<ProbeFrame>) {
    let mut returns = Vec::new();
    e.take_probe_returns(&mut returns);
    let chains = e.service_chains().to_vec();
    let mut next = Vec::new();
    let changes = monitor.tick(now * MS, &chains, &returns, &mut next);
    for c in &changes {
        e.set_probe_health(c.chain, c.instance, c.up);
    }
    (changes, next)
}

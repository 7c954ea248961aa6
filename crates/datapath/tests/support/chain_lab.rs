//! The engine the service-chain tests (`service_chain.rs`,
//! `service_chain_stages.rs`) build from their policy: host h1's uplink, the
//! policy's vNICs added by name, and the edge router's leg in the web zone
//! (VLAN 100), an appliance port that may send from any address.

use core::net::Ipv4Addr;

use palisade_datapath::port::{self, PortId, UplinkConfig, VnicPort};
use palisade_datapath::{Engine, EngineConfig, EventSink, FlowEvent, PolicyLookup};
use palisade_policy::compile::Compiler;
use palisade_policy::model::{Model, Segment as ZoneSegment};
use palisade_policy::{MemorySource, load};
use palisade_wire::ethernet::EthernetAddress;

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

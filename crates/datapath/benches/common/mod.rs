//! What the datapath benches share: a two-VM policy, an engine with both vNICs
//! attached, and UDP frames from VM a (10.0.0.10) to VM b (10.0.0.11), laid
//! out as in a receive ring.
#![allow(dead_code)]

use std::net::Ipv4Addr;

use palisade_datapath::PolicyLookup;
use palisade_datapath::port::{self, PortId, UplinkConfig};
use palisade_datapath::{Engine, EngineConfig};
use palisade_policy::compile::Compiler;
use palisade_policy::{MemorySource, load};
use palisade_testkit::vm_frame;
use palisade_wire::ethernet::EthernetAddress;
use palisade_wire::ip::IpProtocol;
use palisade_wire::udp::{self, UdpRepr};

const POLICY: &str = r#"
datacenter: { name: dc1, default: deny }
zones: [{ name: web, vlan: 100 }]
vms:
  - { name: a, uuid: 00000000-0000-4000-8000-00000000000a, vnics: [{ name: a.0, mac: "02:00:00:00:00:0a", ips: [10.0.0.10], zone: web }] }
  - { name: b, uuid: 00000000-0000-4000-8000-00000000000b, vnics: [{ name: b.0, mac: "02:00:00:00:00:0b", ips: [10.0.0.11], zone: web }] }
groups: { web: { zone: web } }
rules:
  datacenter:
    - { id: web-any, from: web, to: web, action: allow }
"#;

/// An engine with room for `flows` connections, vNICs a.0 and b.0 attached; returns a.0's port.
pub fn engine(flows: usize) -> (Engine, PortId) {
    engine_sized(flows, flows)
}

/// [`engine`] with a flow cache of `flows` and a connection table of `conns`.
pub fn engine_sized(flows: usize, conns: usize) -> (Engine, PortId) {
    let loaded = load(&MemorySource::new().with("p.yaml", POLICY)).expect("policy loads");
    assert!(!loaded.has_errors(), "{}", loaded.render());
    let model = loaded.model.clone();
    let compiler = Compiler::new(loaded.model).expect("policy compiles");
    let mut cfg = EngineConfig::new(UplinkConfig {
        local_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 1]),
        local_ip: Ipv4Addr::new(192, 168, 0, 1),
        gateway_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 0xfe]),
        flood: vec![],
    });
    cfg.flow_capacity = flows;
    cfg.conn_capacity = conns;
    let mut e = Engine::new(cfg, Box::new(PolicyLookup::new(compiler)));
    let a = e
        .add_vnic(port::vnic_from_model(&model, "a.0", &[], u32::MAX).expect("vNIC a.0"))
        .expect("port a.0");
    e.add_vnic(port::vnic_from_model(&model, "b.0", &[], u32::MAX).expect("vNIC b.0"))
        .expect("port b.0");
    (e, a)
}

/// A UDP frame from a to b with an 18-byte payload.
pub fn udp_frame(src_port: u16, dst_port: u16) -> Vec<u8> {
    let (src, dst) = (Ipv4Addr::new(10, 0, 0, 10), Ipv4Addr::new(10, 0, 0, 11));
    let payload = [0u8; 18];
    let u = UdpRepr {
        src_port,
        dst_port,
        payload: &payload,
    };
    let mut l4 = vec![0; u.buffer_len()];
    u.emit(&mut udp::Packet::new_unchecked(&mut l4[..]), src.into(), dst.into());
    vm_frame(10, 11, IpProtocol::UDP, &l4)
}

/// Flow `i`: distinct source ports, then distinct destination ports (up to 3.9 G flows).
pub fn frame(i: u32) -> Vec<u8> {
    udp_frame(1024 + (i % 60_000) as u16, 1 + (i / 60_000) as u16)
}

/// Bytes between the starts of two frames in [`Ring`]: a small frame's slot
/// in a TPACKET_V3 block (its `tpacket3_hdr` and link-layer address, then
/// the frame, aligned to 16 bytes).
const SLOT: usize = 144;

/// Frames per `process_batch` call: what one TPACKET_V3 block holds of
/// small frames.
pub const BATCH: usize = 256;

/// The frames of some flows, laid end to end in one buffer as the kernel
/// lays them in a receive ring (so reading them is as cheap or as dear as
/// reading a ring: sequential, not a heap allocation per frame).
pub struct Ring(Vec<u8>);

impl Ring {
    /// The frames of flows `ids` ([`frame`]), in that order.
    pub fn new(ids: impl ExactSizeIterator<Item = u32>) -> Ring {
        let mut buf = vec![0u8; ids.len() * SLOT];
        for (slot, i) in buf.chunks_mut(SLOT).zip(ids) {
            let f = frame(i);
            slot[..f.len()].copy_from_slice(&f);
        }
        Ring(buf)
    }

    /// The frames.
    pub fn frames(&self) -> Vec<&[u8]> {
        let len = frame(0).len();
        self.0.chunks(SLOT).map(|s| &s[..len]).collect()
    }
}

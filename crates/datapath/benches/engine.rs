//! Engine throughput on one core: cache-hit ns/packet (and Mpps) with 1k, 100k and
//! 1M concurrent flows, new flows per second, and a mixed run (10% new flows).
//!
//! Prints one JSON object. Run with `cargo bench -p palisade-datapath --bench engine`.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::Instant;

use palisade_datapath::engine::{Disposition, Engine, EngineConfig};
use palisade_datapath::lookup::PolicyLookup;
use palisade_datapath::port::{self, PortId, UplinkConfig};
use palisade_policy::compile::Compiler;
use palisade_policy::{MemorySource, load};
use palisade_wire::ethernet::{self, EtherType, EthernetAddress, EthernetRepr};
use palisade_wire::ip::IpProtocol;
use palisade_wire::ipv4::{self, Ipv4Repr};
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

fn engine(capacity: usize) -> (Engine, PortId) {
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
    cfg.flow_capacity = capacity * 2;
    cfg.conn_capacity = capacity * 2;
    let mut e = Engine::new(cfg, Box::new(PolicyLookup::new(compiler)));
    let a = e
        .add_vnic(port::vnic_from_model(&model, "a.0", &[], u32::MAX).unwrap())
        .unwrap();
    e.add_vnic(port::vnic_from_model(&model, "b.0", &[], u32::MAX).unwrap())
        .unwrap();
    (e, a)
}

fn frame(i: u32) -> Vec<u8> {
    let (src, dst) = (Ipv4Addr::new(10, 0, 0, 10), Ipv4Addr::new(10, 0, 0, 11));
    let payload = [0u8; 18];
    let u = UdpRepr {
        src_port: 1024 + (i % 60_000) as u16,
        dst_port: 1 + (i / 60_000) as u16,
        payload: &payload,
    };
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        protocol: IpProtocol::UDP,
        payload_len: u.buffer_len(),
        ttl: 64,
        dscp: 0,
        ecn: 0,
        ident: 0,
        dont_frag: true,
        more_frags: false,
        frag_offset: 0,
        options: &[],
    };
    let mut f = vec![0; 14 + 20 + u.buffer_len()];
    EthernetRepr {
        src_addr: EthernetAddress([2, 0, 0, 0, 0, 0x0a]),
        dst_addr: EthernetAddress([2, 0, 0, 0, 0, 0x0b]),
        ethertype: EtherType::IPV4,
    }
    .emit(&mut ethernet::Frame::new_unchecked(&mut f[..]));
    ip.emit(&mut ipv4::Packet::new_unchecked(&mut f[14..34]));
    u.emit(&mut udp::Packet::new_unchecked(&mut f[34..]), src.into(), dst.into());
    f
}

/// Returns (new flows per second, cache-hit ns per packet).
fn run(flows: u32, passes: u32) -> (f64, f64) {
    let (mut e, a) = engine(flows as usize);
    let frames: Vec<Vec<u8>> = (0..flows).map(frame).collect();
    let t = Instant::now();
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(e.process(i as u64, a, f, &mut ()), Disposition::Forward);
    }
    let new_per_s = f64::from(flows) / t.elapsed().as_secs_f64();
    let hits_before = e.counters().cache_hits;
    let t = Instant::now();
    for p in 0..passes {
        for f in &frames {
            black_box(e.process(u64::from(flows + p), a, black_box(f), &mut ()));
        }
    }
    let ns = t.elapsed().as_nanos() as f64 / f64::from(flows * passes);
    assert_eq!(e.counters().cache_hits - hits_before, u64::from(flows * passes));
    (new_per_s, ns)
}

/// Mixed traffic: `established` flows already cached, then passes over them in
/// which every `new_every`-th packet opens a new flow. Returns ns per packet.
fn run_mixed(established: u32, new_every: u32, passes: u32) -> f64 {
    let fresh = established * passes / new_every + 1;
    let (mut e, a) = engine((established + fresh) as usize);
    let frames: Vec<Vec<u8>> = (0..established + fresh).map(frame).collect();
    let (old, new) = frames.split_at(established as usize);
    for (i, f) in old.iter().enumerate() {
        e.process(i as u64, a, f, &mut ());
    }
    let mut new_iter = new.iter();
    let (misses_before, t) = (e.counters().cache_misses, Instant::now());
    let mut n = 0u64;
    for p in 0..passes {
        for (i, f) in old.iter().enumerate() {
            let f = if i as u32 % new_every == 0 {
                new_iter.next().unwrap_or(f)
            } else {
                f
            };
            black_box(e.process(u64::from(established + p), a, black_box(f), &mut ()));
            n += 1;
        }
    }
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    assert!(
        e.counters().cache_misses > misses_before,
        "the mixed run opened no flow"
    );
    ns
}

fn main() {
    let (new_1k, hit_1k) = run(1_000, 200);
    let (new_100k, hit_100k) = run(100_000, 5);
    let (new_1m, hit_1m) = run(1_000_000, 2);
    let mixed = run_mixed(100_000, 10, 3);
    let mpps = |ns: f64| 1e3 / ns;
    println!(
        "{{\"cache_hit_ns_per_packet\":{{\"flows_1k\":{hit_1k:.1},\"flows_100k\":{hit_100k:.1},\"flows_1m\":{hit_1m:.1}}},\
         \"cache_hit_mpps_per_core\":{{\"flows_1k\":{:.2},\"flows_100k\":{:.2},\"flows_1m\":{:.2}}},\
         \"new_flows_per_s\":{{\"flows_1k\":{new_1k:.0},\"flows_100k\":{new_100k:.0},\"flows_1m\":{new_1m:.0}}},\
         \"mixed_100k_established_10pct_new_ns_per_packet\":{mixed:.1}}}",
        mpps(hit_1k),
        mpps(hit_100k),
        mpps(hit_1m)
    );
}

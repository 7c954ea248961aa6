//! Multi-core scaling: Mpps on flow-cache hits through a [`WorkerPool`] with 1
//! and 2 workers (dispatch, queueing and processing, end to end).
//!
//! Prints one JSON line. Run with `cargo bench -p palisade-datapath --bench scaling`.
//! The dispatcher runs on the calling thread, so 2 workers use 3 threads: on
//! a 2-core machine they compete with it for the cores.

use std::net::Ipv4Addr;
use std::time::Instant;

use palisade_datapath::engine::{Engine, EngineConfig};
use palisade_datapath::lookup::PolicyLookup;
use palisade_datapath::port::{self, PortId, UplinkConfig};
use palisade_datapath::workers::{WorkerPool, total};
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

const FLOWS: u32 = 4096;
const PASSES: u32 = 300;

fn engine() -> Engine {
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
    cfg.flow_capacity = FLOWS as usize * 2;
    cfg.conn_capacity = FLOWS as usize * 2;
    let mut e = Engine::new(cfg, Box::new(PolicyLookup::new(compiler)));
    for n in ["a.0", "b.0"] {
        e.add_vnic(port::vnic_from_model(&model, n, &[], u32::MAX).expect("vNIC"))
            .expect("port");
    }
    e
}

fn frame(i: u32) -> Vec<u8> {
    let (src, dst) = (Ipv4Addr::new(10, 0, 0, 10), Ipv4Addr::new(10, 0, 0, 11));
    let payload = [0u8; 18];
    let u = UdpRepr {
        src_port: 1024 + i as u16,
        dst_port: 9000,
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

/// Mpps through `workers` workers, after one warm-up pass that creates the flows.
fn run(workers: usize, a: PortId, frames: &[Vec<u8>]) -> f64 {
    let mut pool = WorkerPool::new(workers, 64, 64, engine).expect("pool");
    for (i, f) in frames.iter().enumerate() {
        pool.submit(i as u64, a, f).expect("submit");
    }
    pool.flush().expect("flush");
    let t = Instant::now();
    for p in 0..PASSES {
        for f in frames {
            pool.submit(u64::from(FLOWS + p), a, f).expect("submit");
        }
    }
    let reports = pool.finish().expect("finish");
    let secs = t.elapsed().as_secs_f64();
    let sum = total(&reports);
    assert_eq!(
        sum.cache_hits,
        u64::from(FLOWS * PASSES),
        "every timed packet is a cache hit"
    );
    assert_eq!(sum.forwarded, u64::from(FLOWS * (PASSES + 1)));
    f64::from(FLOWS * PASSES) / secs / 1e6
}

fn main() {
    let a = engine().port_of("a.0").expect("a.0");
    let frames: Vec<Vec<u8>> = (0..FLOWS).map(frame).collect();
    let one = run(1, a, &frames);
    let two = run(2, a, &frames);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "{{\"bench\":\"scaling\",\"flows\":{FLOWS},\"packets\":{},\"cores\":{cores},\
         \"mpps_cache_hit\":{{\"workers_1\":{one:.3},\"workers_2\":{two:.3}}},\"speedup\":{:.2}}}",
        FLOWS * PASSES,
        two / one
    );
}

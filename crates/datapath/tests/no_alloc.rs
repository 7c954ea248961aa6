//! The hot path allocates nothing: a counting global allocator watches
//! cache-hit packets in both directions (the only test in this binary, so no
//! other test allocates concurrently).

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};

use palisade_datapath::PolicyLookup;
use palisade_datapath::port::{self, UplinkConfig};
use palisade_datapath::{Disposition, Engine, EngineConfig, Results};
use palisade_policy::compile::Compiler;
use palisade_policy::{MemorySource, load};
use palisade_testkit::vm_frame;
use palisade_wire::ethernet::EthernetAddress;
use palisade_wire::ip::IpProtocol;
use palisade_wire::tcp::{self, TcpFlags, TcpRepr};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates every call unchanged to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed through unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed through unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed through unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const POLICY: &str = r#"
datacenter: { name: dc1, default: deny }
zones: [{ name: web, vlan: 100 }]
vms:
  - { name: a, uuid: 00000000-0000-4000-8000-00000000000a, vnics: [{ name: a.0, mac: "02:00:00:00:00:0a", ips: [10.0.0.10], zone: web }] }
  - { name: b, uuid: 00000000-0000-4000-8000-00000000000b, vnics: [{ name: b.0, mac: "02:00:00:00:00:0b", ips: [10.0.0.11], zone: web }] }
groups: { web: { zone: web } }
rules:
  datacenter:
    - { id: web-https, from: web, to: web, service: tcp/443, action: allow }
"#;

fn frame(from: u8, to: u8, sport: u16, dport: u16, seq: u32, ack: u32, flags: TcpFlags) -> Vec<u8> {
    let (src, dst) = (Ipv4Addr::new(10, 0, 0, from), Ipv4Addr::new(10, 0, 0, to));
    let t = TcpRepr {
        src_port: sport,
        dst_port: dport,
        seq_number: seq,
        ack_number: ack,
        flags,
        window_len: 64000,
        urgent_pointer: 0,
        options: &[],
        payload: &[],
    };
    let mut l4 = vec![0; t.buffer_len()];
    t.emit(&mut tcp::Packet::new_unchecked(&mut l4[..]), src.into(), dst.into());
    vm_frame(from, to, IpProtocol::TCP, &l4)
}

#[test]
fn cache_hits_allocate_nothing() {
    let loaded = load(&MemorySource::new().with("p.yaml", POLICY)).unwrap();
    let model = loaded.model.clone();
    let mut e = Engine::new(
        EngineConfig::new(UplinkConfig {
            local_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 1]),
            local_ip: Ipv4Addr::new(192, 168, 0, 1),
            gateway_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 0xfe]),
            flood: vec![],
        }),
        Box::new(PolicyLookup::new(Compiler::new(loaded.model).unwrap())),
    );
    let a = e
        .add_vnic(port::vnic_from_model(&model, "a.0", &[], 10).unwrap())
        .unwrap();
    let b = e
        .add_vnic(port::vnic_from_model(&model, "b.0", &[], 10).unwrap())
        .unwrap();
    let mut buf = vec![0u8; 2048];
    // Room for a batch's decisions, kept across batches.
    let mut results = Results::with_capacity(64);
    let syn = frame(10, 11, 40000, 443, 1000, 0, TcpFlags::SYN);
    let synack = frame(11, 10, 443, 40000, 9000, 1001, TcpFlags::SYN | TcpFlags::ACK);
    let ack = frame(10, 11, 40000, 443, 1001, 9001, TcpFlags::ACK);
    let back = frame(11, 10, 443, 40000, 9001, 1001, TcpFlags::ACK);
    assert_eq!(e.process(0, a, &syn, &mut (), &mut results), Disposition::Forward);
    assert_eq!(e.process(1, b, &synack, &mut (), &mut results), Disposition::Forward);
    let hits = e.counters().cache_hits;
    let before = ALLOCS.load(Ordering::Relaxed);
    for i in 0..1000 {
        let p = e.process(2 + i, a, &ack, &mut (), &mut results);
        assert_eq!(p, Disposition::Forward);
        palisade_datapath::render(&p, &p.outputs[0], &mut buf).unwrap();
        assert_eq!(e.process(2 + i, b, &back, &mut (), &mut results), Disposition::Forward);
    }
    let batch = [&ack[..]; 40];
    let mut forwarded = 0;
    for i in 0..25 {
        e.process_batch(3000 + i, a, &batch, &mut (), &mut results);
        for p in results.iter(&batch) {
            forwarded += usize::from(p == Disposition::Forward);
        }
    }
    let allocs = ALLOCS.load(Ordering::Relaxed) - before;
    assert_eq!(forwarded, 1000);
    assert_eq!(e.counters().cache_hits - hits, 3000);
    assert_eq!(allocs, 0, "the cache-hit path allocated");
    // The counter does count: a new flow (slow path) allocates at least a provenance clone.
    let before = ALLOCS.load(Ordering::Relaxed);
    let other = frame(10, 11, 40001, 443, 5, 0, TcpFlags::SYN);
    assert_eq!(e.process(4000, a, &other, &mut (), &mut results), Disposition::Forward);
    assert!(ALLOCS.load(Ordering::Relaxed) > before);
}

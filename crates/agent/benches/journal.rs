//! The crash journal's cost: what one connection event costs the worker
//! that writes it (a TCP connection makes about three: its start, its
//! SYN-ACK, its establishment; packets that change no state make none).
//!
//! `cargo bench -p palisade-agent --bench journal` prints one JSON line:
//! - `note_mapped_ns`: `Journal::note` into a shared file mapping on tmpfs
//!   (`/dev/shm`, as `/run` in production), pages already touched;
//! - `note_mapped_cold_ns`: the same into pages touched for the first time
//!   (the first pass over a half after it was created);
//! - `note_heap_ns`: into a heap buffer, for scale (the encoding alone);
//! - `rotate_ns`: switching halves (once per snapshot round).
//!
//! Run any other way (`cargo test --all-targets`), it does a short smoke run.

use std::hint::black_box;
use std::time::Instant;

use palisade_agent::journal::{Identity, Journal};
use palisade_datapath::{Conn, ConnState, EventKind};
use palisade_wire::flow::{FlowKey, Segment};
use palisade_wire::ip::IpProtocol;

fn conn(port: u16) -> Conn {
    let key = FlowKey {
        segment: Segment::vlan(100),
        src: std::net::Ipv4Addr::new(10, 0, 1, 11).to_ipv6_mapped().octets(),
        dst: std::net::Ipv4Addr::new(10, 0, 2, 22).to_ipv6_mapped().octets(),
        src_port: port,
        dst_port: 8080,
        protocol: IpProtocol::TCP,
        icmp_type: 0,
        icmp_code: 0,
    };
    let mut c = Conn::new(key, 1);
    c.state = ConnState::Established;
    c.policy_version = 3;
    c
}

/// ns per note, over `n` notes into `j` (rotating when a half is full).
fn notes(j: &mut Journal, capacity: u32, n: u32, conns: &[Conn]) -> f64 {
    let events: Vec<_> = conns.iter().map(|c| c.event(EventKind::Update, 5)).collect();
    let start = Instant::now();
    for i in 0..n as usize {
        if j.used() == capacity {
            j.rotate();
        }
        let k = i % conns.len();
        j.note(black_box(&events[k]), Some(&conns[k]), 10);
    }
    start.elapsed().as_nanos() as f64 / f64::from(n)
}

fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let capacity: u32 = if smoke { 256 } else { 16_384 };
    let n: u32 = if smoke { 1_000 } else { 2_000_000 };
    let conns: Vec<Conn> = (0..1024).map(|p| conn(40_000 + p)).collect();
    let ident = Identity::new("hv1", ["web-1.0"]);
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let path = dir.path().join("host-0.journal");

    let mut mapped = Journal::create(&path, ident.clone(), 0, capacity).unwrap();
    // First pass over both halves: page faults on fresh tmpfs pages.
    let cold = notes(&mut mapped, capacity, 2 * capacity, &conns);
    let warm = notes(&mut mapped, capacity, n, &conns);
    let mut heap = Journal::in_memory(ident, 0, capacity);
    let _ = notes(&mut heap, capacity, 2 * capacity, &conns);
    let heap_ns = notes(&mut heap, capacity, n, &conns);
    let rounds = if smoke { 10 } else { 100_000 };
    let start = Instant::now();
    for _ in 0..rounds {
        mapped.rotate();
    }
    let rotate = start.elapsed().as_nanos() as f64 / f64::from(rounds);
    println!(
        "{{\"bench\":\"journal\",\"slot_bytes\":{},\"note_mapped_ns\":{warm:.1},\"note_mapped_cold_ns\":{cold:.1},\
         \"note_heap_ns\":{heap_ns:.1},\"rotate_ns\":{rotate:.1}}}",
        palisade_agent::journal::SLOT_LEN
    );
}

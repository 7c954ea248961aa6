//! Multi-core scaling: Mpps on flow-cache hits through a [`WorkerPool`] with 1
//! and 2 workers (dispatch, queueing and processing, end to end).
//!
//! Prints one JSON line. Run with `cargo bench -p palisade-datapath --bench scaling`.
//! The dispatcher runs on the calling thread, so 2 workers use 3 threads: on
//! a 2-core machine they compete with it for the cores.

mod common;

use std::time::Instant;

use palisade_datapath::Engine;
use palisade_datapath::port::PortId;
use palisade_datapath::workers::{WorkerPool, total};

const FLOWS: u32 = 4096;
const PASSES: u32 = 300;

fn engine() -> Engine {
    common::engine(FLOWS as usize).0
}

fn frame(i: u32) -> Vec<u8> {
    common::udp_frame(1024 + i as u16, 9000)
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

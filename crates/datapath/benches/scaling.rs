//! Multi-core scaling of flow-cache hits, in two shapes.
//!
//! - **steered** (the agent's shape): the kernel hands each flow to one
//!   worker (packet fanout by a symmetric hash, `palisade_io::steer`), so
//!   workers share nothing and nothing dispatches in user space. Here the
//!   frames are steered ahead by the engine's reference hash
//!   ([`shard::shard_of`]) into one ring per worker; each worker thread
//!   opens its flows in its own engine, then all run their rings through
//!   `process_batch` at once, from a common start. Reported for 1 worker up
//!   to the cores available (`SCALING_WORKERS=N` for another maximum), at
//!   4,096 and 100,000 flows in all, with each count's speedup over one
//!   worker.
//! - **dispatched**: a [`WorkerPool`] with 1 and 2 workers, fed by the
//!   calling thread (user-space dispatch, queueing and processing, end to
//!   end), as a host without kernel steering would run. 2 workers use 3
//!   threads: on a 2-core machine they compete with the dispatcher.
//!
//! Prints one JSON line. Run with `cargo bench -p palisade-datapath --bench scaling`.

mod common;

use std::sync::Barrier;
use std::thread;
use std::time::Instant;

use common::{BATCH, Ring, engine};
use palisade_datapath::Engine;
use palisade_datapath::engine::Disposition;
use palisade_datapath::port::PortId;
use palisade_datapath::shard;
use palisade_datapath::workers::{WorkerPool, total};

const DISPATCHED_FLOWS: u32 = 4096;
const DISPATCHED_PASSES: u32 = 300;
/// Packets each steered run processes in all (its passes over the flows).
const STEERED_PACKETS: u32 = 8_000_000;

fn pool_engine() -> Engine {
    engine(DISPATCHED_FLOWS as usize).0
}

/// Mpps through `workers` pool workers, after one warm-up pass that creates the flows.
fn dispatched(workers: usize, a: PortId, frames: &[&[u8]]) -> f64 {
    let mut pool = WorkerPool::new(workers, 64, 64, pool_engine).expect("pool");
    for (i, f) in frames.iter().enumerate() {
        pool.submit(i as u64, a, f).expect("submit");
    }
    pool.flush().expect("flush");
    let t = Instant::now();
    for p in 0..DISPATCHED_PASSES {
        for f in frames {
            pool.submit(u64::from(DISPATCHED_FLOWS + p), a, f).expect("submit");
        }
    }
    let reports = pool.finish().expect("finish");
    let secs = t.elapsed().as_secs_f64();
    let sum = total(&reports);
    let timed = u64::from(DISPATCHED_FLOWS * DISPATCHED_PASSES);
    assert_eq!(sum.cache_hits, timed, "every timed packet is a cache hit");
    assert_eq!(sum.forwarded, timed + u64::from(DISPATCHED_FLOWS));
    timed as f64 / secs / 1e6
}

/// Mpps of `workers` threads, each with its own engine and its own share of
/// `flows` flows (steered by the symmetric hash), all processing at once.
fn steered(workers: usize, flows: u32, packets: u32) -> f64 {
    let (probe, a) = engine(1);
    let mut shares: Vec<Vec<u32>> = vec![Vec::new(); workers];
    for i in 0..flows {
        let f = common::frame(i);
        let key = probe.dispatch_key(a, &f).expect("a UDP frame has a flow key");
        shares[shard::shard_of(&key, workers)].push(i);
    }
    let passes = (packets / flows).max(1);
    let start = Barrier::new(workers + 1);
    let (hits, secs) = thread::scope(|s| {
        let threads: Vec<_> = shares
            .iter()
            .map(|ids| {
                let start = &start;
                s.spawn(move || {
                    let (mut e, a) = engine(ids.len().max(1));
                    let ring = Ring::new(ids.iter().copied());
                    let frames = ring.frames();
                    for (b, batch) in frames.chunks(BATCH).enumerate() {
                        e.process_batch(b as u64, a, batch, &mut (), |_, _, d| {
                            assert_eq!(d, Disposition::Forward, "opening a flow");
                        });
                    }
                    let before = e.counters().cache_hits;
                    start.wait();
                    for p in 0..passes {
                        for batch in frames.chunks(BATCH) {
                            e.process_batch(u64::from(flows + p), a, batch, &mut (), |_, _, _| {});
                        }
                    }
                    (e.counters().cache_hits - before, Instant::now())
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        let mut hits = 0;
        let mut last = t0;
        for t in threads {
            let (h, done) = t.join().expect("worker thread");
            hits += h;
            last = last.max(done);
        }
        (hits, (last - t0).as_secs_f64())
    });
    assert_eq!(hits, u64::from(flows * passes), "every timed packet is a cache hit");
    hits as f64 / secs / 1e6
}

/// `{"workers_1":…,…}` and the speedups over one worker, for 1..=`max` workers at `flows`.
fn steered_report(max: usize, flows: u32, packets: u32) -> String {
    let mpps: Vec<f64> = (1..=max).map(|w| steered(w, flows, packets)).collect();
    let list = |f: &dyn Fn(f64) -> String| {
        mpps.iter()
            .enumerate()
            .map(|(i, &m)| format!("\"workers_{}\":{}", i + 1, f(m)))
            .collect::<Vec<_>>()
            .join(",")
    };
    format!(
        "{{\"mpps\":{{{}}},\"speedup\":{{{}}}}}",
        list(&|m| format!("{m:.3}")),
        list(&|m| format!("{:.2}", m / mpps[0]))
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    let max = std::env::var("SCALING_WORKERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(cores);
    // `cargo bench` passes --bench; any other run (`cargo test --all-targets`) is a short smoke run.
    let packets = if std::env::args().any(|a| a == "--bench") {
        STEERED_PACKETS
    } else {
        STEERED_PACKETS / 20
    };
    let small = steered_report(max, 4096, packets);
    let large = steered_report(max, 100_000, packets);
    let a = pool_engine().port_of("a.0").expect("a.0");
    let ring = Ring::new(0..DISPATCHED_FLOWS);
    let frames = ring.frames();
    let one = dispatched(1, a, &frames);
    let two = dispatched(2, a, &frames);
    println!(
        "{{\"bench\":\"scaling\",\"cores\":{cores},\
         \"steered_cache_hit\":{{\"flows_4k\":{small},\"flows_100k\":{large}}},\
         \"dispatched_cache_hit\":{{\"flows\":{DISPATCHED_FLOWS},\"mpps\":{{\"workers_1\":{one:.3},\"workers_2\":{two:.3}}},\"speedup\":{:.2}}}}}",
        two / one
    );
}

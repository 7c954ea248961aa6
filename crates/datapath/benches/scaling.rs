//! Multi-core scaling of flow-cache hits, in the agent's shape: the kernel
//! hands each flow to one worker (`palisade_io::steer`), so workers share
//! nothing and nothing dispatches in user space. Here each flow goes to a
//! worker by its key's symmetric hash (`FlowKey::symmetric_hash`; the
//! datapath may not depend on `io`, whose steering programs hash the
//! addresses, so the shares differ from a live host's but are as uneven as
//! a hash makes them); each worker thread opens its flows in its own engine,
//! then all run their rings through `process_batch` at once, from a common
//! start. Reported for 1 worker up to the cores available
//! (`SCALING_WORKERS=N` for another maximum), at 4,096 and 100,000 flows in
//! all, with each count's speedup over one worker.
//!
//! Prints one JSON line. Run with `cargo bench -p palisade-datapath --bench scaling`.

mod common;

use std::sync::Barrier;
use std::thread;
use std::time::Instant;

use common::{BATCH, Ring, engine};
use palisade_datapath::{Disposition, Results};

/// Packets each steered run processes in all (its passes over the flows).
const STEERED_PACKETS: u32 = 8_000_000;

/// Mpps of `workers` threads, each with its own engine and its own share of
/// `flows` flows (steered by the symmetric hash), all processing at once.
fn steered(workers: usize, flows: u32, packets: u32) -> f64 {
    let (probe, a) = engine(1);
    let mut shares: Vec<Vec<u32>> = vec![Vec::new(); workers];
    for i in 0..flows {
        let f = common::frame(i);
        let key = probe.dispatch_key(a, &f).expect("a UDP frame has a flow key");
        shares[(key.symmetric_hash() % workers as u64) as usize].push(i);
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
                    let mut results = Results::new();
                    for (b, batch) in frames.chunks(BATCH).enumerate() {
                        e.process_batch(b as u64, a, batch, &mut (), &mut results);
                        for i in 0..results.len() {
                            assert_eq!(results.disposition(i), Some(Disposition::Forward), "opening a flow");
                        }
                    }
                    let before = e.counters().cache_hits;
                    start.wait();
                    for p in 0..passes {
                        for batch in frames.chunks(BATCH) {
                            e.process_batch(u64::from(flows + p), a, batch, &mut (), &mut results);
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
    println!(
        "{{\"bench\":\"scaling\",\"cores\":{cores},\
         \"steered_cache_hit\":{{\"flows_4k\":{small},\"flows_100k\":{large}}}}}"
    );
}

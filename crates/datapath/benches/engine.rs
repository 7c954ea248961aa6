//! Engine throughput on one core: cache-hit ns/packet (one frame at a time, and in
//! batches of 256 through `process_batch`; Mpps of the latter) with 1k, 100k and
//! 1M concurrent flows, new flows per second (one at a time and batched), and a
//! mixed run (10% new flows).
//!
//! Prints one JSON object. Run with `cargo bench -p palisade-datapath --bench engine`
//! (`ENGINE_BENCH_ONLY=<flows>` runs only the cache-hit case at that many flows,
//! with `ENGINE_BENCH_BATCHED=1` only its batched passes, with
//! `ENGINE_BENCH_NEW=1` only new flows; `ENGINE_BENCH_PASSES=<n>` sets its
//! passes over the flows, e.g. few for an instruction count under
//! `valgrind --tool=callgrind`).

mod common;

use std::hint::black_box;
use std::time::Instant;

use common::{BATCH, Ring, engine};
use palisade_datapath::port::PortId;
use palisade_datapath::{Disposition, Engine, Results};

/// Returns (new flows per second, cache-hit ns per packet one frame at a
/// time, cache-hit ns per packet in batches).
fn run(flows: u32, passes: u32, single: bool) -> (f64, f64, f64) {
    let (mut e, a) = engine(flows as usize);
    let ring = Ring::new(0..flows);
    let frames = ring.frames();
    let new_per_s = open_one_at_a_time(&mut e, a, &frames);
    let mut results = Results::with_capacity(BATCH);
    let hits_before = e.counters().cache_hits;
    let t = Instant::now();
    for p in 0..if single { passes } else { 0 } {
        for f in &frames {
            black_box(
                e.process(u64::from(flows + p), a, black_box(f), &mut (), &mut results)
                    .disposition,
            );
        }
    }
    let ns = t.elapsed().as_nanos() as f64 / f64::from(flows * passes);
    if single {
        assert_eq!(e.counters().cache_hits - hits_before, u64::from(flows * passes));
    }
    let (hits_before, mut forwarded) = (e.counters().cache_hits, 0u64);
    let t = Instant::now();
    for p in 0..passes {
        for batch in frames.chunks(BATCH) {
            e.process_batch(
                u64::from(flows + passes + p),
                a,
                black_box(batch),
                &mut (),
                &mut results,
            );
            for i in 0..results.len() {
                forwarded += u64::from(results.disposition(i) == Some(Disposition::Forward));
            }
        }
    }
    let batched_ns = t.elapsed().as_nanos() as f64 / f64::from(flows * passes);
    assert_eq!(e.counters().cache_hits - hits_before, u64::from(flows * passes));
    assert_eq!(forwarded, u64::from(flows * passes));
    (new_per_s, ns, batched_ns)
}

/// New flows per second through `process`, one frame at a time, each frame
/// opening a flow.
fn open_one_at_a_time(e: &mut Engine, a: PortId, frames: &[&[u8]]) -> f64 {
    let mut results = Results::new();
    let t = Instant::now();
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(e.process(i as u64, a, f, &mut (), &mut results), Disposition::Forward);
    }
    frames.len() as f64 / t.elapsed().as_secs_f64()
}

/// New flows per second through `process`, with a fresh engine.
fn run_new(flows: u32) -> f64 {
    let (mut e, a) = engine(flows as usize);
    let ring = Ring::new(0..flows);
    open_one_at_a_time(&mut e, a, &ring.frames())
}

/// New flows per second through `process_batch` (a fresh engine, every
/// frame opening a flow, in batches of [`BATCH`]).
fn run_new_batched(flows: u32) -> f64 {
    let (mut e, a) = engine(flows as usize);
    let ring = Ring::new(0..flows);
    let frames = ring.frames();
    let mut forwarded = 0u64;
    let mut results = Results::with_capacity(BATCH);
    let t = Instant::now();
    for (b, batch) in frames.chunks(BATCH).enumerate() {
        e.process_batch(b as u64, a, batch, &mut (), &mut results);
        for i in 0..results.len() {
            forwarded += u64::from(results.disposition(i) == Some(Disposition::Forward));
        }
    }
    let rate = f64::from(flows) / t.elapsed().as_secs_f64();
    assert_eq!(e.counters().cache_misses, u64::from(flows), "every frame opened a flow");
    assert_eq!(forwarded, u64::from(flows));
    rate
}

/// Mixed traffic: `established` flows already cached, then passes over them in
/// which every `new_every`-th packet opens a new flow. Returns ns per packet.
fn run_mixed(established: u32, new_every: u32, passes: u32) -> f64 {
    let fresh = established * passes / new_every + 1;
    let (mut e, a) = engine((established + fresh) as usize);
    let ring = Ring::new(0..established + fresh);
    let frames = ring.frames();
    let (old, new) = frames.split_at(established as usize);
    let mut results = Results::new();
    for (i, f) in old.iter().enumerate() {
        e.process(i as u64, a, f, &mut (), &mut results);
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
            black_box(
                e.process(u64::from(established + p), a, black_box(f), &mut (), &mut results)
                    .disposition,
            );
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
    // `ENGINE_BENCH_ONLY=<flows>`: only the cache-hit run at that many flows,
    // long enough to profile (`perf record`).
    if let Some(flows) = std::env::var("ENGINE_BENCH_ONLY")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        // `ENGINE_BENCH_NEW=1`: new flows only, ten fresh engines in a row.
        if std::env::var_os("ENGINE_BENCH_NEW").is_some() {
            let best = |rates: Vec<f64>| rates.into_iter().fold(0.0, f64::max);
            let single = best((0..10).map(|_| run_new(flows)).collect());
            let batched = best((0..10).map(|_| run_new_batched(flows)).collect());
            println!("{{\"flows\":{flows},\"new_flows_per_s_best_of_10\":{single:.0},\"batched\":{batched:.0}}}");
            return;
        }
        let passes = std::env::var("ENGINE_BENCH_PASSES")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or((20_000_000 / flows.max(1)).max(2));
        // `ENGINE_BENCH_BATCHED=1`: the batched passes only.
        let single = std::env::var_os("ENGINE_BENCH_BATCHED").is_none();
        let (_, ns, batched) = run(flows, passes, single);
        if single {
            println!("{{\"flows\":{flows},\"cache_hit_ns_per_packet\":{ns:.1},\"batched\":{batched:.1}}}");
        } else {
            println!("{{\"flows\":{flows},\"batched\":{batched:.1}}}");
        }
        return;
    }
    // 2M packets: at 200 passes (10 ms) the 1k case moved between 50 and 80 ns from run to run.
    let (new_1k, hit_1k, batch_1k) = run(1_000, 2_000, true);
    let (new_100k, hit_100k, batch_100k) = run(100_000, 5, true);
    let (new_1m, hit_1m, batch_1m) = run(1_000_000, 2, true);
    let new_batched = [1_000, 100_000, 1_000_000].map(run_new_batched);
    let mixed = run_mixed(100_000, 10, 3);
    let mpps = |ns: f64| 1e3 / ns;
    println!(
        "{{\"cache_hit_ns_per_packet\":{{\"flows_1k\":{hit_1k:.1},\"flows_100k\":{hit_100k:.1},\"flows_1m\":{hit_1m:.1}}},\
         \"cache_hit_batched_ns_per_packet\":{{\"flows_1k\":{batch_1k:.1},\"flows_100k\":{batch_100k:.1},\"flows_1m\":{batch_1m:.1}}},\
         \"cache_hit_batched_mpps_per_core\":{{\"flows_1k\":{:.2},\"flows_100k\":{:.2},\"flows_1m\":{:.2}}},\
         \"new_flows_per_s\":{{\"flows_1k\":{new_1k:.0},\"flows_100k\":{new_100k:.0},\"flows_1m\":{new_1m:.0}}},\
         \"new_flows_per_s_batched\":{{\"flows_1k\":{:.0},\"flows_100k\":{:.0},\"flows_1m\":{:.0}}},\
         \"mixed_100k_established_10pct_new_ns_per_packet\":{mixed:.1}}}",
        mpps(batch_1k),
        mpps(batch_100k),
        mpps(batch_1m),
        new_batched[0],
        new_batched[1],
        new_batched[2]
    );
}

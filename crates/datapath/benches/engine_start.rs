//! What building an engine costs an agent's start: one worker's engine at
//! the agent's default table sizes (65,536 flows and 32,768 connections on
//! one worker, half each on the lab's two) and at a million, built and
//! dropped repeatedly. Reported per size: the first build's time and the
//! memory it left resident (from `/proc/self/statm`), as in an agent's start,
//! on memory fresh from the kernel; the median time of the builds after it
//! (on memory the allocator may have kept); and the median time of the first
//! flow opened in a new engine (which now faults in the pages its flow-cache
//! bucket and connection slot sit on). Sizes run largest first, so that no
//! earlier size's freed memory serves a first build.
//!
//! A restart after a crash builds one engine per worker before its first
//! new flow: tables written in full at creation made this phase tens of
//! milliseconds and tens of megabytes (`crate::table`).
//!
//! Prints one JSON line. Run with `cargo bench -p palisade-datapath --bench engine_start`.

mod common;

use std::time::{Duration, Instant};

use palisade_datapath::{Disposition, Results};

/// Resident bytes of this process.
fn resident() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let mut out = Vec::new();
    for (flows, conns) in [(1usize << 20, 1usize << 20), (65_536, 32_768), (32_768, 16_384)] {
        let runs = if flows > 100_000 { 5 } else { 15 };
        let (mut build, mut first, mut grew) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let before = resident();
            let t = Instant::now();
            let (mut e, a) = common::engine_sized(flows, conns);
            build.push(t.elapsed());
            grew.push(resident().saturating_sub(before));
            let f = common::frame(1);
            let mut results = Results::new();
            let t = Instant::now();
            e.process_batch(1, a, &[f.as_slice()], &mut (), &mut results);
            first.push(t.elapsed());
            assert_eq!(
                results.disposition(0),
                Some(Disposition::Forward),
                "the first flow opens"
            );
            drop(e);
        }
        out.push(format!(
            "{{\"flows\":{flows},\"conns\":{conns},\"first_build_us\":{:.0},\"first_build_resident_kib\":{},\"later_build_us\":{:.0},\"first_flow_us\":{:.0}}}",
            build[0].as_secs_f64() * 1e6,
            grew[0] / 1024,
            median(build[1..].to_vec()).as_secs_f64() * 1e6,
            median(first).as_secs_f64() * 1e6
        ));
    }
    println!("{{\"bench\":\"engine_start\",\"sizes\":[{}]}}", out.join(","));
}

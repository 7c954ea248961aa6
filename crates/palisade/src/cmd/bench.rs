//! `palisade bench`: benchmarks that print machine-readable results.
//!
//! `palisade bench classify` builds the fast packet classifier from a
//! ClassBench rule file, checks every header of a trace against the
//! linear-scan oracle, then measures build time, memory, single-core lookup
//! throughput (single and batched) and update rate. It exits non-zero when
//! any header got a different answer, so a benchmark script cannot report the
//! speed of a wrong classifier.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use palisade_classify::bench::{self, Options};
use palisade_classify::classbench;

/// `palisade bench` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum BenchCmd {
    /// Packet classifier on a ClassBench rule set and trace, checked against the oracle.
    Classify {
        /// ClassBench rule file (`@SRC/LEN DST/LEN SP : SP DP : DP PROTO/MASK FLAGS/MASK`).
        #[arg(long)]
        rules: PathBuf,
        /// ClassBench trace file (`SRC DST SPORT DPORT PROTO FLAGS FILTER_ID`).
        #[arg(long)]
        trace: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Minimum seconds per throughput measurement.
        #[arg(long, default_value_t = 0.5)]
        min_time: f64,
        /// Rules removed and re-inserted to measure the update rate.
        #[arg(long, default_value_t = 2000)]
        updates: usize,
    },
}

/// Run a `palisade bench` subcommand.
pub fn run(cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCmd::Classify {
            rules,
            trace,
            json,
            min_time,
            updates,
        } => classify(&rules, &trace, json, min_time, updates),
    }
}

fn classify(rules: &PathBuf, trace: &PathBuf, json: bool, min_time: f64, updates: usize) -> anyhow::Result<ExitCode> {
    let rule_set = classbench::load_rules(rules).context("loading rules")?;
    let headers = classbench::load_trace(trace).context("loading trace")?;
    let min_time = Duration::try_from_secs_f64(min_time).context("--min-time")?;
    let r = bench::run(&rule_set, &headers, Options { min_time, updates }).context("building the classifier")?;
    let per_rule = if r.rules == 0 {
        0.0
    } else {
        r.memory_bytes as f64 / r.rules as f64
    };
    if json {
        let v = serde_json::json!({
            "rules": r.rules,
            "trace": r.trace,
            "build_ms": round(r.build_ms, 3),
            "memory_bytes": r.memory_bytes,
            "bytes_per_rule": round(per_rule, 1),
            "mpps_single": round(r.mpps_single, 3),
            "mpps_batch": round(r.mpps_batch, 3),
            "updates_per_s": r.updates_per_s.round(),
            "mismatches": r.mismatches,
        });
        println!("{v}");
    } else {
        println!("rules:        {}", r.rules);
        println!("trace:        {} headers", r.trace);
        println!("mismatches:   {} (against the linear-scan oracle)", r.mismatches);
        println!("build:        {:.1} ms", r.build_ms);
        println!("memory:       {} bytes ({per_rule:.1} bytes/rule)", r.memory_bytes);
        println!(
            "lookup:       {:.2} Mpps single, {:.2} Mpps batched ({} keys/call), one core",
            r.mpps_single,
            r.mpps_batch,
            bench::BATCH
        );
        println!("updates:      {:.0} rules/s (removes and inserts)", r.updates_per_s);
    }
    if r.mismatches > 0 {
        eprintln!("palisade: {} headers differ from the oracle", r.mismatches);
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

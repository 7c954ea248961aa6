//! Audit store benchmark: one JSON line.
//!
//! Appends N records (`AUDIT_BENCH_RECORDS`, default 1,000,000; 10,000,000 is
//! the full-size run) in batches of 1000, each batch written and fdatasync'd,
//! checkpoints signed as the default config says (`AUDIT_BENCH_CHECKPOINT_EVERY`
//! and `AUDIT_BENCH_CHECKPOINT_INTERVAL_S` override it) and, with
//! `AUDIT_BENCH_HEAD=1`, each published to a head file; records spread over
//! 24 hours among 1000 VMs. Then times `verify` over the whole log (and its
//! peak RSS: the process's high-water mark is reset just before), opening a
//! reader, and queries for one VM over one hour (the first one separately: it
//! checks the segments it reads for the first time). `AUDIT_BENCH_SEGMENT_BYTES`
//! sets the segment size (default 64 MiB; 1 GiB shows verify's memory does not
//! follow the segment's size). Single-threaded: per-core figures.

use std::time::{Duration, Instant};

use palisade_audit::record::*;
use palisade_audit::{AuditConfig, AuditLog, LogReader, Query, verify};

const VMS: u64 = 1000;
const DAY_NS: u64 = 86_400_000_000_000;
const HOUR_NS: u64 = 3_600_000_000_000;
const T0: u64 = 1_700_000_000_000_000_000;

fn vm(v: u64) -> VmIdentity {
    VmIdentity {
        name: format!("vm-{v:04}"),
        uuid: format!("6d1f3c2a-8b7e-4c59-9a1d-{v:012}"),
        vnic: format!("vm-{v:04}.0"),
        zone: format!("zone-{}", v % 10),
        cluster: Some("prod".into()),
        host: Some(format!("hv{}", v % 20)),
        tags: [("tier".to_string(), format!("t{}", v % 3))].into(),
    }
}

/// Record `i` of `n`: a flow between two of the VMs (or to the internet),
/// times evenly spread over a day; the VM pair is a cheap hash of `i`.
fn record(i: u64, n: u64) -> Record {
    let h = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let (s, d) = (h % VMS, (h >> 20) % VMS);
    let t = T0 + i * (DAY_NS / n.max(1));
    Record::Flow(FlowRecord {
        appliance: None,
        time_ns: t,
        flow_id: i,
        host: format!("hv{}", s % 20),
        phase: Phase::Start,
        src: Endpoint {
            addr: std::net::Ipv4Addr::from(0x0a00_0000 + s as u32).into(),
            port: 32768 + (h % 28000) as u16,
            vm: Some(vm(s)),
        },
        dst: Endpoint {
            addr: std::net::Ipv4Addr::from(0x0a00_0000 + d as u32).into(),
            port: 443,
            vm: (h % 8 != 0).then(|| vm(d)),
        },
        protocol: 6,
        icmp: None,
        verdict: if h % 5 == 0 { Verdict::Deny } else { Verdict::Allow },
        decided_by: vec![Decision {
            rule: format!("rule-{}", h % 50),
            level: "zone".into(),
            policy_version: 7,
            chain: "egress".into(),
        }],
        packets_out: h % 1000,
        bytes_out: h % 1_000_000,
        packets_in: h % 900,
        bytes_in: h % 2_000_000,
        start_ns: t,
        last_ns: t,
    })
}

fn main() {
    let n: u64 = std::env::var("AUDIT_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let defaults = AuditConfig::default();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = &tmp.path().join("trail");
    let config = AuditConfig {
        segment_bytes: env("AUDIT_BENCH_SEGMENT_BYTES").unwrap_or(defaults.segment_bytes),
        checkpoint_every: env("AUDIT_BENCH_CHECKPOINT_EVERY").unwrap_or(defaults.checkpoint_every),
        checkpoint_interval: env("AUDIT_BENCH_CHECKPOINT_INTERVAL_S")
            .map_or(defaults.checkpoint_interval, Duration::from_secs),
        head_file: (env("AUDIT_BENCH_HEAD") == Some(1)).then(|| tmp.path().join("audit.head")),
        ..AuditConfig::default()
    };
    let mut log = AuditLog::open(dir, config.clone()).expect("open");
    let mut appending = Duration::ZERO;
    let mut batch = Vec::with_capacity(1000);
    let mut i = 0;
    while i < n {
        batch.clear();
        batch.extend((i..(i + 1000).min(n)).map(|j| record(j, n)));
        let t = Instant::now();
        log.append(&batch).expect("append");
        appending += t.elapsed();
        i += batch.len() as u64;
    }
    let status = log.status();
    drop(log);
    let bytes: u64 = palisade_audit::segment::list_segments(dir)
        .expect("list")
        .iter()
        .map(|(_, p)| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();

    // Reset the high-water mark of RSS (Linux: 5 > clear_refs), so VmHWM is verify's.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let t = Instant::now();
    let report = verify(dir, None).expect("verify");
    let verify_s = t.elapsed().as_secs_f64();
    let verify_peak_rss_mb = peak_rss_kb().map(|kb| (kb as f64 / 1024.0).round());
    assert!(report.is_ok() && report.records == n, "{:?}", report.problems);

    let t = Instant::now();
    let reader = LogReader::open(dir).expect("reader");
    let reader_open_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut lat = Vec::new();
    let mut first_ms = None;
    let mut found = 0;
    for k in 0..20u64 {
        let hour = k * 7 % 24;
        let q = Query {
            vm: Some(format!("vm-{:04}", k * 37 % VMS)),
            since_ns: Some(T0 + hour * HOUR_NS),
            until_ns: Some(T0 + (hour + 1) * HOUR_NS),
            ..Query::default()
        };
        let t = Instant::now();
        let r = reader.query(&q).expect("query");
        let ms = t.elapsed().as_secs_f64() * 1e3;
        first_ms.get_or_insert(ms);
        lat.push(ms);
        found += r.len();
    }
    lat.sort_by(f64::total_cmp);
    let out = serde_json::json!({
        "records": n,
        "log_bytes": bytes,
        "append_records_per_s_per_core": (n as f64 / appending.as_secs_f64()).round(),
        "append_batch": 1000,
        "checkpoint_every": config.checkpoint_every,
        "checkpoint_interval_s": config.checkpoint_interval.as_secs_f64(),
        "head_file": config.head_file.is_some(),
        "checkpoints_signed": report.checkpoints,
        "unsigned_at_end": status.unsigned_records,
        "segment_bytes": config.segment_bytes,
        "verify_peak_rss_mb": verify_peak_rss_mb,
        "verify_records_per_s": (n as f64 / verify_s).round(),
        "verify_mb_per_s": ((bytes as f64 / 1e6 / verify_s) * 10.0).round() / 10.0,
        "query_vm_1h_ms_first": first_ms.map(|ms| (ms * 1000.0).round() / 1000.0),
        "query_vm_1h_ms_median": (lat[lat.len() / 2] * 1000.0).round() / 1000.0,
        "query_vm_1h_ms_max": (lat[lat.len() - 1] * 1000.0).round() / 1000.0,
        "query_vm_1h_avg_results": found as f64 / lat.len() as f64,
        "reader_open_ms": (reader_open_ms * 10.0).round() / 10.0,
    });
    println!("{out}");
}

/// The process's peak resident set (VmHWM), in KiB.
fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

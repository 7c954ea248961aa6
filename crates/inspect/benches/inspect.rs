//! Inspection throughput on one core, and the memory a large ruleset takes.
//!
//! Traffic: (1) every capture of `../shared/pcaps` (recursively), decoded
//! once and replayed through the engine, flows keyed as the offline replay
//! keys them; (2) a synthetic web mix: HTTP/1.1 connections with 1,460-byte
//! segments, acknowledged, with response bodies of 2 to 60 KB. Rulesets:
//! the synthetic ones of `common/synth.rs` (10k and 40k rules, fixed seed).
//! Profiles: `off` (decode and flow lookup only: what a flow the policy does
//! not select costs), `critical` (priority 1) and `full`.
//!
//! Prints one JSON object: per traffic, ruleset and profile, Gbit/s and Mpps
//! of IP packets, alerts; per ruleset, build time and resident memory.
//! Run with `cargo bench -p palisade-inspect --bench inspect`
//! (`INSPECT_BENCH_QUICK=1`: 10k rules and one pass only; `INSPECT_BENCH_PASSES=N`;
//! `INSPECT_BENCH_PROFILES=off,critical`: only those;
//! `PCAPS=DIR` to read captures elsewhere).

#[path = "common/synth.rs"]
mod synth;

use std::collections::HashMap;
use std::hint::black_box;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use palisade_inspect::decode::{self, LinkType};
use palisade_inspect::packet::{Packet, TcpHeader, Transport, tcp_flags};
use palisade_inspect::rules::RuleContext;
use palisade_inspect::{Config, FlowState, Inspector, LoadOptions, ProfileSpec, RuleSet};
use palisade_io::capture::CaptureReader;

/// An owned, decoded packet.
struct Owned {
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    ttl: u8,
    transport: Transport,
    payload: Vec<u8>,
    fragment: bool,
    ip_len: usize,
    ts: Duration,
}

impl Owned {
    fn from(p: &Packet<'_>, ts: Duration) -> Owned {
        Owned {
            src: p.src,
            dst: p.dst,
            protocol: p.protocol,
            ttl: p.ttl,
            transport: p.transport,
            payload: p.payload.to_vec(),
            fragment: p.fragment,
            ip_len: p.ip_len,
            ts,
        }
    }

    fn view(&self) -> Packet<'_> {
        Packet {
            src: self.src,
            dst: self.dst,
            protocol: self.protocol,
            ttl: self.ttl,
            transport: self.transport,
            payload: &self.payload,
            fragment: self.fragment,
            ip_len: self.ip_len,
            checksum_ok: true,
        }
    }

    fn key(&self) -> (u8, (IpAddr, u16), (IpAddr, u16)) {
        let (sp, dp) = self.view().ports();
        let (a, b) = ((self.src, sp), (self.dst, dp));
        if a <= b {
            (self.protocol, a, b)
        } else {
            (self.protocol, b, a)
        }
    }
}

fn captures(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            captures(&p, out);
        } else if p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".pcap") || n.ends_with(".pcapng") || n.ends_with(".gz"))
        {
            out.push(p);
        }
    }
}

fn corpus(dir: &Path) -> Vec<Owned> {
    let mut files = Vec::new();
    captures(dir, &mut files);
    assert!(!files.is_empty(), "no captures under {}", dir.display());
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for f in files {
        let Ok(mut r) = CaptureReader::open(&f) else { continue };
        while let Some(Ok(meta)) = r.next_into(&mut buf) {
            let d = decode::decode(LinkType(meta.linktype.0), &buf, false);
            for p in &d.packets {
                out.push(Owned::from(p, meta.timestamp));
            }
        }
    }
    out
}

fn tcp(src: (IpAddr, u16), dst: (IpAddr, u16), seq: u32, ack: u32, flags: u8, payload: &[u8], ts: Duration) -> Owned {
    Owned {
        src: src.0,
        dst: dst.0,
        protocol: 6,
        ttl: 64,
        transport: Transport::Tcp(TcpHeader {
            src_port: src.1,
            dst_port: dst.1,
            seq,
            ack,
            flags,
            window: 65535,
            fast_open: false,
        }),
        payload: payload.to_vec(),
        fragment: false,
        ip_len: 40 + payload.len(),
        ts,
    }
}

/// Synthetic HTTP/1.1 connections, each fully acknowledged.
fn web_mix(conns: u32) -> Vec<Owned> {
    let mut rng = synth::Rng::new(7);
    let mut out = Vec::new();
    let ack = tcp_flags::ACK;
    let pa = tcp_flags::ACK | tcp_flags::PSH;
    for i in 0..conns {
        let c = (
            IpAddr::from([10, 1, (i >> 8) as u8, i as u8]),
            40000 + (i % 20000) as u16,
        );
        let s = (IpAddr::from([192, 0, 2, (i % 200) as u8 + 1]), 80);
        let ts = Duration::from_millis(u64::from(i));
        let (mut cs, mut ss) = (1000u32, 5000u32);
        out.push(tcp(c, s, cs, 0, tcp_flags::SYN, b"", ts));
        cs += 1;
        out.push(tcp(s, c, ss, cs, tcp_flags::SYN | ack, b"", ts));
        ss += 1;
        out.push(tcp(c, s, cs, ss, ack, b"", ts));
        let req = format!(
            "GET /{}/{}.php?id={} HTTP/1.1\r\nHost: www.{}.example\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) {}\r\nAccept: */*\r\nAccept-Encoding: gzip\r\nCookie: session={}\r\n\r\n",
            synth::word(&mut rng, 4, 10),
            synth::word(&mut rng, 4, 12),
            rng.below(100_000),
            synth::word(&mut rng, 4, 10),
            synth::word(&mut rng, 8, 16),
            synth::word(&mut rng, 16, 32),
        );
        out.push(tcp(c, s, cs, ss, pa, req.as_bytes(), ts));
        cs += req.len() as u32;
        out.push(tcp(s, c, ss, cs, ack, b"", ts));
        let body_len = 2_000 + rng.below(58_000) as usize;
        let mut resp =
            format!("HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {body_len}\r\n\r\n").into_bytes();
        while resp.len() < body_len {
            resp.extend_from_slice(synth::word(&mut rng, 3, 9).as_bytes());
            resp.push(b' ');
        }
        for (k, seg) in resp.chunks(1460).enumerate() {
            out.push(tcp(s, c, ss, cs, if k % 8 == 7 { pa } else { ack }, seg, ts));
            ss += seg.len() as u32;
            if k % 2 == 1 {
                out.push(tcp(c, s, cs, ss, ack, b"", ts));
            }
        }
        out.push(tcp(c, s, cs, ss, tcp_flags::FIN | ack, b"", ts));
        cs += 1;
        out.push(tcp(s, c, ss, cs, tcp_flags::FIN | ack, b"", ts));
        ss += 1;
        out.push(tcp(c, s, cs, ss, ack, b"", ts));
    }
    out
}

/// (Gbit/s, Mpps, alerts) of `passes` runs over `packets`; `None` inspector: decode and flow lookup only.
fn measure(packets: &[Owned], mut insp: Option<&mut Inspector>, profile: u16, passes: u32) -> (f64, f64, u64) {
    let bytes: u64 = packets.iter().map(|p| p.ip_len as u64).sum();
    let mut alerts = Vec::new();
    let mut total_alerts = 0u64;
    let t = Instant::now();
    for _ in 0..passes {
        let mut flows: HashMap<_, FlowState, foldhash::fast::RandomState> = HashMap::default();
        for p in packets {
            let view = p.view();
            let flow = flows
                .entry(p.key())
                .or_insert_with(|| FlowState::new(palisade_inspect::ProfileId(profile), &view));
            if let Some(i) = insp.as_deref_mut() {
                alerts.clear();
                let _ = black_box(i.inspect(flow, &view, p.ts, &mut alerts));
                total_alerts += alerts.len() as u64;
            } else {
                black_box(flow.direction(&view));
            }
        }
        if let Some(i) = insp.as_deref_mut() {
            for f in flows.values_mut() {
                alerts.clear();
                let _ = black_box(i.flush(f, Duration::ZERO, &mut alerts));
                total_alerts += alerts.len() as u64;
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let n = packets.len() as f64 * f64::from(passes);
    (
        bytes as f64 * 8.0 * f64::from(passes) / secs / 1e9,
        n / secs / 1e6,
        total_alerts / u64::from(passes),
    )
}

/// Resident set size, bytes.
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let quick = std::env::var_os("INSPECT_BENCH_QUICK").is_some();
    let pcaps = std::env::var_os("PCAPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/pcaps"));
    let corpus = corpus(&pcaps);
    let web = web_mix(if quick { 200 } else { 1000 });
    let traffic: [(&str, &[Owned]); 2] = [("pcaps", &corpus), ("web_mix", &web)];
    let mut results = Vec::new();
    let sizes: &[usize] = if quick { &[10_000] } else { &[10_000, 40_000] };
    let passes = std::env::var("INSPECT_BENCH_PASSES")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(if quick { 1 } else { 3 });
    let mut sets = Vec::new();
    for &n in sizes {
        let text = synth::ruleset(n, 0x5eed);
        let before = rss();
        let t = Instant::now();
        let rules = Arc::new(
            RuleSet::parse(&text, &RuleContext::default(), LoadOptions::default()).expect("synthetic rules load"),
        );
        let insp = Inspector::new(
            rules.clone(),
            vec![ProfileSpec::full(), ProfileSpec::critical()],
            Config::default(),
        )
        .expect("profiles compile");
        let build = t.elapsed().as_secs_f64();
        let grown = rss().saturating_sub(before);
        let full = insp.detector(palisade_inspect::ProfileId(0));
        let critical = insp.detector(palisade_inspect::ProfileId(1));
        sets.push(serde_json::json!({
            "rules": n,
            "build_s": build,
            "rss_growth_mib": grown as f64 / (1 << 20) as f64,
            "prefilter_mib_full": full.memory_usage() as f64 / (1 << 20) as f64,
            "prefilter_mib_critical": critical.memory_usage() as f64 / (1 << 20) as f64,
            "critical_selected": critical.selected(),
            "critical_silent_dependencies": critical.dependencies(),
            "without_fast_pattern": full.without_fast_pattern(),
        }));
        let mut insp = insp;
        for (name, pkts) in traffic {
            let only = std::env::var("INSPECT_BENCH_PROFILES").ok();
            for (profile, id) in [("off", None), ("critical", Some(1u16)), ("full", Some(0u16))] {
                if only.as_deref().is_some_and(|o| !o.split(',').any(|p| p == profile)) {
                    continue;
                }
                let (gbps, mpps, alerts) = match id {
                    None => measure(pkts, None, 0, passes),
                    Some(p) => measure(pkts, Some(&mut insp), p, passes),
                };
                results.push(serde_json::json!({
                    "traffic": name,
                    "packets": pkts.len(),
                    "rules": n,
                    "profile": profile,
                    "gbit_per_s": gbps,
                    "mpps": mpps,
                    "alerts": alerts,
                }));
                eprintln!("{name:8} {n:>6} rules {profile:9} {gbps:7.2} Gbit/s {mpps:6.3} Mpps {alerts} alerts");
            }
        }
    }
    let report = serde_json::json!({
        "bench": "inspect",
        "cpu": std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())),
        "corpus_packets": corpus.len(),
        "corpus_mbytes": corpus.iter().map(|p| p.ip_len).sum::<usize>() as f64 / 1e6,
        "rulesets": sets,
        "results": results,
    });
    println!("{report}");
}

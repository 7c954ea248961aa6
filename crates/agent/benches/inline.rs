//! The agent's inline path on one core: each frame through the engine, then,
//! for a flow the policy selects, through the worker's inspector, as
//! `worker::inspect_and_stage` does (rendering and sending left out).
//!
//! Traffic: synthetic HTTP/1.1 connections between two VMs of one zone
//! (handshake, a request, a 2 to 60 KB response in 1,460-byte segments,
//! acknowledged every second segment, FIN), fixed seed. Rulesets: the
//! synthetic ones of `palisade-inspect`'s benchmark (10k and 40k rules,
//! fixed seed). The zone's `intra_zone` default is the profile: `none` (the
//! off path: the engine only), `critical`, `full`.
//!
//! Prints one JSON object: per ruleset and profile, Gbit/s (Ethernet frame
//! bytes) and Mpps, per wall-clock second and per second of the thread's
//! CPU time (the per-core figure on a shared machine); per ruleset, the resident memory its compiled
//! signatures added. `cargo bench -p palisade-agent --bench inline`
//! (`INLINE_BENCH_QUICK=1`: 10k rules and one pass; `INLINE_BENCH_PASSES=N`).

#[path = "../../inspect/benches/common/synth.rs"]
mod synth;

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use palisade_agent::inspection::{Inline, InlineSetup, Signatures};
use palisade_agent::records::{Clock, Identities};
use palisade_datapath::port::{self, UplinkConfig};
use palisade_datapath::{Disposition, Engine, EngineConfig, FlowEvent, PolicyLookup, Results};
use palisade_inspect::classification::Classifications;
use palisade_policy::compile::Compiler;
use palisade_policy::model::Model;
use palisade_policy::{MemorySource, load};
use palisade_testkit::engine::tcp_v4_frame;
use palisade_wire::ethernet::EthernetAddress;
use palisade_wire::tcp::TcpFlags;

fn policy(profile: &str) -> String {
    format!(
        r#"
version: 1
datacenter: {{ name: dc1, default: deny }}
zones: [{{ name: web, vlan: 100 }}]
vms:
  - {{ name: a, uuid: 00000000-0000-4000-8000-00000000000a, host: h1, vnics: [{{ name: a.0, mac: "02:00:00:00:00:0a", ips: [10.0.0.10], zone: web }}] }}
  - {{ name: b, uuid: 00000000-0000-4000-8000-00000000000b, host: h1, vnics: [{{ name: b.0, mac: "02:00:00:00:00:0b", ips: [10.0.0.11], zone: web }}] }}
groups: {{ web: {{ zone: web }} }}
profiles:
  full: {{ signatures: [all] }}
  critical: {{ signatures: [critical] }}
  none: {{ signatures: [] }}
inspection_defaults: {{ intra_zone: {profile} }}
rules:
  datacenter:
    - {{ id: web-http, from: web, to: web, service: tcp/80, action: allow }}
"#
    )
}

const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);

/// A frame, and whether it is from the client (vNIC a).
struct Frame {
    bytes: Vec<u8>,
    from_a: bool,
}

fn frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), seq: u32, ack: u32, flags: TcpFlags, data: &[u8]) -> Frame {
    let end = |(ip, port): (Ipv4Addr, u16)| ([2, 0, 0, 0, 0, ip.octets()[3]], ip, port);
    Frame {
        bytes: tcp_v4_frame(end(src), end(dst), (seq, ack), flags, data),
        from_a: src.0 == A,
    }
}

/// `conns` HTTP connections a → b:80, one after the other.
fn web_mix(conns: u32) -> Vec<Frame> {
    let mut rng = synth::Rng::new(7);
    let mut out = Vec::new();
    let (ack, pa) = (TcpFlags::ACK, TcpFlags::ACK | TcpFlags::PSH);
    for i in 0..conns {
        let c = (A, 20000 + (i % 40000) as u16);
        let s = (B, 80);
        let (mut cs, mut ss) = (1000u32, 5000u32);
        out.push(frame(c, s, cs, 0, TcpFlags::SYN, b""));
        cs += 1;
        out.push(frame(s, c, ss, cs, TcpFlags::SYN | ack, b""));
        ss += 1;
        out.push(frame(c, s, cs, ss, ack, b""));
        let req = format!(
            "GET /{}/{}.php?id={} HTTP/1.1\r\nHost: www.{}.example\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) {}\r\nAccept: */*\r\nAccept-Encoding: gzip\r\nCookie: session={}\r\n\r\n",
            synth::word(&mut rng, 4, 10),
            synth::word(&mut rng, 4, 12),
            rng.below(100_000),
            synth::word(&mut rng, 4, 10),
            synth::word(&mut rng, 8, 16),
            synth::word(&mut rng, 16, 32),
        );
        out.push(frame(c, s, cs, ss, pa, req.as_bytes()));
        cs += req.len() as u32;
        out.push(frame(s, c, ss, cs, ack, b""));
        let body_len = 2_000 + rng.below(58_000) as usize;
        let mut resp =
            format!("HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {body_len}\r\n\r\n").into_bytes();
        while resp.len() < body_len {
            resp.extend_from_slice(synth::word(&mut rng, 3, 9).as_bytes());
            resp.push(b' ');
        }
        for (k, seg) in resp.chunks(1460).enumerate() {
            out.push(frame(s, c, ss, cs, if k % 8 == 7 { pa } else { ack }, seg));
            ss += seg.len() as u32;
            if k % 2 == 1 {
                out.push(frame(c, s, cs, ss, ack, b""));
            }
        }
        out.push(frame(c, s, cs, ss, TcpFlags::FIN | ack, b""));
        cs += 1;
        out.push(frame(s, c, ss, cs, TcpFlags::FIN | ack, b""));
        ss += 1;
        out.push(frame(c, s, cs, ss, ack, b""));
    }
    out
}

fn model(profile: &str) -> Model {
    let loaded = load(&MemorySource::new().with("p.yaml", policy(profile))).unwrap();
    assert!(!loaded.has_errors(), "{}", loaded.render());
    loaded.model
}

fn engine(model: &Model) -> Engine {
    let mut e = Engine::new(
        EngineConfig::new(UplinkConfig {
            local_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 1]),
            local_ip: Ipv4Addr::new(192, 168, 0, 1),
            gateway_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 0xfe]),
            flood: vec![],
        }),
        Box::new(PolicyLookup::new(Compiler::new(model.clone()).unwrap())),
    );
    for nic in ["a.0", "b.0"] {
        e.add_vnic(port::vnic_from_model(model, nic, &[], 1_000_000).unwrap())
            .unwrap();
    }
    e
}

/// This thread's CPU time, seconds.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write; the clock id is a constant the kernel knows.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(0)
        * 4096
}

struct Run {
    gbps: f64,
    mpps: f64,
    /// The same per second of this thread's CPU time: what one core does
    /// when the machine is shared (wall time counts the time others ran).
    cpu_gbps: f64,
    cpu_mpps: f64,
    inspected: u64,
    alerts: u64,
    dropped: u64,
}

/// One profile: `passes` runs over `frames`, a fresh engine and inspector each.
fn measure(frames: &[Frame], model: &Model, sigs: &Arc<Signatures>, passes: u32) -> Run {
    let bytes: u64 = frames.iter().map(|f| f.bytes.len() as u64).sum();
    let identities = Identities::new(model);
    let (mut elapsed, mut cpu, mut inspected, mut alerts, mut dropped) = (0f64, 0f64, 0, 0, 0);
    let mut results = Results::with_capacity(1);
    let mut events: Vec<FlowEvent> = Vec::new();
    for _ in 0..passes {
        let mut e = engine(model);
        let (pa, pb) = (e.port_of("a.0").unwrap(), e.port_of("b.0").unwrap());
        let mut inline = Inline::new(InlineSetup {
            signatures: sigs.clone(),
            budget_bytes_per_s: None,
            stream_memory: 256 << 20,
            max_flows: 65_536,
            fail_closed: vec![false; 3].into(),
            host: "h1".into(),
            clock: Clock { unix_at_zero: 0 },
        });
        let t = Instant::now();
        let c = thread_cpu();
        for (i, f) in frames.iter().enumerate() {
            let port = if f.from_a { pa } else { pb };
            let now = i as u64 * 1_000;
            let p = e.process(now, port, black_box(&f.bytes), &mut events, &mut results);
            match p.disposition {
                Disposition::Forward if p.inspection().is_some() => {
                    black_box(inline.frame(&mut e, &p, port, now, &identities, &mut events));
                }
                Disposition::Forward => {}
                Disposition::Drop(_) => dropped += 1,
            }
            events.clear();
        }
        elapsed += t.elapsed().as_secs_f64();
        cpu += thread_cpu() - c;
        inspected += inline.counters().packets;
        alerts += inline.counters().alerts;
    }
    let n = f64::from(passes);
    Run {
        gbps: bytes as f64 * 8.0 * n / elapsed / 1e9,
        mpps: frames.len() as f64 * n / elapsed / 1e6,
        cpu_gbps: bytes as f64 * 8.0 * n / cpu / 1e9,
        cpu_mpps: frames.len() as f64 * n / cpu / 1e6,
        inspected: inspected / u64::from(passes),
        alerts: alerts / u64::from(passes),
        dropped: dropped / u64::from(passes),
    }
}

fn main() {
    let quick = std::env::var_os("INLINE_BENCH_QUICK").is_some();
    let passes: u32 = std::env::var("INLINE_BENCH_PASSES")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(if quick { 1 } else { 3 });
    let frames = web_mix(if quick { 200 } else { 1000 });
    let sizes: &[usize] = if quick { &[10_000] } else { &[10_000, 40_000] };
    let mut rows = Vec::new();
    let mut memory = Vec::new();
    for &n in sizes {
        let text = synth::ruleset(n, 0x5eed);
        let mut per_profile = Vec::new();
        let before = rss();
        let t = Instant::now();
        // Every profile of the policy is compiled with the signatures (as the agent does).
        let m = model("full");
        let sigs = Arc::new(
            Signatures::compile(
                &text,
                Path::new("synthetic.rules"),
                Classifications::default(),
                true,
                &m,
            )
            .unwrap(),
        );
        let build_s = t.elapsed().as_secs_f64();
        let added = rss().saturating_sub(before);
        memory.push(serde_json::json!({
            "rules": n, "loaded": sigs.len(), "refused": sigs.refused,
            "build_s": build_s, "rss_added_mib": added as f64 / (1 << 20) as f64,
        }));
        for profile in ["none", "critical", "full"] {
            let m = model(profile);
            let r = measure(&frames, &m, &sigs, passes);
            eprintln!(
                "{n} rules, profile {profile}: {:.3} Gbit/s, {:.3} Mpps wall; {:.3} Gbit/s, {:.3} Mpps per CPU second ({} frames inspected, {} alerts, {} dropped by the engine)",
                r.gbps, r.mpps, r.cpu_gbps, r.cpu_mpps, r.inspected, r.alerts, r.dropped
            );
            per_profile.push(serde_json::json!({
                "profile": profile, "gbps": r.gbps, "mpps": r.mpps,
                "cpu_gbps": r.cpu_gbps, "cpu_mpps": r.cpu_mpps,
                "inspected": r.inspected, "alerts": r.alerts, "engine_drops": r.dropped,
            }));
        }
        rows.push(serde_json::json!({ "rules": n, "profiles": per_profile }));
        drop(sigs);
    }
    let bytes: usize = frames.iter().map(|f| f.bytes.len()).sum();
    println!(
        "{}",
        serde_json::json!({
            "traffic": { "frames": frames.len(), "bytes": bytes, "passes": passes },
            "runs": rows,
            "memory": memory,
        })
    );
}

//! What a live migration's pause pays for the VM's inspection state: 1,000
//! inspected flows (each a TCP connection mid-way through an HTTP request),
//! of which a few talk on between the pre-copy and the pause.
//!
//! Per run: the source pre-copies every flow while the guest runs
//! (`Inline::precopy_vnic_flows`, not in the pause), the destination holds
//! it (`carry::stage`); `INSPECTION_PAUSE_CHANGED` flows (default 10) get
//! one more segment; then, timed, the pause's part: the source's delta
//! (`Inline::delta_vnic_flows` and encoding) and the destination's apply
//! (`carry::stage` of the delta and `carry::commit_staged`). The same
//! state moved whole in the pause (`export_vnic_flows`, `carry::encode`;
//! `carry::import`) is timed beside it. Each time as wall and as this
//! thread's CPU time (on a shared machine the two differ).
//!
//! Prints one JSON object: section bytes, and p50/p99 (µs) of each over
//! `INSPECTION_PAUSE_RUNS` runs (default 30).
//! `cargo bench -p palisade-agent --bench inspection_pause` (`--profile dev` works too).

#[path = "../tests/migrating_host/mod.rs"]
#[allow(dead_code)]
mod migrating_host;

use std::time::Instant;

use migrating_host::{Conn, MS, host, model};
use palisade_agent::inspection::carry::{self, SectionKind};

fn thread_cpu_us() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// Wall and CPU µs of `f`.
fn timed<T>(f: impl FnOnce() -> T) -> (T, (u64, u64)) {
    let (t, c) = (Instant::now(), thread_cpu_us());
    let out = f();
    (out, (t.elapsed().as_micros() as u64, thread_cpu_us() - c))
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn pct(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let runs = env("INSPECTION_PAUSE_RUNS", 30).max(1);
    let flows = 1000usize;
    let changed = env("INSPECTION_PAUSE_CHANGED", 10).min(flows);
    let m = model();
    let mut src = host(&m, "h1");
    let mut now = MS;
    let mut conns = Vec::with_capacity(flows);
    for i in 0..flows {
        let mut c = Conn::open(&mut src, 20000 + i as u16, now);
        let _ = c.send(
            &mut src,
            b"GET /index.html HTTP/1.1\r\nHost: b\r\nUser-Agent: t\r\n\r\nLOGIN ",
            now,
        );
        conns.push(c);
        now += MS / 100;
    }
    assert_eq!(src.inline.flows(), flows);
    let port = src.engine.port_of("a.0").unwrap();
    // (wall, cpu) per measure.
    let mut series: [(Vec<u64>, Vec<u64>); 4] = Default::default();
    let (mut delta_bytes, mut whole_bytes, mut precopy_bytes, mut delta_flows) = (0, 0, 0, 0);
    for run in 0..runs {
        let mut dst = host(&m, "h2");
        let mut pre = Vec::new();
        let mark = src.inline.precopy_vnic_flows(&src.engine, port, now, &mut pre);
        let pre = carry::encode_section("a.0", SectionKind::Precopy, &pre, &[]);
        precopy_bytes = pre.len();
        carry::stage(&mut [Some(&mut dst.inline)], "a.0", &pre, now).unwrap();
        for k in 0..changed {
            now += MS / 100;
            let c = &mut conns[(run * changed + k) % flows];
            let _ = c.send(&mut src, b"x", now);
        }
        now += MS;
        let (delta, source) = timed(|| {
            let (mut out, mut gone) = (Vec::new(), Vec::new());
            src.inline
                .delta_vnic_flows(&src.engine, port, now, &mark, &mut out, &mut gone)
                .unwrap();
            (out.len(), carry::encode_section("a.0", SectionKind::Delta, &out, &gone))
        });
        delta_flows = delta.0;
        delta_bytes = delta.1.len();
        let (n, destination) = timed(|| {
            carry::stage(&mut [Some(&mut dst.inline)], "a.0", &delta.1, now).unwrap();
            carry::commit_staged(&mut [Some(&mut dst.inline)], "a.0", now)
        });
        assert_eq!(n, flows);
        let (whole, whole_source) = timed(|| {
            let mut out = Vec::new();
            src.inline.export_vnic_flows(&src.engine, port, now, &mut out);
            carry::encode("a.0", &out)
        });
        whole_bytes = whole.len();
        let mut dst2 = host(&m, "h3");
        let (done, whole_destination) =
            timed(|| carry::import(&mut [Some(&mut dst2.inline)], "a.0", &whole, now).unwrap());
        assert_eq!(done.flows, flows);
        for (s, (w, c)) in series
            .iter_mut()
            .zip([source, destination, whole_source, whole_destination])
        {
            s.0.push(w);
            s.1.push(c);
        }
    }
    let names = ["delta_source", "delta_destination", "whole_source", "whole_destination"];
    let mut fields = vec![
        format!("\"runs\":{runs}"),
        format!("\"flows\":{flows}"),
        format!("\"changed\":{changed}"),
        format!("\"delta_flows\":{delta_flows}"),
        format!("\"precopy_bytes\":{precopy_bytes}"),
        format!("\"delta_bytes\":{delta_bytes}"),
        format!("\"whole_bytes\":{whole_bytes}"),
    ];
    for (name, (w, c)) in names.iter().zip(series.iter_mut()) {
        fields.push(format!(
            "\"{name}_us\":{{\"wall_p50\":{},\"wall_p99\":{},\"cpu_p50\":{},\"cpu_p99\":{}}}",
            pct(w, 0.5),
            pct(w, 0.99),
            pct(c, 0.5),
            pct(c, 0.99)
        ));
    }
    println!("{{{}}}", fields.join(","));
}

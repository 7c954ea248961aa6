//! The cost of software segmentation and coalescing, per 64 KiB super-frame.
//!
//! `cargo bench -p palisade-io --bench gso` prints one JSON line, ns per
//! super-frame (a 65,000-byte TCP/IPv4 payload in 45 segments of 1448 bytes
//! behind Ethernet, IPv4 and TCP with timestamps, 66 bytes of headers):
//! - `segment_vxlan_ns`: `gso::segment` with an 8-byte VXLAN prefix, i.e. the
//!   45 datagrams of one `UDP_SEGMENT` send, headers rewritten and checksums
//!   complete;
//! - `coalesce_ns`: those 45 datagrams through a `Coalescer` back into one
//!   super-frame (every segment's checksums verified);
//! - `plain_ns`: `PlainFrames::deliver` cutting the super-frame into plain
//!   frames (what a plain receiver of a vnet-header port pays);
//! - `copy_ns`: one `memcpy` of the super-frame, for scale;
//! - the same per segment and in Gbit/s of payload for one core.
//!
//! IPv6 figures follow with `_v6`.
//!
//! Run any other way (`cargo test --all-targets`), it does a short smoke run.

#[path = "../tests/support/gso_props.rs"]
mod props;

use std::hint::black_box;
use std::time::Instant;

use palisade_io::gso::{self, Coalescer};
use palisade_io::{PlainFrames, PortStats, RxFrame};
use props::{Spec, build};

/// ns per call of `f`, over `iters` calls after a warm-up of a tenth.
fn time(iters: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..iters / 10 + 1 {
        f();
    }
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    start.elapsed().as_nanos() as f64 / f64::from(iters)
}

fn measure(spec: &Spec, iters: u32) -> (f64, f64, f64, f64, usize, usize) {
    let (frame, offload) = build(spec);
    let prefix = spec.prefix;
    let mut out = Vec::with_capacity(1 << 17);
    let segs = gso::segment(&frame, &offload, &prefix, &mut out, 1 << 20).unwrap();
    let datagrams: Vec<Vec<u8>> = segs.iter(&out).map(<[u8]>::to_vec).collect();
    let segment_ns = time(iters, || {
        out.clear();
        black_box(gso::segment(black_box(&frame), &offload, &prefix, &mut out, 1 << 20).unwrap());
    });
    let mut c = Coalescer::new(8);
    let mut merged = 0usize;
    let coalesce_ns = time(iters, || {
        for d in &datagrams {
            c.push(d, &mut |b, _| merged += b.len());
        }
        c.flush(&mut |b, _| merged += b.len());
    });
    assert_eq!(c.stats().merged_frames, c.stats().packets_in / datagrams.len() as u64);
    let mut plain = PlainFrames::default();
    let mut stats = PortStats::default();
    let rx = [RxFrame { bytes: &frame, offload }];
    let plain_ns = time(iters, || {
        let mut n = 0;
        plain.deliver(&rx, &mut stats, &mut |fs| n += fs.len());
        black_box(n);
    });
    let mut copy = vec![0u8; frame.len()];
    let copy_ns = time(iters, || {
        copy.copy_from_slice(black_box(&frame));
        black_box(&copy);
    });
    black_box(merged);
    (
        segment_ns,
        coalesce_ns,
        plain_ns,
        copy_ns,
        datagrams.len(),
        spec.payload_len,
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let iters = if std::env::args().any(|a| a == "--bench") {
        20_000
    } else {
        50
    };
    let mut fields = Vec::new();
    for (suffix, spec) in [
        ("", Spec::default()),
        (
            "_v6",
            Spec {
                v6: true,
                ..Spec::default()
            },
        ),
    ] {
        let (seg, coal, plain, copy, n, payload) = measure(&spec, iters);
        let gbps = |ns: f64| payload as f64 * 8.0 / ns;
        fields.push(format!(
            "\"segments{suffix}\":{n},\"segment_vxlan_ns{suffix}\":{seg:.0},\"coalesce_ns{suffix}\":{coal:.0},\
             \"plain_ns{suffix}\":{plain:.0},\"copy_ns{suffix}\":{copy:.0},\"segment_ns_per_packet{suffix}\":{:.1},\
             \"coalesce_ns_per_packet{suffix}\":{:.1},\"segment_gbps{suffix}\":{:.1},\"coalesce_gbps{suffix}\":{:.1}",
            seg / n as f64,
            coal / n as f64,
            gbps(seg),
            gbps(coal)
        ));
    }
    println!(
        "{{\"bench\":\"gso\",\"payload\":65000,\"mss\":1448,{}}}",
        fields.join(",")
    );
}

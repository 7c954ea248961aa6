//! Flow-key extraction speed over real traffic: every Ethernet frame of the
//! shared capture corpus (`../shared/pcaps`), extracted in a loop for at least
//! a second. Prints one JSON line: frames, ns/packet and Mpps for the fast-path
//! extractor, the frames its fixed-offset common case takes and ns/packet
//! the way the engine calls it (common case first), and the full dissector
//! as a comparison.
//!
//! It lives in the io crate, which reads the captures, so that the wire
//! crate depends on nothing.
//!
//! Run: `cargo bench -p palisade-io --bench flow_key`.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use palisade_io::capture::{CaptureReader, LinkType};
use palisade_wire::flow;
use palisade_wire::frame::Dissection;

fn load_frames(root: &Path) -> (Vec<u8>, Vec<(usize, usize)>) {
    let mut data = Vec::new();
    let mut spans = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    let mut buf = Vec::new();
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .expect("read corpus dir")
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let Ok(mut reader) = CaptureReader::open(&path) else {
                continue;
            };
            while let Some(Ok(meta)) = reader.next_into(&mut buf) {
                if meta.linktype == LinkType::ETHERNET {
                    spans.push((data.len(), buf.len()));
                    data.extend_from_slice(&buf);
                }
            }
        }
    }
    (data, spans)
}

/// Run `f` over every frame until at least `min` has passed; return ns per frame.
fn time_per_frame(data: &[u8], spans: &[(usize, usize)], min: Duration, mut f: impl FnMut(&[u8])) -> f64 {
    let start = Instant::now();
    let mut frames = 0u64;
    while start.elapsed() < min {
        for &(at, len) in spans {
            f(&data[at..at + len]);
        }
        frames += spans.len() as u64;
    }
    start.elapsed().as_nanos() as f64 / frames as f64
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/pcaps");
    assert!(root.is_dir(), "captures missing at {}", root.display());
    let (data, spans) = load_frames(&root);
    let keyed = spans
        .iter()
        .filter(|&&(at, len)| matches!(flow::extract(&data[at..at + len]), Ok(Some(_))))
        .count();
    let extract_ns = time_per_frame(&data, &spans, Duration::from_secs(2), |f| {
        let _ = black_box(flow::extract(black_box(f)));
    });
    // The engine's way: the fixed-offset common case first, the general
    // extractor for the rest.
    let quick = spans
        .iter()
        .filter(|&&(at, len)| flow::extract_quick(&data[at..at + len]).is_some())
        .count();
    let quick_then_general_ns = time_per_frame(&data, &spans, Duration::from_secs(2), |f| {
        let f = black_box(f);
        let _ = black_box(flow::extract_quick(f).map_or_else(|| flow::extract(f), |i| Ok(Some(i))));
    });
    let dissect_ns = time_per_frame(&data, &spans, Duration::from_secs(1), |f| {
        black_box(Dissection::ethernet(black_box(f)));
    });
    let hash_ns = time_per_frame(&data, &spans, Duration::from_secs(1), |f| {
        if let Ok(Some(info)) = flow::extract(black_box(f)) {
            black_box(info.key.symmetric_hash());
        }
    });
    println!(
        "{{\"bench\":\"wire.flow_key\",\"frames\":{},\"bytes\":{},\"extract_ns_per_packet\":{:.2},\"extract_mpps\":{:.2},\"extract_plus_symmetric_hash_ns\":{:.2},\"dissect_ns_per_packet\":{:.2},\"ip_frames_keyed\":{},\"quick_frames\":{},\"quick_then_general_ns_per_packet\":{:.2}}}",
        spans.len(),
        data.len(),
        extract_ns,
        1e3 / extract_ns,
        hash_ns,
        dissect_ns,
        keyed,
        quick,
        quick_then_general_ns
    );
}

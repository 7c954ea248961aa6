//! Frames per second through AF_PACKET ports on a veth pair (run as root).
//!
//! `cargo bench -p palisade-io --bench veth` prints one JSON line:
//! - `blast`: one port blasts 64-byte frames (batches of 256, one `sendmmsg`
//!   each) into `vb` while another drains `va` (`recv_batch`, the agent's
//!   call), concurrently, for a few seconds: `rx_fps`/`tx_fps`, and
//!   `kernel_drops`, what the receiver lost; with virtio-net headers from
//!   the socket queue (`vnet`, the default), the same from a TPACKET_V3 ring
//!   (`vnet_ring`, `RxMode::Ring`) and without headers (`plain`), alternated
//!   twice, to show what the header and the receive mode cost small frames.
//! - `tx_only_batch256_fps` / `tx_only_batch1_fps`: the sender alone, with 256
//!   frames per `sendmmsg` and with one call per frame, to show what batching buys.
//! - `port_rss_kib` / `plain_port_rss_kib`: how much the process's resident
//!   memory grows when one port opens, with the default configuration
//!   (virtio-net headers, 64 KiB frames, the socket queue: 64 message slots of
//!   64 KiB, mapped as frames fill them; a 1 MiB transmit queue) and with `AfPacketConfig::plain()` (2 KiB frames, 512 KiB queue).

//!
//! Run any other way (`cargo test --all-targets`), it does a one-tenth-length smoke run.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::Netns;
use palisade_io::{AfPacket, AfPacketConfig, FramePort, RxMode, wait_readable};

const FRAME_LEN: usize = 64;
const MARK: u16 = 0x88b5;

fn frame(seq: u32) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0xaa]);
    f[12..14].copy_from_slice(&MARK.to_be_bytes());
    f[14..18].copy_from_slice(&seq.to_be_bytes());
    f
}

/// Send batches of `batch` frames until `stop`; returns (frames handed to the kernel, errors, seconds).
fn blast(port: &mut AfPacket, batch: usize, stop: &AtomicBool) -> (u64, u64, f64) {
    let start = Instant::now();
    let mut seq = 0u32;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..batch {
            seq = seq.wrapping_add(1);
            // Errors are counted in the port's stats; a full socket buffer is not fatal here.
            let _ = port.send(&frame(seq));
        }
        let _ = port.flush();
    }
    let s = port.stats();
    (s.tx_frames, s.tx_errors, start.elapsed().as_secs_f64())
}

fn tx_only(ns: &Netns, batch: usize, seconds: f64) -> f64 {
    let mut tx = ns.enter(|| AfPacket::open("vb", &AfPacketConfig::default())).unwrap();
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let h = s.spawn(|| blast(&mut tx, batch, &stop));
        thread::sleep(Duration::from_secs_f64(seconds));
        stop.store(true, Ordering::Relaxed);
        let (frames, _, secs) = h.join().unwrap();
        frames as f64 / secs
    })
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !common::can_run("bench veth", &[]) {
        println!("{{\"bench\":\"veth\",\"skipped\":\"needs root and iproute2\"}}");
        return;
    }
    // `cargo bench` passes --bench; any other run (`cargo test --all-targets`) is a short smoke run.
    let scale = if std::env::args().any(|a| a == "--bench") {
        1.0
    } else {
        0.1
    };
    let ns = Netns::new("bench");
    ns.ip(&["link", "add", "va", "type", "veth", "peer", "name", "vb"]);
    ns.ip(&["link", "set", "va", "up"]);
    ns.ip(&["link", "set", "vb", "up"]);

    let rss = || {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap().to_owned();
        line.split_whitespace().nth(1).unwrap().parse::<i64>().unwrap()
    };
    let before = rss();
    let port = ns.enter(|| AfPacket::open("va", &AfPacketConfig::default())).unwrap();
    let port_rss = rss() - before;
    drop(port);
    let before = rss();
    let port = ns.enter(|| AfPacket::open("va", &AfPacketConfig::plain())).unwrap();
    let plain_rss = rss() - before;
    drop(port);

    let batch256 = tx_only(&ns, 256, 1.5 * scale);
    let batch1 = tx_only(&ns, 1, 1.5 * scale);

    // The blast with virtio-net headers (the default) and without, alternated twice.
    let mut runs = Vec::new();
    for round in 0..2 {
        let ring = AfPacketConfig {
            rx: RxMode::Ring,
            ..AfPacketConfig::default()
        };
        for (name, config) in [
            ("vnet", AfPacketConfig::default()),
            ("vnet_ring", ring),
            ("plain", AfPacketConfig::plain()),
        ] {
            let r = pair(&ns, &config, 1.5 * scale);
            runs.push(format!(
                "{{\"config\":\"{name}\",\"round\":{round},\"tx_fps\":{:.0},\"rx_fps\":{:.0},\"kernel_drops\":{},\"tx_errors\":{}}}",
                r.0, r.1, r.2, r.3
            ));
        }
    }
    println!(
        "{{\"bench\":\"veth\",\"frame_len\":{FRAME_LEN},\"seconds\":{:.1},\"blast\":[{}],\
         \"tx_only_batch256_fps\":{batch256:.0},\"tx_only_batch1_fps\":{batch1:.0},\
         \"port_rss_kib\":{port_rss},\"plain_port_rss_kib\":{plain_rss}}}",
        1.5 * scale,
        runs.join(",")
    );
}

/// One port blasts 64-byte frames into `vb` while another drains `va`, both
/// opened with `config`, for `seconds`: (tx fps, rx fps, kernel drops, tx errors).
fn pair(ns: &Netns, config: &AfPacketConfig, seconds: f64) -> (f64, f64, u64, u64) {
    let mut rx = ns.enter(|| AfPacket::open("va", config)).unwrap();
    let mut tx = ns.enter(|| AfPacket::open("vb", config)).unwrap();
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let receiver = s.spawn(|| {
            let start = Instant::now();
            let mut received = 0u64;
            let mut idle_since: Option<Instant> = None;
            loop {
                wait_readable(&[rx.fd()], Duration::from_millis(5)).unwrap();
                let n = rx
                    .recv_batch(1024, &mut |frames| {
                        for f in frames {
                            if f.len() == FRAME_LEN && f[12..14] == MARK.to_be_bytes() {
                                received += 1;
                            }
                        }
                    })
                    .unwrap();
                // After the sender stops, drain until the ring has been quiet for 50 ms.
                if stop.load(Ordering::Relaxed) {
                    if n > 0 {
                        idle_since = None;
                    } else if idle_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_millis(50) {
                        break;
                    }
                }
            }
            (received, start.elapsed().as_secs_f64(), rx.stats().kernel_drops)
        });
        let sender = s.spawn(|| blast(&mut tx, 256, &stop));
        thread::sleep(Duration::from_secs_f64(seconds));
        stop.store(true, Ordering::Relaxed);
        let (tx_frames, tx_errors, tx_secs) = sender.join().unwrap();
        let (received, rx_secs, drops) = receiver.join().unwrap();
        (tx_frames as f64 / tx_secs, received as f64 / rx_secs, drops, tx_errors)
    })
}

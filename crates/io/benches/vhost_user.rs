//! The vhost-user data path's own cost, apart from any guest or QEMU.
//!
//! `cargo bench -p palisade-io --bench vhost_user` prints one JSON line per
//! case: frames per second and Gbit/s (of frame bytes, headers excluded)
//! through
//! - `tx`: the guest's transmit queue drained by `recv_batch` (validate the
//!   chain, copy the frame out, parse its header, return the chain);
//! - `rx`: frames delivered into the guest's receive queue by `send` and
//!   published by `flush` (mergeable buffers; one `flush` per batch),
//!
//! at 64 B, 1500 B and 64 KiB TSO super-frames, laid out as Linux's
//! virtio-net driver lays them out (header and linear data in one buffer;
//! a super-frame as an indirect table of a 4 KiB-page list; receive
//! buffers of 1536 bytes, 4 KiB for super-frames). Two layers:
//! - `rings`: `NetRings` over an in-process guest memory (no system call);
//! - `pair`: a `QueuePair` of a real device set up over its socket by the
//!   vhost crate's frontend, guest memory in a shared file: adds the pair's
//!   lock and the kick-eventfd read per receive call;
//! - `steered-own`, `steered-passed` (`tx` only): the same device shared out
//!   between two workers (`SteeredVhostUser`, one pair, received by worker
//!   0) as the agent runs it, the frames' addresses hashing to worker 0
//!   (handed over where they were taken) or to worker 1 (copied into its
//!   hand-off queue, woken, taken there): the second minus the first is
//!   what a frame the guest queued on another worker's pair costs.
//!
//! Only the device's calls are timed; the driver model's work (making chains
//! available, reaping used ones) is not. Any other run (`cargo test
//! --all-targets`) is a short smoke run.

#[path = "../tests/virtio_driver/mod.rs"]
mod virtio_driver;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use palisade_io::FramePort;
use palisade_io::vhost_user::features::{mask, offered};
use palisade_io::vhost_user::{
    Delivery, GuestFeatures, Limits, NetRings, Offloads, QueuePair, SteeredVhostUser, VhostUserNet, VhostUserNetConfig,
    WorkerPort,
};
use palisade_wire::virtio_net::{Gso, GsoKind, PartialChecksum, VirtioNetRepr};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_driver::{Bump, DriverRing, align, tcp4_frame};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const MEM_BASE: u64 = 0x10_0000;
const MEM_LEN: u64 = 64 << 20;
const USER_BASE: u64 = 0x7f00_0000_0000;
const RING: u16 = 256;
/// Chains made available per round (the device takes them in batches of 64).
const ROUND: usize = 128;
const BATCH: usize = 64;

/// The data path under test: the bare rings, or a queue pair of a live device.
enum Path {
    Rings(Box<NetRings>),
    Pair(QueuePair),
    /// Two workers' ports on one device with one pair (worker 0 receives it).
    Steered(Vec<WorkerPort>),
}

struct Setup {
    mem: GuestMemoryMmap,
    path: Path,
    rx: DriverRing,
    tx: DriverRing,
    bump: Bump,
    /// Kept alive for the `Pair` and `Steered` paths.
    _device: Option<Box<dyn std::any::Any>>,
}

fn features() -> u64 {
    offered(Offloads::ALL, 1) & !mask::PROTOCOL_FEATURES
}

fn rings_setup() -> Setup {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(MEM_BASE), MEM_LEN as usize)]).unwrap();
    let rx = DriverRing::new(MEM_BASE, RING);
    let tx = DriverRing::new(align(rx.end(), 4096), RING);
    rx.init(&mem);
    tx.init(&mem);
    let mut rings = NetRings::new(GuestFeatures::from_bits(features()), Limits::default());
    rings.start_rx(&mem, rx.layout, 0).unwrap();
    rings.start_tx(&mem, tx.layout, 0).unwrap();
    let bump = Bump::new(align(tx.end(), 4096), MEM_BASE + MEM_LEN);
    // The guest asks for no interrupts (as a busy NAPI poll does).
    rx.set_avail_flags(&mem, 1);
    tx.set_avail_flags(&mem, 1);
    Setup {
        mem,
        path: Path::Rings(Box::new(rings)),
        rx,
        tx,
        bump,
        _device: None,
    }
}

fn pair_setup(steered: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("bench.sock");
    let config = VhostUserNetConfig::new(&socket);
    let (device, path, running): (Box<dyn std::any::Any>, Path, Box<dyn Fn() -> bool>) = if steered {
        let (device, ports) = SteeredVhostUser::open(&config, 2).unwrap();
        let device = std::sync::Arc::new(device);
        let d = device.clone();
        let running = Box::new(move || d.status().running == [(true, true)]);
        (Box::new(device), Path::Steered(ports), running)
    } else {
        let (device, mut pairs) = VhostUserNet::open(&config).unwrap();
        let device = std::sync::Arc::new(device);
        let d = device.clone();
        let running = Box::new(move || d.status().running == [(true, true)]);
        (Box::new(device), Path::Pair(pairs.remove(0)), running)
    };
    let file = tempfile::tempfile().unwrap();
    file.set_len(MEM_LEN).unwrap();
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(MEM_BASE),
        MEM_LEN as usize,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    let mut fe = Frontend::connect(&socket, 2).unwrap();
    fe.set_owner().unwrap();
    let f = fe.get_features().unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(pf & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK))
        .unwrap();
    fe.set_features(f & !mask::EVENT_IDX).unwrap();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: MEM_BASE,
        memory_size: MEM_LEN,
        userspace_addr: USER_BASE,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    }])
    .unwrap();
    let rx = DriverRing::new(MEM_BASE, RING);
    let tx = DriverRing::new(align(rx.end(), 4096), RING);
    let mut fds = Vec::new();
    for (q, ring) in [&rx, &tx].into_iter().enumerate() {
        ring.init(&mem);
        ring.set_avail_flags(&mem, 1);
        let user = |gpa: u64| USER_BASE + (gpa - MEM_BASE);
        fe.set_vring_num(q, RING).unwrap();
        fe.set_vring_addr(
            q,
            &VringConfigData {
                queue_max_size: RING,
                queue_size: RING,
                flags: 0,
                desc_table_addr: user(ring.layout.desc_table),
                used_ring_addr: user(ring.layout.used_ring),
                avail_ring_addr: user(ring.layout.avail_ring),
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(q, 0).unwrap();
        let (kick, call) = (EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap());
        fe.set_vring_call(q, &call).unwrap();
        fe.set_vring_kick(q, &kick).unwrap();
        fe.set_vring_enable(q, true).unwrap();
        fds.push(kick);
        fds.push(call);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !running() {
        assert!(Instant::now() < deadline, "the device did not start its rings");
        std::thread::sleep(Duration::from_millis(1));
    }
    let bump = Bump::new(align(tx.end(), 4096), MEM_BASE + MEM_LEN);
    Setup {
        mem,
        path,
        rx,
        tx,
        bump,
        _device: Some(Box::new((device, fe, fds, dir))),
    }
}

/// A frame of `len` bytes and its header (a TSO super-frame above 1514
/// bytes), between 10.0.0.1 and 10.0.0.2 (steered to worker 1 of 2), or
/// 10.0.0.3 when `worker0` (steered to worker 0).
fn frame_and_header(len: usize, worker0: bool) -> (Vec<u8>, VirtioNetRepr) {
    let mut f = tcp4_frame(len - 54, 1);
    if worker0 {
        f[33] = 3;
    }
    let csum = Some(PartialChecksum { start: 34, offset: 16 });
    let gso = (len > 1514).then_some(Gso {
        kind: GsoKind::TcpV4,
        ecn: false,
        size: 1448,
        header_len: 54,
    });
    (
        f,
        VirtioNetRepr {
            csum,
            gso,
            ..VirtioNetRepr::PLAIN
        },
    )
}

/// Guest → device: `seconds` of rounds; returns (frames, device seconds).
fn bench_tx(s: &mut Setup, len: usize, seconds: f64, worker0: bool) -> (u64, f64) {
    let (frame, header) = frame_and_header(len, worker0);
    let mut bytes = header.to_bytes().to_vec();
    bytes.extend_from_slice(&frame);
    // One copy of the frame per ring slot, written once: rounds only post descriptors.
    let slots: Vec<Vec<(u64, u32, bool)>> = (0..usize::from(RING))
        .map(|_| {
            if bytes.len() <= 4096 {
                let at = s.bump.alloc(bytes.len() as u64);
                s.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
                vec![(at, bytes.len() as u32, false)]
            } else {
                // Linear part (headers) then 4 KiB pages, as skb frags.
                let mut parts = vec![(66usize.min(bytes.len()), 0)];
                let mut off = 66;
                while off < bytes.len() {
                    let n = (bytes.len() - off).min(4096);
                    parts.push((n, off));
                    off += n;
                }
                parts
                    .iter()
                    .map(|&(n, off)| {
                        let at = s.bump.alloc(n as u64);
                        s.mem.write_slice(&bytes[off..off + n], GuestAddress(at)).unwrap();
                        (at, n as u32, false)
                    })
                    .collect()
            }
        })
        .collect();
    let tables: Vec<u64> = (0..usize::from(RING)).map(|_| s.bump.alloc(16 * 32)).collect();
    let mut frames = 0u64;
    let mut busy = Duration::ZERO;
    let start = Instant::now();
    let mut slot = 0;
    while start.elapsed().as_secs_f64() < seconds {
        for _ in 0..ROUND {
            let bufs = &slots[slot % slots.len()];
            let ok = if bufs.len() == 1 {
                s.tx.add(&s.mem, bufs)
            } else {
                s.tx.add_indirect(&s.mem, tables[slot % tables.len()], bufs)
            };
            assert!(ok.is_some(), "ring full");
            slot += 1;
        }
        s.tx.publish(&s.mem);
        let t = Instant::now();
        let mut got = 0;
        while got < ROUND {
            let n = match &mut s.path {
                Path::Rings(r) => r.recv_batch(&s.mem, BATCH, Delivery::Offloaded, &mut |b| {
                    std::hint::black_box(b.frames());
                }),
                Path::Pair(p) => {
                    let n = p.recv_batch(BATCH, &mut |b| {
                        std::hint::black_box(b.frames());
                    });
                    palisade_io::vhost_user::RecvOutcome {
                        frames: n,
                        ..Default::default()
                    }
                }
                Path::Steered(ports) => {
                    // Worker 0 takes the pair's frames; worker 1 those passed to it.
                    let mut n = 0;
                    for port in ports.iter_mut() {
                        port.recv_frames(BATCH, &mut |frames| {
                            n += frames.len();
                            std::hint::black_box(frames);
                        })
                        .unwrap();
                    }
                    palisade_io::vhost_user::RecvOutcome {
                        frames: n,
                        ..Default::default()
                    }
                }
            }
            .frames;
            assert!(n > 0, "the device took no frame");
            got += n;
        }
        busy += t.elapsed();
        frames += got as u64;
        s.tx.used(&s.mem);
    }
    (frames, busy.as_secs_f64())
}

/// Device → guest: `seconds` of rounds; returns (frames, device seconds).
fn bench_rx(s: &mut Setup, len: usize, seconds: f64) -> (u64, f64) {
    let (frame, header) = frame_and_header(len, false);
    let buf_len: u32 = if len > 1514 { 4096 } else { 1536 };
    let per_frame = (12 + len).div_ceil(buf_len as usize);
    let slots: Vec<u64> = (0..usize::from(RING))
        .map(|_| s.bump.alloc(u64::from(buf_len)))
        .collect();
    let frames_per_round = (usize::from(RING) / per_frame).min(ROUND);
    let mut frames = 0u64;
    let mut busy = Duration::ZERO;
    let start = Instant::now();
    let mut slot = 0;
    while start.elapsed().as_secs_f64() < seconds {
        while s.rx.free() > 0 {
            s.rx.add(&s.mem, &[(slots[slot % slots.len()], buf_len, true)]).unwrap();
            slot += 1;
        }
        s.rx.publish(&s.mem);
        let t = Instant::now();
        for _ in 0..frames_per_round {
            let r = match &mut s.path {
                Path::Rings(r) => r.send(&s.mem, &header, &frame),
                Path::Pair(p) => p.send(&header, &frame),
                Path::Steered(_) => unreachable!("the steered layers measure tx only"),
            };
            r.expect("room for every frame of the round");
        }
        match &mut s.path {
            Path::Rings(r) => {
                r.flush(&s.mem);
            }
            Path::Pair(p) => p.flush(),
            Path::Steered(_) => unreachable!("the steered layers measure tx only"),
        }
        busy += t.elapsed();
        frames += frames_per_round as u64;
        s.rx.used(&s.mem);
    }
    (frames, busy.as_secs_f64())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seconds = if std::env::args().any(|a| a == "--bench") {
        2.0
    } else {
        0.05
    };
    for layer in ["rings", "pair", "steered-own", "steered-passed"] {
        for (path, len) in [
            ("tx", 64),
            ("tx", 1514),
            ("tx", 65_000),
            ("rx", 64),
            ("rx", 1514),
            ("rx", 65_000),
        ] {
            let steered = layer.starts_with("steered");
            if steered && path == "rx" {
                continue;
            }
            let mut s = match layer {
                "rings" => rings_setup(),
                "pair" => pair_setup(false),
                _ => pair_setup(true),
            };
            let (frames, secs) = if path == "tx" {
                bench_tx(&mut s, len, seconds, layer != "steered-passed")
            } else {
                bench_rx(&mut s, len, seconds)
            };
            let fps = frames as f64 / secs;
            println!(
                "{{\"bench\":\"vhost_user\",\"layer\":\"{layer}\",\"path\":\"{path}\",\"frame_len\":{len},\
                 \"frames\":{frames},\"fps\":{fps:.0},\"gbps\":{:.2},\"ns_per_frame\":{:.1}}}",
                fps * len as f64 * 8.0 / 1e9,
                1e9 / fps
            );
        }
    }
}

//! A vhost-user device shared out between workers ([`SteeredVhostUser`]):
//! whichever queue the guest transmits a frame on, it reaches the worker
//! the steering hash names, exactly once; each worker delivers to the guest
//! on its own pair (or a shared one when there are fewer pairs than
//! workers); a worker's counters cover only its own pairs. No root, no QEMU.

mod vhost_frontend;
mod virtio_driver;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use palisade_io::steer::frame_worker;
use palisade_io::vhost_user::{SteeredVhostUser, VhostUserNetConfig, WorkerPort};
use palisade_io::{FramePort, Offload, wait_readable};
use palisade_wire::virtio_net::VirtioNetRepr;
use vhost_frontend::Guest;
use virtio_driver::tcp4_frame;

/// A TCP frame between 10.0.0.1 and 10.0.`b`.`c` (so the steering hash varies), marked by `seq`.
fn frame_to(b: u8, c: u8, seq: u32) -> Vec<u8> {
    let mut f = tcp4_frame(10, seq);
    f[30..34].copy_from_slice(&[10, 0, b, c]);
    let ip = &mut f[14..34];
    ip[10..12].fill(0);
    let sum = !palisade_wire::checksum::fold(palisade_wire::checksum::sum(ip));
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f
}

fn seq_of(frame: &[u8]) -> u32 {
    u32::from_be_bytes(frame[38..42].try_into().unwrap())
}

/// Poll every worker's port until `want` frames arrived in all (within `wait`):
/// worker index → the frames' sequence numbers.
fn collect(ports: &mut [WorkerPort], want: usize) -> BTreeMap<usize, Vec<u32>> {
    collect_within(ports, want, Duration::from_secs(5))
}

fn collect_within(ports: &mut [WorkerPort], want: usize, wait: Duration) -> BTreeMap<usize, Vec<u32>> {
    let deadline = Instant::now() + wait;
    let mut got: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
    let mut total = 0;
    while total < want && Instant::now() < deadline {
        let fds: Vec<_> = ports.iter().map(|p| p.fd()).collect();
        for i in wait_readable(&fds, Duration::from_millis(50)).unwrap() {
            ports[i]
                .recv_frames(64, &mut |frames| {
                    for f in frames {
                        assert_eq!(f.offload, Offload::NONE);
                        got.entry(i).or_default().push(seq_of(f.bytes));
                        total += 1;
                    }
                })
                .unwrap();
        }
    }
    got
}

fn open(socket: &std::path::Path, pairs: u16, workers: usize) -> (SteeredVhostUser, Vec<WorkerPort>) {
    let mut config = VhostUserNetConfig::new(socket);
    config.queue_pairs = pairs;
    SteeredVhostUser::open(&config, workers).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn each_frame_reaches_the_worker_its_addresses_hash_to_whatever_queue_it_came_on() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vu.sock");
    let (device, mut ports) = open(&socket, 2, 2);
    assert_eq!(ports[0].pairs(), [0]);
    assert_eq!(ports[1].pairs(), [1]);
    let mut g = Guest::connect(&socket, 2, u64::MAX);
    let mut want: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
    let mut seq = 0;
    // Both queues carry frames of both workers (as a guest's CPUs do).
    for pair in [0, 1] {
        for c in 1..=12u8 {
            let frame = frame_to(1, c, seq);
            want.entry(frame_worker(&frame, 2) as usize).or_default().push(seq);
            g.transmit(pair, &VirtioNetRepr::PLAIN, &frame);
            seq += 1;
        }
    }
    assert_eq!(want.len(), 2, "the addresses chosen hash to both workers");
    let mut got = collect(&mut ports, seq as usize);
    for v in got.values_mut() {
        v.sort_unstable();
    }
    assert_eq!(got, want);
    let passed = device.handoff_stats();
    assert!(passed.passed > 0 && passed.dropped == 0, "{passed:?}");
    // Nothing more: each frame was handed over once.
    assert!(collect_within(&mut ports, 1, Duration::from_millis(300)).is_empty());
    // A worker's counters are its own pairs': summed, every frame once.
    let rx: u64 = ports.iter().map(|p| p.stats().rx_frames).sum();
    assert_eq!(rx, u64::from(seq));
}

#[test]
fn each_worker_delivers_on_its_own_pair_or_shares_one() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vu.sock");
    // One pair, three workers: all three deliver on pair 0; only worker 0 receives from it.
    let (_device, mut ports) = open(&socket, 1, 3);
    assert_eq!(ports.iter().map(WorkerPort::send_pair).collect::<Vec<_>>(), [0, 0, 0]);
    assert_eq!(ports[0].pairs(), [0]);
    assert!(ports[1].pairs().is_empty() && ports[2].pairs().is_empty());
    let mut g = Guest::connect(&socket, 1, u64::MAX);
    g.post_rx(0, 8, 2048);
    let deadline = Instant::now() + Duration::from_secs(5);
    // Wait for the device to run the guest's receive queue.
    while ports[2].send_frame(&frame_to(1, 1, 100), &Offload::NONE).is_err() {
        assert!(Instant::now() < deadline, "the receive queue never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    ports[1].send_frame(&frame_to(1, 1, 101), &Offload::NONE).unwrap();
    for p in &mut ports {
        p.flush().unwrap();
    }
    let got: Vec<u32> = g.received(0).iter().map(|f| seq_of(f)).collect();
    assert_eq!(got, [100, 101]);
    // Counted once, by the pair's receiving worker.
    let tx: Vec<u64> = ports.iter().map(|p| p.stats().tx_frames).collect();
    assert_eq!(tx, [2, 0, 0]);
}

#[test]
fn with_more_pairs_than_workers_a_worker_serves_several() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vu.sock");
    let (_device, mut ports) = open(&socket, 3, 2);
    assert_eq!(ports[0].pairs(), [0, 2]);
    assert_eq!(ports[1].pairs(), [1]);
    let mut g = Guest::connect(&socket, 3, u64::MAX);
    let frame = frame_to(1, 7, 7);
    let owner = frame_worker(&frame, 2) as usize;
    g.transmit(2, &VirtioNetRepr::PLAIN, &frame);
    let got = collect(&mut ports, 1);
    assert_eq!(got, BTreeMap::from([(owner, vec![7])]));
}

#[test]
fn a_guest_running_fewer_pairs_than_offered_gets_every_worker_s_frames() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vu.sock");
    // Two pairs offered, the guest (QEMU `queues=1`) runs one: worker 1's pair never runs.
    let (_device, mut ports) = open(&socket, 2, 2);
    let mut g = Guest::connect(&socket, 1, u64::MAX);
    g.post_rx(0, 8, 2048);
    let deadline = Instant::now() + Duration::from_secs(5);
    while ports[0].send_frame(&frame_to(1, 1, 200), &Offload::NONE).is_err() {
        assert!(Instant::now() < deadline, "the receive queue never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    ports[1].send_frame(&frame_to(1, 2, 201), &Offload::NONE).unwrap();
    for p in &mut ports {
        p.flush().unwrap();
    }
    let got: Vec<u32> = g.received(0).iter().map(|f| seq_of(f)).collect();
    assert_eq!(got, [200, 201]);
    let errors: u64 = ports.iter().map(|p| p.stats().tx_errors).sum();
    assert_eq!(errors, 0);
}

#[test]
fn one_call_takes_at_most_max_frames_from_pairs_and_hand_offs_together() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vu.sock");
    let (_device, mut ports) = open(&socket, 2, 2);
    let mut g = Guest::connect(&socket, 2, u64::MAX);
    // 40 frames on each queue, all of them worker 1's: worker 0 passes
    // its queue's to worker 1, which also has its own queue's to take.
    let (mut sent, mut c) = (0u32, 0u8);
    while sent < 80 {
        c += 1;
        let frame = frame_to(2, c, sent);
        if frame_worker(&frame, 2) == 1 {
            g.transmit(sent as usize % 2, &VirtioNetRepr::PLAIN, &frame);
            sent += 1;
        }
        if c == 255 {
            // Rings of 64: let the device take some before reusing addresses.
            break;
        }
    }
    assert_eq!(sent, 80, "enough addresses hash to worker 1");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut total = 0;
    while total < 80 {
        assert!(Instant::now() < deadline, "only {total} of 80 frames arrived");
        let fds: Vec<_> = ports.iter().map(|p| p.fd()).collect();
        for i in wait_readable(&fds, Duration::from_millis(50)).unwrap() {
            let mut n = 0;
            let r = ports[i].recv_frames(8, &mut |frames| n += frames.len()).unwrap();
            assert_eq!(r, n);
            assert!(n <= 8, "worker {i} took {n} frames with max 8");
            total += n;
        }
    }
}

/// Random frames (any bytes: short, non-IP, tagged, IPv4 and IPv6 with any
/// addresses) on random queues, with two and three workers: each reaches
/// exactly the worker `frame_worker` names, once, unchanged.
#[test]
fn any_frame_reaches_its_worker_exactly_once() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for (round, workers) in [2usize, 3, 2, 3, 2, 3].into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vu.sock");
        let (_device, mut ports) = open(&socket, 2, workers);
        let mut g = Guest::connect(&socket, 2, u64::MAX);
        let mut want: Vec<(usize, Vec<u8>)> = Vec::new();
        for _ in 0..40 {
            let len = 14 + (next() % 120) as usize;
            let mut frame: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Mostly steerable frames: IPv4, IPv6 or one VLAN tag in front of either.
            match next() % 5 {
                0 => frame[12..14].copy_from_slice(&[0x08, 0x00]),
                1 => frame[12..14].copy_from_slice(&[0x86, 0xdd]),
                2 if len > 18 => {
                    frame[12..14].copy_from_slice(&[0x81, 0x00]);
                    frame[16..18].copy_from_slice(&[0x08, 0x00]);
                }
                _ => {}
            }
            let pair = (next() % 2) as usize;
            want.push((frame_worker(&frame, workers as u32) as usize, frame.clone()));
            g.transmit(pair, &VirtioNetRepr::PLAIN, &frame);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got: Vec<(usize, Vec<u8>)> = Vec::new();
        while got.len() < want.len() && Instant::now() < deadline {
            let fds: Vec<_> = ports.iter().map(|p| p.fd()).collect();
            for i in wait_readable(&fds, Duration::from_millis(50)).unwrap() {
                ports[i]
                    .recv_frames(64, &mut |frames| {
                        got.extend(frames.iter().map(|f| (i, f.bytes.to_vec())))
                    })
                    .unwrap();
            }
        }
        want.sort();
        got.sort();
        assert_eq!(got, want, "round {round} with {workers} workers");
    }
}

//! The vhost-user device driven over its socket by the `vhost` crate's
//! frontend (the role QEMU plays), with guest memory in a shared file and the
//! driver model standing in for the guest's virtio-net driver: the
//! handshake, frames both ways through the queue pairs, ring stops, refused
//! requests, the frontend leaving and coming back, the device restarting on
//! the same socket, and a guest reset. No root, no QEMU.

mod vhost_frontend;
mod virtio_driver;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use palisade_io::vhost_user::features::mask;
use palisade_io::vhost_user::{FromGuest, Offloads, QueuePair, SendError, VhostUserNet, VhostUserNetConfig};
use palisade_io::{FramePort, wait_readable};
use palisade_wire::virtio_net::{PartialChecksum, VirtioNetRepr};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_frontend::{Guest, MEM_BASE, MEM_LEN, RING_SIZE, USER_BASE, connect_retrying, memory_file};
use virtio_driver::{DriverRing, align, tcp4_frame};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

fn socket_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("vu.sock")
}

fn open(socket: &Path, pairs: u16) -> (VhostUserNet, Vec<QueuePair>) {
    let mut c = VhostUserNetConfig::new(socket);
    c.queue_pairs = pairs;
    VhostUserNet::open(&c).unwrap_or_else(|e| panic!("{e}"))
}

/// Wait until `pair` is readable, then take its frames (up to `want`, within 5 s).
fn receive(pair: &mut QueuePair, want: usize) -> Vec<(VirtioNetRepr, Vec<u8>)> {
    receive_within(pair, want, Duration::from_secs(5))
}

/// Whatever `pair` delivers within `wait` (for checks that nothing arrives).
fn receive_within(pair: &mut QueuePair, want: usize, wait: Duration) -> Vec<(VirtioNetRepr, Vec<u8>)> {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        if wait_readable(&[pair.fd()], Duration::from_millis(50))
            .unwrap()
            .is_empty()
        {
            continue;
        }
        pair.recv_batch(64, &mut |b: &FromGuest<'_>| {
            got.extend(b.iter().map(|(h, f)| (*h, f.to_vec())))
        });
    }
    got
}

/// Wait until `cond` holds (the control thread works asynchronously to the frontend's last ack).
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn partial() -> VirtioNetRepr {
    VirtioNetRepr {
        csum: Some(PartialChecksum { start: 34, offset: 16 }),
        ..VirtioNetRepr::PLAIN
    }
}

#[test]
fn a_frontend_sets_up_the_device_and_frames_flow_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let (device, mut pairs) = open(&socket, 2);
    let mut g = Guest::connect(&socket, 2, u64::MAX);

    let status = device.status();
    assert!(status.connected);
    assert_eq!(status.sessions, 1);
    assert_eq!(status.memory_regions, 1);
    assert_eq!(status.running, vec![(true, true), (true, true)]);
    let f = status.features.expect("negotiated");
    assert!(f.version_1() && f.mergeable_rx_buffers() && f.event_idx() && f.multiqueue());
    assert_eq!(f.tso_from_guest(), (true, true));
    assert_eq!(pairs[1].features(), f);

    // Guest → device, on pair 1: the pair's fd becomes readable on the kick.
    let frame = tcp4_frame(300, 1);
    g.transmit(1, &partial(), &frame);
    assert!(
        receive_within(&mut pairs[0], 1, Duration::from_millis(200)).is_empty(),
        "pair 0 has no frames"
    );
    let got = receive(&mut pairs[1], 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, frame);
    assert_eq!(got[0].0, partial());
    assert!(g.calls[3].read().is_ok(), "the guest was notified of the completion");
    assert_eq!(g.rings[3].used(&g.mem).len(), 1);

    // Device → guest, on pair 0.
    g.post_rx(0, 4, 2048);
    let back = tcp4_frame(100, 2);
    pairs[0].send(&VirtioNetRepr::PLAIN, &back).unwrap();
    assert!(g.calls[0].read().is_err(), "nothing published before the flush");
    pairs[0].flush();
    assert!(g.calls[0].read().is_ok(), "the guest was interrupted");
    assert_eq!(g.received(0), vec![back.clone()]);

    // A session: several sends, one publication.
    {
        let mut s = pairs[0].session();
        s.send(&VirtioNetRepr::PLAIN, &back).unwrap();
        s.send(&VirtioNetRepr::PLAIN, &back).unwrap();
    }
    assert_eq!(g.received(0).len(), 2);
    assert_eq!(device.stats()[0].to_guest_frames, 3);
}

#[test]
fn the_frame_port_view_takes_complete_frames() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let mut c = VhostUserNetConfig::new(&socket);
    c.offloads = Offloads::CHECKSUM_ONLY;
    let (device, mut pairs) = VhostUserNet::open(&c).unwrap();
    let mut g = Guest::connect(&socket, 1, u64::MAX);
    assert_eq!(device.status().features.unwrap().tso_from_guest(), (false, false));
    let frame = tcp4_frame(100, 1);
    g.transmit(0, &partial(), &frame);
    let port: &mut dyn FramePort = &mut pairs[0];
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.is_empty() && Instant::now() < deadline {
        wait_readable(&[port.fd()], Duration::from_millis(50)).unwrap();
        port.recv(8, &mut |f| got.push(f.to_vec())).unwrap();
    }
    assert_eq!(got.len(), 1);
    assert_eq!(got[0][..50], frame[..50]);
    assert_ne!(got[0][50..52], frame[50..52], "the checksum was completed");
    g.post_rx(0, 1, 2048);
    port.send(&frame).unwrap();
    port.flush().unwrap();
    let e = port.send(&frame).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
    let s = port.stats();
    assert_eq!((s.rx_frames, s.tx_frames, s.csum_completed, s.tx_errors), (1, 1, 1, 1));
}

#[test]
fn get_vring_base_stops_the_ring_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let (_device, mut pairs) = open(&socket, 1);
    let mut g = Guest::connect(&socket, 1, u64::MAX);
    for i in 0..3 {
        g.transmit(0, &VirtioNetRepr::PLAIN, &tcp4_frame(10, i));
    }
    assert_eq!(receive(&mut pairs[0], 3).len(), 3);
    assert_eq!(g.frontend.get_vring_base(1).unwrap(), 3);
    assert_eq!(pairs[0].running(), (true, false));
    g.transmit(0, &VirtioNetRepr::PLAIN, &tcp4_frame(10, 9));
    assert!(
        receive_within(&mut pairs[0], 1, Duration::from_millis(200)).is_empty(),
        "a stopped ring is not read"
    );
    assert_eq!(g.frontend.get_vring_base(0).unwrap(), 0);
    assert_eq!(
        pairs[0].send(&VirtioNetRepr::PLAIN, &tcp4_frame(10, 1)),
        Err(SendError::NotRunning)
    );
}

#[test]
fn refused_requests_are_answered_and_the_session_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let (device, mut pairs) = open(&socket, 1);
    let (mut fe, raw) = connect_retrying(&socket, 2);
    fe.set_owner().unwrap();
    // QEMU's order: features offered, then protocol features (REPLY_ACK makes refusals visible).
    let offered = fe.get_features().unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(pf).unwrap();
    assert!(fe.set_features(offered | (1 << 50)).is_err(), "a feature never offered");
    fe.set_features(offered).unwrap();
    assert!(fe.set_vring_num(0, 3).is_err(), "not a power of two");
    let config = VringConfigData {
        queue_max_size: 64,
        queue_size: 64,
        flags: 0,
        desc_table_addr: USER_BASE,
        used_ring_addr: USER_BASE + 0x2000,
        avail_ring_addr: USER_BASE + 0x1000,
        log_addr: None,
    };
    assert!(
        fe.set_vring_addr(0, &config).is_err(),
        "addresses before a memory table"
    );
    // A region larger than its file would SIGBUS when touched.
    let small = tempfile::tempfile().unwrap();
    small.set_len(0x1000).unwrap();
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: 0x10_0000,
        userspace_addr: USER_BASE,
        mmap_offset: 0,
        mmap_handle: small.as_raw_fd(),
    };
    assert!(fe.set_mem_table(&[region]).is_err(), "region past the end of its file");
    assert_eq!(fe.get_queue_num().unwrap(), 2);
    let status = device.status();
    assert!(status.connected);
    assert_eq!(status.requests_refused, 4);
    assert_eq!(
        status.features.map(|f| f.bits()),
        // Nor is logging (live migration) a guest feature.
        Some(offered & !mask::PROTOCOL_FEATURES & !palisade_io::vhost_user::log::VHOST_F_LOG_ALL)
    );
    assert!(status.last_error.unwrap().contains("do not fit"));
    drop(fe);
    drop(raw);
    // The device still takes a well-behaved guest afterwards.
    let mut g = Guest::connect(&socket, 1, u64::MAX);
    g.transmit(0, &VirtioNetRepr::PLAIN, &tcp4_frame(10, 0));
    assert_eq!(receive(&mut pairs[0], 1).len(), 1);
}

#[test]
fn a_frontend_that_leaves_and_comes_back_finds_a_fresh_device() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let (device, mut pairs) = open(&socket, 1);
    let mut g = Guest::connect(&socket, 1, u64::MAX);
    g.transmit(0, &VirtioNetRepr::PLAIN, &tcp4_frame(10, 0));
    assert_eq!(receive(&mut pairs[0], 1).len(), 1);
    let Guest {
        file, frontend, raw, ..
    } = g;
    drop(frontend);
    drop(raw);
    eventually("the device to notice the disconnect", || !device.status().connected);
    assert_eq!(pairs[0].running(), (false, false));
    assert_eq!(device.status().memory_regions, 0, "guest memory unmapped");
    // QEMU reconnecting: the same memory, rings restored from the used index.
    let mut g = Guest::connect_with(&socket, 1, u64::MAX, file, 0);
    g.transmit(0, &VirtioNetRepr::PLAIN, &tcp4_frame(10, 1));
    assert_eq!(receive(&mut pairs[0], 1).len(), 1);
    assert_eq!(device.status().sessions, 2);
}

#[test]
fn a_restarted_device_on_the_same_socket_serves_the_guest_again() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let (device, mut pairs) = open(&socket, 1);
    let g = Guest::connect(&socket, 1, u64::MAX);
    drop(device);
    assert!(!socket.exists(), "the socket is removed with the device");
    assert_eq!(pairs[0].running(), (false, false));
    assert_eq!(
        pairs[0].send(&VirtioNetRepr::PLAIN, &tcp4_frame(10, 1)),
        Err(SendError::NotRunning)
    );
    assert_eq!(
        pairs[0].recv_batch(8, &mut |_| panic!("no frames from a stopped device")),
        0
    );
    // The frontend notices on its next request.
    assert!(g.frontend.get_features().is_err());
    let Guest { file, .. } = g;

    let (device, mut pairs) = open(&socket, 1);
    let mut g = Guest::connect_with(&socket, 1, u64::MAX, file, 0);
    g.transmit(0, &VirtioNetRepr::PLAIN, &tcp4_frame(10, 2));
    assert_eq!(receive(&mut pairs[0], 1).len(), 1);
    assert!(device.status().connected);
}

#[test]
fn a_guest_reset_renegotiates_and_moves_the_rings() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let (device, mut pairs) = open(&socket, 1);
    let mut g = Guest::connect(&socket, 1, u64::MAX);
    g.transmit(0, &partial(), &tcp4_frame(10, 0));
    assert_eq!(receive(&mut pairs[0], 1).len(), 1);
    // As QEMU does when the guest resets its NIC: stop every ring, renegotiate
    // (here without checksum offload), resend the memory table, new rings at new addresses.
    g.frontend.get_vring_base(0).unwrap();
    g.frontend.get_vring_base(1).unwrap();
    assert_eq!(device.status().ring_stops, 2);
    let offered = g.frontend.get_features().unwrap();
    let fewer = offered & !(mask::CSUM | mask::HOST_TSO4 | mask::HOST_TSO6 | mask::HOST_ECN);
    g.frontend.set_features(fewer).unwrap();
    g.set_memory();
    let start = align(g.bump.next, 4096);
    g.setup_rings(1, start, 0);
    assert!(!device.status().features.unwrap().checksum_from_guest());
    // A partial checksum is now an offload the guest did not negotiate: refused.
    g.transmit(0, &partial(), &tcp4_frame(10, 1));
    g.transmit(0, &VirtioNetRepr::PLAIN, &tcp4_frame(10, 2));
    let got = receive(&mut pairs[0], 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, tcp4_frame(10, 2));
    assert_eq!(
        pairs[0]
            .stats()
            .refused
            .get(palisade_io::vhost_user::Refusal::OffloadNotNegotiated),
        1
    );
}

/// Send SET_VRING_ENABLE(`index`, 1) with NEED_REPLY on `raw` and read the acknowledgement.
fn raw_enable(raw: &mut std::os::unix::net::UnixStream, index: u32) -> u64 {
    use std::io::{Read, Write};
    let mut msg = Vec::new();
    for v in [18u32, 0x1 | 0x8, 8, index, 1] {
        msg.extend_from_slice(&v.to_le_bytes());
    }
    raw.write_all(&msg).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut reply = [0u8; 20];
    raw.read_exact(&mut reply)
        .expect("an acknowledgement of the early SET_VRING_ENABLE");
    assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 18);
    assert_eq!(
        u32::from_le_bytes(reply[4..8].try_into().unwrap()) & 0x4,
        0x4,
        "a reply"
    );
    u64::from_le_bytes(reply[12..20].try_into().unwrap())
}

#[test]
fn rings_enabled_before_the_features_are_negotiated_stay_enabled() {
    // QEMU 7.2 does this on a reconnect (and at multiqueue start-up): the
    // vhost crate alone would drop these enables without a reply, leaving
    // the rings disabled for good (seen with the QEMU guest test).
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let (device, mut pairs) = open(&socket, 1);
    let stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let mut raw = stream.try_clone().unwrap();
    let mut fe = Frontend::from_stream(stream, 2);
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(pf).unwrap();
    assert_eq!(raw_enable(&mut raw, 0), 0);
    assert_eq!(raw_enable(&mut raw, 1), 0);
    assert_eq!(raw_enable(&mut raw, 7), 1, "a ring that does not exist is refused");
    fe.set_features(offered).unwrap();
    let file = memory_file();
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(MEM_BASE),
        MEM_LEN as usize,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: MEM_BASE,
        memory_size: MEM_LEN,
        userspace_addr: USER_BASE,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    }])
    .unwrap();
    // Rings set up and started, but never enabled again after SET_FEATURES.
    let mut rings = Vec::new();
    let mut kicks = Vec::new();
    let mut at = MEM_BASE;
    for q in 0..2 {
        let ring = DriverRing::new(at, RING_SIZE);
        ring.init(&mem);
        at = align(ring.end(), 4096);
        let user = |gpa: u64| USER_BASE + (gpa - MEM_BASE);
        fe.set_vring_num(q, RING_SIZE).unwrap();
        fe.set_vring_addr(
            q,
            &VringConfigData {
                queue_max_size: RING_SIZE,
                queue_size: RING_SIZE,
                flags: 0,
                desc_table_addr: user(ring.layout.desc_table),
                used_ring_addr: user(ring.layout.used_ring),
                avail_ring_addr: user(ring.layout.avail_ring),
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(q, 0).unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        fe.set_vring_call(q, &EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
        fe.set_vring_kick(q, &kick).unwrap();
        rings.push(ring);
        kicks.push(kick);
    }
    eventually("both rings to run", || pairs[0].running() == (true, true));
    assert_eq!(device.status().early_ring_enables, 3);
    // And frames flow.
    let frame = tcp4_frame(10, 1);
    let mut bytes = VirtioNetRepr::PLAIN.to_bytes().to_vec();
    bytes.extend_from_slice(&frame);
    let buf = align(at, 4096);
    mem.write_slice(&bytes, GuestAddress(buf)).unwrap();
    rings[1].add(&mem, &[(buf, bytes.len() as u32, false)]).unwrap();
    rings[1].publish(&mem);
    kicks[1].write(1).unwrap();
    assert_eq!(receive(&mut pairs[0], 1)[0].1, frame);
}

#[test]
fn socket_paths_are_checked_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let e = VhostUserNet::open(&VhostUserNetConfig::new(&file)).unwrap_err();
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    let socket = socket_in(&dir);
    let (_live, _) = open(&socket, 1);
    let e = VhostUserNet::open(&VhostUserNetConfig::new(&socket)).unwrap_err();
    assert!(e.to_string().contains("already listening"), "{e}");

    // A stale socket (its listener gone without removing it) is replaced.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let (_d, _) = open(&stale, 1);

    let mut c = VhostUserNetConfig::new(dir.path().join("x.sock"));
    c.queue_pairs = 0;
    assert!(VhostUserNet::open(&c).is_err());
    c.queue_pairs = 129;
    assert!(VhostUserNet::open(&c).is_err());
}

/// Send SEND_RARP(`mac`) with NEED_REPLY on `raw` and read the acknowledgement (0: done, 1: refused).
fn raw_send_rarp(raw: &mut std::os::unix::net::UnixStream, mac: [u8; 6]) -> u64 {
    use std::io::{Read, Write};
    let mut msg = Vec::new();
    for v in [19u32, 0x1 | 0x8, 8] {
        msg.extend_from_slice(&v.to_le_bytes());
    }
    let mut body = [0u8; 8];
    body[..6].copy_from_slice(&mac);
    msg.extend_from_slice(&body);
    raw.write_all(&msg).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut reply = [0u8; 20];
    raw.read_exact(&mut reply).expect("an acknowledgement of SEND_RARP");
    assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 19);
    assert_eq!(
        u32::from_le_bytes(reply[4..8].try_into().unwrap()) & 0x4,
        0x4,
        "a reply"
    );
    u64::from_le_bytes(reply[12..20].try_into().unwrap())
}

const VNIC_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fn open_with_mac(socket: &Path, pairs: u16, mac: Option<[u8; 6]>) -> (VhostUserNet, Vec<QueuePair>) {
    let mut c = VhostUserNetConfig::new(socket);
    c.queue_pairs = pairs;
    c.mac = mac;
    VhostUserNet::open(&c).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn send_rarp_for_the_vnics_mac_comes_out_as_the_guests_announcement_and_others_are_refused() {
    use palisade_io::vhost_user::announce::rarp_frame;
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let (device, mut pairs) = open_with_mac(&socket, 2, Some(VNIC_MAC));
    let mut g = Guest::connect(&socket, 2, u64::MAX);
    assert_ne!(
        device.status().protocol_features & vhost::vhost_user::message::VhostUserProtocolFeatures::RARP.bits(),
        0,
        "RARP offered and acked"
    );

    // QEMU after a migration: the announcement comes out of the first pair
    // as a frame from the guest, exactly QEMU's RARP.
    assert_eq!(raw_send_rarp(&mut g.raw, VNIC_MAC), 0);
    let got = receive(&mut pairs[0], 1);
    assert_eq!(got, vec![(VirtioNetRepr::PLAIN, rarp_frame(VNIC_MAC).to_vec())]);
    assert_eq!(pairs[0].stats().announcements_injected, 1);
    assert_eq!(pairs[0].stats().from_guest_frames, 0, "not counted as the guest's");

    // Another MAC: refused, counted, nothing handed over, the session goes on.
    let other = [0x52, 0x54, 0x00, 0x99, 0x99, 0x99];
    assert_eq!(raw_send_rarp(&mut g.raw, other), 1);
    assert!(receive_within(&mut pairs[0], 1, Duration::from_millis(200)).is_empty());
    let status = device.status();
    assert_eq!((status.announcements, status.announcements_refused), (1, 1));
    assert!(status.last_error.unwrap().contains("52:54:00:99:99:99"));
    // Announcements and the guest's own frames share a batch, announcements first.
    assert_eq!(raw_send_rarp(&mut g.raw, VNIC_MAC), 0);
    let frame = tcp4_frame(20, 3);
    g.transmit(0, &partial(), &frame);
    let got = receive(&mut pairs[0], 2);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].1, rarp_frame(VNIC_MAC).to_vec());
    assert_eq!(got[1].1, frame);
    assert!(device.status().connected);

    // Too many at once (a frontend flooding the worker): bounded, counted.
    let max = palisade_io::vhost_user::announce::MAX_PENDING_ANNOUNCEMENTS;
    let answers: Vec<u64> = (0..max + 2).map(|_| raw_send_rarp(&mut g.raw, VNIC_MAC)).collect();
    assert_eq!(answers.iter().filter(|&&a| a == 0).count(), max);
    assert_eq!(
        receive_within(&mut pairs[0], max + 2, Duration::from_secs(1)).len(),
        max
    );
    assert_eq!(pairs[0].stats().announcements_dropped, 2);
}

#[test]
fn send_rarp_is_refused_by_a_device_without_a_mac() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let (device, mut pairs) = open_with_mac(&socket, 1, None);
    let mut g = Guest::connect(&socket, 1, u64::MAX);
    assert_eq!(raw_send_rarp(&mut g.raw, VNIC_MAC), 1);
    assert!(receive_within(&mut pairs[0], 1, Duration::from_millis(200)).is_empty());
    assert_eq!(device.status().announcements_refused, 1);
    // The session goes on.
    g.transmit(0, &partial(), &tcp4_frame(10, 1));
    assert_eq!(receive(&mut pairs[0], 1).len(), 1);
}

#[test]
fn an_announcement_before_the_rings_run_is_handed_over() {
    // QEMU's first announce round on the destination comes before it starts
    // the device (the guest's memory table and rings come with vm_start).
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let (device, mut pairs) = open_with_mac(&socket, 1, Some(VNIC_MAC));
    let (mut fe, mut raw) = connect_retrying(&socket, 2);
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    fe.set_features(offered).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(pf).unwrap();
    assert_eq!(raw_send_rarp(&mut raw, VNIC_MAC), 0);
    assert_eq!(pairs[0].running(), (false, false));
    let got = receive(&mut pairs[0], 1);
    assert_eq!(got.len(), 1);
    assert_eq!(device.status().announcements, 1);
}

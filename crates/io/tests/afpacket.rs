//! AF_PACKET ports on a real veth pair between two test namespaces.

mod common;

use std::net::{TcpStream, UdpSocket};
use std::time::Duration;

use common::{SW_IP, SW_MAC, VM_IP, VethPair, collect, ethertype, udp_dst_port};
use palisade_io::{AfPacket, AfPacketConfig, FramePort, RxMode};
use palisade_wire::frame::Dissection;

/// Local experimental EtherType used to mark the frames a test injects.
const MARK: u16 = 0x88b5;

fn open(ns: &common::Netns, ifname: &str, config: &AfPacketConfig) -> AfPacket {
    ns.enter(|| AfPacket::open(ifname, config))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn marked_frame(i: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xaa]);
    f.extend_from_slice(&MARK.to_be_bytes());
    f.extend_from_slice(&i.to_be_bytes());
    f.resize(len, 0x5a);
    f
}

fn mark_seq(f: &[u8]) -> Option<u32> {
    (ethertype(f) == MARK).then(|| u32::from_be_bytes([f[14], f[15], f[16], f[17]]))
}

fn valid_checksums(f: &[u8]) -> bool {
    let d = Dissection::ethernet(f);
    d.error.is_none() && d.checksums_valid()
}

fn send_udp_from_vm(pair: &VethPair, port: u16, payloads: &[Vec<u8>]) {
    pair.vm.enter(|| {
        let s = UdpSocket::bind(format!("{VM_IP}:0")).unwrap();
        for p in payloads {
            s.send_to(p, format!("{SW_IP}:{port}")).unwrap();
        }
    });
}

/// A ring of `count` blocks of `size` bytes, handed over after 1 ms, so that
/// a test's frames span blocks and its receives end inside them.
fn small_blocks(size: usize, count: usize) -> AfPacketConfig {
    AfPacketConfig {
        block_size: size,
        block_count: count,
        frame_size: 2048,
        block_timeout_ms: 1,
        tx_frames: 16,
        tx_buffer: 16 * 2048,
        vnet_hdr: true,
        fanout: None,
        rx: RxMode::Ring,
    }
}

/// The default configuration, receiving as `rx` says.
fn receiving(rx: RxMode) -> AfPacketConfig {
    AfPacketConfig {
        rx,
        ..AfPacketConfig::default()
    }
}

#[test]
fn kernel_frames_arrive_and_own_frames_do_not_return() {
    if !common::can_run("kernel_frames_arrive_and_own_frames_do_not_return", &[]) {
        return;
    }
    let pair = VethPair::new("a1", None);
    let config = AfPacketConfig::default();
    let mut sw = open(&pair.sw, "va", &config);
    let mut vm = open(&pair.vm, "vb", &config);
    assert_eq!(sw.name(), "va");
    assert!(sw.ifindex() > 0);

    // Kernel-originated traffic from the VM side reaches the switch side intact.
    let payloads: Vec<Vec<u8>> = (0..3).map(|i| format!("palisade-{i}").into_bytes()).collect();
    send_udp_from_vm(&pair, 7777, &payloads);
    let frames = collect(&mut sw, 3, Duration::from_secs(3), |f| udp_dst_port(f) == Some(7777));
    assert_eq!(frames.len(), 3, "UDP frames received");
    for (f, p) in frames.iter().zip(&payloads) {
        assert_eq!(&f[..6], &SW_MAC, "destination MAC");
        assert!(f.ends_with(p), "payload {p:?} in {f:02x?}");
        assert!(valid_checksums(f), "checksums of {f:02x?}");
    }

    // Frames the switch side sends reach the VM side byte for byte...
    let sent: Vec<Vec<u8>> = (0..5).map(|i| marked_frame(i, 60 + 10 * i as usize)).collect();
    for f in &sent {
        sw.send(f).unwrap();
    }
    sw.flush().unwrap();
    let seen = collect(&mut vm, 5, Duration::from_secs(3), |f| mark_seq(f).is_some());
    assert_eq!(seen, sent);
    // ...and never come back to the socket that sent them.
    let echoed = collect(&mut sw, 1, Duration::from_millis(300), |f| mark_seq(f).is_some());
    assert!(echoed.is_empty(), "own transmissions received: {echoed:02x?}");

    // Frames the switch side's own kernel transmits on the interface are not seen either.
    pair.sw.ip(&["addr", "add", &format!("{SW_IP}/24"), "dev", "va"]);
    pair.sw.enter(|| {
        let s = UdpSocket::bind(format!("{SW_IP}:0")).unwrap();
        s.send_to(b"from-the-host", format!("{VM_IP}:7778")).unwrap();
    });
    let at_vm = collect(&mut vm, 1, Duration::from_secs(3), |f| udp_dst_port(f) == Some(7778));
    assert_eq!(at_vm.len(), 1, "host-originated UDP should reach the VM side");
    let at_sw = collect(&mut sw, 1, Duration::from_millis(300), |f| {
        udp_dst_port(f) == Some(7778)
    });
    assert!(
        at_sw.is_empty(),
        "host-originated frame seen by its own interface's port"
    );

    // A frame larger than the frame size is an error, not a panic, and counted.
    let err = sw.send(&vec![0; config.frame_size + 1]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    let stats = sw.stats();
    assert_eq!(stats.tx_frames, 5);
    assert_eq!(stats.tx_bytes, sent.iter().map(|f| f.len() as u64).sum::<u64>());
    assert_eq!(stats.tx_errors, 1);
    assert!(stats.rx_frames >= 3, "{stats:?}");
    assert_eq!(stats.truncated, 0);
    assert_eq!(stats.kernel_drops, 0);
    assert!(vm.stats().rx_frames >= 6, "{:?}", vm.stats());

    // The interface going down is reported once, as an error, not as endless empty receives.
    pair.sw.ip(&["link", "set", "va", "down"]);
    let ready = palisade_io::wait_readable(&[sw.fd()], Duration::from_secs(2)).unwrap();
    assert_eq!(ready, vec![0], "POLLERR expected");
    let err = sw.recv(64, &mut |_| {}).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENETDOWN), "{err}");
    assert_eq!(sw.recv(64, &mut |_| {}).unwrap(), 0);
}

#[test]
fn partial_checksums_are_completed() {
    partial_checksums_are_completed_with("partial_checksums_are_completed", "c1", RxMode::Socket);
}

#[test]
fn partial_checksums_are_completed_from_the_ring() {
    partial_checksums_are_completed_with("partial_checksums_are_completed_from_the_ring", "c2", RxMode::Ring);
}

fn partial_checksums_are_completed_with(name: &str, tag: &str, rx: RxMode) {
    if !common::can_run(name, &["ethtool"]) {
        return;
    }
    let pair = VethPair::new(tag, None);
    // TX checksum offload on the sender: its frames leave with only the pseudo-header sum.
    pair.vm.exec("ethtool", &["-K", "vb", "tx", "on"]);
    // Plain receives (`recv`): the port completes the checksums.
    let mut sw = open(&pair.sw, "va", &receiving(rx));

    send_udp_from_vm(&pair, 7777, &[vec![0xab; 333]]);
    // A SYN to an address that never answers: the connect times out, the SYN is on the wire.
    pair.vm.enter(|| {
        let addr = format!("{SW_IP}:80").parse().unwrap();
        let _ = TcpStream::connect_timeout(&addr, Duration::from_millis(200));
    });
    let is_syn = |f: &[u8]| ethertype(f) == 0x0800 && f[23] == 6 && f[36..38] == 80u16.to_be_bytes();
    let frames = collect(&mut sw, 2, Duration::from_secs(3), |f| {
        udp_dst_port(f) == Some(7777) || is_syn(f)
    });
    let (syn, udp): (Vec<_>, Vec<_>) = frames.iter().partition(|f| is_syn(f));
    assert_eq!((udp.len(), syn.len()), (1, 1), "one UDP datagram and one SYN");
    assert!(valid_checksums(udp[0]), "UDP checksum not completed: {:02x?}", udp[0]);
    assert!(valid_checksums(syn[0]), "TCP checksum not completed: {:02x?}", syn[0]);
    let stats = sw.stats();
    assert!(
        stats.csum_completed >= 2,
        "the kernel flagged no partial checksums: {stats:?}"
    );
}

#[test]
fn oversize_frames_are_counted_not_delivered() {
    oversize_frames_are_counted_not_delivered_with("oversize_frames_are_counted_not_delivered", "t1", RxMode::Socket);
}

#[test]
fn oversize_frames_are_counted_not_delivered_from_the_ring() {
    oversize_frames_are_counted_not_delivered_with(
        "oversize_frames_are_counted_not_delivered_from_the_ring",
        "t2",
        RxMode::Ring,
    );
}

fn oversize_frames_are_counted_not_delivered_with(name: &str, tag: &str, rx: RxMode) {
    if !common::can_run(name, &[]) {
        return;
    }
    let pair = VethPair::new(tag, Some(9000));
    let config = AfPacketConfig {
        frame_size: 2048,
        ..receiving(rx)
    };
    let mut sw = open(&pair.sw, "va", &config);
    // A 4000-byte datagram fits the 9000-byte MTU in one frame, which does not fit 2048.
    send_udp_from_vm(&pair, 7777, &[vec![1; 4000], b"small".to_vec()]);
    let frames = collect(&mut sw, 1, Duration::from_secs(3), |f| udp_dst_port(f) == Some(7777));
    assert_eq!(frames.len(), 1);
    assert!(frames[0].ends_with(b"small"), "only the small datagram is delivered");
    let more = collect(&mut sw, 1, Duration::from_millis(200), |f| {
        udp_dst_port(f) == Some(7777)
    });
    assert!(more.is_empty(), "oversize frame delivered: {} bytes", more[0].len());
    let stats = sw.stats();
    assert_eq!(stats.truncated, 1, "{stats:?}");
}

#[test]
fn ring_walk_spans_blocks_in_small_batches() {
    if !common::can_run("ring_walk_spans_blocks_in_small_batches", &[]) {
        return;
    }
    let pair = VethPair::new("r1", None);
    // Tiny blocks: every few frames the walk crosses into the next block, and `recv(3)` stops
    // in the middle of blocks.
    let small = small_blocks(4096, 4);
    let mut sw = open(&pair.sw, "va", &small);
    let mut vm = open(&pair.vm, "vb", &AfPacketConfig::default());
    let mut got: Vec<u32> = Vec::new();
    for round in 0..10u32 {
        // 20 frames per round: more than `tx_frames`, so `send` flushes on its own once.
        for i in 0..20 {
            vm.send(&marked_frame(round * 20 + i, 300)).unwrap();
        }
        vm.flush().unwrap();
        let want = (round as usize + 1) * 20;
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while got.len() < want && std::time::Instant::now() < deadline {
            palisade_io::wait_readable(&[sw.fd()], Duration::from_millis(20)).unwrap();
            let n = sw
                .recv(3, &mut |f| {
                    if let Some(seq) = mark_seq(f) {
                        assert_eq!(f.len(), 300);
                        got.push(seq);
                    }
                })
                .unwrap();
            assert!(n <= 3);
        }
    }
    assert_eq!(got, (0..200).collect::<Vec<u32>>());
    let stats = sw.stats();
    assert_eq!(stats.kernel_drops, 0, "{stats:?}");
    assert_eq!(vm.stats().tx_frames, 200);
}

#[test]
fn vlan_tags_survive_the_ring() {
    vlan_tags_survive("vlan_tags_survive_the_ring", "v1", RxMode::Ring);
}

#[test]
fn vlan_tags_survive_the_socket_queue() {
    vlan_tags_survive("vlan_tags_survive_the_socket_queue", "v2", RxMode::Socket);
}

fn vlan_tags_survive(name: &str, tag: &str, rx: RxMode) {
    if !common::can_run(name, &[]) {
        return;
    }
    let pair = VethPair::new(tag, None);
    let mut sw = open(&pair.sw, "va", &receiving(rx));
    let mut vm = open(&pair.vm, "vb", &AfPacketConfig::default());
    // The receiving kernel moves the outer tag into metadata; the port must put it back.
    let tagged = |tags: &[(u16, u16)], seq: u8| {
        let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0xaa];
        for &(tpid, tci) in tags {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        f.extend_from_slice(&MARK.to_be_bytes());
        f.extend_from_slice(&[seq; 50]);
        f
    };
    let sent = vec![
        tagged(&[(0x8100, 0x2064)], 1),
        tagged(&[(0x88a8, 0x0010), (0x8100, 0x0020)], 2),
        tagged(&[(0x8100, 0x0000)], 3),
    ];
    for f in &sent {
        vm.send(f).unwrap();
    }
    vm.flush().unwrap();
    let is_marked = |f: &[u8]| f.windows(2).take(24).any(|w| w == MARK.to_be_bytes());
    let got = collect(&mut sw, 3, Duration::from_secs(3), is_marked);
    assert_eq!(got, sent);
}

#[test]
fn batches_hold_exactly_the_frames_one_at_a_time_would() {
    // Blocks of a few frames each, so batches end at block boundaries as well as at `max`.
    batches_hold_exactly(
        "batches_hold_exactly_the_frames_one_at_a_time_would",
        "b1",
        &small_blocks(8192, 8),
    );
}

#[test]
fn socket_batches_hold_exactly_the_frames_one_at_a_time_would() {
    batches_hold_exactly(
        "socket_batches_hold_exactly_the_frames_one_at_a_time_would",
        "b2",
        &receiving(RxMode::Socket),
    );
}

fn batches_hold_exactly(name: &str, tag: &str, config: &AfPacketConfig) {
    if !common::can_run(name, &[]) {
        return;
    }
    let pair = VethPair::new(tag, None);
    let mut sw = open(&pair.sw, "va", config);
    let mut vm = open(&pair.vm, "vb", &AfPacketConfig::default());
    // Plain frames, which a batch hands over from the ring, mixed with tagged
    // ones, which the port rebuilds in its scratch buffer.
    let frame = |seq: u32| {
        let mut f = marked_frame(seq, 100 + (seq as usize % 7) * 40);
        if seq % 3 == 0 {
            f.splice(12..12, [0x81, 0x00, 0x00, (seq % 100) as u8 + 1]);
        }
        f
    };
    let seq_of = |f: &[u8]| mark_seq(if ethertype(f) == 0x8100 { &f[4..] } else { f });
    let sent: Vec<Vec<u8>> = (0..120).map(frame).collect();
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut batches = 0;
    for chunk in sent.chunks(30) {
        for f in chunk {
            vm.send(f).unwrap();
        }
        vm.flush().unwrap();
        let want = got.len() + chunk.len();
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while got.len() < want && std::time::Instant::now() < deadline {
            palisade_io::wait_readable(&[sw.fd()], Duration::from_millis(20)).unwrap();
            let mut in_call = 0;
            let n = sw
                .recv_batch(7, &mut |frames| {
                    assert!(!frames.is_empty(), "an empty batch");
                    batches += 1;
                    in_call += frames.len();
                    got.extend(frames.iter().filter(|f| seq_of(f).is_some()).map(|f| f.to_vec()));
                })
                .unwrap();
            assert_eq!(n, in_call, "the count returned is the frames handed over");
            assert!(n <= 7, "{n} frames for a maximum of 7");
        }
    }
    assert_eq!(got.len(), sent.len(), "frames received");
    for (g, s) in got.iter().zip(&sent) {
        assert_eq!(g, s, "frame {:?}", seq_of(s));
    }
    assert!(batches >= 120 / 7, "{batches} batches");
    assert_eq!(sw.stats().kernel_drops, 0);
}

/// Why ports receive from the socket queue by default: the ring hands a
/// block over only when it is full or its retire timeout expires, so a lone
/// frame (a TCP ACK, a ping) waits for the timeout (here set to a second, to
/// make the wait plain); from the socket queue it is readable at once.
#[test]
fn a_lone_frame_waits_for_the_ring_block_but_not_in_the_socket_queue() {
    if !common::can_run("a_lone_frame_waits_for_the_ring_block_but_not_in_the_socket_queue", &[]) {
        return;
    }
    let pair = VethPair::new("l1", None);
    let slow = |rx| AfPacketConfig {
        block_timeout_ms: 1000,
        ..receiving(rx)
    };
    let mut ring = open(&pair.sw, "va", &slow(RxMode::Ring));
    let mut queue = open(&pair.sw, "va", &slow(RxMode::Socket));
    let mut vm = open(&pair.vm, "vb", &AfPacketConfig::default());
    vm.send(&marked_frame(7, 80)).unwrap();
    vm.flush().unwrap();
    let from_queue = collect(&mut queue, 1, Duration::from_millis(300), |f| mark_seq(f) == Some(7));
    assert_eq!(
        from_queue.len(),
        1,
        "the socket queue did not hand the frame over at once"
    );
    let early = collect(&mut ring, 1, Duration::from_millis(300), |f| mark_seq(f) == Some(7));
    assert!(
        early.is_empty(),
        "the ring handed a lone frame over before its block's timeout"
    );
    let late = collect(&mut ring, 1, Duration::from_secs(3), |f| mark_seq(f) == Some(7));
    assert_eq!(late.len(), 1, "the ring never handed the frame over");
}

#[test]
fn ports_are_send_and_fit_one_trait_object_list() {
    fn assert_send<T: Send>() {}
    assert_send::<AfPacket>();
    assert_send::<palisade_io::Tap>();
    assert_send::<palisade_io::UdpOverlay>();
    // The agent keeps ports of both kinds in one list.
    let ports: Vec<Box<dyn FramePort>> = Vec::new();
    assert!(ports.is_empty());
}

//! Offloads end to end on real kernels: TCP super-frames through AF_PACKET
//! with virtio-net headers and through TAPs, forwarded by a small loop in the
//! test between two namespaces with their offloads on; UDP segmentation and
//! receive offload on the underlay socket between two namespaces.

mod common;
#[path = "support/gso_props.rs"]
mod props;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::Netns;
use palisade_io::gso::{self, Coalescer};
use palisade_io::overlay::Outgoing;
use palisade_io::{AfPacket, AfPacketConfig, FramePort, Offload, Tap, UdpOverlay, wait_readable};
use palisade_wire::virtio_net::GsoKind;

/// Bytes each TCP test sends.
const TRANSFER: usize = 24 << 20;

/// What a forwarding loop saw.
#[derive(Debug, Default)]
struct Seen {
    super_frames: u64,
    largest: usize,
    kinds: Vec<GsoKind>,
    plain_frames: u64,
}

/// Forward between `a` and `b` until `stop`: every frame received on one is
/// sent on the other with its offload state (`plain`: through the plain
/// interface, frames cut up and completed by the port).
fn forward(a: &mut dyn FramePort, b: &mut dyn FramePort, plain: bool, stop: &AtomicBool) -> Seen {
    let mut seen = Seen::default();
    let fds = [a.fd(), b.fd()];
    while !stop.load(Ordering::Relaxed) {
        let ready = wait_readable(&fds, Duration::from_millis(20)).unwrap();
        for i in ready {
            let (from, to): (&mut dyn FramePort, &mut dyn FramePort) =
                if i == 0 { (&mut *a, &mut *b) } else { (&mut *b, &mut *a) };
            if plain {
                from.recv_batch(256, &mut |frames| {
                    for f in frames {
                        seen.plain_frames += 1;
                        seen.largest = seen.largest.max(f.len());
                        let _ = to.send(f);
                    }
                })
                .unwrap();
            } else {
                from.recv_frames(256, &mut |frames| {
                    for f in frames {
                        if let Some(g) = f.offload.gso {
                            seen.super_frames += 1;
                            if !seen.kinds.contains(&g.kind) {
                                seen.kinds.push(g.kind);
                            }
                        }
                        seen.largest = seen.largest.max(f.bytes.len());
                        let _ = to.send_frame(f.bytes, &f.offload);
                    }
                })
                .unwrap();
            }
            to.flush().unwrap();
        }
    }
    seen
}

fn pattern(i: usize) -> u8 {
    (i as u8).wrapping_mul(13) ^ (i >> 11) as u8
}

/// Send TRANSFER bytes from `client_ns` to `server_ip:5001` in `server_ns`; returns the bytes the
/// server received, checked against the pattern as they come.
fn tcp_transfer(client_ns: &Netns, server_ns: &Netns, server_ip: &str) -> usize {
    let listener = server_ns
        .enter(|| TcpListener::bind(format!("{server_ip}:5001")))
        .unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => panic!("server read after {got} bytes: {e}"),
            };
            for (k, &b) in buf[..n].iter().enumerate() {
                assert_eq!(b, pattern(got + k), "byte {} differs", got + k);
            }
            got += n;
        }
        got
    });
    let addr: std::net::SocketAddr = format!("{server_ip}:5001").parse().unwrap();
    let mut c = client_ns
        .enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
        .expect("connect through the forwarder");
    c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let data: Vec<u8> = (0..TRANSFER).map(pattern).collect();
    // Large writes: the sender's TCP builds 64 KiB super-frames.
    for chunk in data.chunks(256 << 10) {
        c.write_all(chunk).unwrap();
    }
    drop(c);
    server.join().unwrap()
}

/// Two "VM" namespaces with a veth each into a switch namespace (`va1`, `va2`), offloads on.
struct TwoVms {
    vm1: Netns,
    vm2: Netns,
    sw: Netns,
}

impl TwoVms {
    fn new(tag: &str) -> TwoVms {
        let vm1 = Netns::new(&format!("{tag}1"));
        let vm2 = Netns::new(&format!("{tag}2"));
        let sw = Netns::new(&format!("{tag}s"));
        for (vm, n, ip) in [(&vm1, 1, "10.9.0.1/24"), (&vm2, 2, "10.9.0.2/24")] {
            let (s, v) = (format!("va{n}"), format!("vb{n}"));
            sw.ip(&["link", "add", &s, "type", "veth", "peer", "name", &v, "netns", &vm.name]);
            vm.ip(&["addr", "add", ip, "dev", &v]);
            vm.ip(&["link", "set", &v, "up"]);
            sw.ip(&["link", "set", &s, "up"]);
        }
        TwoVms { vm1, vm2, sw }
    }
}

fn offloads_of(ns: &Netns, ifname: &str) -> String {
    ns.exec("ethtool", &["-k", ifname])
}

#[test]
fn afpacket_forwards_tcp_super_frames_with_their_headers() {
    if !common::can_run("afpacket_forwards_tcp_super_frames_with_their_headers", &["ethtool"]) {
        return;
    }
    let t = TwoVms::new("of");
    let k = offloads_of(&t.vm1, "vb1");
    assert!(k.contains("tcp-segmentation-offload: on"), "veth TSO is off: {k}");
    let mut a =
        t.sw.enter(|| AfPacket::open("va1", &AfPacketConfig::default()))
            .unwrap();
    let mut b =
        t.sw.enter(|| AfPacket::open("va2", &AfPacketConfig::default()))
            .unwrap();
    assert!(a.offloads().rx && a.offloads().tx);
    let stop = AtomicBool::new(false);
    let (got, seen) = thread::scope(|s| {
        let fwd = s.spawn(|| forward(&mut a, &mut b, false, &stop));
        let started = Instant::now();
        let got = tcp_transfer(&t.vm1, &t.vm2, "10.9.0.2");
        eprintln!("{TRANSFER} bytes in {:?}", started.elapsed());
        stop.store(true, Ordering::Relaxed);
        (got, fwd.join().unwrap())
    });
    assert_eq!(got, TRANSFER, "bytes received");
    assert!(seen.super_frames > 0, "no super-frame seen: {seen:?}");
    assert!(seen.largest > 1514, "largest frame {} bytes", seen.largest);
    assert!(seen.kinds.contains(&GsoKind::TcpV4), "{seen:?}");
    let (sa, sb) = (a.stats(), b.stats());
    assert!(sa.rx_super_frames > 0 && sb.tx_super_frames > 0, "{sa:?} {sb:?}");
    assert_eq!(
        (sa.truncated, sa.offload_errors, sb.tx_errors),
        (0, 0, 0),
        "{sa:?} {sb:?}"
    );
    assert_eq!(sa.sw_segmented + sb.sw_segmented, 0, "nothing cut in user space");
}

#[test]
fn plain_receivers_get_packets_cut_from_super_frames() {
    if !common::can_run("plain_receivers_get_packets_cut_from_super_frames", &["ethtool"]) {
        return;
    }
    // What the agent does today (recv_batch + send) on ports with headers, offloads on.
    let t = TwoVms::new("pl");
    let mut a =
        t.sw.enter(|| AfPacket::open("va1", &AfPacketConfig::default()))
            .unwrap();
    let mut b =
        t.sw.enter(|| AfPacket::open("va2", &AfPacketConfig::default()))
            .unwrap();
    let stop = AtomicBool::new(false);
    let (got, seen) = thread::scope(|s| {
        let fwd = s.spawn(|| forward(&mut a, &mut b, true, &stop));
        let got = tcp_transfer(&t.vm1, &t.vm2, "10.9.0.2");
        stop.store(true, Ordering::Relaxed);
        (got, fwd.join().unwrap())
    });
    assert_eq!(got, TRANSFER);
    assert!(
        seen.largest <= 1514,
        "a plain receiver got a {}-byte frame",
        seen.largest
    );
    let sa = a.stats();
    assert!(sa.rx_super_frames > 0 && sa.sw_segmented > 0, "{sa:?}");
    assert!(
        sa.csum_completed > 0,
        "partial checksums of small frames completed: {sa:?}"
    );
}

#[test]
fn without_headers_super_frames_are_truncated_as_before() {
    if !common::can_run("without_headers_super_frames_are_truncated_as_before", &[]) {
        return;
    }
    // The VM sends one UDP segmentation super-frame (a UDP_SEGMENT send: 20 datagrams of
    // 1000 bytes), which crosses the veth whole.
    let t = TwoVms::new("nh");
    t.vm1.ip(&[
        "neigh",
        "add",
        "10.9.0.2",
        "lladdr",
        "02:00:00:00:00:02",
        "dev",
        "vb1",
        "nud",
        "permanent",
    ]);
    let sock = t.vm1.enter(|| std::net::UdpSocket::bind("10.9.0.1:0")).unwrap();
    let segment: libc::c_int = 1000;
    // SAFETY: setsockopt reads one int from `segment`.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_UDP,
            103, // UDP_SEGMENT
            (&segment as *const libc::c_int).cast(),
            4,
        )
    };
    assert_eq!(r, 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
    let payload: Vec<u8> = (0..20_000).map(|i| (i % 251) as u8).collect();

    // The old behaviour, for comparison: without headers it does not fit and is counted.
    let mut plain = t.sw.enter(|| AfPacket::open("va1", &AfPacketConfig::plain())).unwrap();
    assert!(!plain.offloads().rx);
    sock.send_to(&payload, "10.9.0.2:7000").unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while plain.stats().truncated == 0 && Instant::now() < deadline {
        wait_readable(&[plain.fd()], Duration::from_millis(20)).unwrap();
        plain.recv(64, &mut |_| {}).unwrap();
    }
    assert_eq!(plain.stats().truncated, 1, "{:?}", plain.stats());
    drop(plain);

    // With headers it arrives whole, as one UDP segmentation super-frame; a plain
    // receiver of the same port gets the 20 datagrams, each valid.
    let mut port =
        t.sw.enter(|| AfPacket::open("va1", &AfPacketConfig::default()))
            .unwrap();
    sock.send_to(&payload, "10.9.0.2:7000").unwrap();
    let mut found = None;
    let deadline = Instant::now() + Duration::from_secs(2);
    while found.is_none() && Instant::now() < deadline {
        wait_readable(&[port.fd()], Duration::from_millis(20)).unwrap();
        port.recv_frames(64, &mut |fs| {
            for f in fs.iter().filter(|f| f.offload.gso.is_some()) {
                found = Some((f.bytes.to_vec(), f.offload));
            }
        })
        .unwrap();
    }
    let (frame, offload) = found.expect("no UDP super-frame");
    assert_eq!(frame.len(), 14 + 20 + 8 + 20_000);
    let g = offload.gso.unwrap();
    assert_eq!((g.kind, g.size), (GsoKind::UdpL4, 1000));
    let mut cut = palisade_io::PlainFrames::default();
    let mut stats = palisade_io::PortStats::default();
    let mut datagrams = Vec::new();
    cut.deliver(
        &[palisade_io::RxFrame { bytes: &frame, offload }],
        &mut stats,
        &mut |fs| {
            for f in fs {
                let d = palisade_wire::frame::Dissection::ethernet(f);
                assert!(d.error.is_none() && d.checksums_valid(), "datagram {}", datagrams.len());
                datagrams.extend_from_slice(&f[42..]);
            }
        },
    );
    assert_eq!(datagrams, payload);
    assert_eq!(stats.sw_segmented, 1);
}

#[test]
fn taps_forward_tcp_super_frames_with_their_headers() {
    if !common::can_run("taps_forward_tcp_super_frames_with_their_headers", &[]) {
        return;
    }
    let n1 = Netns::new("tp1");
    let n2 = Netns::new("tp2");
    let mut t1 = n1.enter(|| Tap::open("pt1")).unwrap();
    let mut t2 = n2.enter(|| Tap::open("pt2")).unwrap();
    assert!(
        t1.offload_flags() & palisade_io::tap::tun_f::TSO4 != 0,
        "{:#x}",
        t1.offload_flags()
    );
    eprintln!("TAP offload flags accepted: {:#x}", t1.offload_flags());
    for (ns, dev, ip) in [(&n1, "pt1", "10.9.1.1/24"), (&n2, "pt2", "10.9.1.2/24")] {
        ns.ip(&["addr", "add", ip, "dev", dev]);
        ns.ip(&["link", "set", dev, "up"]);
    }
    let stop = AtomicBool::new(false);
    let (got, seen) = thread::scope(|s| {
        let fwd = s.spawn(|| forward(&mut t1, &mut t2, false, &stop));
        let got = tcp_transfer(&n1, &n2, "10.9.1.2");
        stop.store(true, Ordering::Relaxed);
        (got, fwd.join().unwrap())
    });
    assert_eq!(got, TRANSFER);
    assert!(seen.super_frames > 0 && seen.largest > 1514, "{seen:?}");
    let (s1, s2) = (t1.stats(), t2.stats());
    assert!(s1.rx_super_frames > 0 && s2.tx_super_frames > 0, "{s1:?} {s2:?}");
    assert_eq!((s1.truncated, s1.offload_errors, s2.tx_errors), (0, 0, 0));
}

#[test]
fn taps_without_headers_still_carry_tcp_when_given_super_frames() {
    if !common::can_run("taps_without_headers_still_carry_tcp_when_given_super_frames", &[]) {
        return;
    }
    // A TAP with headers on one side (super-frames in), one without on the other: the port cuts them.
    let n1 = Netns::new("tq1");
    let n2 = Netns::new("tq2");
    let mut t1 = n1.enter(|| Tap::open("pq1")).unwrap();
    let mut t2 = n2
        .enter(|| Tap::open_with("pq2", &palisade_io::TapConfig { vnet_hdr: false }))
        .unwrap();
    for (ns, dev, ip) in [(&n1, "pq1", "10.9.3.1/24"), (&n2, "pq2", "10.9.3.2/24")] {
        ns.ip(&["addr", "add", ip, "dev", dev]);
        ns.ip(&["link", "set", dev, "up"]);
    }
    let stop = AtomicBool::new(false);
    let got = thread::scope(|s| {
        let fwd = s.spawn(|| forward(&mut t1, &mut t2, false, &stop));
        let got = tcp_transfer(&n1, &n2, "10.9.3.2");
        stop.store(true, Ordering::Relaxed);
        fwd.join().unwrap();
        got
    });
    assert_eq!(got, TRANSFER);
    assert!(t2.stats().sw_segmented > 0, "{:?}", t2.stats());
}

/// Two namespaces joined by a veth (`u1` 10.9.2.1, `u2` 10.9.2.2), an underlay socket in each on one port.
fn underlay(tag: &str) -> (Netns, Netns, UdpOverlay, UdpOverlay) {
    let n1 = Netns::new(&format!("{tag}1"));
    let n2 = Netns::new(&format!("{tag}2"));
    n1.ip(&[
        "link", "add", "u1", "type", "veth", "peer", "name", "u2", "netns", &n2.name,
    ]);
    n1.ip(&["addr", "add", "10.9.2.1/24", "dev", "u1"]);
    n2.ip(&["addr", "add", "10.9.2.2/24", "dev", "u2"]);
    n1.ip(&["link", "set", "u1", "mtu", "1600", "up"]);
    n2.ip(&["link", "set", "u2", "mtu", "1600", "up"]);
    let a = n1
        .enter(|| UdpOverlay::bind(SocketAddrV4::new(Ipv4Addr::new(10, 9, 2, 1), 4789)))
        .unwrap();
    let b = n2
        .enter(|| UdpOverlay::bind(SocketAddrV4::new(Ipv4Addr::new(10, 9, 2, 2), 4789)))
        .unwrap();
    (n1, n2, a, b)
}

const B: Ipv4Addr = Ipv4Addr::new(10, 9, 2, 2);

/// Receive from `sock` until `want` datagrams came or 3 s passed; (sender, bytes, segment size) per receive.
fn receive(sock: &mut UdpOverlay, want: usize) -> Vec<(Ipv4Addr, Vec<u8>, usize)> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut got = Vec::new();
    let mut n = 0;
    while n < want && Instant::now() < deadline {
        wait_readable(&[sock.fd()], Duration::from_millis(20)).unwrap();
        n += sock
            .recv_segments(64, &mut |from, p, seg| got.push((from, p.to_vec(), seg)))
            .unwrap();
    }
    got
}

#[test]
fn udp_segmentation_and_gro_between_namespaces() {
    if !common::can_run("udp_segmentation_and_gro_between_namespaces", &[]) {
        return;
    }
    let (_n1, _n2, mut a, mut b) = underlay("ug");
    assert!(b.enable_gro(), "the kernel refused UDP_GRO");
    // 40 datagrams of 1000 bytes and a last of 123, each numbered.
    let mut buf = Vec::new();
    for i in 0..41u8 {
        let len = if i == 40 { 123 } else { 1000 };
        buf.extend((0..len).map(|k| i ^ k as u8));
    }
    assert_eq!(a.send_segments(B, &buf, 1000).unwrap(), 41);
    a.flush().unwrap();
    assert!(a.gso_enabled());
    assert_eq!(
        (a.stats().tx_frames, a.stats().tx_super_frames),
        (41, 1),
        "{:?}",
        a.stats()
    );
    let got = receive(&mut b, 41);
    assert_eq!(got.len(), 1, "one coalesced receive expected, got {}", got.len());
    assert_eq!(got[0].2, 1000, "segment size");
    assert_eq!(got[0].1, buf);
    assert_eq!((b.stats().rx_frames, b.stats().rx_super_frames), (41, 1));

    // A socket without GRO gets the same send datagram by datagram.
    let mut plain_rx = _n2.enter(|| UdpOverlay::bind(SocketAddrV4::new(B, 4790))).unwrap();
    let mut to_4790 = _n1
        .enter(|| UdpOverlay::bind(SocketAddrV4::new(Ipv4Addr::new(10, 9, 2, 1), 4790)))
        .unwrap();
    to_4790.send_segments(B, &buf, 1000).unwrap();
    to_4790.flush().unwrap();
    let mut datagrams = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while datagrams.len() < 41 && Instant::now() < deadline {
        wait_readable(&[plain_rx.fd()], Duration::from_millis(20)).unwrap();
        plain_rx.recv(64, &mut |_, p| datagrams.push(p.to_vec())).unwrap();
    }
    assert_eq!(datagrams.len(), 41);
    assert_eq!(datagrams.concat(), buf);
}

#[test]
fn tcp_super_frames_cross_the_underlay_as_one_send_and_come_back_whole() {
    if !common::can_run(
        "tcp_super_frames_cross_the_underlay_as_one_send_and_come_back_whole",
        &[],
    ) {
        return;
    }
    let (_n1, _n2, mut a, mut b) = underlay("us");
    assert!(b.enable_gro());
    let spec = props::Spec::default();
    let (frame, offload) = props::build(&spec);
    let n = a.send_super_frame(B, &spec.prefix, &frame, &offload).unwrap();
    a.flush().unwrap();
    assert_eq!(n, 45);
    // 45 datagrams of 1522 bytes: two UDP_SEGMENT sends (65,507 bytes at most each).
    assert_eq!(
        (a.stats().tx_frames, a.stats().tx_super_frames),
        (45, 2),
        "{:?}",
        a.stats()
    );
    let mut coalescer = Coalescer::new(8);
    let mut out: Vec<(Vec<u8>, Offload)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut received = 0;
    while received < 45 && Instant::now() < deadline {
        wait_readable(&[b.fd()], Duration::from_millis(20)).unwrap();
        received += b
            .recv_coalesced(64, &mut coalescer, &mut |_, p, o| out.push((p.to_vec(), *o)))
            .unwrap();
    }
    assert_eq!(received, 45);
    assert_eq!(out.len(), 1, "one super-frame back");
    assert_eq!(out[0].1, offload);
    assert_eq!(&out[0].0[..8], &spec.prefix);
    // The TCP checksum field holds the pseudo-header sum in both.
    assert_eq!(&out[0].0[8..], &frame[..]);
}

#[test]
fn refused_udp_segmentation_falls_back_to_datagrams() {
    if !common::can_run("refused_udp_segmentation_falls_back_to_datagrams", &[]) {
        return;
    }
    let (_n1, _n2, mut a, mut b) = underlay("uf");
    // A socket that sends without UDP checksums (SO_NO_CHECK, allowed for VXLAN over IPv4)
    // is refused UDP_SEGMENT (EINVAL); on Linux 6.18 a device without TX checksum offload
    // is not (the kernel checksums in software), so that is not the way to provoke it.
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one int from `one`.
    let r = unsafe {
        libc::setsockopt(
            a.fd(),
            libc::SOL_SOCKET,
            libc::SO_NO_CHECK,
            (&one as *const libc::c_int).cast(),
            4,
        )
    };
    assert_eq!(r, 0);
    let buf: Vec<u8> = (0..10_000).map(|i| i as u8).collect();
    a.send_segments(B, &buf, 1000).unwrap();
    a.send_to(B, b"after").unwrap();
    a.flush().unwrap();
    assert!(
        !a.gso_enabled(),
        "the kernel accepted UDP_SEGMENT without checksum offload"
    );
    let s = a.stats();
    assert_eq!((s.tx_frames, s.tx_errors, s.offload_errors), (11, 0, 1), "{s:?}");
    let got = receive(&mut b, 11);
    let all: Vec<u8> = got.iter().flat_map(|(_, p, _)| p.clone()).collect();
    assert_eq!(got.len(), 11);
    assert_eq!(&all[..10_000], &buf[..]);
    assert_eq!(&all[10_000..], b"after");
}

/// Datagrams as they arrive at a socket without GRO.
fn datagrams(sock: &mut UdpOverlay, want: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while got.len() < want && Instant::now() < deadline {
        wait_readable(&[sock.fd()], Duration::from_millis(20)).unwrap();
        sock.recv(64, &mut |_, p| got.push(p.to_vec())).unwrap();
    }
    got
}

/// `send_batch` gathers each segment from headers it wrote and the caller's
/// payload: the datagrams on the wire are those `gso::segment` makes, in the
/// batch's order with the plain frames around them, with `UDP_SEGMENT` and
/// after the kernel refused it (one message per datagram, cut across pieces).
#[test]
fn gathered_super_frames_leave_as_the_copied_segments_in_order() {
    if !common::can_run("gathered_super_frames_leave_as_the_copied_segments_in_order", &[]) {
        return;
    }
    for refused in [false, true] {
        let (_n1, _n2, mut a, mut b) = underlay(if refused { "gr" } else { "gg" });
        if refused {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt reads one int from `one`.
            let r = unsafe {
                libc::setsockopt(
                    a.fd(),
                    libc::SOL_SOCKET,
                    libc::SO_NO_CHECK,
                    (&one as *const libc::c_int).cast(),
                    4,
                )
            };
            assert_eq!(r, 0);
        }
        let spec = props::Spec::default();
        let (frame, offload) = props::build(&spec);
        let v6 = props::Spec {
            v6: true,
            ..props::Spec::default()
        };
        let (frame6, offload6) = props::build(&v6);
        let mut want = vec![b"before".to_vec()];
        let mut copied = Vec::new();
        gso::segment(&frame, &offload, &spec.prefix, &mut copied, 1 << 20).unwrap();
        gso::segment(&frame6, &offload6, &v6.prefix, &mut copied, 1 << 20).unwrap();
        let segs4 = gso::segment(&frame, &offload, &spec.prefix, &mut Vec::new(), 1 << 20).unwrap();
        let segs6 = gso::segment(&frame6, &offload6, &v6.prefix, &mut Vec::new(), 1 << 20).unwrap();
        let (len4, len6) = (segs4.total_len(), segs6.total_len());
        want.extend(copied[..len4].chunks(segs4.stride).map(<[u8]>::to_vec));
        want.push(b"between".to_vec());
        want.extend(copied[len4..len4 + len6].chunks(segs6.stride).map(<[u8]>::to_vec));
        want.push(b"after".to_vec());
        let plain = |bytes: &'static [u8]| Outgoing {
            remote: B,
            prefix: &[],
            frame: bytes,
            offload: Offload::NONE,
        };
        let batch = [
            plain(b"before"),
            Outgoing {
                remote: B,
                prefix: &spec.prefix,
                frame: &frame,
                offload,
            },
            plain(b"between"),
            Outgoing {
                remote: B,
                prefix: &v6.prefix,
                frame: &frame6,
                offload: offload6,
            },
            plain(b"after"),
        ];
        let n = a.send_batch(&mut batch.into_iter()).unwrap();
        assert_eq!(n, want.len(), "datagrams queued");
        assert_eq!(a.gso_enabled(), !refused);
        let s = a.stats();
        assert_eq!((s.tx_frames, s.tx_errors), (want.len() as u64, 0), "{s:?}");
        assert_eq!(s.offload_errors, u64::from(refused), "{s:?}");
        let got = datagrams(&mut b, want.len());
        assert_eq!(got.len(), want.len(), "refused: {refused}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(g == w, "datagram {i} differs (refused: {refused})");
        }
    }
}

/// Forward as [`forward`] does with offloads, each batch handed over with
/// [`FramePort::send_frames`] (sent from the receive ring where it lies).
fn forward_borrowed(a: &mut dyn FramePort, b: &mut dyn FramePort, stop: &AtomicBool) -> Seen {
    let mut seen = Seen::default();
    let fds = [a.fd(), b.fd()];
    while !stop.load(Ordering::Relaxed) {
        let ready = wait_readable(&fds, Duration::from_millis(20)).unwrap();
        for i in ready {
            let (from, to): (&mut dyn FramePort, &mut dyn FramePort) =
                if i == 0 { (&mut *a, &mut *b) } else { (&mut *b, &mut *a) };
            from.recv_frames(256, &mut |frames| {
                for f in frames {
                    seen.super_frames += u64::from(f.offload.gso.is_some());
                    seen.largest = seen.largest.max(f.bytes.len());
                }
                let _ = to.send_frames(&mut frames.iter().map(|f| (f.bytes, &f.offload)));
            })
            .unwrap();
        }
    }
    seen
}

/// AF_PACKET with virtio-net headers sends a batch of borrowed frames, super-frames
/// included, each gathered from its header and the caller's bytes: a TCP transfer
/// between two namespaces with their offloads on arrives whole.
#[test]
fn afpacket_sends_borrowed_frames_with_their_headers() {
    if !common::can_run("afpacket_sends_borrowed_frames_with_their_headers", &["ethtool"]) {
        return;
    }
    let t = TwoVms::new("ob");
    let mut a =
        t.sw.enter(|| AfPacket::open("va1", &AfPacketConfig::default()))
            .unwrap();
    let mut b =
        t.sw.enter(|| AfPacket::open("va2", &AfPacketConfig::default()))
            .unwrap();
    let stop = AtomicBool::new(false);
    let (got, seen) = thread::scope(|s| {
        let fwd = s.spawn(|| forward_borrowed(&mut a, &mut b, &stop));
        let got = tcp_transfer(&t.vm1, &t.vm2, "10.9.0.2");
        stop.store(true, Ordering::Relaxed);
        (got, fwd.join().unwrap())
    });
    assert_eq!(got, TRANSFER, "bytes received");
    assert!(seen.super_frames > 0 && seen.largest > 1514, "{seen:?}");
    let (sa, sb) = (a.stats(), b.stats());
    assert!(sb.tx_super_frames > 0, "{sb:?}");
    assert_eq!(
        (sa.offload_errors, sb.tx_errors, sb.offload_errors),
        (0, 0, 0),
        "{sa:?} {sb:?}"
    );
    assert_eq!(
        sa.tx_frames + sb.tx_frames,
        sa.rx_frames + sb.rx_frames,
        "{sa:?} {sb:?}"
    );
}

/// Single datagrams queued back to back join one `UDP_SEGMENT` message while
/// they are of one size (the last may be shorter), go to one address and are
/// steered alike by the receiver; a longer one, another address, another
/// inner flow's steering or a full message starts a new one. The
/// receiver gets every datagram, unchanged and in order.
#[test]
fn same_size_datagrams_share_one_segmented_send() {
    if !common::can_run("same_size_datagrams_share_one_segmented_send", &[]) {
        return;
    }
    let (_n1, n2, mut a, mut b) = underlay("uj");
    let c = Ipv4Addr::new(10, 9, 2, 3);
    n2.ip(&["addr", "add", "10.9.2.3/24", "dev", "u2"]);
    let mut other = n2.enter(|| UdpOverlay::bind(SocketAddrV4::new(c, 4789))).unwrap();
    // A VXLAN payload: header, Ethernet, an IPv4 header from 10.0.0.1 to
    // 10.0.0.`host` (what the receiver's steering hashes), numbered bytes.
    let vxlan = |i: usize, len: usize, host: u8| -> Vec<u8> {
        let mut d: Vec<u8> = (0..len).map(|k| (i * 31 + k) as u8).collect();
        d[20..22].copy_from_slice(&[0x08, 0x00]);
        d[22] = 0x45;
        d[34..38].copy_from_slice(&[10, 0, 0, 1]);
        d[38..42].copy_from_slice(&[10, 0, 0, host]);
        d
    };
    let datagram = |i: usize, len: usize| vxlan(i, len, 2);
    // (datagram, to B?) in sending order.
    let mut plan: Vec<(Vec<u8>, bool)> = Vec::new();
    for i in 0..70 {
        plan.push((datagram(i, 114), true)); // 64 join one message, 6 start the next
    }
    plan.push((datagram(70, 60), true)); // shorter: the last of that message
    plan.push((datagram(71, 60), true)); // after a shorter one: a new message
    plan.push((datagram(72, 200), true)); // longer: a new message
    plan.push((datagram(73, 200), false)); // another address: a new message
    plan.push((datagram(74, 200), true)); // back: a new message
    plan.push((vxlan(75, 200, 3), true)); // another inner flow, steered apart: a new message
    plan.push((vxlan(76, 200, 3), true)); // joins the one before
    for (d, to_b) in &plan {
        a.send_to(if *to_b { B } else { c }, d).unwrap();
    }
    a.flush().unwrap();
    let s = a.stats();
    assert_eq!(s.tx_frames, 77, "{s:?}");
    // Messages: 64 x 114; 6 x 114 + 60 (both segmented); 60; 200; 200 to C; 200; 2 x 200 (segmented).
    assert_eq!(s.tx_super_frames, 3, "{s:?}");
    assert_eq!((s.tx_errors, s.offload_errors), (0, 0), "{s:?}");
    let got = datagrams(&mut b, 76);
    let want: Vec<Vec<u8>> = plan.iter().filter(|(_, to_b)| *to_b).map(|(d, _)| d.clone()).collect();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(g == w, "datagram {i} differs");
    }
    assert_eq!(datagrams(&mut other, 1), vec![datagram(73, 200)]);
}

/// 64 one-segment TCP packets of 64 flows, each behind `prefix`, as the
/// underlay carries them (checksums complete), all of one length.
fn one_packet_flows(prefix: &[u8; 8]) -> (Vec<u8>, usize) {
    let mut all = Vec::new();
    let mut len = 0;
    for flow in 0..64u8 {
        let spec = props::Spec {
            flow,
            payload_len: 100,
            segment_size: 100,
            prefix: *prefix,
            ..props::Spec::default()
        };
        let (frame, offload) = props::build(&spec);
        let mut buf = Vec::new();
        let segs = gso::segment(&frame, &offload, prefix, &mut buf, 1 << 16).unwrap();
        assert_eq!(segs.count, 1);
        len = buf.len();
        all.extend_from_slice(&buf);
    }
    (all, len)
}

#[test]
fn coalesced_batches_hand_over_what_the_frame_by_frame_receive_does() {
    if !common::can_run("coalesced_batches_hand_over_what_the_frame_by_frame_receive_does", &[]) {
        return;
    }
    let (_n1, _n2, mut a, mut b) = underlay("cb");
    assert!(b.enable_gro());
    let spec = props::Spec::default();
    let (frame, offload) = props::build(&spec);
    let (singles, single_len) = one_packet_flows(&spec.prefix);
    // A super-frame (45 datagrams, merged back), 64 one-packet runs in one
    // UDP_SEGMENT send (more than the coalescer holds at once), a datagram
    // that is no TCP.
    let send = |a: &mut UdpOverlay| {
        a.send_super_frame(B, &spec.prefix, &frame, &offload).unwrap();
        a.send_segments(B, &singles, single_len).unwrap();
        a.send_to(B, b"not a tcp segment").unwrap();
        a.flush().unwrap();
    };
    let want = 45 + 64 + 1;
    let receive_until = |b: &mut UdpOverlay, recv: &mut dyn FnMut(&mut UdpOverlay) -> usize| {
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut received = 0;
        while received < want && Instant::now() < deadline {
            wait_readable(&[b.fd()], Duration::from_millis(20)).unwrap();
            received += recv(b);
        }
        received
    };

    send(&mut a);
    let mut coalescer = Coalescer::new(8);
    let mut one_by_one: Vec<(Vec<u8>, Offload)> = Vec::new();
    let n = receive_until(&mut b, &mut |b| {
        b.recv_coalesced(64, &mut coalescer, &mut |_, p, o| one_by_one.push((p.to_vec(), *o)))
            .unwrap()
    });
    assert_eq!(n, want);

    send(&mut a);
    let mut batched: Vec<(Vec<u8>, Offload)> = Vec::new();
    let mut batch_sizes = Vec::new();
    let n = receive_until(&mut b, &mut |b| {
        b.recv_coalesced_batch(64, &mut coalescer, &mut |arrivals| {
            batch_sizes.push(arrivals.len());
            for x in arrivals {
                assert_eq!(x.remote, Ipv4Addr::new(10, 9, 2, 1));
                batched.push((x.payload.to_vec(), x.offload));
            }
        })
        .unwrap()
    });
    assert_eq!(n, want);
    assert_eq!(batched.len(), 1 + 64 + 1, "{batch_sizes:?}");
    assert!(
        batched.iter().any(|(p, o)| o.gso.is_some() && p[8..] == frame[..]),
        "the super-frame merged back"
    );
    // The same payloads (flows may come in another order, each whole).
    one_by_one.sort_by(|x, y| x.0.cmp(&y.0));
    batched.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(one_by_one, batched);
    // The 64 one-packet runs of one receive came in more than one batch:
    // the coalescer holds a bounded number of frames.
    assert!(batch_sizes.iter().all(|&n| n < 64), "batches {batch_sizes:?}");
}

//! The kernel steers frames where `palisade_io::steer` says: an AF_PACKET fanout group on a
//! veth pair, and an `SO_REUSEPORT` group of underlay sockets on loopback.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use common::{Netns, SW_IP, VM_IP, VethPair, collect, udp_dst_port};
use palisade_io::packets::{icmp, ipv4, ipv6, ports, tagged};
use palisade_io::steer::{frame_worker, vxlan_worker};
use palisade_io::{AfPacket, AfPacketConfig, Fanout, FramePort, IoError, UdpOverlay, wait_readable};

const WORKERS: u32 = 3;

// ---- frames ------------------------------------------------------------------------------

/// Source MACs of the test's frames: this prefix, then a 16-bit sequence number.
const SRC_PREFIX: [u8; 4] = [0x02, 0x70, 0x6c, 0x73];
/// Not the receiving interface's address: the receiving stack ignores the frames.
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];

fn seq_of(f: &[u8]) -> Option<u16> {
    (f.get(6..10) == Some(&SRC_PREFIX[..])).then(|| u16::from_be_bytes([f[10], f[11]]))
}

fn eth(ethertype: u16, packet: &[u8]) -> Vec<u8> {
    palisade_io::packets::eth(DST_MAC, [0; 6], ethertype, packet)
}

fn v6(last: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, last >> 4, last)
}

/// A varied set of frames, each with its own source MAC (sequence number = index).
fn frames() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let flows: Vec<Vec<u8>> = (0..12u8)
        .map(|i| {
            ipv4(
                [10, 0, i, 1],
                [10, 9, 3 * i, 7 + i],
                6,
                0,
                &ports(40000 + u16::from(i), 443),
            )
        })
        .collect();
    for (i, f) in flows.iter().enumerate() {
        out.push((format!("IPv4 TCP flow {i}"), eth(0x0800, f)));
    }
    for i in [0u8, 3, 7] {
        let reply = ipv4(
            [10, 9, 3 * i, 7 + i],
            [10, 0, i, 1],
            6,
            0,
            &ports(443, 40000 + u16::from(i)),
        );
        out.push((format!("IPv4 TCP flow {i}, reply"), eth(0x0800, &reply)));
    }
    for i in 0..4u8 {
        let udp = ipv4([172, 16, i, 2], [192, 168, 100 + i, 53], 17, 0, &ports(5353, 53));
        out.push((format!("IPv4 UDP {i}"), eth(0x0800, &udp)));
    }
    let echo = ipv4([10, 0, 5, 1], [8, 8, 4, 4], 1, 0, &icmp(8, b"ping-payload"));
    out.push(("ICMP echo".into(), eth(0x0800, &echo)));
    let router = [10, 200, 0, 1];
    let err3 = ipv4(router, [10, 0, 1, 1], 1, 0, &icmp(3, &flows[1][..28]));
    out.push(("ICMP unreachable quoting flow 1".into(), eth(0x0800, &err3)));
    let reply2 = ipv4([10, 9, 6, 9], [10, 0, 2, 1], 6, 0, &ports(443, 40002));
    let err11 = ipv4(router, [10, 9, 6, 9], 1, 0, &icmp(11, &reply2));
    out.push(("ICMP time exceeded quoting flow 2's reply".into(), eth(0x0800, &err11)));
    let frag = ipv4(router, [10, 0, 4, 1], 1, 0x0020, &icmp(3, &flows[4]));
    out.push(("non-first fragment of ICMP".into(), eth(0x0800, &frag)));
    let cut = ipv4(router, [10, 0, 5, 1], 1, 0, &icmp(3, &flows[5][..14]));
    out.push(("ICMP error, quoted header cut short".into(), eth(0x0800, &cut)));
    out.push(("IPv4 header cut short".into(), eth(0x0800, &flows[6][..19])));
    let flows6: Vec<Vec<u8>> = (0..5u16)
        .map(|i| ipv6(v6(0x100 + i), v6(0x2000 + 37 * i), 6, &ports(50000 + i, 22)))
        .collect();
    for (i, f) in flows6.iter().enumerate() {
        out.push((format!("IPv6 TCP flow {i}"), eth(0x86dd, f)));
    }
    let err6 = ipv6(v6(0xfffe), v6(0x100), 58, &icmp(1, &flows6[0]));
    out.push(("ICMPv6 unreachable quoting IPv6 flow 0".into(), eth(0x86dd, &err6)));
    let too_big = ipv6(v6(0xfffe), v6(0x101), 58, &icmp(2, &flows6[1]));
    out.push((
        "ICMPv6 packet too big quoting IPv6 flow 1".into(),
        eth(0x86dd, &too_big),
    ));
    let nd = ipv6(v6(0x103), v6(0x2000), 58, &icmp(135, &[0; 16]));
    out.push(("ICMPv6 neighbour solicitation".into(), eth(0x86dd, &nd)));
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 0, 0, 1];
    arp.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 0, 0, 2]);
    out.push(("ARP".into(), eth(0x0806, &arp)));
    out.push((
        "802.1Q IPv4 flow 8".into(),
        tagged(0x8100, 0x0064, &eth(0x0800, &flows[8])),
    ));
    out.push((
        "802.1Q IPv4 flow 9".into(),
        tagged(0x8100, 0x0065, &eth(0x0800, &flows[9])),
    ));
    out.push((
        "802.1ad IPv6 flow 2".into(),
        tagged(0x88a8, 0x0010, &eth(0x86dd, &flows6[2])),
    ));
    let qinq = tagged(0x88a8, 0x0010, &tagged(0x8100, 0x0020, &eth(0x0800, &flows[10])));
    out.push(("QinQ IPv4".into(), qinq));
    for (seq, (_, f)) in out.iter_mut().enumerate() {
        f[6..10].copy_from_slice(&SRC_PREFIX);
        f[10..12].copy_from_slice(&(seq as u16).to_be_bytes());
    }
    out
}

// ---- AF_PACKET fanout -----------------------------------------------------------------------

fn fanout_config(group: Option<u16>) -> AfPacketConfig {
    AfPacketConfig {
        fanout: Some(Fanout {
            workers: WORKERS,
            group,
        }),
        ..AfPacketConfig::default()
    }
}

/// Open the group's ports on `ifname` in index order.
fn open_group(ns: &Netns, ifname: &str, config: &AfPacketConfig) -> Vec<AfPacket> {
    (0..WORKERS)
        .map(|_| {
            ns.enter(|| AfPacket::open(ifname, config))
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect()
}

/// Receive the test's frames from `ports` until `want` arrived (plus a grace period for
/// duplicates) or `timeout` passed; each with the index of the port it came from.
fn receive_marked(ports: &mut [AfPacket], want: usize, timeout: Duration) -> Vec<(usize, Vec<u8>)> {
    let fds: Vec<_> = ports.iter().map(|p| p.fd()).collect();
    let mut deadline = Instant::now() + timeout;
    let mut got: Vec<(usize, Vec<u8>)> = Vec::new();
    let mut complete = false;
    while Instant::now() < deadline {
        for i in wait_readable(&fds, Duration::from_millis(20)).unwrap() {
            ports[i]
                .recv(64, &mut |f| {
                    if seq_of(f).is_some() {
                        got.push((i, f.to_vec()));
                    }
                })
                .unwrap();
        }
        if !complete && got.len() >= want {
            complete = true;
            deadline = Instant::now() + Duration::from_millis(200);
        }
    }
    got
}

#[test]
fn fanout_delivers_each_frame_to_the_reference_worker() {
    if !common::can_run("fanout_delivers_each_frame_to_the_reference_worker", &[]) {
        return;
    }
    let pair = VethPair::new("f1", None);
    let mut ports = open_group(&pair.sw, "va", &fanout_config(None));
    let ifindex = ports[0].ifindex();
    assert!(ports.iter().all(|p| p.fanout_group() == Some(ifindex as u16)));
    let mut vm = pair
        .vm
        .enter(|| AfPacket::open("vb", &AfPacketConfig::default()))
        .unwrap();

    let sent = frames();
    for (_, f) in &sent {
        vm.send(f).unwrap();
    }
    vm.flush().unwrap();
    let got = receive_marked(&mut ports, sent.len(), Duration::from_secs(3));

    let mut arrivals: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (port, f) in &got {
        let seq = seq_of(f).unwrap();
        assert_eq!(f, &sent[usize::from(seq)].1, "frame {seq} changed on the way");
        arrivals.entry(usize::from(seq)).or_default().push(*port);
    }
    assert_steered(&sent, &arrivals, |f| frame_worker(f, WORKERS));
    for what in ["ARP", "QinQ IPv4", "ICMP error, quoted header cut short"] {
        let (_, f) = sent.iter().find(|(w, _)| w == what).unwrap();
        assert_eq!(frame_worker(f, WORKERS), 0, "{what}");
    }
}

#[test]
fn fanout_ports_do_not_see_outgoing_frames() {
    if !common::can_run("fanout_ports_do_not_see_outgoing_frames", &[]) {
        return;
    }
    let pair = VethPair::new("f2", None);
    let mut ports = open_group(&pair.sw, "va", &fanout_config(Some(4242)));
    let mut vm = pair
        .vm
        .enter(|| AfPacket::open("vb", &AfPacketConfig::default()))
        .unwrap();

    // A group member's own transmissions reach the peer and come back to no member.
    let mut sent = frames();
    sent.truncate(8);
    for (i, (_, f)) in sent.iter().enumerate() {
        ports[i % WORKERS as usize].send(f).unwrap();
    }
    for p in &mut ports {
        p.flush().unwrap();
    }
    let at_vm = collect(&mut vm, sent.len(), Duration::from_secs(3), |f| seq_of(f).is_some());
    assert_eq!(at_vm.len(), sent.len(), "frames sent by the group reach the peer");
    let echoed = receive_marked(&mut ports, 1, Duration::from_millis(300));
    assert!(echoed.is_empty(), "group saw its own transmissions: {echoed:02x?}");

    // Nor does the group see what the host stack transmits on the interface.
    pair.sw.ip(&["addr", "add", &format!("{SW_IP}/24"), "dev", "va"]);
    pair.sw.enter(|| {
        let s = UdpSocket::bind(format!("{SW_IP}:0")).unwrap();
        s.send_to(b"from-the-host", format!("{VM_IP}:7779")).unwrap();
    });
    let at_vm = collect(&mut vm, 1, Duration::from_secs(3), |f| udp_dst_port(f) == Some(7779));
    assert_eq!(at_vm.len(), 1, "host-originated UDP should reach the VM side");
    let fds: Vec<_> = ports.iter().map(|p| p.fd()).collect();
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        for i in wait_readable(&fds, Duration::from_millis(20)).unwrap() {
            ports[i]
                .recv(64, &mut |f| {
                    assert_ne!(udp_dst_port(f), Some(7779), "port {i} saw a host-originated frame");
                })
                .unwrap();
        }
    }
}

#[test]
fn fanout_join_errors_name_the_step() {
    if !common::can_run("fanout_join_errors_name_the_step", &[]) {
        return;
    }
    let pair = VethPair::new("f3", None);
    pair.sw.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
    pair.sw.ip(&["link", "set", "d0", "up"]);
    let _va = open_group(&pair.sw, "va", &fanout_config(Some(77)));
    // Group ids are per network namespace: the same id on another interface is refused.
    let e = pair
        .sw
        .enter(|| AfPacket::open("d0", &fanout_config(Some(77))))
        .unwrap_err();
    assert!(
        matches!(
            e,
            IoError::Os {
                step: "setsockopt(PACKET_FANOUT)",
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .starts_with("AF_PACKET on d0: setsockopt(PACKET_FANOUT): "),
        "{e}"
    );
    // Derived from the interface index, the ids of two interfaces differ.
    let d0 = pair.sw.enter(|| AfPacket::open("d0", &fanout_config(None))).unwrap();
    assert_ne!(d0.fanout_group(), Some(77));
}

// ---- the reuseport underlay -------------------------------------------------------------------

const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// `WORKERS` steered sockets on one free port of 127.0.0.1, bound in index order.
fn steered_group() -> Vec<UdpOverlay> {
    for _ in 0..20 {
        let port = UdpSocket::bind((LOOPBACK, 0)).unwrap().local_addr().unwrap().port();
        let local = SocketAddrV4::new(LOOPBACK, port);
        let group: Result<Vec<_>, _> = (0..WORKERS)
            .map(|i| UdpOverlay::bind_steered(local, i, WORKERS))
            .collect();
        if let Ok(group) = group {
            return group;
        }
    }
    panic!("no free port for a steered group");
}

/// A VXLAN payload carrying `frame`, with the sequence number as VNI.
fn vxlan(seq: usize, frame: &[u8]) -> Vec<u8> {
    let vni = (seq as u32).to_be_bytes();
    let mut p = vec![0x08, 0, 0, 0, vni[1], vni[2], vni[3], 0];
    p.extend_from_slice(frame);
    p
}

fn vni(p: &[u8]) -> usize {
    u32::from_be_bytes([0, p[4], p[5], p[6]]) as usize
}

#[test]
fn reuseport_delivers_each_payload_to_the_reference_worker() {
    let mut socks = steered_group();
    let local = socks[0].local_addr();
    assert!(socks.iter().all(|s| s.local_addr() == local));

    let mut payloads: Vec<(String, Vec<u8>)> = frames()
        .into_iter()
        .enumerate()
        .map(|(seq, (what, f))| (what, vxlan(seq, &f)))
        .collect();
    // More IPv4 and IPv6 flows, up to 50 payloads.
    while payloads.len() < 50 {
        let seq = payloads.len();
        let i = seq as u8;
        let frame = if seq % 3 == 0 {
            eth(
                0x86dd,
                &ipv6(
                    v6(0x300 + u16::from(i)),
                    v6(0x4000 + 11 * u16::from(i)),
                    17,
                    &ports(1, 2),
                ),
            )
        } else {
            eth(
                0x0800,
                &ipv4([100, 64, i, 3], [100, 65, 0, i], 17, 0, &ports(1000, 2000)),
            )
        };
        payloads.push((format!("extra flow {seq}"), vxlan(seq, &frame)));
    }

    let sender = UdpSocket::bind((LOOPBACK, 0)).unwrap();
    for (_, p) in &payloads {
        sender.send_to(p, local).unwrap();
    }
    let fds: Vec<_> = socks.iter().map(|s| s.fd()).collect();
    let mut arrivals: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut count = 0;
    let mut deadline = Instant::now() + Duration::from_secs(3);
    let mut complete = false;
    while Instant::now() < deadline {
        for i in wait_readable(&fds, Duration::from_millis(20)).unwrap() {
            socks[i]
                .recv(usize::MAX, &mut |from, p| {
                    assert_eq!(from, LOOPBACK);
                    assert_eq!(p, &payloads[vni(p)].1[..]);
                    arrivals.entry(vni(p)).or_default().push(i);
                    count += 1;
                })
                .unwrap();
        }
        if !complete && count >= payloads.len() {
            complete = true;
            deadline = Instant::now() + Duration::from_millis(100);
        }
    }
    assert_steered(&payloads, &arrivals, |p| vxlan_worker(p, WORKERS));
}

/// Item `i` of `sent` arrived exactly once, on the worker `worker_of` says
/// (`arrivals`: item index → the workers it arrived on), and the items used at
/// least two workers (else the test could not fail).
fn assert_steered(
    sent: &[(String, Vec<u8>)],
    arrivals: &BTreeMap<usize, Vec<usize>>,
    worker_of: impl Fn(&[u8]) -> u32,
) {
    let mut used = BTreeSet::new();
    for (i, (what, bytes)) in sent.iter().enumerate() {
        let want = worker_of(bytes) as usize;
        used.insert(want);
        let on = arrivals.get(&i).cloned().unwrap_or_default();
        assert_eq!(
            on,
            vec![want],
            "{what} (item {i}) arrived on workers {on:?}, expected [{want}]"
        );
    }
    assert!(
        used.len() >= 2,
        "everything on one worker {used:?}: the test cannot fail"
    );
}

#[test]
fn steered_bind_refuses_what_cannot_work() {
    let cases = [
        (SocketAddrV4::new(LOOPBACK, 0), 0, 2, "port 0"),
        (SocketAddrV4::new(LOOPBACK, 4789), 2, 2, "index beyond the workers"),
        (SocketAddrV4::new(LOOPBACK, 4789), 0, 0, "no workers"),
    ];
    for (local, index, workers, what) in cases {
        let e = UdpOverlay::bind_steered(local, index, workers).unwrap_err();
        assert!(matches!(e, IoError::Config { .. }), "{what}: {e}");
        assert!(e.to_string().starts_with(&format!("UDP overlay on {local}: ")), "{e}");
    }
    // One worker may let the kernel pick the port.
    let one = UdpOverlay::bind_steered(SocketAddrV4::new(LOOPBACK, 0), 0, 1).unwrap();
    assert_ne!(one.local_addr().port(), 0);
    // A port held by a socket without SO_REUSEPORT cannot be shared.
    let plain = UdpOverlay::bind(SocketAddrV4::new(LOOPBACK, 0)).unwrap();
    let e = UdpOverlay::bind_steered(plain.local_addr(), 0, 2).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("UDP overlay on {}: bind: ", plain.local_addr())),
        "{e}"
    );
}

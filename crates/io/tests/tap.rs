//! A TAP device in a test namespace: the kernel's frames are read, ours are believed.

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::{Netns, collect, collect_batched, ethertype, udp_dst_port};
use palisade_io::{FramePort, Tap};

const TAP_IP: [u8; 4] = [10, 0, 2, 1];
const PEER_IP: [u8; 4] = [10, 0, 2, 2];
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x22];

fn is_arp_request_for_peer(f: &[u8]) -> bool {
    ethertype(f) == 0x0806 && f.len() >= 42 && f[20..22] == [0, 1] && f[38..42] == PEER_IP
}

/// An ARP reply from the peer to the TAP's kernel, which asked from `tap_mac`.
fn arp_reply(tap_mac: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(tap_mac);
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&PEER_IP);
    f.extend_from_slice(tap_mac);
    f.extend_from_slice(&TAP_IP);
    f
}

#[test]
fn tap_sees_kernel_frames_and_kernel_believes_ours() {
    if !common::can_run("tap_sees_kernel_frames_and_kernel_believes_ours", &[]) {
        return;
    }
    assert!(std::path::Path::new("/dev/net/tun").exists(), "/dev/net/tun is missing");
    let ns = Netns::new("tap");
    let mut tap = ns.enter(|| Tap::open("iotap0")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tap.name(), "iotap0");
    ns.ip(&["addr", "add", "10.0.2.1/24", "dev", "iotap0"]);
    ns.ip(&["link", "set", "iotap0", "up"]);

    // Traffic to a neighbour without a neighbour entry: the kernel asks for it on the TAP.
    ns.enter(|| {
        let s = UdpSocket::bind("10.0.2.1:0").unwrap();
        s.send_to(b"hello-tap", "10.0.2.2:9999").unwrap();
    });
    let arp = collect(&mut tap, 1, Duration::from_secs(3), is_arp_request_for_peer);
    assert_eq!(arp.len(), 1, "no ARP request for 10.0.2.2 on the TAP");
    let tap_mac = arp[0][6..12].to_vec();
    assert_eq!(arp[0][28..32], TAP_IP, "ARP sender address");

    // Our reply resolves the neighbour, and the queued datagram follows to the MAC we gave.
    tap.send(&arp_reply(&tap_mac)).unwrap();
    tap.flush().unwrap();
    // Read through the batch interface (a TAP takes the trait's copying default).
    let (udp, sizes) = collect_batched(&mut tap, 1, Duration::from_secs(3), |f| udp_dst_port(f) == Some(9999));
    assert_eq!(udp.len(), 1, "the datagram waiting on ARP never came");
    assert!(sizes.iter().all(|&n| n > 0), "empty batches: {sizes:?}");
    assert_eq!(udp[0][..6], PEER_MAC);
    assert!(udp[0].ends_with(b"hello-tap"));
    let neigh = ns.ip(&["neigh", "show", "10.0.2.2", "dev", "iotap0"]);
    assert!(neigh.contains("lladdr 02:00:00:00:00:22"), "neighbour entry: {neigh}");
    assert!(
        neigh.contains("REACHABLE") || neigh.contains("STALE"),
        "neighbour entry: {neigh}"
    );

    let stats = tap.stats();
    assert_eq!(stats.tx_frames, 1);
    assert_eq!(stats.tx_bytes, 42);
    assert!(stats.rx_frames >= 2, "{stats:?}");
    assert_eq!(stats.truncated, 0);
}

#[test]
fn writing_to_a_down_tap_is_an_error() {
    if !common::can_run("writing_to_a_down_tap_is_an_error", &[]) {
        return;
    }
    let ns = Netns::new("tapdown");
    let mut tap = ns.enter(|| Tap::open("iotap1")).unwrap_or_else(|e| panic!("{e}"));
    assert!(tap.send(&arp_reply(&[2, 0, 0, 0, 0, 1])).is_err());
    assert_eq!(tap.stats().tx_errors, 1);
    let mut n = 0;
    assert_eq!(tap.recv(8, &mut |_| n += 1).unwrap(), 0);
    assert_eq!(tap.recv_batch(8, &mut |_| n += 1).unwrap(), 0);
    assert_eq!(n, 0, "nothing delivered, no batch handed over");
}

//! Two underlay sockets on loopback exchange batches.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use palisade_io::overlay::MAX_PAYLOAD;
use palisade_io::{UdpOverlay, wait_readable};

const A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// Two sockets on the same port of two loopback addresses, as two hosts would be.
fn pair() -> (UdpOverlay, UdpOverlay) {
    for _ in 0..20 {
        let a = UdpOverlay::bind(SocketAddrV4::new(A, 0)).unwrap();
        let port = a.local_addr().port();
        if let Ok(b) = UdpOverlay::bind(SocketAddrV4::new(B, port)) {
            return (a, b);
        }
    }
    panic!("no port free on both loopback addresses");
}

fn payload(i: usize) -> Vec<u8> {
    let mut p = (i as u32).to_be_bytes().to_vec();
    p.resize(8 + (i * 37) % 1400, i as u8);
    p
}

fn receive(sock: &mut UdpOverlay, want: usize) -> Vec<(Ipv4Addr, Vec<u8>)> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        wait_readable(&[sock.fd()], Duration::from_millis(20)).unwrap();
        sock.recv(usize::MAX, &mut |from, p| got.push((from, p.to_vec())))
            .unwrap();
    }
    got
}

/// Send `n` payloads from `from` to `to` in rounds of 40, drained between rounds so none
/// overflows the receiver's socket buffer; check order, content and the sender address.
fn exchange(from: &mut UdpOverlay, to: &mut UdpOverlay, n: usize) {
    let before = (from.stats().tx_frames, to.stats().rx_frames);
    let mut got = Vec::new();
    for start in (0..n).step_by(40) {
        let end = (start + 40).min(n);
        for i in start..end {
            from.send_to(*to.local_addr().ip(), &payload(i)).unwrap();
        }
        from.flush().unwrap();
        got.extend(receive(to, end - start));
    }
    assert_eq!(got.len(), n);
    for (i, (sender, p)) in got.iter().enumerate() {
        assert_eq!(sender, from.local_addr().ip());
        assert_eq!(*p, payload(i), "payload {i}");
    }
    assert_eq!(from.stats().tx_frames - before.0, n as u64);
    assert_eq!(to.stats().rx_frames - before.1, n as u64);
}

#[test]
fn batches_cross_both_ways_with_sender_addresses() {
    let (mut a, mut b) = pair();
    exchange(&mut a, &mut b, 100);
    exchange(&mut b, &mut a, 70);
}

#[test]
fn send_to_forces_a_flush_when_the_queue_is_full() {
    let (mut a, mut b) = pair();
    // 100 small datagrams without an explicit flush: the 64-slot queue flushes itself once.
    // Each is longer than the one before, so none joins the one before's message.
    for i in 0..100 {
        a.send_to(B, &vec![i as u8; 8 + i]).unwrap();
    }
    assert_eq!(a.stats().tx_frames, 64);
    assert_eq!(receive(&mut b, 64).len(), 64);
    a.flush().unwrap();
    assert_eq!(receive(&mut b, 36).len(), 36);
    assert_eq!(a.stats().tx_frames, 100);
}

#[test]
fn oversize_is_refused_and_truncated_is_not_delivered() {
    let (mut a, mut b) = pair();
    let err = a.send_to(B, &vec![0; MAX_PAYLOAD + 1]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert_eq!(a.stats().tx_errors, 1);
    a.send_to(B, &vec![7; MAX_PAYLOAD]).unwrap();
    a.flush().unwrap();
    let got = receive(&mut b, 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.len(), MAX_PAYLOAD);

    // A datagram from elsewhere larger than the receive slots is counted, not delivered.
    let plain = UdpSocket::bind(SocketAddrV4::new(A, 0)).unwrap();
    plain.send_to(&vec![1; MAX_PAYLOAD + 100], b.local_addr()).unwrap();
    plain.send_to(b"after", b.local_addr()).unwrap();
    let got = receive(&mut b, 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, b"after");
    assert_eq!(b.stats().truncated, 1);
}

#[test]
fn bind_errors_name_the_address() {
    let a = UdpOverlay::bind(SocketAddrV4::new(A, 0)).unwrap();
    let e = UdpOverlay::bind(a.local_addr()).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("UDP overlay on {}: bind: ", a.local_addr())),
        "{e}"
    );
}

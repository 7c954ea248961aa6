//! Putting a 64 KiB TCP super-frame on the VXLAN underlay, five ways
//! (run as root; two namespaces joined by a veth with MTU 1600):
//!
//! - `udp_gso`: `UdpOverlay::send_super_frame` (segmented in user space into
//!   one buffer, two `UDP_SEGMENT` sends);
//! - `udp_gso_gather`: `UdpOverlay::send_batch` (only the segments' headers
//!   written in user space, each datagram gathered from its headers and its
//!   slice of the super-frame, two `UDP_SEGMENT` sends);
//! - `udp_plain`: the same segments, one datagram each (`sendmmsg`; the
//!   socket's `UDP_SEGMENT` refused through `SO_NO_CHECK`);
//! - `tap_tunnel_gso`: the whole VXLAN-encapsulated super-frame written to a
//!   TAP with a 24-byte virtio-net header asking for UDP-tunnel GSO
//!   (`TUN_F_UDP_TUNNEL_GSO`, Linux 6.17+), routed by the kernel onto the
//!   veth, which takes tunnel GSO packets whole: the receiver gets one
//!   64 KiB datagram;
//! - `tap_tunnel_gso_sw`: the same with the veth's UDP-tunnel segmentation
//!   turned off, so the kernel cuts the packet at the veth.
//!
//! Each runs for a few seconds on one thread; a receiver in the other
//! namespace drains an underlay socket (`UDP_GRO` on). Printed per way:
//! super-frames/s, wall and thread-CPU ns per super-frame on the sending
//! thread (which includes the kernel's forwarding and the veth, done in its
//! context), and what the receiver got (datagrams, receives, bytes, the
//! largest receive). One JSON line. Any other run (`cargo test
//! --all-targets`) is a short smoke run.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/support/gso_props.rs"]
mod props;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::Netns;
use palisade_io::overlay::Outgoing;
use palisade_io::{UdpOverlay, wait_readable};
use palisade_wire::checksum;

const A_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 5, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 5, 2);
const PORT: u16 = 4789;
const PAYLOAD: usize = 64_000;

fn thread_cpu_ns() -> u64 {
    // SAFETY: `ts` is a valid timespec for clock_gettime to write.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[derive(Default, Debug)]
struct Received {
    datagrams: u64,
    receives: u64,
    bytes: u64,
    largest: usize,
}

/// Drain `sock` until `stop`, then 200 ms more.
fn drain(sock: &mut UdpOverlay, stop: &AtomicBool) -> Received {
    let mut r = Received::default();
    let mut quiet_since: Option<Instant> = None;
    loop {
        wait_readable(&[sock.fd()], Duration::from_millis(10)).unwrap();
        let n = sock
            .recv_segments(1024, &mut |_, p, _| {
                r.receives += 1;
                r.bytes += p.len() as u64;
                r.largest = r.largest.max(p.len());
            })
            .unwrap();
        r.datagrams += n as u64;
        if stop.load(Ordering::Relaxed) {
            if n > 0 {
                quiet_since = None;
            } else if quiet_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_millis(200) {
                break;
            }
        }
    }
    r
}

/// Run `send` (one super-frame per call) for `seconds` on this thread while `rx` drains.
fn run(rx: &mut UdpOverlay, seconds: f64, mut send: impl FnMut()) -> (f64, f64, u64, Received) {
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let h = s.spawn(|| drain(rx, &stop));
        let (t0, c0) = (Instant::now(), thread_cpu_ns());
        let mut n = 0u64;
        while t0.elapsed().as_secs_f64() < seconds {
            send();
            n += 1;
        }
        let (wall, cpu) = (t0.elapsed().as_nanos() as f64, (thread_cpu_ns() - c0) as f64);
        stop.store(true, Ordering::Relaxed);
        (wall / n as f64, cpu / n as f64, n, h.join().unwrap())
    })
}

/// A TAP in the current namespace with the 24-byte tunnel header and UDP-tunnel GSO, or why not.
fn tunnel_tap(name: &str) -> Result<OwnedFd, String> {
    // SAFETY: the path is a valid NUL-terminated string.
    let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(format!("open /dev/net/tun: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` was just opened and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
        return Err(format!("TUNSETIFF: {}", std::io::Error::last_os_error()));
    }
    let size: libc::c_int = 24;
    // SAFETY: TUNSETVNETHDRSZ reads one int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) } < 0 {
        return Err(format!("TUNSETVNETHDRSZ 24: {}", std::io::Error::last_os_error()));
    }
    use palisade_io::tap::tun_f;
    let flags = tun_f::CSUM | tun_f::TSO4 | tun_f::TSO6 | tun_f::UDP_TUNNEL_GSO | tun_f::UDP_TUNNEL_GSO_CSUM;
    // SAFETY: TUNSETOFFLOAD takes its flags by value.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
        return Err(format!(
            "TUNSETOFFLOAD with UDP_TUNNEL_GSO: {} (a kernel before 6.17)",
            std::io::Error::last_os_error()
        ));
    }
    Ok(fd)
}

/// The header and frame a TAP takes for `inner` (a TCP/IPv4 super-frame, Ethernet included)
/// behind outer Ethernet/IPv4/UDP/VXLAN: 24-byte `virtio_net_hdr_v1_hash_tunnel`, outer UDP
/// checksum 0 (allowed over IPv4), inner TCP checksum partial.
fn tunnel_frame(tap_mac: [u8; 6], inner: &[u8], inner_l4: usize, inner_hdr_len: usize, mss: u16) -> Vec<u8> {
    let vxlan = [0x08, 0, 0, 0, 0, 0, 0x0a, 0];
    let udp_len = 8 + vxlan.len() + inner.len();
    let mut f = Vec::with_capacity(24 + 42 + udp_len);
    let outer_l4 = 14 + 20;
    let inner_at = outer_l4 + 8 + 8;
    // virtio_net_hdr_v1 (12), hash value/report/padding (8), outer_th_offset, inner_nh_offset.
    f.push(1); // NEEDS_CSUM: the inner TCP checksum
    f.push(1 | 0x20); // TCPV4 inside a UDP tunnel over IPv4
    f.extend_from_slice(&((inner_at + inner_hdr_len) as u16).to_le_bytes());
    f.extend_from_slice(&mss.to_le_bytes());
    f.extend_from_slice(&((inner_at + inner_l4) as u16).to_le_bytes());
    f.extend_from_slice(&16u16.to_le_bytes());
    f.extend_from_slice(&[0; 2 + 8]);
    f.extend_from_slice(&(outer_l4 as u16).to_le_bytes());
    f.extend_from_slice(&((inner_at + 14) as u16).to_le_bytes());
    assert_eq!(f.len(), 24);
    f.extend_from_slice(&tap_mac);
    f.extend_from_slice(&[2, 0, 0, 0, 0, 0x99, 0x08, 0x00]);
    let mut ip = vec![0x45, 0, 0, 0, 0, 0x55, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    ip.extend_from_slice(&A_IP.octets());
    ip.extend_from_slice(&B_IP.octets());
    let c = checksum::checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40001u16.to_be_bytes());
    f.extend_from_slice(&PORT.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&vxlan);
    f.extend_from_slice(inner);
    f
}

fn mac_of(ns: &Netns, ifname: &str) -> [u8; 6] {
    let text = ns.exec("cat", &[&format!("/sys/class/net/{ifname}/address")]);
    let mut mac = [0u8; 6];
    for (m, part) in mac.iter_mut().zip(text.trim().split(':')) {
        *m = u8::from_str_radix(part, 16).unwrap();
    }
    mac
}

fn json(name: &str, r: &(f64, f64, u64, Received)) -> String {
    let (wall, cpu, n, rx) = r;
    format!(
        "\"{name}\":{{\"super_frames\":{n},\"per_s\":{:.0},\"wall_ns\":{wall:.0},\"cpu_ns\":{cpu:.0},\
         \"rx_datagrams\":{},\"rx_receives\":{},\"rx_bytes\":{},\"rx_largest\":{}}}",
        1e9 / wall,
        rx.datagrams,
        rx.receives,
        rx.bytes,
        rx.largest
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !common::can_run("bench underlay", &["ethtool"]) {
        println!("{{\"bench\":\"underlay\",\"skipped\":\"needs root, iproute2 and ethtool\"}}");
        return;
    }
    let seconds = if std::env::args().any(|a| a == "--bench") {
        3.0
    } else {
        0.2
    };
    let a = Netns::new("ula");
    let b = Netns::new("ulb");
    a.ip(&[
        "link", "add", "u1", "type", "veth", "peer", "name", "u2", "netns", &b.name,
    ]);
    a.ip(&["addr", "add", "10.9.5.1/24", "dev", "u1"]);
    b.ip(&["addr", "add", "10.9.5.2/24", "dev", "u2"]);
    a.ip(&["link", "set", "u1", "mtu", "1600", "up"]);
    b.ip(&["link", "set", "u2", "mtu", "1600", "up"]);
    let mut rx = b.enter(|| UdpOverlay::bind(SocketAddrV4::new(B_IP, PORT))).unwrap();
    assert!(rx.enable_gro());
    let spec = props::Spec {
        payload_len: PAYLOAD,
        ..props::Spec::default()
    };
    let (frame, offload) = props::build(&spec);
    let mut fields = Vec::new();

    let mut tx = a.enter(|| UdpOverlay::bind(SocketAddrV4::new(A_IP, PORT))).unwrap();
    let r = run(&mut rx, seconds, || {
        tx.send_super_frame(B_IP, &spec.prefix, &frame, &offload).unwrap();
        tx.flush().unwrap();
    });
    assert!(tx.gso_enabled() && r.3.bytes > 0, "udp_gso: {r:?}");
    fields.push(json("udp_gso", &r));

    let mut tx = a.enter(|| UdpOverlay::bind(SocketAddrV4::new(A_IP, PORT + 2))).unwrap();
    let mut rx3 = b.enter(|| UdpOverlay::bind(SocketAddrV4::new(B_IP, PORT + 2))).unwrap();
    assert!(rx3.enable_gro());
    let r = run(&mut rx3, seconds, || {
        let out = Outgoing {
            remote: B_IP,
            prefix: &spec.prefix,
            frame: &frame,
            offload,
        };
        tx.send_batch(&mut std::iter::once(out)).unwrap();
    });
    assert!(tx.gso_enabled() && r.3.bytes > 0, "udp_gso_gather: {r:?}");
    fields.push(json("udp_gso_gather", &r));

    let mut tx = a.enter(|| UdpOverlay::bind(SocketAddrV4::new(A_IP, PORT + 1))).unwrap();
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one int.
    unsafe {
        libc::setsockopt(
            tx.fd(),
            libc::SOL_SOCKET,
            libc::SO_NO_CHECK,
            (&one as *const libc::c_int).cast(),
            4,
        )
    };
    let mut rx2 = b.enter(|| UdpOverlay::bind(SocketAddrV4::new(B_IP, PORT + 1))).unwrap();
    let r = run(&mut rx2, seconds, || {
        tx.send_super_frame(B_IP, &spec.prefix, &frame, &offload).unwrap();
        let _ = tx.flush();
    });
    assert!(!tx.gso_enabled(), "UDP_SEGMENT was not refused");
    fields.push(json("udp_plain", &r));

    match a.enter(|| tunnel_tap("vt0")) {
        Err(why) => fields.push(format!("\"tap_tunnel_gso\":{{\"unavailable\":\"{why}\"}}")),
        Ok(tap) => {
            a.ip(&["addr", "add", "10.9.6.1/24", "dev", "vt0"]);
            a.ip(&["link", "set", "vt0", "up"]);
            // The outer source is this host's underlay address: accept it arriving on the TAP.
            a.exec(
                "sysctl",
                &[
                    "-qw",
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.vt0.rp_filter=0",
                    "net.ipv4.conf.vt0.accept_local=1",
                ],
            );
            let l = palisade_io::gso::layout(&frame, &offload).unwrap();
            let msg = tunnel_frame(mac_of(&a, "vt0"), &frame, l.l4, l.header_len, spec.segment_size);
            let mut write = || {
                // SAFETY: `msg` is valid for reads of its length.
                let n = unsafe { libc::write(tap.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
                assert_eq!(n as usize, msg.len(), "TAP write: {}", std::io::Error::last_os_error());
            };
            let r = run(&mut rx, seconds, &mut write);
            fields.push(json("tap_tunnel_gso", &r));
            a.exec(
                "ethtool",
                &[
                    "-K",
                    "u1",
                    "tx-udp_tnl-segmentation",
                    "off",
                    "tx-udp_tnl-csum-segmentation",
                    "off",
                ],
            );
            let r = run(&mut rx, seconds, &mut write);
            fields.push(json("tap_tunnel_gso_sw", &r));
        }
    }
    println!(
        "{{\"bench\":\"underlay\",\"inner_payload\":{PAYLOAD},\"mss\":{},\"datagrams_per_super_frame\":{},{}}}",
        spec.segment_size,
        PAYLOAD.div_ceil(usize::from(spec.segment_size)),
        fields.join(",")
    );
}

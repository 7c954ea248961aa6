//! The VXLAN underlay socket: UDP between hosts, in batches.
//!
//! Hosts exchange VXLAN(-GBP) packets over plain UDP; the datapath builds and
//! parses the VXLAN header and inner frame, this module only moves payloads.
//! Every host listens on the same port, so a payload for host `remote` goes to
//! `remote:<local port>`. Receiving uses `recvmmsg` and sending `sendmmsg`,
//! one system call per batch of up to [`RX_BATCH`] / [`TX_BATCH`] datagrams,
//! into and out of buffers allocated once. A datagram larger than
//! [`MAX_PAYLOAD`] is counted as truncated and not delivered.
//!
//! With several workers, each binds its own socket to the same address
//! ([`UdpOverlay::bind_steered`]): the sockets form an `SO_REUSEPORT` group
//! whose classic BPF program ([`crate::steer`]) hands every datagram to the
//! worker its inner packet's connection belongs to.

use std::fmt;
use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

use crate::error::IoError;
use crate::port::PortStats;
use crate::steer;
use crate::sys;

const KIND: &str = "UDP overlay";

/// Largest payload sent or received: a 9000-byte inner jumbo frame with its VXLAN header fits.
pub const MAX_PAYLOAD: usize = 16 * 1024;
/// Datagrams received per `recvmmsg`.
pub const RX_BATCH: usize = 32;
/// Datagrams queued before `send_to` forces a flush.
pub const TX_BATCH: usize = 64;

/// The underlay UDP socket of one host.
pub struct UdpOverlay {
    sock: UdpSocket,
    local: SocketAddrV4,
    rx_buf: Vec<u8>,
    rx_addrs: Vec<libc::sockaddr_in>,
    rx_iov: Vec<libc::iovec>,
    rx_msgs: Vec<libc::mmsghdr>,
    tx_buf: Vec<u8>,
    tx_lens: Vec<usize>,
    tx_addrs: Vec<libc::sockaddr_in>,
    tx_iov: Vec<libc::iovec>,
    tx_msgs: Vec<libc::mmsghdr>,
    stats: PortStats,
}

// SAFETY: the raw pointers inside the iovec and mmsghdr arrays only ever point into buffers
// owned by this value and are rewritten before each system call; nothing is shared with
// another thread, so moving the value between threads is sound.
unsafe impl Send for UdpOverlay {}

impl fmt::Debug for UdpOverlay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpOverlay")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is a plain C struct; all-zero is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = addr.port().to_be();
    sa.sin_addr.s_addr = u32::from(*addr.ip()).to_be();
    sa
}

/// Socket buffer size asked for in each direction.
const SOCKET_BUFFER: libc::c_int = 8 << 20;

/// The error of `step` on the socket for `local`.
fn os_error(local: SocketAddrV4, step: &'static str) -> impl FnOnce(io::Error) -> IoError {
    move |source| IoError::Os {
        kind: KIND,
        name: local.to_string(),
        step,
        source,
    }
}

impl UdpOverlay {
    /// Bind a non-blocking UDP socket to `local` (port 0 picks a free port).
    pub fn bind(local: SocketAddrV4) -> Result<UdpOverlay, IoError> {
        let sock = UdpSocket::bind(local).map_err(os_error(local, "bind"))?;
        UdpOverlay::with_socket(sock, local)
    }

    /// Bind socket `index` of the `workers` sockets that share `local`, the kernel
    /// steering each datagram to one of them by its inner packet ([`crate::steer`]).
    ///
    /// The socket sets `SO_REUSEPORT` before binding, and attaches the group's
    /// steering program (`SO_ATTACH_REUSEPORT_CBPF`; every socket attaches the
    /// same one). The kernel numbers the sockets in the order they are bound,
    /// whatever `index` says (it is only checked against `workers`): bind them
    /// in index order, all before traffic is expected (until then a datagram
    /// steered to a missing index goes by the kernel's own hash). Closing one
    /// moves the group's last socket into its place, so a group that loses a
    /// socket must be rebuilt. Every socket needs the same fixed port, so port
    /// 0 is refused when `workers` is more than 1; and any other socket bound
    /// to the same address with `SO_REUSEPORT` by the same user would join the
    /// group.
    pub fn bind_steered(local: SocketAddrV4, index: u32, workers: u32) -> Result<UdpOverlay, IoError> {
        let bad = |reason: String| {
            Err(IoError::Config {
                kind: KIND,
                name: local.to_string(),
                reason,
            })
        };
        if workers == 0 || workers > u32::from(u16::MAX) {
            return bad(format!("{workers} workers: 1 to {} are possible", u16::MAX));
        }
        if index >= workers {
            return bad(format!("socket index {index} of {workers} workers"));
        }
        if local.port() == 0 && workers > 1 {
            return bad("steered sockets share one fixed port; port 0 picks a different one for each".to_owned());
        }
        // SAFETY: socket() has no memory-safety preconditions.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(IoError::last_os(KIND, &local.to_string(), "socket(AF_INET)"));
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        sys::setsockopt(fd.as_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT, &one)
            .map_err(os_error(local, "setsockopt(SO_REUSEPORT)"))?;
        let sa = sockaddr(local);
        // SAFETY: `sa` is a valid sockaddr_in and the length passed is its size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_in).cast(),
                mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(IoError::last_os(KIND, &local.to_string(), "bind"));
        }
        // After binding: a program attached before would belong to a group of its own,
        // dropped when the bind joins the existing group.
        let mut program = steer::reuseport_program(workers);
        let prog = steer::fprog(&mut program);
        sys::setsockopt(fd.as_fd(), libc::SOL_SOCKET, libc::SO_ATTACH_REUSEPORT_CBPF, &prog)
            .map_err(os_error(local, "setsockopt(SO_ATTACH_REUSEPORT_CBPF)"))?;
        UdpOverlay::with_socket(UdpSocket::from(fd), local)
    }

    /// Make a bound socket an overlay port: non-blocking, large buffers, batch buffers.
    fn with_socket(sock: UdpSocket, local: SocketAddrV4) -> Result<UdpOverlay, IoError> {
        let os = |step| os_error(local, step);
        sock.set_nonblocking(true).map_err(os("set non-blocking"))?;
        // A burst from another host's switch arrives faster than one round
        // drains it; the default buffer (~200 KiB) overflows and TCP inside
        // the tunnel collapses. Ask for more: forced when privileged, else
        // up to the system's limit.
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            if crate::sys::setsockopt(sock.as_fd(), libc::SOL_SOCKET, force, &SOCKET_BUFFER).is_err() {
                crate::sys::setsockopt(sock.as_fd(), libc::SOL_SOCKET, plain, &SOCKET_BUFFER)
                    .map_err(os("setsockopt(SO_RCVBUF/SO_SNDBUF)"))?;
            }
        }
        let local = match sock.local_addr().map_err(os("getsockname"))? {
            std::net::SocketAddr::V4(a) => a,
            std::net::SocketAddr::V6(_) => local,
        };
        let iov = libc::iovec {
            iov_base: ptr::null_mut(),
            iov_len: 0,
        };
        // SAFETY: mmsghdr is a plain C struct for which all-zero bytes are a valid (empty) value.
        let msg: libc::mmsghdr = unsafe { mem::zeroed() };
        let any = sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        Ok(UdpOverlay {
            sock,
            local,
            rx_buf: vec![0; RX_BATCH * MAX_PAYLOAD],
            rx_addrs: vec![any; RX_BATCH],
            rx_iov: vec![iov; RX_BATCH],
            rx_msgs: vec![msg; RX_BATCH],
            tx_buf: vec![0; TX_BATCH * MAX_PAYLOAD],
            tx_lens: Vec::with_capacity(TX_BATCH),
            tx_addrs: vec![any; TX_BATCH],
            tx_iov: vec![iov; TX_BATCH],
            tx_msgs: vec![msg; TX_BATCH],
            stats: PortStats::default(),
        })
    }

    /// The address the socket is bound to (with the port resolved when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// Receive up to `max` datagrams without blocking; call `f` with each sender and payload.
    pub fn recv(&mut self, max: usize, f: &mut dyn FnMut(Ipv4Addr, &[u8])) -> io::Result<usize> {
        let mut delivered = 0;
        let mut seen = 0;
        while seen < max {
            let want = RX_BATCH.min(max - seen);
            let base = self.rx_buf.as_mut_ptr();
            for i in 0..want {
                self.rx_iov[i] = libc::iovec {
                    // SAFETY: slot `i < RX_BATCH` starts inside `rx_buf` (RX_BATCH * MAX_PAYLOAD bytes).
                    iov_base: unsafe { base.add(i * MAX_PAYLOAD) }.cast(),
                    iov_len: MAX_PAYLOAD,
                };
                let h = &mut self.rx_msgs[i].msg_hdr;
                h.msg_name = (&mut self.rx_addrs[i] as *mut libc::sockaddr_in).cast();
                h.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
                h.msg_iov = &mut self.rx_iov[i];
                h.msg_iovlen = 1;
                h.msg_control = ptr::null_mut();
                h.msg_controllen = 0;
                h.msg_flags = 0;
            }
            // SAFETY: the first `want` headers point at live buffers and addresses owned by
            // `self`; the timeout may be null.
            let r = unsafe {
                libc::recvmmsg(
                    self.sock.as_raw_fd(),
                    self.rx_msgs.as_mut_ptr(),
                    want as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    ptr::null_mut(),
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => break,
                    _ if seen == 0 => return Err(e),
                    _ => break,
                }
            }
            let got = r as usize;
            for i in 0..got {
                seen += 1;
                let m = &self.rx_msgs[i];
                if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                    self.stats.truncated += 1;
                    continue;
                }
                let len = (m.msg_len as usize).min(MAX_PAYLOAD);
                let from = Ipv4Addr::from(u32::from_be(self.rx_addrs[i].sin_addr.s_addr));
                let payload = &self.rx_buf[i * MAX_PAYLOAD..i * MAX_PAYLOAD + len];
                self.stats.rx_frames += 1;
                self.stats.rx_bytes += len as u64;
                f(from, payload);
                delivered += 1;
            }
            if got < want {
                break;
            }
        }
        Ok(delivered)
    }

    /// Queue `payload` for `remote` at this socket's port; flushes first when the queue is full
    /// (on an error from that flush, `payload` is not queued).
    pub fn send_to(&mut self, remote: Ipv4Addr, payload: &[u8]) -> io::Result<()> {
        if payload.len() > MAX_PAYLOAD {
            self.stats.tx_errors += 1;
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{KIND} on {}: payload of {} bytes exceeds {MAX_PAYLOAD}",
                    self.local,
                    payload.len()
                ),
            ));
        }
        if self.tx_lens.len() == TX_BATCH {
            self.flush()?;
        }
        let i = self.tx_lens.len();
        self.tx_buf[i * MAX_PAYLOAD..i * MAX_PAYLOAD + payload.len()].copy_from_slice(payload);
        self.tx_addrs[i] = sockaddr(SocketAddrV4::new(remote, self.local.port()));
        self.tx_lens.push(payload.len());
        Ok(())
    }

    /// Send everything queued, with as few `sendmmsg` calls as the kernel allows.
    pub fn flush(&mut self) -> io::Result<()> {
        let n = self.tx_lens.len();
        if n == 0 {
            return Ok(());
        }
        let base = self.tx_buf.as_mut_ptr();
        for i in 0..n {
            self.tx_iov[i] = libc::iovec {
                // SAFETY: slot `i < TX_BATCH` starts inside `tx_buf` (TX_BATCH * MAX_PAYLOAD bytes).
                iov_base: unsafe { base.add(i * MAX_PAYLOAD) }.cast(),
                iov_len: self.tx_lens[i],
            };
            let h = &mut self.tx_msgs[i].msg_hdr;
            h.msg_name = (&mut self.tx_addrs[i] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut self.tx_iov[i];
            h.msg_iovlen = 1;
        }
        let r = sys::send_batch(self.sock.as_fd(), &mut self.tx_msgs, &self.tx_lens, &mut self.stats);
        self.tx_lens.clear();
        r
    }

    /// The file descriptor to poll for readability.
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Counters since the socket was bound (`kernel_drops` and `csum_completed` stay 0).
    pub fn stats(&self) -> PortStats {
        self.stats
    }
}

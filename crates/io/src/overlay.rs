//! The VXLAN underlay socket: UDP between hosts, in batches, with UDP
//! segmentation and receive offloads.
//!
//! Hosts exchange VXLAN(-GBP) packets over plain UDP; the datapath builds and
//! parses the VXLAN header and inner frame, this module moves payloads.
//! Every host listens on the same port, so a payload for host `remote` goes to
//! `remote:<local port>`. Receiving uses `recvmmsg` and sending `sendmmsg`,
//! one system call per batch of up to [`RX_BATCH`] / [`TX_BATCH`] messages,
//! into and out of buffers allocated once. A single datagram larger than
//! [`MAX_PAYLOAD`] is refused on send, and counted as truncated and not
//! delivered on receive.
//!
//! **UDP segmentation offload on send** ([`UdpOverlay::send_segments`],
//! [`UdpOverlay::send_super_frame`]): one message carries many equal-sized
//! datagrams and a `UDP_SEGMENT` control message with their size; the kernel
//! (or the NIC) cuts them apart, so a 64 KiB inner super-frame costs one
//! message of about 45 datagrams instead of 45. A message holds at most
//! [`MAX_GSO_SEGMENTS`] datagrams and 65,507 bytes (one IPv4 datagram's
//! payload); longer runs are split. When the kernel refuses a segmented send
//! (`EINVAL`: e.g. a socket sending without UDP checksums, `SO_NO_CHECK`;
//! `EIO`: IPsec or UDP-Lite on the route; `EOPNOTSUPP`, `ENOPROTOOPT`: a
//! kernel without UDP GSO; Linux 6.18 checksums in software for a device
//! without TX checksum offload rather than refuse) the socket falls back, for
//! good, to one message per datagram (the same bytes, no copy) and counts the
//! refusal in
//! [`PortStats::offload_errors`]; [`UdpOverlay::gso_enabled`] tells which.
//! [`UdpOverlay::send_batch`] sends frames the caller keeps for the call
//! without copying them: a super-frame's segments are gathered from
//! headers written here and payload slices of the caller's frame. Single
//! datagrams of one size, back to back to one host and steered alike by the
//! receiver, share one `UDP_SEGMENT` message (the kernel's stack then runs
//! once for up to 64 small packets).
//!
//! **UDP receive offload** ([`UdpOverlay::enable_gro`], off by default):
//! with `UDP_GRO` set the kernel may hand over many datagrams of one sender
//! in one receive, with their size in a control message: a `UDP_SEGMENT`
//! send from another host crossing veths and bridges arrives that way, and a
//! NIC with GRO merges consecutive datagrams. [`UdpOverlay::recv`] still
//! hands datagrams over one by one; [`UdpOverlay::recv_segments`] hands over
//! each receive whole; [`UdpOverlay::recv_coalesced`] merges consecutive
//! in-order TCP segments of one inner flow back into super-frames
//! ([`crate::gso::Coalescer`]), and [`UdpOverlay::recv_coalesced_batch`]
//! hands a receive's payloads over together, where they lie (the receive
//! buffer, the coalescer's held buffers), so that a caller can send them on
//! in one call per destination. A kernel without `UDP_GRO` refuses the option
//! and the socket stays as it was.
//!
//! With several workers, each binds its own socket to the same address
//! ([`UdpOverlay::bind_steered`]): the sockets form an `SO_REUSEPORT` group
//! whose classic BPF program ([`crate::steer`]) hands every datagram to the
//! worker its inner packet's connection belongs to. The program sees one
//! receive at a time: a GRO batch goes to the worker of its first datagram,
//! so with steered workers GRO is right only when every batch holds one
//! inner flow (true for batches made of one `UDP_SEGMENT` send; not
//! guaranteed for a NIC's GRO, which merges by outer addresses and ports).

use std::fmt;
use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

use crate::csum::complete_checksum;
use crate::error::IoError;
use crate::gso::{self, Coalescer};
use crate::port::{Offload, PortStats};
use crate::steer;
use crate::sys::{self, TxMsg};

const KIND: &str = "UDP overlay";

/// Largest single datagram sent or received without offloads: a 9000-byte inner jumbo frame with its VXLAN header fits.
pub const MAX_PAYLOAD: usize = 16 * 1024;
/// Largest receive with `UDP_GRO` (several datagrams), and largest UDP payload.
pub const MAX_GRO_PAYLOAD: usize = 65_535;
/// Messages received per `recvmmsg`.
pub const RX_BATCH: usize = 32;
/// Messages queued before a send forces a flush.
pub const TX_BATCH: usize = 64;
/// Bytes of queued payloads before a send forces a flush.
const TX_BUFFER: usize = 1 << 20;
/// Most datagrams in one `UDP_SEGMENT` send (the kernel's `UDP_MAX_SEGMENTS`
/// was 64 until it became 128; the lower one works everywhere).
pub const MAX_GSO_SEGMENTS: usize = 64;
/// Most bytes in one `UDP_SEGMENT` send: the payload of one IPv4 UDP datagram.
const MAX_GSO_BYTES: usize = 65_535 - 20 - 8;
/// `UDP_SEGMENT` and `UDP_GRO` (`include/uapi/linux/udp.h`), at level `SOL_UDP`.
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Control-message room per message: one `cmsghdr` and an int, aligned (CMSG_SPACE(4) is 24).
const CONTROL_LEN: usize = 32;

/// A control-message buffer aligned for `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Control([u8; CONTROL_LEN]);

/// One queued message: its pieces (`pieces` in the queue's piece list), where it goes, and its datagram size when it is a
/// `UDP_SEGMENT` send (0: one datagram).
#[derive(Clone, Copy)]
struct TxEntry {
    pieces: (usize, usize),
    /// The receiver's steering hash of its first datagram ([`steer::vxlan_hash`]; 0 when gathered).
    steer: u32,
    to: libc::sockaddr_in,
    segment: usize,
}

/// Where a piece of a queued message lies.
#[derive(Clone, Copy)]
enum Piece {
    /// `len` bytes at `at` in the queue buffer (`tx_buf`).
    Queue { at: usize, len: usize },
    /// `len` bytes at `at` in the header buffer (`tx_hdrs`).
    Header { at: usize, len: usize },
    /// `len` bytes of a caller's buffer, borrowed for one
    /// [`UdpOverlay::send_batch`] call: such a piece is sent before that call returns.
    Borrowed { ptr: *const u8, len: usize },
}

/// One message of a flush: its iovecs (`tx_iov[iov.0..iov.0 + iov.1]`),
/// the entry it comes from, and what it carries.
#[derive(Clone, Copy)]
struct TxSpan {
    iov: (usize, usize),
    entry: usize,
    segment: usize,
    msg: TxMsg,
}

/// One message of the last receive: its sender, where it lies in the
/// receive buffer, its length and the size of the datagrams it holds.
#[derive(Clone, Copy)]
struct RxMsg {
    from: Ipv4Addr,
    at: usize,
    len: usize,
    segment: usize,
}

/// A payload from the underlay, as [`UdpOverlay::recv_coalesced_batch`]
/// hands it over: valid for that call.
#[derive(Debug, Clone, Copy)]
pub struct Arrival<'a> {
    /// The host it came from.
    pub remote: Ipv4Addr,
    /// The payload: VXLAN header, then the inner frame.
    pub payload: &'a [u8],
    /// The inner frame's offload state (offsets from the inner frame's start).
    pub offload: Offload,
}

/// Where a payload of a [`UdpOverlay::recv_coalesced_batch`] batch lies.
#[derive(Clone, Copy)]
enum Source {
    /// `rx_buf[at..at + len]`: a datagram as it came.
    Received { at: usize, len: usize },
    /// The coalescer's held frame `index`, `len` bytes long.
    Held { index: usize, len: usize },
}

/// Most frames the coalescer holds before a batch is handed over early
/// (each holds a buffer of up to 64 KiB).
const HOLD_MAX: usize = 32;

/// A frame for the underlay, borrowed for one [`UdpOverlay::send_batch`] call.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    /// The host it goes to.
    pub remote: Ipv4Addr,
    /// Bytes before the inner frame (its VXLAN header), repeated before every segment.
    pub prefix: &'a [u8],
    /// The inner frame.
    pub frame: &'a [u8],
    /// The inner frame's offload state (offsets from its start).
    pub offload: Offload,
}

/// The underlay UDP socket of one host.
pub struct UdpOverlay {
    sock: UdpSocket,
    local: SocketAddrV4,
    /// `UDP_GRO` is on: receive slots hold a whole coalesced receive.
    gro: bool,
    /// The kernel refused a `UDP_SEGMENT` send: segments go one message each from then on.
    gso_refused: bool,
    rx_slot: usize,
    rx_buf: Vec<u8>,
    rx_addrs: Vec<libc::sockaddr_in>,
    rx_iov: Vec<libc::iovec>,
    rx_ctrl: Vec<Control>,
    rx_msgs: Vec<libc::mmsghdr>,
    /// The messages of the last receive.
    rx_got: Vec<RxMsg>,
    /// The payloads of a coalesced batch being gathered.
    rx_batch: Vec<(Ipv4Addr, Source, Offload)>,
    tx_buf: Vec<u8>,
    /// Segment headers of gathered super-frames ([`UdpOverlay::send_batch`]).
    tx_hdrs: Vec<u8>,
    tx_pieces: Vec<Piece>,
    tx_entries: Vec<TxEntry>,
    tx_spans: Vec<TxSpan>,
    tx_lens: Vec<TxMsg>,
    tx_iov: Vec<libc::iovec>,
    tx_ctrl: Vec<Control>,
    tx_msgs: Vec<libc::mmsghdr>,
    stats: PortStats,
}

// SAFETY: the raw pointers inside the iovec and mmsghdr arrays only ever point into buffers
// owned by this value and are rewritten before each system call; `Piece::Borrowed` pointers
// into a caller's buffers live only during one `send_batch` call, which sends them before
// returning (the queue holds none in between); nothing is shared with another thread, so
// moving the value between threads is sound.
unsafe impl Send for UdpOverlay {}

impl fmt::Debug for UdpOverlay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpOverlay")
            .field("local", &self.local)
            .field("gro", &self.gro)
            .field("gso_refused", &self.gso_refused)
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

/// Whether `e`, from a `UDP_SEGMENT` send, means the kernel does not do it here.
fn gso_refusal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOPROTOOPT)
    )
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
        let ctrl = Control([0; CONTROL_LEN]);
        Ok(UdpOverlay {
            sock,
            local,
            gro: false,
            gso_refused: false,
            rx_slot: MAX_PAYLOAD,
            rx_buf: vec![0; RX_BATCH * MAX_PAYLOAD],
            rx_addrs: vec![any; RX_BATCH],
            rx_iov: vec![iov; RX_BATCH],
            rx_ctrl: vec![ctrl; RX_BATCH],
            rx_msgs: vec![msg; RX_BATCH],
            rx_got: Vec::with_capacity(RX_BATCH),
            rx_batch: Vec::new(),
            tx_buf: Vec::with_capacity(TX_BUFFER),
            tx_hdrs: Vec::new(),
            tx_pieces: Vec::with_capacity(TX_BATCH),
            tx_entries: Vec::with_capacity(TX_BATCH),
            tx_spans: Vec::with_capacity(TX_BATCH),
            tx_lens: Vec::with_capacity(TX_BATCH),
            tx_iov: vec![iov; TX_BATCH],
            tx_ctrl: vec![ctrl; TX_BATCH],
            tx_msgs: vec![msg; TX_BATCH],
            stats: PortStats::default(),
        })
    }

    /// The address the socket is bound to (with the port resolved when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// Ask the kernel for `UDP_GRO`: receives may then hold many datagrams of
    /// one sender (see the module documentation). Returns whether it is on;
    /// a kernel that refuses leaves the socket as it was. The receive
    /// buffers grow to [`RX_BATCH`] × 64 KiB.
    pub fn enable_gro(&mut self) -> bool {
        if self.gro {
            return true;
        }
        let one: libc::c_int = 1;
        if sys::setsockopt(self.sock.as_fd(), libc::SOL_UDP, UDP_GRO, &one).is_err() {
            return false;
        }
        self.gro = true;
        self.rx_slot = MAX_GRO_PAYLOAD;
        self.rx_buf = vec![0; RX_BATCH * MAX_GRO_PAYLOAD];
        true
    }

    /// Whether `UDP_GRO` is on.
    pub fn gro_enabled(&self) -> bool {
        self.gro
    }

    /// Whether sends still use `UDP_SEGMENT` (false once the kernel refused one).
    pub fn gso_enabled(&self) -> bool {
        !self.gso_refused
    }

    /// One `recvmmsg` of up to `want` messages without blocking, described
    /// in `rx_got` (messages cut short are counted and left out). Returns
    /// how many messages the kernel gave (0: none waiting).
    fn receive_once(&mut self, want: usize) -> io::Result<usize> {
        self.rx_got.clear();
        let slot = self.rx_slot;
        let want = want.min(RX_BATCH);
        let base = self.rx_buf.as_mut_ptr();
        for i in 0..want {
            self.rx_iov[i] = libc::iovec {
                // SAFETY: slot `i < RX_BATCH` starts inside `rx_buf` (RX_BATCH * slot bytes).
                iov_base: unsafe { base.add(i * slot) }.cast(),
                iov_len: slot,
            };
            let h = &mut self.rx_msgs[i].msg_hdr;
            h.msg_name = (&mut self.rx_addrs[i] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut self.rx_iov[i];
            h.msg_iovlen = 1;
            if self.gro {
                h.msg_control = self.rx_ctrl[i].0.as_mut_ptr().cast();
                h.msg_controllen = CONTROL_LEN as _;
            } else {
                h.msg_control = ptr::null_mut();
                h.msg_controllen = 0;
            }
            h.msg_flags = 0;
        }
        let r = loop {
            // SAFETY: the first `want` headers point at live buffers, addresses and control
            // buffers owned by `self`; the timeout may be null.
            let r = unsafe {
                libc::recvmmsg(
                    self.sock.as_raw_fd(),
                    self.rx_msgs.as_mut_ptr(),
                    want as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    ptr::null_mut(),
                )
            };
            if r >= 0 {
                break r as usize;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(e),
            }
        };
        for i in 0..r {
            let m = &self.rx_msgs[i];
            if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                self.stats.truncated += 1;
                continue;
            }
            let len = (m.msg_len as usize).min(slot);
            let segment = if self.gro { gro_size(&m.msg_hdr) } else { None };
            let segment = segment.filter(|&s| s > 0 && s < len).unwrap_or(len);
            let count = len.div_ceil(segment.max(1)).max(1);
            self.stats.rx_frames += count as u64;
            self.stats.rx_bytes += len as u64;
            self.stats.rx_super_frames += u64::from(count > 1);
            self.rx_got.push(RxMsg {
                from: Ipv4Addr::from(u32::from_be(self.rx_addrs[i].sin_addr.s_addr)),
                at: i * slot,
                len,
                segment,
            });
        }
        Ok(r)
    }

    /// Receive up to `max` messages without blocking; call `f` with each
    /// sender, the bytes received, and the size of the datagrams they hold
    /// (the last may be shorter; equal to the length when the kernel did not
    /// coalesce). Returns how many datagrams were received.
    pub fn recv_segments(&mut self, max: usize, f: &mut dyn FnMut(Ipv4Addr, &[u8], usize)) -> io::Result<usize> {
        let mut delivered = 0;
        let mut seen = 0;
        while seen < max {
            let want = RX_BATCH.min(max - seen);
            let got = match self.receive_once(want) {
                Ok(got) => got,
                Err(e) if seen == 0 => return Err(e),
                Err(_) => break,
            };
            seen += got;
            for m in &self.rx_got {
                f(m.from, &self.rx_buf[m.at..m.at + m.len], m.segment);
                delivered += m.len.div_ceil(m.segment.max(1)).max(1);
            }
            if got < want {
                break;
            }
        }
        Ok(delivered)
    }

    /// Receive up to `max` messages without blocking; call `f` with each sender
    /// and datagram (a coalesced receive is handed over datagram by datagram).
    /// Returns how many datagrams were delivered.
    pub fn recv(&mut self, max: usize, f: &mut dyn FnMut(Ipv4Addr, &[u8])) -> io::Result<usize> {
        self.recv_segments(max, &mut |from, payload, segment| {
            for datagram in payload.chunks(segment.max(1)) {
                f(from, datagram);
            }
        })
    }

    /// Receive as [`UdpOverlay::recv`] does, but pass the datagrams through
    /// `coalescer` (made for 8-byte VXLAN prefixes): consecutive TCP segments
    /// of one inner flow come out as one payload whose inner frame is a
    /// super-frame, with its [`Offload`]; everything else comes out as it
    /// came, with [`Offload::NONE`]. The offload state describes the inner
    /// frame, after the VXLAN header. Datagrams of different senders are
    /// never merged; the coalescer is flushed before returning. Returns how
    /// many datagrams were received.
    pub fn recv_coalesced(
        &mut self,
        max: usize,
        coalescer: &mut Coalescer,
        f: &mut dyn FnMut(Ipv4Addr, &[u8], &Offload),
    ) -> io::Result<usize> {
        let mut current: Option<Ipv4Addr> = None;
        let r = self.recv_segments(max, &mut |from, payload, segment| {
            if let Some(prev) = current
                && prev != from
            {
                coalescer.flush(&mut |p, o| f(prev, p, o));
            }
            current = Some(from);
            for datagram in payload.chunks(segment.max(1)) {
                coalescer.push(datagram, &mut |p, o| f(from, p, o));
            }
        });
        if let Some(prev) = current {
            coalescer.flush(&mut |p, o| f(prev, p, o));
        }
        r
    }

    /// Receive as [`UdpOverlay::recv_coalesced`] does, but hand the
    /// payloads over in batches, all valid during one call of `f`: those
    /// of one `recvmmsg` (fewer when the coalescer would hold more than
    /// 32 frames of its own, each up to 64 KiB), in the order `recv_coalesced` would
    /// hand them over. Datagrams passed on as they came are handed over
    /// from the receive buffer, merged frames from the coalescer's
    /// buffers ([`Coalescer::hold`]): a caller can send a whole batch, one
    /// call per destination, from where it lies. The coalescer is flushed
    /// at the end of each receive. Returns how many datagrams were received.
    pub fn recv_coalesced_batch(
        &mut self,
        max: usize,
        coalescer: &mut Coalescer,
        f: &mut dyn FnMut(&[Arrival<'_>]),
    ) -> io::Result<usize> {
        let mut delivered = 0;
        let mut seen = 0;
        let mut batch = mem::take(&mut self.rx_batch);
        let mut r = Ok(());
        while seen < max {
            let want = RX_BATCH.min(max - seen);
            let got = match self.receive_once(want) {
                Ok(got) => got,
                Err(e) => {
                    if seen == 0 {
                        r = Err(e);
                    }
                    break;
                }
            };
            seen += got;
            batch.clear();
            coalescer.hold();
            let mut held = 0;
            let mut current: Option<Ipv4Addr> = None;
            for k in 0..self.rx_got.len() {
                let m = self.rx_got[k];
                if let Some(prev) = current
                    && prev != m.from
                {
                    coalescer.flush(&mut |p, o| batch.push((prev, held_source(p, &mut held), *o)));
                }
                current = Some(m.from);
                let segment = m.segment.max(1);
                for (j, datagram) in self.rx_buf[m.at..m.at + m.len].chunks(segment).enumerate() {
                    let at = m.at + j * segment;
                    coalescer.push(datagram, &mut |p, o| {
                        let source = if std::ptr::eq(p, datagram) {
                            Source::Received { at, len: p.len() }
                        } else {
                            held_source(p, &mut held)
                        };
                        batch.push((m.from, source, *o));
                    });
                    delivered += 1;
                    if coalescer.held().len() >= HOLD_MAX {
                        hand_over(&batch, &self.rx_buf, coalescer, f);
                        batch.clear();
                        coalescer.release();
                        coalescer.hold();
                        held = 0;
                    }
                }
            }
            if let Some(prev) = current {
                coalescer.flush(&mut |p, o| batch.push((prev, held_source(p, &mut held), *o)));
            }
            hand_over(&batch, &self.rx_buf, coalescer, f);
            batch.clear();
            coalescer.release();
            if got < want {
                break;
            }
        }
        self.rx_batch = batch;
        r.map(|()| delivered)
    }

    /// Make room for `len` more bytes and one more message, flushing first if
    /// needed; an error if they can never fit.
    fn tx_room(&mut self, len: usize) -> io::Result<()> {
        if len > TX_BUFFER {
            self.stats.tx_errors += 1;
            return Err(self.invalid(format!("{len} bytes exceed the transmit buffer of {TX_BUFFER}")));
        }
        if self.tx_entries.len() >= TX_BATCH || self.tx_buf.len() + len > TX_BUFFER {
            self.flush()?;
        }
        Ok(())
    }

    fn invalid(&self, what: String) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{KIND} on {}: {what}", self.local))
    }

    fn to(&self, remote: Ipv4Addr) -> libc::sockaddr_in {
        sockaddr(SocketAddrV4::new(remote, self.local.port()))
    }

    /// Queue `payload` for `remote` at this socket's port; flushes first when the queue is full
    /// (on an error from that flush, `payload` is not queued).
    pub fn send_to(&mut self, remote: Ipv4Addr, payload: &[u8]) -> io::Result<()> {
        if payload.len() > MAX_PAYLOAD {
            self.stats.tx_errors += 1;
            return Err(self.invalid(format!("payload of {} bytes exceeds {MAX_PAYLOAD}", payload.len())));
        }
        self.tx_room(payload.len())?;
        let at = self.tx_buf.len();
        self.tx_buf.extend_from_slice(payload);
        self.queue_copied(at, payload.len(), remote, 0);
        Ok(())
    }

    /// Queue `datagrams` for `remote`: back-to-back datagrams of `segment`
    /// bytes each, the last possibly shorter, sent with `UDP_SEGMENT` (in
    /// messages of at most [`MAX_GSO_SEGMENTS`] datagrams and 65,507 bytes),
    /// or one by one once the kernel has refused that. Returns how many
    /// datagrams were queued.
    pub fn send_segments(&mut self, remote: Ipv4Addr, datagrams: &[u8], segment: usize) -> io::Result<usize> {
        if segment == 0 || segment > MAX_PAYLOAD {
            self.stats.tx_errors += 1;
            return Err(self.invalid(format!("datagram size {segment}: 1 to {MAX_PAYLOAD} are possible")));
        }
        let per = MAX_GSO_SEGMENTS.min(MAX_GSO_BYTES / segment).max(1);
        let mut queued = 0;
        for part in datagrams.chunks(per * segment) {
            self.tx_room(part.len())?;
            let at = self.tx_buf.len();
            self.tx_buf.extend_from_slice(part);
            self.queue_segmented(at, part.len(), remote, segment);
            queued += part.len().div_ceil(segment);
        }
        Ok(queued)
    }

    /// Queue the message at `at..at + len` of the queue buffer, datagrams of `segment` bytes.
    fn queue_segmented(&mut self, at: usize, len: usize, remote: Ipv4Addr, segment: usize) {
        self.queue_copied(at, len, remote, segment);
    }

    /// Queue the message at `at..at + len` of the queue buffer, datagrams of
    /// `segment` bytes (0, or at least `len`: one datagram).
    ///
    /// A single datagram that directly follows, in the buffer and the queue,
    /// datagrams of its size (or longer, when it is the last) to the same
    /// address, and that the receiver steers as their first
    /// ([`steer::vxlan_hash`]: a message reaches one socket of a steered
    /// group whole), joins their message as one more `UDP_SEGMENT` datagram:
    /// a burst of small packets of one size costs the kernel one pass
    /// through its stack (and the receiver, with `UDP_GRO`, one receive)
    /// instead of one per datagram; the datagrams on the wire are the same.
    fn queue_copied(&mut self, at: usize, len: usize, remote: Ipv4Addr, segment: usize) {
        if segment == 0 && self.join_last(at, len, remote) {
            return;
        }
        let first = self.tx_pieces.len();
        self.tx_pieces.push(Piece::Queue { at, len });
        let steer = steer::vxlan_hash(&self.tx_buf[at..at + len]);
        self.queue_pieces(first, len, remote, segment, steer);
    }

    /// Add the datagram at `at..at + len` of the queue buffer to the last
    /// queued message when it can carry it as one more `UDP_SEGMENT`
    /// datagram (see [`UdpOverlay::queue_copied`]); whether it did.
    fn join_last(&mut self, at: usize, len: usize, remote: Ipv4Addr) -> bool {
        if self.gso_refused || len == 0 {
            return false;
        }
        let to = self.to(remote);
        let steer = steer::vxlan_hash(&self.tx_buf[at..at + len]);
        let Some(e) = self.tx_entries.last_mut() else {
            return false;
        };
        if e.pieces.1 != 1 || e.pieces.0 + 1 != self.tx_pieces.len() {
            return false;
        }
        let Piece::Queue { at: p_at, len: p_len } = self.tx_pieces[e.pieces.0] else {
            return false;
        };
        let size = if e.segment == 0 { p_len } else { e.segment };
        let same_to = e.to.sin_addr.s_addr == to.sin_addr.s_addr && e.to.sin_port == to.sin_port && e.steer == steer;
        let fits = p_at + p_len == at
            && p_len % size == 0
            && len <= size
            && p_len / size < MAX_GSO_SEGMENTS
            && p_len + len <= MAX_GSO_BYTES;
        if !same_to || !fits {
            return false;
        }
        self.tx_pieces[e.pieces.0] = Piece::Queue {
            at: p_at,
            len: p_len + len,
        };
        e.segment = size;
        true
    }

    /// Queue a message of the pieces from `first` to the end of the piece list.
    fn queue_pieces(&mut self, first: usize, len: usize, remote: Ipv4Addr, segment: usize, steer: u32) {
        let to = self.to(remote);
        let segment = if len <= segment { 0 } else { segment };
        self.tx_entries.push(TxEntry {
            pieces: (first, self.tx_pieces.len() - first),
            steer,
            to,
            segment,
        });
    }

    /// Put inner frame `frame`, with its offload state, on the underlay to
    /// `remote` behind `prefix` (its VXLAN header): a super-frame is cut into
    /// packets ([`gso::segment`]) straight into the transmit queue and sent
    /// with `UDP_SEGMENT`; a partial checksum is completed; a plain frame is
    /// one datagram. Returns how many datagrams were queued.
    pub fn send_super_frame(
        &mut self,
        remote: Ipv4Addr,
        prefix: &[u8],
        frame: &[u8],
        offload: &Offload,
    ) -> io::Result<usize> {
        if offload.gso.is_none() {
            let len = prefix.len() + frame.len();
            if len > MAX_PAYLOAD {
                self.stats.tx_errors += 1;
                return Err(self.invalid(format!("payload of {len} bytes exceeds {MAX_PAYLOAD}")));
            }
            self.tx_room(len)?;
            let at = self.tx_buf.len();
            self.tx_buf.extend_from_slice(prefix);
            self.tx_buf.extend_from_slice(frame);
            if offload.csum.is_some() {
                if complete_checksum(&mut self.tx_buf[at + prefix.len()..]).is_ok() {
                    self.stats.csum_completed += 1;
                } else {
                    self.stats.offload_errors += 1;
                }
            }
            self.queue_copied(at, len, remote, 0);
            return Ok(1);
        }
        let layout = gso::layout(frame, offload).map_err(|e| {
            self.stats.offload_errors += 1;
            self.invalid(format!("cannot segment: {e}"))
        })?;
        let stride = prefix.len() + layout.header_len + layout.segment_size;
        if stride > MAX_PAYLOAD {
            self.stats.tx_errors += 1;
            return Err(self.invalid(format!("segments of {stride} bytes exceed {MAX_PAYLOAD}")));
        }
        let needed = layout.segments() * (prefix.len() + layout.header_len) + layout.payload_len;
        self.tx_room(needed)?;
        let room = TX_BUFFER - self.tx_buf.len();
        let segs = gso::segment(frame, offload, prefix, &mut self.tx_buf, room).map_err(|e| {
            self.stats.offload_errors += 1;
            self.invalid(format!("cannot segment: {e}"))
        })?;
        self.stats.sw_segmented += 1;
        // Whole messages of at most MAX_GSO_SEGMENTS datagrams and MAX_GSO_BYTES bytes.
        let per = MAX_GSO_SEGMENTS.min(MAX_GSO_BYTES / stride).max(1);
        let mut at = segs.start;
        let end = segs.start + segs.total_len();
        while at < end {
            let len = (per * stride).min(end - at);
            if self.tx_entries.len() >= TX_BATCH {
                // The bytes are queued already: send what is before them, then carry on.
                self.flush_entries()?;
            }
            self.queue_segmented(at, len, remote, stride);
            at += len;
        }
        Ok(segs.count)
    }

    /// Send `frames`, with everything queued before them, and return how
    /// many datagrams were queued (the send's own errors are counted in
    /// [`PortStats`] and the first one returned, after trying all).
    ///
    /// Super-frames are cut without copying their payload: only each
    /// segment's prefix and headers are written ([`gso::segment_headers`]),
    /// and each `UDP_SEGMENT` message gathers, per datagram, its headers and
    /// its slice of the caller's frame (one iovec each; the kernel copies the
    /// bytes once, into the socket buffer). Other frames are queued as by
    /// [`UdpOverlay::send_super_frame`]. Frames keep their order. Everything
    /// is sent before this returns: the borrowed bytes are not kept.
    pub fn send_batch<'a>(&mut self, frames: &mut dyn Iterator<Item = Outgoing<'a>>) -> io::Result<usize> {
        let mut queued = 0;
        let mut first_err = None;
        for f in frames {
            let r = if f.offload.gso.is_none() {
                self.send_super_frame(f.remote, f.prefix, f.frame, &f.offload)
            } else {
                self.queue_gathered(&f)
            };
            match r {
                Ok(n) => queued += n,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        // Always sent here, error or not: no borrowed piece may outlive this call.
        let r = self.flush();
        debug_assert!(self.tx_entries.is_empty() && self.tx_pieces.is_empty());
        match first_err {
            Some(e) => Err(e),
            None => r.map(|()| queued),
        }
    }

    /// Queue super-frame `f` for a gathering send: its segments' headers in
    /// the header buffer, its payload borrowed. Only [`UdpOverlay::send_batch`]
    /// calls this, and sends the queue before it returns.
    fn queue_gathered(&mut self, f: &Outgoing<'_>) -> io::Result<usize> {
        let invalid = |this: &mut Self, e: gso::GsoError| {
            this.stats.offload_errors += 1;
            this.invalid(format!("cannot segment: {e}"))
        };
        let layout = gso::layout(f.frame, &f.offload).map_err(|e| invalid(self, e))?;
        let stride = f.prefix.len() + layout.header_len + layout.segment_size;
        if stride > MAX_PAYLOAD {
            self.stats.tx_errors += 1;
            return Err(self.invalid(format!("segments of {stride} bytes exceed {MAX_PAYLOAD}")));
        }
        let count = layout.segments();
        let needed = count * (f.prefix.len() + layout.header_len);
        if needed > TX_BUFFER {
            self.stats.tx_errors += 1;
            return Err(self.invalid(format!("{needed} bytes of headers exceed {TX_BUFFER}")));
        }
        let per = MAX_GSO_SEGMENTS.min(MAX_GSO_BYTES / stride).max(1);
        if self.tx_entries.len() + count.div_ceil(per) > TX_BATCH || self.tx_hdrs.len() + needed > TX_BUFFER {
            self.flush()?;
        }
        let segs = gso::segment_headers(f.frame, &f.offload, f.prefix, &mut self.tx_hdrs, TX_BUFFER)
            .map_err(|e| invalid(self, e))?;
        self.stats.sw_segmented += 1;
        let mut i = 0;
        while i < count {
            let n = per.min(count - i);
            let first = self.tx_pieces.len();
            let mut len = 0;
            for k in i..i + n {
                let (hdr, payload) = segs.segment(k, &self.tx_hdrs, f.frame);
                let at = segs.start + k * segs.header_stride;
                self.tx_pieces.push(Piece::Header { at, len: hdr.len() });
                self.tx_pieces.push(Piece::Borrowed {
                    ptr: payload.as_ptr(),
                    len: payload.len(),
                });
                len += hdr.len() + payload.len();
            }
            self.queue_pieces(first, len, f.remote, stride, 0);
            i += n;
        }
        Ok(count)
    }

    /// Send everything queued, with as few `sendmmsg` calls as the kernel allows.
    pub fn flush(&mut self) -> io::Result<()> {
        let r = self.flush_entries();
        self.tx_buf.clear();
        self.tx_hdrs.clear();
        self.tx_pieces.clear();
        r
    }

    /// Send the queued messages (the queue buffer is kept: entries may still point into it).
    fn flush_entries(&mut self) -> io::Result<()> {
        let mut first_err = None;
        let mut from = 0;
        while from < self.tx_entries.len() {
            self.build_messages(from);
            let n = self.tx_lens.len();
            let gso = !self.gso_refused;
            let r = sys::send_batch_from(
                self.sock.as_fd(),
                &mut self.tx_msgs[..n],
                &self.tx_lens,
                &mut self.stats,
                0,
                &|m, e| gso && m.super_frame && gso_refusal(e),
            );
            match r {
                Ok(_) => break,
                Err((k, e)) if gso && self.tx_lens[k].super_frame && gso_refusal(&e) => {
                    // The kernel does not segment here: from this message on, one datagram each.
                    self.gso_refused = true;
                    self.stats.offload_errors += 1;
                    from = self.tx_spans[k].entry;
                }
                Err((_, e)) => {
                    first_err = Some(e);
                    break;
                }
            }
        }
        self.tx_entries.clear();
        self.tx_lens.clear();
        first_err.map_or(Ok(()), Err)
    }

    /// Fill the message arrays for entries `from..`: one message per entry,
    /// with a `UDP_SEGMENT` control message for a segmented one, or, once the
    /// kernel refused those, one message per datagram (its pieces cut at
    /// the datagram boundaries).
    fn build_messages(&mut self, from: usize) {
        self.tx_lens.clear();
        self.tx_spans.clear();
        self.tx_iov.clear();
        let gso = !self.gso_refused;
        let (queue, hdrs) = (self.tx_buf.as_ptr(), self.tx_hdrs.as_ptr());
        for k in from..self.tx_entries.len() {
            let e = self.tx_entries[k];
            let whole = e.segment == 0 || gso;
            // Room left in the datagram being built (one message per datagram when not whole).
            let mut left = if whole { usize::MAX } else { e.segment };
            let (mut iov_start, mut bytes) = (self.tx_iov.len(), 0);
            for piece in &self.tx_pieces[e.pieces.0..e.pieces.0 + e.pieces.1] {
                let (mut ptr, mut len) = match *piece {
                    // SAFETY: queued pieces lie inside the initialised bytes of their buffer.
                    Piece::Queue { at, len } => (unsafe { queue.add(at) }, len),
                    // SAFETY: as above.
                    Piece::Header { at, len } => (unsafe { hdrs.add(at) }, len),
                    Piece::Borrowed { ptr, len } => (ptr, len),
                };
                while len > 0 {
                    let take = len.min(left);
                    self.tx_iov.push(libc::iovec {
                        iov_base: ptr.cast_mut().cast(),
                        iov_len: take,
                    });
                    // SAFETY: `take <= len`: at most one past the piece's end.
                    ptr = unsafe { ptr.add(take) };
                    len -= take;
                    bytes += take;
                    left -= take;
                    if left == 0 {
                        self.tx_spans.push(TxSpan {
                            iov: (iov_start, self.tx_iov.len() - iov_start),
                            entry: k,
                            segment: 0,
                            msg: TxMsg {
                                bytes,
                                frames: 1,
                                super_frame: false,
                            },
                        });
                        (iov_start, bytes, left) = (self.tx_iov.len(), 0, e.segment);
                    }
                }
            }
            if bytes > 0 {
                let segmented = whole && e.segment > 0;
                self.tx_spans.push(TxSpan {
                    iov: (iov_start, self.tx_iov.len() - iov_start),
                    entry: k,
                    segment: if segmented { e.segment } else { 0 },
                    msg: TxMsg {
                        bytes,
                        frames: if segmented { bytes.div_ceil(e.segment) as u32 } else { 1 },
                        super_frame: segmented,
                    },
                });
            }
        }
        let n = self.tx_spans.len();
        if n > self.tx_msgs.len() {
            self.tx_ctrl.resize(n, Control([0; CONTROL_LEN]));
            // SAFETY: mmsghdr is a plain C struct for which all-zero bytes are a valid value.
            self.tx_msgs.resize(n, unsafe { mem::zeroed() });
        }
        let iov = self.tx_iov.as_mut_ptr();
        for (i, span) in self.tx_spans.iter().enumerate() {
            let h = &mut self.tx_msgs[i].msg_hdr;
            h.msg_name = (&mut self.tx_entries[span.entry].to as *mut libc::sockaddr_in).cast();
            h.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            // SAFETY: the span's iovecs lie inside `tx_iov`, which is not changed until the send.
            h.msg_iov = unsafe { iov.add(span.iov.0) };
            h.msg_iovlen = span.iov.1 as _;
            h.msg_flags = 0;
            if span.segment > 0 {
                set_segment_size(h, &mut self.tx_ctrl[i], span.segment as u16);
            } else {
                h.msg_control = ptr::null_mut();
                h.msg_controllen = 0;
            }
            self.tx_lens.push(span.msg);
        }
    }

    /// The file descriptor to poll for readability.
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Counters since the socket was bound: datagrams (`rx_frames`,
    /// `tx_frames`), coalesced receives (`rx_super_frames`), `UDP_SEGMENT`
    /// sends (`tx_super_frames`), super-frames cut (`sw_segmented`), refused
    /// offloads (`offload_errors`); `kernel_drops` stays 0.
    pub fn stats(&self) -> PortStats {
        self.stats
    }
}

/// The source of a frame the coalescer emitted from a run's buffer: its
/// next held frame (`held` counts them).
fn held_source(p: &[u8], held: &mut usize) -> Source {
    let index = *held;
    *held += 1;
    Source::Held { index, len: p.len() }
}

/// Call `f` with the payloads of `batch`, from the receive buffer and the
/// coalescer's held frames.
fn hand_over(
    batch: &[(Ipv4Addr, Source, Offload)],
    rx_buf: &[u8],
    coalescer: &Coalescer,
    f: &mut dyn FnMut(&[Arrival<'_>]),
) {
    if batch.is_empty() {
        return;
    }
    let held = coalescer.held();
    let arrivals: Vec<Arrival<'_>> = batch
        .iter()
        .filter_map(|&(remote, source, offload)| {
            let payload = match source {
                Source::Received { at, len } => rx_buf.get(at..at + len)?,
                // The coalescer keeps each frame it emitted from a run's buffer, in order.
                Source::Held { index, len } => held.get(index).map(Vec::as_slice).filter(|b| b.len() == len)?,
            };
            Some(Arrival {
                remote,
                payload,
                offload,
            })
        })
        .collect();
    debug_assert_eq!(
        arrivals.len(),
        batch.len(),
        "every payload of the batch is where it was emitted"
    );
    f(&arrivals);
}

/// Point `h` at `ctrl`, holding one `UDP_SEGMENT` control message for datagrams of `size` bytes.
fn set_segment_size(h: &mut libc::msghdr, ctrl: &mut Control, size: u16) {
    h.msg_control = ctrl.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    h.msg_controllen = unsafe { libc::CMSG_SPACE(mem::size_of::<u16>() as u32) } as _;
    // SAFETY: the control buffer is 8-byte aligned and CONTROL_LEN (32) bytes, more than
    // CMSG_SPACE(2) (24), so CMSG_FIRSTHDR returns its start and the header and data fit.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(h);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(mem::size_of::<u16>() as u32) as _;
        ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), size);
    }
}

/// The datagram size of a coalesced receive (`UDP_GRO` control message), if any.
// `msg_controllen` is a `size_t` in glibc and a `socklen_t` in musl: the cast is not always a no-op.
#[allow(clippy::unnecessary_cast)]
fn gro_size(h: &libc::msghdr) -> Option<usize> {
    if h.msg_control.is_null() || (h.msg_controllen as usize) < mem::size_of::<libc::cmsghdr>() {
        return None;
    }
    // SAFETY: the kernel filled `msg_controllen` bytes of the control buffer this header
    // points at with well-formed control messages; CMSG_FIRSTHDR/CMSG_NXTHDR stay inside it
    // and return null at its end.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP
                && (*c).cmsg_type == UDP_GRO
                && (*c).cmsg_len as usize >= libc::CMSG_LEN(mem::size_of::<libc::c_int>() as u32) as usize
            {
                let v = ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first control message of `h`: (level, type, first two data bytes).
    fn first_cmsg(h: &libc::msghdr) -> (libc::c_int, libc::c_int, u16) {
        // SAFETY: `h` points at a control buffer the test filled with one well-formed message.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(h);
            assert!(!c.is_null());
            (
                (*c).cmsg_level,
                (*c).cmsg_type,
                ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u16>()),
            )
        }
    }

    #[test]
    fn segment_size_control_message_round_trips() {
        let mut ctrl = Control([0xee; CONTROL_LEN]);
        // SAFETY: msghdr is plain data; all-zero is valid.
        let mut h: libc::msghdr = unsafe { mem::zeroed() };
        set_segment_size(&mut h, &mut ctrl, 1522);
        assert_eq!(first_cmsg(&h), (libc::SOL_UDP, UDP_SEGMENT, 1522));
        assert!(h.msg_controllen as usize <= CONTROL_LEN);
    }

    /// A control buffer as the kernel writes it for a coalesced receive.
    fn gro_control(level: libc::c_int, kind: libc::c_int, size: libc::c_int) -> Control {
        let mut ctrl = Control([0; CONTROL_LEN]);
        // SAFETY: msghdr is plain data; all-zero is valid.
        let mut h: libc::msghdr = unsafe { mem::zeroed() };
        h.msg_control = ctrl.0.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        h.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as _;
        // SAFETY: the buffer is aligned and large enough for one message with an int.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&h);
            (*c).cmsg_level = level;
            (*c).cmsg_type = kind;
            (*c).cmsg_len = libc::CMSG_LEN(4) as _;
            ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), size);
        }
        ctrl
    }

    #[test]
    fn gro_size_is_read_from_its_control_message_only() {
        let cases = [
            ("UDP_GRO", libc::SOL_UDP, UDP_GRO, 1448, Some(1448)),
            ("another type", libc::SOL_UDP, UDP_SEGMENT, 1448, None),
            ("another level", libc::SOL_SOCKET, UDP_GRO, 1448, None),
            ("negative size", libc::SOL_UDP, UDP_GRO, -1, None),
        ];
        for (what, level, kind, size, want) in cases {
            let mut ctrl = gro_control(level, kind, size);
            // SAFETY: msghdr is plain data; all-zero is valid.
            let mut h: libc::msghdr = unsafe { mem::zeroed() };
            h.msg_control = ctrl.0.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE only computes a size.
            h.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as _;
            assert_eq!(gro_size(&h), want, "{what}");
            // Fewer bytes than a header: nothing is read.
            h.msg_controllen = 4;
            assert_eq!(gro_size(&h), None, "{what}, cut");
        }
        // SAFETY: msghdr is plain data; all-zero is valid.
        let h: libc::msghdr = unsafe { mem::zeroed() };
        assert_eq!(gro_size(&h), None, "no control buffer");
    }
}

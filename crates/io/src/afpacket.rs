//! AF_PACKET ports: batched `recvmmsg` (or a TPACKET_V3 receive ring) and batched `sendmmsg` transmission.
//!
//! An [`AfPacket`] owns one packet socket bound to one interface (the host
//! end of a VM's veth pair, typically). By default ([`RxMode::Socket`]) it
//! receives from the socket's queue, up to 64 frames per `recvmmsg`, each
//! with the kernel's description of it (`PACKET_AUXDATA`: lengths, checksum
//! state, a VLAN tag taken out). [`RxMode::Ring`] uses the kernel's
//! memory-mapped TPACKET_V3 ring instead: the kernel fills fixed-size blocks
//! with variable-length frames and hands a block over when it is full or its
//! retire timeout expires, so a busy port costs one `poll` per block instead
//! of one per batch (Documentation/networking/packet_mmap.rst), but a frame
//! that does not fill its block waits for the timeout (see [`RxMode`] for
//! why that made the queue the default). Both deliver frames the same way
//! (`admit`: truncation, offload header, VLAN tag, checksums). The socket
//! is promiscuous and sets `PACKET_IGNORE_OUTGOING`: it never sees frames that
//! it, or the host stack, transmits on the interface, or a switch would
//! re-forward its own output.
//!
//! **Offloads** ([`AfPacketConfig::vnet_hdr`], on by default). The socket
//! sets `PACKET_VNET_HDR`: in each ring slot the kernel writes a 10-byte
//! virtio-net header (`struct virtio_net_hdr`) right before the frame
//! (`tpacket_rcv`: `netoff` grows by the header, which sits at `mac - 10`;
//! from the socket queue it starts each message),
//! so a TSO/GSO super-frame from a guest with offloads on (up to 64 KiB) is
//! delivered whole, with its segment size, and a partial checksum stays
//! partial; both come with the frame as its [`Offload`]
//! ([`FramePort::recv_frames`]). On send, the header precedes the frame in
//! the `sendmmsg` iovec and the kernel takes the frame as it says: a
//! super-frame stays one skb up to the device that needs it cut (a veth into
//! a namespace takes it whole), a partial checksum is finished where needed.
//! The ring's frame size then defaults to [`SUPER_FRAME_SIZE`]; TPACKET_V3
//! packs frames by their real length, so small frames cost no more ring
//! space than before. For plain receivers ([`FramePort::recv_batch`]) the
//! port completes partial checksums in place in the ring and cuts
//! super-frames into packets ([`PlainFrames`]). With `vnet_hdr` off
//! ([`AfPacketConfig::plain`], the earlier behaviour), frames that do not fit
//! the frame size (GSO super-packets, jumbo frames) are snapped by a
//! one-instruction socket filter, counted as `truncated` and not delivered
//! (a partial frame must never be forwarded), frames whose sender left the
//! TCP/UDP checksum to offload hardware (`TP_STATUS_CSUMNOTREADY`) are
//! completed in place ([`crate::csum`]), and super-frames given to
//! [`FramePort::send_frame`] are cut in user space.
//!
//! A VLAN tag the kernel moved into the ring's metadata is put back into the
//! frame (the offload state's checksum start and header length move with
//! it). Transmission queues frames (with their headers) in a preallocated
//! buffer and sends each batch with one `sendmmsg`, which needs no second
//! ring and keeps the socket in one TPACKET version; `benches/veth.rs`
//! measures it against one call per frame.
//!
//! With [`AfPacketConfig::fanout`] set, the port joins the interface's packet
//! fanout group (`PACKET_FANOUT_CBPF`): the N ports of the N workers share
//! the interface and the kernel hands each frame to exactly one of them, the
//! one [`crate::steer`]'s program picks. The i-th port to join is worker i.
//! A port receives nothing until it has joined (its socket filter drops
//! everything until then), so no frame reaches two workers while a group is
//! being formed. A fanout group does not honour its members'
//! `PACKET_IGNORE_OUTGOING`; the group is created with
//! `PACKET_FANOUT_FLAG_IGNORE_OUTGOING` instead (Linux 6.2 and later; an
//! older kernel does not know the flag, and the group would also get the
//! frames the host stack transmits on the interface). Frames a member
//! transmits never come back to the group.

use std::cell::Cell;
use std::fmt;
use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU32, Ordering};

use palisade_wire::virtio_net::{self, Header, VirtioNetRepr};

use crate::csum::complete_checksum;
use crate::error::IoError;
use crate::gso;
use crate::port::{FramePort, Offload, PlainFrames, PortOffloads, PortStats, RxFrame};
use crate::steer;
use crate::sys::{self, TxMsg};

const KIND: &str = "AF_PACKET";

/// `TPACKET_V3` from `enum tpacket_versions`.
const TPACKET_V3: libc::c_int = 2;
/// TPACKET_ALIGNMENT: frame sizes must be multiples of it.
const TPACKET_ALIGNMENT: usize = 16;
/// Smallest frame size accepted: room for the kernel's TPACKET3 header and a minimal Ethernet frame.
const MIN_FRAME_SIZE: usize = 128;
/// Classic BPF `ret #k`: accept the packet, snapped to `k` bytes.
const BPF_RET_K: u16 = 0x06;
/// Default TPID for a VLAN tag whose TPID the kernel did not report.
const ETH_P_8021Q: u16 = 0x8100;
/// Bytes of the Ethernet destination and source addresses, before which nothing is inserted.
const MAC_PAIR_LEN: usize = 12;
/// Most frames in one batch of [`FramePort::recv_frames`] (and in one walk step of `recv`).
const RX_BATCH: usize = 64;
/// Bytes of the virtio-net header with `PACKET_VNET_HDR` (`struct virtio_net_hdr`, no `num_buffers`).
const VNET_LEN: usize = virtio_net::HEADER_LEN_NO_NUM_BUFFERS;
/// The ring frame size that holds any super-frame: a 65,535-byte IP datagram
/// behind an Ethernet header and two VLAN tags, rounded up to 16.
pub const SUPER_FRAME_SIZE: usize = (65_535 + 14 + 8usize).div_ceil(16) * 16;
/// The frame size of a port without virtio-net headers: a 1500-byte MTU and tags, with room.
pub const PLAIN_FRAME_SIZE: usize = 2048;

/// Offsets in `struct tpacket_block_desc` (version, offset_to_priv, then `tpacket_hdr_v1`).
mod block {
    pub const STATUS: usize = 8;
    pub const NUM_PKTS: usize = 12;
    pub const FIRST_PKT: usize = 16;
}

/// Offsets in `struct tpacket3_hdr`.
mod hdr {
    pub const NEXT_OFFSET: usize = 0;
    pub const SNAPLEN: usize = 12;
    pub const LEN: usize = 16;
    pub const STATUS: usize = 20;
    pub const MAC: usize = 24;
    pub const VLAN_TCI: usize = 32;
    pub const VLAN_TPID: usize = 36;
    /// The fixed part read here (through `hv1`).
    pub const FIXED: usize = 40;
}

/// A port's place in its interface's fanout group of per-worker ports.
///
/// The kernel's index of a port in the group is the order of joining: worker
/// `i` must open its port on an interface `i`-th, after workers `0..i`, and
/// all `workers` ports must be opened before the steering is right (until
/// then frames steered to a missing index go to an existing one). Closing a
/// port moves the group's last port into its place, so a group that loses a
/// member must be rebuilt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fanout {
    /// Number of ports (workers) in the group, 1 to 256.
    pub workers: u32,
    /// The group id, unique per interface within the network namespace; `None`: the low
    /// 16 bits of the interface index.
    pub group: Option<u16>,
}

/// Most members of a fanout group created without `fanout_args` (`PACKET_FANOUT_MAX`).
const FANOUT_MAX: u32 = 256;

/// Sizes of an AF_PACKET port's rings and batches, and its fanout group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AfPacketConfig {
    /// Bytes per receive-ring block; a multiple of the page size.
    pub block_size: usize,
    /// Number of receive-ring blocks.
    pub block_count: usize,
    /// Largest frame delivered or sent (bytes of Ethernet frame); a multiple of 16, at least 128.
    pub frame_size: usize,
    /// Milliseconds after which the kernel hands over a partly filled block.
    pub block_timeout_ms: u32,
    /// Frames queued by `send` before a `flush` is forced.
    pub tx_frames: usize,
    /// Bytes of the transmit queue (frames, and their virtio-net headers); a
    /// `flush` is forced when the next frame does not fit. At least
    /// `frame_size` plus a header.
    pub tx_buffer: usize,
    /// Read and write virtio-net headers (`PACKET_VNET_HDR`): super-frames and
    /// partial checksums come and go as they are (see the module documentation).
    pub vnet_hdr: bool,
    /// Join the interface's fanout group as one of several per-worker ports; `None`: the
    /// port receives every frame of the interface.
    pub fanout: Option<Fanout>,
    /// How frames are received: the memory-mapped ring, or the socket's queue.
    pub rx: RxMode,
}

/// How an [`AfPacket`] port receives.
///
/// The TPACKET_V3 ring costs one wake-up per block, but hands a block over
/// only when it is full or its retire timeout (at least 1 ms; the kernel's
/// timer may fire later) expires: a frame that does not fill its block waits.
/// On a TCP stream that is every ACK, so the ring adds milliseconds to the
/// round trip and the stream's rate is its window over that round trip. The
/// socket queue wakes the reader per frame, which then takes up to 64
/// frames per `recvmmsg`: no waiting, one copy as with the ring (the kernel
/// copies a frame into either), one system call per batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxMode {
    /// TPACKET_V3 ring of `block_count` blocks of `block_size` bytes.
    Ring,
    /// `recvmmsg` from the socket's queue, whose receive buffer is
    /// `block_size * block_count` bytes (`SO_RCVBUFFORCE`, else as much of it
    /// as `net.core.rmem_max` allows); each message has room for a
    /// `frame_size` frame and its virtio-net header.
    Socket,
}

impl Default for AfPacketConfig {
    /// Virtio-net headers on; 32 blocks of 256 KiB (8 MiB), frames up to
    /// [`SUPER_FRAME_SIZE`], 1 ms retire timeout, TX batches of up to 256
    /// frames in 1 MiB, no fanout.
    ///
    /// Why these blocks: the kernel hands a block over when it is full or
    /// its timeout expires, and takes it back only once every frame in it
    /// has been read. A 256 KiB block holds three super-frames, so a stream
    /// of them is handed over (and its room returned) every three frames
    /// rather than every fifteen, and a full ring frees room in smaller
    /// steps; 8 MiB hold about 120 super-frames, more than one TCP stream
    /// keeps in flight with Linux's default 4 MiB send buffer.
    fn default() -> Self {
        AfPacketConfig {
            block_size: 256 << 10,
            block_count: 32,
            frame_size: SUPER_FRAME_SIZE,
            block_timeout_ms: 1,
            tx_frames: 256,
            tx_buffer: 1 << 20,
            vnet_hdr: true,
            fanout: None,
            rx: RxMode::Socket,
        }
    }
}

impl AfPacketConfig {
    /// The configuration without virtio-net headers (the behaviour before
    /// them): [`PLAIN_FRAME_SIZE`] frames, larger ones counted as truncated,
    /// partial checksums completed on receipt, TX batches of 256 frames in 512 KiB.
    pub fn plain() -> AfPacketConfig {
        AfPacketConfig {
            frame_size: PLAIN_FRAME_SIZE,
            tx_buffer: 256 * PLAIN_FRAME_SIZE,
            vnet_hdr: false,
            ..AfPacketConfig::default()
        }
    }

    fn validate(&self, name: &str) -> Result<(), IoError> {
        let bad = |reason: String| {
            Err(IoError::Config {
                kind: KIND,
                name: name.to_owned(),
                reason,
            })
        };
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        if self.block_size == 0 || self.block_size % page != 0 || u32::try_from(self.block_size).is_err() {
            return bad(format!(
                "block size {} is not a multiple of the page size {page}",
                self.block_size
            ));
        }
        if self.frame_size < MIN_FRAME_SIZE || self.frame_size % TPACKET_ALIGNMENT != 0 {
            return bad(format!(
                "frame size {} must be a multiple of {TPACKET_ALIGNMENT} and at least {MIN_FRAME_SIZE}",
                self.frame_size
            ));
        }
        if self.frame_size > self.block_size {
            return bad(format!(
                "frame size {} exceeds block size {}",
                self.frame_size, self.block_size
            ));
        }
        let frames = (self.block_size / self.frame_size).checked_mul(self.block_count);
        if self.block_count == 0 || frames.and_then(|f| u32::try_from(f).ok()).is_none() {
            return bad(format!("block count {} is out of range", self.block_count));
        }
        if self.block_size.checked_mul(self.block_count).is_none() {
            return bad("ring size overflows".to_owned());
        }
        if self.tx_frames == 0 || self.tx_frames > 1 << 16 {
            return bad(format!("tx frames {} is out of range", self.tx_frames));
        }
        if self.tx_buffer < self.frame_size + VNET_LEN || self.tx_buffer > 1 << 30 {
            return bad(format!(
                "tx buffer of {} bytes cannot hold a {}-byte frame and its header",
                self.tx_buffer, self.frame_size
            ));
        }
        if let Some(f) = self.fanout {
            if f.workers == 0 || f.workers > FANOUT_MAX {
                return bad(format!(
                    "fanout of {} workers: 1 to {FANOUT_MAX} are possible",
                    f.workers
                ));
            }
        }
        Ok(())
    }
}

/// An AF_PACKET port on one interface; see the module documentation.
pub struct AfPacket {
    fd: OwnedFd,
    name: String,
    ifindex: u32,
    /// The fanout group joined, if any.
    fanout_group: Option<u16>,
    ring: NonNull<u8>,
    ring_len: usize,
    block_size: usize,
    block_count: usize,
    frame_size: usize,
    /// Index of the block being read.
    block: usize,
    /// Packets of the current block already consumed.
    pkt: u32,
    /// Offset in the current block of the next packet.
    off: usize,
    /// Frames carry virtio-net headers.
    vnet: bool,
    /// Where a frame is rebuilt when a VLAN tag must be reinserted.
    scratch: Vec<u8>,
    /// Receiving from the socket's queue ([`RxMode::Socket`]); `None`: from the ring.
    queue: Option<Box<SocketRx>>,
    /// Turns frames into plain ones for `recv_batch` (taken out while in use).
    plain: PlainFrames,
    /// The transmit queue: each frame (after its header, with `vnet`) in turn.
    tx_buf: Vec<u8>,
    /// Capacity of `tx_buf`, which never grows past it.
    tx_cap: usize,
    /// Where each queued message starts in `tx_buf`, and its length there.
    tx_at: Vec<(usize, usize)>,
    /// Per queued message, the frame that follows its bytes in `tx_buf`
    /// when it was borrowed rather than copied ([`FramePort::send_frames`]:
    /// sent before that call returns; empty otherwise).
    tx_borrowed: Vec<(*const u8, usize)>,
    tx_lens: Vec<TxMsg>,
    tx_iov: Vec<libc::iovec>,
    tx_msgs: Vec<libc::mmsghdr>,
    stats: PortStats,
    /// PACKET_STATISTICS resets on every read, so the total is accumulated here.
    kernel_drops: Cell<u64>,
}

// SAFETY: `ring` points to a mapping owned exclusively by this value (unmapped in Drop), and
// the pointers in `tx_iov`/`tx_msgs` only ever point into `tx_buf`, owned by this value, and
// are rewritten before each use; those in `tx_borrowed` point into a caller's frames for the
// duration of one `send_frames` call, which sends them before it returns. Nothing is shared with another thread, so moving the value
// to another thread is sound.
unsafe impl Send for AfPacket {}

impl fmt::Debug for AfPacket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AfPacket")
            .field("name", &self.name)
            .field("ifindex", &self.ifindex)
            .field("fanout_group", &self.fanout_group)
            .field("fd", &self.fd.as_raw_fd())
            .finish_non_exhaustive()
    }
}

impl AfPacket {
    /// Open a promiscuous AF_PACKET port on interface `ifname` of the current network namespace.
    ///
    /// With `config.fanout` set, the port joins the interface's fanout group as its next
    /// member (see [`Fanout`]).
    pub fn open(ifname: &str, config: &AfPacketConfig) -> Result<AfPacket, IoError> {
        config.validate(ifname)?;
        let cname = sys::ifname(KIND, ifname)?;
        let os = |step: &'static str| {
            move |source: io::Error| IoError::Os {
                kind: KIND,
                name: ifname.to_owned(),
                step,
                source,
            }
        };
        // SAFETY: `cname` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(IoError::last_os(KIND, ifname, "if_nametoindex"));
        }
        // Protocol 0: the socket receives nothing until it is bound to the interface below,
        // so no frame of another interface can slip into the ring.
        // SAFETY: socket() has no memory-safety preconditions.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(IoError::last_os(KIND, ifname, "socket(AF_PACKET)"));
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let sfd = fd.as_fd();
        sys::setsockopt(sfd, libc::SOL_PACKET, libc::PACKET_VERSION, &TPACKET_V3)
            .map_err(os("setsockopt(PACKET_VERSION)"))?;
        let one: libc::c_int = 1;
        sys::setsockopt(sfd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &one)
            .map_err(os("setsockopt(PACKET_IGNORE_OUTGOING)"))?;
        if config.vnet_hdr {
            // Before the ring: the kernel refuses to change it once a ring exists (EBUSY).
            sys::setsockopt(sfd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, &one)
                .map_err(os("setsockopt(PACKET_VNET_HDR)"))?;
        }
        // Accept nothing until the socket is bound and in its fanout group (a bound socket
        // outside the group would get a copy of every frame besides the group's).
        attach_snap_filter(sfd, 0).map_err(os("setsockopt(SO_ATTACH_FILTER)"))?;
        let req = libc::tpacket_req3 {
            tp_block_size: config.block_size as u32,
            tp_block_nr: config.block_count as u32,
            tp_frame_size: config.frame_size as u32,
            tp_frame_nr: ((config.block_size / config.frame_size) * config.block_count) as u32,
            tp_retire_blk_tov: config.block_timeout_ms,
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        let (ring, ring_len, queue) = match config.rx {
            RxMode::Ring => {
                sys::setsockopt(sfd, libc::SOL_PACKET, libc::PACKET_RX_RING, &req)
                    .map_err(os("setsockopt(PACKET_RX_RING)"))?;
                let ring_len = config.block_size * config.block_count;
                // SAFETY: mapping a fresh region backed by the socket's ring; the kernel validates the
                // length against the ring it just allocated.
                let ring = unsafe {
                    libc::mmap(
                        ptr::null_mut(),
                        ring_len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED | libc::MAP_POPULATE,
                        fd.as_raw_fd(),
                        0,
                    )
                };
                if ring == libc::MAP_FAILED {
                    return Err(IoError::last_os(KIND, ifname, "mmap(rx ring)"));
                }
                let Some(ring) = NonNull::new(ring.cast::<u8>()) else {
                    return Err(IoError::last_os(KIND, ifname, "mmap(rx ring)"));
                };
                (ring, ring_len, None)
            }
            RxMode::Socket => {
                sys::setsockopt(sfd, libc::SOL_PACKET, libc::PACKET_AUXDATA, &one)
                    .map_err(os("setsockopt(PACKET_AUXDATA)"))?;
                let bytes = libc::c_int::try_from(config.block_size * config.block_count).unwrap_or(libc::c_int::MAX);
                if sys::setsockopt(sfd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &bytes).is_err() {
                    sys::setsockopt(sfd, libc::SOL_SOCKET, libc::SO_RCVBUF, &bytes)
                        .map_err(os("setsockopt(SO_RCVBUF)"))?;
                }
                let slot = (VNET_LEN + config.frame_size).next_multiple_of(64);
                (NonNull::dangling(), 0, Some(Box::new(SocketRx::new(slot))))
            }
        };
        let tx = config.tx_frames;
        let iov = libc::iovec {
            iov_base: ptr::null_mut(),
            iov_len: 0,
        };
        // SAFETY: mmsghdr is a plain C struct for which all-zero bytes are a valid (empty) value.
        let msg: libc::mmsghdr = unsafe { mem::zeroed() };
        // From here on the mapping is owned by `port`, whose Drop unmaps it on any error below.
        let mut port = AfPacket {
            fd,
            name: ifname.to_owned(),
            ifindex,
            fanout_group: None,
            ring,
            ring_len,
            block_size: config.block_size,
            block_count: config.block_count,
            frame_size: config.frame_size,
            block: 0,
            pkt: 0,
            off: 0,
            vnet: config.vnet_hdr,
            scratch: Vec::with_capacity(PLAIN_FRAME_SIZE * RX_BATCH),
            queue,
            plain: PlainFrames::default(),
            tx_buf: Vec::with_capacity(config.tx_buffer),
            tx_cap: config.tx_buffer,
            tx_at: Vec::with_capacity(tx),
            tx_borrowed: Vec::with_capacity(tx),
            tx_lens: Vec::with_capacity(tx),
            tx_iov: vec![iov; 2 * tx],
            tx_msgs: vec![msg; tx],
            stats: PortStats::default(),
            kernel_drops: Cell::new(0),
        };
        // SAFETY: sockaddr_ll is a plain C struct; all-zero is valid and the fields that matter are set below.
        let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex as libc::c_int;
        // SAFETY: `sll` is a valid sockaddr_ll and the length passed is its size.
        let r = unsafe {
            libc::bind(
                port.fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(IoError::last_os(KIND, ifname, "bind"));
        }
        let mreq = libc::packet_mreq {
            mr_ifindex: ifindex as libc::c_int,
            mr_type: libc::PACKET_MR_PROMISC as u16,
            mr_alen: 0,
            mr_address: [0; 8],
        };
        sys::setsockopt(port.fd.as_fd(), libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mreq)
            .map_err(os("setsockopt(PACKET_ADD_MEMBERSHIP)"))?;
        if let Some(fanout) = config.fanout {
            // Joining needs a bound socket; the program is the group's, set once joined.
            let group = fanout.group.unwrap_or(ifindex as u16);
            let type_flags = libc::PACKET_FANOUT_CBPF | libc::PACKET_FANOUT_FLAG_IGNORE_OUTGOING;
            let arg = libc::c_int::from(group) | (type_flags << 16) as libc::c_int;
            sys::setsockopt(port.fd.as_fd(), libc::SOL_PACKET, libc::PACKET_FANOUT, &arg)
                .map_err(os("setsockopt(PACKET_FANOUT)"))?;
            port.fanout_group = Some(group);
            let mut program = steer::fanout_program(fanout.workers);
            let prog = steer::fprog(&mut program);
            sys::setsockopt(port.fd.as_fd(), libc::SOL_PACKET, libc::PACKET_FANOUT_DATA, &prog)
                .map_err(os("setsockopt(PACKET_FANOUT_DATA)"))?;
        }
        // Snap every packet to the frame size in the kernel: an oversize frame then shows
        // tp_snaplen < tp_len (counted as truncated) and costs no more than a frame of copying.
        attach_snap_filter(port.fd.as_fd(), config.frame_size as u32).map_err(os("setsockopt(SO_ATTACH_FILTER)"))?;
        Ok(port)
    }

    /// The interface index the port is bound to.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The fanout group the port joined, if it was opened with [`AfPacketConfig::fanout`].
    pub fn fanout_group(&self) -> Option<u16> {
        self.fanout_group
    }

    /// The interface name the port was opened on.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The largest frame this port delivers or sends.
    pub fn frame_size(&self) -> usize {
        self.frame_size
    }

    fn block_ptr(&self, index: usize) -> *mut u8 {
        // SAFETY: `index < block_count`, so the offset stays inside the `ring_len`-byte mapping.
        unsafe { self.ring.as_ptr().add(index * self.block_size) }
    }

    /// The block's status word, shared with the kernel.
    fn block_status(&self, index: usize) -> &AtomicU32 {
        // SAFETY: blocks are page-aligned, so the status word at offset 8 is aligned for a u32
        // and lies inside the mapping, which lives as long as `self`. The kernel updates it
        // concurrently, hence the atomic view.
        unsafe { &*self.block_ptr(index).add(block::STATUS).cast::<AtomicU32>() }
    }

    /// Read a u32 of the current block at `at`, which the caller checked is inside the block.
    fn read_u32(&self, at: usize) -> u32 {
        // SAFETY: `at + 4 <= block_size` (checked by callers), so the read is inside the mapping;
        // the block belongs to user space while its status has TP_STATUS_USER.
        unsafe { ptr::read_unaligned(self.block_ptr(self.block).add(at).cast::<u32>()) }
    }

    fn read_u16(&self, at: usize) -> u16 {
        // SAFETY: as for `read_u32`, with `at + 2 <= block_size`.
        unsafe { ptr::read_unaligned(self.block_ptr(self.block).add(at).cast::<u16>()) }
    }

    /// Give the current block back to the kernel and move to the next.
    fn release_block(&mut self) {
        self.block_status(self.block)
            .store(libc::TP_STATUS_KERNEL, Ordering::Release);
        self.block = (self.block + 1) % self.block_count;
        self.pkt = 0;
        self.off = 0;
    }

    /// Prepare the packet at `self.off` of the current block for delivery:
    /// `Some(Some((span, offload)))` when it is to be delivered, `Some(None)`
    /// when it was counted and skipped, `None` when the block's layout is
    /// corrupt. See [`admit`] for what is done to the frame.
    fn take_one(&mut self, plain: bool) -> Option<Option<(Span, Offload)>> {
        let off = self.off;
        if off.checked_add(hdr::FIXED)? > self.block_size {
            return None;
        }
        let meta = RxMeta {
            snaplen: self.read_u32(off + hdr::SNAPLEN) as usize,
            len: self.read_u32(off + hdr::LEN) as usize,
            status: self.read_u32(off + hdr::STATUS),
            tci: self.read_u32(off + hdr::VLAN_TCI) as u16,
            tpid: self.read_u16(off + hdr::VLAN_TPID),
        };
        let mac = usize::from(self.read_u16(off + hdr::MAC));
        let start = off.checked_add(mac)?;
        if start.checked_add(meta.snaplen)? > self.block_size {
            return None;
        }
        let mut vnet = [0u8; VNET_LEN];
        if self.vnet {
            // The header sits right before the frame, after the fixed tpacket3 header.
            if mac < hdr::FIXED + VNET_LEN {
                return None;
            }
            // SAFETY: `off + mac - VNET_LEN .. off + mac` lies inside the block (checked
            // above: `off + FIXED <= block_size` and `mac >= FIXED + VNET_LEN`, and
            // `start <= block_size`); the block is owned by user space until released.
            unsafe {
                ptr::copy_nonoverlapping(
                    self.block_ptr(self.block).add(start - VNET_LEN),
                    vnet.as_mut_ptr(),
                    VNET_LEN,
                )
            };
        }
        // SAFETY: `start + snaplen <= block_size` was checked above, so the slice lies inside
        // the mapping; the block is owned by user space until `release_block`, and nothing
        // else references these bytes while the slice lives (spans of a batch never overlap).
        let frame = unsafe { std::slice::from_raw_parts_mut(self.block_ptr(self.block).add(start), meta.snaplen) };
        let rx = Admission {
            frame_size: self.frame_size,
            vnet: self.vnet.then_some(&vnet),
            plain,
        };
        Some(admit(
            &rx,
            &meta,
            frame,
            Span::Ring(start, meta.snaplen),
            &mut self.scratch,
            &mut self.stats,
        ))
    }

    /// The frame `span` names (in the current block or in `scratch`).
    fn frame(&self, span: Span) -> &[u8] {
        match span {
            // SAFETY: `take_one` made this span from a range it checked lies inside the
            // current block, which user space owns until `release_block` (which takes
            // `&mut self`, so not while this borrow lives).
            Span::Ring(at, len) => unsafe { std::slice::from_raw_parts(self.block_ptr(self.block).add(at), len) },
            Span::Scratch(at, len) => &self.scratch[at..at + len],
            Span::Queue(at, len) => match &self.queue {
                Some(q) => &q.buf[at..at + len],
                None => &[],
            },
        }
    }

    /// Walk the ring, taking up to `max` frames in batches of at most
    /// `RX_BATCH`, each from one block, and call `f` with each batch.
    fn walk(&mut self, max: usize, plain: bool, f: &mut dyn FnMut(&AfPacket, &[RxFrame<'_>])) -> usize {
        if self.queue.is_some() {
            return self.walk_queue(max, plain, f);
        }
        let mut delivered = 0;
        let mut spans = [(Span::Ring(0, 0), Offload::NONE); RX_BATCH];
        while delivered < max {
            if self.block_status(self.block).load(Ordering::Acquire) & libc::TP_STATUS_USER == 0 {
                break;
            }
            let num_pkts = self.read_u32(block::NUM_PKTS);
            if self.pkt == 0 {
                self.off = self.read_u32(block::FIRST_PKT) as usize;
            }
            let room = (max - delivered).min(RX_BATCH);
            let mut n = 0;
            self.scratch.clear();
            while self.pkt < num_pkts && n < room {
                match self.take_one(plain) {
                    Some(Some(taken)) => {
                        spans[n] = taken;
                        n += 1;
                    }
                    Some(None) => {}
                    // A header pointing outside its block: the rest of the block cannot be trusted.
                    None => {
                        self.pkt = num_pkts;
                        break;
                    }
                }
                self.pkt += 1;
                let next = self.read_u32(self.off + hdr::NEXT_OFFSET) as usize;
                self.off = self.off.saturating_add(next);
            }
            if n > 0 {
                let mut frames = [RxFrame {
                    bytes: &[],
                    offload: Offload::NONE,
                }; RX_BATCH];
                for (slot, &(span, offload)) in frames.iter_mut().zip(&spans[..n]) {
                    *slot = RxFrame {
                        bytes: self.frame(span),
                        offload,
                    };
                }
                f(self, &frames[..n]);
                delivered += n;
            }
            if self.pkt >= num_pkts {
                self.release_block();
            }
        }
        delivered
    }

    /// Receive up to `max` frames from the socket's queue ([`RxMode::Socket`]),
    /// up to `RX_BATCH` per `recvmmsg`, and call `f` with each batch.
    fn walk_queue(&mut self, max: usize, plain: bool, f: &mut dyn FnMut(&AfPacket, &[RxFrame<'_>])) -> usize {
        let mut delivered = 0;
        let mut seen = 0;
        let mut spans = [(Span::Queue(0, 0), Offload::NONE); RX_BATCH];
        while seen < max {
            let want = (max - seen).min(RX_BATCH);
            let mut n = 0;
            let got;
            {
                let AfPacket {
                    fd,
                    queue,
                    scratch,
                    stats,
                    vnet,
                    frame_size,
                    ..
                } = self;
                let Some(q) = queue.as_deref_mut() else {
                    return 0;
                };
                got = match q.receive(fd.as_fd(), want) {
                    Ok(got) => got,
                    Err(e) => {
                        // Nothing more; an error other than that is reported by the
                        // receive that got nothing (`empty_receive`).
                        if e.kind() != io::ErrorKind::WouldBlock {
                            q.error = Some(e);
                        }
                        break;
                    }
                };
                seen += got;
                scratch.clear();
                let head = if *vnet { VNET_LEN } else { 0 };
                for i in 0..got {
                    let (len, flags, meta) = q.message(i);
                    let at = i * q.slot;
                    // A message cut short by its slot (MSG_TRUNC), or without the kernel's
                    // description (PACKET_AUXDATA), is never delivered.
                    let meta = match meta {
                        Some(m) if flags & libc::MSG_TRUNC == 0 && len >= head && len - head == m.snaplen => m,
                        _ => {
                            stats.truncated += 1;
                            continue;
                        }
                    };
                    let mut header = [0u8; VNET_LEN];
                    header[..head].copy_from_slice(&q.buf[at..at + head]);
                    let rx = Admission {
                        frame_size: *frame_size,
                        vnet: vnet.then_some(&header),
                        plain,
                    };
                    let frame = &mut q.buf[at + head..at + len];
                    if let Some(taken) = admit(&rx, &meta, frame, Span::Queue(at + head, len - head), scratch, stats) {
                        spans[n] = taken;
                        n += 1;
                    }
                }
            }
            if n > 0 {
                let mut frames = [RxFrame {
                    bytes: &[],
                    offload: Offload::NONE,
                }; RX_BATCH];
                for (slot, &(span, offload)) in frames.iter_mut().zip(&spans[..n]) {
                    *slot = RxFrame {
                        bytes: self.frame(span),
                        offload,
                    };
                }
                f(self, &frames[..n]);
                delivered += n;
            }
            if got < want {
                break;
            }
        }
        delivered
    }

    /// After an empty receive, the socket's pending error, if any.
    ///
    /// The ring never reports errors; the socket does (ENETDOWN when the
    /// interface goes down, after which nothing arrives until it is up
    /// again). Reporting it once keeps a poll loop that sees POLLERR from
    /// spinning on empty receives.
    fn empty_receive(&mut self, delivered: usize) -> io::Result<usize> {
        // With the socket queue, `recvmmsg` took the error off the socket already.
        let taken = self.queue.as_deref_mut().and_then(|q| q.error.take());
        if delivered == 0
            && let Some(e) = taken.or_else(|| sys::take_socket_error(self.fd.as_fd()))
        {
            return Err(e);
        }
        Ok(delivered)
    }

    /// Make room in the transmit queue for a message of `len` bytes (flushing
    /// what is queued if needed); an error if it can never fit.
    fn tx_room(&mut self, len: usize) -> io::Result<()> {
        if len > self.tx_cap {
            self.stats.tx_errors += 1;
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{KIND} on {}: {len} bytes exceed the transmit buffer of {}",
                    self.name, self.tx_cap
                ),
            ));
        }
        if self.tx_lens.len() == self.tx_msgs.len() || self.tx_buf.len() + len > self.tx_cap {
            self.flush()?;
        }
        Ok(())
    }

    fn too_long(&mut self, len: usize) -> io::Error {
        self.stats.tx_errors += 1;
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{KIND} on {}: frame of {len} bytes exceeds the frame size {}",
                self.name, self.frame_size
            ),
        )
    }

    fn bad_offload(&mut self, what: String) -> io::Error {
        self.stats.offload_errors += 1;
        io::Error::new(io::ErrorKind::InvalidInput, format!("{KIND} on {}: {what}", self.name))
    }

    /// Queue `frame` behind its virtio-net header, as one message; with
    /// `borrow`, only the header is copied and the message points at `frame`
    /// (the caller sends the queue before `frame` goes away).
    fn queue_with_header(&mut self, frame: &[u8], offload: &Offload, borrow: bool) -> io::Result<()> {
        if frame.len() > self.frame_size {
            return Err(self.too_long(frame.len()));
        }
        let mut header = [0u8; VNET_LEN];
        offload.to_repr().emit(&mut Header::new_unchecked(&mut header[..]));
        // What the kernel would refuse (EINVAL) is refused here, with the reason,
        // before it can cost the rest of a batch.
        if let Err(e) = VirtioNetRepr::parse(&Header::new_unchecked(&header[..]), frame.len()) {
            return Err(self.bad_offload(format!("offload state does not fit a {}-byte frame: {e}", frame.len())));
        }
        // Room first: making it may flush the queue, and with it `tx_buf`.
        self.tx_room(VNET_LEN + if borrow { 0 } else { frame.len() })?;
        let at = self.tx_buf.len();
        if borrow {
            self.tx_buf.extend_from_slice(&header);
            self.tx_at.push((at, VNET_LEN));
            self.tx_borrowed.push((frame.as_ptr(), frame.len()));
        } else {
            self.tx_buf.extend_from_slice(&header);
            self.tx_buf.extend_from_slice(frame);
            self.tx_at.push((at, VNET_LEN + frame.len()));
            self.tx_borrowed.push((ptr::null(), 0));
        }
        self.tx_lens.push(TxMsg {
            bytes: frame.len(),
            frames: 1,
            super_frame: offload.gso.is_some(),
        });
        Ok(())
    }

    /// Without headers: cut a super-frame into packets in the transmit queue.
    fn queue_segmented(&mut self, frame: &[u8], offload: &Offload) -> io::Result<()> {
        let layout = gso::layout(frame, offload).map_err(|e| self.bad_offload(format!("cannot segment: {e}")))?;
        let packet = layout.header_len + layout.segment_size;
        if packet.min(frame.len()) > self.frame_size {
            return Err(self.too_long(packet));
        }
        let needed = layout.segments() * layout.header_len + layout.payload_len;
        self.tx_room(needed)?;
        if self.tx_lens.len() + layout.segments() > self.tx_msgs.len() {
            // More packets than message slots: grow them once (a small segment size).
            let iov = libc::iovec {
                iov_base: ptr::null_mut(),
                iov_len: 0,
            };
            let n = self.tx_lens.len() + layout.segments();
            self.tx_iov.resize(2 * n, iov);
            // SAFETY: mmsghdr is a plain C struct for which all-zero bytes are a valid value.
            self.tx_msgs.resize(n, unsafe { mem::zeroed() });
        }
        let room = self.tx_cap - self.tx_buf.len();
        let segs = gso::segment(frame, offload, &[], &mut self.tx_buf, room)
            .map_err(|e| self.bad_offload(format!("cannot segment: {e}")))?;
        let mut at = segs.start;
        for k in 0..segs.count {
            let len = if k + 1 == segs.count {
                segs.last_len
            } else {
                segs.stride
            };
            self.tx_at.push((at, len));
            self.tx_borrowed.push((ptr::null(), 0));
            self.tx_lens.push(TxMsg {
                bytes: len,
                frames: 1,
                super_frame: false,
            });
            at += len;
        }
        self.stats.sw_segmented += 1;
        Ok(())
    }
}

/// Where a frame taken from the ring lies: (offset, length) in the current
/// block, or in the port's scratch buffer (a frame rebuilt with its VLAN tag).
#[derive(Clone, Copy)]
enum Span {
    Ring(usize, usize),
    Scratch(usize, usize),
    /// In the socket receive buffer ([`SocketRx::buf`]).
    Queue(usize, usize),
}

/// What the kernel says of one received frame: from its ring slot's header,
/// or from `PACKET_AUXDATA` (`struct tpacket_auxdata`) with the socket queue.
#[derive(Debug, Clone, Copy)]
struct RxMeta {
    /// `TP_STATUS_*` flags.
    status: u32,
    /// The frame's length on the wire.
    len: usize,
    /// The bytes delivered (less than `len`: snapped).
    snaplen: usize,
    /// The VLAN tag the kernel took out of the frame (with `TP_STATUS_VLAN_VALID`).
    tci: u16,
    /// Its TPID (with `TP_STATUS_VLAN_TPID_VALID`).
    tpid: u16,
}

/// How a port takes frames in.
struct Admission<'a> {
    frame_size: usize,
    /// The frame's virtio-net header, when the port has them.
    vnet: Option<&'a [u8; VNET_LEN]>,
    /// For a plain receiver: complete partial checksums.
    plain: bool,
}

/// Take one received frame in: `Some((span, offload))` to deliver it (at
/// `direct`, or rebuilt at the end of `scratch` when a VLAN tag the kernel
/// took out must be put back), `None` when it was counted and skipped (cut
/// short, or with an offload header that does not fit it). Without virtio-net
/// headers, or for a plain receiver, a partial checksum is completed in place.
fn admit(
    rx: &Admission<'_>,
    meta: &RxMeta,
    frame: &mut [u8],
    direct: Span,
    scratch: &mut Vec<u8>,
    stats: &mut PortStats,
) -> Option<(Span, Offload)> {
    let (status, len, snaplen) = (meta.status, meta.len, meta.snaplen);
    let vlan = status & libc::TP_STATUS_VLAN_VALID != 0 && snaplen >= MAC_PAIR_LEN;
    // The reinserted tag counts: the frame must still fit a frame when forwarded.
    let wire_len = if vlan { len + 4 } else { len };
    if snaplen < len || wire_len > rx.frame_size || frame.len() != snaplen {
        stats.truncated += 1;
        return None;
    }
    let mut offload = match rx.vnet {
        Some(bytes) => match VirtioNetRepr::parse(&Header::new_unchecked(&bytes[..]), snaplen) {
            Ok(r) => Offload::from(r),
            Err(_) => {
                stats.offload_errors += 1;
                return None;
            }
        },
        None => Offload {
            csum_valid: status & libc::TP_STATUS_CSUM_VALID != 0,
            ..Offload::NONE
        },
    };
    if vlan {
        match offload.shifted(MAC_PAIR_LEN as u16, 4) {
            Some(o) => offload = o,
            None => {
                stats.offload_errors += 1;
                return None;
            }
        }
    }
    let tpid = if status & libc::TP_STATUS_VLAN_TPID_VALID != 0 {
        meta.tpid
    } else {
        ETH_P_8021Q
    };
    let (span, out): (Span, &mut [u8]) = if vlan {
        // The kernel moved the tag into metadata (VLAN acceleration); a switch must forward
        // the frame as the sender wrote it.
        let at = scratch.len();
        scratch.extend_from_slice(&frame[..MAC_PAIR_LEN]);
        scratch.extend_from_slice(&tpid.to_be_bytes());
        scratch.extend_from_slice(&meta.tci.to_be_bytes());
        scratch.extend_from_slice(&frame[MAC_PAIR_LEN..]);
        (Span::Scratch(at, wire_len), &mut scratch[at..])
    } else {
        (direct, frame)
    };
    // Without headers the partial checksum cannot be handed on (its start is not
    // known): complete it as before. With them, only for a plain receiver.
    let partial = if rx.vnet.is_some() {
        rx.plain && offload.csum.is_some() && offload.gso.is_none()
    } else {
        status & libc::TP_STATUS_CSUMNOTREADY != 0
    };
    if partial && complete_checksum(out).is_ok() {
        stats.csum_completed += 1;
        offload.csum = None;
    }
    stats.rx_frames += 1;
    stats.rx_bytes += out.len() as u64;
    stats.rx_super_frames += u64::from(offload.gso.is_some());
    Some((span, offload))
}

/// Control-message room per message for `PACKET_AUXDATA`: CMSG_SPACE(20) is 40; kept 8-aligned.
const AUX_CONTROL_LEN: usize = 64;

/// An 8-aligned control-message buffer.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct AuxControl([u8; AUX_CONTROL_LEN]);

/// The buffers of [`RxMode::Socket`]: `RX_BATCH` message slots of `slot`
/// bytes each (a virtio-net header and a frame), their control messages and
/// `recvmmsg` headers.
struct SocketRx {
    buf: Vec<u8>,
    /// An error `recvmmsg` took off the socket, for the caller of the receive.
    error: Option<io::Error>,
    slot: usize,
    iov: Vec<libc::iovec>,
    ctrl: Vec<AuxControl>,
    msgs: Vec<libc::mmsghdr>,
}

impl SocketRx {
    fn new(slot: usize) -> SocketRx {
        let iov = libc::iovec {
            iov_base: ptr::null_mut(),
            iov_len: 0,
        };
        SocketRx {
            // Zeroed pages are mapped lazily: a slot costs memory once a frame that long arrives.
            buf: vec![0; slot * RX_BATCH],
            error: None,
            slot,
            iov: vec![iov; RX_BATCH],
            ctrl: vec![AuxControl([0; AUX_CONTROL_LEN]); RX_BATCH],
            // SAFETY: mmsghdr is a plain C struct for which all-zero bytes are a valid (empty) value.
            msgs: vec![unsafe { mem::zeroed() }; RX_BATCH],
        }
    }

    /// Receive up to `want` (at most `RX_BATCH`) messages without blocking;
    /// the number received, or the error (WouldBlock when there was none).
    fn receive(&mut self, fd: BorrowedFd<'_>, want: usize) -> io::Result<usize> {
        let want = want.min(RX_BATCH);
        let base = self.buf.as_mut_ptr();
        for i in 0..want {
            self.iov[i] = libc::iovec {
                // SAFETY: slot `i < RX_BATCH` starts inside `buf` (RX_BATCH * slot bytes).
                iov_base: unsafe { base.add(i * self.slot) }.cast(),
                iov_len: self.slot,
            };
            let h = &mut self.msgs[i].msg_hdr;
            h.msg_name = ptr::null_mut();
            h.msg_namelen = 0;
            h.msg_iov = &mut self.iov[i];
            h.msg_iovlen = 1;
            h.msg_control = self.ctrl[i].0.as_mut_ptr().cast();
            h.msg_controllen = AUX_CONTROL_LEN as _;
            h.msg_flags = 0;
        }
        loop {
            // SAFETY: the first `want` headers point at live slots, iovecs and control
            // buffers owned by `self`, each of the length it states; the timeout may be null.
            let r = unsafe {
                libc::recvmmsg(
                    fd.as_raw_fd(),
                    self.msgs.as_mut_ptr(),
                    want as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    ptr::null_mut(),
                )
            };
            if r >= 0 {
                return Ok(r as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Message `i` of the last receive: its length in its slot, its flags and
    /// the kernel's description of the frame (`None`: no `PACKET_AUXDATA`).
    fn message(&self, i: usize) -> (usize, libc::c_int, Option<RxMeta>) {
        let m = &self.msgs[i];
        let len = (m.msg_len as usize).min(self.slot);
        (len, m.msg_hdr.msg_flags, auxdata(&m.msg_hdr))
    }
}

/// The `PACKET_AUXDATA` control message of a received message, if any.
fn auxdata(h: &libc::msghdr) -> Option<RxMeta> {
    let need = mem::size_of::<libc::tpacket_auxdata>();
    // SAFETY: `h` is a header the kernel filled by recvmmsg: msg_control/msg_controllen
    // describe our control buffer holding well-formed control messages (at most
    // `msg_controllen` bytes, which the kernel never raises past what was given);
    // CMSG_FIRSTHDR/CMSG_NXTHDR stay inside it and the read is bounds-checked by cmsg_len.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_PACKET
                && (*c).cmsg_type == libc::PACKET_AUXDATA
                && (*c).cmsg_len as usize >= libc::CMSG_LEN(need as u32) as usize
            {
                let a = ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::tpacket_auxdata>());
                return Some(RxMeta {
                    status: a.tp_status,
                    len: a.tp_len as usize,
                    snaplen: a.tp_snaplen as usize,
                    tci: a.tp_vlan_tci,
                    tpid: a.tp_vlan_tpid,
                });
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

impl FramePort for AfPacket {
    /// Frames straight from the ring: a batch is the frames of one block (at most
    /// 64), valid until the block goes back to the kernel after `f` returns.
    fn recv_frames(&mut self, max: usize, f: &mut dyn FnMut(&[RxFrame<'_>])) -> io::Result<usize> {
        let delivered = self.walk(max, false, &mut |_, frames| f(frames));
        self.empty_receive(delivered)
    }

    /// Plain frames: those that need no work straight from the ring, the others
    /// completed in place or cut up in a scratch buffer ([`PlainFrames`]).
    fn recv_batch(&mut self, max: usize, f: &mut dyn FnMut(&[&[u8]])) -> io::Result<usize> {
        let mut plain = mem::take(&mut self.plain);
        let mut stats = PortStats::default();
        let mut handed = 0;
        let taken = self.walk(max, true, &mut |_, frames| {
            handed += plain.deliver(frames, &mut stats, f);
        });
        self.plain = plain;
        self.stats.sw_segmented += stats.sw_segmented;
        self.stats.offload_errors += stats.offload_errors;
        self.stats.csum_completed += stats.csum_completed;
        self.empty_receive(taken).map(|_| handed)
    }

    /// Queue `frame`; when the queue is full, flush it first (on an error from that
    /// flush, `frame` is not queued). A frame longer than the frame size is an error.
    fn send_frame(&mut self, frame: &[u8], offload: &Offload) -> io::Result<()> {
        if self.vnet {
            return self.queue_with_header(frame, offload, false);
        }
        if offload.gso.is_some() {
            return self.queue_segmented(frame, offload);
        }
        if frame.len() > self.frame_size {
            return Err(self.too_long(frame.len()));
        }
        self.tx_room(frame.len())?;
        let at = self.tx_buf.len();
        self.tx_buf.extend_from_slice(frame);
        if offload.csum.is_some() {
            if complete_checksum(&mut self.tx_buf[at..]).is_ok() {
                self.stats.csum_completed += 1;
            } else {
                // Sent as it is: the receiver drops what it cannot verify, as it would have.
                self.stats.offload_errors += 1;
            }
        }
        self.tx_at.push((at, frame.len()));
        self.tx_borrowed.push((ptr::null(), 0));
        self.tx_lens.push(TxMsg {
            bytes: frame.len(),
            frames: 1,
            super_frame: false,
        });
        Ok(())
    }

    /// With virtio-net headers, each frame is sent from where it lies: only
    /// its header is written here, and the message gathers header and frame
    /// (the kernel copies the frame once, into its buffer). Without, as
    /// [`FramePort::send_frame`] does. Everything is sent before this returns.
    fn send_frames<'a>(&mut self, frames: &mut dyn Iterator<Item = (&'a [u8], &'a Offload)>) -> io::Result<()> {
        let mut first_err = None;
        for (frame, offload) in frames {
            let r = if self.vnet {
                self.queue_with_header(frame, offload, true)
            } else {
                self.send_frame(frame, offload)
            };
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        // Always sent here: no borrowed frame may outlive this call.
        let r = self.flush();
        debug_assert!(self.tx_borrowed.is_empty());
        first_err.map_or(r, Err)
    }

    fn flush(&mut self) -> io::Result<()> {
        let n = self.tx_lens.len();
        if n == 0 {
            return Ok(());
        }
        let base = self.tx_buf.as_mut_ptr();
        for i in 0..n {
            let (at, len) = self.tx_at[i];
            let (borrowed, borrowed_len) = self.tx_borrowed[i];
            self.tx_iov[2 * i] = libc::iovec {
                // SAFETY: every queued message lies inside `tx_buf`'s initialised bytes.
                iov_base: unsafe { base.add(at) }.cast(),
                iov_len: len,
            };
            // The kernel only reads a sent message's bytes.
            self.tx_iov[2 * i + 1] = libc::iovec {
                iov_base: borrowed.cast_mut().cast(),
                iov_len: borrowed_len,
            };
            let h = &mut self.tx_msgs[i].msg_hdr;
            // The socket is bound to the interface, so no destination address is needed.
            h.msg_name = ptr::null_mut();
            h.msg_namelen = 0;
            h.msg_iov = &mut self.tx_iov[2 * i];
            h.msg_iovlen = if borrowed_len > 0 { 2 } else { 1 };
        }
        let r = sys::send_batch(self.fd.as_fd(), &mut self.tx_msgs, &self.tx_lens, &mut self.stats);
        self.tx_lens.clear();
        self.tx_at.clear();
        self.tx_borrowed.clear();
        self.tx_buf.clear();
        r
    }

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn offloads(&self) -> PortOffloads {
        PortOffloads {
            rx: self.vnet,
            tx: self.vnet,
        }
    }

    fn stats(&self) -> PortStats {
        // SAFETY: tpacket_stats_v3 is a plain C struct; all-zero is a valid value.
        let mut st: libc::tpacket_stats_v3 = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libc::tpacket_stats_v3>() as libc::socklen_t;
        // SAFETY: `st` and `len` are valid for writes and `len` holds the size of `st`.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut st as *mut libc::tpacket_stats_v3).cast(),
                &mut len,
            )
        };
        if r == 0 {
            self.kernel_drops.set(self.kernel_drops.get() + u64::from(st.tp_drops));
        }
        PortStats {
            kernel_drops: self.kernel_drops.get(),
            ..self.stats
        }
    }
}

/// Replace the socket filter with one that accepts every packet snapped to `snap` bytes (0: none).
fn attach_snap_filter(fd: BorrowedFd<'_>, snap: u32) -> io::Result<()> {
    let mut filter = [libc::sock_filter {
        code: BPF_RET_K,
        jt: 0,
        jf: 0,
        k: snap,
    }];
    let prog = steer::fprog(&mut filter);
    sys::setsockopt(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog)
}

impl Drop for AfPacket {
    fn drop(&mut self) {
        if self.ring_len > 0 {
            // SAFETY: `ring` and `ring_len` describe the mapping made in `open`, which nothing
            // references any more; the descriptor is closed afterwards by OwnedFd.
            unsafe { libc::munmap(self.ring.as_ptr().cast(), self.ring_len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A control buffer holding one message of `level`/`kind` with `aux` as its data.
    fn aux_control(level: libc::c_int, kind: libc::c_int, aux: &libc::tpacket_auxdata) -> (AuxControl, usize) {
        let mut ctrl = AuxControl([0; AUX_CONTROL_LEN]);
        let size = mem::size_of::<libc::tpacket_auxdata>() as u32;
        // SAFETY: msghdr is plain data; all-zero is valid.
        let mut h: libc::msghdr = unsafe { mem::zeroed() };
        h.msg_control = ctrl.0.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(size) } as usize;
        assert!(space <= AUX_CONTROL_LEN);
        h.msg_controllen = space as _;
        // SAFETY: the buffer is 8-aligned and holds one message with the auxdata.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&h);
            (*c).cmsg_level = level;
            (*c).cmsg_type = kind;
            (*c).cmsg_len = libc::CMSG_LEN(size) as _;
            ptr::write_unaligned(CMSG_DATA_MUT(c), *aux);
        }
        (ctrl, space)
    }

    #[allow(non_snake_case)]
    unsafe fn CMSG_DATA_MUT(c: *mut libc::cmsghdr) -> *mut libc::tpacket_auxdata {
        // SAFETY: the caller's `c` is a control message header inside its buffer.
        unsafe { libc::CMSG_DATA(c).cast() }
    }

    #[test]
    fn auxdata_is_read_from_its_control_message_only() {
        let aux = libc::tpacket_auxdata {
            tp_status: libc::TP_STATUS_VLAN_VALID | libc::TP_STATUS_CSUMNOTREADY,
            tp_len: 1514,
            tp_snaplen: 1500,
            tp_mac: 0,
            tp_net: 14,
            tp_vlan_tci: 0x2064,
            tp_vlan_tpid: 0x88a8,
        };
        let cases = [
            ("PACKET_AUXDATA", libc::SOL_PACKET, libc::PACKET_AUXDATA, true),
            ("another type", libc::SOL_PACKET, libc::PACKET_ORIGDEV, false),
            ("another level", libc::SOL_SOCKET, libc::PACKET_AUXDATA, false),
        ];
        for (what, level, kind, found) in cases {
            let (mut ctrl, space) = aux_control(level, kind, &aux);
            // SAFETY: msghdr is plain data; all-zero is valid.
            let mut h: libc::msghdr = unsafe { mem::zeroed() };
            h.msg_control = ctrl.0.as_mut_ptr().cast();
            h.msg_controllen = space as _;
            let meta = auxdata(&h);
            assert_eq!(meta.is_some(), found, "{what}");
            if let Some(m) = meta {
                assert_eq!(
                    (m.status, m.len, m.snaplen, m.tci, m.tpid),
                    (aux.tp_status, 1514, 1500, 0x2064, 0x88a8),
                    "{what}"
                );
            }
            // Fewer bytes than a header: nothing is read.
            h.msg_controllen = 4;
            assert!(auxdata(&h).is_none(), "{what}, cut");
        }
        // SAFETY: msghdr is plain data; all-zero is valid.
        let h: libc::msghdr = unsafe { mem::zeroed() };
        assert!(auxdata(&h).is_none(), "no control buffer");
    }

    /// A 60-byte frame: Ethernet (IPv4), then bytes.
    fn frame60() -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[..12].copy_from_slice(&[2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2]);
        f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        f
    }

    #[test]
    fn admission_is_the_same_for_ring_and_queue() {
        let meta = |status: u32, len: usize, snaplen: usize| RxMeta {
            status,
            len,
            snaplen,
            tci: 0x0064,
            tpid: 0,
        };
        let bad_vnet = {
            // NEEDS_CSUM with a checksum start past the frame: refused.
            let mut h = [0u8; VNET_LEN];
            h[0] = 1;
            h[6..8].copy_from_slice(&500u16.to_le_bytes());
            h[8..10].copy_from_slice(&6u16.to_le_bytes());
            h
        };
        let none = [0u8; VNET_LEN];
        // (what, metadata, frame size, header, delivered length, truncated, offload errors)
        type Case<'a> = (
            &'a str,
            RxMeta,
            usize,
            Option<&'a [u8; VNET_LEN]>,
            Option<usize>,
            u64,
            u64,
        );
        let cases: [Case<'_>; 6] = [
            ("plain", meta(0, 60, 60), 2048, None, Some(60), 0, 0),
            (
                "tag put back",
                meta(libc::TP_STATUS_VLAN_VALID, 60, 60),
                2048,
                None,
                Some(64),
                0,
                0,
            ),
            ("snapped", meta(0, 3000, 60), 2048, None, None, 1, 0),
            (
                "tag makes it too long",
                meta(libc::TP_STATUS_VLAN_VALID, 60, 60),
                62,
                None,
                None,
                1,
                0,
            ),
            (
                "with a plain header",
                meta(0, 60, 60),
                2048,
                Some(&none),
                Some(60),
                0,
                0,
            ),
            (
                "header that does not fit",
                meta(0, 60, 60),
                2048,
                Some(&bad_vnet),
                None,
                0,
                1,
            ),
        ];
        for (what, m, frame_size, vnet, want, truncated, offload_errors) in cases {
            let mut f = frame60();
            let mut scratch = Vec::new();
            let mut stats = PortStats::default();
            let rx = Admission {
                frame_size,
                vnet,
                plain: false,
            };
            let got = admit(&rx, &m, &mut f, Span::Queue(10, 60), &mut scratch, &mut stats);
            let len = got.map(|(span, _)| match span {
                Span::Queue(at, len) => {
                    assert_eq!(at, 10, "{what}");
                    len
                }
                Span::Scratch(at, len) => {
                    let tagged = &scratch[at..at + len];
                    assert_eq!(&tagged[12..16], &[0x81, 0x00, 0x00, 0x64], "{what}");
                    assert_eq!(&tagged[16..], &frame60()[12..], "{what}");
                    len
                }
                Span::Ring(..) => panic!("{what}: a span of the ring"),
            });
            assert_eq!(len, want, "{what}");
            assert_eq!(
                (stats.truncated, stats.offload_errors),
                (truncated, offload_errors),
                "{what}"
            );
            assert_eq!(stats.rx_frames, u64::from(want.is_some()), "{what}");
        }
    }

    #[test]
    fn config_errors_name_the_interface() {
        let cases = [
            AfPacketConfig {
                block_size: 1000,
                ..AfPacketConfig::default()
            },
            AfPacketConfig {
                frame_size: 100,
                ..AfPacketConfig::default()
            },
            AfPacketConfig {
                frame_size: 2050,
                ..AfPacketConfig::default()
            },
            AfPacketConfig {
                block_count: 0,
                ..AfPacketConfig::default()
            },
            AfPacketConfig {
                tx_frames: 0,
                ..AfPacketConfig::default()
            },
            AfPacketConfig {
                block_size: 4096,
                frame_size: 8192,
                ..AfPacketConfig::default()
            },
            AfPacketConfig {
                fanout: Some(Fanout {
                    workers: 0,
                    group: None,
                }),
                ..AfPacketConfig::default()
            },
            AfPacketConfig {
                fanout: Some(Fanout {
                    workers: 257,
                    group: Some(7),
                }),
                ..AfPacketConfig::default()
            },
        ];
        for c in cases {
            let e = AfPacket::open("vn-web-1", &c).unwrap_err();
            assert!(matches!(e, IoError::Config { .. }), "{c:?}: {e}");
            assert!(e.to_string().starts_with("AF_PACKET on vn-web-1: "), "{e}");
        }
        assert!(AfPacketConfig::default().validate("x").is_ok());
    }

    #[test]
    fn missing_interface_is_a_named_os_error() {
        let e = AfPacket::open("io-nosuchif", &AfPacketConfig::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "AF_PACKET on io-nosuchif: if_nametoindex: No such device (os error 19)"
        );
        let e = AfPacket::open("a-name-that-is-too-long", &AfPacketConfig::default()).unwrap_err();
        assert!(matches!(e, IoError::Config { .. }), "{e}");
    }
}

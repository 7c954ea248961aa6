//! The interface every live packet port implements, and a way to wait on several.
//!
//! The agent owns a handful of ports (one per vNIC, AF_PACKET or TAP) and
//! drives them from one loop: wait until some are readable
//! ([`wait_readable`]), drain each, queue the forwarded frames and push them
//! out with one [`FramePort::flush`] per port per batch. Ports never block:
//! a receive returns 0 when nothing is ready. The trait is object-safe so
//! ports of different kinds sit in one `Vec<Box<dyn FramePort>>`.
//!
//! Frames carry their offload state ([`Offload`], from the virtio-net header
//! of a port that reads them: AF_PACKET with `PACKET_VNET_HDR`, a TAP with
//! `IFF_VNET_HDR`). Two ways to use a port:
//! - **With offloads**: [`FramePort::recv_frames`] hands over [`RxFrame`]s
//!   as they came: a TSO/GSO super-frame whole (up to 64 KiB, one frame),
//!   a partial checksum left partial. [`FramePort::send_frame`] takes a frame
//!   with its offload state; a port whose kernel side takes offloads
//!   ([`PortOffloads::tx`]) passes it on (the kernel segments where the
//!   destination needs it), any other port segments and completes it in
//!   software ([`crate::gso`], [`crate::csum`]).
//! - **Plain** (what the agent does today): [`FramePort::recv_batch`] and
//!   [`FramePort::recv`] hand over only frames that are final on the wire:
//!   partial checksums completed, super-frames cut into their packets
//!   ([`PlainFrames`]); [`FramePort::send`] sends a plain frame.
//!
//! A batch from AF_PACKET's ring is handed over without copying either way;
//! the plain path copies only the frames it must complete in a scratch
//! buffer (a rebuilt VLAN tag) or cut up.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

pub use palisade_wire::virtio_net::Offload;

use crate::csum::complete_checksum;
use crate::gso;

/// A received frame and its offload state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxFrame<'a> {
    /// The Ethernet frame (no virtio-net header).
    pub bytes: &'a [u8],
    /// What its virtio-net header said ([`Offload::NONE`] on a port without one).
    pub offload: Offload,
}

/// The frame's bytes: a batch of received frames is a batch of frames for
/// whatever takes `AsRef<[u8]>` (the engine's batch processing).
impl AsRef<[u8]> for RxFrame<'_> {
    fn as_ref(&self) -> &[u8] {
        self.bytes
    }
}

/// What a port carries as it is, without work in user space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PortOffloads {
    /// Received frames may be super-frames or carry partial checksums: the
    /// port reads virtio-net headers.
    pub rx: bool,
    /// Frames sent with an offload state reach the kernel with it (super-frames
    /// whole, checksums partial); without, the port segments super-frames and
    /// completes checksums in software before sending.
    pub tx: bool,
}

/// A bidirectional Ethernet frame port (an AF_PACKET socket, a TAP device).
pub trait FramePort: Send {
    /// Receive up to `max` frames without blocking, with their offload state,
    /// handed to `f` several at a time: each call gets a non-empty batch in
    /// arrival order, valid for that call. Returns how many frames were
    /// handed over (0 when none was ready).
    ///
    /// A super-frame is one frame here. A port that reads frames straight
    /// from shared memory (AF_PACKET's ring) hands them over without copying.
    fn recv_frames(&mut self, max: usize, f: &mut dyn FnMut(&[RxFrame<'_>])) -> io::Result<usize>;

    /// Queue one frame (copied) with its offload state for transmission; may
    /// transmit at once. A port without [`PortOffloads::tx`] segments a
    /// super-frame and completes a partial checksum first. An offload state
    /// that does not fit the frame (a checksum field past its end, a
    /// super-frame that cannot be segmented) is an error, counted in
    /// [`PortStats::offload_errors`], and nothing is queued.
    fn send_frame(&mut self, frame: &[u8], offload: &Offload) -> io::Result<()>;

    /// Transmit everything queued (one syscall per batch where the kernel allows).
    fn flush(&mut self) -> io::Result<()>;

    /// Queue `frames` as [`FramePort::send_frame`] does and transmit them with
    /// everything queued before them, before returning; the first error is
    /// returned after all were tried. A port may send the frames from where
    /// they lie instead of copying them, as they are borrowed for this call
    /// only (AF_PACKET with virtio-net headers does).
    fn send_frames<'a>(&mut self, frames: &mut dyn Iterator<Item = (&'a [u8], &'a Offload)>) -> io::Result<()> {
        let mut first_err = None;
        for (frame, offload) in frames {
            if let Err(e) = self.send_frame(frame, offload) {
                first_err.get_or_insert(e);
            }
        }
        let r = self.flush();
        first_err.map_or(r, Err)
    }

    /// The file descriptor to poll for readability.
    fn fd(&self) -> RawFd;

    /// Counters (see [`PortStats`]).
    fn stats(&self) -> PortStats;

    /// What the port carries without work in user space (nothing, unless it
    /// reads and writes virtio-net headers).
    fn offloads(&self) -> PortOffloads {
        PortOffloads::default()
    }

    /// Receive as [`FramePort::recv_batch`] does, calling `f` with each frame.
    fn recv(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> io::Result<usize> {
        self.recv_batch(max, &mut |frames| {
            for frame in frames {
                f(frame);
            }
        })
    }

    /// Receive up to `max` frames without blocking and hand them to `f` as
    /// plain frames, several at a time: partial checksums completed, each
    /// super-frame cut into its packets (so more frames than `max` may be
    /// handed over). Each call of `f` gets a non-empty batch in arrival
    /// order, valid for that call. Returns how many frames were handed over.
    ///
    /// A batch lets the caller work on several frames together (the
    /// datapath engine's `process_batch` prefetches the memory of their
    /// flows ahead). This default goes through [`FramePort::recv_frames`] and
    /// a [`PlainFrames`] made for the call; ports override it to keep one
    /// and to count its work in their [`PortStats`].
    fn recv_batch(&mut self, max: usize, f: &mut dyn FnMut(&[&[u8]])) -> io::Result<usize> {
        let mut plain = PlainFrames::default();
        let mut stats = PortStats::default();
        let mut delivered = 0;
        self.recv_frames(max, &mut |frames| {
            delivered += plain.deliver(frames, &mut stats, f);
        })?;
        Ok(delivered)
    }

    /// Queue one plain frame (complete checksum, not a super-frame):
    /// [`FramePort::send_frame`] with [`Offload::NONE`].
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.send_frame(frame, &Offload::NONE)
    }
}

/// Most frames in one batch handed over by [`PlainFrames::deliver`].
pub const PLAIN_BATCH: usize = 64;

/// Most bytes the packets of one super-frame may take when cut up (64 KiB of
/// payload in 1-byte segments behind 64 KiB of headers is the worst case a
/// header allows; real ones are a few percent over the payload).
const MAX_SEGMENTED: usize = 1 << 20;

/// Turns frames with offload state into plain frames, for callers that
/// cannot take super-frames or partial checksums.
///
/// Frames already plain are handed over as they are (borrowed, not copied).
/// A frame with a partial checksum is copied into a scratch buffer and
/// completed ([`complete_checksum`]: parsed, so Ethernet padding is left out
/// and only TCP and UDP are touched). A super-frame is cut into its packets
/// there ([`gso::segment`]). A super-frame that cannot be cut is dropped
/// and counted in [`PortStats::offload_errors`]. The buffers are kept
/// between calls.
#[derive(Debug, Default)]
pub struct PlainFrames {
    buf: Vec<u8>,
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone, Copy)]
enum Piece {
    /// Frame `i` of the batch, as it is.
    Frame(usize),
    /// Bytes of the scratch buffer.
    Scratch(usize, usize),
}

impl PlainFrames {
    /// Hand `frames` to `f` as plain frames, in order, at most [`PLAIN_BATCH`]
    /// per call; count the work in `stats` (`csum_completed`, `sw_segmented`,
    /// `offload_errors`). Returns how many frames were handed over.
    pub fn deliver(&mut self, frames: &[RxFrame<'_>], stats: &mut PortStats, f: &mut dyn FnMut(&[&[u8]])) -> usize {
        self.buf.clear();
        self.pieces.clear();
        for (i, fr) in frames.iter().enumerate() {
            let o = &fr.offload;
            if o.gso.is_some() {
                match gso::segment(fr.bytes, o, &[], &mut self.buf, MAX_SEGMENTED) {
                    Ok(segs) => {
                        stats.sw_segmented += 1;
                        let mut at = segs.start;
                        for k in 0..segs.count {
                            let len = if k + 1 == segs.count {
                                segs.last_len
                            } else {
                                segs.stride
                            };
                            self.pieces.push(Piece::Scratch(at, len));
                            at += len;
                        }
                    }
                    Err(_) => stats.offload_errors += 1,
                }
            } else if o.csum.is_some() {
                let at = self.buf.len();
                self.buf.extend_from_slice(fr.bytes);
                if complete_checksum(&mut self.buf[at..]).is_ok() {
                    stats.csum_completed += 1;
                }
                self.pieces.push(Piece::Scratch(at, fr.bytes.len()));
            } else {
                self.pieces.push(Piece::Frame(i));
            }
        }
        let mut out: [&[u8]; PLAIN_BATCH] = [&[]; PLAIN_BATCH];
        for chunk in self.pieces.chunks(PLAIN_BATCH) {
            for (slot, p) in out.iter_mut().zip(chunk) {
                *slot = match *p {
                    Piece::Frame(i) => frames[i].bytes,
                    Piece::Scratch(at, len) => &self.buf[at..at + len],
                };
            }
            f(&out[..chunk.len()]);
        }
        self.pieces.len()
    }
}

/// Counters of one port since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames received from the kernel and handed over (a super-frame counts once).
    pub rx_frames: u64,
    /// Bytes of those frames.
    pub rx_bytes: u64,
    /// Frames handed to the kernel for transmission (a super-frame sent whole counts once).
    pub tx_frames: u64,
    /// Bytes of the frames handed to the kernel (virtio-net headers not counted).
    pub tx_bytes: u64,
    /// Frames the kernel dropped before the port could read them (ring or socket buffer full).
    pub kernel_drops: u64,
    /// Frames received but not delivered because they did not fit the port's frame size.
    pub truncated: u64,
    /// Received frames whose partial TCP/UDP checksum (sender's TX offload)
    /// was completed in user space (plain receive, or a port without
    /// virtio-net headers), and frames sent whose checksum was completed for
    /// a port that takes no offloads.
    pub csum_completed: u64,
    /// Frames that could not be transmitted (refused by the kernel, or too large).
    pub tx_errors: u64,
    /// Super-frames received whole (a GSO request in their virtio-net header).
    pub rx_super_frames: u64,
    /// Super-frames handed to the kernel whole, with their virtio-net header.
    pub tx_super_frames: u64,
    /// Super-frames cut into packets in user space (for a plain receiver, or a
    /// port whose kernel side takes no offloads).
    pub sw_segmented: u64,
    /// Frames dropped because their offload state could not be honoured (a
    /// header the port refuses, a super-frame that cannot be cut).
    pub offload_errors: u64,
}

impl PortStats {
    /// Add `other`'s counts to these (one interface's sockets in several workers).
    pub fn merge(&mut self, other: &PortStats) {
        let PortStats {
            rx_frames,
            rx_bytes,
            tx_frames,
            tx_bytes,
            kernel_drops,
            truncated,
            csum_completed,
            tx_errors,
            rx_super_frames,
            tx_super_frames,
            sw_segmented,
            offload_errors,
        } = other;
        self.rx_frames += rx_frames;
        self.rx_bytes += rx_bytes;
        self.tx_frames += tx_frames;
        self.tx_bytes += tx_bytes;
        self.kernel_drops += kernel_drops;
        self.truncated += truncated;
        self.csum_completed += csum_completed;
        self.tx_errors += tx_errors;
        self.rx_super_frames += rx_super_frames;
        self.tx_super_frames += tx_super_frames;
        self.sw_segmented += sw_segmented;
        self.offload_errors += offload_errors;
    }
}

/// Block until one of `fds` is readable or `timeout` passes; returns the indices that are readable.
///
/// An error or hang-up condition on a descriptor counts as readable, so the
/// caller's next `recv` reports it instead of the loop spinning silently. An
/// interrupted wait (a signal) returns an empty list.
pub fn wait_readable(fds: &[RawFd], timeout: Duration) -> io::Result<Vec<usize>> {
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // Round up so a sub-millisecond timeout still waits instead of spinning.
    let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int;
    let nfds = pollfds.len() as libc::nfds_t;
    // SAFETY: `pollfds` is a valid, exclusively borrowed array of `nfds` pollfd structs
    // that outlives the call.
    let n = unsafe { libc::poll(pollfds.as_mut_ptr(), nfds, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(Vec::new())
        } else {
            Err(e)
        };
    }
    let ready = libc::POLLIN | libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;
    Ok(pollfds
        .iter()
        .enumerate()
        .filter(|(_, p)| p.revents & ready != 0)
        .map(|(i, _)| i)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn wait_readable_reports_only_ready_sockets() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let fds = [a.as_raw_fd(), b.as_raw_fd()];
        assert!(wait_readable(&fds, Duration::from_millis(10)).unwrap().is_empty());
        a.send_to(b"x", b.local_addr().unwrap()).unwrap();
        assert_eq!(wait_readable(&fds, Duration::from_secs(2)).unwrap(), vec![1]);
    }
}

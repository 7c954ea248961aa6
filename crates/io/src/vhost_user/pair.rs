//! The handle a datapath worker owns for one queue pair.
//!
//! A [`QueuePair`] is the worker's side of one receive/transmit pair of the
//! guest's virtio-net device. The vhost-user control thread configures the
//! rings (sizes, addresses, memory, eventfds) and may stop or restart them
//! at any time (guest reboot, QEMU reconnecting); the worker moves frames.
//! Both meet in the pair's state behind a mutex: the worker takes it once
//! per call ([`QueuePair::recv_batch`], [`QueuePair::send`],
//! [`QueuePair::flush`]) or once for a whole round ([`QueuePair::session`]);
//! the control thread only for reconfiguration, so the lock is uncontended
//! while traffic flows. Holding it is what makes a stop exact: once the
//! control thread has the lock, the worker is not inside a ring, so the
//! index returned to QEMU (`GET_VRING_BASE`) is the true one and guest
//! memory is never unmapped under a worker.
//!
//! The pair's file descriptor ([`QueuePair::fd`]) is an epoll instance of
//! its own, stable for the pair's life, which the control thread fills
//! with the guest's current transmit kick eventfd (it changes with every
//! ring setup) and a wake eventfd of the pair (set when a call stopped at
//! its budget with work left, and on every reconfiguration). The worker
//! adds this one fd to its poll set and calls `recv_batch` when it is
//! readable.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use palisade_wire::virtio_net::VirtioNetRepr;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::features::GuestFeatures;
use super::memory::GuestMem;
use super::rings::{Delivery, FromGuest, Limits, NetRings};
use super::stats::{QueueStats, SendError};
use super::virtqueue::RingLayout;
use crate::gso;
use crate::port::{FramePort, Offload, PortOffloads, PortStats, RxFrame};

/// epoll data of the wake eventfd.
const WAKE: u64 = 0;
/// epoll data of the guest's transmit kick eventfd.
const KICK: u64 = 1;

/// The control thread's view of one ring: what QEMU configured so far.
#[derive(Debug, Default)]
pub(crate) struct RingControl {
    /// `SET_VRING_NUM`.
    pub size: Option<u16>,
    /// `SET_VRING_ADDR`, translated to guest-physical: (descriptors, available, used).
    pub addrs: Option<(u64, u64, u64)>,
    /// `SET_VRING_BASE`, and the index the ring stopped at.
    pub base: u16,
    /// The guest kicks this eventfd when it makes chains available.
    pub kick: Option<File>,
    /// The device writes this eventfd to interrupt the guest.
    pub call: Option<File>,
    /// Started by `SET_VRING_KICK`, stopped by `GET_VRING_BASE`.
    pub started: bool,
    /// Started without a kick eventfd: the frontend asked for polling.
    pub polled: bool,
    /// `SET_VRING_ENABLE` (enabled from the start without protocol features).
    pub enabled: bool,
    /// The data path was started with the current configuration (stays
    /// set after a ring fault, so a faulty ring is not restarted until
    /// QEMU configures it again).
    pub active: bool,
}

impl RingControl {
    fn layout(&self) -> Option<RingLayout> {
        let size = self.size?;
        let (desc_table, avail_ring, used_ring) = self.addrs?;
        Some(RingLayout {
            size,
            desc_table,
            avail_ring,
            used_ring,
        })
    }

    fn wanted(&self) -> bool {
        self.started && self.enabled
    }
}

/// One queue pair's state, shared by the worker and the control thread.
#[derive(Debug)]
pub(crate) struct PairSlot {
    pub rings: NetRings,
    pub mem: Option<Arc<GuestMem>>,
    /// The guest's receive queue (virtqueue 2i).
    pub rx: RingControl,
    /// The guest's transmit queue (virtqueue 2i+1).
    pub tx: RingControl,
    /// The wake eventfd was written and not yet drained.
    wake_pending: bool,
}

/// What the worker and the control thread share for one pair.
#[derive(Debug)]
pub(crate) struct PairShared {
    slot: Mutex<PairSlot>,
    epoll: Epoll,
    wake: EventFd,
}

impl PairShared {
    pub fn new(limits: Limits) -> io::Result<PairShared> {
        let epoll = Epoll::new()?;
        let wake = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE),
        )?;
        Ok(PairShared {
            slot: Mutex::new(PairSlot {
                rings: NetRings::new(GuestFeatures::default(), limits),
                mem: None,
                rx: RingControl::default(),
                tx: RingControl::default(),
                wake_pending: false,
            }),
            epoll,
            wake,
        })
    }

    /// Lock the pair. A worker that panicked inside a callback poisons the
    /// lock; the rings are still consistent at every point a callback runs,
    /// so the state is used as it is.
    pub fn lock(&self) -> MutexGuard<'_, PairSlot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self, slot: &mut PairSlot) {
        if !slot.wake_pending {
            slot.wake_pending = true;
            // A full counter (2^64 - 2 wakes) still leaves the fd readable: nothing is lost.
            let _ = self.wake.write(1);
        }
    }

    /// Bring the data path in line with the configuration: start what is
    /// wanted and configured, stop what is not, keep the kick eventfd in the
    /// pair's epoll set while the transmit queue runs, and wake the worker.
    pub fn refresh(&self, slot: &mut PairSlot) {
        let PairSlot { rings, mem, rx, tx, .. } = slot;
        // Receive queue.
        let rx_go = rx.wanted() && mem.is_some() && rx.layout().is_some();
        if !rx_go && rx.active {
            let (base, notify) = match mem {
                Some(m) => rings.stop_rx(&**m),
                None => (rings.stop_rx_unmapped(), false),
            };
            rx.base = base;
            rx.active = false;
            if notify {
                signal(rx.call.as_ref());
            }
        } else if rx_go
            && !rx.active
            && let (Some(m), Some(layout)) = (mem.as_ref(), rx.layout())
        {
            rx.active = true;
            // A fault is counted by the rings; the ring stays down until reconfigured.
            let _ = rings.start_rx(&**m, layout, rx.base);
        }
        // Transmit queue.
        let tx_go = tx.wanted() && mem.is_some() && tx.layout().is_some();
        if !tx_go && tx.active {
            tx.base = rings.stop_tx();
            tx.active = false;
        } else if tx_go
            && !tx.active
            && let (Some(m), Some(layout)) = (mem.as_ref(), tx.layout())
        {
            tx.active = true;
            let _ = rings.start_tx(&**m, layout, tx.base);
        }
        if let Some(kick) = &tx.kick {
            let fd = kick.as_raw_fd();
            if tx.active && rings.tx_running() {
                // Already present after an earlier refresh: not an error.
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, KICK));
            } else {
                let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        }
        self.wake(slot);
    }

    /// Queue a RARP announcement of `mac` for the worker (see [`super::announce`]) and wake it.
    pub fn announce(&self, mac: [u8; 6]) -> bool {
        let mut slot = self.lock();
        let queued = slot.rings.announce(mac);
        self.wake(&mut slot);
        queued
    }

    /// Take the guest's transmit kick eventfd out of the epoll set (before it is replaced or closed).
    pub fn forget_kick(&self, slot: &PairSlot) {
        if let Some(kick) = &slot.tx.kick {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, kick.as_raw_fd(), EpollEvent::default());
        }
    }
}

/// Interrupt the guest through `call`, if it gave one.
fn signal(call: Option<&File>) {
    if let Some(mut call) = call {
        // The eventfd belongs to QEMU or KVM and is non-blocking: a full counter loses nothing.
        let _ = call.write(&1u64.to_ne_bytes());
    }
}

/// Read and discard an eventfd's count (non-blocking; nothing to read is fine).
fn drain(mut fd: &File) {
    let mut buf = [0u8; 8];
    let _ = fd.read(&mut buf);
}

/// Take frames the guest transmitted (the worker side of [`QueuePair::recv_batch`]).
fn recv_in(
    shared: &PairShared,
    slot: &mut PairSlot,
    max: usize,
    delivery: Delivery,
    f: &mut dyn FnMut(&FromGuest<'_>),
) -> usize {
    if std::mem::take(&mut slot.wake_pending) {
        let _ = shared.wake.read();
    }
    if let Some(kick) = &slot.tx.kick {
        drain(kick);
    }
    let Some(mem) = slot.mem.as_ref() else {
        // No guest memory (QEMU announces a migrated guest before it starts
        // the rings): only announcements injected for QEMU can be handed over.
        let n = if slot.rings.announcements_pending() {
            slot.rings.begin_batch();
            slot.rings.deliver(f);
            slot.rings.spans.len()
        } else {
            0
        };
        return n;
    };
    let outcome = slot.rings.fill_from_guest(&**mem, max, delivery);
    if outcome.notify {
        signal(slot.tx.call.as_ref());
    }
    if outcome.more || (slot.tx.polled && slot.rings.tx_running()) {
        shared.wake(slot);
    }
    slot.rings.deliver(f);
    outcome.frames
}

/// Deliver one frame into the guest's receive queue, unpublished.
fn send_in(slot: &mut PairSlot, header: &VirtioNetRepr, frame: &[u8]) -> Result<(), SendError> {
    match slot.mem.as_ref() {
        Some(mem) => slot.rings.send(&**mem, header, frame),
        None => slot.rings.send_without_memory(),
    }
}

/// Publish the frames sent so far and notify the guest if it asked.
fn flush_in(slot: &mut PairSlot) {
    if let Some(mem) = slot.mem.as_ref()
        && slot.rings.flush(&**mem)
    {
        signal(slot.rx.call.as_ref());
    }
}

/// One queue pair of a vhost-user net device, owned by the worker that serves it.
///
/// Directions are the guest's: [`QueuePair::recv_batch`] takes what it
/// transmitted, [`QueuePair::send`] delivers into its receive queue. Do not
/// call a pair's methods from inside its own `recv_batch` callback (the
/// pair is locked there, and the lock is not reentrant); stage the outputs
/// and send after, as the agent's workers do.
#[derive(Debug)]
pub struct QueuePair {
    shared: Arc<PairShared>,
    index: u16,
}

impl QueuePair {
    pub(crate) fn new(shared: Arc<PairShared>, index: u16) -> QueuePair {
        QueuePair { shared, index }
    }

    /// Another handle on the same pair (for a second worker that sends on it).
    pub(crate) fn handle(&self) -> QueuePair {
        QueuePair::new(self.shared.clone(), self.index)
    }

    /// The pair's index (its virtqueues are `2 * index` and `2 * index + 1`).
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The fd to poll for readability: readable when the guest transmitted
    /// (kicked), when a call left work behind, or when the control thread
    /// changed the rings.
    pub fn fd(&self) -> RawFd {
        self.shared.epoll.as_raw_fd()
    }

    /// Lock the pair for a round of sends (and receives): one lock for all
    /// of them; what was sent is published (and the guest notified) when the
    /// session ends.
    pub fn session(&mut self) -> Session<'_> {
        Session {
            shared: &self.shared,
            slot: self.shared.lock(),
        }
    }

    /// Take up to `max` frames the guest transmitted and hand them to `f`
    /// in one batch, with their virtio-net headers (partial checksums and
    /// super-frames as the guest sent them). Returns how many; 0 when none
    /// are ready or the guest's transmit queue is not running.
    pub fn recv_batch(&mut self, max: usize, f: &mut dyn FnMut(&FromGuest<'_>)) -> usize {
        recv_in(&self.shared, &mut self.shared.lock(), max, Delivery::Offloaded, f)
    }

    /// Deliver `frame` with `header` into the guest's receive queue (copied);
    /// visible to the guest at the next [`QueuePair::flush`].
    pub fn send(&mut self, header: &VirtioNetRepr, frame: &[u8]) -> Result<(), SendError> {
        send_in(&mut self.shared.lock(), header, frame)
    }

    /// Publish everything sent since the last flush, and notify the guest if it asked.
    pub fn flush(&mut self) {
        flush_in(&mut self.shared.lock());
    }

    /// Counters so far.
    pub fn stats(&self) -> QueueStats {
        *self.shared.lock().rings.stats()
    }

    /// The features the guest negotiated (all zero before a guest connects).
    pub fn features(&self) -> GuestFeatures {
        self.shared.lock().rings.features()
    }

    /// Whether the guest's (receive, transmit) queues are running.
    pub fn running(&self) -> (bool, bool) {
        let slot = self.shared.lock();
        (slot.rings.rx_running(), slot.rings.tx_running())
    }
}

/// A queue pair locked for a round of calls (see [`QueuePair::session`]).
#[derive(Debug)]
pub struct Session<'a> {
    shared: &'a PairShared,
    slot: MutexGuard<'a, PairSlot>,
}

impl Session<'_> {
    /// As [`QueuePair::recv_batch`]. Do not send from inside `f`: the session is borrowed.
    pub fn recv_batch(&mut self, max: usize, f: &mut dyn FnMut(&FromGuest<'_>)) -> usize {
        recv_in(self.shared, &mut self.slot, max, Delivery::Offloaded, f)
    }

    /// As [`QueuePair::send`]; published at [`Session::flush`] or when the session ends.
    pub fn send(&mut self, header: &VirtioNetRepr, frame: &[u8]) -> Result<(), SendError> {
        send_in(&mut self.slot, header, frame)
    }

    /// Publish what was sent so far, and notify the guest if it asked.
    pub fn flush(&mut self) {
        flush_in(&mut self.slot);
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        flush_in(&mut self.slot);
    }
}

/// A queue pair as a [`FramePort`]. With offloads
/// ([`FramePort::recv_frames`], [`FramePort::send_frame`]) frames keep their
/// virtio-net headers both ways; a super-frame of a kind the guest did not
/// negotiate is cut in software before delivery. Plain
/// ([`FramePort::recv_batch`], [`FramePort::send`]): partial checksums from
/// the guest are completed, super-frames from the guest are dropped and
/// counted (offer [`super::Offloads::CHECKSUM_ONLY`] so a guest never sends
/// them), frames are delivered to the guest without offload metadata.
///
/// `PortStats` mapping: rx = from the guest, tx = to the guest;
/// `kernel_drops` = chains refused; `truncated` = super-frames not
/// delivered on the plain path; `tx_errors` = frames not delivered to the
/// guest; `sw_segmented` = super-frames cut for a guest that cannot take them.
impl FramePort for QueuePair {
    fn recv_frames(&mut self, max: usize, f: &mut dyn FnMut(&[RxFrame<'_>])) -> io::Result<usize> {
        const CHUNK: usize = 64;
        let shared = &self.shared;
        Ok(recv_in(
            shared,
            &mut shared.lock(),
            max,
            Delivery::Offloaded,
            &mut |batch| {
                // The batch's frames with their headers, on the stack, a
                // chunk at a time (no allocation per batch).
                let mut rx = [RxFrame {
                    bytes: &[],
                    offload: Offload::NONE,
                }; CHUNK];
                for (frames, headers) in batch.frames().chunks(CHUNK).zip(batch.headers().chunks(CHUNK)) {
                    for (slot, (bytes, header)) in rx.iter_mut().zip(frames.iter().zip(headers)) {
                        *slot = RxFrame {
                            bytes,
                            offload: Offload::from(*header),
                        };
                    }
                    f(&rx[..frames.len()]);
                }
            },
        ))
    }

    fn send_frame(&mut self, frame: &[u8], offload: &Offload) -> io::Result<()> {
        match QueuePair::send(self, &offload.to_repr(), frame) {
            // A super-frame of a kind the guest did not negotiate: cut it
            // here (every checksum completed) and deliver the packets.
            Err(SendError::NeedsSegmentation) => {
                let mut out = Vec::new();
                let segments = gso::segment(frame, offload, &[], &mut out, 1 << 20)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("cannot segment: {e}")))?;
                for packet in segments.iter(&out) {
                    QueuePair::send(self, &VirtioNetRepr::PLAIN, packet).map_err(send_error)?;
                }
                Ok(())
            }
            r => r.map_err(send_error),
        }
    }

    fn offloads(&self) -> PortOffloads {
        // Guest frames come with their headers; frames to the guest go with
        // theirs (cut here when the guest did not negotiate their kind).
        PortOffloads { rx: true, tx: true }
    }

    fn recv(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> io::Result<usize> {
        let shared = &self.shared;
        Ok(recv_in(
            shared,
            &mut shared.lock(),
            max,
            Delivery::Plain,
            &mut |batch| {
                for frame in batch.frames() {
                    f(frame);
                }
            },
        ))
    }

    fn recv_batch(&mut self, max: usize, f: &mut dyn FnMut(&[&[u8]])) -> io::Result<usize> {
        let shared = &self.shared;
        Ok(recv_in(
            shared,
            &mut shared.lock(),
            max,
            Delivery::Plain,
            &mut |batch| f(batch.frames()),
        ))
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        QueuePair::send(self, &VirtioNetRepr::PLAIN, frame).map_err(send_error)
    }

    fn flush(&mut self) -> io::Result<()> {
        QueuePair::flush(self);
        Ok(())
    }

    fn fd(&self) -> RawFd {
        QueuePair::fd(self)
    }

    fn stats(&self) -> PortStats {
        let s = QueuePair::stats(self);
        PortStats {
            rx_frames: s.from_guest_frames,
            rx_bytes: s.from_guest_bytes,
            tx_frames: s.to_guest_frames,
            tx_bytes: s.to_guest_bytes,
            kernel_drops: s.refused.total(),
            truncated: s.gso_undeliverable,
            csum_completed: s.csum_completed,
            // Through this trait a super-frame the guest cannot take is cut
            // in software, not dropped: counted there, not as an error.
            tx_errors: s.to_guest_dropped() - s.to_guest_needs_segmentation,
            sw_segmented: s.to_guest_needs_segmentation,
            rx_super_frames: s.from_guest_gso_frames,
            tx_super_frames: s.to_guest_gso_frames,
            offload_errors: s.to_guest_bad_header,
        }
    }
}

/// A refused delivery to the guest as an I/O error of the kind a port reports.
fn send_error(e: SendError) -> io::Error {
    let kind = match e {
        SendError::NoBuffers => io::ErrorKind::WouldBlock,
        SendError::NotRunning => io::ErrorKind::NotConnected,
        _ => io::ErrorKind::InvalidInput,
    };
    io::Error::new(kind, e)
}

//! The data path of one virtio-net queue pair over guest memory.
//!
//! [`NetRings`] holds the pair's two virtqueues (the guest's receive queue,
//! which the device fills, and its transmit queue, which the device
//! drains), the features the guest negotiated, the per-call limits and the
//! counters. It makes no system call and takes no lock: it is handed the
//! guest's memory on every call and returns what the caller must do (notify
//! the guest, come back because work is left). [`super::QueuePair`] wraps
//! it with the eventfds and the lock shared with the vhost-user control
//! thread; tests, the benchmark and the fuzz target drive it directly over
//! an in-process memory.
//!
//! Frames the guest transmits are copied out of its memory once, into the
//! pair's own batch buffer, before anything looks at them
//! ([`NetRings::recv_batch`]). The copy is deliberate: guest memory stays
//! writable by the guest while the frame is parsed, judged by the firewall
//! and forwarded, so judging it in place would let a guest change a frame
//! after its verdict (a double fetch). The kernel's vhost-net makes the same
//! copy into its socket buffers.

use std::collections::VecDeque;

use palisade_wire::virtio_net::{HEADER_LEN, VirtioNetRepr};
use vm_memory::GuestMemory;

use super::chain::Segment;
use super::features::GuestFeatures;
use super::stats::QueueStats;
use super::virtqueue::{RingFault, RingLayout, Virtqueue};

/// Most frames one [`NetRings::recv_batch`] call hands over.
pub const MAX_BATCH: usize = 256;

/// Bounds on the work of one call, so one guest cannot starve the others a worker serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Frames handed over per `recv_batch` call (at most [`MAX_BATCH`]).
    pub frames_per_call: usize,
    /// Bytes copied out of the guest per `recv_batch` call (a call always takes at least one frame).
    pub bytes_per_call: usize,
    /// Chains examined per `recv_batch` call, refused ones included.
    pub chains_per_call: usize,
    /// Invalid receive chains skipped per `send` before the frame is given up.
    pub refusals_per_send: usize,
    /// Descriptors in one chain, indirect ones included.
    pub max_descriptors: usize,
    /// Longest frame the guest may transmit, without the virtio-net header:
    /// 64 KiB of IP datagram (an IPv6 jumbo-less maximum, 40 + 65,535) behind
    /// Ethernet and two VLAN tags, rounded up.
    pub max_frame_len: usize,
    /// Receive buffers one frame may span (mergeable buffers).
    pub max_buffers_per_frame: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            frames_per_call: MAX_BATCH,
            bytes_per_call: 1 << 20,
            chains_per_call: 2 * MAX_BATCH,
            refusals_per_send: 64,
            max_descriptors: 64,
            max_frame_len: 65_600,
            max_buffers_per_frame: 256,
        }
    }
}

impl Limits {
    /// These limits with every value brought into its working range (at
    /// least one of everything; at most [`MAX_BATCH`] frames per call).
    pub fn sanitized(self) -> Limits {
        Limits {
            frames_per_call: self.frames_per_call.clamp(1, MAX_BATCH),
            bytes_per_call: self.bytes_per_call.max(1),
            chains_per_call: self.chains_per_call.max(1),
            refusals_per_send: self.refusals_per_send.max(1),
            max_descriptors: self.max_descriptors.max(1),
            max_frame_len: self.max_frame_len.max(64),
            max_buffers_per_frame: self.max_buffers_per_frame.max(1),
        }
    }
}

/// How frames from the guest are handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// As the guest sent them, with their parsed headers: partial checksums
    /// and super-frames for an offload-aware caller.
    Offloaded,
    /// Complete frames only: partial checksums are completed here, and
    /// super-frames are dropped and counted ([`QueueStats::gso_undeliverable`]).
    Plain,
}

/// What a `recv_batch` call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecvOutcome {
    /// Frames handed over.
    pub frames: usize,
    /// The call stopped at its budget with chains left: call again soon.
    pub more: bool,
    /// The guest asked to be notified of the completions: write its call eventfd.
    pub notify: bool,
}

/// A batch of frames the guest transmitted, in order, valid for one callback.
#[derive(Debug, Clone, Copy)]
pub struct FromGuest<'a> {
    frames: &'a [&'a [u8]],
    headers: &'a [VirtioNetRepr],
}

impl<'a> FromGuest<'a> {
    /// The frames (Ethernet, without the virtio-net header), as the engine's `process_batch` takes them.
    pub fn frames(&self) -> &'a [&'a [u8]] {
        self.frames
    }

    /// Their headers, by index: partial checksums, super-frames.
    pub fn headers(&self) -> &'a [VirtioNetRepr] {
        self.headers
    }

    /// How many frames.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether there are none (never, in a callback).
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Each frame with its header.
    pub fn iter(&self) -> impl Iterator<Item = (&'a VirtioNetRepr, &'a [u8])> + 'a {
        self.headers.iter().zip(self.frames.iter().copied())
    }
}

/// A receive chain popped for a frame and not used yet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stashed {
    pub head: u16,
    /// Its buffers: `stash_segments[first..first + count]`.
    pub first: usize,
    pub count: usize,
    pub capacity: u64,
}

/// The data path of one queue pair (see the module documentation).
#[derive(Debug)]
pub struct NetRings {
    pub(crate) features: GuestFeatures,
    pub(crate) limits: Limits,
    /// The guest's receive queue (virtqueue 2i): the device writes into it.
    pub(crate) rx: Virtqueue,
    /// The guest's transmit queue (virtqueue 2i+1): the device reads from it.
    pub(crate) tx: Virtqueue,
    pub(crate) stats: QueueStats,
    /// Scratch for walking one chain.
    pub(crate) segments: Vec<Segment>,
    /// Copies of the frames of one `recv_batch` call (headers included), at `spans`.
    pub(crate) arena: Vec<u8>,
    /// Where each handed-over frame lies in `arena` (header excluded).
    pub(crate) spans: Vec<(usize, usize)>,
    pub(crate) headers: Vec<VirtioNetRepr>,
    /// Receive chains popped and validated but not used yet, oldest first.
    pub(crate) stash: VecDeque<Stashed>,
    pub(crate) stash_segments: Vec<Segment>,
    /// A copy of a frame whose checksum is completed before it goes to the guest.
    pub(crate) scratch: Vec<u8>,
    /// MACs of RARP announcements to hand over with the next batch ([`super::announce`]).
    pub(crate) announcements: VecDeque<[u8; 6]>,
}

impl NetRings {
    /// A queue pair for a guest that negotiated `features`, both rings stopped.
    pub fn new(features: GuestFeatures, limits: Limits) -> NetRings {
        let limits = limits.sanitized();
        NetRings {
            features,
            limits,
            rx: Virtqueue::new(),
            tx: Virtqueue::new(),
            stats: QueueStats::default(),
            segments: Vec::with_capacity(limits.max_descriptors),
            // Room for the byte budget plus the one frame that may cross it; allocated
            // zeroed, so the pages are only backed once touched.
            arena: vec![0; limits.bytes_per_call + HEADER_LEN + limits.max_frame_len],
            spans: Vec::with_capacity(limits.frames_per_call),
            headers: Vec::with_capacity(limits.frames_per_call),
            stash: VecDeque::new(),
            stash_segments: Vec::new(),
            scratch: Vec::new(),
            announcements: VecDeque::new(),
        }
    }

    /// The features the rings were set up for.
    pub fn features(&self) -> GuestFeatures {
        self.features
    }

    /// Change the negotiated features (both rings must be stopped: a new negotiation).
    pub fn set_features(&mut self, features: GuestFeatures) {
        debug_assert!(!self.rx.running() && !self.tx.running());
        self.features = features;
    }

    /// Counters so far.
    pub fn stats(&self) -> &QueueStats {
        &self.stats
    }

    /// Whether the guest's receive queue is being filled.
    pub fn rx_running(&self) -> bool {
        self.rx.running()
    }

    /// Whether the guest's transmit queue is being drained.
    pub fn tx_running(&self) -> bool {
        self.tx.running()
    }

    /// Start filling the guest's receive queue at `layout`, from available index `next_avail`.
    pub fn start_rx<M: GuestMemory>(&mut self, mem: &M, layout: RingLayout, next_avail: u16) -> Result<(), RingFault> {
        self.drop_stash();
        let r = self.rx.start(mem, layout, next_avail, self.features.event_idx());
        match r {
            // The device never waits for receive buffers: no kicks wanted.
            Ok(()) => self.rx.disable_notification(mem).inspect_err(|_| self.rx.fault()),
            Err(e) => {
                self.stats.ring_faults += 1;
                Err(e)
            }
        }
    }

    /// Start draining the guest's transmit queue at `layout`, from available index `next_avail`.
    pub fn start_tx<M: GuestMemory>(&mut self, mem: &M, layout: RingLayout, next_avail: u16) -> Result<(), RingFault> {
        let r = self.tx.start(mem, layout, next_avail, self.features.event_idx());
        if r.is_err() {
            self.stats.ring_faults += 1;
        }
        r
    }

    /// Stop the receive queue: chains held for frames in progress go back
    /// to the guest empty, everything used is published. Returns the next
    /// available index (for `GET_VRING_BASE`) and whether to notify the guest.
    pub fn stop_rx<M: GuestMemory>(&mut self, mem: &M) -> (u16, bool) {
        let mut notify = false;
        if self.rx.running() {
            while let Some(s) = self.stash.pop_front() {
                if self.rx.push_used(mem, s.head, 0).is_err() {
                    break;
                }
            }
            notify = self.rx.publish(mem).unwrap_or(false);
        }
        self.drop_stash();
        (self.rx.stop(), notify)
    }

    /// Stop the receive queue when its memory is gone (no used elements can
    /// be written): chains held for frames in progress are forgotten; QEMU
    /// restarts the ring from the used index, which offers them again.
    pub(crate) fn stop_rx_unmapped(&mut self) -> u16 {
        self.drop_stash();
        self.rx.stop()
    }

    /// Stop the transmit queue; returns the next available index.
    pub fn stop_tx(&mut self) -> u16 {
        self.tx.stop()
    }

    /// Forget the receive chains held for frames in progress (the rings are being reset).
    fn drop_stash(&mut self) {
        self.stash.clear();
        self.stash_segments.clear();
    }

    /// A ring fault: count it and stop that ring.
    pub(crate) fn ring_fault(&mut self, rx: bool) {
        self.stats.ring_faults += 1;
        if rx {
            self.rx.fault();
            self.drop_stash();
        } else {
            self.tx.fault();
        }
    }

    /// Hand the frames of the last `recv_batch` call to `f` (nothing if there were none).
    pub(crate) fn deliver(&self, f: &mut dyn FnMut(&FromGuest<'_>)) {
        if self.spans.is_empty() {
            return;
        }
        let mut frames: [&[u8]; MAX_BATCH] = [&[]; MAX_BATCH];
        for (slot, &(start, end)) in frames.iter_mut().zip(&self.spans) {
            *slot = &self.arena[start..end];
        }
        f(&FromGuest {
            frames: &frames[..self.spans.len()],
            headers: &self.headers,
        });
    }
}

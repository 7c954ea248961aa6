//! Frames the guest transmits: draining its transmit queue.
//!
//! Each available chain is walked and validated ([`super::chain::walk`]:
//! device-readable buffers only, inside guest memory, at most the header
//! plus [`Limits::max_frame_len`](super::Limits) bytes), copied once into
//! the pair's batch buffer, and its virtio-net header parsed and checked
//! against the frame and against what the guest negotiated. Every chain,
//! accepted or refused, goes back to the guest's used ring with length 0
//! (the device wrote nothing), published once per call. A call stops at
//! its frame, byte or chain budget; then [`RecvOutcome::more`] says to call
//! again. With nothing left, guest notifications are re-enabled and the
//! ring checked once more, so a chain made available meanwhile is not
//! missed.

use palisade_wire::virtio_net::{Header, VirtioNetRepr};
use vm_memory::{Bytes, GuestMemory};

use super::chain::{ChainRules, Direction, walk};
use super::features::Unsupported;
use super::rings::{Delivery, FromGuest, NetRings, RecvOutcome};
use super::stats::Refusal;

/// Shortest frame accepted from the guest: an Ethernet header.
const MIN_FRAME_LEN: usize = 14;

impl NetRings {
    /// Drain up to `max` frames from the guest's transmit queue and hand them
    /// to `f` in one batch (`f` is not called when there are none).
    pub fn recv_batch<M: GuestMemory>(
        &mut self,
        mem: &M,
        max: usize,
        delivery: Delivery,
        f: &mut dyn FnMut(&FromGuest<'_>),
    ) -> RecvOutcome {
        let outcome = self.fill_from_guest(mem, max, delivery);
        self.deliver(f);
        outcome
    }

    /// The first half of `recv_batch`: copy the frames in and complete the
    /// chains, without handing the frames over yet (see `deliver`).
    pub(crate) fn fill_from_guest<M: GuestMemory>(&mut self, mem: &M, max: usize, delivery: Delivery) -> RecvOutcome {
        // Announcements injected for QEMU (SEND_RARP) go first, whether or not the ring runs.
        let injected = self.begin_batch();
        let mut outcome = self.fill_ring(mem, max, delivery, injected);
        outcome.frames = self.spans.len();
        outcome
    }

    /// Drain the transmit ring into the batch, its arena filled from `filled`.
    fn fill_ring<M: GuestMemory>(&mut self, mem: &M, max: usize, delivery: Delivery, mut filled: usize) -> RecvOutcome {
        let mut outcome = RecvOutcome::default();
        if !self.tx.running() {
            return outcome;
        }
        let max = max.min(self.limits.frames_per_call);
        if max == 0 {
            return outcome;
        }
        if self.tx.disable_notification(mem).is_err() {
            self.ring_fault(false);
            return outcome;
        }
        let header_len = self.features.header_len();
        let rules = ChainRules {
            direction: Direction::DeviceReads,
            max_descriptors: self.limits.max_descriptors,
            indirect: self.features.indirect_descriptors(),
            max_len: Some((header_len + self.limits.max_frame_len) as u64),
        };
        let mut chains = 0usize;
        loop {
            let head = match self.tx.pop(mem) {
                Ok(Some(head)) => head,
                Ok(None) => match self.tx.enable_notification(mem) {
                    // A chain arrived while notifications were off: keep going. (Counted
                    // against the budget: a guest flipping its index must not keep us here.)
                    Ok(true) => {
                        chains += 1;
                        if chains >= self.limits.chains_per_call {
                            outcome.more = true;
                            self.stats.budget_exhausted += 1;
                            break;
                        }
                        if self.tx.disable_notification(mem).is_err() {
                            self.ring_fault(false);
                            break;
                        }
                        continue;
                    }
                    Ok(false) => break,
                    Err(_) => {
                        self.ring_fault(false);
                        break;
                    }
                },
                Err(_) => {
                    self.ring_fault(false);
                    break;
                }
            };
            if self.spans.len() >= max || chains >= self.limits.chains_per_call || filled >= self.limits.bytes_per_call
            {
                // Budget spent with work left: leave the chain for the next call.
                self.tx.unpop();
                outcome.more = true;
                self.stats.budget_exhausted += 1;
                break;
            }
            chains += 1;
            // A refused chain is counted in take_chain and returned like any other.
            if let Ok(Some(len)) = self.take_chain(mem, head, &rules, header_len, filled, delivery) {
                filled += len;
            }
            if self.tx.push_used(mem, head, 0).is_err() {
                self.ring_fault(false);
                break;
            }
        }
        match self.tx.publish(mem) {
            Ok(notify) => outcome.notify = notify,
            Err(_) => self.ring_fault(false),
        }
        if outcome.notify {
            self.stats.guest_notifications += 1;
        }
        outcome
    }

    /// Validate and copy chain `head` to `arena[at..]`. Returns the bytes
    /// taken (`None` when the frame was valid but not handed over), or the
    /// reason it was refused (already counted).
    fn take_chain<M: GuestMemory>(
        &mut self,
        mem: &M,
        head: u16,
        rules: &ChainRules,
        header_len: usize,
        at: usize,
        delivery: Delivery,
    ) -> Result<Option<usize>, Refusal> {
        let refuse = |stats: &mut super::QueueStats, r: Refusal| {
            stats.refused.count(r);
            Err(r)
        };
        let total = match walk(
            mem,
            self.tx.desc_table(),
            self.tx.size(),
            head,
            rules,
            &mut self.segments,
        ) {
            Ok(n) => n as usize,
            Err(r) => return refuse(&mut self.stats, r),
        };
        if total < header_len + MIN_FRAME_LEN {
            return refuse(&mut self.stats, Refusal::FrameTooShort);
        }
        // The arena holds the byte budget plus one maximum frame, and `at` is below the budget.
        let Some(dst) = self.arena.get_mut(at..at + total) else {
            return refuse(&mut self.stats, Refusal::FrameTooLarge);
        };
        let mut off = 0;
        for seg in &self.segments {
            let len = seg.len as usize;
            if mem.read_slice(&mut dst[off..off + len], seg.addr).is_err() {
                return refuse(&mut self.stats, Refusal::BufferOutsideMemory);
            }
            off += len;
        }
        let frame_len = total - header_len;
        let mut header = match VirtioNetRepr::parse(&Header::new_unchecked(&dst[..header_len]), frame_len) {
            Ok(h) => h,
            Err(e) => return refuse(&mut self.stats, Refusal::from_header_error(e.kind())),
        };
        if let Err(Unsupported::Checksum | Unsupported::Segmentation) = self.features.check_from_guest(&header) {
            return refuse(&mut self.stats, Refusal::OffloadNotNegotiated);
        }
        // Receive-side fields mean nothing on transmit (virtio 1.x §5.1.6.2).
        header.data_valid = false;
        header.num_buffers = 0;
        let frame = &mut dst[header_len..];
        if delivery == Delivery::Plain {
            if header.gso.is_some() {
                self.stats.gso_undeliverable += 1;
                return Ok(None);
            }
            if let Some(csum) = header.csum.take() {
                // parse checked the field lies inside the frame.
                if csum.complete(frame).is_err() {
                    return refuse(&mut self.stats, Refusal::HeaderBadLength);
                }
                self.stats.csum_completed += 1;
            }
        }
        let s = &mut self.stats;
        s.from_guest_frames += 1;
        s.from_guest_bytes += frame_len as u64;
        s.from_guest_gso_frames += u64::from(header.gso.is_some());
        s.from_guest_partial_csum += u64::from(header.csum.is_some());
        self.spans.push((at + header_len, at + total));
        self.headers.push(header);
        Ok(Some(total))
    }
}

//! Frames for the guest: filling its receive queue.
//!
//! [`NetRings::send`] first decides whether the guest can take the frame as
//! it is: a super-frame of a kind it did not negotiate is refused with
//! [`SendError::NeedsSegmentation`] (the port does not segment: the caller,
//! which already parses the frame, cuts it and sends the pieces); a partial
//! checksum for a guest without `GUEST_CSUM` is completed here on a copy.
//! Then it gathers receive chains: one that holds header and frame, or with
//! mergeable buffers as many as the frame needs (at most
//! [`Limits::max_buffers_per_frame`](super::Limits)). Each chain is walked
//! and validated (device-writable buffers inside guest memory; with
//! mergeable buffers each at least a header long) before anything is
//! written; an invalid one goes back to the guest empty and is counted.
//! Chains popped for a frame that then cannot complete (not enough
//! buffers yet) are kept for the next frame, not pushed back, because an
//! invalid chain may already have been consumed after them.
//!
//! Header and frame are written across the chains, the used elements
//! pushed, and the frame becomes visible to the guest at the next
//! [`NetRings::flush`] (one used-index store for the whole batch, one
//! notification if the guest wants it).

use palisade_wire::virtio_net::{Header, VirtioNetRepr};
use vm_memory::{Address, Bytes, GuestMemory};

use super::chain::{ChainRules, Direction, Segment, walk};
use super::features::Unsupported;
use super::rings::{NetRings, Stashed};
use super::stats::{Refusal, SendError};

/// Compact the stash's segment store once this many dead entries lead it.
const STASH_COMPACT_AT: usize = 1024;

impl NetRings {
    /// Deliver `frame` (Ethernet, without header) with `header` into the
    /// guest's receive queue. It becomes visible at the next [`Self::flush`].
    pub fn send<M: GuestMemory>(&mut self, mem: &M, header: &VirtioNetRepr, frame: &[u8]) -> Result<(), SendError> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let r = self.send_inner(mem, header, frame, &mut scratch);
        self.scratch = scratch;
        match r {
            Ok(buffers) => {
                let s = &mut self.stats;
                s.to_guest_frames += 1;
                s.to_guest_bytes += frame.len() as u64;
                s.to_guest_buffers += buffers as u64;
                s.to_guest_gso_frames += u64::from(header.gso.is_some());
                Ok(())
            }
            Err(e) => {
                self.stats.count_send_error(e);
                Err(e)
            }
        }
    }

    /// A send while no guest memory is mapped: counted, refused.
    pub(crate) fn send_without_memory(&mut self) -> Result<(), SendError> {
        self.stats.count_send_error(SendError::NotRunning);
        Err(SendError::NotRunning)
    }

    /// Publish the frames sent since the last flush. Returns whether the
    /// guest asked to be notified (write its call eventfd).
    pub fn flush<M: GuestMemory>(&mut self, mem: &M) -> bool {
        if !self.rx.running() || !self.rx.has_unpublished() {
            return false;
        }
        match self.rx.publish(mem) {
            Ok(notify) => {
                self.stats.guest_notifications += u64::from(notify);
                notify
            }
            Err(_) => {
                self.ring_fault(true);
                false
            }
        }
    }

    /// Returns the number of receive chains the frame filled.
    fn send_inner<M: GuestMemory>(
        &mut self,
        mem: &M,
        header: &VirtioNetRepr,
        frame: &[u8],
        scratch: &mut Vec<u8>,
    ) -> Result<usize, SendError> {
        if !self.rx.running() {
            return Err(SendError::NotRunning);
        }
        // The same rules as for a header read off the wire, against this frame.
        VirtioNetRepr::parse(&Header::new_unchecked(&header.to_bytes()[..]), frame.len())
            .map_err(SendError::BadHeader)?;
        let mut header = *header;
        let mut payload = frame;
        match self.features.check_to_guest(&header) {
            Ok(()) => {}
            Err(Unsupported::Segmentation) => return Err(SendError::NeedsSegmentation),
            Err(Unsupported::Checksum) => {
                scratch.clear();
                scratch.extend_from_slice(frame);
                if let Some(csum) = header.csum.take() {
                    csum.complete(scratch).map_err(SendError::BadHeader)?;
                }
                self.stats.csum_completed += 1;
                payload = scratch;
            }
        }
        if !self.features.checksum_to_guest() {
            header.data_valid = false;
        }
        let header_len = self.features.header_len();
        let need = (header_len + payload.len()) as u64;
        let chains = self.gather(mem, need, header_len)?;
        header.num_buffers = chains as u16;
        let header_bytes = header.to_bytes();
        self.scatter(mem, chains, &[&header_bytes[..header_len], payload])?;
        Ok(chains)
    }

    /// Make sure the stash's first chains hold `need` bytes; returns how many of them.
    fn gather<M: GuestMemory>(&mut self, mem: &M, need: u64, header_len: usize) -> Result<usize, SendError> {
        let mergeable = self.features.mergeable_rx_buffers();
        let max_chains = if mergeable {
            self.limits.max_buffers_per_frame.min(usize::from(u16::MAX))
        } else {
            1
        };
        let rules = ChainRules {
            direction: Direction::DeviceWrites,
            max_descriptors: self.limits.max_descriptors,
            indirect: self.features.indirect_descriptors(),
            max_len: None,
        };
        let mut have = 0u64;
        let mut used = 0usize;
        let mut refused = 0usize;
        loop {
            if let Some(s) = self.stash.get(used) {
                have += s.capacity;
                used += 1;
                if have >= need {
                    return Ok(used);
                }
                if used >= max_chains {
                    return Err(SendError::TooBig);
                }
                continue;
            }
            let head = match self.rx.pop(mem) {
                Ok(Some(head)) => head,
                Ok(None) => return Err(SendError::NoBuffers),
                Err(_) => {
                    self.ring_fault(true);
                    return Err(SendError::NotRunning);
                }
            };
            let refusal = match walk(
                mem,
                self.rx.desc_table(),
                self.rx.size(),
                head,
                &rules,
                &mut self.segments,
            ) {
                // With mergeable buffers every buffer must hold at least a header (§5.1.6.3.1).
                Ok(capacity) if mergeable && capacity < header_len as u64 => Some(Refusal::BufferTooSmall),
                Ok(capacity) => {
                    let first = self.stash_segments.len();
                    self.stash_segments.extend_from_slice(&self.segments);
                    self.stash.push_back(Stashed {
                        head,
                        first,
                        count: self.segments.len(),
                        capacity,
                    });
                    None
                }
                Err(r) => Some(r),
            };
            if let Some(r) = refusal {
                self.stats.refused.count(r);
                if self.rx.push_used(mem, head, 0).is_err() {
                    self.ring_fault(true);
                    return Err(SendError::NotRunning);
                }
                refused += 1;
                if refused >= self.limits.refusals_per_send {
                    return Err(SendError::GuestFault);
                }
            }
        }
    }

    /// Write `parts` in order across the first `chains` stashed chains, push
    /// their used elements and drop them from the stash.
    fn scatter<M: GuestMemory>(&mut self, mem: &M, chains: usize, parts: &[&[u8]]) -> Result<(), SendError> {
        let mut parts = parts.iter().copied().filter(|p| !p.is_empty());
        let mut src: &[u8] = parts.next().unwrap_or(&[]);
        let mut result = Ok(());
        for _ in 0..chains {
            let Some(chain) = self.stash.pop_front() else { break };
            let mut written = 0u32;
            let segs = &self.stash_segments[chain.first..chain.first + chain.count];
            'segments: for seg in segs {
                let mut off = 0u32;
                while off < seg.len {
                    if src.is_empty() {
                        match parts.next() {
                            Some(p) => src = p,
                            None => break 'segments,
                        }
                    }
                    let n = (seg.len - off).min(src.len().min(u32::MAX as usize) as u32);
                    if write_at(mem, *seg, off, &src[..n as usize]).is_err() {
                        // Validated under the same memory: cannot happen; give the chain back as is.
                        result = Err(SendError::GuestFault);
                        break 'segments;
                    }
                    src = &src[n as usize..];
                    off += n;
                    written += n;
                }
            }
            if self.rx.push_used(mem, chain.head, written).is_err() {
                self.ring_fault(true);
                return Err(SendError::NotRunning);
            }
        }
        self.compact_stash();
        result
    }

    fn compact_stash(&mut self) {
        match self.stash.front() {
            None => self.stash_segments.clear(),
            Some(front) if front.first >= STASH_COMPACT_AT => {
                let dead = front.first;
                self.stash_segments.drain(..dead);
                for s in &mut self.stash {
                    s.first -= dead;
                }
            }
            Some(_) => {}
        }
    }
}

fn write_at<M: GuestMemory>(mem: &M, seg: Segment, off: u32, bytes: &[u8]) -> Result<(), ()> {
    let at = seg.addr.checked_add(u64::from(off)).ok_or(())?;
    mem.write_slice(bytes, at).map_err(|_| ())
}

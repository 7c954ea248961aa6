//! Counters of a queue pair, and the typed reasons for everything refused.
//!
//! The guest writes the rings and descriptor chains this backend reads, so
//! every chain is validated before use and a chain that fails is
//! *refused*: handed back to the guest unused (a used-ring entry of length
//! 0, so the guest's ring does not leak) and counted by its [`Refusal`]
//! reason. A frame the caller asked to deliver to the guest and that could
//! not be is a [`SendError`], also counted. A fault in a ring itself (an
//! available index that runs ahead of the ring's size, a ring outside guest
//! memory) stops that ring until the guest or QEMU sets it up again, and is
//! counted in [`QueueStats::ring_faults`].

use palisade_wire::ErrorKind;

/// Why a descriptor chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Refusal {
    /// The available ring names a chain head outside the descriptor table.
    HeadOutOfRange,
    /// A descriptor's `next` points outside its table.
    NextOutOfRange,
    /// More descriptors than the chain cap or the table holds (a loop, at the latest after one lap).
    ChainTooLong,
    /// A descriptor (in the table or an indirect table) cannot be read from guest memory.
    DescriptorOutsideMemory,
    /// A buffer is not entirely inside guest memory.
    BufferOutsideMemory,
    /// A mergeable receive buffer shorter than the virtio-net header (§5.1.6.3.1).
    BufferTooSmall,
    /// A device-writable buffer in a chain the device reads (transmit), or the reverse (receive).
    WrongDirection,
    /// An indirect descriptor when `VIRTIO_RING_F_INDIRECT_DESC` was not negotiated.
    IndirectNotNegotiated,
    /// An indirect descriptor inside an indirect table.
    IndirectInIndirect,
    /// An indirect descriptor that also has `NEXT` set.
    IndirectWithNext,
    /// An indirect table whose length is 0, not a multiple of 16, too long, or outside guest memory.
    IndirectBadTable,
    /// A transmitted frame longer than the cap (64 KiB of IP plus link headers).
    FrameTooLarge,
    /// A transmitted chain shorter than the virtio-net header plus an Ethernet header.
    FrameTooShort,
    /// The virtio-net header holds a value the specification forbids (unknown flag or GSO type, `gso_size` 0…).
    HeaderBadValue,
    /// The virtio-net header points past the frame (checksum position, `hdr_len`).
    HeaderBadLength,
    /// The header asks for an offload (partial checksum, a kind of segmentation) the guest did not negotiate.
    OffloadNotNegotiated,
}

impl Refusal {
    /// Every reason, in counter order.
    pub const ALL: [Refusal; 16] = [
        Refusal::HeadOutOfRange,
        Refusal::NextOutOfRange,
        Refusal::ChainTooLong,
        Refusal::DescriptorOutsideMemory,
        Refusal::BufferOutsideMemory,
        Refusal::BufferTooSmall,
        Refusal::WrongDirection,
        Refusal::IndirectNotNegotiated,
        Refusal::IndirectInIndirect,
        Refusal::IndirectWithNext,
        Refusal::IndirectBadTable,
        Refusal::FrameTooLarge,
        Refusal::FrameTooShort,
        Refusal::HeaderBadValue,
        Refusal::HeaderBadLength,
        Refusal::OffloadNotNegotiated,
    ];

    /// A short stable name, for metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Refusal::HeadOutOfRange => "head-out-of-range",
            Refusal::NextOutOfRange => "next-out-of-range",
            Refusal::ChainTooLong => "chain-too-long",
            Refusal::DescriptorOutsideMemory => "descriptor-outside-memory",
            Refusal::BufferOutsideMemory => "buffer-outside-memory",
            Refusal::BufferTooSmall => "buffer-too-small",
            Refusal::WrongDirection => "wrong-direction",
            Refusal::IndirectNotNegotiated => "indirect-not-negotiated",
            Refusal::IndirectInIndirect => "indirect-in-indirect",
            Refusal::IndirectWithNext => "indirect-with-next",
            Refusal::IndirectBadTable => "indirect-bad-table",
            Refusal::FrameTooLarge => "frame-too-large",
            Refusal::FrameTooShort => "frame-too-short",
            Refusal::HeaderBadValue => "header-bad-value",
            Refusal::HeaderBadLength => "header-bad-length",
            Refusal::OffloadNotNegotiated => "offload-not-negotiated",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }

    /// The refusal for a virtio-net header the wire layer rejected.
    pub(crate) fn from_header_error(kind: ErrorKind) -> Refusal {
        match kind {
            ErrorKind::BadLength | ErrorKind::Truncated => Refusal::HeaderBadLength,
            _ => Refusal::HeaderBadValue,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Refused chains, counted by reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RefusalCounts([u64; Refusal::ALL.len()]);

impl RefusalCounts {
    /// Chains refused for `reason`.
    pub fn get(&self, reason: Refusal) -> u64 {
        self.0[reason.index()]
    }

    /// All refused chains.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Every reason with a non-zero count.
    pub fn nonzero(&self) -> impl Iterator<Item = (Refusal, u64)> + '_ {
        Refusal::ALL.iter().map(|&r| (r, self.get(r))).filter(|&(_, n)| n > 0)
    }

    pub(crate) fn count(&mut self, reason: Refusal) {
        self.0[reason.index()] += 1;
    }

    fn merge(&mut self, other: &RefusalCounts) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a += b;
        }
    }
}

/// Why a frame could not be delivered to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The guest's receive queue is not running (no guest, driver not loaded, link down, being reset).
    #[error("the guest's receive queue is not running")]
    NotRunning,
    /// The guest has not posted enough receive buffers for the frame.
    #[error("no receive buffers posted by the guest")]
    NoBuffers,
    /// The frame does not fit the guest's buffers (without mergeable buffers, one chain must hold it).
    #[error("the frame does not fit the guest's receive buffers")]
    TooBig,
    /// The frame is a super-frame of a kind the guest did not negotiate: the
    /// caller must segment it (or drop it).
    #[error("the guest does not take this kind of super-frame: segment it")]
    NeedsSegmentation,
    /// The header does not describe the frame (checksum position past its end, or the like).
    #[error("the virtio-net header does not fit the frame: {0}")]
    BadHeader(palisade_wire::Error),
    /// The guest's chains kept being refused past the per-call limit.
    #[error("too many invalid receive chains from the guest")]
    GuestFault,
}

/// Counters of one queue pair since its device was created.
///
/// Directions are named from the guest: *from guest* is what it
/// transmitted (its transmit queue, read by [`super::QueuePair::recv_batch`]),
/// *to guest* what was delivered into its receive queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    /// Frames the guest transmitted, handed to the caller.
    pub from_guest_frames: u64,
    /// Their bytes (without the virtio-net header).
    pub from_guest_bytes: u64,
    /// Of those, super-frames (a GSO type in the header).
    pub from_guest_gso_frames: u64,
    /// Of those, frames whose checksum was partial (`NEEDS_CSUM`).
    pub from_guest_partial_csum: u64,
    /// Frames delivered into the guest's receive queue.
    pub to_guest_frames: u64,
    /// Their bytes (without the virtio-net header).
    pub to_guest_bytes: u64,
    /// Of those, super-frames.
    pub to_guest_gso_frames: u64,
    /// Receive chains those frames filled (more than the frames with mergeable buffers).
    pub to_guest_buffers: u64,
    /// Frames not delivered to the guest, by [`SendError`]: not running.
    pub to_guest_not_running: u64,
    /// … no receive buffers.
    pub to_guest_no_buffers: u64,
    /// … too big for the guest's buffers.
    pub to_guest_too_big: u64,
    /// … a super-frame the guest does not take (the caller must segment).
    pub to_guest_needs_segmentation: u64,
    /// … a header that does not fit its frame.
    pub to_guest_bad_header: u64,
    /// … too many invalid receive chains.
    pub to_guest_guest_fault: u64,
    /// Partial checksums completed here: for a guest without `GUEST_CSUM`,
    /// and for callers that take only complete frames.
    pub csum_completed: u64,
    /// Super-frames from the guest not delivered to a caller that takes only
    /// plain frames ([`crate::FramePort`]).
    pub gso_undeliverable: u64,
    /// Chains refused, by reason.
    pub refused: RefusalCounts,
    /// Ring faults (available index past the ring size, ring outside memory): the ring stops.
    pub ring_faults: u64,
    /// Calls that stopped at their budget with work left (the pair's fd stays readable).
    pub budget_exhausted: u64,
    /// Notifications sent to the guest (call eventfd writes).
    pub guest_notifications: u64,
    /// RARP announcements injected for QEMU (`SEND_RARP`), handed over as frames
    /// from the guest (not counted in `from_guest_frames`).
    pub announcements_injected: u64,
    /// Announcements dropped because too many were already waiting.
    pub announcements_dropped: u64,
}

impl QueueStats {
    /// Add `other`'s counts to these (several queue pairs of one device).
    pub fn merge(&mut self, other: &QueueStats) {
        let QueueStats {
            from_guest_frames,
            from_guest_bytes,
            from_guest_gso_frames,
            from_guest_partial_csum,
            to_guest_frames,
            to_guest_bytes,
            to_guest_gso_frames,
            to_guest_buffers,
            to_guest_not_running,
            to_guest_no_buffers,
            to_guest_too_big,
            to_guest_needs_segmentation,
            to_guest_bad_header,
            to_guest_guest_fault,
            csum_completed,
            gso_undeliverable,
            refused,
            ring_faults,
            budget_exhausted,
            guest_notifications,
            announcements_injected,
            announcements_dropped,
        } = other;
        self.from_guest_frames += from_guest_frames;
        self.from_guest_bytes += from_guest_bytes;
        self.from_guest_gso_frames += from_guest_gso_frames;
        self.from_guest_partial_csum += from_guest_partial_csum;
        self.to_guest_frames += to_guest_frames;
        self.to_guest_bytes += to_guest_bytes;
        self.to_guest_gso_frames += to_guest_gso_frames;
        self.to_guest_buffers += to_guest_buffers;
        self.to_guest_not_running += to_guest_not_running;
        self.to_guest_no_buffers += to_guest_no_buffers;
        self.to_guest_too_big += to_guest_too_big;
        self.to_guest_needs_segmentation += to_guest_needs_segmentation;
        self.to_guest_bad_header += to_guest_bad_header;
        self.to_guest_guest_fault += to_guest_guest_fault;
        self.csum_completed += csum_completed;
        self.gso_undeliverable += gso_undeliverable;
        self.refused.merge(refused);
        self.ring_faults += ring_faults;
        self.budget_exhausted += budget_exhausted;
        self.guest_notifications += guest_notifications;
        self.announcements_injected += announcements_injected;
        self.announcements_dropped += announcements_dropped;
    }

    /// Frames not delivered to the guest, all reasons.
    pub fn to_guest_dropped(&self) -> u64 {
        self.to_guest_not_running
            + self.to_guest_no_buffers
            + self.to_guest_too_big
            + self.to_guest_needs_segmentation
            + self.to_guest_bad_header
            + self.to_guest_guest_fault
    }

    pub(crate) fn count_send_error(&mut self, e: SendError) {
        match e {
            SendError::NotRunning => self.to_guest_not_running += 1,
            SendError::NoBuffers => self.to_guest_no_buffers += 1,
            SendError::TooBig => self.to_guest_too_big += 1,
            SendError::NeedsSegmentation => self.to_guest_needs_segmentation += 1,
            SendError::BadHeader(_) => self.to_guest_bad_header += 1,
            SendError::GuestFault => self.to_guest_guest_fault += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_counter_order_matches_the_list() {
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r}");
        }
        let names: std::collections::HashSet<_> = Refusal::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), Refusal::ALL.len(), "names are unique");
    }

    #[test]
    fn merge_adds_every_counter() {
        let mut a = QueueStats {
            from_guest_frames: 1,
            to_guest_no_buffers: 2,
            ..QueueStats::default()
        };
        a.refused.count(Refusal::ChainTooLong);
        let b = a;
        a.merge(&b);
        assert_eq!(a.from_guest_frames, 2);
        assert_eq!(a.to_guest_dropped(), 4);
        assert_eq!(a.refused.get(Refusal::ChainTooLong), 2);
        assert_eq!(
            a.refused.nonzero().collect::<Vec<_>>(),
            vec![(Refusal::ChainTooLong, 2)]
        );
    }
}

//! One split virtqueue, device side: popping available chains, returning used ones.
//!
//! `virtio_queue::Queue` keeps the ring's configuration and validates it
//! (size a power of two, alignment, the three areas inside guest memory),
//! reads the available side (the index with acquire ordering, refusing one
//! that runs more than a ring's size ahead) and switches the guest's
//! notifications on and off (`VRING_USED_F_NO_NOTIFY`, or the `avail_event`
//! index with `EVENT_IDX`). The used side is written here instead, because
//! `Queue::add_used` publishes the used index after every element: a frame
//! spread over several mergeable receive buffers must appear to the guest
//! all at once (Linux's `receive_mergeable` drops a frame whose later
//! buffers are not used yet), and transmit completions are cheaper
//! published once per batch. `Virtqueue::publish` stores the index once
//! and decides whether the guest wants an interrupt (`used_event` with
//! `EVENT_IDX`, else `VRING_AVAIL_F_NO_INTERRUPT`), as Linux's
//! `virtqueue_kick_prepare` does on the other side.

use std::num::Wrapping;
use std::sync::atomic::{Ordering, fence};

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Error as QueueError, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// Largest ring the device accepts (the virtio maximum for split rings).
pub const MAX_QUEUE_SIZE: u16 = 32_768;

/// Where a ring lives in guest memory, and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Entries (a power of two, at most [`MAX_QUEUE_SIZE`]).
    pub size: u16,
    /// Guest-physical address of the descriptor table (16-byte aligned).
    pub desc_table: u64,
    /// Guest-physical address of the available ring (2-byte aligned).
    pub avail_ring: u64,
    /// Guest-physical address of the used ring (4-byte aligned).
    pub used_ring: u64,
}

/// Why a ring stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingFault {
    /// The size is not a power of two up to [`MAX_QUEUE_SIZE`], or an address is misaligned.
    #[error("ring size or alignment is invalid")]
    Layout,
    /// A ring area is not inside guest memory.
    #[error("ring is outside guest memory")]
    OutsideMemory,
    /// The available index ran more than the ring's size ahead of what was consumed.
    #[error("available index ran ahead of the ring")]
    AvailIndex,
    /// More chains in use at once than the ring holds: the guest made chains
    /// available again before they were returned (a driver cannot, unless it
    /// reuses descriptors it does not own). Returning them would overwrite
    /// used elements the guest has not been shown yet.
    #[error("more chains in use than the ring holds")]
    Overcommitted,
}

fn fault_of(e: QueueError) -> RingFault {
    match e {
        QueueError::InvalidAvailRingIndex => RingFault::AvailIndex,
        QueueError::InvalidSize
        | QueueError::InvalidDescTableAlign
        | QueueError::InvalidAvailRingAlign
        | QueueError::InvalidUsedRingAlign
        | QueueError::QueueNotReady => RingFault::Layout,
        _ => RingFault::OutsideMemory,
    }
}

/// Offset of the used ring's `idx` field.
const USED_IDX_AT: u64 = 2;
/// Offset of the used ring's first element.
const USED_RING_AT: u64 = 4;
/// Size of one used element (`id: le32, len: le32`).
const USED_ELEM_LEN: u64 = 8;
/// Offset of the available ring's first element (after `flags` and `idx`).
const AVAIL_RING_AT: u64 = 4;

/// One virtqueue as the device sees it.
#[derive(Debug)]
pub(crate) struct Virtqueue {
    queue: Queue,
    running: bool,
    /// Where the next used element goes.
    next_used: Wrapping<u16>,
    /// The used index the guest has been shown.
    published: Wrapping<u16>,
}

impl Virtqueue {
    pub fn new() -> Virtqueue {
        Virtqueue {
            // MAX_QUEUE_SIZE is a power of two within the virtio limit: cannot fail.
            queue: Queue::new(MAX_QUEUE_SIZE).unwrap_or_default(),
            running: false,
            next_used: Wrapping(0),
            published: Wrapping(0),
        }
    }

    /// Whether the ring is being processed.
    pub fn running(&self) -> bool {
        self.running
    }

    /// Start processing the ring at `layout`, at available index `next_avail`
    /// (from `SET_VRING_BASE`); the used index is read back from guest
    /// memory (0 after a driver reset, the last published one after a reconnect).
    pub fn start<M: GuestMemory>(
        &mut self,
        mem: &M,
        layout: RingLayout,
        next_avail: u16,
        event_idx: bool,
    ) -> Result<(), RingFault> {
        self.running = false;
        self.queue.reset();
        self.queue.try_set_size(layout.size).map_err(fault_of)?;
        self.queue
            .try_set_desc_table_address(GuestAddress(layout.desc_table))
            .map_err(fault_of)?;
        self.queue
            .try_set_avail_ring_address(GuestAddress(layout.avail_ring))
            .map_err(fault_of)?;
        self.queue
            .try_set_used_ring_address(GuestAddress(layout.used_ring))
            .map_err(fault_of)?;
        // Queue::iter takes an available ring at 0 for an unconfigured queue.
        if layout.avail_ring == 0 {
            return Err(RingFault::Layout);
        }
        self.queue.set_event_idx(event_idx);
        self.queue.set_ready(true);
        if !self.queue.is_valid(mem) {
            self.queue.set_ready(false);
            return Err(RingFault::OutsideMemory);
        }
        self.queue.set_next_avail(next_avail);
        let used = self.queue.used_idx(mem, Ordering::Acquire).map_err(fault_of)?;
        self.next_used = used;
        self.published = used;
        self.running = true;
        Ok(())
    }

    /// Stop processing; returns the next available index (for `GET_VRING_BASE`).
    pub fn stop(&mut self) -> u16 {
        self.running = false;
        self.queue.next_avail()
    }

    /// Stop after a fault.
    pub fn fault(&mut self) {
        self.running = false;
    }

    /// The ring's size.
    pub fn size(&self) -> u16 {
        self.queue.size()
    }

    /// The descriptor table's address.
    pub fn desc_table(&self) -> GuestAddress {
        GuestAddress(self.queue.desc_table())
    }

    /// The next available chain's head index, if the guest has made one available.
    pub fn pop<M: GuestMemory>(&mut self, mem: &M) -> Result<Option<u16>, RingFault> {
        let mut chains = self.queue.iter(mem).map_err(fault_of)?;
        Ok(chains.next().map(|c| c.head_index()))
    }

    /// Give back the chain `pop` returned last: it will be popped again.
    pub fn unpop(&mut self) {
        self.queue.go_to_previous_position();
    }

    /// Return chain `head` to the guest with `len` bytes written; visible at the next [`Self::publish`].
    pub fn push_used<M: GuestMemory>(&mut self, mem: &M, head: u16, len: u32) -> Result<(), RingFault> {
        if (self.next_used - self.published).0 >= self.queue.size() {
            return Err(RingFault::Overcommitted);
        }
        let slot = u64::from(self.next_used.0 % self.queue.size());
        let at = GuestAddress(self.queue.used_ring())
            .checked_add(USED_RING_AT + slot * USED_ELEM_LEN)
            .ok_or(RingFault::OutsideMemory)?;
        let mut elem = [0u8; USED_ELEM_LEN as usize];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, at).map_err(|_| RingFault::OutsideMemory)?;
        self.next_used += Wrapping(1);
        Ok(())
    }

    /// Whether used elements wait to be published.
    pub fn has_unpublished(&self) -> bool {
        self.next_used != self.published
    }

    /// Show the guest every used element pushed so far (one release store of
    /// the used index); returns whether the guest asked to be notified.
    pub fn publish<M: GuestMemory>(&mut self, mem: &M) -> Result<bool, RingFault> {
        if !self.has_unpublished() {
            return Ok(false);
        }
        let used = GuestAddress(self.queue.used_ring());
        let idx_at = used.checked_add(USED_IDX_AT).ok_or(RingFault::OutsideMemory)?;
        // Release: the elements (and the buffers they describe) are visible before the index.
        mem.store(self.next_used.0.to_le(), idx_at, Ordering::Release)
            .map_err(|_| RingFault::OutsideMemory)?;
        let old = self.published;
        let new = self.next_used;
        self.published = new;
        // The index store must be visible before the guest's suppression fields are read.
        fence(Ordering::SeqCst);
        let avail = GuestAddress(self.queue.avail_ring());
        if self.queue.event_idx_enabled() {
            let at = avail
                .checked_add(AVAIL_RING_AT + 2 * u64::from(self.queue.size()))
                .ok_or(RingFault::OutsideMemory)?;
            let used_event: u16 = mem.load(at, Ordering::Relaxed).map_err(|_| RingFault::OutsideMemory)?;
            let used_event = Wrapping(u16::from_le(used_event));
            // vring_need_event: notify if used_event lies in (old, new].
            Ok((new - used_event - Wrapping(1)).0 < (new - old).0)
        } else {
            let flags: u16 = mem
                .load(avail, Ordering::Relaxed)
                .map_err(|_| RingFault::OutsideMemory)?;
            Ok(u32::from(u16::from_le(flags)) & VRING_AVAIL_F_NO_INTERRUPT == 0)
        }
    }

    /// Ask the guest to notify us when it makes more chains available; returns
    /// whether some already are (then it may not notify).
    pub fn enable_notification<M: GuestMemory>(&mut self, mem: &M) -> Result<bool, RingFault> {
        self.queue.enable_notification(mem).map_err(fault_of)
    }

    /// Ask the guest not to notify us (no-op with `EVENT_IDX`, where
    /// notifications stop by themselves until re-enabled).
    pub fn disable_notification<M: GuestMemory>(&mut self, mem: &M) -> Result<(), RingFault> {
        self.queue.disable_notification(mem).map_err(fault_of)
    }
}

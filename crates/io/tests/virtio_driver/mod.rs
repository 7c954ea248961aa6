//! A virtio driver model: the guest's side of split virtqueues, for the
//! tests, the benchmark and the fuzz target of `palisade_io::vhost_user`.
//!
//! It lays rings out in a guest memory, makes descriptor chains available
//! (direct or through an indirect table), publishes the available index and
//! reads back the used ring, as Linux's `virtio_ring.c` does; plus raw
//! access for hostile cases (any descriptor, any head, any index). Frames
//! for the tests come from [`tcp4_frame`].
#![allow(dead_code)]

use std::sync::atomic::Ordering;

use palisade_io::vhost_user::RingLayout;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Descriptor flags.
pub const F_NEXT: u16 = 1;
/// The device writes this buffer.
pub const F_WRITE: u16 = 2;
/// The buffer is a table of descriptors.
pub const F_INDIRECT: u16 = 4;

/// One buffer of a chain: guest address, length, device-writable.
pub type Buf = (u64, u32, bool);

/// Round `v` up to a multiple of `a` (a power of two).
pub fn align(v: u64, a: u64) -> u64 {
    (v + a - 1) & !(a - 1)
}

/// The driver's side of one split virtqueue.
#[derive(Debug, Clone)]
pub struct DriverRing {
    pub layout: RingLayout,
    free: Vec<u16>,
    /// Descriptor indices of each available chain, by head.
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    used_seen: u16,
}

fn write_desc<M: GuestMemory>(mem: &M, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&d, GuestAddress(table + u64::from(index) * 16))
        .expect("descriptor in memory");
}

impl DriverRing {
    /// A ring of `size` entries at `base`: descriptor table, then the
    /// available ring, then (4-aligned) the used ring.
    pub fn new(base: u64, size: u16) -> DriverRing {
        let desc_table = align(base, 16);
        let avail_ring = desc_table + 16 * u64::from(size);
        let used_ring = align(avail_ring + 6 + 2 * u64::from(size), 4);
        DriverRing {
            layout: RingLayout {
                size,
                desc_table,
                avail_ring,
                used_ring,
            },
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); usize::from(size)],
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// The first address after the ring.
    pub fn end(&self) -> u64 {
        self.layout.used_ring + 6 + 8 * u64::from(self.layout.size)
    }

    /// Zero the ring's memory.
    pub fn init<M: GuestMemory>(&self, mem: &M) {
        let len = (self.end() - self.layout.desc_table) as usize;
        mem.write_slice(&vec![0u8; len], GuestAddress(self.layout.desc_table))
            .expect("ring in memory");
    }

    /// Free descriptors.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Make a direct chain of `bufs` available (not yet published); its head, or
    /// `None` without enough free descriptors.
    pub fn add<M: GuestMemory>(&mut self, mem: &M, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return None;
        }
        let ids: Vec<u16> = (0..bufs.len()).map(|_| self.free.pop().unwrap()).collect();
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let mut flags = if writable { F_WRITE } else { 0 };
            let next = ids.get(i + 1).copied().unwrap_or(0);
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            write_desc(mem, self.layout.desc_table, ids[i], addr, len, flags, next);
        }
        let head = ids[0];
        self.chains[usize::from(head)] = ids;
        self.push_head(mem, head);
        Some(head)
    }

    /// Make a chain available as one descriptor naming an indirect table of
    /// `bufs`, written at `table` (16 bytes per buffer).
    pub fn add_indirect<M: GuestMemory>(&mut self, mem: &M, table: u64, bufs: &[Buf]) -> Option<u16> {
        let head = self.free.pop()?;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let mut flags = if writable { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            write_desc(mem, table, i as u16, addr, len, flags, (i + 1) as u16);
        }
        write_desc(
            mem,
            self.layout.desc_table,
            head,
            table,
            16 * bufs.len() as u32,
            F_INDIRECT,
            0,
        );
        self.chains[usize::from(head)] = vec![head];
        self.push_head(mem, head);
        Some(head)
    }

    /// Write any descriptor (hostile chains); the driver model does not track it.
    pub fn write_raw<M: GuestMemory>(&self, mem: &M, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc(mem, self.layout.desc_table, index, addr, len, flags, next);
    }

    /// Put `head` in the available ring (not yet published), whatever it is.
    pub fn push_head<M: GuestMemory>(&mut self, mem: &M, head: u16) {
        let slot = u64::from(self.avail_idx % self.layout.size);
        mem.write_obj(head.to_le(), GuestAddress(self.layout.avail_ring + 4 + 2 * slot))
            .expect("available ring in memory");
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publish the available index (release: the chains are written before it).
    pub fn publish<M: GuestMemory>(&self, mem: &M) {
        mem.store(
            self.avail_idx.to_le(),
            GuestAddress(self.layout.avail_ring + 2),
            Ordering::Release,
        )
        .expect("available ring in memory");
    }

    /// Publish any available index (hostile).
    pub fn publish_raw<M: GuestMemory>(&mut self, mem: &M, idx: u16) {
        self.avail_idx = idx;
        self.publish(mem);
    }

    /// The used index the device published.
    pub fn used_idx<M: GuestMemory>(&self, mem: &M) -> u16 {
        u16::from_le(
            mem.load(GuestAddress(self.layout.used_ring + 2), Ordering::Acquire)
                .expect("used ring"),
        )
    }

    /// The used elements published since the last call, as (head, length);
    /// their descriptors become free again.
    pub fn used<M: GuestMemory>(&mut self, mem: &M) -> Vec<(u32, u32)> {
        let idx = self.used_idx(mem);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.layout.size);
            let at = GuestAddress(self.layout.used_ring + 4 + 8 * slot);
            let id: u32 = u32::from_le(mem.read_obj(at).expect("used ring"));
            let len: u32 = u32::from_le(mem.read_obj(GuestAddress(at.0 + 4)).expect("used ring"));
            if let Some(ids) = self.chains.get_mut(id as usize) {
                self.free.append(ids);
            }
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// The available ring's `used_event` (EVENT_IDX: interrupt me when the used index passes it).
    pub fn set_used_event<M: GuestMemory>(&self, mem: &M, v: u16) {
        let at = self.layout.avail_ring + 4 + 2 * u64::from(self.layout.size);
        mem.write_obj(v.to_le(), GuestAddress(at)).expect("available ring");
    }

    /// The available ring's flags (`VRING_AVAIL_F_NO_INTERRUPT` = 1).
    pub fn set_avail_flags<M: GuestMemory>(&self, mem: &M, v: u16) {
        mem.write_obj(v.to_le(), GuestAddress(self.layout.avail_ring))
            .expect("available ring");
    }

    /// The used ring's flags (`VRING_USED_F_NO_NOTIFY` = 1).
    pub fn used_flags<M: GuestMemory>(&self, mem: &M) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.layout.used_ring)).expect("used ring"))
    }

    /// The used ring's `avail_event` (EVENT_IDX: kick me when the available index passes it).
    pub fn avail_event<M: GuestMemory>(&self, mem: &M) -> u16 {
        let at = self.layout.used_ring + 4 + 8 * u64::from(self.layout.size);
        u16::from_le(mem.read_obj(GuestAddress(at)).expect("used ring"))
    }
}

/// A bump allocator of buffer space.
#[derive(Debug, Clone)]
pub struct Bump {
    pub next: u64,
    pub end: u64,
}

impl Bump {
    pub fn new(start: u64, end: u64) -> Bump {
        Bump { next: start, end }
    }

    /// `len` bytes aligned to 16; panics when the space is used up.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let at = align(self.next, 16);
        assert!(at + len <= self.end, "test buffer space exhausted");
        self.next = at + len;
        at
    }
}

/// An Ethernet + IPv4 + TCP frame with `payload` bytes (a counting pattern),
/// its TCP checksum left partial (the pseudo-header sum) as a sender with
/// TX checksum offload leaves it; `csum_start` is 34 and `csum_offset` 16.
pub fn tcp4_frame(payload: usize, seq: u32) -> Vec<u8> {
    let mut f = vec![0u8; 54 + payload];
    f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip_len = (20 + 20 + payload).min(0xffff) as u16;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let c = !palisade_wire::checksum::fold(palisade_wire::checksum::sum(ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5001u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = 0x18;
    tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    let pseudo = palisade_wire::checksum::pseudo_header_v4([10, 0, 0, 1], [10, 0, 0, 2], 6, 20 + payload as u16);
    f[50..52].copy_from_slice(&palisade_wire::checksum::fold(pseudo).to_be_bytes());
    for (i, b) in f[54..].iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(31).wrapping_add(seq) as u8;
    }
    f
}

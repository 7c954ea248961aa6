//! Walking and validating one descriptor chain.
//!
//! A chain is the guest's description of one buffer: a linked list of
//! descriptors (address, length, flags, next) in the descriptor table, or in
//! an indirect table one descriptor points to. Every field is written by
//! the guest, so [`walk`] checks all of it before anything is copied: the
//! head and every `next` inside their table, the number of descriptors
//! (which also ends a loop, at the latest after one lap of the table), each
//! descriptor's direction, each buffer entirely inside guest memory, the
//! indirect rules of virtio 1.x §2.7.5.3, and an optional cap on the total
//! length. The result is the list of buffers, read once: the guest changing
//! a descriptor after the walk changes nothing here.
//!
//! `virtio_queue::DescriptorChain` also walks chains, but ends the iteration
//! silently on a bad `next`, an unreadable descriptor or a bad indirect
//! table, so a malformed chain looks like a shorter well-formed one; this
//! walker names what was wrong instead ([`Refusal`]).

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use super::stats::Refusal;

/// Size of one descriptor in a table.
const DESCRIPTOR_LEN: u64 = 16;

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    /// Guest-physical address.
    pub addr: GuestAddress,
    /// Length in bytes (never 0: empty descriptors are skipped).
    pub len: u32,
}

/// Which way the device uses a chain's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// The device reads them (the guest's transmit queue).
    DeviceReads,
    /// The device writes them (the guest's receive queue).
    DeviceWrites,
}

/// What a chain may be.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChainRules {
    /// Which way every buffer must go.
    pub direction: Direction,
    /// Most descriptors in one chain, the indirect ones included.
    pub max_descriptors: usize,
    /// Whether indirect tables were negotiated.
    pub indirect: bool,
    /// Longest total length, if capped ([`Refusal::FrameTooLarge`] beyond).
    pub max_len: Option<u64>,
}

/// Walk the chain whose head is entry `head` of the descriptor table at
/// `table` (of `size` entries), checking it against `rules`. On success
/// `segments` holds its buffers in order and the total length is returned.
pub(crate) fn walk<M: GuestMemory + ?Sized>(
    mem: &M,
    table: GuestAddress,
    size: u16,
    head: u16,
    rules: &ChainRules,
    segments: &mut Vec<Segment>,
) -> Result<u64, Refusal> {
    segments.clear();
    if head >= size {
        return Err(Refusal::HeadOutOfRange);
    }
    let (needs_write, permission) = match rules.direction {
        Direction::DeviceReads => (false, Permissions::Read),
        Direction::DeviceWrites => (true, Permissions::Write),
    };
    let mut table = table;
    let mut table_len = u64::from(size);
    let mut index = u64::from(head);
    let mut in_indirect = false;
    // Descriptors in the whole chain, and in the current table (a lap of it means a loop).
    let mut seen = 0usize;
    let mut seen_here = 0u64;
    let mut total = 0u64;
    loop {
        seen += 1;
        seen_here += 1;
        if seen > rules.max_descriptors || seen_here > table_len {
            return Err(Refusal::ChainTooLong);
        }
        // index < table_len ≤ 2^28 (a u32 length / 16), so this cannot overflow a u64.
        let at = table
            .checked_add(index * DESCRIPTOR_LEN)
            .ok_or(Refusal::DescriptorOutsideMemory)?;
        let desc: Descriptor = mem.read_obj(at).map_err(|_| Refusal::DescriptorOutsideMemory)?;
        let flags = u32::from(desc.flags());
        if flags & VRING_DESC_F_INDIRECT != 0 {
            if !rules.indirect {
                return Err(Refusal::IndirectNotNegotiated);
            }
            if in_indirect {
                return Err(Refusal::IndirectInIndirect);
            }
            if flags & VRING_DESC_F_NEXT != 0 {
                return Err(Refusal::IndirectWithNext);
            }
            let len = u64::from(desc.len());
            if len == 0 || len % DESCRIPTOR_LEN != 0 || !mem.check_range(desc.addr(), len as usize, Permissions::Read) {
                return Err(Refusal::IndirectBadTable);
            }
            // The write flag of the descriptor naming the table is ignored (§2.7.5.3.2).
            table = desc.addr();
            table_len = len / DESCRIPTOR_LEN;
            index = 0;
            in_indirect = true;
            seen_here = 0;
            continue;
        }
        if (flags & VRING_DESC_F_WRITE != 0) != needs_write {
            return Err(Refusal::WrongDirection);
        }
        let len = desc.len();
        if len > 0 {
            if !mem.check_range(desc.addr(), len as usize, permission) {
                return Err(Refusal::BufferOutsideMemory);
            }
            total += u64::from(len);
            if rules.max_len.is_some_and(|max| total > max) {
                return Err(Refusal::FrameTooLarge);
            }
            segments.push(Segment { addr: desc.addr(), len });
        }
        if flags & VRING_DESC_F_NEXT == 0 {
            return Ok(total);
        }
        index = u64::from(desc.next());
        if index >= table_len {
            return Err(Refusal::NextOutOfRange);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const TABLE: u64 = 0x1000;
    const SIZE: u16 = 8;
    const READ: Direction = Direction::DeviceReads;

    fn mem() -> GuestMemoryMmap {
        // Two regions with a hole between them (0x4000..0x10000).
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000), (GuestAddress(0x10000), 0x1000)]).unwrap()
    }

    fn put(m: &GuestMemoryMmap, table: u64, i: u16, addr: u64, len: u32, flags: u32, next: u16) {
        let d = Descriptor::new(addr, len, flags as u16, next);
        m.write_obj(d, GuestAddress(table + u64::from(i) * 16)).unwrap();
    }

    fn rules(direction: Direction) -> ChainRules {
        ChainRules {
            direction,
            max_descriptors: 4,
            indirect: true,
            max_len: Some(0x800),
        }
    }

    fn run(m: &GuestMemoryMmap, head: u16, r: &ChainRules) -> Result<(u64, Vec<Segment>), Refusal> {
        let mut segs = Vec::new();
        walk(m, GuestAddress(TABLE), SIZE, head, r, &mut segs).map(|n| (n, segs))
    }

    #[test]
    fn walks_a_direct_chain_and_skips_empty_descriptors() {
        let m = mem();
        put(&m, TABLE, 0, 0x2000, 100, VRING_DESC_F_NEXT, 5);
        put(&m, TABLE, 5, 0x2100, 0, VRING_DESC_F_NEXT, 3);
        put(&m, TABLE, 3, 0x10000, 200, 0, 0);
        let (n, segs) = run(&m, 0, &rules(READ)).unwrap();
        assert_eq!(n, 300);
        assert_eq!(
            segs,
            vec![
                Segment {
                    addr: GuestAddress(0x2000),
                    len: 100
                },
                Segment {
                    addr: GuestAddress(0x10000),
                    len: 200
                }
            ]
        );
    }

    #[test]
    fn walks_an_indirect_table() {
        let m = mem();
        put(&m, TABLE, 2, 0x3000, 32, VRING_DESC_F_INDIRECT, 0);
        put(&m, 0x3000, 0, 0x2000, 10, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1);
        put(&m, 0x3000, 1, 0x2100, 20, VRING_DESC_F_WRITE, 0);
        let (n, segs) = run(&m, 2, &rules(Direction::DeviceWrites)).unwrap();
        assert_eq!((n, segs.len()), (30, 2));
    }

    #[test]
    fn refuses_each_kind_of_bad_chain() {
        // (what, descriptors to write as (table, index, addr, len, flags, next), head, rules tweak, refusal)
        type Desc = (u64, u16, u64, u32, u32, u16);
        let n = VRING_DESC_F_NEXT;
        let w = VRING_DESC_F_WRITE;
        let ind = VRING_DESC_F_INDIRECT;
        type Case = (&'static str, Vec<Desc>, u16, fn(&mut ChainRules), Refusal);
        let cases: Vec<Case> = vec![
            ("head past the table", vec![], SIZE, |_| {}, Refusal::HeadOutOfRange),
            (
                "next past the table",
                vec![(TABLE, 0, 0x2000, 10, n, SIZE)],
                0,
                |_| {},
                Refusal::NextOutOfRange,
            ),
            (
                "a two-descriptor loop",
                vec![(TABLE, 0, 0x2000, 10, n, 1), (TABLE, 1, 0x2000, 10, n, 0)],
                0,
                |r| r.max_descriptors = 1000,
                Refusal::ChainTooLong,
            ),
            (
                "longer than the cap",
                (0..6).map(|i| (TABLE, i, 0x2000, 1, n, i + 1)).collect(),
                0,
                |_| {},
                Refusal::ChainTooLong,
            ),
            (
                "buffer across the hole between regions",
                vec![(TABLE, 0, 0x3f00, 0x200, 0, 0)],
                0,
                |_| {},
                Refusal::BufferOutsideMemory,
            ),
            (
                "buffer at an address with no memory",
                vec![(TABLE, 0, 0x8000_0000, 1, 0, 0)],
                0,
                |_| {},
                Refusal::BufferOutsideMemory,
            ),
            (
                "buffer whose end wraps the address space",
                vec![(TABLE, 0, u64::MAX - 4, 100, 0, 0)],
                0,
                |_| {},
                Refusal::BufferOutsideMemory,
            ),
            (
                "device-writable buffer in a transmit chain",
                vec![(TABLE, 0, 0x2000, 10, n, 1), (TABLE, 1, 0x2000, 10, w, 0)],
                0,
                |_| {},
                Refusal::WrongDirection,
            ),
            (
                "readable buffer in a receive chain",
                vec![(TABLE, 0, 0x2000, 10, 0, 0)],
                0,
                |r| r.direction = Direction::DeviceWrites,
                Refusal::WrongDirection,
            ),
            (
                "indirect without negotiation",
                vec![(TABLE, 0, 0x3000, 16, ind, 0)],
                0,
                |r| r.indirect = false,
                Refusal::IndirectNotNegotiated,
            ),
            (
                "indirect with next",
                vec![(TABLE, 0, 0x3000, 16, ind | n, 1)],
                0,
                |_| {},
                Refusal::IndirectWithNext,
            ),
            (
                "indirect table of 0 bytes",
                vec![(TABLE, 0, 0x3000, 0, ind, 0)],
                0,
                |_| {},
                Refusal::IndirectBadTable,
            ),
            (
                "indirect table of 20 bytes",
                vec![(TABLE, 0, 0x3000, 20, ind, 0)],
                0,
                |_| {},
                Refusal::IndirectBadTable,
            ),
            (
                "indirect table outside memory",
                vec![(TABLE, 0, 0x3ff0, 32, ind, 0)],
                0,
                |_| {},
                Refusal::IndirectBadTable,
            ),
            (
                "indirect in indirect",
                vec![(TABLE, 0, 0x3000, 16, ind, 0), (0x3000, 0, 0x3800, 16, ind, 0)],
                0,
                |_| {},
                Refusal::IndirectInIndirect,
            ),
            (
                "indirect loop",
                vec![
                    (TABLE, 0, 0x3000, 32, ind, 0),
                    (0x3000, 0, 0x2000, 1, n, 1),
                    (0x3000, 1, 0x2000, 1, n, 0),
                ],
                0,
                |r| r.max_descriptors = 1000,
                Refusal::ChainTooLong,
            ),
            (
                "total past the cap",
                vec![(TABLE, 0, 0x2000, 0x400, n, 1), (TABLE, 1, 0x2400, 0x401, 0, 0)],
                0,
                |_| {},
                Refusal::FrameTooLarge,
            ),
        ];
        for (what, descs, head, tweak, want) in cases {
            let m = mem();
            for (t, i, a, l, f, nx) in descs {
                put(&m, t, i, a, l, f, nx);
            }
            let mut r = rules(READ);
            tweak(&mut r);
            assert_eq!(run(&m, head, &r).map(|(n, _)| n), Err(want), "{what}");
        }
    }

    #[test]
    fn a_table_outside_memory_is_refused_not_read() {
        let m = mem();
        let mut segs = Vec::new();
        let r = walk(&m, GuestAddress(0x5000), SIZE, 0, &rules(READ), &mut segs);
        assert_eq!(r, Err(Refusal::DescriptorOutsideMemory));
    }
}

//! A bounded, preallocated map from flow keys to slots.
//!
//! The connection table is a `BoundedMap`: values live in a slab allocated
//! once at the table's capacity and are named by slot index (indices, not
//! pointers, so the tables can be exported and shared by shard), and the key
//! index is a hash table reserved to the same capacity, so inserting and
//! removing never allocates after construction. A full table refuses
//! inserts; what to do then (evict, refuse) is the owner's policy.
//!
//! The index holds slot numbers only, not keys: a key is compared where it
//! already lives, in its slot, and only when the 7 hash bits the index keeps
//! per entry match. That makes the index 5 bytes per bucket instead of 49 (a
//! copy of the 44-byte key beside the slot): 10 MB instead of 103 for a
//! million connections (2^21 buckets). Every new flow probes it at a random
//! place, so its size decides how often that probe waits on memory.
//!
//! # Tables are not written at creation
//!
//! An agent builds these tables (megabytes per worker) on every start, and a
//! restart after a crash is on the critical path of every new flow. Writing
//! each slot at creation faulted in and wrote every page before the first
//! packet; instead the memory comes from the kernel zeroed and untouched, and
//! a page is faulted in when a slot in it is first used. The slab of a
//! `BoundedMap` grows within its reserved capacity as slots are handed out (a
//! slot past its length is empty); the flow cache's buckets, placed at random,
//! live in a [`ZeroedTable`], whose element type states through [`ZeroEmpty`]
//! that all-zero bytes are its empty value.

use core::hash::BuildHasher;

use foldhash::fast::RandomState;
use hashbrown::HashTable;

use palisade_wire::flow::FlowKey;

/// A slot index.
pub type Slot = u32;

/// A fixed-capacity key → value map with stable slot indices.
#[derive(Debug)]
pub struct BoundedMap<V> {
    /// The slots of the entries, by their keys' hashes.
    index: HashTable<Slot>,
    /// Keys are attacker-influenced: the hasher is seeded randomly per table.
    hasher: RandomState,
    /// The slab, reserved at `capacity` and grown within it as slots are
    /// first handed out (so never reallocated): slots past its length have
    /// never been used, and the memory under them is not yet touched.
    slots: Vec<Option<(FlowKey, V)>>,
    /// Slots freed by removals, reused (last freed first) before the slab grows.
    free: Vec<Slot>,
    capacity: usize,
    /// Where the next eviction scan starts (a clock hand).
    hand: usize,
}

impl<V: Clone> Clone for BoundedMap<V> {
    /// A copy with the same reserved capacity (a derived clone would reserve
    /// only the slots used, and the copy would reallocate as it grew).
    fn clone(&self) -> Self {
        let mut slots = table_vec(self.capacity);
        slots.extend_from_slice(&self.slots);
        let mut free = Vec::with_capacity(self.capacity);
        free.extend_from_slice(&self.free);
        BoundedMap {
            index: self.index.clone(),
            hasher: self.hasher.clone(),
            slots,
            free,
            capacity: self.capacity,
            hand: self.hand,
        }
    }
}

impl<V> BoundedMap<V> {
    /// A map holding at most `capacity` entries (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, Slot::MAX as usize);
        BoundedMap {
            index: HashTable::with_capacity(capacity),
            hasher: RandomState::default(),
            slots: table_vec(capacity),
            free: Vec::with_capacity(capacity),
            capacity,
            hand: 0,
        }
    }

    /// Maximum number of entries.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Current number of entries.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Whether the map is full.
    pub fn is_full(&self) -> bool {
        self.free.is_empty() && self.slots.len() == self.capacity
    }

    /// A slot for a new entry: the last one freed, else the slab's next
    /// (lowest never used) one; `None` when full.
    fn take_slot(&mut self) -> Option<Slot> {
        if let Some(slot) = self.free.pop() {
            return Some(slot);
        }
        if self.slots.len() == self.capacity {
            return None;
        }
        // Within the capacity reserved in `new`: never reallocates.
        self.slots.push(None);
        Some((self.slots.len() - 1) as Slot)
    }

    /// The slot of `key`.
    pub fn find(&self, key: &FlowKey) -> Option<Slot> {
        self.find_hashed(key, self.hasher.hash_one(key))
    }

    fn find_hashed(&self, key: &FlowKey, hash: u64) -> Option<Slot> {
        let slots = &self.slots;
        self.index
            .find(hash, |&s| matches!(&slots[s as usize], Some((k, _)) if k == key))
            .copied()
    }

    /// The entry in `slot`.
    pub fn get(&self, slot: Slot) -> Option<&V> {
        self.slots.get(slot as usize)?.as_ref().map(|(_, v)| v)
    }

    /// Hint that the entry in `slot` will be used soon: start loading it.
    #[inline]
    pub fn prefetch(&self, slot: Slot) {
        if let Some(e) = self.slots.get(slot as usize) {
            prefetch(e);
        }
    }

    /// The entry in `slot`, mutably.
    pub fn get_mut(&mut self, slot: Slot) -> Option<&mut V> {
        self.slots.get_mut(slot as usize)?.as_mut().map(|(_, v)| v)
    }

    /// Insert `key` (replacing its value if present); `Err(value)` when full.
    pub fn insert(&mut self, key: FlowKey, value: V) -> Result<Slot, V> {
        let hash = self.hasher.hash_one(key);
        if let Some(slot) = self.find_hashed(&key, hash) {
            self.slots[slot as usize] = Some((key, value));
            return Ok(slot);
        }
        let Some(slot) = self.take_slot() else {
            return Err(value);
        };
        self.slots[slot as usize] = Some((key, value));
        let (slots, hasher) = (&self.slots, &self.hasher);
        // The index was reserved for every slot, so this never grows it, but
        // it may rehash in place to clear the marks removals leave; the slots
        // it then rehashes all hold their entries (this one's is written above).
        self.index.insert_unique(hash, slot, |&s| {
            slots[s as usize].as_ref().map_or(0, |(k, _)| hasher.hash_one(k))
        });
        Ok(slot)
    }

    /// Remove the entry in `slot`, returning it.
    pub fn remove(&mut self, slot: Slot) -> Option<(FlowKey, V)> {
        let (key, value) = self.slots.get_mut(slot as usize)?.take()?;
        // Found by slot number: no key to compare.
        if let Ok(entry) = self.index.find_entry(self.hasher.hash_one(key), |&s| s == slot) {
            entry.remove();
        }
        self.free.push(slot);
        Some((key, value))
    }

    /// Scan up to `budget` occupied-or-not slots from the clock hand and
    /// return the first whose value satisfies `pick`, else the last occupied
    /// slot seen (the oldest by position of the hand, a cheap approximation of
    /// LRU). `None` only when no slot was occupied.
    pub fn victim(&mut self, budget: usize, mut pick: impl FnMut(&V) -> bool) -> Option<Slot> {
        // Slots never used (past the slab's length) are empty: the hand goes
        // round the others.
        let n = self.slots.len();
        let mut fallback = None;
        for _ in 0..budget.min(n) {
            let slot = self.hand % n;
            self.hand = (slot + 1) % n;
            if let Some((_, v)) = &self.slots[slot] {
                if pick(v) {
                    return Some(slot as Slot);
                }
                fallback = Some(slot as Slot);
            }
        }
        fallback
    }

    /// How many slots have ever been handed out: every occupied slot is
    /// below it (a resumable walk of the table goes up to it).
    pub fn slab_len(&self) -> usize {
        self.slots.len()
    }

    /// Every occupied slot with its key and value.
    pub fn iter(&self) -> impl Iterator<Item = (Slot, &FlowKey, &V)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|(k, v)| (i as Slot, k, v)))
    }
}

/// An empty vector with room for `n` values, whose memory the kernel is
/// asked to back with huge pages (Linux transparent huge pages, in `madvise`
/// mode on most distributions).
///
/// The flow cache and the connection table are tens of megabytes read at
/// random, one line per packet: with 4 KiB pages nearly every lookup also
/// misses the TLB and walks the page tables, which the prefetches of
/// [`crate::Engine::process_batch`] hide less well. With 2 MiB pages the
/// walks mostly go (measured: 10–15% per packet at 100k and 1M flows). The
/// advice is given before the memory is first written, since pages already
/// faulted in stay small until the kernel collapses them in the background.
/// It is a hint: where huge pages are off or none are free, ordinary pages
/// back the table, and nothing else changes. Nothing is written here: a
/// reservation this large is fresh memory from the kernel, faulted in as the
/// vector grows into it.
pub(crate) fn table_vec<T>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    advise_huge_pages(v.spare_capacity_mut());
    v
}

/// A type whose all-zero bytes are a valid value, and the value a table
/// holding it treats as an empty slot: a [`ZeroedTable`] of it starts out
/// empty without a byte being written.
///
/// # Safety
///
/// A value whose every byte is zero must be a valid `Self` (no reference,
/// no `NonZero*`, no enum whose zero tag is not a variant, in any field), and
/// equal to [`ZeroEmpty::EMPTY`] as far as the table reads it. Each
/// implementation has a test that a zeroed table's elements equal `EMPTY`.
pub(crate) unsafe trait ZeroEmpty: Copy {
    /// The empty slot.
    const EMPTY: Self;
}

/// A fixed-length table of `T` that starts out all [`ZeroEmpty::EMPTY`],
/// allocated zeroed so that no page is touched until a slot in it is used.
///
/// Tables of at least a huge page are mapped straight from the kernel
/// (anonymous memory reads as zero until written, and the mapping is aligned
/// to 2 MiB so huge pages can back all of it); smaller ones come from the
/// allocator zeroed. Under Miri, which runs no `mmap`, every table does.
pub(crate) struct ZeroedTable<T: ZeroEmpty> {
    ptr: core::ptr::NonNull<T>,
    len: usize,
    /// How the memory was obtained, so it is given back the same way.
    region: Region,
}

/// Where a [`ZeroedTable`]'s memory came from.
#[derive(Clone, Copy)]
enum Region {
    /// Nothing allocated (a zero-sized table).
    None,
    /// From the global allocator, with this layout.
    Heap(core::alloc::Layout),
    /// An anonymous mapping of this many bytes at the table's address.
    #[cfg(all(target_os = "linux", not(miri)))]
    Mapped(usize),
}

// SAFETY: a `ZeroedTable<T>` owns its `T`s as a `Box<[T]>` would; sending or
// sharing it sends or shares them.
unsafe impl<T: ZeroEmpty + Send> Send for ZeroedTable<T> {}
// SAFETY: as above; `&ZeroedTable<T>` gives out only `&T`.
unsafe impl<T: ZeroEmpty + Sync> Sync for ZeroedTable<T> {}

impl<T: ZeroEmpty> ZeroedTable<T> {
    /// A table of `len` empty slots. Aborts, as a `Vec` would, when the
    /// memory cannot be had.
    pub(crate) fn new(len: usize) -> Self {
        let layout = core::alloc::Layout::array::<T>(len).expect("table size overflows");
        if layout.size() == 0 {
            return ZeroedTable {
                ptr: core::ptr::NonNull::dangling(),
                len,
                region: Region::None,
            };
        }
        #[cfg(all(target_os = "linux", not(miri)))]
        if layout.size() >= HUGE_PAGE
            && layout.align() <= HUGE_PAGE
            && let Some((ptr, bytes)) = map_zeroed(layout.size())
        {
            return ZeroedTable {
                ptr: ptr.cast(),
                len,
                region: Region::Mapped(bytes),
            };
        }
        // SAFETY: the layout's size is not zero (checked above).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = core::ptr::NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        ZeroedTable {
            ptr: ptr.cast(),
            len,
            region: Region::Heap(layout),
        }
    }
}

/// A fresh anonymous mapping of at least `size` bytes, aligned to a huge
/// page and advised to be backed by huge pages, as its address and length;
/// `None` when the kernel refuses.
#[cfg(all(target_os = "linux", not(miri)))]
fn map_zeroed(size: usize) -> Option<(core::ptr::NonNull<u8>, usize)> {
    let bytes = size.next_multiple_of(PAGE);
    // Room to slide the table up to a huge-page boundary.
    let span = bytes.checked_add(HUGE_PAGE)?;
    // SAFETY: a new private anonymous mapping at an address of the kernel's
    // choosing: it aliases nothing.
    let base = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return None;
    }
    let base = base as usize;
    let start = base.next_multiple_of(HUGE_PAGE);
    let (head, tail) = (start - base, base + span - (start + bytes));
    // SAFETY: both ranges are page-aligned parts of the mapping just made,
    // outside the `bytes` kept from `start`; nothing refers to them. MADV_HUGEPAGE
    // only changes how the kernel backs the kept range (see `advise_huge_pages`).
    unsafe {
        if head > 0 {
            libc::munmap(base as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((start + bytes) as *mut libc::c_void, tail);
        }
        libc::madvise(start as *mut libc::c_void, bytes, libc::MADV_HUGEPAGE);
    }
    core::ptr::NonNull::new(start as *mut u8).map(|p| (p, bytes))
}

impl<T: ZeroEmpty> Drop for ZeroedTable<T> {
    fn drop(&mut self) {
        // `T: Copy`: nothing to drop in place, only the memory to give back.
        match self.region {
            Region::None => {}
            // SAFETY: allocated in `new` with this layout, and not freed since.
            Region::Heap(layout) => unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), layout) },
            // SAFETY: mapped in `map_zeroed` with this length at this address;
            // the table's borrows end with it.
            #[cfg(all(target_os = "linux", not(miri)))]
            Region::Mapped(bytes) => unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), bytes);
            },
        }
    }
}

impl<T: ZeroEmpty> core::ops::Deref for ZeroedTable<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` is aligned for `T` and points to `len` initialised
        // `T`s (zero bytes, a valid `T` by `ZeroEmpty`'s contract, or values
        // written since), owned by `self` for the borrow's length.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: ZeroEmpty> core::ops::DerefMut for ZeroedTable<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: ZeroEmpty> Clone for ZeroedTable<T> {
    fn clone(&self) -> Self {
        let mut copy = ZeroedTable::new(self.len);
        copy.copy_from_slice(self);
        copy
    }
}

const PAGE: usize = 4096;
const HUGE_PAGE: usize = 2 << 20;

/// Ask for huge pages under the whole 4 KiB pages of `area` (an area smaller
/// than one huge page is left alone).
fn advise_huge_pages<T>(area: &mut [core::mem::MaybeUninit<T>]) {
    #[cfg(target_os = "linux")]
    {
        let bytes = core::mem::size_of_val(area);
        if bytes < HUGE_PAGE {
            return;
        }
        let start = area.as_mut_ptr() as usize;
        let (first, end) = (start.next_multiple_of(PAGE), (start + bytes) & !(PAGE - 1));
        // SAFETY: MADV_HUGEPAGE only changes how the kernel backs the pages
        // of this range, which lies within an allocation this function's
        // caller owns; it neither reads nor writes them. Its result is
        // ignored: failing (huge pages off, an old kernel) leaves the range
        // as it was.
        unsafe {
            libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = area;
}

/// Start loading the cache lines of `value` (up to four: the parts a packet
/// touches). A hint: it reads nothing, and does nothing off x86-64.
#[inline]
pub(crate) fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        let p = (value as *const T).cast::<i8>();
        let lines = core::mem::size_of::<T>().div_ceil(64).min(4);
        for l in 0..lines {
            // SAFETY: a prefetch is a hint that may name any address; this one
            // stays within `value`, which is a valid reference.
            unsafe {
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.wrapping_add(l * 64));
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

#[cfg(test)]
mod tests {
    use palisade_wire::flow::Segment;
    use palisade_wire::ip::IpProtocol;

    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            segment: Segment::UNTAGGED,
            src: [1; 16],
            dst: [2; 16],
            src_port: port,
            dst_port: 80,
            protocol: IpProtocol::TCP,
            icmp_type: 0,
            icmp_code: 0,
        }
    }

    #[test]
    fn bounded_insert_remove_and_victim() {
        let mut m = BoundedMap::new(2);
        let a = m.insert(key(1), 10).unwrap();
        let b = m.insert(key(2), 20).unwrap();
        assert!(m.is_full());
        assert_eq!(m.insert(key(3), 30), Err(30));
        assert_eq!(m.insert(key(1), 11), Ok(a), "replacing needs no room");
        assert_eq!(m.get(a), Some(&11));
        assert_eq!(m.victim(4, |v| *v == 20), Some(b));
        assert_eq!(m.remove(b), Some((key(2), 20)));
        assert_eq!(m.find(&key(2)), None);
        assert_eq!(m.insert(key(3), 30), Ok(b), "freed slot is reused");
        assert_eq!(m.len(), 2);
        assert_eq!(m.iter().count(), 2);
    }

    /// The slab grows only as slots are first used; freed slots are reused
    /// (last freed first) before it grows; a clone keeps the reservation.
    #[test]
    fn slab_grows_with_use_within_its_reservation() {
        let mut m = BoundedMap::new(1000);
        assert_eq!(
            (m.capacity(), m.slots.len(), m.slots.capacity() >= 1000),
            (1000, 0, true)
        );
        assert_eq!(m.victim(8, |_: &u32| true), None, "an unused map has no victim");
        let reserved = m.slots.as_ptr();
        let slots: Vec<Slot> = (0..10).map(|p| m.insert(key(p), u32::from(p)).unwrap()).collect();
        assert_eq!(slots, (0..10).collect::<Vec<Slot>>(), "low slots first");
        assert_eq!(m.slots.len(), 10, "only the slots used");
        m.remove(3);
        m.remove(7);
        assert_eq!(m.insert(key(100), 100), Ok(7), "the last freed first");
        assert_eq!(m.insert(key(101), 101), Ok(3));
        assert_eq!(m.insert(key(102), 102), Ok(10), "then the next never used");
        assert_eq!(m.victim(100, |v| *v == 102), Some(10));
        for p in 200..1189 {
            m.insert(key(p), 0).unwrap();
        }
        assert!(m.is_full());
        assert_eq!(m.insert(key(5000), 1), Err(1));
        assert_eq!(m.slots.as_ptr(), reserved, "the slab never moved");
        let mut c = m.clone();
        assert_eq!((c.capacity(), c.len(), c.slots.capacity() >= 1000), (1000, 1000, true));
        assert_eq!(c.find(&key(101)), Some(3));
        c.remove(3);
        assert!(!c.is_full() && m.is_full(), "the clone is a copy");
    }

    /// A type standing for the table users' slot types: zero bytes are `EMPTY`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    #[repr(C)]
    struct Pair(u32, u64);

    // SAFETY: two integers; zero bytes are `Pair(0, 0)`.
    unsafe impl ZeroEmpty for Pair {
        const EMPTY: Pair = Pair(0, 0);
    }

    /// A zeroed table, from the allocator or mapped, reads `EMPTY` and keeps
    /// what is written; a clone is a copy; dropping gives the memory back
    /// (Miri checks the heap side).
    #[test]
    fn zeroed_tables_start_empty_and_keep_writes() {
        let sizes: &[usize] = if cfg!(miri) {
            &[0, 1, 1000]
        } else {
            &[0, 1, 1000, 300_000]
        };
        for &n in sizes {
            let mut t = ZeroedTable::<Pair>::new(n);
            assert_eq!(t.len(), n);
            assert!(t.iter().all(|p| *p == Pair::EMPTY), "{n}");
            if n >= 2 {
                t[n - 1] = Pair(7, 9);
                t[n / 2].1 = 3;
                let c = t.clone();
                t[0] = Pair(1, 1);
                assert_eq!(c[n - 1], Pair(7, 9));
                assert_eq!(c[n / 2].1, 3);
                assert_eq!(t[0], Pair(1, 1));
                assert_eq!(c.iter().filter(|p| **p != Pair::EMPTY).count(), 2);
            }
        }
    }

    /// The point of the zeroed tables: a new table's memory is not resident
    /// until used (fails with tables written in full at creation).
    #[cfg(all(target_os = "linux", not(miri)))]
    #[test]
    fn a_large_zeroed_table_touches_no_page_until_used() {
        let mut t = ZeroedTable::<Pair>::new(1 << 20);
        let bytes = t.len() * core::mem::size_of::<Pair>();
        assert_eq!(
            resident_pages(t.as_ptr().cast(), bytes),
            0,
            "nothing touched at creation"
        );
        t[12_345] = Pair(1, 2);
        let touched = resident_pages(t.as_ptr().cast(), bytes);
        assert!(touched >= 1, "the page written is resident");
        // One page, or one huge page where the kernel backs it with those.
        assert!(touched <= HUGE_PAGE / PAGE, "{touched} pages");
    }

    /// Resident 4 KiB pages of the page-aligned `bytes` at `p`.
    #[cfg(all(target_os = "linux", not(miri)))]
    fn resident_pages(p: *const u8, bytes: usize) -> usize {
        assert_eq!(p as usize % PAGE, 0);
        let mut v = vec![0u8; bytes.div_ceil(PAGE)];
        // SAFETY: the range is mapped (the table's own), and `v` has a byte per page.
        let r = unsafe { libc::mincore(p as *mut libc::c_void, bytes, v.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        v.iter().filter(|b| **b & 1 == 1).count()
    }

    /// Random inserts, replacements and removals against a model: the index
    /// must name exactly the slots holding each key, through churn.
    #[test]
    fn index_agrees_with_a_model_through_churn() {
        let mut m = BoundedMap::new(64);
        let mut model: std::collections::HashMap<u16, (Slot, u32)> = Default::default();
        let mut x = 0x9e37_79b9_u32;
        for step in 0..20_000u32 {
            // xorshift: deterministic, no dependency.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let port = (x % 96) as u16;
            if x & 0x100 == 0 {
                match (m.insert(key(port), step), model.get(&port)) {
                    (Ok(slot), Some(&(old, _))) => {
                        assert_eq!(slot, old, "a replaced key keeps its slot");
                        model.insert(port, (slot, step));
                    }
                    (Ok(slot), None) => {
                        assert!(model.len() < 64, "inserted into a full map");
                        model.insert(port, (slot, step));
                    }
                    (Err(v), _) => {
                        assert_eq!(v, step);
                        assert_eq!(model.len(), 64, "refused with room left");
                    }
                }
            } else if let Some((slot, value)) = model.remove(&port) {
                assert_eq!(m.remove(slot), Some((key(port), value)));
                assert_eq!(m.remove(slot), None, "removed twice");
            }
            assert_eq!(m.len(), model.len());
            for p in [port, port ^ 1, port.wrapping_add(7) % 96] {
                let want = model.get(&p).map(|&(slot, _)| slot);
                assert_eq!(m.find(&key(p)), want, "key {p} at step {step}");
                if let Some(slot) = want {
                    assert_eq!(m.get(slot), Some(&model[&p].1));
                }
            }
        }
    }
}

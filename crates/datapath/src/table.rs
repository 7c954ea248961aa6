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

use core::hash::BuildHasher;

use foldhash::fast::RandomState;
use hashbrown::HashTable;

use palisade_wire::flow::FlowKey;

/// A slot index.
pub type Slot = u32;

/// A fixed-capacity key → value map with stable slot indices.
#[derive(Debug, Clone)]
pub struct BoundedMap<V> {
    /// The slots of the entries, by their keys' hashes.
    index: HashTable<Slot>,
    /// Keys are attacker-influenced: the hasher is seeded randomly per table.
    hasher: RandomState,
    slots: Vec<Option<(FlowKey, V)>>,
    free: Vec<Slot>,
    /// Where the next eviction scan starts (a clock hand).
    hand: usize,
}

impl<V> BoundedMap<V> {
    /// A map holding at most `capacity` entries (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, Slot::MAX as usize);
        let slots = table_vec(capacity, || None);
        BoundedMap {
            index: HashTable::with_capacity(capacity),
            hasher: RandomState::default(),
            slots,
            // Popped from the end: hand out low slots first.
            free: (0..capacity as Slot).rev().collect(),
            hand: 0,
        }
    }

    /// Maximum number of entries.
    pub fn capacity(&self) -> usize {
        self.slots.len()
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
        self.free.is_empty()
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
        let Some(slot) = self.free.pop() else {
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
        let n = self.slots.len();
        let mut fallback = None;
        for _ in 0..budget.min(n) {
            let slot = self.hand;
            self.hand = (self.hand + 1) % n;
            if let Some((_, v)) = &self.slots[slot] {
                if pick(v) {
                    return Some(slot as Slot);
                }
                fallback = Some(slot as Slot);
            }
        }
        fallback
    }

    /// Every occupied slot with its key and value.
    pub fn iter(&self) -> impl Iterator<Item = (Slot, &FlowKey, &V)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|(k, v)| (i as Slot, k, v)))
    }
}

/// `n` values made by `make` in a vector whose memory the kernel is first asked
/// to back with huge pages (Linux transparent huge pages, in `madvise` mode
/// on most distributions).
///
/// The flow cache and the connection table are tens of megabytes read at
/// random, one line per packet: with 4 KiB pages nearly every lookup also
/// misses the TLB and walks the page tables, which the prefetches of
/// [`crate::Engine::process_batch`] hide less well. With 2 MiB pages the
/// walks mostly go (measured: 10–15% per packet at 100k and 1M flows). The
/// advice is given before the memory is first written, since pages already
/// faulted in stay small until the kernel collapses them in the background.
/// It is a hint: where huge pages are off or none are free, ordinary pages
/// back the table, and nothing else changes.
pub(crate) fn table_vec<T>(n: usize, make: impl FnMut() -> T) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    advise_huge_pages(v.spare_capacity_mut());
    v.resize_with(n, make);
    v
}

/// Ask for huge pages under the whole 4 KiB pages of `area` (an area smaller
/// than one huge page is left alone).
fn advise_huge_pages<T>(area: &mut [core::mem::MaybeUninit<T>]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        const HUGE_PAGE: usize = 2 << 20;
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

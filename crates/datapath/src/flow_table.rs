//! The exact-match flow cache.
//!
//! Keyed by the directional [`FlowKey`]; each entry holds the verdict the slow
//! path reached for the flow, the connection it belongs to, and the policy
//! epoch the verdict was reached under. An entry whose epoch is older than the
//! engine's is re-validated on its next packet. The cache is bounded: when
//! full, a new entry evicts one (the cache holds no state the connection table
//! does not, so an evicted flow just takes the slow path again).
//!
//! # Layout
//!
//! Every packet of an established flow looks its key up here, so the table is
//! built for one cache miss per lookup: an open-addressed array of 64-byte,
//! cache-line-aligned buckets that hold the key and the entry inline (no
//! separate index, no slab), probed linearly from the key's hash, at most half
//! full so a probe sequence is short. Each bucket also keeps 16 bits of the
//! hash, compared before the key. Removal shifts the following run back
//! (no tombstones), so lookups never slow down with churn. The hash is
//! computed once per packet by the caller ([`FlowTable::hash`]) and reused for
//! the lookup, the insert after a miss, and a prefetch issued ahead of the
//! packet ([`FlowTable::prefetch`]).
//!
//! Keys are attacker-influenced: the hash is keyed with per-table random seeds.

use core::hash::BuildHasher;

use palisade_wire::flow::FlowKey;

use crate::table::{Slot, ZeroEmpty, ZeroedTable};
use crate::verdict::{DropReason, InspectProfile};

/// A cached verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachedVerdict {
    /// Forward (and track in the connection table).
    Allow,
    /// Drop.
    Drop(DropReason),
    /// Forward (and track), handing each packet on for inspection with this
    /// profile. In the byte `Allow` leaves free, so a flow's profile costs
    /// neither the cache nor the connection table a byte (a connection is
    /// three cache lines exactly).
    AllowInspected(InspectProfile),
}

impl CachedVerdict {
    /// The verdict of an allowed flow with inspection profile `inspect`.
    #[inline]
    pub fn allowed(inspect: Option<InspectProfile>) -> Self {
        match inspect {
            Some(p) => CachedVerdict::AllowInspected(p),
            None => CachedVerdict::Allow,
        }
    }

    /// The inspection profile of an allowed flow's verdict.
    #[inline]
    pub fn inspection(self) -> Option<InspectProfile> {
        match self {
            CachedVerdict::AllowInspected(p) => Some(p),
            _ => None,
        }
    }
}

/// A flow-cache entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowEntry {
    /// The engine policy epoch of the verdict.
    pub epoch: u64,
    /// The verdict.
    pub verdict: CachedVerdict,
    /// The connection (allowed flows).
    pub conn: Option<Slot>,
    /// Index of the deciding rules in the engine's rule counters (egress, ingress).
    pub rules: [Option<u32>; 2],
}

/// `None` in a packed `u32` field (slots and rule indices never reach it: the
/// tables are bounded below `u32::MAX`).
const NONE: u32 = u32::MAX;

fn pack(v: Option<u32>) -> u32 {
    v.unwrap_or(NONE)
}

fn unpack(v: u32) -> Option<u32> {
    (v != NONE).then_some(v)
}

/// A bucket's verdict, or that it is empty: a [`CachedVerdict`] with an
/// empty state whose byte is zero, so that zeroed memory is empty buckets
/// (see [`ZeroEmpty`]). `repr(u8)` fixes the layout: the tag byte first,
/// then the variant's field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum BucketVerdict {
    /// An empty bucket.
    Empty = 0,
    Allow = 1,
    Drop(DropReason) = 2,
    AllowInspected(InspectProfile) = 3,
}

impl BucketVerdict {
    #[inline(always)]
    fn get(self) -> Option<CachedVerdict> {
        match self {
            BucketVerdict::Empty => None,
            BucketVerdict::Allow => Some(CachedVerdict::Allow),
            BucketVerdict::Drop(r) => Some(CachedVerdict::Drop(r)),
            BucketVerdict::AllowInspected(p) => Some(CachedVerdict::AllowInspected(p)),
        }
    }

    #[inline(always)]
    fn is_empty(self) -> bool {
        self == BucketVerdict::Empty
    }
}

impl From<CachedVerdict> for BucketVerdict {
    #[inline(always)]
    fn from(v: CachedVerdict) -> Self {
        match v {
            CachedVerdict::Allow => BucketVerdict::Allow,
            CachedVerdict::Drop(r) => BucketVerdict::Drop(r),
            CachedVerdict::AllowInspected(p) => BucketVerdict::AllowInspected(p),
        }
    }
}

/// One bucket: a key and its entry, packed into one cache line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C, align(64))]
struct Bucket {
    key: FlowKey,
    /// The low 32 bits of the engine epoch: an entry would have to sit
    /// untouched through 2^32 policy updates to be mistaken for current.
    epoch: u32,
    conn: u32,
    rules: [u32; 2],
    /// `Empty` for an empty bucket, whose other fields mean nothing.
    verdict: BucketVerdict,
    /// High bits of the key's hash, compared before the key.
    tag: u16,
}

const _: () = assert!(core::mem::size_of::<Bucket>() == 64);

// SAFETY: every field of a bucket is an integer, an array of integers, a
// struct of them (`FlowKey`, whose `Segment` and `IpProtocol` wrap integers),
// or a `BucketVerdict`, whose zero tag is `Empty` (no field); so zero bytes
// are a valid bucket, and it is `EMPTY`, all of whose fields are zero
// (tested: `zeroed_buckets_are_empty`).
unsafe impl ZeroEmpty for Bucket {
    const EMPTY: Bucket = Bucket {
        key: FlowKey {
            segment: palisade_wire::flow::Segment::UNTAGGED,
            src: [0; 16],
            dst: [0; 16],
            src_port: 0,
            dst_port: 0,
            protocol: palisade_wire::ip::IpProtocol(0),
            icmp_type: 0,
            icmp_code: 0,
        },
        epoch: 0,
        // Read only from occupied buckets, which set them.
        conn: 0,
        rules: [0; 2],
        verdict: BucketVerdict::Empty,
        tag: 0,
    };
}

impl Bucket {
    fn entry(&self, verdict: CachedVerdict) -> FlowEntry {
        FlowEntry {
            // Widened back to the engine's epoch by the caller's comparison (see `get`).
            epoch: u64::from(self.epoch),
            verdict,
            conn: unpack(self.conn),
            rules: self.rules.map(unpack),
        }
    }
}

/// A flow key's hash in this table ([`FlowTable::hash`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowHash(u64);

impl FlowHash {
    fn tag(self) -> u16 {
        (self.0 >> 48) as u16
    }
}

/// The flow cache.
#[derive(Clone)]
pub struct FlowTable {
    /// Allocated zeroed: untouched until used (see [`crate::table`]).
    buckets: ZeroedTable<Bucket>,
    mask: usize,
    len: usize,
    capacity: usize,
    seeds: [u64; 4],
    /// Where the next eviction scan starts (a clock hand).
    hand: usize,
}

impl core::fmt::Debug for FlowTable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FlowTable")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// The 64×64 → 128-bit multiply folded to 64 bits (as in foldhash and wyhash).
#[inline(always)]
fn folded_multiply(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

impl FlowTable {
    /// A cache of at most `capacity` flows (at least 1).
    pub fn new(capacity: usize) -> Self {
        // Slots and rule indices are packed into u32 with u32::MAX as "none";
        // half-full probing wants twice the buckets, a power of two.
        let capacity = capacity.clamp(1, 1 << 30);
        let size = (capacity * 2).next_power_of_two();
        let random = foldhash::fast::RandomState::default();
        FlowTable {
            buckets: ZeroedTable::new(size),
            mask: size - 1,
            len: 0,
            capacity,
            seeds: [0u64, 1, 2, 3].map(|i| random.hash_one(i) | 1),
            hand: 0,
        }
    }

    /// Cached flows.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maximum cached flows.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The hash of `key` in this table.
    #[inline(always)]
    pub fn hash(&self, key: &FlowKey) -> FlowHash {
        let s = &self.seeds;
        let src = u128::from_ne_bytes(key.src);
        let dst = u128::from_ne_bytes(key.dst);
        let rest = u64::from(key.segment.raw()) << 32 | u64::from(key.src_port) << 16 | u64::from(key.dst_port);
        let a = folded_multiply(src as u64 ^ s[0], (src >> 64) as u64 ^ s[1]);
        let b = folded_multiply(dst as u64 ^ s[2], (dst >> 64) as u64 ^ s[3]);
        let c = folded_multiply(rest ^ s[1], u64::from(key.protocol.0) ^ s[2]);
        FlowHash(folded_multiply(a ^ c, b ^ s[0]))
    }

    /// Hint that `hash` will be looked up soon: start loading its bucket.
    #[inline]
    pub fn prefetch(&self, hash: FlowHash) {
        crate::table::prefetch(&self.buckets[hash.0 as usize & self.mask]);
    }

    /// Where `key` is, or the empty bucket its probe ended at.
    #[inline(always)]
    fn probe(&self, key: &FlowKey, hash: FlowHash) -> Result<usize, usize> {
        let tag = hash.tag();
        let mut i = hash.0 as usize & self.mask;
        loop {
            let b = &self.buckets[i];
            if b.verdict.is_empty() {
                return Err(i);
            }
            if b.tag == tag && b.key == *key {
                return Ok(i);
            }
            // The table is at most half full, so an empty bucket ends every probe.
            i = (i + 1) & self.mask;
        }
    }

    /// The entry of `key`.
    pub fn get(&self, key: &FlowKey) -> Option<FlowEntry> {
        self.get_hashed(key, self.hash(key))
    }

    /// The entry of `key`, whose [`FlowTable::hash`] is `hash`.
    #[inline]
    pub fn get_hashed(&self, key: &FlowKey, hash: FlowHash) -> Option<FlowEntry> {
        let i = self.probe(key, hash).ok()?;
        let b = &self.buckets[i];
        b.verdict.get().map(|v| b.entry(v))
    }

    /// The entry of `key` if it was cached under `epoch` (compared on the
    /// stored low 32 bits).
    #[inline(always)]
    pub fn get_current(&self, key: &FlowKey, hash: FlowHash, epoch: u64) -> Option<FlowEntry> {
        let i = self.probe(key, hash).ok()?;
        let b = &self.buckets[i];
        if b.epoch != epoch as u32 {
            return None;
        }
        b.verdict.get().map(|v| FlowEntry { epoch, ..b.entry(v) })
    }

    /// Cache `entry` for `key`, evicting another flow when full; returns whether one was evicted.
    pub fn insert(&mut self, key: FlowKey, entry: FlowEntry) -> bool {
        self.insert_hashed(key, self.hash(&key), entry)
    }

    /// [`FlowTable::insert`] with the key's hash already computed.
    pub fn insert_hashed(&mut self, key: FlowKey, hash: FlowHash, entry: FlowEntry) -> bool {
        let bucket = Bucket {
            key,
            epoch: entry.epoch as u32,
            conn: pack(entry.conn),
            rules: entry.rules.map(pack),
            verdict: entry.verdict.into(),
            tag: hash.tag(),
        };
        match self.probe(&key, hash) {
            Ok(i) => {
                self.buckets[i] = bucket;
                false
            }
            Err(mut i) => {
                let evicted = self.len >= self.capacity;
                if evicted {
                    self.evict();
                    // The removal may have shifted the run this key probes.
                    i = match self.probe(&key, hash) {
                        Ok(i) | Err(i) => i,
                    };
                }
                self.buckets[i] = bucket;
                self.len += 1;
                evicted
            }
        }
    }

    /// Forget `key`.
    pub fn remove(&mut self, key: &FlowKey) {
        if let Ok(i) = self.probe(key, self.hash(key)) {
            self.remove_at(i);
        }
    }

    /// Empty bucket `i` and shift back the entries after it that probed past
    /// it, so that no probe sequence crosses an empty bucket.
    fn remove_at(&mut self, mut hole: usize) {
        self.buckets[hole] = Bucket::EMPTY;
        self.len -= 1;
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            let b = self.buckets[j];
            if b.verdict.is_empty() {
                return;
            }
            let home = self.hash(&b.key).0 as usize & self.mask;
            // Move `b` into the hole unless its home lies cyclically in (hole, j].
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.buckets[hole] = b;
                self.buckets[j] = Bucket::EMPTY;
                hole = j;
            }
        }
    }

    /// Remove one entry: the first denied flow's within a few buckets of the
    /// clock hand (cheapest to rebuild), else the first entry found.
    fn evict(&mut self) {
        let mut fallback = None;
        let mut scanned = 0;
        loop {
            let i = self.hand;
            self.hand = (self.hand + 1) & self.mask;
            scanned += 1;
            let b = &self.buckets[i];
            match b.verdict {
                BucketVerdict::Drop(_) => return self.remove_at(i),
                BucketVerdict::Allow | BucketVerdict::AllowInspected(_) if fallback.is_none() => fallback = Some(i),
                _ => {}
            }
            // Evict is only called on a full, hence non-empty, table.
            if scanned >= 16
                && let Some(f) = fallback
            {
                return self.remove_at(f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use palisade_wire::flow::Segment;
    use palisade_wire::ip::IpProtocol;

    use super::*;

    fn k(p: u16) -> FlowKey {
        FlowKey {
            segment: Segment::UNTAGGED,
            src: [0; 16],
            dst: [1; 16],
            src_port: p,
            dst_port: 1,
            protocol: IpProtocol::UDP,
            icmp_type: 0,
            icmp_code: 0,
        }
    }

    fn allow(conn: u32) -> FlowEntry {
        FlowEntry {
            epoch: 1,
            verdict: CachedVerdict::Allow,
            conn: Some(conn),
            rules: [Some(3), None],
        }
    }

    /// `ZeroEmpty` for buckets: a zeroed table, small (from the allocator)
    /// or large (mapped), is empty buckets, and a zero verdict byte is `Empty`.
    #[test]
    fn zeroed_buckets_are_empty() {
        let sizes: &[usize] = if cfg!(miri) { &[1, 64] } else { &[1, 64, 1 << 16] };
        for &n in sizes {
            let t = ZeroedTable::<Bucket>::new(n);
            assert!(t.iter().all(|b| *b == Bucket::EMPTY && b.verdict.is_empty()), "{n}");
            assert_eq!(t.as_ptr() as usize % 64, 0, "buckets are cache-line aligned");
        }
        assert_eq!(core::mem::size_of::<BucketVerdict>(), 2);
        for v in [
            CachedVerdict::Allow,
            CachedVerdict::Drop(DropReason::PolicyDeny),
            CachedVerdict::AllowInspected(InspectProfile(core::num::NonZeroU8::new(3).unwrap())),
        ] {
            assert_eq!(BucketVerdict::from(v).get(), Some(v));
            assert!(!BucketVerdict::from(v).is_empty());
        }
        assert_eq!(BucketVerdict::Empty.get(), None);
    }

    /// A large cache (its buckets mapped, not written at creation) behaves as
    /// a small one: every flow found, removed ones gone, through wrap-around.
    #[test]
    fn large_cache_finds_what_it_holds() {
        let n = if cfg!(miri) { 200 } else { 40_000 };
        let mut t = FlowTable::new(n);
        for p in 0..n as u16 {
            assert!(!t.insert(k(p), allow(u32::from(p))));
        }
        for p in (0..n as u16).step_by(3) {
            t.remove(&k(p));
        }
        for p in 0..n as u16 {
            let got = t.get(&k(p));
            if p % 3 == 0 {
                assert_eq!(got, None, "{p}");
            } else {
                assert_eq!(got, Some(allow(u32::from(p))), "{p}");
            }
        }
        let copy = t.clone();
        assert_eq!(copy.get(&k(1)), Some(allow(1)));
        assert_eq!(copy.len(), t.len());
    }

    #[test]
    fn full_cache_evicts() {
        let mut t = FlowTable::new(2);
        let e = allow(0);
        assert!(!t.insert(k(1), e));
        assert!(!t.insert(k(2), e));
        assert!(t.insert(k(3), e));
        assert_eq!(t.len(), 2);
        assert_eq!(t.get(&k(3)), Some(e));
        t.remove(&k(3));
        assert_eq!(t.get(&k(3)), None);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn eviction_prefers_denied_flows() {
        let mut t = FlowTable::new(4);
        let deny = FlowEntry {
            verdict: CachedVerdict::Drop(DropReason::PolicyDeny),
            conn: None,
            ..allow(0)
        };
        for p in 1..=3 {
            t.insert(k(p), allow(u32::from(p)));
        }
        t.insert(k(4), deny);
        assert!(t.insert(k(5), allow(5)));
        assert_eq!(t.get(&k(4)), None, "the denied flow went first");
        for p in [1, 2, 3, 5] {
            assert!(t.get(&k(p)).is_some(), "flow {p} kept");
        }
    }

    #[test]
    fn epoch_is_checked_on_lookup() {
        let mut t = FlowTable::new(8);
        t.insert(k(1), allow(7));
        let h = t.hash(&k(1));
        assert_eq!(t.get_current(&k(1), h, 1).and_then(|e| e.conn), Some(7));
        assert_eq!(t.get_current(&k(1), h, 2), None);
    }

    /// Against a model map, through inserts, replacements, removals and
    /// evictions in a small table where probe runs collide and wrap.
    #[test]
    fn agrees_with_a_model_under_churn() {
        use std::collections::HashMap;
        let mut t = FlowTable::new(24);
        let mut model: HashMap<u16, FlowEntry> = HashMap::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for step in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let p = (x % 64) as u16;
            if x & 0x300 == 0 {
                t.remove(&k(p));
                model.remove(&p);
            } else {
                let e = allow(step);
                if t.insert(k(p), e) {
                    // Something left: find what, and drop it from the model.
                    model.retain(|q, _| *q == p || t.get(&k(*q)).is_some());
                }
                model.insert(p, e);
            }
            assert_eq!(t.len(), model.len(), "step {step}");
            assert!(t.len() <= t.capacity());
            for q in 0..64 {
                assert_eq!(t.get(&k(q)), model.get(&q).copied(), "step {step}, key {q}");
            }
        }
    }
}

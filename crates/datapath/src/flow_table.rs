//! The exact-match flow cache.
//!
//! Keyed by the directional [`FlowKey`]; each entry holds the verdict the slow
//! path reached for the flow, the connection it belongs to, and the policy
//! epoch the verdict was reached under. An entry whose epoch is older than the
//! engine's is re-validated on its next packet. The cache is bounded: when
//! full, a new entry evicts one (the cache holds no state the connection table
//! does not, so an evicted flow just takes the slow path again).

use palisade_wire::flow::FlowKey;

use crate::table::{BoundedMap, Slot};
use crate::verdict::DropReason;

/// A cached verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachedVerdict {
    /// Forward (and track in the connection table).
    Allow,
    /// Drop.
    Drop(DropReason),
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

/// The flow cache.
#[derive(Debug, Clone)]
pub struct FlowTable {
    map: BoundedMap<FlowEntry>,
}

impl FlowTable {
    /// A cache of at most `capacity` flows.
    pub fn new(capacity: usize) -> Self {
        FlowTable {
            map: BoundedMap::new(capacity),
        }
    }

    /// Cached flows.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Maximum cached flows.
    pub fn capacity(&self) -> usize {
        self.map.capacity()
    }

    /// The entry of `key`.
    pub fn get(&self, key: &FlowKey) -> Option<FlowEntry> {
        self.map.find(key).and_then(|s| self.map.get(s)).copied()
    }

    /// Cache `entry` for `key`, evicting another flow when full; returns whether one was evicted.
    pub fn insert(&mut self, key: FlowKey, entry: FlowEntry) -> bool {
        let mut evicted = false;
        if self.map.find(&key).is_none() && self.map.is_full() {
            // Prefer dropping denied flows' entries, which are the cheapest to rebuild.
            if let Some(victim) = self.map.victim(8, |e| e.conn.is_none()) {
                self.map.remove(victim);
                evicted = true;
            }
        }
        // Room was made just above (or the key is present), so this cannot fail.
        let _ = self.map.insert(key, entry);
        evicted
    }

    /// Forget `key`.
    pub fn remove(&mut self, key: &FlowKey) {
        if let Some(slot) = self.map.find(key) {
            self.map.remove(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use palisade_wire::flow::Segment;
    use palisade_wire::ip::IpProtocol;

    use super::*;

    #[test]
    fn full_cache_evicts() {
        let mut t = FlowTable::new(2);
        let e = FlowEntry {
            epoch: 1,
            verdict: CachedVerdict::Allow,
            conn: Some(0),
            rules: [None; 2],
        };
        let k = |p| FlowKey {
            segment: Segment::UNTAGGED,
            src: [0; 16],
            dst: [1; 16],
            src_port: p,
            dst_port: 1,
            protocol: IpProtocol::UDP,
        };
        assert!(!t.insert(k(1), e));
        assert!(!t.insert(k(2), e));
        assert!(t.insert(k(3), e));
        assert_eq!(t.len(), 2);
        assert_eq!(t.get(&k(3)), Some(e));
        t.remove(&k(3));
        assert_eq!(t.get(&k(3)), None);
    }
}

//! The fast classifier: partitioned decision trees, batched lookups,
//! log-structured updates.
//!
//! **Trees.** Each rule is projected onto five 32-bit dimensions (top 32 bits
//! of the source and destination address, the two ports, the protocol) and a
//! binary decision tree in the style of HyperSplit cuts that box space: a node
//! holds one dimension and one split value, a leaf a handful of rules sorted by
//! priority that are checked in full. Split values are medians of the rule
//! endpoints inside the node's region, chosen on the dimension that leaves the
//! fewest rules on the heavier side, so trees stay shallow and replication low.
//!
//! **Partitions.** A rule with a wide range on a dimension is copied into every
//! subtree that cuts through that range. As CutSplit does, rules are first
//! partitioned by which address fields are small (source prefix /14 or
//! longer; else destination prefix /14 or longer; else neither), and each
//! partition gets its own tree, so the wildcard-heavy rules do not multiply
//! the exact ones. A lookup walks every tree whose best rule could still beat
//! the answer found so far, best trees first.
//!
//! **Cut tables.** The top of a partition's tree would be a dozen binary
//! decisions on its small address field; instead the bits just below the
//! partition's common prefix index a table of subtrees (up to 2^14 cells), as
//! HiCuts does at every level. Because the field is small for every rule in
//! the partition, a rule lands in one or two cells, so the table replaces
//! those levels with one memory access at almost no replication.
//!
//! **Layout.** Nodes are 16 bytes in one flat vector, children are `u32`
//! indices (high bit set for a leaf), leaves are ranges of a flat vector of
//! 48-byte rule records, so a lookup touches a few cache lines and no pointer.
//! [`Classifier::lookup_batch`] walks up to 16 keys through a tree in lock
//! step, prefetching each key's next node while the others are being decided,
//! which hides the memory latency a single lookup waits on.
//!
//! **Updates.** The trees are static; inserts go to a small priority-sorted
//! buffer that every lookup scans. A full buffer becomes a tree of its own (a
//! level), and levels merge as in a log-structured merge tree whenever one is
//! at least a quarter of the size of the one before it, so each rule is
//! rebuilt O(log n) times however many updates arrive. Removal sets a
//! tombstone bit; a level is rebuilt without its dead rules once they
//! outnumber the live ones, and only then are their ids reused.
//!
//! **IPv6.** The trees see the top 32 bits of IPv6 addresses, and a leaf match
//! is confirmed against the full prefixes, kept beside the records of IPv6
//! levels only.

use crate::rule::IdAlloc;
use crate::{Classifier, Family, Key, Match, Prefix, Rule, RuleError, RuleId};

/// Child-code bit marking a leaf.
const LEAF: u32 = 1 << 31;
/// A leaf with at most this many rules is not split further.
const BINTH: usize = 8;
/// Trees stop splitting at this depth whatever the leaf size.
const MAX_DEPTH: u32 = 48;
/// Records (rules counting copies) a tree may hold per rule before it stops cutting.
const MAX_REPLICATION: usize = 8;
/// Inserted rules wait in the buffer until it holds this many.
const BUF_CAP: usize = 64;
/// A level is merged into the one before it once it has at least 1/MERGE_RATIO of its rules.
const MERGE_RATIO: usize = 4;
/// An address projection spanning fewer values than this is "small" (prefix /14 or longer).
const SMALL: u32 = 1 << 18;
/// At most this many index bits (2^bits cells) in a root's cut table.
const CUT_BITS: u32 = 14;
/// The whole space: low ends per dimension.
const FULL_LO: [u32; 5] = [0; 5];
/// The whole space: high ends per dimension.
const FULL_HI: [u32; 5] = [u32::MAX, u32::MAX, u16::MAX as u32, u16::MAX as u32, u8::MAX as u32];
/// Keys walked through a tree together by `lookup_batch`.
const GROUP: usize = 16;
/// Slot state: the id is unused.
const FREE: u32 = u32::MAX;
/// Slot state: removed, tombstoned in a level until that level is rebuilt.
const DEAD: u32 = u32::MAX - 1;
/// Slot state: in its family's insert buffer (bit 31 clear, so the family bit can be or-ed in).
const BUF: u32 = 0x7fff_fff0;

/// A rule as the trees store it: every range as (low end, width) so a field
/// is checked with one wrapping subtraction and one comparison.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Rec {
    src_lo: u32,
    src_w: u32,
    dst_lo: u32,
    dst_w: u32,
    sp_lo: u16,
    sp_w: u16,
    dp_lo: u16,
    dp_w: u16,
    flags_val: u16,
    flags_mask: u16,
    proto_lo: u8,
    proto_w: u8,
    meta_val: u32,
    meta_mask: u32,
    prio: u32,
    id: u32,
}

impl Rec {
    fn new(rule: &Rule, id: u32) -> Rec {
        let (src_lo, src_hi) = rule.src.top32_range();
        let (dst_lo, dst_hi) = rule.dst.top32_range();
        let (proto_lo, proto_w) = match rule.proto {
            Some(p) => (p, 0),
            None => (0, u8::MAX),
        };
        Rec {
            src_lo,
            src_w: src_hi - src_lo,
            dst_lo,
            dst_w: dst_hi - dst_lo,
            sp_lo: rule.src_ports.0,
            sp_w: rule.src_ports.1 - rule.src_ports.0,
            dp_lo: rule.dst_ports.0,
            dp_w: rule.dst_ports.1 - rule.dst_ports.0,
            flags_val: rule.tcp_flags.0 & rule.tcp_flags.1,
            flags_mask: rule.tcp_flags.1,
            proto_lo,
            proto_w,
            meta_val: rule.meta.0 & rule.meta.1,
            meta_mask: rule.meta.1,
            prio: rule.priority,
            id,
        }
    }

    /// (priority, id) packed so that smaller is better.
    #[inline(always)]
    fn order(&self) -> u64 {
        (u64::from(self.prio) << 32) | u64::from(self.id)
    }

    /// The inclusive range of dimension `d` (0..5).
    fn range(&self, d: usize) -> (u32, u32) {
        let (lo, w) = match d {
            0 => (self.src_lo, self.src_w),
            1 => (self.dst_lo, self.dst_w),
            2 => (u32::from(self.sp_lo), u32::from(self.sp_w)),
            3 => (u32::from(self.dp_lo), u32::from(self.dp_w)),
            _ => (u32::from(self.proto_lo), u32::from(self.proto_w)),
        };
        (lo, lo + w)
    }

    /// True if the projected key matches every field (exact for IPv4).
    #[inline(always)]
    fn matches(&self, k: &PKey) -> bool {
        // Non-short-circuit `&`: the compiler keeps this branch-free.
        (k.d[0].wrapping_sub(self.src_lo) <= self.src_w)
            & (k.d[1].wrapping_sub(self.dst_lo) <= self.dst_w)
            & ((k.d[2] as u16).wrapping_sub(self.sp_lo) <= self.sp_w)
            & ((k.d[3] as u16).wrapping_sub(self.dp_lo) <= self.dp_w)
            & ((k.d[4] as u8).wrapping_sub(self.proto_lo) <= self.proto_w)
            & (k.flags & self.flags_mask == self.flags_val)
            & (k.meta & self.meta_mask == self.meta_val)
    }
}

/// A key projected onto the tree dimensions; `d` has 8 entries so that a
/// node's dimension can be masked with 7 instead of bounds-checked.
#[derive(Debug, Clone, Copy, Default)]
struct PKey {
    d: [u32; 8],
    flags: u16,
    meta: u32,
}

impl PKey {
    #[inline(always)]
    fn new(key: &Key) -> PKey {
        // Truncation is the point: the trees see the top 32 bits (all of IPv4).
        let (s, t) = match key.family {
            Family::V4 => (key.src as u32, key.dst as u32),
            Family::V6 => ((key.src >> 96) as u32, (key.dst >> 96) as u32),
        };
        PKey {
            d: [
                s,
                t,
                u32::from(key.sport),
                u32::from(key.dport),
                u32::from(key.proto),
                0,
                0,
                0,
            ],
            flags: key.flags,
            meta: key.meta,
        }
    }
}

/// An inner tree node: go to `child[1]` iff the key's `dim` exceeds `split`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Node {
    split: u32,
    dim: u32,
    child: [u32; 2],
}

/// A tree's entry point and the best rule anywhere in it.
#[derive(Debug, Clone, Copy)]
struct Root {
    /// The tree's root code, or, when `mask` is non-zero, the offset in
    /// `Level::table` of its cut table.
    code: u32,
    /// A cut table replaces the top of the tree: the key's `dim` shifted
    /// right by `shift` and masked by `mask` indexes the subtree to walk.
    dim: u32,
    shift: u32,
    mask: u32,
    min_order: u64,
}

impl Root {
    /// The index in `Level::table` of `k`'s cell (meaningful only with a table).
    #[inline(always)]
    fn cell(&self, k: &PKey) -> usize {
        (self.code + ((k.d[(self.dim & 7) as usize] >> self.shift) & self.mask)) as usize
    }

    /// The code a lookup of `k` starts its descent from.
    #[inline(always)]
    fn start(&self, table: &[u32], k: &PKey) -> u32 {
        if self.mask == 0 { self.code } else { table[self.cell(k)] }
    }
}

/// Full IPv6 prefixes (source, destination), parallel to the records of a v6 level.
type Full = (Prefix, Prefix);

/// One static set of trees (one per partition) sharing flat arrays.
#[derive(Debug, Clone, Default)]
struct Level {
    nodes: Vec<Node>,
    /// Leaf `i` holds `recs[offs[i]..offs[i + 1]]`.
    offs: Vec<u32>,
    recs: Vec<Rec>,
    /// For IPv6 levels, the full prefixes of `recs[i]`; empty for IPv4.
    full: Vec<Full>,
    roots: Vec<Root>,
    /// Cut tables of the roots that have one: child codes.
    table: Vec<u32>,
    /// Distinct rules at build time, and how many of them are tombstoned since.
    count: u32,
    dead: u32,
}

impl Level {
    fn live(&self) -> usize {
        (self.count - self.dead) as usize
    }

    fn memory_bytes(&self) -> usize {
        self.nodes.capacity() * size_of::<Node>()
            + self.offs.capacity() * size_of::<u32>()
            + self.recs.capacity() * size_of::<Rec>()
            + self.full.capacity() * size_of::<Full>()
            + self.roots.capacity() * size_of::<Root>()
            + self.table.capacity() * size_of::<u32>()
    }

    /// The leaf `code` lands in for `k`.
    #[inline(always)]
    fn descend(&self, mut code: u32, k: &PKey) -> u32 {
        while code & LEAF == 0 {
            let node = &self.nodes[code as usize];
            code = node.child[usize::from(k.d[(node.dim & 7) as usize] > node.split)];
        }
        code
    }

    /// The records of leaf `code`.
    #[inline(always)]
    fn leaf_span(&self, code: u32) -> (usize, usize) {
        let i = (code & !LEAF) as usize;
        (self.offs[i] as usize, self.offs[i + 1] as usize)
    }

    /// Improves `best` from the leaf records `recs[s..e]`.
    #[inline(always)]
    fn scan(&self, s: usize, e: usize, k: &PKey, key: &Key, dead: &[u64], best: &mut u64) {
        for (i, r) in self.recs[s..e].iter().enumerate() {
            let order = r.order();
            // Sorted by order: nothing further on can beat `best`.
            if order >= *best {
                return;
            }
            if r.matches(k)
                && (self.dead == 0 || !bit(dead, r.id))
                && (self.full.is_empty() || full_matches(&self.full[s + i], key))
            {
                *best = order;
                return;
            }
        }
    }

    fn lookup(&self, k: &PKey, key: &Key, dead: &[u64], best: &mut u64) {
        for root in &self.roots {
            if root.min_order < *best {
                let (s, e) = self.leaf_span(self.descend(root.start(&self.table, k), k));
                self.scan(s, e, k, key, dead, best);
            }
        }
    }

    /// `lookup` for up to `GROUP` keys at once, interleaved.
    fn lookup_group(&self, pk: &[PKey], keys: &[&Key], dead: &[u64], best: &mut [u64]) {
        let n = pk.len();
        let mut cur = [LEAF; GROUP];
        for root in &self.roots {
            if root.mask != 0 {
                // Fetch every key's table cell before any is needed.
                for k in &pk[..n] {
                    if let Some(cell) = self.table.get(root.cell(k)) {
                        prefetch(cell);
                    }
                }
            }
            let mut active = false;
            for j in 0..n {
                // A key whose answer already beats every rule of this tree skips it.
                cur[j] = if root.min_order < best[j] {
                    active = true;
                    let c = root.start(&self.table, &pk[j]);
                    if c & LEAF == 0 {
                        prefetch(&self.nodes[c as usize]);
                    }
                    c
                } else {
                    FREE
                };
            }
            if !active {
                continue;
            }
            // Keys still inside the tree; each round moves every one of them one level down.
            let mut act = [0u8; GROUP];
            let mut na = 0;
            for (j, &c) in cur[..n].iter().enumerate() {
                if c & LEAF == 0 {
                    // j < GROUP, which fits a u8.
                    act[na] = j as u8;
                    na += 1;
                }
            }
            while na > 0 {
                let mut i = 0;
                while i < na {
                    let j = usize::from(act[i]);
                    let node = &self.nodes[cur[j] as usize];
                    let next = node.child[usize::from(pk[j].d[(node.dim & 7) as usize] > node.split)];
                    cur[j] = next;
                    if next & LEAF == 0 {
                        prefetch(&self.nodes[next as usize]);
                        i += 1;
                    } else {
                        na -= 1;
                        act[i] = act[na];
                    }
                }
            }
            let mut spans = [(0usize, 0usize); GROUP];
            for j in 0..n {
                if cur[j] != FREE {
                    spans[j] = self.leaf_span(cur[j]);
                    if spans[j].0 < spans[j].1 {
                        prefetch(&self.recs[spans[j].0]);
                    }
                }
            }
            for j in 0..n {
                if cur[j] != FREE {
                    self.scan(spans[j].0, spans[j].1, &pk[j], keys[j], dead, &mut best[j]);
                }
            }
        }
    }
}

fn full_matches(full: &Full, key: &Key) -> bool {
    full.0.contains(key.src) && full.1.contains(key.dst)
}

#[inline(always)]
fn bit(bits: &[u64], i: u32) -> bool {
    // Every id a record carries was sized into the bitset when it was allocated.
    bits[(i / 64) as usize] & (1 << (i % 64)) != 0
}

/// Hints the CPU to fetch `p`'s cache line.
#[inline(always)]
fn prefetch<T>(p: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: a prefetch is only a hint: it never faults or changes memory, and
        // `p` is a live reference besides. SSE is part of the x86_64 baseline.
        unsafe { _mm_prefetch::<_MM_HINT_T0>((p as *const T).cast::<i8>()) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Builds a level's trees.
struct Builder<'a> {
    src: &'a [Rec],
    src_full: &'a [Full],
    ranges: Vec<[(u32, u32); 5]>,
    pts: Vec<u32>,
    /// Record count past which the current tree stops cutting.
    budget: usize,
    level: Level,
}

impl Builder<'_> {
    /// A level over `recs` (and, for IPv6, their full prefixes), all live.
    fn build(recs: &[Rec], full: &[Full]) -> Level {
        let ranges = recs.iter().map(|r| std::array::from_fn(|d| r.range(d))).collect();
        let mut b = Builder {
            src: recs,
            src_full: full,
            ranges,
            pts: Vec::new(),
            budget: 0,
            level: Level::default(),
        };
        b.level.offs.push(0);
        b.level.count = u32::try_from(recs.len()).unwrap_or(u32::MAX);
        let mut parts: [Vec<u32>; 3] = Default::default();
        for (i, r) in recs.iter().enumerate() {
            let p = if r.src_w < SMALL {
                0
            } else if r.dst_w < SMALL {
                1
            } else {
                2
            };
            // Ids fit u32, so do indices into their records.
            parts[p].push(i as u32);
        }
        for (p, part) in parts.into_iter().enumerate() {
            if part.is_empty() {
                continue;
            }
            let min_order = part.iter().map(|&i| recs[i as usize].order()).min().unwrap_or(u64::MAX);
            b.budget = b.level.recs.len() + MAX_REPLICATION * part.len() + 1024;
            let root = match (p, b.cut_plan(&part, p)) {
                (0 | 1, Some((shift, bits))) => b.cut(part, p, shift, bits, min_order),
                _ => Root {
                    code: b.node(part, FULL_LO, FULL_HI, 0),
                    dim: 0,
                    shift: 0,
                    mask: 0,
                    min_order,
                },
            };
            b.level.roots.push(root);
        }
        // Best trees first: their answers let lookups skip the others.
        b.level.roots.sort_by_key(|r| r.min_order);
        b.level.table.shrink_to_fit();
        b.level.nodes.shrink_to_fit();
        b.level.offs.shrink_to_fit();
        b.level.recs.shrink_to_fit();
        b.level.full.shrink_to_fit();
        b.level
    }

    /// Where a cut table on dimension `d` (an address, small for every rule of
    /// `idx`) should take its index bits: `(shift, bits)`, or `None` if the
    /// rules do not spread over enough distinct values to be worth one.
    fn cut_plan(&self, idx: &[u32], d: usize) -> Option<(u32, u32)> {
        if d > 1 || idx.len() <= 4 * BINTH {
            return None;
        }
        let lo = idx.iter().map(|&i| self.ranges[i as usize][d].0).min()?;
        let hi = idx.iter().map(|&i| self.ranges[i as usize][d].1).max()?;
        let diff = lo ^ hi;
        if diff == 0 {
            return None;
        }
        // Index by the bits just below the common prefix of all the rules.
        let top = 31 - diff.leading_zeros();
        let want = (usize::BITS - idx.len().leading_zeros())
            .saturating_sub(2)
            .clamp(4, CUT_BITS);
        let bits = want.min(top + 1);
        Some((top + 1 - bits, bits))
    }

    /// A root whose top is a cut table on dimension `d`, with a subtree per cell.
    fn cut(&mut self, idx: Vec<u32>, d: usize, shift: u32, bits: u32, min_order: u64) -> Root {
        let cells = 1usize << bits;
        let mask = (cells - 1) as u32;
        // The bits above the index are common to every rule (see `cut_plan`).
        let any = self.ranges[idx[0] as usize][d].0;
        let above = u64::from(any) >> (shift + bits) << (shift + bits);
        let mut lists: Vec<Vec<u32>> = vec![Vec::new(); cells];
        for &i in &idx {
            let (l, h) = self.ranges[i as usize][d];
            let (cl, ch) = ((l >> shift) & mask, (h >> shift) & mask);
            for c in cl..=ch {
                lists[c as usize].push(i);
            }
        }
        drop(idx);
        let base = self.level.table.len() as u32;
        let empty = self.leaf(Vec::new());
        for (c, list) in lists.into_iter().enumerate() {
            let code = if list.is_empty() {
                empty
            } else {
                let (mut lo, mut hi) = (FULL_LO, FULL_HI);
                let cell_lo = above | ((c as u64) << shift);
                // Both ends lie inside the u32 the common prefix belongs to.
                lo[d] = cell_lo as u32;
                hi[d] = (cell_lo + (1u64 << shift) - 1) as u32;
                self.node(list, lo, hi, 0)
            };
            self.level.table.push(code);
        }
        Root {
            code: base,
            dim: d as u32,
            shift,
            mask,
            min_order,
        }
    }

    /// Builds the subtree for rules `idx` inside the box `lo..=hi`; returns its code.
    fn node(&mut self, idx: Vec<u32>, lo: [u32; 5], hi: [u32; 5], depth: u32) -> u32 {
        // Past the record budget the tree stops cutting: adversarial rule sets
        // then cost lookup time instead of unbounded memory.
        let over_budget = self.level.recs.len() > self.budget;
        if idx.len() <= BINTH || depth >= MAX_DEPTH || over_budget {
            return self.leaf(idx);
        }
        // (heavier side, both sides, dim, split)
        let mut best: Option<(usize, usize, usize, u32)> = None;
        for d in 0..5 {
            self.pts.clear();
            for &i in &idx {
                let (l, h) = self.ranges[i as usize][d];
                // Endpoints on the box's edge do not cut it.
                if l > lo[d] {
                    self.pts.push(l - 1);
                }
                if h < hi[d] {
                    self.pts.push(h);
                }
            }
            if self.pts.is_empty() {
                continue;
            }
            self.pts.sort_unstable();
            self.pts.dedup();
            for q in [1, 2, 3] {
                let split = self.pts[(self.pts.len() * q / 4).min(self.pts.len() - 1)];
                let (mut nl, mut nr) = (0, 0);
                for &i in &idx {
                    let (l, h) = self.ranges[i as usize][d];
                    nl += usize::from(l <= split);
                    nr += usize::from(h > split);
                }
                let cost = nl.max(nr);
                if best.is_none_or(|b| (cost, nl + nr) < (b.0, b.1)) {
                    best = Some((cost, nl + nr, d, split));
                }
            }
        }
        let Some((_, _, d, split)) = best else {
            // Every rule covers the whole box: nothing left to cut.
            return self.leaf(idx);
        };
        let (left, right): (Vec<u32>, Vec<u32>) = {
            let left = idx
                .iter()
                .copied()
                .filter(|&i| self.ranges[i as usize][d].0 <= split)
                .collect();
            let right = idx
                .iter()
                .copied()
                .filter(|&i| self.ranges[i as usize][d].1 > split)
                .collect();
            (left, right)
        };
        drop(idx);
        let at = self.level.nodes.len();
        self.level.nodes.push(Node {
            split,
            dim: d as u32,
            child: [0, 0],
        });
        let mut lhi = hi;
        lhi[d] = split;
        let mut rlo = lo;
        rlo[d] = split + 1;
        let l = self.node(left, lo, lhi, depth + 1);
        let r = self.node(right, rlo, hi, depth + 1);
        self.level.nodes[at].child = [l, r];
        at as u32
    }

    fn leaf(&mut self, mut idx: Vec<u32>) -> u32 {
        idx.sort_unstable_by_key(|&i| self.src[i as usize].order());
        for &i in &idx {
            self.level.recs.push(self.src[i as usize]);
            if !self.src_full.is_empty() {
                self.level.full.push(self.src_full[i as usize]);
            }
        }
        self.level.offs.push(self.level.recs.len() as u32);
        (self.level.offs.len() as u32 - 2) | LEAF
    }
}

/// The rules of one address family.
#[derive(Debug, Clone)]
struct Engine {
    family: Family,
    levels: Vec<Level>,
    /// Recently inserted rules, sorted by order.
    buf: Vec<Rec>,
    /// Full prefixes parallel to `buf` (IPv6 only).
    buf_full: Vec<Full>,
}

impl Engine {
    fn new(family: Family) -> Engine {
        Engine {
            family,
            levels: Vec::new(),
            buf: Vec::new(),
            buf_full: Vec::new(),
        }
    }

    fn is_v6(&self) -> bool {
        self.family == Family::V6
    }

    fn memory_bytes(&self) -> usize {
        self.levels.iter().map(Level::memory_bytes).sum::<usize>()
            + self.levels.capacity() * size_of::<Level>()
            + self.buf.capacity() * size_of::<Rec>()
            + self.buf_full.capacity() * size_of::<Full>()
    }

    fn scan_buf(&self, k: &PKey, key: &Key, best: &mut u64) {
        for (i, r) in self.buf.iter().enumerate() {
            let order = r.order();
            if order >= *best {
                return;
            }
            if r.matches(k) && (!self.is_v6() || full_matches(&self.buf_full[i], key)) {
                *best = order;
                return;
            }
        }
    }

    fn lookup(&self, key: &Key, dead: &[u64]) -> u64 {
        let k = PKey::new(key);
        let mut best = u64::MAX;
        for level in &self.levels {
            level.lookup(&k, key, dead, &mut best);
        }
        self.scan_buf(&k, key, &mut best);
        best
    }
}

/// The fast classifier; see the module documentation for its design.
#[derive(Debug, Clone)]
pub struct SplitClassifier {
    v4: Engine,
    v6: Engine,
    /// Per id: `FREE`, `DEAD`, `BUF` or a level index, with bit 31 set for IPv6.
    state: Vec<u32>,
    actions: Vec<u32>,
    /// Tombstones by id.
    dead: Vec<u64>,
    ids: IdAlloc,
    len: usize,
}

impl Default for SplitClassifier {
    fn default() -> Self {
        SplitClassifier::new()
    }
}

const V6_BIT: u32 = 1 << 31;

impl SplitClassifier {
    /// An empty classifier.
    pub fn new() -> SplitClassifier {
        SplitClassifier {
            v4: Engine::new(Family::V4),
            v6: Engine::new(Family::V6),
            state: Vec::new(),
            actions: Vec::new(),
            dead: Vec::new(),
            ids: IdAlloc::default(),
            len: 0,
        }
    }

    /// A classifier holding `rules`, built in one go; the i-th rule gets id `i`.
    pub fn from_rules(rules: &[Rule]) -> Result<SplitClassifier, RuleError> {
        let mut c = SplitClassifier::new();
        let mut recs: [Vec<Rec>; 2] = Default::default();
        let mut full = Vec::new();
        for rule in rules {
            rule.validate()?;
            let id = c.alloc(rule)?;
            let rec = Rec::new(rule, id);
            if rule.family() == Family::V6 {
                recs[1].push(rec);
                full.push((rule.src, rule.dst));
            } else {
                recs[0].push(rec);
            }
        }
        for (fam, recs) in recs.into_iter().enumerate() {
            if !recs.is_empty() {
                let full = if fam == 1 { &full[..] } else { &[][..] };
                let level = Builder::build(&recs, full);
                c.install_level(fam == 1, None, level);
            }
        }
        Ok(c)
    }

    /// Rebuilds everything into one level per family: the fastest lookups,
    /// at the price of a full build.
    pub fn compact(&mut self) {
        for v6 in [false, true] {
            let engine = if v6 { &self.v6 } else { &self.v4 };
            if engine.levels.is_empty() && engine.buf.is_empty() {
                continue;
            }
            let all = 0..engine.levels.len();
            let level = self.rebuild(v6, all, true);
            let engine = if v6 { &mut self.v6 } else { &mut self.v4 };
            engine.levels.clear();
            engine.buf.clear();
            engine.buf_full.clear();
            self.install_level(v6, None, level);
        }
    }

    /// Number of levels (static tree sets) per family, IPv4 then IPv6; for
    /// tests and diagnostics.
    pub fn levels(&self) -> (usize, usize) {
        (self.v4.levels.len(), self.v6.levels.len())
    }

    /// Takes an id for `rule` and records its action.
    fn alloc(&mut self, rule: &Rule) -> Result<u32, RuleError> {
        let id = self.ids.alloc()?;
        let i = id as usize;
        if self.state.len() <= i {
            self.state.resize(i + 1, FREE);
            self.actions.resize(i + 1, 0);
        }
        if self.dead.len() <= i / 64 {
            self.dead.resize(i / 64 + 1, 0);
        }
        let fam = if rule.family() == Family::V6 { V6_BIT } else { 0 };
        self.state[i] = BUF | fam;
        self.actions[i] = rule.action;
        self.len += 1;
        Ok(id)
    }

    /// Builds one level from the live rules of levels `range` (and, if
    /// `with_buf`, the buffer) of a family, freeing the ids of their dead rules.
    fn rebuild(&mut self, v6: bool, range: std::ops::Range<usize>, with_buf: bool) -> Level {
        let engine = if v6 { &self.v6 } else { &self.v4 };
        let mut picks: Vec<(u32, usize, usize)> = Vec::new();
        for li in range {
            for (p, r) in engine.levels[li].recs.iter().enumerate() {
                picks.push((r.id, li, p));
            }
        }
        // Records are replicated across leaves: keep one per rule.
        picks.sort_unstable_by_key(|&(id, _, _)| id);
        picks.dedup_by_key(|&mut (id, _, _)| id);
        let mut recs = Vec::with_capacity(picks.len() + engine.buf.len());
        let mut full = Vec::new();
        for (id, li, p) in picks {
            if bit(&self.dead, id) {
                self.dead[(id / 64) as usize] &= !(1 << (id % 64));
                self.state[id as usize] = FREE;
                self.ids.free(id);
                continue;
            }
            let level = &engine.levels[li];
            recs.push(level.recs[p]);
            if v6 {
                full.push(level.full[p]);
            }
        }
        if with_buf {
            recs.extend_from_slice(&engine.buf);
            full.extend_from_slice(&engine.buf_full);
        }
        Builder::build(&recs, &full)
    }

    /// Puts `level` at index `at` (or at the end) and points its rules' state at it.
    fn install_level(&mut self, v6: bool, at: Option<usize>, level: Level) {
        let engine = if v6 { &mut self.v6 } else { &mut self.v4 };
        let at = match at {
            Some(at) => {
                engine.levels[at] = level;
                at
            }
            None => {
                engine.levels.push(level);
                engine.levels.len() - 1
            }
        };
        let tag = at as u32 | if v6 { V6_BIT } else { 0 };
        for r in &engine.levels[at].recs {
            // Tombstoned rules stay DEAD until their level is rebuilt.
            if !bit(&self.dead, r.id) {
                self.state[r.id as usize] = tag;
            }
        }
    }

    /// Turns a full buffer into a level and merges levels as the LSM policy says.
    fn flush(&mut self, v6: bool) {
        let engine = if v6 { &mut self.v6 } else { &mut self.v4 };
        let level = Builder::build(&engine.buf, &engine.buf_full);
        engine.buf.clear();
        engine.buf_full.clear();
        self.install_level(v6, None, level);
        loop {
            let engine = if v6 { &self.v6 } else { &self.v4 };
            let n = engine.levels.len();
            if n < 2 || engine.levels[n - 2].live() > MERGE_RATIO * engine.levels[n - 1].live() {
                break;
            }
            let merged = self.rebuild(v6, n - 2..n, false);
            let engine = if v6 { &mut self.v6 } else { &mut self.v4 };
            engine.levels.truncate(n - 2);
            self.install_level(v6, None, merged);
        }
    }
}

impl Classifier for SplitClassifier {
    fn insert(&mut self, rule: Rule) -> Result<RuleId, RuleError> {
        rule.validate()?;
        let id = self.alloc(&rule)?;
        let rec = Rec::new(&rule, id);
        let v6 = rule.family() == Family::V6;
        let engine = if v6 { &mut self.v6 } else { &mut self.v4 };
        let at = engine.buf.partition_point(|r| r.order() < rec.order());
        engine.buf.insert(at, rec);
        if v6 {
            engine.buf_full.insert(at, (rule.src, rule.dst));
        }
        if engine.buf.len() >= BUF_CAP {
            self.flush(v6);
        }
        Ok(RuleId(id))
    }

    fn remove(&mut self, id: RuleId) -> bool {
        let Some(&state) = self.state.get(id.0 as usize) else {
            return false;
        };
        if state == FREE || state == DEAD {
            return false;
        }
        self.len -= 1;
        let v6 = state & V6_BIT != 0;
        let where_ = state & !V6_BIT;
        if where_ == BUF {
            let engine = if v6 { &mut self.v6 } else { &mut self.v4 };
            // The state says the rule is in this buffer.
            if let Some(at) = engine.buf.iter().position(|r| r.id == id.0) {
                engine.buf.remove(at);
                if v6 {
                    engine.buf_full.remove(at);
                }
            }
            self.state[id.0 as usize] = FREE;
            self.ids.free(id.0);
            return true;
        }
        let li = where_ as usize;
        self.state[id.0 as usize] = DEAD;
        self.dead[(id.0 / 64) as usize] |= 1 << (id.0 % 64);
        let engine = if v6 { &mut self.v6 } else { &mut self.v4 };
        let level = &mut engine.levels[li];
        level.dead += 1;
        if level.dead as usize > level.live() {
            let rebuilt = self.rebuild(v6, li..li + 1, false);
            if rebuilt.count == 0 {
                let engine = if v6 { &mut self.v6 } else { &mut self.v4 };
                engine.levels.remove(li);
                // The levels after it moved down one place.
                for at in li..engine.levels.len() {
                    let engine = if v6 { &mut self.v6 } else { &mut self.v4 };
                    let level = std::mem::take(&mut engine.levels[at]);
                    self.install_level(v6, Some(at), level);
                }
            } else {
                self.install_level(v6, Some(li), rebuilt);
            }
        }
        true
    }

    fn lookup(&self, key: &Key) -> Option<Match> {
        let engine = if key.family == Family::V6 { &self.v6 } else { &self.v4 };
        self.to_match(engine.lookup(key, &self.dead))
    }

    fn lookup_batch(&self, keys: &[Key], out: &mut [Option<Match>]) {
        let n = keys.len().min(out.len());
        for (keys, out) in keys[..n].chunks(GROUP).zip(out[..n].chunks_mut(GROUP)) {
            for engine in [&self.v4, &self.v6] {
                if engine.levels.is_empty() && engine.buf.is_empty() {
                    // Its keys get no match, which `out` must still say.
                    for (key, slot) in keys.iter().zip(out.iter_mut()) {
                        if key.family == engine.family {
                            *slot = None;
                        }
                    }
                    continue;
                }
                let mut pk = [PKey::default(); GROUP];
                let mut refs: [&Key; GROUP] = [&keys[0]; GROUP];
                let mut pos = [0usize; GROUP];
                let mut m = 0;
                for (i, key) in keys.iter().enumerate() {
                    if key.family == engine.family {
                        pk[m] = PKey::new(key);
                        refs[m] = key;
                        pos[m] = i;
                        m += 1;
                    }
                }
                if m == 0 {
                    continue;
                }
                let mut best = [u64::MAX; GROUP];
                for level in &engine.levels {
                    level.lookup_group(&pk[..m], &refs[..m], &self.dead, &mut best[..m]);
                }
                if !engine.buf.is_empty() {
                    for j in 0..m {
                        engine.scan_buf(&pk[j], refs[j], &mut best[j]);
                    }
                }
                for j in 0..m {
                    out[pos[j]] = self.to_match(best[j]);
                }
            }
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn memory_bytes(&self) -> usize {
        self.v4.memory_bytes()
            + self.v6.memory_bytes()
            + self.state.capacity() * size_of::<u32>()
            + self.actions.capacity() * size_of::<u32>()
            + self.dead.capacity() * size_of::<u64>()
            + self.ids.memory_bytes()
    }
}

impl SplitClassifier {
    #[inline(always)]
    fn to_match(&self, order: u64) -> Option<Match> {
        if order == u64::MAX {
            return None;
        }
        // The low half of an order is an installed rule's id.
        let id = order as u32;
        Some(Match {
            id: RuleId(id),
            priority: (order >> 32) as u32,
            action: self.actions[id as usize],
        })
    }
}

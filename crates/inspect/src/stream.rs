//! One direction of a TCP connection, reassembled.
//!
//! Bytes are addressed by their offset in the stream (0 is the byte after
//! the SYN), a 64-bit number, so a long connection whose sequence numbers
//! wrap keeps increasing offsets. The stream keeps the contiguous bytes not
//! yet consumed by both the detection engine and the application-layer
//! parser, plus out-of-order segments waiting for the hole before them.
//!
//! **Overlap policy: first data wins.** When a segment overlaps bytes the
//! stream already holds (contiguous or out of order), the bytes already held
//! are kept and the new ones for that range are discarded; only the part of
//! the segment that covers new offsets is added. This is what BSD-derived
//! stacks (and Windows) do for most overlaps; an attacker who sends
//! different bytes for the same offsets cannot make the engine inspect data
//! other than the first it saw. Overlapping bytes that differ from those held
//! are counted (`overlap_mismatch`), since benign retransmissions repeat the
//! same bytes.
//!
//! **Bounds.** A direction accepts data up to `depth` bytes into the stream
//! (later data is not reassembled: its packets are inspected one by one),
//! holds at most `max_ooo_bytes` in at most `max_ooo_segments` out-of-order
//! segments (more are refused and counted), and charges every byte it holds
//! to a [`MemoryBudget`] shared by all flows of a host; when the budget is
//! spent, new data is refused and counted, and the flow falls back to
//! per-packet inspection, as beyond `depth`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A byte budget shared by the streams of a host (or a worker, or a vNIC).
#[derive(Debug)]
pub struct MemoryBudget {
    limit: usize,
    used: AtomicUsize,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(MemoryBudget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Takes `n` bytes if they fit.
    pub fn try_charge(&self, n: usize) -> bool {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let Some(next) = cur.checked_add(n).filter(|&x| x <= self.limit) else {
                return false;
            };
            match self
                .used
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Gives `n` bytes back.
    pub fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }

    /// Bytes in use.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// A worker's share of a [`MemoryBudget`]. Bytes are taken from the shared
/// budget in chunks of `CHUNK` and given back once more than `KEEP` are
/// spare, so charging a segment is usually a subtraction rather than an
/// atomic operation on a cache line all workers write; the shared budget
/// overstates what is held by at most `KEEP` bytes per worker.
#[derive(Debug)]
pub struct LocalBudget {
    shared: Arc<MemoryBudget>,
    spare: usize,
    in_use: usize,
}

impl LocalBudget {
    /// Bytes taken from the shared budget at a time.
    pub const CHUNK: usize = 64 * 1024;
    /// Spare bytes kept at most before giving some back.
    pub const KEEP: usize = 4 * Self::CHUNK;

    /// A share of `shared`.
    pub fn new(shared: Arc<MemoryBudget>) -> Self {
        LocalBudget {
            shared,
            spare: 0,
            in_use: 0,
        }
    }

    /// Takes `n` bytes if they fit.
    pub fn charge(&mut self, n: usize) -> bool {
        if self.spare < n {
            let want = n - self.spare;
            if self.shared.try_charge(want.max(Self::CHUNK)) {
                self.spare += want.max(Self::CHUNK);
            } else if self.shared.try_charge(want) {
                self.spare += want;
            } else {
                return false;
            }
        }
        self.spare -= n;
        self.in_use += n;
        true
    }

    /// Gives `n` bytes back.
    pub fn release(&mut self, n: usize) {
        let n = n.min(self.in_use);
        self.in_use -= n;
        self.spare += n;
        if self.spare > Self::KEEP {
            let give = self.spare - Self::CHUNK;
            self.shared.release(give);
            self.spare -= give;
        }
    }

    /// Bytes held by this worker's streams.
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// The shared budget.
    pub fn shared(&self) -> &Arc<MemoryBudget> {
        &self.shared
    }
}

impl Drop for LocalBudget {
    fn drop(&mut self) {
        self.shared.release(self.spare + self.in_use);
    }
}

/// Per-direction limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Bytes of a direction reassembled at most (Suricata's `stream.reassembly.depth`).
    pub depth: u64,
    /// Out-of-order bytes held at most.
    pub max_ooo_bytes: usize,
    /// Out-of-order segments held at most.
    pub max_ooo_segments: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            depth: 1 << 20,
            max_ooo_bytes: 256 * 1024,
            max_ooo_segments: 64,
        }
    }
}

/// What happened to a segment's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// Contiguous data now reaches further: offsets `from..to` are new.
    Advanced {
        /// First new offset.
        from: u64,
        /// End of contiguous data now.
        to: u64,
    },
    /// Held until the hole before it is filled.
    Held,
    /// Nothing new: every byte was already there (a retransmission).
    Duplicate,
    /// Not taken: beyond `depth`.
    BeyondDepth,
    /// Not taken: the out-of-order or memory limits were reached.
    Refused,
}

/// Counters a stream adds to; the engine sums them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamCounters {
    /// Overlapping bytes that differed from those already held.
    pub overlap_mismatch: u64,
    /// Segments refused for the out-of-order limits.
    pub ooo_refused: u64,
    /// Segments refused because the memory budget was spent.
    pub memcap_refused: u64,
    /// Holes skipped because the receiver acknowledged past them.
    pub gaps: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Segment {
    pub(crate) offset: u64,
    pub(crate) bytes: Vec<u8>,
}

impl Segment {
    fn end(&self) -> u64 {
        self.offset + self.bytes.len() as u64
    }
}

/// One direction's reassembly state.
#[derive(Debug)]
pub struct Stream {
    /// Sequence number of offset 0.
    pub(crate) base_seq: u32,
    /// Contiguous bytes from `data_start` to `next`.
    pub(crate) data: Vec<u8>,
    pub(crate) data_start: u64,
    pub(crate) next: u64,
    pub(crate) ooo: Vec<Segment>,
    pub(crate) ooo_bytes: usize,
    /// Offset the receiver acknowledged up to.
    pub(crate) acked: u64,
    pub(crate) acked_known: bool,
    /// Up to where the detection engine inspected.
    pub raw_progress: u64,
    /// Up to where the application-layer parser consumed.
    pub app_progress: u64,
    /// Offset of the FIN, once seen.
    pub fin: Option<u64>,
    /// Bytes charged to the budget.
    pub(crate) charged: usize,
    /// Data reached `depth`; later data is not reassembled.
    pub depth_reached: bool,
}

impl Stream {
    /// A stream whose first byte has sequence number `first_seq`.
    pub fn new(first_seq: u32) -> Self {
        Stream {
            base_seq: first_seq,
            data: Vec::new(),
            data_start: 0,
            next: 0,
            ooo: Vec::new(),
            ooo_bytes: 0,
            acked: 0,
            acked_known: false,
            raw_progress: 0,
            app_progress: 0,
            fin: None,
            charged: 0,
            depth_reached: false,
        }
    }

    /// The offset of sequence number `seq`, taken as the one nearest to the
    /// stream's current end (sequence numbers wrap every 4 GiB).
    pub fn offset_of(&self, seq: u32) -> u64 {
        let rel = seq.wrapping_sub(self.base_seq);
        let delta = rel.wrapping_sub(self.next as u32) as i32;
        (self.next as i64 + i64::from(delta)).max(0) as u64
    }

    /// End of contiguous data.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Contiguous bytes the receiver acknowledged.
    pub fn acked_edge(&self) -> u64 {
        if self.acked_known { self.acked.min(self.next) } else { 0 }
    }

    /// Bytes held (contiguous and out of order).
    pub fn held(&self) -> usize {
        self.data.len() + self.ooo_bytes
    }

    /// Records the receiver's acknowledgment of sequence number `ack`.
    pub fn ack(&mut self, ack: u32) {
        let off = self.offset_of(ack);
        if !self.acked_known || off > self.acked {
            self.acked = off;
            self.acked_known = true;
        }
    }

    /// Adds a segment's payload starting at sequence number `seq`.
    pub fn insert(
        &mut self,
        seq: u32,
        payload: &[u8],
        limits: &StreamLimits,
        budget: &mut LocalBudget,
        counters: &mut StreamCounters,
    ) -> Insert {
        if payload.is_empty() {
            return Insert::Duplicate;
        }
        let mut offset = self.offset_of(seq);
        let mut bytes = payload;
        let end = offset + bytes.len() as u64;
        // Already-consumed prefix (before the bytes we still hold): compare what we can.
        if end <= self.next {
            self.compare_held(offset, bytes, counters);
            return Insert::Duplicate;
        }
        if offset < self.next {
            let skip = (self.next - offset) as usize;
            self.compare_held(offset, &bytes[..skip], counters);
            bytes = &bytes[skip..];
            offset = self.next;
        }
        if offset >= limits.depth {
            self.depth_reached = true;
            return Insert::BeyondDepth;
        }
        if offset + bytes.len() as u64 > limits.depth {
            bytes = &bytes[..(limits.depth - offset) as usize];
            self.depth_reached = true;
        }
        if offset > self.next {
            return self.hold(offset, bytes, limits, budget, counters);
        }
        // In order: the part not covered by held segments is new; held bytes win.
        let from = self.next;
        if !self.append_in_order(bytes, budget, counters) {
            return Insert::Refused;
        }
        self.drain_ooo(counters);
        Insert::Advanced { from, to: self.next }
    }

    /// Appends in-order bytes at `next`, letting held out-of-order bytes win
    /// where they overlap. Returns false when the budget refused.
    fn append_in_order(&mut self, bytes: &[u8], budget: &mut LocalBudget, counters: &mut StreamCounters) -> bool {
        let start = self.next;
        let end = start + bytes.len() as u64;
        // Only up to the first held segment: from there on the held bytes come first.
        let take_to = self.ooo.first().map_or(end, |s| s.offset.min(end));
        let take = (take_to - start) as usize;
        if !self.charge(take, budget) {
            counters.memcap_refused += 1;
            return false;
        }
        self.data.extend_from_slice(&bytes[..take]);
        self.next = take_to;
        // The rest overlaps held segments or lies between them: hold it (first wins).
        if take < bytes.len() {
            let rest = &bytes[take..];
            let mut off = take_to;
            let mut rest = rest;
            while !rest.is_empty() {
                // Within a held segment: compare; in a hole: store.
                if let Some(seg) = self.ooo.iter().find(|s| s.offset <= off && off < s.end()) {
                    let n = ((seg.end() - off) as usize).min(rest.len());
                    let held = &seg.bytes[(off - seg.offset) as usize..][..n];
                    counters.overlap_mismatch += u64::from(held != &rest[..n]);
                    off += n as u64;
                    rest = &rest[n..];
                } else {
                    let hole_end = self
                        .ooo
                        .iter()
                        .map(|s| s.offset)
                        .filter(|&o| o > off)
                        .min()
                        .unwrap_or(u64::MAX);
                    let n = ((hole_end - off) as usize).min(rest.len());
                    if !self.charge(n, budget) {
                        counters.memcap_refused += 1;
                        break;
                    }
                    self.insert_segment(Segment {
                        offset: off,
                        bytes: rest[..n].to_vec(),
                    });
                    off += n as u64;
                    rest = &rest[n..];
                }
            }
        }
        true
    }

    fn hold(
        &mut self,
        offset: u64,
        bytes: &[u8],
        limits: &StreamLimits,
        budget: &mut LocalBudget,
        counters: &mut StreamCounters,
    ) -> Insert {
        // Cut the segment into the parts that fall in holes between held segments.
        let mut pieces: Vec<(u64, &[u8])> = Vec::new();
        let mut off = offset;
        let mut rest = bytes;
        while !rest.is_empty() {
            if let Some(seg) = self.ooo.iter().find(|s| s.offset <= off && off < s.end()) {
                let n = ((seg.end() - off) as usize).min(rest.len());
                let held = &seg.bytes[(off - seg.offset) as usize..][..n];
                counters.overlap_mismatch += u64::from(held != &rest[..n]);
                off += n as u64;
                rest = &rest[n..];
            } else {
                let hole_end = self
                    .ooo
                    .iter()
                    .map(|s| s.offset)
                    .filter(|&o| o > off)
                    .min()
                    .unwrap_or(u64::MAX);
                let n = ((hole_end - off) as usize).min(rest.len());
                pieces.push((off, &rest[..n]));
                off += n as u64;
                rest = &rest[n..];
            }
        }
        if pieces.is_empty() {
            return Insert::Duplicate;
        }
        let new_bytes: usize = pieces.iter().map(|p| p.1.len()).sum();
        if self.ooo.len() + pieces.len() > limits.max_ooo_segments || self.ooo_bytes + new_bytes > limits.max_ooo_bytes
        {
            counters.ooo_refused += 1;
            return Insert::Refused;
        }
        if !self.charge(new_bytes, budget) {
            counters.memcap_refused += 1;
            return Insert::Refused;
        }
        for (off, b) in pieces {
            self.insert_segment(Segment {
                offset: off,
                bytes: b.to_vec(),
            });
        }
        Insert::Held
    }

    fn insert_segment(&mut self, seg: Segment) {
        self.ooo_bytes += seg.bytes.len();
        let at = self.ooo.partition_point(|s| s.offset < seg.offset);
        self.ooo.insert(at, seg);
    }

    /// Moves held segments that now continue the contiguous data into it.
    fn drain_ooo(&mut self, _counters: &mut StreamCounters) {
        while let Some(first) = self.ooo.first() {
            if first.offset > self.next {
                break;
            }
            let seg = self.ooo.remove(0);
            self.ooo_bytes -= seg.bytes.len();
            if seg.end() <= self.next {
                // Fully covered already (cannot normally happen: held bytes win).
                continue;
            }
            let skip = (self.next - seg.offset) as usize;
            // The charge moves from the held segment to the contiguous data.
            self.data.extend_from_slice(&seg.bytes[skip..]);
            self.next = seg.end();
        }
    }

    /// When the receiver acknowledged past a hole, the missing bytes will not
    /// come (they were lost before us, or refused): continue after the hole.
    /// Only once both consumers are done with the bytes before the hole.
    /// Returns the size of the hole skipped.
    pub fn skip_acked_gap(&mut self, counters: &mut StreamCounters) -> u64 {
        if !self.acked_known
            || self.acked <= self.next
            || self.raw_progress < self.next
            || self.app_progress < self.next
        {
            return 0;
        }
        let target = self.ooo.first().map_or(self.acked, |s| s.offset.min(self.acked));
        if target <= self.next {
            return 0;
        }
        let gap = target - self.next;
        // Nothing held before the hole is needed across it: restart the buffer.
        self.drop_front(self.data.len());
        self.data_start = target;
        self.next = target;
        self.raw_progress = self.raw_progress.max(target);
        self.app_progress = self.app_progress.max(target);
        counters.gaps += 1;
        self.drain_ooo(counters);
        gap
    }

    /// The bytes of `from..to` with up to `lookbehind` bytes before them:
    /// (data, origin) where `data[origin..]` is `from..to`.
    pub fn window(&self, from: u64, to: u64, lookbehind: usize) -> (&[u8], usize) {
        let from = from.max(self.data_start).min(self.next);
        let to = to.min(self.next).max(from);
        let start = from.saturating_sub(lookbehind as u64).max(self.data_start);
        let a = (start - self.data_start) as usize;
        let b = (to - self.data_start) as usize;
        (&self.data[a..b], (from - start) as usize)
    }

    /// Frees the bytes before `keep_from` (both consumers are past them, less
    /// the lookbehind the caller keeps).
    pub fn release_before(&mut self, keep_from: u64, budget: &mut LocalBudget) {
        let keep_from = keep_from.min(self.next);
        if keep_from <= self.data_start {
            return;
        }
        let n = (keep_from - self.data_start) as usize;
        // Amortize the copy: drain only once the dead prefix is a good part of the buffer.
        if n < 4096 && n * 2 < self.data.len() {
            return;
        }
        self.drop_front(n);
        self.data_start = keep_from;
        self.uncharge_to(budget);
    }

    fn drop_front(&mut self, n: usize) {
        self.data.drain(..n);
        if self.data.capacity() > 4 * self.data.len().max(1024) {
            self.data.shrink_to(self.data.len().max(1024));
        }
    }

    fn charge(&mut self, n: usize, budget: &mut LocalBudget) -> bool {
        if budget.charge(n) {
            self.charged += n;
            true
        } else {
            false
        }
    }

    /// Gives back the budget for bytes no longer held.
    fn uncharge_to(&mut self, budget: &mut LocalBudget) {
        let held = self.held();
        if self.charged > held {
            budget.release(self.charged - held);
            self.charged = held;
        }
    }

    /// Returns every charged byte (the flow is going away).
    pub fn release_all(&mut self, budget: &mut LocalBudget) {
        budget.release(self.charged);
        self.charged = 0;
        self.data = Vec::new();
        self.ooo = Vec::new();
        self.ooo_bytes = 0;
    }

    /// Compares retransmitted bytes with those still held.
    fn compare_held(&self, offset: u64, bytes: &[u8], counters: &mut StreamCounters) {
        let end = offset + bytes.len() as u64;
        let a = offset.max(self.data_start);
        let b = end.min(self.next);
        if a < b {
            let held = &self.data[(a - self.data_start) as usize..(b - self.data_start) as usize];
            let sent = &bytes[(a - offset) as usize..(b - offset) as usize];
            counters.overlap_mismatch += u64::from(held != sent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> (Stream, LocalBudget, StreamLimits, StreamCounters) {
        (
            Stream::new(1000),
            LocalBudget::new(MemoryBudget::new(1 << 20)),
            StreamLimits::default(),
            StreamCounters::default(),
        )
    }

    fn contiguous(s: &Stream) -> Vec<u8> {
        s.window(0, s.next(), 0).0.to_vec()
    }

    #[test]
    fn in_order_and_out_of_order_segments_reassemble() {
        let (mut s, mut b, l, mut c) = stream();
        assert_eq!(
            s.insert(1000, b"abc", &l, &mut b, &mut c),
            Insert::Advanced { from: 0, to: 3 }
        );
        assert_eq!(s.insert(1006, b"ghi", &l, &mut b, &mut c), Insert::Held);
        assert_eq!(
            s.insert(1003, b"def", &l, &mut b, &mut c),
            Insert::Advanced { from: 3, to: 9 }
        );
        assert_eq!(contiguous(&s), b"abcdefghi");
        assert_eq!(s.held(), 9);
        assert_eq!(b.in_use(), 9);
    }

    /// The overlap policy, case by case: the bytes first received win.
    #[test]
    fn first_data_wins_on_every_kind_of_overlap() {
        // (segments in arrival order as (seq offset, bytes), expected stream, mismatches)
        // (segments as (offset, bytes) in arrival order, expected stream, mismatches)
        type Case<'a> = (&'a [(u32, &'a [u8])], &'a [u8], u64);
        let cases: &[Case<'_>] = &[
            // exact retransmission with other bytes
            (&[(0, b"GOOD"), (0, b"EVIL")], b"GOOD", 1),
            // retransmission with the same bytes: no mismatch
            (&[(0, b"GOOD"), (0, b"GOOD")], b"GOOD", 0),
            // new segment overlaps the tail of held data and extends it
            (&[(0, b"GOOD"), (2, b"XXMORE")], b"GOODMORE", 1),
            // out-of-order segment arrives first, then an in-order one covering it
            (&[(4, b"TAIL"), (0, b"HEADXXXX")], b"HEADTAIL", 1),
            // in-order data overlaps the start of a held segment only
            (&[(6, b"CD"), (0, b"AAAABBXX"), (8, b"EF")], b"AAAABBCDEF", 1),
            // two held segments with a hole; a big segment fills the hole and overlaps both
            (&[(2, b"bb"), (6, b"dd"), (0, b"AABBCCDDEE")], b"AAbbCCddEE", 2),
            // overlapping out-of-order segments
            (&[(4, b"1234"), (6, b"XX56"), (0, b"abcd")], b"abcd123456", 1),
        ];
        for (segments, want, mismatches) in cases {
            let (mut s, mut b, l, mut c) = stream();
            for (off, bytes) in *segments {
                s.insert(1000 + off, bytes, &l, &mut b, &mut c);
            }
            assert_eq!(contiguous(&s), *want, "{segments:?}");
            assert_eq!(c.overlap_mismatch, *mismatches, "{segments:?}");
        }
    }

    #[test]
    fn limits_are_enforced_and_counted() {
        let shared = MemoryBudget::new(10);
        let mut b = LocalBudget::new(shared.clone());
        let l = StreamLimits {
            depth: 8,
            max_ooo_bytes: 4,
            max_ooo_segments: 1,
        };
        let mut c = StreamCounters::default();
        let mut s = Stream::new(0);
        assert_eq!(s.insert(2, b"cd", &l, &mut b, &mut c), Insert::Held);
        assert_eq!(
            s.insert(5, b"f", &l, &mut b, &mut c),
            Insert::Refused,
            "one out-of-order segment at most"
        );
        assert_eq!(c.ooo_refused, 1);
        assert_eq!(
            s.insert(0, b"ab", &l, &mut b, &mut c),
            Insert::Advanced { from: 0, to: 4 }
        );
        // Depth 8: only "efgh" of "efghij" is taken.
        assert_eq!(
            s.insert(4, b"efghij", &l, &mut b, &mut c),
            Insert::Advanced { from: 4, to: 8 }
        );
        assert!(s.depth_reached);
        assert_eq!(s.insert(8, b"k", &l, &mut b, &mut c), Insert::BeyondDepth);
        // Budget of 10 bytes: 8 held.
        let mut t = Stream::new(0);
        assert_eq!(
            t.insert(0, b"abc", &StreamLimits::default(), &mut b, &mut c),
            Insert::Refused
        );
        assert_eq!(c.memcap_refused, 1);
        s.release_all(&mut b);
        assert_eq!(b.in_use(), 0);
        drop(b);
        assert_eq!(shared.used(), 0);
    }

    #[test]
    fn consumed_bytes_are_released() {
        let (mut s, mut b, l, mut c) = stream();
        let big = vec![b'x'; 10_000];
        s.insert(1000, &big, &l, &mut b, &mut c);
        s.raw_progress = 9_000;
        s.release_before(9_000, &mut b);
        assert_eq!(s.held(), 1_000);
        assert_eq!(b.in_use(), 1_000);
        let (w, origin) = s.window(9_500, 10_000, 100);
        assert_eq!((w.len(), origin), (600, 100));
    }

    #[test]
    fn acknowledged_holes_are_skipped() {
        let (mut s, mut b, l, mut c) = stream();
        s.insert(1000, b"ab", &l, &mut b, &mut c);
        s.insert(1010, b"zz", &l, &mut b, &mut c);
        s.ack(1012);
        assert_eq!(s.skip_acked_gap(&mut c), 0, "\"ab\" is not consumed yet");
        s.raw_progress = 2;
        s.app_progress = 2;
        assert_eq!(s.skip_acked_gap(&mut c), 8);
        assert_eq!(s.next(), 12);
        assert_eq!(c.gaps, 1);
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut b = LocalBudget::new(MemoryBudget::new(1 << 20));
        let l = StreamLimits::default();
        let mut c = StreamCounters::default();
        let mut s = Stream::new(u32::MAX - 1);
        assert_eq!(
            s.insert(u32::MAX - 1, b"ab", &l, &mut b, &mut c),
            Insert::Advanced { from: 0, to: 2 }
        );
        assert_eq!(
            s.insert(0, b"cd", &l, &mut b, &mut c),
            Insert::Advanced { from: 2, to: 4 }
        );
        assert_eq!(contiguous(&s), b"abcd");
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn local_budgets_take_chunks_and_give_back_surplus() {
        let shared = MemoryBudget::new(1 << 20);
        let mut a = LocalBudget::new(shared.clone());
        assert!(a.charge(100));
        assert_eq!(shared.used(), LocalBudget::CHUNK, "one chunk taken");
        for _ in 0..100 {
            assert!(a.charge(100));
        }
        assert_eq!(shared.used(), LocalBudget::CHUNK, "no atomic operation per charge");
        a.release(10_100);
        assert_eq!(a.in_use(), 0);
        // A second worker cannot take more than what is left.
        let mut b = LocalBudget::new(shared.clone());
        assert!(!b.charge((1 << 20) - LocalBudget::CHUNK + 1));
        assert!(b.charge((1 << 20) - LocalBudget::CHUNK));
        drop(a);
        drop(b);
        assert_eq!(shared.used(), 0);
    }
}

//! The properties the `virtqueue` fuzz target checks (also replayed by
//! `tests/vhost_user_fuzz_regressions.rs`).
//!
//! The input is a program run against one queue pair's data path
//! (`NetRings`) over a guest memory of two regions with a hole between
//! them: the guest's side writes descriptors (any address, length, flags,
//! `next`), indirect tables, raw bytes, well-formed frames, available-ring
//! entries and indices (including ones that run ahead), notification
//! marks; the device's side receives batches, sends frames of any header
//! and length, flushes, and stops and restarts rings. Features, limits,
//! ring sizes and ring placement come from the input too. After every step:
//!
//! - the device wrote guest memory only in the two used rings and in
//!   buffers a receive descriptor marks device-writable;
//! - every transmit chain the device consumed is in the used ring once, and
//!   the chains it consumed in a call are at most its chain budget; each was
//!   delivered, refused (counted by reason) or held back as a super-frame
//!   for a plain caller (counted): the counts add up;
//! - each delivered frame and header equal what an independent walk of its
//!   chain finds in guest memory (the checksum completed for a plain caller);
//!   a chain the walk finds valid is delivered, one it finds invalid refused;
//! - each frame published into the receive queue is the next frame sent,
//!   byte for byte, spread over as many buffers as its header says;
//! - no panic, and every call returns.
#![allow(dead_code)]

use std::collections::VecDeque;

use palisade_io::vhost_user::features::{mask, offered};
use palisade_io::vhost_user::{Delivery, GuestFeatures, Limits, NetRings, Offloads, RingLayout, SendError};
use palisade_wire::virtio_net::{Gso, GsoKind, Header, PartialChecksum, VirtioNetRepr};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The guest's memory: two regions and a hole.
const REGIONS: [(u64, u64); 2] = [(0x1000, 0x1_0000), (0x2_0000, 0x4000)];
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const MAX_STEPS: usize = 96;

/// Reads the program; past its end everything is zero.
struct Input<'a> {
    data: &'a [u8],
}

impl Input<'_> {
    fn done(&self) -> bool {
        self.data.is_empty()
    }

    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a.to_vec()
    }
}

/// A guest address from 16 input bits: mostly inside a region, sometimes
/// just past it, in the hole, or at the ends of the address space.
fn addr(v: u16) -> u64 {
    match v >> 14 {
        0 | 1 => REGIONS[0].0 + u64::from(v & 0x7fff) * 2,
        2 => REGIONS[1].0 + u64::from(v & 0x3fff),
        _ => match v & 3 {
            0 => 0,
            1 => REGIONS[0].0 + REGIONS[0].1 - u64::from(v >> 2 & 0xff),
            2 => REGIONS[1].0 - 8,
            _ => u64::MAX - u64::from(v >> 2 & 0xff),
        },
    }
}

/// A copy of guest memory, by region.
#[derive(Clone, PartialEq, Eq)]
struct Snapshot(Vec<Vec<u8>>);

impl Snapshot {
    fn of(mem: &GuestMemoryMmap) -> Snapshot {
        Snapshot(
            REGIONS
                .iter()
                .map(|&(base, len)| {
                    let mut v = vec![0u8; len as usize];
                    mem.read_slice(&mut v, GuestAddress(base)).expect("region");
                    v
                })
                .collect(),
        )
    }

    /// `len` bytes at `at`, if they lie within one region.
    fn read(&self, at: u64, len: u64) -> Option<&[u8]> {
        REGIONS.iter().zip(&self.0).find_map(|(&(base, size), bytes)| {
            let off = at.checked_sub(base)?;
            let end = off.checked_add(len)?;
            (end <= size).then(|| &bytes[off as usize..end as usize])
        })
    }

    fn u16(&self, at: u64) -> Option<u16> {
        self.read(at, 2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&self, at: u64) -> Option<u32> {
        self.read(at, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Every guest address whose byte differs from `other`'s.
    fn changed(&self, other: &Snapshot) -> Vec<u64> {
        let mut out = Vec::new();
        for ((&(base, _), a), b) in REGIONS.iter().zip(&self.0).zip(&other.0) {
            // Compare 64 bytes at a time; look at single bytes only where a block differs.
            for (k, (x, y)) in a.chunks(64).zip(b.chunks(64)).enumerate() {
                if x != y {
                    for (i, (p, q)) in x.iter().zip(y).enumerate() {
                        if p != q {
                            out.push(base + (k * 64 + i) as u64);
                        }
                    }
                }
            }
        }
        out
    }
}

/// A descriptor as the guest wrote it.
#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn desc_at(s: &Snapshot, at: u64) -> Option<Desc> {
    let b = s.read(at, 16)?;
    Some(Desc {
        addr: u64::from_le_bytes(b[0..8].try_into().ok()?),
        len: u32::from_le_bytes(b[8..12].try_into().ok()?),
        flags: u16::from_le_bytes([b[12], b[13]]),
        next: u16::from_le_bytes([b[14], b[15]]),
    })
}

/// What a chain is, walked independently of the device's walker (virtio 1.x §2.7.5, §2.7.5.3).
struct Walk {
    /// Buffers (address, length), empty ones left out.
    segs: Vec<(u64, u32)>,
    /// Every guest range the walk read: descriptors and buffers.
    touched: Vec<(u64, u64)>,
}

/// What a chain may be: device-writable or readable buffers, indirect
/// tables allowed, at most this many descriptors and (if capped) bytes.
#[derive(Clone, Copy)]
struct Rules {
    write: bool,
    indirect: bool,
    max_descs: usize,
    cap: Option<u64>,
}

/// The chain whose head is entry `head` of the `size`-entry table at `table`, if `rules` allow it.
fn walk(s: &Snapshot, table: u64, size: u16, head: u16, rules: Rules) -> Option<Walk> {
    let Rules {
        write,
        indirect,
        max_descs,
        cap,
    } = rules;
    let mut w = Walk {
        segs: Vec::new(),
        touched: Vec::new(),
    };
    if head >= size {
        return None;
    }
    let (mut table, mut entries, mut i) = (table, u64::from(size), u64::from(head));
    let (mut in_indirect, mut count, mut here, mut total) = (false, 0usize, 0u64, 0u64);
    loop {
        count += 1;
        here += 1;
        if count > max_descs || here > entries {
            return None;
        }
        let at = table.checked_add(i * 16)?;
        let d = desc_at(s, at)?;
        w.touched.push((at, 16));
        if d.flags & F_INDIRECT != 0 {
            if !indirect || in_indirect || d.flags & F_NEXT != 0 || d.len == 0 || d.len % 16 != 0 {
                return None;
            }
            s.read(d.addr, u64::from(d.len))?;
            (table, entries, i, in_indirect, here) = (d.addr, u64::from(d.len) / 16, 0, true, 0);
            continue;
        }
        if (d.flags & F_WRITE != 0) != write {
            return None;
        }
        if d.len > 0 {
            s.read(d.addr, u64::from(d.len))?;
            total += u64::from(d.len);
            if cap.is_some_and(|c| total > c) {
                return None;
            }
            w.segs.push((d.addr, d.len));
            w.touched.push((d.addr, u64::from(d.len)));
        }
        if d.flags & F_NEXT == 0 {
            return Some(w);
        }
        i = u64::from(d.next);
        if i >= entries {
            return None;
        }
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}

/// The driver's side of one ring.
struct Ring {
    layout: RingLayout,
    avail_idx: u16,
    used_seen: u16,
    next_desc: u16,
}

impl Ring {
    fn used_area(&self) -> (u64, u64) {
        (self.layout.used_ring, 6 + 8 * u64::from(self.layout.size))
    }

    fn push(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.layout.size);
        if let Some(at) = self.layout.avail_ring.checked_add(4 + 2 * slot) {
            let _ = mem.write_obj(head.to_le(), GuestAddress(at));
        }
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.publish(mem);
    }

    fn publish(&self, mem: &GuestMemoryMmap) {
        if let Some(at) = self.layout.avail_ring.checked_add(2) {
            let _ = mem.write_obj(self.avail_idx.to_le(), GuestAddress(at));
        }
    }

    fn write_desc(&self, mem: &GuestMemoryMmap, i: u16, d: Desc) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&d.next.to_le_bytes());
        if let Some(at) = self.layout.desc_table.checked_add(16 * u64::from(i % self.layout.size)) {
            let _ = mem.write_slice(&b, GuestAddress(at));
        }
    }

    /// Used elements published since the last call, as (head, length).
    fn new_used(&mut self, s: &Snapshot) -> Vec<(u32, u32)> {
        let Some(idx) = self.layout.used_ring.checked_add(2).and_then(|a| s.u16(a)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while self.used_seen != idx && out.len() <= usize::from(self.layout.size) {
            let at = self
                .layout
                .used_ring
                .saturating_add(4 + 8 * u64::from(self.used_seen % self.layout.size));
            out.push((
                s.u32(at).unwrap_or(u32::MAX),
                s.u32(at.saturating_add(4)).unwrap_or(u32::MAX),
            ));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// A frame the device accepted for the guest, as the guest must see it.
struct Expected {
    header: VirtioNetRepr,
    frame: Vec<u8>,
}

struct World {
    mem: GuestMemoryMmap,
    rings: NetRings,
    features: GuestFeatures,
    limits: Limits,
    rx: Ring,
    tx: Ring,
    expected: VecDeque<Expected>,
    /// The guest wrote memory while frames sent were not published yet: what
    /// the device wrote may have been overwritten, and the chains it used
    /// can no longer be walked as they were.
    dirty: bool,
    /// The used rings can be read back: they overlap no other ring area, and
    /// the guest has not written over them. (A guest may do both to itself;
    /// then only what does not depend on reading them back is checked.)
    used_readable: bool,
    /// Receive buffers that were valid at some device step since the receive
    /// queue started: the device keeps chains it popped for a frame in progress
    /// and writes them later, even if the guest has rewritten their
    /// descriptors since (the guest may not, but a hostile one does).
    rx_history: std::collections::HashSet<(u64, u64)>,
    /// Receive heads made available and not yet seen used (a head may be there twice).
    rx_inflight: Vec<u16>,
    /// The guest rewrote a chain that was in flight: what the device wrote
    /// for it can no longer be found by walking it.
    rx_rewritten: bool,
    /// Frames the device published for the guest that matched.
    matched: usize,
}

fn fail<T>(msg: String) -> Result<T, String> {
    Err(msg)
}

/// A TCP/IPv4 frame of `len` bytes (at least 54), its checksum partial.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let len = len.max(54);
    let mut f = vec![0u8; len];
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[16..18].copy_from_slice(&((len - 14).min(0xffff) as u16).to_be_bytes());
    f[23] = 6;
    f[46] = 0x50;
    for (i, b) in f[54..].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7).wrapping_add(seed);
    }
    f
}

fn header(choice: u8, frame_len: usize) -> VirtioNetRepr {
    let csum = Some(PartialChecksum { start: 34, offset: 16 });
    let gso = |kind, ecn| {
        Some(Gso {
            kind,
            ecn,
            size: 1448,
            header_len: 54,
        })
    };
    match choice % 8 {
        0 => VirtioNetRepr::PLAIN,
        1 => VirtioNetRepr {
            csum,
            ..VirtioNetRepr::PLAIN
        },
        2 => VirtioNetRepr {
            csum,
            gso: gso(GsoKind::TcpV4, false),
            ..VirtioNetRepr::PLAIN
        },
        3 => VirtioNetRepr {
            csum,
            gso: gso(GsoKind::TcpV6, choice & 0x80 != 0),
            ..VirtioNetRepr::PLAIN
        },
        4 => VirtioNetRepr {
            csum,
            gso: gso(GsoKind::UdpL4, false),
            ..VirtioNetRepr::PLAIN
        },
        5 => VirtioNetRepr {
            data_valid: true,
            ..VirtioNetRepr::PLAIN
        },
        // A checksum position past a short frame: BadHeader.
        6 => VirtioNetRepr {
            csum: Some(PartialChecksum {
                start: frame_len as u16,
                offset: 0,
            }),
            ..VirtioNetRepr::PLAIN
        },
        _ => VirtioNetRepr {
            csum: Some(PartialChecksum { start: 14, offset: 10 }),
            ..VirtioNetRepr::PLAIN
        },
    }
}

impl World {
    /// The device's rules for a chain of this guest: `write` for receive chains.
    fn rules(&self, write: bool, cap: Option<u64>) -> Rules {
        Rules {
            write,
            indirect: self.features.indirect_descriptors(),
            max_descs: self.limits.max_descriptors,
            cap,
        }
    }

    fn hdr_len(&self) -> usize {
        self.features.header_len()
    }

    /// The buffers of every receive chain in flight, as a walk finds them now.
    fn inflight_walks(&self) -> Vec<Option<Vec<(u64, u32)>>> {
        let l = self.rx.layout;
        let s = Snapshot::of(&self.mem);
        self.rx_inflight
            .iter()
            .map(|&h| walk(&s, l.desc_table, l.size, h, self.rules(true, None)).map(|w| w.segs))
            .collect()
    }

    /// The bytes of both used rings.
    fn used_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (at, len) in [self.rx.used_area(), self.tx.used_area()] {
            let mut b = vec![0u8; len as usize];
            let _ = self.mem.read_slice(&mut b, GuestAddress(at));
            out.extend_from_slice(&b);
        }
        out
    }

    /// Guest ranges the device may write: both used rings, and the buffers of
    /// every receive chain a valid walk finds from any head (the device
    /// writes only into chains it has validated whole).
    fn writable(&self, s: &Snapshot) -> Vec<(u64, u64)> {
        let mut out = vec![self.rx.used_area(), self.tx.used_area()];
        let l = self.rx.layout;
        for head in 0..l.size {
            if let Some(w) = walk(s, l.desc_table, l.size, head, self.rules(true, None)) {
                out.extend(w.segs.iter().map(|&(a, n)| (a, u64::from(n))));
            }
        }
        out
    }

    /// Check that every byte that changed between `before` and `after` was one the device may write.
    fn check_writes(&mut self, before: &Snapshot, after: &Snapshot, what: &str) -> Result<(), String> {
        // The device may rewrite descriptors it walks later in the same call (a
        // buffer over the table): chains valid before or after count.
        self.rx_history.extend(self.writable(before));
        self.rx_history.extend(self.writable(after));
        // A receive buffer over a used ring: the device's frame writes move the
        // used indices, which can then no longer be read back.
        let used = [self.rx.used_area(), self.tx.used_area()];
        if self
            .rx_history
            .iter()
            .filter(|a| !used.contains(a))
            .any(|&a| used.iter().any(|&u| overlaps(a, u)))
        {
            self.used_readable = false;
        }
        // The allowed ranges as sorted disjoint intervals [start, end).
        let mut ranges: Vec<(u64, u64)> = self
            .rx_history
            .iter()
            .filter(|r| r.1 > 0)
            .map(|&(a, n)| (a, a.saturating_add(n)))
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (a, b) in ranges {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        for a in before.changed(after) {
            let i = merged.partition_point(|r| r.1 <= a);
            if merged.get(i).is_none_or(|r| a < r.0) {
                return fail(format!(
                    "{what} wrote guest address {a:#x}, outside the used rings and the receive buffers"
                ));
            }
        }
        Ok(())
    }

    /// Check newly published receive elements against the frames sent, in order.
    fn check_rx_published(&mut self, after: &Snapshot) -> Result<(), String> {
        let used = self.rx.new_used(after);
        if self.used_readable && used.len() > usize::from(self.rx.layout.size) {
            return fail(format!(
                "{} used elements published at once in a ring of {}",
                used.len(),
                self.rx.layout.size
            ));
        }
        for &(head, _) in &used {
            if let Some(k) = self.rx_inflight.iter().position(|&h| u32::from(h) == head) {
                self.rx_inflight.swap_remove(k);
            }
        }
        let rewritten = self.rx_rewritten;
        if self.rx_inflight.is_empty() {
            self.rx_rewritten = false;
        }
        // Chains handed back empty (refused, or held and returned at a stop) carry no frame.
        // Frames are published all at once (flush, stop): until then, nothing to compare.
        if used.iter().all(|&(_, l)| l == 0) {
            return Ok(());
        }
        if !self.used_readable {
            self.expected.clear();
            return Ok(());
        }
        if rewritten || self.dirty || !self.clean_rx_layout(after) || self.aliased(after, &used) {
            // Not verifiable: buffers shared with other buffers or rings (a
            // guest may post one chain many times), or rewritten since.
            if self.expected.is_empty() && used.iter().any(|&(_, l)| l != 0) {
                return fail("a frame published into the receive queue that nobody sent".into());
            }
            self.expected.clear();
            self.dirty = false;
            return Ok(());
        }
        let hl = self.hdr_len();
        let mergeable = self.features.mergeable_rx_buffers();
        let mut i = 0;
        while i < used.len() {
            let (head, len) = used[i];
            if len == 0 {
                i += 1;
                continue;
            }
            let Some(exp) = self.expected.pop_front() else {
                return fail(format!(
                    "a frame published into the receive queue (head {head}, {len} bytes) that nobody sent"
                ));
            };
            let want_len = hl + exp.frame.len();
            // The frame spans `n` elements: one without mergeable buffers.
            let layout = self.rx.layout;
            let chain_bytes = |head: u32, len: u32| -> Option<Vec<u8>> {
                let w = walk(
                    after,
                    layout.desc_table,
                    layout.size,
                    head as u16,
                    self.rules(true, None),
                )?;
                let mut out = Vec::new();
                let mut left = len as usize;
                for (a, l) in w.segs {
                    let take = left.min(l as usize);
                    out.extend_from_slice(after.read(a, take as u64)?);
                    left -= take;
                }
                (left == 0).then_some(out)
            };
            let first = chain_bytes(head, len);
            let n = match &first {
                Some(b) if b.len() >= hl => Header::new_checked(&b[..hl])
                    .ok()
                    .and_then(|h| h.num_buffers())
                    .unwrap_or(1)
                    .max(1) as usize,
                _ => 1,
            };
            if !mergeable && n != 1 && hl == 12 {
                return fail(format!("num_buffers {n} without mergeable buffers"));
            }
            if i + n > used.len() {
                return fail(format!(
                    "a frame of {n} buffers published with only {} elements",
                    used.len() - i
                ));
            }
            let total: u64 = used[i..i + n].iter().map(|&(_, l)| u64::from(l)).sum();
            if total != want_len as u64 {
                return fail(format!(
                    "{total} bytes published for a {want_len}-byte frame and header"
                ));
            }
            // Content, when the buffers were not overwritten by something else since (the device
            // writes only these buffers and the used ring; the guest's steps do not run in between).
            let mut bytes = Vec::new();
            let mut readable = true;
            for &(h, l) in &used[i..i + n] {
                match chain_bytes(h, l) {
                    Some(b) => bytes.extend_from_slice(&b),
                    None => readable = false,
                }
            }
            if readable && self.clean_rx_layout(after) {
                let mut want = exp.header;
                want.num_buffers = n as u16;
                let mut hdr = want.to_bytes().to_vec();
                hdr.truncate(hl);
                if bytes[..hl] != hdr[..] || bytes[hl..] != exp.frame[..] {
                    return fail(format!(
                        "frame {} published into the receive queue differs from the one sent",
                        self.matched
                    ));
                }
            }
            self.matched += 1;
            i += n;
        }
        if self.expected.is_empty() {
            self.dirty = false;
        }
        Ok(())
    }

    /// Whether two published elements' chains share memory (the same chain
    /// posted twice, chains sharing descriptors or an indirect table): then
    /// a later frame may have overwritten an earlier one.
    fn aliased(&self, s: &Snapshot, used: &[(u32, u32)]) -> bool {
        let l = self.rx.layout;
        let mut seen: Vec<(u64, u64)> = Vec::new();
        for &(head, len) in used {
            if len == 0 {
                continue;
            }
            let Some(w) = walk(s, l.desc_table, l.size, head as u16, self.rules(true, None)) else {
                return true;
            };
            if w.touched.iter().any(|&t| seen.iter().any(|&u| overlaps(t, u))) {
                return true;
            }
            seen.extend(w.touched);
        }
        false
    }

    /// Whether no receive buffer overlaps another, a descriptor table, or a used ring (then the
    /// content of what the device wrote can be compared exactly).
    fn clean_rx_layout(&self, s: &Snapshot) -> bool {
        let writable = self.writable(s);
        let rings = [
            (self.rx.layout.desc_table, 16 * u64::from(self.rx.layout.size)),
            (self.tx.layout.desc_table, 16 * u64::from(self.tx.layout.size)),
            (self.rx.layout.avail_ring, 6 + 2 * u64::from(self.rx.layout.size)),
            self.rx.used_area(),
            self.tx.used_area(),
        ];
        let bufs = &writable[2..];
        for (k, a) in bufs.iter().enumerate() {
            if rings.iter().any(|&r| overlaps(*a, r)) || bufs[k + 1..].iter().any(|&b| overlaps(*a, b)) {
                return false;
            }
        }
        true
    }

    fn recv(&mut self, max: usize, delivery: Delivery) -> Result<(), String> {
        let before = Snapshot::of(&self.mem);
        let stats0 = *self.rings.stats();
        let mut got: Vec<(VirtioNetRepr, Vec<u8>)> = Vec::new();
        let mut calls = 0;
        let outcome = self.rings.recv_batch(&self.mem, max, delivery, &mut |b| {
            calls += 1;
            got.extend(b.iter().map(|(h, f)| (*h, f.to_vec())));
        });
        let after = Snapshot::of(&self.mem);
        self.check_writes(&before, &after, "recv_batch")?;
        let stats = *self.rings.stats();
        if calls > 1 || (calls == 1 && got.is_empty()) || outcome.frames != got.len() {
            return fail(format!("{calls} callbacks for {} frames", got.len()));
        }
        if got.len() > max.min(self.limits.frames_per_call) {
            return fail(format!("{} frames delivered, at most {max} asked", got.len()));
        }
        self.check_rx_published(&after)?;
        let used = self.tx.new_used(&after);
        if !self.used_readable {
            return Ok(());
        }
        if used.len() > self.limits.chains_per_call {
            return fail(format!(
                "{} chains consumed in one call, budget {}",
                used.len(),
                self.limits.chains_per_call
            ));
        }
        if stats.ring_faults != stats0.ring_faults {
            return Ok(());
        }
        let refused = stats.refused.total() - stats0.refused.total();
        let held = stats.gso_undeliverable - stats0.gso_undeliverable;
        if refused + held + got.len() as u64 != used.len() as u64 {
            return fail(format!(
                "{} chains consumed but {} delivered + {refused} refused + {held} held back",
                used.len(),
                got.len()
            ));
        }
        // Every chain again, walked in the memory as it was: a valid one is the next frame delivered.
        let hl = self.hdr_len();
        let cap = (hl + self.limits.max_frame_len) as u64;
        let areas = [self.rx.used_area(), self.tx.used_area()];
        let mut delivered = got.iter();
        for &(head, len) in &used {
            if len != 0 {
                return fail(format!("transmit chain {head} returned with length {len}"));
            }
            let layout = self.tx.layout;
            let w = walk(
                &before,
                layout.desc_table,
                layout.size,
                head as u16,
                self.rules(false, Some(cap)),
            );
            if w.as_ref()
                .is_some_and(|w| w.touched.iter().any(|&t| areas.iter().any(|&a| overlaps(t, a))))
            {
                // The chain shares memory with a used ring the device wrote during the call: its
                // content at the time it was read is not known here.
                return Ok(());
            }
            let expected = w.and_then(|w| {
                let mut bytes = Vec::new();
                for (a, l) in &w.segs {
                    bytes.extend_from_slice(before.read(*a, u64::from(*l))?);
                }
                if bytes.len() < hl + 14 {
                    return None;
                }
                let mut h = VirtioNetRepr::parse(&Header::new_checked(&bytes[..hl]).ok()?, bytes.len() - hl).ok()?;
                if !guest_may_send(self.features, &h) {
                    return None;
                }
                h.data_valid = false;
                h.num_buffers = 0;
                let mut f = bytes[hl..].to_vec();
                if delivery == Delivery::Plain {
                    if h.gso.is_some() {
                        return Some(None);
                    }
                    if let Some(c) = h.csum.take() {
                        c.complete(&mut f).ok()?;
                    }
                }
                Some(Some((h, f)))
            });
            match expected {
                None | Some(None) => {}
                Some(Some(want)) => match delivered.next() {
                    Some(g) if *g == want => {}
                    Some(g) => {
                        return fail(format!(
                            "chain {head} delivered as {:?} ({} bytes), its bytes say {:?} ({} bytes)",
                            g.0,
                            g.1.len(),
                            want.0,
                            want.1.len()
                        ));
                    }
                    None => return fail(format!("valid chain {head} was not delivered")),
                },
            }
        }
        if delivered.next().is_some() {
            return fail("a frame was delivered that no valid chain holds".into());
        }
        Ok(())
    }

    fn send(&mut self, choice: u8, len: usize, seed: u8) -> Result<(), String> {
        let f = frame(len, seed);
        let h = header(choice, f.len());
        let before = Snapshot::of(&self.mem);
        let stats0 = *self.rings.stats();
        let r = self.rings.send(&self.mem, &h, &f);
        let after = Snapshot::of(&self.mem);
        self.check_writes(&before, &after, "send")?;
        let stats = *self.rings.stats();
        let refused = stats.refused.total() - stats0.refused.total();
        if refused > self.limits.refusals_per_send as u64 {
            return fail(format!(
                "{refused} receive chains refused in one send, limit {}",
                self.limits.refusals_per_send
            ));
        }
        if stats.ring_faults != stats0.ring_faults {
            self.expected.clear();
        }
        match r {
            Ok(()) => {
                let mut header = h;
                let mut frame = f;
                if !self.features.checksum_to_guest() {
                    if let Some(c) = header.csum.take() {
                        c.complete(&mut frame)
                            .map_err(|e| format!("sent a frame whose checksum cannot complete: {e}"))?;
                    }
                    header.data_valid = false;
                }
                if header.gso.is_some() && !guest_takes(self.features, &header) {
                    return fail("a super-frame the guest did not negotiate was sent".into());
                }
                self.expected.push_back(Expected { header, frame });
            }
            Err(SendError::NeedsSegmentation) => {
                if guest_takes(self.features, &h) {
                    return fail("NeedsSegmentation for a frame the guest takes".into());
                }
            }
            Err(_) => {}
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        let before = Snapshot::of(&self.mem);
        self.rings.flush(&self.mem);
        let after = Snapshot::of(&self.mem);
        self.check_writes(&before, &after, "flush")?;
        self.check_rx_published(&after)
    }

    fn restart(&mut self, rx: bool, raw_base: Option<u16>) -> Result<(), String> {
        let before = Snapshot::of(&self.mem);
        let base = if rx {
            self.rings.stop_rx(&self.mem).0
        } else {
            self.rings.stop_tx()
        };
        let after = Snapshot::of(&self.mem);
        self.check_writes(&before, &after, "stop")?;
        if rx {
            self.check_rx_published(&after)?;
            // Anything sent and not yet published is gone with the stop, and so
            // are the chains the device held.
            self.expected.clear();
            self.rx_history.clear();
            self.rx_history.insert(self.rx.used_area());
            self.rx_history.insert(self.tx.used_area());
        }
        let base = raw_base.unwrap_or(base);
        let ring = if rx { &mut self.rx } else { &mut self.tx };
        ring.used_seen = ring
            .layout
            .used_ring
            .checked_add(2)
            .and_then(|a| after.u16(a))
            .unwrap_or(0);
        let layout = ring.layout;
        let _ = if rx {
            self.rings.start_rx(&self.mem, layout, base)
        } else {
            self.rings.start_tx(&self.mem, layout, base)
        };
        Ok(())
    }
}

/// Whether a guest with `f` may transmit a frame with `h` (the device's rule, restated).
fn guest_may_send(f: GuestFeatures, h: &VirtioNetRepr) -> bool {
    if h.csum.is_some() && f.bits() & mask::CSUM == 0 {
        return false;
    }
    match h.gso {
        None => true,
        Some(g) => {
            let kind = match g.kind {
                GsoKind::TcpV4 => f.bits() & mask::HOST_TSO4 != 0,
                GsoKind::TcpV6 => f.bits() & mask::HOST_TSO6 != 0,
                _ => false,
            };
            kind && (!g.ecn || f.bits() & mask::HOST_ECN != 0)
        }
    }
}

/// Whether a guest with `f` takes a super-frame with `h` as it is.
fn guest_takes(f: GuestFeatures, h: &VirtioNetRepr) -> bool {
    match h.gso {
        None => true,
        Some(g) => {
            let kind = match g.kind {
                GsoKind::TcpV4 => f.bits() & mask::GUEST_TSO4 != 0,
                GsoKind::TcpV6 => f.bits() & mask::GUEST_TSO6 != 0,
                _ => false,
            };
            kind && (!g.ecn || f.bits() & mask::GUEST_ECN != 0)
        }
    }
}

/// Run the program in `data`; `Err` names the first property that failed.
pub fn check(data: &[u8]) -> Result<(), String> {
    let mut input = Input { data };
    let fb = input.u8();
    let all = offered(Offloads::ALL, 1) & !mask::PROTOCOL_FEATURES;
    let drop = [
        mask::MRG_RXBUF,
        mask::EVENT_IDX,
        mask::INDIRECT_DESC,
        mask::VERSION_1,
        mask::CSUM | mask::HOST_TSO4 | mask::HOST_TSO6 | mask::HOST_ECN,
        mask::GUEST_CSUM | mask::GUEST_TSO4 | mask::GUEST_TSO6 | mask::GUEST_ECN,
        mask::HOST_TSO6 | mask::HOST_ECN,
        mask::GUEST_TSO4 | mask::GUEST_ECN,
    ];
    let bits = drop
        .iter()
        .enumerate()
        .filter(|(i, _)| fb >> i & 1 != 0)
        .fold(all, |b, (_, m)| b & !m);
    let features = GuestFeatures::from_bits(bits);
    let lb = input.u8();
    let limits = Limits {
        frames_per_call: 1 + usize::from(lb & 7) * 5,
        bytes_per_call: 1024 << (lb >> 3 & 7),
        chains_per_call: 1 + usize::from(lb >> 6) * 7,
        refusals_per_send: 1 + usize::from(input.u8() & 7),
        max_descriptors: 1 + usize::from(input.u8() & 31),
        max_frame_len: 65_600,
        max_buffers_per_frame: 1 + usize::from(input.u8() & 63),
    };
    let sizes = input.u8();
    let rx_size = 1u16 << (sizes & 7).min(6);
    let tx_size = 1u16 << (sizes >> 4 & 7).min(6);
    // The rings: laid out after one another from the start of the first
    // region, or (rarely) anywhere the input says, aligned or not.
    let placement = input.u8();
    let layout = |input: &mut Input, size: u16, at: &mut u64| -> RingLayout {
        if placement & 0x80 != 0 {
            let (d, a, u) = (addr(input.u16()), addr(input.u16()), addr(input.u16()));
            if placement & 0x40 != 0 {
                return RingLayout {
                    size,
                    desc_table: d,
                    avail_ring: a,
                    used_ring: u,
                };
            }
            return RingLayout {
                size,
                desc_table: d & !15,
                avail_ring: a & !1,
                used_ring: u & !3,
            };
        }
        let desc_table = *at;
        let avail_ring = desc_table + 16 * u64::from(size);
        let used_ring = (avail_ring + 6 + 2 * u64::from(size) + 3) & !3;
        *at = (used_ring + 6 + 8 * u64::from(size) + 4095) & !4095;
        RingLayout {
            size,
            desc_table,
            avail_ring,
            used_ring,
        }
    };
    let mut at = REGIONS[0].0;
    let rx_layout = layout(&mut input, rx_size, &mut at);
    let tx_layout = layout(&mut input, tx_size, &mut at);
    let mem = GuestMemoryMmap::from_ranges(&REGIONS.map(|(b, l)| (GuestAddress(b), l as usize)))
        .map_err(|e| e.to_string())?;
    let mut rings = NetRings::new(features, limits);
    let limits = limits.sanitized();
    let _ = rings.start_rx(&mem, rx_layout, 0);
    let _ = rings.start_tx(&mem, tx_layout, 0);
    let mut w = World {
        mem,
        rings,
        features,
        limits,
        rx: Ring {
            layout: rx_layout,
            avail_idx: 0,
            used_seen: 0,
            next_desc: 0,
        },
        tx: Ring {
            layout: tx_layout,
            avail_idx: 0,
            used_seen: 0,
            next_desc: 0,
        },
        expected: VecDeque::new(),
        dirty: false,
        used_readable: true,
        rx_history: std::collections::HashSet::new(),
        rx_inflight: Vec::new(),
        rx_rewritten: false,
        matched: 0,
    };
    let areas = |l: &RingLayout| {
        let n = u64::from(l.size);
        [
            (l.desc_table, 16 * n),
            (l.avail_ring, 6 + 2 * n),
            (l.used_ring, 6 + 8 * n),
        ]
    };
    let all: Vec<(u64, u64)> = areas(&rx_layout).into_iter().chain(areas(&tx_layout)).collect();
    for used in [all[2], all[5]] {
        if all.iter().filter(|&&a| a != used).any(|&a| overlaps(a, used)) || all[2] == all[5] {
            w.used_readable = false;
        }
    }
    // Buffers for well-formed chains come from after the rings.
    let mut bump = at.max(REGIONS[0].0 + 0x4000);
    for _ in 0..MAX_STEPS {
        if input.done() {
            break;
        }
        let op = input.u8();
        let rx = op & 0x80 != 0;
        // Guest steps write memory: frames sent and not yet published are then unverifiable.
        let guest_step = matches!(op & 0x0f, 0..=4 | 8 | 10);
        if guest_step && !w.expected.is_empty() {
            w.dirty = true;
        }
        let used_before = guest_step.then(|| w.used_bytes());
        let inflight_before = (guest_step && !w.rx_inflight.is_empty()).then(|| w.inflight_walks());
        match op & 0x0f {
            0 => {
                let (i, a, l, fl, nx) = (input.u8(), input.u16(), input.u16(), input.u8(), input.u8());
                let len = if fl & 0x80 != 0 {
                    u32::from(l) << 4
                } else {
                    u32::from(l)
                };
                let ring = if rx { &w.rx } else { &w.tx };
                ring.write_desc(
                    &w.mem,
                    u16::from(i),
                    Desc {
                        addr: addr(a),
                        len,
                        flags: u16::from(fl & 7),
                        next: u16::from(nx),
                    },
                );
            }
            1 => {
                let a = addr(input.u16());
                let n = usize::from(input.u8());
                let bytes = input.bytes(n);
                let _ = w.mem.write_slice(&bytes, GuestAddress(a));
            }
            2 => {
                // A well-formed transmit chain: header + frame in up to three buffers, or an indirect table.
                let len = 54 + usize::from(input.u16()) % 3000;
                let choice = input.u8();
                let split = input.u8();
                let f = frame(len, split);
                let mut bytes = header(choice, f.len()).to_bytes()[..w.hdr_len()].to_vec();
                bytes.extend_from_slice(&f);
                let base = bump;
                if base + bytes.len() as u64 + 64 > REGIONS[0].0 + REGIONS[0].1 {
                    bump = at.max(REGIONS[0].0 + 0x4000);
                    continue;
                }
                let _ = w.mem.write_slice(&bytes, GuestAddress(base));
                bump = (base + bytes.len() as u64 + 15) & !15;
                let cut = (usize::from(split) % bytes.len()).max(1);
                let parts: Vec<(u64, u32)> = if split & 1 == 0 {
                    vec![(base, bytes.len() as u32)]
                } else {
                    vec![(base, cut as u32), (base + cut as u64, (bytes.len() - cut) as u32)]
                };
                let size = w.tx.layout.size;
                let head = w.tx.next_desc % size;
                if split & 2 != 0 && w.features.indirect_descriptors() {
                    let table = bump;
                    bump += 16 * parts.len() as u64;
                    for (k, &(a, l)) in parts.iter().enumerate() {
                        let flags = if k + 1 < parts.len() { F_NEXT } else { 0 };
                        let mut b = [0u8; 16];
                        b[0..8].copy_from_slice(&a.to_le_bytes());
                        b[8..12].copy_from_slice(&l.to_le_bytes());
                        b[12..14].copy_from_slice(&flags.to_le_bytes());
                        b[14..16].copy_from_slice(&(k as u16 + 1).to_le_bytes());
                        let _ = w.mem.write_slice(&b, GuestAddress(table + 16 * k as u64));
                    }
                    w.tx.write_desc(
                        &w.mem,
                        head,
                        Desc {
                            addr: table,
                            len: 16 * parts.len() as u32,
                            flags: F_INDIRECT,
                            next: 0,
                        },
                    );
                    w.tx.next_desc = w.tx.next_desc.wrapping_add(1);
                } else {
                    for (k, &(a, l)) in parts.iter().enumerate() {
                        let i = (head + k as u16) % size;
                        let last = k + 1 == parts.len();
                        w.tx.write_desc(
                            &w.mem,
                            i,
                            Desc {
                                addr: a,
                                len: l,
                                flags: if last { 0 } else { F_NEXT },
                                next: (i + 1) % size,
                            },
                        );
                    }
                    w.tx.next_desc = w.tx.next_desc.wrapping_add(parts.len() as u16);
                }
                w.tx.push(&w.mem, head);
            }
            3 => {
                let head = u16::from(input.u8());
                let ring = if rx { &mut w.rx } else { &mut w.tx };
                ring.push(&w.mem, head);
                if rx {
                    w.rx_inflight.push(head);
                }
            }
            4 => {
                let d = input.u8();
                let ring = if rx { &mut w.rx } else { &mut w.tx };
                ring.avail_idx = ring
                    .avail_idx
                    .wrapping_add(u16::from(d))
                    .wrapping_sub(if d & 0x80 != 0 { 256 } else { 0 });
                ring.publish(&w.mem);
            }
            5 => {
                let max = 1 + usize::from(input.u8() % 64);
                let delivery = if op & 0x40 != 0 {
                    Delivery::Plain
                } else {
                    Delivery::Offloaded
                };
                w.recv(max, delivery)?;
            }
            6 => {
                let choice = input.u8();
                let x = usize::from(input.u16());
                let len = 54
                    + match choice >> 5 & 3 {
                        0 => 0,
                        1 => x % 1500,
                        2 => x % 9000,
                        _ => x,
                    };
                let seed = input.u8();
                w.send(choice, len, seed)?;
            }
            7 => w.flush()?,
            8 => {
                // Receive buffers: n one-descriptor chains of `len` bytes each.
                let n = 1 + usize::from(input.u8() % 8);
                let len = u32::from(input.u16() % 4096).max(1);
                for _ in 0..n {
                    let base = bump;
                    if base + u64::from(len) > REGIONS[0].0 + REGIONS[0].1 {
                        bump = at.max(REGIONS[0].0 + 0x4000);
                        break;
                    }
                    bump = (base + u64::from(len) + 15) & !15;
                    // A well-behaved driver reuses only descriptors the device has returned.
                    let size = w.rx.layout.size;
                    let Some(i) = (0..size)
                        .map(|k| w.rx.next_desc.wrapping_add(k) % size)
                        .find(|i| !w.rx_inflight.contains(i))
                    else {
                        break;
                    };
                    w.rx.write_desc(
                        &w.mem,
                        i,
                        Desc {
                            addr: base,
                            len,
                            flags: F_WRITE,
                            next: 0,
                        },
                    );
                    w.rx.next_desc = i.wrapping_add(1);
                    w.rx.push(&w.mem, i);
                    w.rx_inflight.push(i);
                }
            }
            9 => {
                let b = input.u8();
                let raw = (b & 1 != 0).then(|| u16::from(input.u8()));
                w.restart(rx, raw)?;
            }
            10 => {
                let v = input.u16();
                let ring = if rx { &w.rx } else { &w.tx };
                let l = ring.layout;
                if op & 0x40 != 0 {
                    if let Some(at) = l.avail_ring.checked_add(4 + 2 * u64::from(l.size)) {
                        let _ = w.mem.write_obj(v.to_le(), GuestAddress(at));
                    }
                } else {
                    let _ = w.mem.write_obj((v & 1).to_le(), GuestAddress(l.avail_ring));
                }
            }
            _ => {}
        }
        if used_before.is_some_and(|b| b != w.used_bytes()) {
            w.used_readable = false;
        }
        if let Some(b) = inflight_before
            && b != w.inflight_walks()
        {
            w.rx_rewritten = true;
        }
    }
    // Whatever is left goes out: every frame sent must come out right.
    w.flush()
}

//! Connection tracking.
//!
//! A connection is keyed by the direction-independent form of its flow key
//! ([`FlowKey::canonical`]) and remembers its initiator's direction. TCP
//! follows Linux netfilter's state machine and sequence-window tracking
//! ([`crate::tcptrack`]): zones are *liberal* by default (as Linux with
//! `nf_conntrack_tcp_loose=1` and `be_liberal=1`: out-of-window segments
//! pass and are counted, a plain ACK picks up a connection mid-stream after a
//! restart) or *strict* (as Linux with both 0: they are dropped, and a
//! connection must start with a SYN). UDP, SCTP, ICMP echo and other
//! protocols are pseudo-connections (new → replied). Every state has a
//! timeout; entries expire lazily on lookup and in [`Conntrack::expire`] sweeps.
//!
//! The table is bounded ([`crate::table::BoundedMap`]); when it is full a new
//! connection either evicts one (preferring closing or idle ones) or is refused,
//! per [`FullPolicy`]. Each vNIC may hold at most its port's `max_conns`.

use palisade_wire::flow::FlowKey;

pub use crate::conn_state::ConnState;
use crate::events::{EndReason, EventKind, EventSink, FlowEvent};
use crate::port::PortId;
use crate::service::Steer;
use crate::table::{BoundedMap, Slot};
use crate::tcptrack;
pub(crate) use crate::tcptrack::{TcpSeg, TcpTrack, Tracked, bad_tcp_flags};
use crate::verdict::{Counters, DropReason};

/// Timeouts per state, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP handshake in progress.
    pub tcp_handshake: u64,
    /// TCP established.
    pub tcp_established: u64,
    /// TCP closing (FIN seen) and time-wait.
    pub tcp_closing: u64,
    /// TCP after a reset.
    pub tcp_close: u64,
    /// UDP/other before a reply.
    pub unreplied: u64,
    /// UDP/other after a reply.
    pub replied: u64,
    /// ICMP echo.
    pub icmp: u64,
}

const SEC: u64 = 1_000_000_000;

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_handshake: 30 * SEC,
            tcp_established: 24 * 3600 * SEC,
            tcp_closing: 120 * SEC,
            tcp_close: 10 * SEC,
            unreplied: 30 * SEC,
            replied: 180 * SEC,
            icmp: 30 * SEC,
        }
    }
}

/// What a full table does with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FullPolicy {
    /// Evict a closing, idle or (failing those) the oldest scanned connection.
    #[default]
    EvictIdle,
    /// Refuse the new connection ([`DropReason::ConntrackFull`]).
    Refuse,
}

/// The ports a connection with these ends is charged to: each end's, once
/// (a connection from a vNIC to itself is one of its connections, not two).
fn charged(owners: [Option<PortId>; 2]) -> impl Iterator<Item = Option<PortId>> {
    let [initiator, responder] = owners;
    [initiator, responder.filter(|_| responder != initiator)].into_iter()
}

/// A tracked connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conn {
    /// The key in the initiator's direction.
    pub key: FlowKey,
    /// State.
    pub state: ConnState,
    /// When it was created.
    pub created: u64,
    /// When its last packet was seen.
    pub last_seen: u64,
    /// Packets, both directions.
    pub packets: u64,
    /// Bytes, both directions.
    pub bytes: u64,
    /// Packets of the responder's direction (included in `packets`).
    pub reply_packets: u64,
    /// Bytes of the responder's direction (included in `bytes`).
    pub reply_bytes: u64,
    /// The rules that allowed it (indices into the engine's rule registry: the
    /// initiator's egress chain, the responder's ingress chain).
    pub rules: [Option<u32>; 2],
    /// The engine policy epoch its verdict is valid for.
    pub epoch: u64,
    /// The policy version that allowed it.
    pub policy_version: u64,
    /// The local vNIC ports at its ends (initiator, responder), charged against their limits.
    pub owners: [Option<PortId>; 2],
    /// Strict window checking.
    pub strict: bool,
    /// Allowed on another host's verdict (VXLAN-GBP policy-applied).
    pub trusted: bool,
    /// TCP tracking: the initiator (0) and the responder (1), the last segment.
    pub tcp: TcpTrack,
    /// The end event has been emitted (time-wait lingers after it).
    pub ended: bool,
    /// The service chain and instance its packets go through, if its rule redirects it.
    pub steer: Option<Steer>,
    /// The table's change generation when it last changed
    /// ([`Conntrack::generation`]): a live migration's delta carries the
    /// connections changed since its pre-copy.
    pub changed: u64,
}

impl Conn {
    /// A new connection for `key` (initiator direction) at `now`.
    pub fn new(key: FlowKey, now: u64) -> Conn {
        Conn {
            key,
            state: ConnState::New,
            created: now,
            last_seen: now,
            packets: 0,
            bytes: 0,
            reply_packets: 0,
            reply_bytes: 0,
            rules: [None; 2],
            epoch: 0,
            policy_version: 0,
            owners: [None, None],
            strict: false,
            trusted: false,
            tcp: TcpTrack::default(),
            ended: false,
            steer: None,
            changed: 0,
        }
    }

    fn timeout(&self, t: &Timeouts) -> u64 {
        match self.state {
            ConnState::SynSent | ConnState::SynSent2 | ConnState::SynReceived => t.tcp_handshake,
            ConnState::Established => t.tcp_established,
            ConnState::FinWait | ConnState::CloseWait | ConnState::LastAck | ConnState::TimeWait => t.tcp_closing,
            ConnState::Close => t.tcp_close,
            ConnState::New if is_icmp(&self.key) => t.icmp,
            ConnState::Replied if is_icmp(&self.key) => t.icmp,
            ConnState::New => t.unreplied,
            ConnState::Replied => t.replied,
        }
    }

    /// Whether it has timed out at `now`.
    pub fn expired(&self, now: u64, t: &Timeouts) -> bool {
        now.saturating_sub(self.last_seen) > self.timeout(t)
    }

    /// Count `packets` packets of `bytes` bytes together (one, or a
    /// super-frame's segments) in the initiator's or the responder's
    /// (`reply`) direction.
    pub fn count(&mut self, reply: bool, packets: u64, bytes: u64) {
        self.packets += packets;
        self.bytes += bytes;
        if reply {
            self.reply_packets += packets;
            self.reply_bytes += bytes;
        }
    }

    /// The connection as a flow event of `kind` at `now`.
    pub fn event(&self, kind: EventKind, now: u64) -> FlowEvent {
        FlowEvent {
            kind,
            key: self.key,
            state: self.state,
            // A TCP connection starts `Established` only when its first
            // segment was not an opening (`tcptrack::open`, liberal): met
            // mid-stream.
            midstream: kind == EventKind::Start
                && self.key.protocol == palisade_wire::ip::IpProtocol::TCP
                && self.state == ConnState::Established,
            packets: self.packets,
            bytes: self.bytes,
            reply_packets: self.reply_packets,
            reply_bytes: self.reply_bytes,
            rules: self.rules,
            policy_version: self.policy_version,
            trusted: self.trusted,
            owners: self.owners,
            created: self.created,
            last_seen: self.last_seen,
            now,
            steer: self.steer,
        }
    }
}

fn is_icmp(key: &FlowKey) -> bool {
    key.protocol.0 == 1 || key.protocol.0 == 58
}

/// A packet seen on a tracked connection: what tracking it needs besides the
/// connection (and, for TCP, the segment).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sighting {
    /// It travels responder → initiator.
    pub reply: bool,
    /// The packets it stands for (a super-frame's segments; else 1).
    pub packets: u64,
    /// Its length: for a super-frame, that of its segments together.
    pub len: usize,
    /// It counts in the connection's packets and bytes (false when it was
    /// counted on another leg of a routed flow: it updates state only).
    pub count: bool,
    /// When it was seen.
    pub now: u64,
}

/// A connection removed while a migration's delta is being kept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tombstone {
    /// Its key (initiator direction).
    pub key: FlowKey,
    /// The vNIC ports at its ends.
    pub owners: [Option<PortId>; 2],
    /// The change generation it was removed in.
    pub generation: u64,
}

/// The slots of connections created or changed while a migration's delta
/// is being kept ([`Conntrack::arm_tombstones`]): a delta reads these
/// instead of walking the whole table, so the guest's pause costs what
/// changed, not what the table holds.
#[derive(Debug, Clone)]
struct ChangeLog {
    /// Slots, each pushed on its connection's first change in a generation
    /// (so a slot is there once per generation it changed in, at most).
    slots: Vec<Slot>,
    /// Every connection changed in a generation from this one on has its slot here.
    from: u64,
    /// More changes happened than the log keeps (the table's capacity):
    /// a delta walks the table instead.
    overflowed: bool,
}

/// The connection table.
#[derive(Debug, Clone)]
pub struct Conntrack {
    map: BoundedMap<Conn>,
    per_port: Vec<u32>,
    /// The change generation: every connection handed out mutably or
    /// created is stamped with it ([`Conn::changed`]).
    generation: u64,
    /// The keys and owners of connections removed since tombstones were
    /// armed ([`Conntrack::arm_tombstones`]), `None` when not armed.
    tombstones: Option<Vec<Tombstone>>,
    /// More removals happened than the tombstone log keeps.
    tombstones_overflowed: bool,
    /// The slots changed since tombstones were armed, `None` when not armed.
    changes: Option<ChangeLog>,
    /// Timeouts per state.
    pub timeouts: Timeouts,
    /// Full-table behaviour.
    pub full: FullPolicy,
}

/// How many slots an eviction scan looks at.
const EVICT_SCAN: usize = 16;

impl Conntrack {
    /// A table of at most `capacity` connections for ports `0..ports`.
    pub fn new(capacity: usize, ports: usize, timeouts: Timeouts, full: FullPolicy) -> Self {
        Conntrack {
            map: BoundedMap::new(capacity),
            per_port: vec![0; ports],
            generation: 1,
            tombstones: None,
            tombstones_overflowed: false,
            changes: None,
            timeouts,
            full,
        }
    }

    /// Connections held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no connection is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Most connections the table holds.
    pub fn capacity(&self) -> usize {
        self.map.capacity()
    }

    /// Connections charged to `port`.
    pub fn port_conns(&self, port: PortId) -> u32 {
        self.per_port.get(usize::from(port.0)).copied().unwrap_or(0)
    }

    /// Make room for `ports` ports.
    pub(crate) fn ensure_ports(&mut self, ports: usize) {
        if self.per_port.len() < ports {
            self.per_port.resize(ports, 0);
        }
    }

    /// The connection in `slot`.
    pub fn get(&self, slot: Slot) -> Option<&Conn> {
        self.map.get(slot)
    }

    /// The slot of the connection `key` belongs to, in either direction,
    /// expired or not (a read-only lookup).
    pub fn find(&self, key: &FlowKey) -> Option<Slot> {
        self.map.find(&key.canonical().0)
    }

    /// Hint that connection `slot` will be used soon: start loading it.
    #[inline]
    pub(crate) fn prefetch(&self, slot: Slot) {
        self.map.prefetch(slot);
    }

    /// The connection in `slot`, mutably (stamped as changed: whoever asks
    /// for it mutably may change it, and a stamp too many only lengthens a
    /// migration's delta).
    pub(crate) fn get_mut(&mut self, slot: Slot) -> Option<&mut Conn> {
        let generation = self.generation;
        let capacity = self.map.capacity();
        let conn = self.map.get_mut(slot)?;
        stamp(conn, slot, generation, &mut self.changes, capacity);
        Some(conn)
    }

    /// The current change generation. A connection whose
    /// [`Conn::changed`] is above the mark of a migration's export
    /// ([`crate::VnicExport::mark`]) changed after that export.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Start a new change generation; returns the one that ends (every
    /// connection changed so far is stamped with it or less).
    pub(crate) fn next_generation(&mut self) -> u64 {
        let ended = self.generation;
        self.generation += 1;
        ended
    }

    /// Keep the keys of connections removed from now on, and the slots of
    /// those created or changed from the next generation on, for a
    /// migration's delta (kept as they are when already armed: a VM's other
    /// vNIC may be mid-migration); at most the table's capacity of each,
    /// beyond which [`Conntrack::tombstones`] says the log overflowed and
    /// [`Conntrack::changed_since`] has no answer. Call before
    /// [`Conntrack::next_generation`] ends the generation an export read.
    pub(crate) fn arm_tombstones(&mut self) {
        if self.tombstones.is_none() {
            self.tombstones = Some(Vec::new());
            self.tombstones_overflowed = false;
        }
        if self.changes.is_none() {
            self.changes = Some(ChangeLog {
                // Reserved whole (4 bytes a slot of capacity), here at the
                // pre-copy: the packets that log their connections' changes
                // never reallocate it.
                slots: Vec::with_capacity(self.map.capacity()),
                from: self.generation + 1,
                overflowed: false,
            });
        }
    }

    /// Stop keeping removed keys and changed slots (the migration is over either way).
    pub(crate) fn disarm_tombstones(&mut self) {
        self.tombstones = None;
        self.tombstones_overflowed = false;
        self.changes = None;
    }

    /// The slots of the connections changed (or created) after generation
    /// `since`, each once, in slot order, possibly with slots since freed or
    /// reused (the caller checks [`Conn::changed`]): `None` when the change
    /// log is not armed, overflowed, or started after `since` (the caller
    /// walks the table).
    pub(crate) fn changed_since(&self, since: u64) -> Option<Vec<Slot>> {
        let log = self.changes.as_ref()?;
        if log.overflowed || since.saturating_add(1) < log.from {
            return None;
        }
        let mut slots = log.slots.clone();
        slots.sort_unstable();
        slots.dedup();
        Some(slots)
    }

    /// The removals logged since [`Conntrack::arm_tombstones`]: `None` when
    /// not armed or when more were removed than the log keeps.
    pub(crate) fn tombstones(&self) -> Option<&[Tombstone]> {
        if self.tombstones_overflowed {
            return None;
        }
        self.tombstones.as_deref()
    }

    /// Every connection.
    pub fn iter(&self) -> impl Iterator<Item = (Slot, &Conn)> {
        self.map.iter().map(|(s, _, c)| (s, c))
    }

    /// Find the connection of a packet with `key` (either direction); an
    /// expired one is removed (with its end event) and not returned. The
    /// boolean is true for the reply direction.
    pub(crate) fn lookup(
        &mut self,
        key: &FlowKey,
        now: u64,
        sink: &mut dyn EventSink,
        c: &mut Counters,
    ) -> Option<(Slot, bool)> {
        let slot = self.map.find(&key.canonical().0)?;
        let conn = self.map.get(slot)?;
        if conn.expired(now, &self.timeouts) {
            self.remove(slot, EndReason::Timeout, now, sink, c);
            return None;
        }
        Some((slot, conn.key != *key))
    }

    /// Insert a new connection, enforcing per-port limits (`limits`: the
    /// owners' `max_conns`) and the full-table policy.
    pub(crate) fn create(
        &mut self,
        conn: Conn,
        limits: [u32; 2],
        now: u64,
        sink: &mut dyn EventSink,
        c: &mut Counters,
    ) -> Result<Slot, DropReason> {
        // A connection with the same key (an import over live state) is replaced, its charges released.
        if let Some(old) = self.map.find(&conn.key.canonical().0) {
            self.remove(old, EndReason::Evicted, now, sink, c);
        }
        for (owner, limit) in charged(conn.owners).zip(limits) {
            if let Some(p) = owner
                && self.port_conns(p) >= limit
            {
                return Err(DropReason::VnicConnLimit);
            }
        }
        if self.map.is_full() {
            if self.full == FullPolicy::Refuse {
                return Err(DropReason::ConntrackFull);
            }
            let t = self.timeouts;
            let victim = self.map.victim(EVICT_SCAN, |v| {
                v.ended
                    || matches!(v.state, ConnState::New | ConnState::SynSent | ConnState::SynSent2)
                    || v.expired(now, &t)
            });
            match victim {
                Some(slot) => {
                    self.remove(slot, EndReason::Evicted, now, sink, c);
                    c.conns_evicted += 1;
                }
                None => return Err(DropReason::ConntrackFull),
            }
        }
        let owners = conn.owners;
        let event = conn.event(EventKind::Start, now);
        let mut conn = conn;
        conn.changed = self.generation;
        let slot = self
            .map
            .insert(conn.key.canonical().0, conn)
            .map_err(|_| DropReason::ConntrackFull)?;
        if let Some(log) = &mut self.changes {
            log.push(slot, self.map.capacity());
        }
        for p in charged(owners).flatten() {
            if let Some(n) = self.per_port.get_mut(usize::from(p.0)) {
                *n += 1;
            }
        }
        c.conns_created += 1;
        sink.event(&event);
        Ok(slot)
    }

    /// Remove a connection, emitting its end event unless already emitted.
    pub(crate) fn remove(
        &mut self,
        slot: Slot,
        reason: EndReason,
        now: u64,
        sink: &mut dyn EventSink,
        c: &mut Counters,
    ) -> Option<Conn> {
        let (_, conn) = self.map.remove(slot)?;
        if let Some(log) = &mut self.tombstones {
            if log.len() < self.map.capacity() {
                log.push(Tombstone {
                    key: conn.key,
                    owners: conn.owners,
                    generation: self.generation,
                });
            } else {
                self.tombstones_overflowed = true;
            }
        }
        for p in charged(conn.owners).flatten() {
            if let Some(n) = self.per_port.get_mut(usize::from(p.0)) {
                *n = n.saturating_sub(1);
            }
        }
        if !conn.ended {
            c.conns_ended += 1;
            sink.event(&conn.event(EventKind::End(reason), now));
        }
        Some(conn)
    }

    /// Remove up to `budget` expired connections; returns how many.
    pub(crate) fn expire(&mut self, now: u64, budget: usize, sink: &mut dyn EventSink, c: &mut Counters) -> usize {
        let t = self.timeouts;
        let expired: Vec<Slot> = self
            .map
            .iter()
            .filter(|(_, _, v)| v.expired(now, &t))
            .map(|(s, _, _)| s)
            .take(budget)
            .collect();
        for &s in &expired {
            self.remove(s, EndReason::Timeout, now, sink, c);
        }
        expired.len()
    }

    /// One step of a resumable sweep ([`crate::Sweep`]): the slots
    /// `from..from + scan` (those past the slab's end do not exist), each
    /// expired connection in them removed (its end event to `sink`, as
    /// [`Conntrack::expire`]), and with `updates_since` each live one seen
    /// since then reported to `updates` as an update event at `now`.
    /// Returns the slot the next step starts at and how many were removed;
    /// the sweep is over when that slot is [`Conntrack::slab_len`] or more.
    /// At most `scan` slots are looked at, whatever the table holds: that
    /// bounds the step's time, and the caller's lock hold with it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn sweep(
        &mut self,
        from: usize,
        scan: usize,
        now: u64,
        updates_since: Option<u64>,
        sink: &mut dyn EventSink,
        updates: &mut dyn EventSink,
        c: &mut Counters,
    ) -> (usize, usize) {
        let t = self.timeouts;
        let end = from.saturating_add(scan).min(self.map.slab_len());
        let mut removed = 0;
        for slot in from..end {
            // A slot below the slab's length is a valid index (slots are u32).
            let slot = slot as Slot;
            let Some(conn) = self.map.get(slot) else { continue };
            if conn.expired(now, &t) {
                self.remove(slot, EndReason::Timeout, now, sink, c);
                removed += 1;
            } else if let Some(since) = updates_since
                && conn.last_seen >= since
                && !conn.ended
            {
                updates.event(&conn.event(EventKind::Update, now));
            }
        }
        (end.max(from), removed)
    }

    /// How many slots have ever been handed out: a sweep that reached it
    /// has looked at every connection.
    pub fn slab_len(&self) -> usize {
        self.map.slab_len()
    }

    /// Account a non-TCP packet to its connection.
    #[inline(always)]
    pub(crate) fn track_other(&mut self, slot: Slot, seen: Sighting, sink: &mut dyn EventSink) {
        let Sighting {
            reply,
            packets,
            len,
            count,
            now,
        } = seen;
        let generation = self.generation;
        let capacity = self.map.capacity();
        let Some(conn) = self.map.get_mut(slot) else { return };
        stamp(conn, slot, generation, &mut self.changes, capacity);
        if count {
            conn.count(reply, packets, len as u64);
        }
        conn.last_seen = now;
        if reply && conn.state == ConnState::New {
            conn.state = ConnState::Replied;
            sink.event(&conn.event(EventKind::Update, now));
        }
    }

    /// Track a TCP segment of an existing connection (in a liberal zone,
    /// window failures pass). A segment that cannot belong to it is an error
    /// and changes nothing; [`Tracked::Reopen`] and [`Tracked::Kill`] tell
    /// the caller to end the connection (then, for a reopen, to start a new one).
    pub(crate) fn track_tcp(
        &mut self,
        slot: Slot,
        seen: Sighting,
        seg: &TcpSeg,
        sink: &mut dyn EventSink,
        c: &mut Counters,
    ) -> Result<Tracked, DropReason> {
        let Sighting {
            reply,
            packets,
            len,
            count,
            now,
        } = seen;
        let generation = self.generation;
        let capacity = self.map.capacity();
        let Some(conn) = self.map.get_mut(slot) else {
            return Err(DropReason::TcpNoConnection);
        };
        stamp(conn, slot, generation, &mut self.changes, capacity);
        let liberal = !conn.strict;
        let (tracked, state) = tcptrack::segment(&mut conn.tcp, Some(conn.state), reply, seg, liberal, c)?;
        if tracked == Tracked::Reopen {
            return Ok(tracked);
        }
        if count {
            conn.count(reply, packets, len as u64);
        }
        if tracked == Tracked::Ignored {
            // Let through, but nothing about the connection changed: its
            // timeout is not renewed either (as in Linux).
            return Ok(tracked);
        }
        conn.last_seen = now;
        let old = conn.state;
        conn.state = state.unwrap_or(old);
        if conn.state == old {
            return Ok(tracked);
        }
        let end = match conn.state {
            ConnState::TimeWait => Some(EndReason::Closed),
            ConnState::Close => Some(EndReason::Reset),
            _ => None,
        };
        match end {
            Some(reason) if !conn.ended => {
                // Over, but it lingers so that segments still in flight from
                // either side are recognised as its late packets instead of
                // being classified as new flows (and denied, and logged).
                conn.ended = true;
                c.conns_ended += 1;
                sink.event(&conn.event(EventKind::End(reason), now));
            }
            Some(_) => {}
            None => {
                // Out of sync after a close and back (a SYN reusing the ports,
                // answered): a later close ends it again.
                conn.ended = false;
                sink.event(&conn.event(EventKind::Update, now));
            }
        }
        Ok(tracked)
    }
}

impl ChangeLog {
    /// Log `slot`, or note the overflow past `capacity` entries.
    fn push(&mut self, slot: Slot, capacity: usize) {
        if self.overflowed {
            return;
        }
        if self.slots.len() < capacity {
            self.slots.push(slot);
        } else {
            self.overflowed = true;
            self.slots = Vec::new();
        }
    }
}

/// Stamp `conn` (in `slot`) as changed in `generation`, logging its slot
/// on its first change in the generation while a change log is armed.
#[inline(always)]
fn stamp(conn: &mut Conn, slot: Slot, generation: u64, changes: &mut Option<ChangeLog>, capacity: usize) {
    if conn.changed != generation {
        conn.changed = generation;
        if let Some(log) = changes {
            log.push(slot, capacity);
        }
    }
}

/// Start tracking a TCP connection from its first segment (the initiator's):
/// see [`tcptrack::open`]. A segment that cannot start a connection is
/// [`DropReason::TcpNoConnection`].
pub(crate) fn tcp_open(conn: &mut Conn, seg: &TcpSeg, c: &mut Counters) -> Result<(), DropReason> {
    let liberal = !conn.strict;
    tcptrack::open(&mut conn.tcp, &mut conn.state, seg, liberal, c)
}

#[cfg(test)]
mod tests {
    use palisade_wire::flow::Segment;
    use palisade_wire::ip::IpProtocol;
    use palisade_wire::tcp::TcpFlags;

    use super::*;

    /// A counted packet of `len` bytes at `now`, in the reply direction or not.
    fn seen(reply: bool, len: usize, now: u64) -> Sighting {
        Sighting {
            reply,
            packets: 1,
            len,
            count: true,
            now,
        }
    }

    fn key() -> FlowKey {
        FlowKey {
            segment: Segment::vlan(100),
            src: [1; 16],
            dst: [2; 16],
            src_port: 40000,
            dst_port: 443,
            protocol: IpProtocol::TCP,
            icmp_type: 0,
            icmp_code: 0,
        }
    }

    fn seg(seq: u32, ack: u32, flags: TcpFlags, len: u32) -> TcpSeg {
        TcpSeg {
            seq,
            ack,
            win: 1000,
            flags,
            len,
            ..TcpSeg::default()
        }
    }

    fn handshake(strict: bool) -> (Conntrack, Slot, Vec<FlowEvent>, Counters) {
        let mut ct = Conntrack::new(4, 4, Timeouts::default(), FullPolicy::Refuse);
        let mut ev = Vec::new();
        let mut c = Counters::default();
        let mut conn = Conn::new(key(), 0);
        conn.strict = strict;
        tcp_open(&mut conn, &seg(100, 0, TcpFlags::SYN, 0), &mut c).unwrap();
        let slot = ct.create(conn, [u32::MAX; 2], 0, &mut ev, &mut c).unwrap();
        let synack = seg(5000, 101, TcpFlags::SYN | TcpFlags::ACK, 0);
        assert_eq!(
            ct.track_tcp(slot, seen(true, 60, 1), &synack, &mut ev, &mut c),
            Ok(Tracked::Accepted)
        );
        assert_eq!(ct.get(slot).unwrap().state, ConnState::SynReceived);
        let ack = seg(101, 5001, TcpFlags::ACK, 0);
        assert_eq!(
            ct.track_tcp(slot, seen(false, 60, 2), &ack, &mut ev, &mut c),
            Ok(Tracked::Accepted)
        );
        assert_eq!(ct.get(slot).unwrap().state, ConnState::Established);
        (ct, slot, ev, c)
    }

    /// A connection whose two ends are one vNIC (it addresses itself, through
    /// another MAC) is one of that vNIC's connections, not two: it is charged,
    /// checked against the limit and released once.
    #[test]
    fn a_connection_to_oneself_is_charged_once() {
        let mut ct = Conntrack::new(4, 4, Timeouts::default(), FullPolicy::Refuse);
        let (mut ev, mut c) = (Vec::new(), Counters::default());
        let p = PortId(1);
        let mut conn = Conn::new(key(), 0);
        conn.owners = [Some(p), Some(p)];
        let slot = ct.create(conn.clone(), [1, 1], 0, &mut ev, &mut c).unwrap();
        assert_eq!(ct.port_conns(p), 1);
        let mut other = Conn::new(key().reversed(), 0);
        other.key.src_port += 1;
        other.owners = [Some(p), None];
        assert_eq!(
            ct.create(other, [1, u32::MAX], 0, &mut ev, &mut c),
            Err(DropReason::VnicConnLimit)
        );
        ct.remove(slot, EndReason::Closed, 1, &mut ev, &mut c);
        assert_eq!(ct.port_conns(p), 0);
    }

    #[test]
    fn strict_window_drops_and_liberal_counts() {
        let (mut ct, slot, mut ev, mut c) = handshake(true);
        let far = seg(101 + 50_000, 5001, TcpFlags::ACK, 10);
        assert_eq!(
            ct.track_tcp(slot, seen(false, 60, 3), &far, &mut ev, &mut c),
            Err(DropReason::TcpOutOfWindow)
        );
        let bad_ack = seg(101, 5001 + 10_000, TcpFlags::ACK, 0);
        assert_eq!(
            ct.track_tcp(slot, seen(false, 60, 3), &bad_ack, &mut ev, &mut c),
            Err(DropReason::TcpOutOfWindow)
        );
        let ok = seg(101, 5001, TcpFlags::ACK | TcpFlags::PSH, 500);
        assert_eq!(
            ct.track_tcp(slot, seen(false, 60, 3), &ok, &mut ev, &mut c),
            Ok(Tracked::Accepted)
        );

        let (mut ct, slot, mut ev, mut c) = handshake(false);
        assert_eq!(
            ct.track_tcp(slot, seen(false, 60, 3), &far, &mut ev, &mut c),
            Ok(Tracked::Accepted)
        );
        assert_eq!(c.tcp_window_liberal, 1);
    }

    #[test]
    fn fin_teardown_and_timeouts() {
        let (mut ct, slot, mut ev, mut c) = handshake(false);
        let fin = seg(101, 5001, TcpFlags::FIN | TcpFlags::ACK, 0);
        ct.track_tcp(slot, seen(false, 60, 3), &fin, &mut ev, &mut c).unwrap();
        assert_eq!(ct.get(slot).unwrap().state, ConnState::FinWait);
        let fin2 = seg(5001, 102, TcpFlags::FIN | TcpFlags::ACK, 0);
        ct.track_tcp(slot, seen(true, 60, 4), &fin2, &mut ev, &mut c).unwrap();
        assert_eq!(ct.get(slot).unwrap().state, ConnState::LastAck);
        let last = seg(102, 5002, TcpFlags::ACK, 0);
        ct.track_tcp(slot, seen(false, 60, 4), &last, &mut ev, &mut c).unwrap();
        assert_eq!(ct.get(slot).unwrap().state, ConnState::TimeWait);
        assert_eq!(ev.last().unwrap().kind, EventKind::End(EndReason::Closed));
        let ends = ev.len();
        // Time-wait lingers, then expires without a second end event.
        assert!(ct.lookup(&key(), 5 + 60 * SEC, &mut ev, &mut c).is_some());
        assert!(ct.lookup(&key(), 5 + 121 * SEC, &mut ev, &mut c).is_none());
        assert_eq!(ev.len(), ends);
        assert!(ct.is_empty());
    }

    #[test]
    fn limits_full_policy_and_bad_flags() {
        let mut ct = Conntrack::new(1, 2, Timeouts::default(), FullPolicy::Refuse);
        let (mut ev, mut c) = (Vec::new(), Counters::default());
        let mut conn = Conn::new(key(), 0);
        conn.owners = [Some(PortId(1)), None];
        assert_eq!(
            ct.create(conn.clone(), [0, 0], 0, &mut ev, &mut c),
            Err(DropReason::VnicConnLimit)
        );
        ct.create(conn.clone(), [1, 0], 0, &mut ev, &mut c).unwrap();
        assert_eq!(ct.port_conns(PortId(1)), 1);
        let mut other = conn.clone();
        other.key.src_port = 1;
        other.owners = [None, None];
        assert_eq!(
            ct.create(other.clone(), [9, 9], 0, &mut ev, &mut c),
            Err(DropReason::ConntrackFull)
        );
        ct.full = FullPolicy::EvictIdle;
        ct.create(other, [9, 9], 0, &mut ev, &mut c).unwrap();
        assert_eq!(c.conns_evicted, 1);
        assert_eq!(ct.port_conns(PortId(1)), 0);
        assert!(bad_tcp_flags(TcpFlags::SYN | TcpFlags::FIN));
        assert!(bad_tcp_flags(TcpFlags::EMPTY));
        assert!(!bad_tcp_flags(TcpFlags::SYN));
    }

    /// A small deterministic generator (xorshift64*), so a failing seed replays.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
        }
    }

    /// The slots a full-table walk finds changed after `since`.
    fn walked(ct: &Conntrack, since: u64) -> Vec<Slot> {
        let mut v: Vec<Slot> = ct.iter().filter(|(_, c)| c.changed > since).map(|(s, _)| s).collect();
        v.sort_unstable();
        v
    }

    /// The slots the change log gives for `since`, checked as a delta
    /// checks them (still there, changed after `since`).
    fn logged(ct: &Conntrack, since: u64) -> Option<Vec<Slot>> {
        let slots = ct.changed_since(since)?;
        Some(
            slots
                .into_iter()
                .filter(|&s| ct.get(s).is_some_and(|c| c.changed > since))
                .collect(),
        )
    }

    /// Random creations, packets, mutable borrows, removals and new
    /// generations: whenever the change log answers, it names exactly the
    /// connections a full-table walk finds changed (the log is a shortcut
    /// for the walk, never a different answer), for the mark of the export
    /// that armed it and for every later mark.
    #[test]
    fn the_change_log_names_what_a_table_walk_finds_changed() {
        let mut compared = 0u32;
        for seed in 1..=300u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let mut ct = Conntrack::new(48, 4, Timeouts::default(), FullPolicy::EvictIdle);
            let (mut ev, mut c) = (Vec::new(), Counters::default());
            let mut next_port = 1u16;
            let mut marks: Vec<u64> = Vec::new();
            for step in 0..400 {
                let slots: Vec<Slot> = ct.iter().map(|(s, _)| s).collect();
                let any = |rng: &mut Rng| slots[rng.below(slots.len() as u64) as usize];
                match rng.below(10) {
                    0..=2 => {
                        let mut k = key();
                        k.src_port = next_port;
                        k.protocol = IpProtocol::UDP;
                        next_port = next_port.wrapping_add(1);
                        let _ = ct.create(Conn::new(k, step), [u32::MAX; 2], step, &mut ev, &mut c);
                    }
                    3 | 4 if !slots.is_empty() => {
                        let s = any(&mut rng);
                        ct.track_other(s, seen(rng.below(2) == 0, 60, step), &mut ev);
                    }
                    5 if !slots.is_empty() => {
                        let s = any(&mut rng);
                        if let Some(conn) = ct.get_mut(s) {
                            conn.packets += 1;
                        }
                    }
                    6 if !slots.is_empty() => {
                        let s = any(&mut rng);
                        ct.remove(s, EndReason::Timeout, step, &mut ev, &mut c);
                    }
                    7 => {
                        // An export: the first arms the log, every one ends a generation.
                        if marks.is_empty() {
                            ct.arm_tombstones();
                        }
                        marks.push(ct.next_generation());
                    }
                    _ => {}
                }
                // The pre-copy's mark (a delta) and the latest (a further round).
                for &m in marks.first().into_iter().chain(marks.last()) {
                    match logged(&ct, m) {
                        Some(log) => {
                            assert_eq!(log, walked(&ct, m), "seed {seed} step {step} mark {m}");
                            compared += 1;
                        }
                        // Only past its bound (a delta then walks the table).
                        None => assert!(
                            ct.changes.as_ref().is_some_and(|l| l.overflowed),
                            "seed {seed} step {step}: no answer for mark {m}"
                        ),
                    }
                }
            }
            // A mark from before the log was armed has no answer: the caller walks.
            if let Some(&first) = marks.first() {
                assert_eq!(ct.changed_since(first - 1), None, "seed {seed}");
            }
            ct.disarm_tombstones();
            assert_eq!(ct.changed_since(marks.last().copied().unwrap_or(0)), None);
        }
        assert!(compared > 10_000, "the log answered {compared} times only");
    }

    /// More changes than the table's capacity: the log gives up (a delta
    /// then walks the table) instead of growing without bound or answering
    /// short; re-armed, it starts over.
    #[test]
    fn a_change_log_past_the_tables_capacity_overflows_to_a_walk() {
        let mut ct = Conntrack::new(4, 4, Timeouts::default(), FullPolicy::Refuse);
        let (mut ev, mut c) = (Vec::new(), Counters::default());
        let mut slots = Vec::new();
        for p in 0..4u16 {
            let mut k = key();
            k.src_port = p;
            slots.push(ct.create(Conn::new(k, 0), [u32::MAX; 2], 0, &mut ev, &mut c).unwrap());
        }
        ct.arm_tombstones();
        let mark = ct.next_generation();
        // One change per connection per generation: 4 entries, at capacity.
        for &s in &slots {
            ct.track_other(s, seen(false, 60, 1), &mut ev);
            // A second change in the same generation is not logged again.
            ct.track_other(s, seen(true, 60, 1), &mut ev);
        }
        assert_eq!(logged(&ct, mark), Some(walked(&ct, mark)));
        assert_eq!(walked(&ct, mark).len(), 4);
        // A new generation, one more change: the fifth entry overflows.
        ct.next_generation();
        ct.track_other(slots[0], seen(false, 60, 2), &mut ev);
        assert_eq!(ct.changed_since(mark), None);
        assert_eq!(walked(&ct, mark).len(), 4, "the walk still answers");
        ct.disarm_tombstones();
        ct.arm_tombstones();
        let mark = ct.next_generation();
        ct.track_other(slots[1], seen(false, 60, 3), &mut ev);
        assert_eq!(logged(&ct, mark), Some(vec![slots[1]]));
    }
}

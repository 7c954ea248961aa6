//! The engine's flow and connection step.
//!
//! For a packet that passed L2: the flow cache (a current entry settles it),
//! else an existing connection (reinstalled in the cache, re-validated after
//! a policy change and cut if now denied), else a new flow classified once
//! and tracked; TCP through its state machine. ICMP errors are related to
//! the connection they quote or decided by the policy like any flow.

use palisade_wire::flow::{self, FlowInfo, FlowKey};
use palisade_wire::ip::IpProtocol;
use palisade_wire::tcp::TcpFlags;

use crate::conntrack::{self, Conn, ConnState, Sighting, TcpSeg, Tracked};
use crate::events::{EndReason, EventKind, EventSink, FlowEvent};
use crate::flow_table::{CachedVerdict, FlowEntry, FlowHash};
use crate::service::Steer;
use crate::table::Slot;
use crate::verdict::DropReason;

use super::{Engine, Packet, canonical, tcp_seg};

impl Engine {
    /// Decide a packet of a flow (not an ICMP error): the flow cache, an
    /// existing connection, or a new flow classified and tracked.
    ///
    /// The cache hit, nearly every packet, is settled here, inlined into
    /// the pipeline; the rest is [`Engine::decide_miss`]'s. Returns the
    /// connection the packet was accounted to and whether it travels in
    /// the reply direction (`None`: forwarded without one).
    #[inline(always)]
    pub(super) fn decide(
        &mut self,
        pkt: &mut Packet,
        info: &FlowInfo,
        hash: Option<FlowHash>,
        inner: &[u8],
        sink: &mut dyn EventSink,
    ) -> Result<Option<(Slot, bool)>, DropReason> {
        let key = &info.key;
        let tcp = if key.protocol == IpProtocol::TCP {
            let mut seg = tcp_seg(inner, info).ok_or(DropReason::Malformed)?;
            seg.last_offset = pkt.last_offset;
            if conntrack::bad_tcp_flags(seg.flags) {
                return Err(DropReason::TcpBadFlags);
            }
            Some(seg)
        } else {
            None
        };
        // Fast path: a current cache entry whose connection is still there.
        let hash = hash.unwrap_or_else(|| self.flows.hash(key));
        if let Some(e) = self.flows.get_current(key, hash, self.epoch) {
            match e.verdict {
                CachedVerdict::Drop(r) => {
                    self.counters.cache_hits += 1;
                    self.tally_rules(pkt, e.rules);
                    return Err(r);
                }
                CachedVerdict::Allow | CachedVerdict::AllowInspected(_) => {
                    // The slot may have been reused by another connection
                    // since (expiry does not reach into this cache): check
                    // that it is this flow's, in either direction.
                    if let Some(slot) = e.conn
                        && let Some(conn) = self.conns.get(slot)
                        && let reply = conn.key != *key
                        && (!reply || conn.key == key.reversed())
                        && !conn.expired(pkt.now, &self.conns.timeouts)
                    {
                        // The byte beside the verdict just read: what inspection costs a flow without it.
                        pkt.inspect = e.verdict.inspection();
                        self.counters.cache_hits += 1;
                        match self.track(pkt, slot, reply, tcp.as_ref(), sink) {
                            // Reopened: counted with the new connection below.
                            Ok(false) => {}
                            done => {
                                self.tally_rules(pkt, e.rules);
                                return done.map(|_| Some((slot, reply)));
                            }
                        }
                    }
                }
            }
        }
        self.decide_miss(pkt, key, hash, tcp.as_ref(), sink)
    }

    /// [`Engine::decide`] past the flow cache: an existing connection, or a new flow.
    #[inline(never)]
    fn decide_miss(
        &mut self,
        pkt: &mut Packet,
        key: &FlowKey,
        hash: FlowHash,
        tcp: Option<&TcpSeg>,
        sink: &mut dyn EventSink,
    ) -> Result<Option<(Slot, bool)>, DropReason> {
        let (now, src_vnic, len, trusted) = (pkt.now, pkt.src_vnic, pkt.len, pkt.trusted);
        let key = *key;
        self.counters.cache_misses += 1;
        // An existing connection: the reply direction, an evicted or imported entry, or a policy change.
        if let Some((slot, reply)) = self.conns.lookup(&key, now, sink, &mut self.counters)
            && let Some(conn) = self.conns.get(slot)
        {
            // The reply direction shares the initiator's rule counters and
            // inspection profile (resolved again if its entry is gone).
            let initiator = self.flows.get(&conn.key).filter(|e| e.conn == Some(slot));
            let mut rules = initiator.map_or([None; 2], |e| e.rules);
            let cached = initiator.map(|e| e.verdict.inspection());
            let (orig, trusted, current) = (conn.key, conn.trusted, conn.epoch == self.epoch);
            let mut inspect = match cached {
                Some(p) => p,
                // A connection taken over (imported) or whose entry was evicted.
                None if current && !trusted => self.inspection_of(&orig),
                None => None,
            };
            if !current {
                self.counters.revalidations += 1;
                let chain = match self.classify(&orig) {
                    Ok(c) => {
                        (rules, inspect) = (c.rules, c.inspect);
                        c.chain
                    }
                    Err(_) => {
                        self.cut(slot, EndReason::PolicyRevoked, now, sink);
                        return Err(DropReason::PolicyRevoked);
                    }
                };
                let version = self.lookup.version();
                if let Some(c) = self.conns.get_mut(slot) {
                    c.epoch = self.epoch;
                    c.policy_version = version;
                    c.rules = rules;
                    // Still steered through the same chain: same instance
                    // and offload; else through the new chain (or none),
                    // its instance chosen afresh.
                    c.steer = match (c.steer, chain) {
                        (Some(old), Some(new)) if old.chain == new => Some(old),
                        (_, new) => new.map(Steer::new),
                    };
                }
            }
            pkt.inspect = inspect;
            self.cache(key, hash, CachedVerdict::allowed(inspect), Some(slot), rules);
            match self.track(pkt, slot, reply, tcp, sink) {
                // Reopened: counted with the new connection below.
                Ok(false) => {}
                done => {
                    self.tally_rules(pkt, rules);
                    return done.map(|_| Some((slot, reply)));
                }
            }
        }
        // Nothing coming back from an appliance starts a connection.
        if pkt.service.is_some() {
            return Err(DropReason::ApplianceNotSteered);
        }
        // A new flow.
        // A trusted flow was classified, and inspected, on the host that sent it.
        let (rules, inspect, chain) = if trusted {
            ([None; 2], None, None)
        } else {
            match self.classify(&key) {
                Ok(c) => (c.rules, c.inspect, c.chain),
                Err((rules, reason)) => {
                    // A segment of a connection, not its opening: one met
                    // mid-stream (`FlowEvent::midstream`).
                    let midstream =
                        tcp.is_some_and(|s| s.flags.contains(TcpFlags::ACK) && !s.flags.contains(TcpFlags::RST));
                    return Err(self.deny_new(pkt, key, hash, reason, rules, midstream, sink));
                }
            }
        };
        pkt.inspect = inspect;
        if key.is_echo_reply() {
            // An echo reply passes only as part of the connection its request
            // opened (found above); one without is decided by the policy like
            // any flow (a rule on echo-reply) and opens nothing, so that it
            // cannot let the other side's requests through as its "replies".
            self.tally_rules(pkt, rules);
            return Ok(None);
        }
        let dst_port = self.local_port_of(key.dst_addr());
        let ends = [src_vnic, dst_port];
        let strict = ends.iter().flatten().any(|p| self.vnic(*p).is_some_and(|v| v.strict));
        let limits = ends.map(|p| p.and_then(|p| self.vnic(p)).map_or(u32::MAX, |v| v.max_conns));
        let mut conn = Conn::new(key, now);
        conn.owners = ends;
        conn.strict = strict;
        conn.trusted = trusted;
        conn.epoch = self.epoch;
        conn.policy_version = self.lookup.version();
        conn.packets = pkt.packets;
        conn.bytes = len as u64;
        conn.rules = rules;
        // The instance is chosen now, so that the connection's start event
        // (and record) names it; none up, its first packet follows `on_failure`.
        conn.steer = chain.map(|c| self.first_instance(c, &key));
        if let Some(seg) = tcp {
            if !strict && seg.flags.contains(TcpFlags::RST) {
                // A reset for a connection never seen, in a liberal zone where
                // the policy allows its direction: forwarded, nothing tracked
                // (a deliberate difference from Linux, which calls it invalid:
                // it tells an end whose connection was lost with our state).
                return Ok(None);
            }
            conntrack::tcp_open(&mut conn, seg, &mut self.counters)?;
        }
        let slot = self.conns.create(conn, limits, now, sink, &mut self.counters)?;
        if let Some(p) = src_vnic
            && let Some(t) = self.port_tallies.get_mut(usize::from(p.0))
        {
            t.hits += 1;
        }
        self.cache(key, hash, CachedVerdict::allowed(inspect), Some(slot), rules);
        // A verdict cached for the other direction (a denied attempt from
        // the other end) must not shadow this connection's replies.
        self.flows.remove(&key.reversed());
        self.tally_rules(pkt, rules);
        Ok(Some((slot, false)))
    }

    /// A new flow the policy denies: its verdict cached (later packets meet
    /// it on the cache), its rules counted, and one `Denied` event with both
    /// ends (marked `midstream` for a TCP segment of a connection this
    /// engine never saw open); returns `reason` for the caller to drop with.
    #[allow(clippy::too_many_arguments)]
    fn deny_new(
        &mut self,
        pkt: &Packet,
        key: FlowKey,
        hash: FlowHash,
        reason: DropReason,
        rules: [Option<u32>; 2],
        midstream: bool,
        sink: &mut dyn EventSink,
    ) -> DropReason {
        self.cache(key, hash, CachedVerdict::Drop(reason), None, rules);
        self.tally_rules(pkt, rules);
        let now = pkt.now;
        sink.event(&FlowEvent {
            kind: EventKind::Denied(reason),
            key,
            state: ConnState::New,
            midstream,
            packets: pkt.packets,
            bytes: pkt.len as u64,
            reply_packets: 0,
            reply_bytes: 0,
            rules,
            policy_version: self.lookup.version(),
            trusted: false,
            owners: [pkt.src_vnic, self.local_port_of(key.dst_addr())],
            created: now,
            last_seen: now,
            now,
            steer: None,
        });
        reason
    }

    pub(super) fn cache(
        &mut self,
        key: FlowKey,
        hash: FlowHash,
        verdict: CachedVerdict,
        conn: Option<Slot>,
        rules: [Option<u32>; 2],
    ) {
        let entry = FlowEntry {
            epoch: self.epoch,
            verdict,
            conn,
            rules,
        };
        if self.flows.insert_hashed(key, hash, entry) {
            self.counters.cache_evictions += 1;
        }
    }

    /// Remove a connection and both directions' cache entries.
    pub(super) fn cut(&mut self, slot: Slot, reason: EndReason, now: u64, sink: &mut dyn EventSink) {
        if let Some(conn) = self.conns.remove(slot, reason, now, sink, &mut self.counters) {
            self.flows.remove(&conn.key);
            self.flows.remove(&conn.key.reversed());
        }
    }

    /// Account a packet to its connection; `Ok(false)` when the connection
    /// ended for it to start a new one (a SYN reusing the ports of a closed
    /// connection): the caller goes on as for a new flow.
    #[inline(always)]
    pub(super) fn track(
        &mut self,
        pkt: &mut Packet,
        slot: Slot,
        reply: bool,
        tcp: Option<&TcpSeg>,
        sink: &mut dyn EventSink,
    ) -> Result<bool, DropReason> {
        let now = pkt.now;
        let seen = Sighting {
            reply,
            packets: pkt.packets,
            len: pkt.len,
            count: !pkt.second_leg,
            now,
        };
        let Some(seg) = tcp else {
            self.conns.track_other(slot, seen, sink);
            return Ok(true);
        };
        let tracked = self.conns.track_tcp(slot, seen, seg, sink, &mut self.counters)?;
        match tracked {
            Tracked::Accepted | Tracked::Ignored => Ok(true),
            Tracked::Kill if self.reset_goes_through_appliance(pkt, slot) => {
                // A steered connection's last packet goes through its
                // appliance like the others: the connection (already marked
                // ended) stays for it to be recognised when it comes back,
                // and is cut then ([`Engine::returning`]), or now if the
                // packet does not go to the appliance after all.
                pkt.reset_pending = true;
                Ok(true)
            }
            Tracked::Kill => {
                self.cut(slot, EndReason::Reset, now, sink);
                Ok(true)
            }
            Tracked::Reopen => {
                self.cut(slot, EndReason::Closed, now, sink);
                Ok(false)
            }
        }
    }

    /// An ICMP error. Related to a tracked connection (it quotes a packet of
    /// one, and travels back towards that packet's sender), it passes unless
    /// a rule naming its type denies it; unrelated, the policy decides it
    /// like any flow. Either way it opens nothing. The caller forwards it
    /// when this returns `Ok`.
    pub(super) fn icmp_error(
        &mut self,
        pkt: &Packet,
        info: &FlowInfo,
        hash: Option<FlowHash>,
        l4: &[u8],
        sink: &mut dyn EventSink,
    ) -> Result<(), DropReason> {
        let (now, len) = (pkt.now, pkt.len);
        let key = info.key;
        let quoted = l4.get(8..).unwrap_or(&[]);
        let related = flow::extract_quoted(quoted, key.segment)
            .filter(|q| canonical(key.dst_addr()) == canonical(q.src_addr()))
            .and_then(|q| Some((self.conns.lookup(&q, now, sink, &mut self.counters)?.0, q)));
        if let Some((slot, q)) = related {
            match self.classify_related(&key) {
                Ok(rules) => {
                    self.counters.icmp_related += 1;
                    if let Some(c) = self.conns.get_mut(slot) {
                        // The error travels back towards the quoted packet's sender.
                        let reply = c.key == q;
                        c.count(reply, pkt.packets, len as u64);
                    }
                    self.tally_rules(pkt, rules);
                    return Ok(());
                }
                Err((rules, reason)) => {
                    self.tally_rules(pkt, rules);
                    return Err(reason);
                }
            }
        }
        // Unrelated: the policy decides; the verdict is cached under the
        // error's own key (errors never share a key with a connection).
        let hash = hash.unwrap_or_else(|| self.flows.hash(&key));
        if let Some(e) = self.flows.get_current(&key, hash, self.epoch) {
            self.counters.cache_hits += 1;
            self.tally_rules(pkt, e.rules);
            return match e.verdict {
                CachedVerdict::Allow | CachedVerdict::AllowInspected(_) => Ok(()),
                CachedVerdict::Drop(r) => Err(r),
            };
        }
        self.counters.cache_misses += 1;
        match self.classify(&key) {
            Ok(c) => {
                let rules = c.rules;
                self.cache(key, hash, CachedVerdict::Allow, None, rules);
                self.tally_rules(pkt, rules);
                Ok(())
            }
            Err((rules, _)) => Err(self.deny_new(pkt, key, hash, DropReason::IcmpErrorUnrelated, rules, false, sink)),
        }
    }
}
